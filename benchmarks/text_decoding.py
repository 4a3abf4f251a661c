"""Lossless multi-token decoding vs vanilla and transformers' own prompt lookup, on one model, in one run.

    python benchmarks/text_decoding.py --model smollm2-135m --prompts benchmarks/prompts/mixed39.jsonl \
        --methods vanilla,hf-pld,recycling,lookahead,pld --max-new-tokens 128 --tree-profile auto \
        --json benchmarks/results/text_decoding_cpu.json

Greedy, batch 1. After a warm-up on a prompt outside the set, methods run interleaved per prompt (their order
rotates from prompt to prompt). Per method and category: tokens/s (mean of per-prompt tok/s, as
Spec-Bench), τ (tokens per forward), speed-up vs vanilla in the same run, fraction of outputs identical to
vanilla, and the share of step time spent drafting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.decoding.causal_lm import eos_token_ids  # noqa: E402
from pipelines.decoding.drafters.draft_model import DraftModel  # noqa: E402
from pipelines.decoding.hardware import TREE_PROFILES, pick_tree_size  # noqa: E402
from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie  # noqa: E402
from pipelines.decoding.drafters.merged import new_merged  # noqa: E402
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode  # noqa: E402
from pipelines.decoding.drafters.prompt_lookup import PromptLookup  # noqa: E402
from pipelines.decoding.drafters import prompt_tokens, recurrent_drafter  # noqa: E402
from pipelines.decoding.drafters.prompt_tokens import ParallelPromptDecoding  # noqa: E402
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, RecurrentDrafting  # noqa: E402
from pipelines.decoding.drafters.recycling import TokenRecycling  # noqa: E402
from pipelines.decoding.state import DecodingState  # noqa: E402
from pipelines.decoding.verify import speculative_decode  # noqa: E402
from pipelines.models import pick_dtype  # noqa: E402
from pipelines.packaged import packaged_location  # noqa: E402

METHODS = ("vanilla", "hf-pld", "recycling", "lookahead", "pld", "merged", "draft", "ppd", "merged-ppd",
           "redrafter", "merged-redrafter", "merged-ppd-redrafter")
# PPD's trained prompt tokens: alone, and as a source of the merged tree
PROMPT_TOKEN_METHODS = ("ppd", "merged-ppd", "merged-ppd-redrafter")
HEAD_METHODS = ("redrafter", "merged-redrafter", "merged-ppd-redrafter")  # a trained ReDrafter head, alone or merged
# outside every prompt set: warming up on a measured prompt would let the Lookahead trie remember its answer
WARMUP_PROMPT = "Explain in a few sentences how a bicycle's gears make climbing a hill easier."

HF_PLD_TOKENS = 10  # the value transformers' docs use for prompt_lookup_num_tokens
PACKAGED_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def load(name: str, device: str, dtype_name: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = packaged_location(name)  # a packaged alias (smollm2-135m, gemma3-270m), a local folder or a Hub id
    dtype = pick_dtype(torch.device(device)) if dtype_name == "auto" else getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def load_trained(weights, explicit: str, methods: list[str], users: tuple[str, ...], model, args, what: str,
                 how: str) -> tuple[object, str]:
    """Trained drafter weights (and their path) when a method in ``users`` runs: ``explicit`` or the ones found
    for the model's name; a clear exit when there are none."""
    if not set(methods) & set(users):
        return None, ""
    name = args.name or PACKAGED_NAMES.get(args.model, args.model)
    path = explicit or weights.path(name)
    if not path:
        raise SystemExit(f"Methods {', '.join(users)} need {what} for {name!r}: {how}.")
    return weights.load(path, model), str(path)


def read_prompts(path: str) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            text = item["turns"][0] if "turns" in item else item["prompt"]
            rows.append({"prompt": text, "category": item.get("category", "all")})
    return rows


def encode(tokenizer, text: str, device: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False)
    else:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor([list(ids)], device=device)


class ForwardCounter:
    """Counts the model's forward calls (for hf-pld, whose generate() does not report them)."""

    def __init__(self, model) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


