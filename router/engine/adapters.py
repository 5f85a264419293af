"""LoRA adapters served beside the base model, each under its own model name.

Two sources, one shape (:class:`Adapter`):

* the **embedded native adapter** ``smollm2-135m-ssrl``: a LoRA of the embedded SmolLM2 trained
  by ``train/`` to write SSRL's tags itself; shipped inside the package, served beside the
  embedded model unless ``--no-native-adapter``;
* a user's own adapters, ``--lora-modules name=path`` (vLLM's flag and formats: ``name=path`` or
  a JSON object with ``name``, ``path`` and optionally ``base_model_name``).

An adapter is an SSRL model: its requests self-search in native mode. vLLM loads an adapter
once per ``lora_int_id``; ids are given in the order the adapters are listed, from 1, which is
the order vLLM's own serving layer (`OpenAIServingModels`) numbers the same list, so both share
one loaded copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = [
    "EMBEDDED_ADAPTER_NAME",
    "Adapter",
    "adapter_rank",
    "embedded_adapter",
    "numbered",
    "parse_lora_modules",
]

EMBEDDED_ADAPTER_NAME = "smollm2-135m-ssrl"
_EMBEDDED_DIR = Path(__file__).parent / "weights" / EMBEDDED_ADAPTER_NAME
# The embedded adapter's routing threshold (max aggregate, nats): a model trained on the format
# writes its queries far more confidently than guided mode's instruct model (whose 4.85 would
# never search). Re-derived on the dev set from exact counterfactuals (`python -m
# bench.native_report`): the fewest external calls whose accuracy reaches the lower end of
# always-search's 95 % interval; docs/native-model.md.
EMBEDDED_ADAPTER_TAU = 0.687


@dataclass(frozen=True, slots=True)
class Adapter:
    """One LoRA adapter: its served name, its directory, and how its requests are served."""

    name: str
    path: str
    # The system prompt it was trained with (None: native mode's shipped prompt).
    system_prompt: str | None = None
    # Documents per external search and their length (None: the server's settings). The
    # embedded adapter was trained on one document of 150 characters, as guided mode inserts.
    docs_per_search: int | None = None
    max_doc_chars: int | None = None
    # Send the search backend the user's question after the model's query, as guided mode
    # does (--search-with-question), for a model whose queries alone find too little.
    search_with_question: bool = False
    # The routing threshold measured for this model (None: the server's --search-threshold).
    search_threshold: float | None = None
    # Set by the server: vLLM's id of this adapter (1-based, in listing order).
    lora_int_id: int = 0
    # Folded into the served weights (router.engine.merge): the profile above still applies,
    # but requests go to the base model, not through vLLM's LoRA.
    merged: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def lora_name(self) -> str | None:
        """The name the engine serves it under as a LoRA (None: merged into the base)."""
        return None if self.merged else self.name


def embedded_adapter() -> Adapter | None:
    """The shipped native adapter, or None when this install does not carry its weights."""
    from router.prompts import GUIDED_DOCS_PER_SEARCH, GUIDED_MAX_DOC_CHARS, NATIVE_COMPACT

    if not (_EMBEDDED_DIR / "adapter_model.safetensors").is_file():
        return None
    return Adapter(
        name=EMBEDDED_ADAPTER_NAME,
        path=str(_EMBEDDED_DIR),
        system_prompt=NATIVE_COMPACT,
        docs_per_search=GUIDED_DOCS_PER_SEARCH,
        max_doc_chars=GUIDED_MAX_DOC_CHARS,
        search_with_question=True,
        search_threshold=EMBEDDED_ADAPTER_TAU,
    )


def parse_lora_modules(items: Iterable[str]) -> list[Adapter]:
    """Adapters from ``--lora-modules`` values, in vLLM's two formats.

    Raises ValueError naming the item for anything else (a missing ``=``, bad JSON, an empty
    name or path).
    """
    adapters: list[Adapter] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.startswith("{"):
            try:
                obj = json.loads(item)
            except ValueError as exc:
                raise ValueError(f"--lora-modules: invalid JSON: {item}") from exc
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("name"), str)
                or not isinstance(obj.get("path"), str)
            ):
                raise ValueError(f"--lora-modules: expected {{'name': ..., 'path': ...}}: {item}")
            name, path = obj["name"], obj["path"]
        else:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules: expected name=path: {item}")
        if not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules: empty name or path: {item}")
        adapters.append(Adapter(name=name.strip(), path=path.strip()))
    return adapters


def numbered(adapters: Sequence[Adapter]) -> list[Adapter]:
    """The adapters with vLLM's ids, 1-based in listing order; a repeated name is an error."""
    seen: set[str] = set()
    out: list[Adapter] = []
    for index, adapter in enumerate(adapters, start=1):
        if adapter.name in seen:
            raise ValueError(f"--lora-modules: the name {adapter.name!r} is given twice")
        seen.add(adapter.name)
        out.append(replace(adapter, lora_int_id=index))
    return out


def adapter_rank(path: str) -> int | None:
    """The LoRA rank ``r`` in the adapter's ``adapter_config.json`` (None if unreadable)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and rank > 0 else None
