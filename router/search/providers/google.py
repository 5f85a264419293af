"""Google Programmable Search (Custom Search JSON API).

``GET {base}/customsearch/v1?key=&cx=&q=&num=`` (``num`` 1..10); the answer's
``items[] {title, link, snippet}`` are the documents, and ``items`` is left out when nothing
matched. Closed to new customers; it ends on 2027-01-01.

The key travels in the query string, which the API requires, so every URL of this backend is a
secret. It never reaches an error message (those carry the status and error class only), and
the ``httpx`` logger, which writes each request URL at INFO, has a filter installed by
``providers.http`` that rewrites ``key=`` and ``cx=`` to ``***``. Anything else that logs
request URLs of this client must redact them the same way (``redact_url_secrets``).
"""

from __future__ import annotations

from collections.abc import Mapping

from router.search.base import Document
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options, require_secret
from router.search.providers.http import (
    HttpBackend,
    HttpSettings,
    clamp,
    cut_query,
    expect_list,
    opt_str,
    require_items,
    shape_error,
)

DEFAULT_BASE_URL = "https://www.googleapis.com"
ENV_KEY = "GOOGLE_API_KEY"
ENV_CX = "GOOGLE_CSE_ID"
MAX_NUM = 10  # the API answers 400 above 10


class GoogleBackend(HttpBackend):
    def __init__(
        self,
        api_key: str,
        cse_id: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "google",
        gl: str | None = None,
        lr: str | None = None,
    ) -> None:
        super().__init__(name=name, base_url=base_url, settings=settings)
        # Kept private and out of __repr__; sent only as query parameters.
        self._auth_params = {"key": api_key, "cx": cse_id}
        self.extra_params = {k: v for k, v in (("gl", gl), ("lr", lr)) if v}

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> GoogleBackend:
        opts = Options("google", options, COMMON_HTTP_OPTIONS | {"gl", "lr"})
        return cls(
            require_secret(secrets, ENV_KEY, "google"),
            require_secret(secrets, ENV_CX, "google"),
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(),
            name=opts.get("name") or "google",
            gl=opts.get("gl"),
            lr=opts.get("lr"),
        )

    def status_hint(self, status: int) -> str | None:
        if status == 400:
            return "bad request or invalid API key"
        if status == 403:
            return "forbidden: API not enabled for the key, or daily quota used up"
        return super().status_hint(status)

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        params: dict[str, str | int] = {
            **self._auth_params,
            "q": query,
            "num": clamp(k, 1, MAX_NUM),
            **self.extra_params,
        }
        answer = await self.request_object("GET", "/customsearch/v1", params=params)
        if "items" not in answer:
            # No match: the API omits `items` but still describes the search.
            if "searchInformation" in answer or "queries" in answer:
                return []
            raise shape_error(self.name, "no 'items'")
        items = expect_list(answer["items"], self.name, "'items'")
        usable = [i for i in items if isinstance(i, dict) and opt_str(i, "link")]
        docs = [
            self.document(
                title=opt_str(i, "title") or opt_str(i, "link"),
                text=opt_str(i, "snippet"),
                url=opt_str(i, "link"),
                score=None,
                rank=rank,
            )
            for rank, i in enumerate(usable)
        ]
        require_items(items, docs, self.name)
        return docs[:k]