class Runner:
    def __init__(self, model, tokenizer, args, draft=None, prompts=None, head=None) -> None:
        self.model, self.tokenizer, self.args, self.draft = model, tokenizer, args, draft
        self.eos = eos_token_ids(model, tokenizer)
        self.counter = ForwardCounter(model)
        self.state = DecodingState(model)
        self.recycler = self.state.recycler()
        self.nodes = len(self.recycler.template)
        costs = self.state.step_costs(args.tree_profile)
        self.merged = new_merged(self.state.recycler("merged"), self.state.trie("merged"), costs)
        # each merged variant has its own matrix and trie too, so they all learn the same way
        methods = [m.strip() for m in args.methods.split(",")]
        variants = {"merged-ppd": dict(prompts=prompts), "merged-redrafter": dict(head=head),
                    "merged-ppd-redrafter": dict(prompts=prompts, head=head)}
        self.variants = {name: self.new_merged(costs, model, **sources) for name, sources in variants.items()
                         if name in methods}
        if prompts is not None:
            self.ppd = ParallelPromptDecoding(prompts, costs)
        if head is not None:
            self.redrafter = RecurrentDrafting(head, model, costs)

    def new_merged(self, costs, model, prompts=None, head=None):
        return new_merged(TokenRecycling(torch.zeros_like(self.merged.recycler.matrix)),
                          NGramTrie(LookaheadConfig.max_nodes), costs, prompts,
                          HeadDrafts(head, model) if head is not None else None)

    def pick_tree(self) -> int:
        """Tree size for this device, re-picked before every prompt as the pipeline does per request: the
        measured (or H200) cost curve against the acceptance rates the recycler has measured so far."""
        self.nodes = pick_tree_size(self.recycler.acceptance_rates(), self.state.step_costs(self.args.tree_profile))
        self.recycler.resize(self.nodes)
        return self.nodes

    def drafter(self, method: str):
        if method == "recycling":
            return self.recycler
        if method == "lookahead":
            return LookaheadTrie(LookaheadConfig(decoding_length=min(LookaheadConfig.decoding_length, self.nodes)),
                                 self.state.trie())
        if method == "pld":
            return PromptLookup()
        if method == "merged":
            return self.merged
        if method == "draft":
            return DraftModel(self.draft)
        if method == "ppd":
            return self.ppd
        if method == "redrafter":
            return self.redrafter
        if method in self.variants:
            return self.variants[method]
        raise ValueError(method)

    @torch.inference_mode()
    def run(self, method: str, input_ids: torch.Tensor) -> dict:
        max_new = self.args.max_new_tokens
        stats = DecodeStats()
        if method == "hf-pld":
            before = self.counter.calls
            started = time.perf_counter()
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=max_new, prompt_lookup_num_tokens=HF_PLD_TOKENS,
                                      eos_token_id=sorted(self.eos), pad_token_id=sorted(self.eos)[0],
                                      temperature=None, top_p=None, top_k=None)
            elapsed = time.perf_counter() - started
            tokens = out[0, input_ids.shape[1]:].tolist()
            forwards = self.counter.calls - before
        else:
            if method == "vanilla":
                steps = plain_decode(self.model, input_ids, max_new, SamplingConfig(), self.eos, stats=stats)
            else:
                steps = speculative_decode(self.model, input_ids, max_new, SamplingConfig(), self.eos,
                                           self.drafter(method), stats=stats)
            started = time.perf_counter()
            tokens = [t for run in steps for t in run]
            elapsed = time.perf_counter() - started
            forwards = stats.forwards
        return {"tokens": tokens, "time_s": elapsed, "forwards": forwards,
                "draft_s": stats.draft_s, "step_s": stats.step_s}


def summarise(records: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    categories = ["all"] + sorted({r["category"] for r in records})
    for category in categories:
        chosen = [r for r in records if category == "all" or r["category"] == category]
        speed = {method: statistics.mean(len(r[method]["tokens"]) / r[method]["time_s"] for r in chosen)
                 for method in methods}
        for method in methods:
            runs = [r[method] for r in chosen]
            step_s = sum(x["step_s"] for x in runs)
            rows.append({
                "method": method,
                "category": category,
                "prompts": len(chosen),
                "tokens_per_s": round(speed[method], 3),
                "tau": round(sum(len(x["tokens"]) for x in runs) / sum(x["forwards"] for x in runs), 3),
                "speedup": round(speed[method] / speed["vanilla"], 3),
                "identical_fraction": round(statistics.mean(x["tokens"] == r["vanilla"]["tokens"]
                                                            for x, r in zip(runs, chosen)), 3),
                "draft_share": round(sum(x["draft_s"] for x in runs) / step_s, 4) if step_s else None,
            })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hub id, local folder, or smollm2-135m / gemma3-270m")
    parser.add_argument("--prompts", required=True,
                        help="jsonl: 'turns' (first element) or 'prompt', optional 'category'")
    parser.add_argument("--methods", default="vanilla,hf-pld,recycling,lookahead,pld")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--tree-profile", default="auto", choices=TREE_PROFILES,
                        help="tree size from this device's measured step cost (auto/cpu) or the H200 curve (gpu)")
    parser.add_argument("--draft-model", default="", help="for method 'draft': a smaller model with the same tokenizer")
    parser.add_argument("--prompt-tokens", default="",
                        help="for ppd / merged-ppd: trained prompt tokens (.safetensors); "
                             "default: those found for --name")
    parser.add_argument("--draft-head", default="",
                        help="for the redrafter methods: a trained draft head (.safetensors); "
                             "default: the one found for --name")
    parser.add_argument("--name", default="",
                        help="the model's Hub id, to find its trained prompt tokens and head "
                             "(default: --model; smollm2-135m -> HuggingFaceTB/SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    parser.add_argument("--stride", type=int, default=1, help="use every N-th prompt (keeps every category)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto = what the text tab uses "
                             "(fp32 on a CPU: bf16 rows come out differently in a wider forward)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 avoids thread thrashing on a shared CPU")
    return parser.parse_args(argv)


