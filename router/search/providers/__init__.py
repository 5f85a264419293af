"""Search providers by name, and the way to build one from options and secrets.

    secrets = load_secrets(os.environ, settings.search_secrets_file)
    backend = create_backend("serper", {"timeout": "5"}, secrets)

Built-in names are in ``BUILTIN``. Other packages add backends through the entry-point group
``ssrl.search_backends``; each entry point names a factory ``(options, secrets) ->
SearchBackend``, e.g. in their ``pyproject.toml``::

    [project.entry-points."ssrl.search_backends"]
    mysearch = "mypkg.search:create"

A built-in name always wins over an entry point of the same name, so installing a package
cannot silently replace (and receive the keys of) a built-in provider.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from pathlib import Path

from router.search.base import SearchBackend
from router.search.providers.brave import BraveBackend
from router.search.providers.config import Options, load_secrets
from router.search.providers.exa import ExaBackend
from router.search.providers.google import GoogleBackend
from router.search.providers.retriever import RetrieverBackend
from router.search.providers.searxng import SearxngBackend
from router.search.providers.serper import SerperBackend
from router.search.providers.tavily import TavilyBackend
from router.search.providers.wikipedia import WikipediaBackend

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "BackendFactory",
    "create_backend",
    "entry_point_factories",
    "known_backends",
    "load_secrets",
]

ENTRY_POINT_GROUP = "ssrl.search_backends"

BackendFactory = Callable[[Mapping[str, str], Mapping[str, str]], SearchBackend]


def _local(options: Mapping[str, str], secrets: Mapping[str, str]) -> SearchBackend:
    # Imported here: the local index pulls in sqlite3 and tqdm, which remote-only setups skip.
    from router.search.local_index import LocalIndexBackend

    opts = Options("local", options, {"index_dir", "name"})
    return LocalIndexBackend(Path(opts.require("index_dir")), name=opts.get("name") or "local")


BUILTIN: dict[str, BackendFactory] = {
    "serper": SerperBackend.from_options,
    "tavily": TavilyBackend.from_options,
    "brave": BraveBackend.from_options,
    "searxng": SearxngBackend.from_options,
    "exa": ExaBackend.from_options,
    "google": GoogleBackend.from_options,
    "wikipedia": WikipediaBackend.from_options,
    "retriever": RetrieverBackend.from_options,
    "local": _local,
}


def entry_point_factories() -> dict[str, importlib.metadata.EntryPoint]:
    """Third-party backends by name, not yet loaded (loading imports their package)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> list[str]:
    return sorted(set(BUILTIN) | set(entry_point_factories()))


def create_backend(name: str, options: Mapping[str, str], secrets: Mapping[str, str]) -> SearchBackend:
    """A backend by name: built-in first, then the ``ssrl.search_backends`` entry points.

    ValueError for an unknown name (listing the known ones), an unknown or malformed option,
    or a missing key (naming its environment variable, never a value).
    """
    factory: BackendFactory | None = BUILTIN.get(name)
    if factory is None:
        entry_point = entry_point_factories().get(name)
        if entry_point is None:
            raise ValueError(f"unknown search backend {name!r} (known: {', '.join(known_backends())})")
        factory = entry_point.load()
    backend = factory(options, secrets)
    if not isinstance(backend, SearchBackend):
        raise TypeError(f"search backend factory for {name!r} did not return a SearchBackend")
    return backend
