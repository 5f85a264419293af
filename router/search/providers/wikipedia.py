"""Wikipedia through the public MediaWiki APIs; no key, but a descriptive User-Agent.

Two steps: ``GET {base}/w/api.php?action=query&list=search&format=json&srsearch=&srlimit=``
ranks pages (``query.search[] {title, pageid, snippet}``, snippets in HTML); then the lead
section of each of the top k comes from ``GET {rest_base}/api/rest_v1/page/summary/{title}``,
fetched concurrently. A summary that fails (any error, or an empty extract) falls back to the
search snippet with its HTML stripped, so one bad page never fails the whole search.

Wikimedia refuses (403) clients without a descriptive User-Agent; set the ``user_agent``
option to one naming your deployment and a contact, as
https://meta.wikimedia.org/wiki/User-Agent_policy asks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from router.search.base import Document, SearchError
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options
from router.search.providers.http import (
    HttpBackend,
    HttpSettings,
    clamp,
    cut_query,
    expect_dict,
    expect_list,
    normalize_base_url,
    opt_str,
    require_items,
    shape_error,
    strip_html,
)

# CirrusSearch refuses a longer srsearch with an API error.
MAX_QUERY_CHARS = 300
# Each result costs one summary request; bound the fan-out a model's k can cause.
MAX_LIMIT = 50
_LANG_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_ERROR_CODE_RE = re.compile(r"[^a-z0-9_-]")


def title_path(title: str) -> str:
    """A page title as one URL path segment: spaces to underscores, ``/`` and the rest escaped."""
    return quote(title.replace(" ", "_"), safe="")


class WikipediaBackend(HttpBackend):
    def __init__(
        self,
        *,
        lang: str = "en",
        base_url: str | None = None,
        rest_base_url: str | None = None,
        settings: HttpSettings | None = None,
        name: str = "wikipedia",
    ) -> None:
        if not _LANG_RE.match(lang):
            raise ValueError("wikipedia: lang must be a language code such as 'en' or 'zh-yue'")
        super().__init__(
            name=name,
            base_url=base_url or f"https://{lang}.wikipedia.org",
            settings=settings,
        )
        self.rest_base_url = normalize_base_url(rest_base_url) if rest_base_url else self.base_url

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> WikipediaBackend:
        opts = Options("wikipedia", options, COMMON_HTTP_OPTIONS | {"lang", "rest_base_url"})
        return cls(
            lang=opts.get("lang") or "en",
            base_url=opts.get("base_url"),
            rest_base_url=opts.get("rest_base_url"),
            settings=opts.http_settings(),
            name=opts.get("name") or "wikipedia",
        )

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query, MAX_QUERY_CHARS)
        if not query or k <= 0:
            return []
        params: dict[str, str | int] = {
            "action": "query",
            "list": "search",
            "format": "json",
            "srsearch": query,
            "srlimit": clamp(k, 1, MAX_LIMIT),
        }
        answer = await self.request_object("GET", "/w/api.php", params=params)
        if isinstance(answer.get("error"), dict):
            # MediaWiki reports errors with HTTP 200; its code is a short safe identifier.
            code = _ERROR_CODE_RE.sub("", opt_str(answer["error"], "code").lower())[:40]
            raise shape_error(self.name, f"API error {code or 'unknown'}")
        found = expect_dict(answer.get("query"), self.name, "'query'")
        hits = expect_list(found.get("search"), self.name, "'query.search'")
        usable = [h for h in hits if isinstance(h, dict) and opt_str(h, "title")][:k]
        require_items(hits, usable, self.name)
        summaries = await asyncio.gather(*(self._summary(opt_str(h, "title")) for h in usable))
        docs = []
        for rank, (hit, summary) in enumerate(zip(usable, summaries, strict=True)):
            title = opt_str(hit, "title")
            url = f"{self.base_url}/wiki/{title_path(title)}"
            text = strip_html(opt_str(hit, "snippet"))
            if summary is not None:
                text = opt_str(summary, "extract") or text
                url = self._page_url(summary) or url
            pageid = hit.get("pageid")
            docs.append(
                self.document(
                    title=title,
                    text=text,
                    url=url,
                    score=None,
                    rank=rank,
                    doc_id=str(pageid) if isinstance(pageid, int) else None,
                )
            )
        return docs

    async def _summary(self, title: str) -> dict[str, Any] | None:
        """The page summary, or None when it cannot be had (the caller falls back)."""
        try:
            summary = await self.request_json(
                "GET",
                f"/api/rest_v1/page/summary/{title_path(title)}",
                base_url=self.rest_base_url,
            )
        except SearchError:
            return None
        if not isinstance(summary, dict) or not opt_str(summary, "extract").strip():
            return None
        return summary

    @staticmethod
    def _page_url(summary: dict[str, Any]) -> str | None:
        urls = summary.get("content_urls")
        desktop = urls.get("desktop") if isinstance(urls, dict) else None
        page = desktop.get("page") if isinstance(desktop, dict) else None
        return page if isinstance(page, str) and page else None
