"""The embedded native model as weights of its own: the LoRA adapter folded into the base.

vLLM serves a LoRA adapter through extra kernels on every layer; on the CPU backend that halves
its speed (docs/benchmarks.md, "Native model"), and `enable_lora` slows the base model too. A
model served for its own sake is served faster as one checkpoint: ``ssrl serve --model
smollm2-135m-ssrl`` folds the shipped adapter into the embedded model once (``W += B·A·alpha/r``,
no peft needed), keeps the result in the cache beside the embedded model, and serves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from router.files import replace_dir

__all__ = ["MERGE_MARKER", "adapter_fingerprint", "ensure_native_checkpoint", "merge_lora"]

logger = logging.getLogger("ssrl.engine")

MERGE_MARKER = "ssrl-merged.json"
# Bump when the merge itself changes, so cached merges are redone.
MERGE_VERSION = 1
_PEFT_PREFIX = "base_model.model."


def adapter_fingerprint(adapter_dir: Path) -> str:
    """A digest of the adapter's weights and config: a new adapter is a new merge."""
    digest = hashlib.sha256(f"merge-v{MERGE_VERSION}".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def _scaling(config: dict[str, Any]) -> float:
    rank = config.get("r")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, int | float):
        raise ValueError(f"adapter_config.json: expected a positive rank `r`, got {rank!r}")
    if config.get("use_rslora"):
        return float(alpha) / float(rank**0.5)
    return float(alpha) / rank


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path) -> int:
    """Write ``base_dir``'s checkpoint with the adapter folded in to ``out_dir`` (which exists
    and is empty); return how many weight matrices changed.

    Only plain LoRA on linear layers is folded (what peft's ``merge_and_unload`` does for it);
    anything else in the adapter (DoRA, biases, extra trained modules) raises ValueError rather
    than being dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters can be merged")
    scaling = _scaling(config)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        lora = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    pairs: dict[str, tuple[Any, Any]] = {}
    for key, tensor in lora.items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{adapter_dir}: cannot merge the adapter tensor {key!r}")
        module = key[len(_PEFT_PREFIX) :].rsplit(".lora_", 1)[0]
        a, b = pairs.get(module, (None, None))
        pairs[module] = (tensor, b) if ".lora_A." in key else (a, tensor)

    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{base_dir}: no safetensors weights to merge into")
    merged = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            weights = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        for module, (a, b) in pairs.items():
            key = f"{module}.weight"
            if key not in weights:
                continue
            if a is None or b is None:
                raise ValueError(f"{adapter_dir}: {module} has only one of lora_A / lora_B")
            weight = weights[key]
            # Folded in float32, rounded once to the checkpoint's dtype.
            delta = (b.float() @ a.float()) * scaling
            weights[key] = (weight.float() + delta).to(weight.dtype).contiguous()
            merged += 1
        save_file(weights, str(out_dir / shard.name), metadata=metadata)
    if merged != len(pairs):
        raise ValueError(f"{adapter_dir}: {len(pairs) - merged} adapted modules are not in {base_dir}")
    for item in base_dir.iterdir():
        # The base's own markers (ssrl-*.json) describe the base, not this checkpoint.
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("ssrl-"):
            shutil.copy2(item, out_dir / item.name)
    return merged


def ensure_native_checkpoint(cache_dir: Path | None = None) -> Path:
    """The embedded native model's merged checkpoint in the cache, made once per adapter."""
    from router.engine.adapters import EMBEDDED_ADAPTER_NAME, embedded_adapter
    from router.engine.default_model import checkpoint_is_valid, default_cache_dir, ensure_default_checkpoint

    cache_dir = cache_dir or default_cache_dir()
    adapter = embedded_adapter()
    if adapter is None:
        raise FileNotFoundError(f"this install does not carry the {EMBEDDED_ADAPTER_NAME} adapter")
    base = ensure_default_checkpoint(cache_dir)
    adapter_dir = Path(adapter.path)
    fingerprint = adapter_fingerprint(adapter_dir)
    target = cache_dir / "models" / EMBEDDED_ADAPTER_NAME
    if checkpoint_is_valid(target, fingerprint, MERGE_MARKER):
        return target

    def write(staging: Path) -> None:
        count = merge_lora(base, adapter_dir, staging)
        (staging / MERGE_MARKER).write_text(
            json.dumps({"fingerprint": fingerprint, "base": str(base), "merged_modules": count})
        )
        for written in staging.iterdir():
            written.chmod(0o644)

    replace_dir(target, write)
    logger.info("merged the %s adapter into %s", EMBEDDED_ADAPTER_NAME, target)
    return target
