"""Train PPD prompt tokens for a causal LM by self-distillation (Chen et al., arXiv 2405.18628, §3-4, small).

The model stays frozen; only the m prompt-token vectors learn. Data is the model's own: it writes a user
request from a short opening (sampled), then answers it greedily, as the text tab decodes. One forward per
batch holds each sequence once plus, at sampled anchor positions t of the answer, the chain p1 … pm (position
t+k, seeing the sequence up to t and the chain before it) — the layout the verifier uses. The real rows never
see a chain, so their logits are the teacher: p_k learns the distribution the model has at row t+k, by KL.

    python -m pipelines.decoding.training.prompt_training --model smollm2-135m \\
        --name HuggingFaceTB/SmolLM2-135M-Instruct --device cuda --samples 4096 \\
        --out pipelines/decoding/weights/ppd-smollm2-135m-instruct.safetensors

Writes the vectors (safetensors, with the model name and vocabulary in the metadata) and a JSON report
beside them: held-out top-1 / top-10 agreement of each prompt token with the model, before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..drafters.prompt_tokens import TRAINED, PromptTokens, new_prompt_tokens
from ..drafters.recurrent_drafter import lm_head_logits
from ..trained import TrainedWeights

# Openings of user requests across the kinds of prompts the text tab gets (writing, roleplay, reasoning,
# maths, coding, extraction, STEM, humanities, translation, summarisation, QA, retrieval-style questions).
STARTERS = (
    "Write a short story about", "Write a poem about", "Write a blog post about", "Write an email to",
    "Write a product description for", "Draft a speech for", "Compose a letter to", "Write a dialogue between",
    "Pretend you are", "Imagine you are", "Act as a", "You are a travel guide.", "Role-play as",
    "Explain step by step how", "Why does", "What would happen if", "Is it true that", "Compare",
    "Solve this problem:", "Calculate", "What is the derivative of", "If a train travels", "Prove that",
    "Write a Python function that", "Write a JavaScript function to", "How do I fix this error:",
    "Write a SQL query that", "Explain what this code does:", "Implement a class in Python for",
    "Extract the names and dates from this text:", "List the key facts in the following paragraph:",
    "Classify the following sentences:", "Turn this into a table:", "Explain the theory of",
    "How does photosynthesis", "What causes", "Describe the process of", "What is the difference between",
    "Summarize the history of", "Who was", "What were the main causes of", "Discuss the impact of",
    "Translate into French:", "Translate the following sentence into German:", "How do you say",
    "Summarize this article:", "Give me a brief summary of", "Write a TL;DR for", "What is", "How many",
    "When did", "Where is", "Give me tips for", "List five", "What are the benefits of",
    "Based on the text below, answer the question.", "Using the information provided, explain",
    "Help me plan", "Recommend", "Rewrite this paragraph to be more formal:", "Edit this text for grammar:",
)


@dataclass
class DistillConfig:
    """What every self-distilled drafter's training shares: the model, its self-instructed data, the loop."""

    model: str = "smollm2-135m"  # packaged alias, local folder or Hub id
    name: str = ""  # the model id recorded with the weights (default: --model)
    out: str = ""  # default: where the text tab looks, under $TOKENWORKS_CACHE
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    samples: int = 4096
    question_tokens: int = 48
    answer_tokens: int = 256
    generate_batch: int = 256
    batch: int = 16
    anchors: int = 64  # positions trained per sequence and step
    epochs: int = 2
    lr: float = 5e-3
    holdout: float = 0.05
    seed: int = 0
    data: str = ""  # a JSON file of generated sequences: read when it exists, else written after generating
    max_minutes: float = 0.0  # stop training after this long (0 = run every step); the report says where it stopped


@dataclass
class TrainConfig(DistillConfig):
    count: int = 4  # prompt tokens; a prefix of a trained chain is a trained chain (p_k never sees p_>k)


