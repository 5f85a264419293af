"""The sampling a request gets when it omits `temperature` / `top_p`: the served model's own.

The openai SDK, LangChain, LiteLLM and most agents send no `temperature`. OpenAI's default is
1.0, which suits large models; a small one sampled at 1.0 turns a self-filled information
block into invented names (issue 30). As vLLM does, ssrl takes the defaults from the model's
`generation_config.json`; the embedded model ships none, so ssrl carries the ones measured for
it (`router.engine.default_model.EMBEDDED_SAMPLING_DEFAULTS`, docs/benchmarks.md "First
answer"); `--default-temperature` / `--default-top-p` override both. The same defaults reach
vLLM's serving layer (`server.vllm_serving.apply_serving_defaults`), so one rule holds on every
path. An explicit value in a request always wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["flag", "model", "embedded", "openai"]

# OpenAI's (and vLLM's) neutral values, where nothing else says.
OPENAI_TEMPERATURE = 1.0
OPENAI_TOP_P = 1.0


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = OPENAI_TEMPERATURE
    top_p: float = OPENAI_TOP_P
    # Where they came from: a server flag, the model's generation config, ssrl's measured
    # defaults for the embedded model, or OpenAI's neutral values.
    source: Source = "openai"

    def temperature_for(self, requested: float | None) -> float:
        return self.temperature if requested is None else requested

    def top_p_for(self, requested: float | None) -> float:
        return self.top_p if requested is None else requested

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "source": self.source}


def resolve_sampling_defaults(
    flags: Mapping[str, float | None],
    model_defaults: Mapping[str, Any],
    embedded: Mapping[str, float] | None,
) -> SamplingDefaults:
    """Each of temperature and top_p from the first that sets it: the server's flags, the
    model's generation config (vLLM's `get_diff_sampling_param`), ssrl's measured defaults for
    the embedded model (`embedded`, None for any other model), OpenAI's neutral value. The
    source reported is the highest one that set either."""
    layers: list[tuple[Source, Mapping[str, Any]]] = [("flag", flags), ("model", model_defaults)]
    if embedded is not None:
        layers.append(("embedded", embedded))
    values: dict[str, float] = {}
    source: Source = "openai"
    for name, layer in layers:
        for key in ("temperature", "top_p"):
            value = layer.get(key)
            if key not in values and isinstance(value, int | float) and not isinstance(value, bool):
                values[key] = float(value)
                if source == "openai":
                    source = name
    return SamplingDefaults(
        temperature=values.get("temperature", OPENAI_TEMPERATURE),
        top_p=values.get("top_p", OPENAI_TOP_P),
        source=source,
    )


def sampling_defaults_for(settings: Any, model_config: Any | None) -> SamplingDefaults:
    """The server's defaults: its flags, the served model's generation config (vLLM's model
    config, None for a remote engine), and for the embedded model ssrl's measured ones."""
    from router.engine.default_model import EMBEDDED_SAMPLING_DEFAULTS

    flags = {"temperature": settings.default_temperature, "top_p": settings.default_top_p}
    model = model_config.get_diff_sampling_param() if model_config is not None else {}
    embedded = EMBEDDED_SAMPLING_DEFAULTS if settings.embedded_weights else None
    return resolve_sampling_defaults(flags, model, embedded)