def chosen_methods(args: argparse.Namespace) -> list[str]:
    """``--methods`` as a list: vanilla, the baseline of every ratio, must be among them."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or "vanilla" not in methods:
        raise SystemExit(f"--methods must include vanilla and only use {', '.join(METHODS)}; got {sorted(unknown)}")
    return methods


def load_runner(args: argparse.Namespace, methods: list[str]) -> tuple[Runner, dict]:
    """The model, the draft model and the trained drafter weights the methods need, as a Runner; and where the
    trained weights came from (for the report's settings)."""
    model, tokenizer = load(args.model, args.device, args.dtype)
    draft = None
    if "draft" in methods:
        if not args.draft_model:
            raise SystemExit("Method 'draft' needs --draft-model (a smaller model with the same tokenizer).")
        draft, _ = load(args.draft_model, args.device, args.dtype)
    trained, trained_at = load_trained(
        prompt_tokens.TRAINED, args.prompt_tokens, methods, PROMPT_TOKEN_METHODS, model, args, "trained prompt tokens",
        "pass --prompt-tokens, or train them (python -m pipelines.decoding.training.prompt_training)")
    head, head_at = load_trained(
        recurrent_drafter.TRAINED, args.draft_head, methods, HEAD_METHODS, model, args, "a trained draft head",
        "pass --draft-head, or train one (python -m pipelines.decoding.training.recurrent_training)")
    sources = {**({"prompt_tokens": trained_at} if trained is not None else {}),
               **({"draft_head": head_at} if head is not None else {})}
    return Runner(model, tokenizer, args, draft, trained, head), sources


def interleaved_records(runner: Runner, methods: list[str], prompts: list[dict], device: str) -> tuple[list, list]:
    """Every method on every prompt after a warm-up, the order rotated per prompt; the records and each prompt's
    tree size."""
    warm = encode(runner.tokenizer, WARMUP_PROMPT, device)
    for method in methods:  # warm-up: kernels, allocator, and the recycler's acceptance estimate
        runner.run(method, warm)
    records, tree_sizes = [], []
    for i, item in enumerate(prompts):
        tree_sizes.append(runner.pick_tree())
        input_ids = encode(runner.tokenizer, item["prompt"], device)
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        record = {"category": item["category"]}
        for method in order:
            record[method] = runner.run(method, input_ids)
        records.append(record)
        line = "  ".join(f"{m} {len(record[m]['tokens']) / record[m]['time_s']:.1f}" for m in methods)
        print(f"[{i + 1}/{len(prompts)}] {item['category']} (tree {tree_sizes[-1]}): {line} tok/s", flush=True)
    return records, tree_sizes


def run_settings(args: argparse.Namespace, runner: Runner, methods: list[str], prompts: list[dict],
                 tree_sizes: list[int], sources: dict) -> dict:
    """The report's settings: what ran, and the drafters' mean tree sizes as they came out."""
    return {"methods": methods, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts),
            "prompts_file": args.prompts, "tree_profile": args.tree_profile,
            "dtype": str(runner.model.dtype).removeprefix("torch."), "greedy": True, "stride": args.stride,
            "hf_pld_tokens": HF_PLD_TOKENS, "tree_nodes_per_prompt": tree_sizes,
            "merged_mean_tree_nodes": round(runner.merged.nodes / max(runner.merged.steps, 1), 2),
            **{f"{name.replace('-', '_')}_mean_tree_nodes": round(merged.nodes / max(merged.steps, 1), 2)
               for name, merged in runner.variants.items()},
            **{f"{name.replace('-', '_')}_chains_per_step": round(merged.chains.chains / max(merged.steps, 1), 2)
               for name, merged in runner.variants.items() if merged.chains is not None},
            **sources,
            "step_cost_s": {str(n): round(c, 6) for n, c in runner.state.step_costs(args.tree_profile).items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = chosen_methods(args)
    runner, sources = load_runner(args, methods)
    prompts = read_prompts(args.prompts)[::args.stride]
    if args.limit:
        prompts = prompts[:args.limit]
    records, tree_sizes = interleaved_records(runner, methods, prompts, args.device)
    result = {
        "benchmark": "text_decoding",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model,
        "settings": run_settings(args, runner, methods, prompts, tree_sizes, sources),
        "command": command_line(argv),
        "rows": summarise(records, methods),
    }
    write_report(result, args.json)
    for row in result["rows"]:
        if row["category"] == "all":
            print(row)
    return result


if __name__ == "__main__":
    main()