def self_instruct(model, tokenizer, config: DistillConfig) -> list[tuple[list[int], int]]:
    """``config.samples`` sequences of (ids, index where the model's answer starts), written by the model."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = bool(getattr(tokenizer, "chat_template", None))
    data: list[tuple[list[int], int]] = []
    while len(data) < config.samples:
        starters = [rng.choice(STARTERS) for _ in range(config.generate_batch)]
        if chat:  # the user turn, open after the opening words, for the model to finish
            openings = [_open_user_turn(tokenizer, starter) for starter in starters]
        else:
            openings = starters
        questions = _generate(model, tokenizer, openings, config.question_tokens, sample=True)
        prompts = []
        for starter, question in zip(starters, questions):
            text = (starter + tokenizer.decode(question, skip_special_tokens=True)).strip()
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    return_dict=False)
            else:
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            prompts.append(list(ids))
        answers = _generate(model, tokenizer, prompts, config.answer_tokens, sample=False)
        for prompt, answer in zip(prompts, answers):
            if len(answer) >= 8:
                data.append((prompt + answer, len(prompt)))
        print(f"generated {min(len(data), config.samples)}/{config.samples} sequences", flush=True)
    return data[:config.samples]


def _open_user_turn(tokenizer, starter: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": starter}], tokenize=False)
    return tokenizer(text[:text.rindex(starter) + len(starter)], add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _generate(model, tokenizer, prompts: list, max_new: int, sample: bool) -> list[list[int]]:
    """New ids per prompt (ids lists), up to and including the end-of-turn token."""
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    options = dict(do_sample=True, temperature=1.0, top_p=0.95) if sample else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **options)
    results = []
    for row in out[:, longest:].tolist():
        kept = []
        for token in row:
            kept.append(token)
            if token == tokenizer.eos_token_id:
                break
        results.append(kept)
    return results


def distillation_batch(items: list[tuple[list[int], int]], prompts: PromptTokens, anchors: int,
                       rng: random.Random, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One padded forward's inputs: per sequence its ids, then a chain below each sampled anchor t. Also the
    flat row indices of each chain row (student) and of real row t+k (teacher), and k per student row."""
    m = len(prompts.ids)
    layouts = []
    for ids, start in items:
        length = len(ids)
        candidates = list(range(max(start - 1, 0), length - 1))
        chosen = sorted(rng.sample(candidates, min(anchors, len(candidates))))
        layouts.append((ids, chosen))
    width = max(len(ids) + m * len(chosen) for ids, chosen in layouts)
    batch = len(items)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    allowed = torch.zeros(batch, width, width, dtype=torch.bool)
    students, teachers, depths = [], [], []
    for b, (ids, chosen) in enumerate(layouts):
        length = len(ids)
        tokens[b, :length] = torch.tensor(ids)
        positions[b, :length] = torch.arange(length)
        allowed[b, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        row = length
        for t in chosen:
            for k in range(1, m + 1):
                tokens[b, row] = prompts.ids[k - 1]
                positions[b, row] = t + k
                allowed[b, row, :t + 1] = True
                allowed[b, row, row - k + 1:row + 1] = True
                if t + k < length:
                    students.append(b * width + row)
                    teachers.append(b * width + t + k)
                    depths.append(k)
                row += 1
        allowed[b, row:, :] = False
        idle = torch.arange(row, width)
        allowed[b, idle, idle] = True  # padding attends to itself only (no empty softmax rows)
    mask = torch.zeros(batch, 1, width, width, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"tokens": tokens.to(device), "positions": positions.to(device), "mask": mask.to(device),
            "students": torch.tensor(students, device=device), "teachers": torch.tensor(teachers, device=device),
            "depths": torch.tensor(depths, device=device)}


def distill(model, embed, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(teacher || prompt token) per student row, and whether the prompt token's top-1 / top-10 hold the
    teacher's top-1."""
    hidden = model.base_model(inputs_embeds=embed(batch["tokens"]), attention_mask=batch["mask"],
                              position_ids=batch["positions"], use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    student = lm_head_logits(model, flat[batch["students"]]).float().log_softmax(-1)
    with torch.no_grad():
        teacher = lm_head_logits(model, flat[batch["teachers"]]).float().log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    target = teacher.argmax(-1, keepdim=True)
    top = student.topk(10, dim=-1).indices
    return kl, (top[:, :1] == target).any(-1), (top == target).any(-1)


def evaluate(model, prompts: PromptTokens, items, config: TrainConfig, device, dtype) -> dict[str, list[float]]:
    """Held-out agreement with the model's own next token, per prompt token (all anchors)."""
    embed = prompts.embedding(model)
    rng = random.Random(config.seed + 1)
    m = len(prompts.ids)
    sums = {"kl": [0.0] * m, "top1": [0.0] * m, "top10": [0.0] * m}
    counts = [0] * m
    with torch.no_grad(), autocast_for(device):
        for i in range(0, len(items), config.batch):
            batch = distillation_batch(items[i:i + config.batch], prompts, config.anchors, rng, device, dtype)
            kl, top1, top10 = distill(model, embed, batch)
            for k in range(m):
                chosen = batch["depths"] == k + 1
                counts[k] += int(chosen.sum())
                for key, values in (("kl", kl), ("top1", top1.float()), ("top10", top10.float())):
                    sums[key][k] += float(values[chosen].sum())
    return {key: [round(s / max(c, 1), 4) for s, c in zip(values, counts)] for key, values in sums.items()}


def autocast_for(device: torch.device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else torch.autocast("cpu", enabled=False))


def train(model, tokenizer, config: TrainConfig,
          data: list[tuple[list[int], int]] | None = None) -> tuple[PromptTokens, dict]:
    """Self-distil ``config.count`` prompt tokens for ``model`` (frozen). Returns them and a report."""
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the mask's dtype: autocast's on CUDA
    model.requires_grad_(False)
    started = time.perf_counter()
    data, holdout, training, rng = distillation_data(model, tokenizer, config, data)
    generated_s = time.perf_counter() - started
    prompts = new_prompt_tokens(model, config.count, config.name or config.model, config.seed)
    before = evaluate(model, prompts, holdout, config, device, dtype)
    vectors = torch.nn.Parameter(prompts.vectors.to(device))
    optimizer = torch.optim.Adam([vectors], lr=config.lr)
    # the verifier's own embedding, over the trainable vectors (its dtype/device move keeps their gradient)
    embed = PromptTokens(vectors, prompts.base).embedding(model)

    def loss_of(items: list[tuple[list[int], int]]) -> torch.Tensor:
        batch = distillation_batch(items, prompts, config.anchors, rng, device, dtype)
        with autocast_for(device):
            kl, _, _ = distill(model, embed, batch)
        return kl.mean()

    losses, step, steps = optimize(optimizer, loss_of, training, config, rng)
    trained = PromptTokens(vectors.detach().float().cpu(), prompts.base, prompts.model_name)
    after = evaluate(model, trained, holdout, config, device, dtype)
    report = training_report(config, data, len(holdout), step, steps, generated_s,
                             time.perf_counter() - started - generated_s, losses, before, after)
    report["mean_answer_tokens"] = round(sum(len(ids) - start for ids, start in data) / len(data), 1)
    return trained, report


def distillation_data(model, tokenizer, config: DistillConfig, data: list[tuple[list[int], int]] | None
                      ) -> tuple[list, list, list, random.Random]:
    """The self-instructed sequences (``data``, else written by the model now), shuffled with the config's seed,
    with ``config.holdout`` of them (at least one) held out for the before/after numbers. Returns all of them,
    the held-out part, the training part and the generator, which goes on to shuffle the epochs and sample the
    anchors."""
    if data is None:
        data = self_instruct(model, tokenizer, config)
    rng = random.Random(config.seed)
    rng.shuffle(data)
    held = max(1, int(len(data) * config.holdout))
    return data, data[:held], data[held:], rng


def optimize(optimizer: torch.optim.Optimizer, loss_of: Callable[[list], torch.Tensor], training: list,
             config: DistillConfig, rng: random.Random) -> tuple[list[float], int, int]:
    """The loop both trainings share: ``config.epochs`` passes over reshuffled batches of ``training`` with a
    linear warm-up (5 %) then a cosine decay, stopping early at ``config.max_minutes``. ``loss_of(items)`` is
    the drafter's own loss on one batch. Returns the losses, the steps run and the steps planned."""
    steps = max(1, config.epochs * math.ceil(len(training) / config.batch))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    step = 0
    deadline = time.perf_counter() + config.max_minutes * 60 if config.max_minutes else math.inf
    while step < steps and time.perf_counter() < deadline:
        rng.shuffle(training)
        for i in range(0, len(training), config.batch):
            if step >= steps or time.perf_counter() >= deadline:
                break
            loss = loss_of(training[i:i + config.batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{steps}: loss {sum(losses[-100:]) / 100:.4f}", flush=True)
    return losses, step, steps


def setup(config_class: type, argv: list[str] | None, description: str):
    """Parse ``config_class``'s flags, load the model (frozen, eval) and its tokenizer, and read or generate
    the self-instructed data. Returns the config, model, tokenizer and data (None: ``train`` generates it)."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in asdict(config_class()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    config = config_class(**vars(parser.parse_args(argv)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...packaged import packaged_location

    location = packaged_location(config.model)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(config.device).eval()
    config.name = config.name or config.model
    data = None
    if config.data and Path(config.data).is_file():
        data = [(ids, start) for ids, start in json.loads(Path(config.data).read_text())]
    elif config.data:
        data = self_instruct(model, tokenizer, config)
        Path(config.data).parent.mkdir(parents=True, exist_ok=True)
        Path(config.data).write_text(json.dumps(data))
    return config, model, tokenizer, data


def save_trained(trained, report: dict, config: DistillConfig, weights: TrainedWeights, module: str,
                 argv: list[str] | None) -> dict:
    """Write the trained weights (to ``--out``, else where the text tab looks) and the report beside them."""
    out = Path(config.out) if config.out else weights.default_out(config.name)
    trained.save(out, trained_on=f"{report['sequences']} self-instructed sequences")
    report["command"] = f"python -m {module} " + " ".join(argv or [])
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return report


def training_report(config: DistillConfig, data: list, held: int, step: int, steps: int, generated_s: float,
                    train_s: float, losses: list[float], before: dict, after: dict) -> dict:
    """What both trainings report: data, steps, time, loss at the start and end, held-out numbers."""
    return {"config": asdict(config), "sequences": len(data), "holdout_sequences": held, "steps": step,
            "planned_steps": steps, "generate_s": round(generated_s, 1), "train_s": round(train_s, 1),
            "loss_first": round(sum(losses[:10]) / len(losses[:10]), 4),
            "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "holdout_before": before, "holdout_after": after}


def run_training(config_class: type, train_fn: Callable, weights: TrainedWeights, module: str, description: str,
                 argv: list[str] | None) -> dict:
    """Both trainings' command line: flags and model (``setup``), ``train_fn``, then weights and report saved."""
    config, model, tokenizer, data = setup(config_class, argv, description)
    trained, report = train_fn(model, tokenizer, config, data=data)
    return save_trained(trained, report, config, weights, module, argv)


def main(argv: list[str] | None = None) -> dict:
    return run_training(TrainConfig, train, TRAINED, "pipelines.decoding.training.prompt_training",
                        __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
