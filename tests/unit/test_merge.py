"""Folding a LoRA adapter into its base (router/engine/merge.py): the arithmetic on small
tensors, the refusals, and on the real embedded model: the merged checkpoint computes what the
base with the adapter (peft) computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from router.engine.adapters import embedded_adapter
from router.engine.merge import MERGE_MARKER, adapter_fingerprint, merge_lora

PEFT = "base_model.model."


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    torch.manual_seed(0)
    save_file(
        {"layers.0.q_proj.weight": torch.randn(4, 6), "layers.0.k_proj.weight": torch.randn(4, 6)},
        str(base / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (base / "config.json").write_text("{}")
    (base / "ssrl-checkpoint.json").write_text("{}")
    return base


def _adapter(tmp_path: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


def test_merge_adds_b_times_a_scaled_to_each_adapted_weight_only(tmp_path: Path) -> None:
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    adapter = _adapter(
        tmp_path,
        {"r": 2, "lora_alpha": 8},
        {f"{PEFT}layers.0.q_proj.lora_A.weight": a, f"{PEFT}layers.0.q_proj.lora_B.weight": b},
    )
    base = _base(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert merge_lora(base, adapter, out) == 1
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(
        after["layers.0.q_proj.weight"], before["layers.0.q_proj.weight"] + b @ a * 4.0
    )
    assert torch.equal(after["layers.0.k_proj.weight"], before["layers.0.k_proj.weight"])
    # The base's config comes along; its own marker (which describes the base) does not.
    assert (out / "config.json").is_file() and not (out / "ssrl-checkpoint.json").exists()


@pytest.mark.parametrize(
    ("config", "keys", "message"),
    [
        ({"r": 2, "use_dora": True}, ["q_proj.lora_A", "q_proj.lora_B"], "only plain LoRA"),
        ({"r": 2}, ["q_proj.lora_A", "q_proj.lora_embedding_B"], "cannot merge"),
        ({"r": 2}, ["q_proj.lora_A"], "only one of"),
        ({"r": 2}, ["v_proj.lora_A", "v_proj.lora_B"], "not in"),
        ({"r": 0}, ["q_proj.lora_A", "q_proj.lora_B"], "positive rank"),
    ],
)
def test_merge_refuses_an_adapter_it_cannot_fold_whole(
    tmp_path: Path, config: dict[str, object], keys: list[str], message: str
) -> None:
    tensors = {f"{PEFT}layers.0.{k}.weight": torch.zeros(2, 6) for k in keys}
    adapter = _adapter(tmp_path, config, tensors)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=message):
        merge_lora(_base(tmp_path), adapter, out)


def test_the_fingerprint_changes_with_the_adapters_weights(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, {"r": 2}, {f"{PEFT}x.lora_A.weight": torch.zeros(2, 2)})
    first = adapter_fingerprint(adapter)
    save_file({f"{PEFT}x.lora_A.weight": torch.ones(2, 2)}, str(adapter / "adapter_model.safetensors"))
    assert adapter_fingerprint(adapter) != first


def test_the_merged_embedded_model_computes_what_the_base_with_its_adapter_computes(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from router.engine.default_model import ensure_default_checkpoint

    shipped = embedded_adapter()
    assert shipped is not None
    base = ensure_default_checkpoint()
    out = tmp_path / "merged"
    out.mkdir()
    assert merge_lora(base, Path(shipped.path), out) == 30 * 7  # every projection of 30 layers
    assert not (out / MERGE_MARKER).exists()  # written by ensure_native_checkpoint, not here
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1543, 30, 4214, 7634]])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        plain = model(ids).logits
        adapted = PeftModel.from_pretrained(model, shipped.path).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    # The adapter changes the model; the merge keeps that change (up to bfloat16's rounding).
    assert not torch.equal(plain.argmax(-1), adapted.argmax(-1))
    assert torch.equal(merged.argmax(-1), adapted.argmax(-1))
    assert (merged - adapted).abs().max() < 0.05 * adapted.abs().max()


def test_model_prepare_native_merges_after_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import router.engine.default_model as default_model
    import router.engine.merge as merge
    from server.commands import model_command

    made: list[tuple[str, Path | None]] = []
    monkeypatch.setattr(
        default_model, "ensure_default_checkpoint", lambda c=None: made.append(("base", c)) or c
    )
    monkeypatch.setattr(merge, "ensure_native_checkpoint", lambda c=None: made.append(("native", c)) or c)
    assert model_command({"cache_dir": str(tmp_path), "native": True}) == 0
    assert made == [("base", tmp_path), ("native", tmp_path)]
    made.clear()
    assert model_command({"cache_dir": str(tmp_path), "native": False}) == 0
    assert made == [("base", tmp_path)]
