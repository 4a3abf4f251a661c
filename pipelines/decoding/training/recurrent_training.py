"""Train a Recurrent Drafter head for a frozen causal LM by self-distillation (Cheng et al., arXiv 2403.09919,
on the model's own data instead of ShareGPT; the model stays untouched).

Data is what PPD's training uses (``prompt_training.self_instruct``: the model writes a request, then answers
it greedily). Per batch one frozen forward gives the final hidden state h_t and the model's distribution at
every position; at sampled anchors t of the answer the head is unrolled teacher-forced over the sequence's own
next tokens, ``s_k = advance(s_(k-1), e(x_(t+k)))``, and its readout at level k learns the model's distribution
at row t+k by KL. The head's vocabulary is the most frequent answer tokens (FR-Spec's frequency-ranked subset).

    python -m pipelines.decoding.training.recurrent_training --model smollm2-135m \\
        --name HuggingFaceTB/SmolLM2-135M-Instruct --device cuda --data ppd_data.json \\
        --out pipelines/decoding/weights/redrafter-smollm2-135m-instruct.safetensors

Writes the head (safetensors, fp16, with its vocabulary) and a JSON report beside it: held-out agreement of
the head's top-1 / top-8 with the model's own next token per level, and the mean run of right top-1 drafts.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..drafters.recurrent_drafter import TOP_K, TRAINED, DraftHead, lm_head_logits, new_head
from .prompt_training import DistillConfig, autocast_for, distillation_data, optimize, run_training, training_report


@dataclass
class HeadConfig(DistillConfig):
    depth: int = 5  # draft levels unrolled in training
    vocab: int = 16384  # the most frequent answer tokens the head drafts from (0: the whole vocabulary)
    anchors: int = 128
    lr: float = 1e-3


def frequent_vocab(data: list[tuple[list[int], int]], size: int) -> torch.Tensor | None:
    """The ``size`` token ids the model writes most often in its answers, most frequent first."""
    if not size:
        return None
    counts = Counter(token for ids, start in data for token in ids[start:])
    return torch.tensor([token for token, _ in counts.most_common(size)], dtype=torch.long)


def head_batch(items: list[tuple[list[int], int]], anchors: int, rng: random.Random,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids with their padding mask, flat indices of sampled anchors (answer positions whose next
    token exists) and how many tokens follow each anchor in its sequence."""
    width = max(len(ids) for ids, _ in items)
    tokens = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    flat, following = [], []
    for b, (ids, start) in enumerate(items):
        tokens[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        candidates = list(range(max(start - 1, 0), len(ids) - 1))
        for t in sorted(rng.sample(candidates, min(anchors, len(candidates)))):
            flat.append(b * width + t)
            following.append(len(ids) - 1 - t)
    return {"tokens": tokens.to(device), "mask": mask.to(device), "anchors": torch.tensor(flat, device=device),
            "following": torch.tensor(following, device=device)}


def unroll(model, head: DraftHead, batch: dict[str, torch.Tensor], depth: int):
    """Per anchor and level: KL(model || head), the model's top-1 as a vocabulary index, the head's
    log-probabilities over the whole vocabulary (returned per level) and whether the level exists."""
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch["tokens"], attention_mask=batch["mask"],
                                  use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        embedded = model.get_input_embeddings()(batch["tokens"]).reshape(flat.shape)
    anchors, last = batch["anchors"], flat.shape[0] - 1
    h = flat[anchors]
    state = h
    levels = []
    for k in range(1, depth + 1):
        rows = (anchors + k).clamp(max=last)
        valid = batch["following"] >= k
        state = head.advance(state, embedded[rows])
        student = lm_head_logits(model, head.readout(state, h)).float().log_softmax(-1)
        with torch.no_grad():
            teacher = lm_head_logits(model, flat[rows]).float().log_softmax(-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        levels.append((kl, teacher.argmax(-1), student, valid))
    return levels


def evaluate(model, head: DraftHead, items, config: HeadConfig, device) -> dict[str, list[float] | float]:
    """Held-out, per level: KL, and whether the head's top-1 / top-K over its own vocabulary hold the model's
    top-1; and the mean number of leading levels whose top-1 is right (a chain draft's accepted length)."""
    rng = random.Random(config.seed + 1)
    vocab = head.vocab if len(head.vocab) else None
    sums = {"kl": [0.0] * config.depth, "top1": [0.0] * config.depth, f"top{TOP_K}": [0.0] * config.depth}
    counts = [0] * config.depth
    run_total, anchors_total = 0.0, 0
    with torch.no_grad(), autocast_for(device):
        for i in range(0, len(items), config.batch):
            batch = head_batch(items[i:i + config.batch], config.anchors, rng, device)
            running = torch.ones(len(batch["anchors"]), dtype=torch.bool, device=device)
            for k, (kl, target, student, valid) in enumerate(unroll(model, head, batch, config.depth)):
                scores = student if vocab is None else student[:, vocab]
                top = scores.topk(TOP_K, dim=-1).indices
                top = top if vocab is None else vocab[top]
                hit1, hitk = top[:, 0] == target, (top == target[:, None]).any(-1)
                counts[k] += int(valid.sum())
                for key, values in (("kl", kl), ("top1", hit1.float()), (f"top{TOP_K}", hitk.float())):
                    sums[key][k] += float(values[valid].sum())
                running &= hit1 & valid
                run_total += float(running.sum())
            anchors_total += len(batch["anchors"])
    report: dict[str, list[float] | float] = {key: [round(s / max(c, 1), 4) for s, c in zip(values, counts)]
                                              for key, values in sums.items()}
    report["top1_run"] = round(run_total / max(anchors_total, 1), 4)
    return report


def train(model, tokenizer, config: HeadConfig,
          data: list[tuple[list[int], int]] | None = None) -> tuple[DraftHead, dict]:
    """Self-distil a ReDrafter head for ``model`` (frozen). Returns the head and a report."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    started = time.perf_counter()
    data, holdout, training, rng = distillation_data(model, tokenizer, config, data)
    generated_s = time.perf_counter() - started
    torch.manual_seed(config.seed)
    head = new_head(model, config.name or config.model, frequent_vocab(training, config.vocab)).float()
    before = evaluate(model, head, holdout, config, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)

    def loss_of(items: list[tuple[list[int], int]]) -> torch.Tensor:
        batch = head_batch(items, config.anchors, rng, device)
        with autocast_for(device):
            levels = unroll(model, head, batch, config.depth)
        return sum((kl * valid).sum() / valid.sum().clamp(min=1) for kl, _, _, valid in levels) / config.depth

    losses, step, steps = optimize(optimizer, loss_of, training, config, rng)
    head.eval()
    after = evaluate(model, head, holdout, config, device)
    report = training_report(config, data, len(holdout), step, steps, generated_s,
                             time.perf_counter() - started - generated_s, losses, before, after)
    report["parameters"] = sum(p.numel() for p in head.parameters())
    return head, report


def main(argv: list[str] | None = None) -> dict:
    return run_training(HeadConfig, train, TRAINED, "pipelines.decoding.training.recurrent_training",
                        __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
