"""Supervised fine-tuning of the native adapter: `python -m train.sft`.

A LoRA adapter (peft) on SmolLM2-135M-Instruct, every attention and MLP projection, trained in
fp32 on the CPU (bf16 has no fast backward on these CPUs: 9x slower in a probe) over
``train/data/trajectories.jsonl``:

* the prompt is the short native system prompt and the question; no worked examples;
* loss on the trajectory the model writes, none on the prompt and none on documents a search
  engine inserted (`train.render`'s masked spans); self-written information is learned;
* one seed fixes the data order, the LoRA initialisation and dropout;
* a checkpoint (adapter, optimiser, scheduler, step) every ``--save-every`` steps into
  ``--work-dir``; a rerun resumes from the last one, so an interrupted run loses minutes;
* the loss of every step goes to ``loss.jsonl`` beside the adapter, and the card
  (`train.card`) is written with the adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.files import replace_dir
from router.prompts import NATIVE_COMPACT

IGNORE = -100
DEFAULT_DATA = Path(__file__).parent / "data" / "trajectories.jsonl"
DEFAULT_WORK = Path(__file__).parent / ".work"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def prompt_messages(question: str, system: str = NATIVE_COMPACT) -> list[dict[str, str]]:
    """What the served model's prompt holds: the short native instruction and the question."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def encode(
    tokenizer: Any, question: str, text: str, masked: Sequence[Sequence[int]], max_len: int
) -> Example:
    """Token ids and labels of one example: labels are IGNORE on the prompt and on every token
    that overlaps a masked character span of the trajectory."""
    prompt = tokenizer.apply_chat_template(
        prompt_messages(question), tokenize=False, add_generation_prompt=True
    )
    completion = text + tokenizer.eos_token
    full = prompt + completion
    encoded = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    spans = [(len(prompt) + s, len(prompt) + e) for s, e in masked]
    ids: list[int] = encoded["input_ids"][:max_len]
    labels: list[int] = []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=False):
        in_prompt = start < len(prompt)
        in_mask = any(start < e and end > s for s, e in spans)
        labels.append(IGNORE if in_prompt or in_mask else token_id)
    return Example(ids, labels)


def batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices per batch for one epoch: a seeded shuffle, then lengths sorted within windows of
    eight batches so a batch pads little, then the batches shuffled again."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 8
    out: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i].input_ids))
        out.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True, help="where the adapter and its card go")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="checkpoints (resumed from)")
    parser.add_argument(
        "--base", type=Path, default=None, help="base checkpoint (default: the embedded model)"
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N examples (0: all)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: the epochs decide)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    train(args)


def train(args: argparse.Namespace) -> Path:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router.engine.default_model import ensure_default_checkpoint
    from train.card import write_card

    started = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    base = args.base or ensure_default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(base)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    examples = [encode(tokenizer, r["question"], r["text"], r["masked"], args.max_len) for r in rows]
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = args.max_steps or max(1, round(steps_per_epoch * args.epochs))

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    work = Path(args.work_dir)
    latest = work / "latest"
    state: dict[str, Any] = {"step": 0, "losses": []}
    if (latest / "state.json").is_file():
        model = PeftModel.from_pretrained(model, latest / "adapter", is_trainable=True)
        state = json.loads((latest / "state.json").read_text())
        print(f"resuming at step {state['step']} of {total}", file=sys.stderr)
    else:
        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.05,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    prior_s = float(state.get("elapsed_s", 0.0))  # wall time of the runs this one resumes
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if (latest / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt"))
        scheduler.load_state_dict(torch.load(latest / "scheduler.pt"))
        torch.set_rng_state(torch.load(latest / "rng.pt"))

    def save_checkpoint() -> None:
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp / "adapter")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(torch.get_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state))

        replace_dir(latest, write)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    epochs = math.ceil(total / steps_per_epoch)
    plan = [b for epoch in range(epochs) for b in batches(examples, args.batch_size, args.seed, epoch)]
    bar = tqdm(total=total, initial=state["step"], desc="sft", unit="step")
    while state["step"] < total:
        batch = collate([examples[i] for i in plan[state["step"]]], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(round(float(loss.detach()), 5))
        bar.set_postfix(loss=f"{state['losses'][-1]:.3f}")
        bar.update(1)
        if state["step"] % args.save_every == 0 or state["step"] == total:
            state["elapsed_s"] = round(prior_s + time.time() - started, 1)
            save_checkpoint()
    bar.close()

    wall_s = round(state.get("elapsed_s", 0.0), 1)

    def write_adapter(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
        # The base as its public name, not this machine's cache path.
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = BASE_MODEL_ID
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(tmp / "loss.jsonl", "w", encoding="utf-8") as f:
            for step, value in enumerate(state["losses"], start=1):
                f.write(json.dumps({"step": step, "loss": value}) + "\n")
        write_card(
            tmp,
            examples=len(examples),
            rows=rows,
            steps=total,
            args=vars(args),
            losses=state["losses"],
            wall_s=wall_s,
            trained_tokens=sum(len(e.input_ids) for e in examples) * total / max(1, steps_per_epoch),
        )
        for written in tmp.iterdir():
            written.chmod(0o644)

    replace_dir(Path(args.out), write_adapter)
    print(f"adapter written to {args.out} ({total} steps, {wall_s} s)", file=sys.stderr)
    return Path(args.out)


if __name__ == "__main__":
    main()
