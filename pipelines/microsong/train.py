"""Train micro-song's note model on freshly composed tunes, on the CPU, within a wall-clock budget.

    python -m pipelines.microsong.train --minutes 12 --out pipelines/microsong/weights
    # continue from the saved weights (AdamW restarts with a short warm-up; the report keeps every run)
    python -m pipelines.microsong.train --minutes 12 --lr 2e-3 --resume pipelines/microsong/weights \\
        --out pipelines/microsong/weights

Every batch is new tunes from ``tunes.compose`` (seeded by step), so there is no data set to ship. The loss is on
the body only (the prompt is given). At the end the folder gets the weights, the tokenizer and
``train_report.json``: the loss curve, and sampled bodies read back strictly (``tunes.check_body``) with the
structure guard off (what the model learned) and on (what the song tab serves), both through the decoding core.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..decoding.plain import DecodeStats, SamplingConfig
from .decode import decode_body
from .model import NoteModel, build_tokenizer, model_config
from .tunes import check_body, compose, random_plan

IGNORE = -100


def batches(tokenizer, step: int, seed: int, tokens: int = 6144,
            pool: int = 96) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``pool`` new tunes as batches of (input ids, labels) of about ``tokens`` tokens each: sorted by length so a
    batch pads little (on two CPU cores padding is most of the cost), the prompt and padding not predicted."""
    rng = random.Random(seed * 1_000_003 + step)
    tunes = sorted((compose(random_plan(rng), rng) for _ in range(pool)), key=len)
    groups: list[list[list[str]]] = [[]]
    for tune in tunes:
        if groups[-1] and (len(groups[-1]) + 1) * len(tune) > tokens:
            groups.append([])
        groups[-1].append(tune)
    return [pad(tokenizer, group) for group in groups]


def pad(tokenizer, tunes: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(t) for t in tunes)
    ids = torch.full((len(tunes), length), tokenizer.pad_token_id)
    labels = torch.full((len(tunes), length), IGNORE)
    for row, tune in enumerate(tunes):
        encoded = torch.tensor(tokenizer.convert_tokens_to_ids(tune))
        ids[row, :len(tune)] = encoded
        body = tune.index("<body>") + 1
        labels[row, body:len(tune)] = encoded[body:]
    return ids, labels


def learning_rate(progress: float, peak: float, warmup: float = 0.03) -> float:
    """Linear warm-up then cosine decay to 10 %, over the fraction of the time budget used."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def evaluate(note: NoteModel, count: int, seed: int, guard: bool) -> dict[str, Any]:
    """Greedy bodies for ``count`` held-out plans, read strictly: parse rate and syllable-count match rate."""
    rng = random.Random(10_000_019 + seed)
    parsed = lines = matched = 0
    stats = DecodeStats()
    for _ in range(count):
        plan = random_plan(rng)
        body = [t for run in decode_body(note, plan, SamplingConfig(), False, guard, stats=stats) for t in run]
        check = check_body(body, plan)
        parsed += check["parsed"]
        lines += check["lines"]
        matched += check["lines_matched"]
    return {"tunes": count, "guard": guard, "parse_rate": round(parsed / count, 4),
            "syllable_match_rate": round(matched / max(lines, 1), 4), "tokens": stats.new_tokens}


def train(minutes: float, out: Path, size: str = "small", batch_tokens: int = 6144, peak_lr: float = 3e-3,
          seed: int = 0, eval_tunes: int = 24, resume: Path | None = None) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    earlier = json.loads((resume / "train_report.json").read_text()) if resume else None
    model = LlamaForCausalLM.from_pretrained(resume) if resume else LlamaForCausalLM(model_config(size))
    optimiser = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget, started = minutes * 60.0, time.perf_counter()
    curve, step, tokens = [], 0, 0
    model.train()
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    while (elapsed := time.perf_counter() - started) < budget:
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(elapsed / budget, peak_lr)
        queue = queue or batches(tokenizer, step + (earlier or {}).get("total_steps", 0), seed, batch_tokens)
        ids, labels = queue.pop(random.Random(step).randrange(len(queue)))
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        tokens += int((labels != IGNORE).sum())
        if step % 25 == 0:
            curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(float(loss.detach()), 4)})
            print(curve[-1], flush=True)
        step += 1
    train_s = time.perf_counter() - started
    model.eval()
    note = NoteModel(model, tokenizer)
    run = {
        "command": "python -m pipelines.microsong.train " + " ".join(sys.argv[1:]),
        "config": {"size": size, "batch_tokens": batch_tokens, "peak_lr": peak_lr, "seed": seed,
                   "resumed": bool(resume)},
        "steps": step, "body_tokens_seen": tokens, "train_s": round(train_s, 1),
        "torch_threads": torch.get_num_threads(), "loss_curve": curve,
        "sampled": [evaluate(note, eval_tunes, seed, guard=False), evaluate(note, eval_tunes, seed, guard=True)],
    }
    runs = [*(earlier or {}).get("runs", []), run]
    report = {"parameters": sum(p.numel() for p in model.parameters()), "runs": runs,
              "total_steps": sum(r["steps"] for r in runs), "total_train_s": round(sum(r["train_s"] for r in runs), 1),
              "sampled": run["sampled"]}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--size", default="small", choices=("small", "tiny"))
    parser.add_argument("--batch-tokens", type=int, default=6144)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tunes", type=int, default=24)
    parser.add_argument("--resume", type=Path, default=None, help="a folder this script saved: continue its model")
    args = parser.parse_args()
    report = train(args.minutes, args.out, args.size, args.batch_tokens, args.lr, args.seed, args.eval_tunes,
                   args.resume)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
