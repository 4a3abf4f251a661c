"""The text tab as served: ``TextPipeline.generate`` per method vs transformers ``generate``, one process, interleaved.

    python benchmarks/text_served.py --model "SmolLM2-135M-Instruct (packaged)" \
        --prompts benchmarks/prompts/heldout40.jsonl --json benchmarks/results/text_served_h200.json
    python benchmarks/text_served.py --shape 7b --prompts benchmarks/prompts/heldout40.jsonl --limit 8 \
        --methods vanilla,merged,prompt_lookup --anchors hf-eager --json benchmarks/results/text_served_7b_h200.json
    python benchmarks/text_served.py --tiny --limit 3 --max-new-tokens 16 --json /tmp/t.json   # a quick check
    python benchmarks/text_served.py --exact --methods vanilla,merged,prompt_lookup --anchors "" \
        --json benchmarks/results/text_served_exact_h100.json   # exact mode's cost and exactness

Ours: the tab's request (chat template, greedy, the method's defaults) through ``TextPipeline.generate`` on the
device and in the dtype the ModelStore picks, fast path and all, so a row is what a user of the tab gets.
Anchors, on the same loaded weights: transformers ``generate`` eager (DynamicCache), with prompt lookup (10
tokens, its docs' value), and with its static cache + ``torch.compile`` (run once per prompt before it is timed,
so it is measured at its best). After one warm-up request per method on a prompt outside the set, every prompt
runs every method in an order that rotates from prompt to prompt.

Rows, per method and category ("all" for the totals): ``tokens_per_s`` (mean of per-prompt tok/s, as Spec-Bench),
``speedup_vs_plain`` (that mean over our vanilla's) and ``total_speedup_vs_plain`` (total tokens / total time),
``tau``, ``draft_share``, ``seconds_per_step``, ``identical_fraction`` (token ids equal to our vanilla's) and the
first divergences, ``recompiles_after_warmup`` (dynamo frames compiled during timed calls) and
``first_request_s`` (the method's cold request: compile and capture included), ``slowest_request_s`` and
``gc_pause_s`` (the garbage collector's pauses inside the method's timed requests: where an outlier came from).

Diagnostic methods the tab does not offer, named in ``--methods`` like ours (``MERGED_VARIANTS``): the merged
drafter without its draft head (``merged-ppd``: PPD's prompt tokens in its place; ``merged-lean``: neither), each
with its own memory, so one run tells what the head and the prompt tokens cost and bring on the device.

``--exact`` adds each method in exact mode (``TextRequest.exact``, decoding/exact.py) as ``<method>+exact``: its
speed-up is still over our default vanilla (so ``vanilla+exact`` is the mode's own cost), and its
``identical_fraction`` is over ``vanilla+exact``, which exact mode makes 1.0 by construction.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, sync, write_report  # noqa: E402
from benchmarks.text_decoding import HF_PLD_TOKENS, WARMUP_PROMPT, read_prompts  # noqa: E402
from pipelines.decoding.causal_lm import CausalLM, eos_token_ids  # noqa: E402
from pipelines.decoding.drafters.merged import HeadLedger, MergedDrafter, new_merged  # noqa: E402
from pipelines.decoding.hardware import DraftingCost  # noqa: E402
from pipelines.decoding.methods import DECODING_METHODS, Method  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.packaged import convert_gguf  # noqa: E402
from pipelines.tabs.text import TextPipeline, TextRequest  # noqa: E402

OURS = ("vanilla", "merged", "redrafter", "ppd", "prompt_lookup", "recycling", "recycling_lookup", "lookahead")
EXACT = "+exact"  # suffix of a method run in exact mode
ANCHORS = ("hf-eager", "hf-pld", "hf-static-compile")
# Random weights of these shapes measure step costs (acceptance needs real weights: use --model for that).
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


MERGED_VARIANTS = {"merged-ppd": True, "merged-lean": False}  # diagnostic variant -> with PPD's prompt tokens


def merged_variant(name: str, with_prompts: bool) -> Method:
    """A diagnostic merged drafter without the draft head (PPD's prompt tokens or nothing in its place), priced and
    served like the tab's, with its own memory (``DecodingState``'s per-method matrix and trie)."""
    drafters: dict[int, MergedDrafter] = {}

    def factory(pipeline: TextPipeline, lm: CausalLM, request: TextRequest, forward: Any) -> MergedDrafter:
        costs = lm.state.step_costs(request.tree_profile, forward)
        if id(lm) not in drafters:
            drafters[id(lm)] = new_merged(lm.state.recycler(name), lm.state.trie(name), costs,
                                          prompts=lm.state.prompts if with_prompts else None,
                                          ledger=HeadLedger(), host=DraftingCost())
        drafters[id(lm)].costs = costs
        return drafters[id(lm)]

    return Method(f"{name} (diagnostic: the merged drafter without its draft head)", factory)


class GcClock:
    """Seconds the garbage collector has paused this process so far (a full collection with a model loaded can take
    seconds and lands inside whichever request crosses its threshold)."""

    def __init__(self) -> None:
        self.paused_s, self._started = 0.0, 0.0
        gc.callbacks.append(self._on_collect)

    def _on_collect(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.paused_s += time.perf_counter() - self._started


def compiled_frames() -> int:
    """Frames dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def guard_failures() -> dict[str, list[str]]:
    """Why dynamo recompiled, per compiled function: the reasons of every guard failure so far."""
    import torch._dynamo.utils

    failures = getattr(torch._dynamo.utils, "guard_failures", {})  # a private table: absent means nothing to say
    return {f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})": [str(r) for r in reasons]
            for code, reasons in failures.items()}


def random_model_folder(shape: str, tokenizer: Any, root: Path) -> str:
    """A Qwen2-architecture model of ``shape`` with random weights, saved with ``tokenizer`` as a local folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = root / f"random-{shape}"
    if not (folder / "config.json").is_file():
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             **SHAPES[shape])
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
    return str(folder)


class Runner:
    """One request per call, for our methods (through the tab's pipeline) and the transformers anchors."""

    def __init__(self, pipeline: TextPipeline, model_name: str, max_new_tokens: int) -> None:
        self.pipeline, self.model_name, self.max_new = pipeline, model_name, max_new_tokens
        self.lm: CausalLM = pipeline.load(model_name)
        self.eos = eos_token_ids(self.lm.model, self.lm.tokenizer)
        self.recompiles = 0
        self.gc = GcClock()

    def ours(self, method: str, prompt: str) -> dict[str, Any]:
        result = self.pipeline.run(TextRequest(prompt=prompt, model=self.model_name, method=method.removesuffix(EXACT),
                                               max_new_tokens=self.max_new, seed=0, exact=method.endswith(EXACT)))
        stats = result.stats
        return {"ids": result.metadata["token_ids"], "seconds": stats["time_s"], "tau": stats["tau"],
                "draft_share": stats["draft_share"], "forwards": stats["forwards"]}

    def anchor(self, method: str, prompt: str) -> dict[str, Any]:
        request = TextRequest(prompt=prompt, model=self.model_name, max_new_tokens=self.max_new)
        input_ids = self.pipeline.encode_prompt(self.lm, request)
        options: dict[str, Any] = dict(max_new_tokens=self.max_new, do_sample=False, eos_token_id=sorted(self.eos),
                                       pad_token_id=sorted(self.eos)[0])
        if method == "hf-pld":
            options["prompt_lookup_num_tokens"] = HF_PLD_TOKENS
        if method == "hf-static-compile":
            options["cache_implementation"] = "static"
            self.call(input_ids, options)  # its fair best: this prompt's shapes compiled before the timed call
        frames = compiled_frames()
        seconds, ids = self.call(input_ids, options)
        self.recompiles = compiled_frames() - frames
        return {"ids": ids, "seconds": seconds, "tau": 1.0, "draft_share": 0.0, "forwards": len(ids)}

    def call(self, input_ids: torch.Tensor, options: dict[str, Any]) -> tuple[float, list[int]]:
        sync(self.lm.model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.lm.model.generate(input_ids, **options)
        sync(self.lm.model.device)
        return time.perf_counter() - start, out[0, input_ids.shape[1]:].tolist()

    def request(self, method: str, prompt: str) -> dict[str, Any]:
        """One timed request; ``recompiles`` counts dynamo frames compiled during the timed call only, ``gc_s`` the
        garbage collector's pauses during the request."""
        paused = self.gc.paused_s
        if method in ANCHORS:
            record = self.anchor(method, prompt)
            record["recompiles"] = self.recompiles
        else:
            frames = compiled_frames()
            record = self.ours(method, prompt)
            record["recompiles"] = compiled_frames() - frames
        record["gc_s"] = self.gc.paused_s - paused
        return record


def first_divergence(ours: list[int], plain: list[int]) -> int | None:
    """Index of the first token where ``ours`` leaves ``plain`` (None: identical)."""
    for i, (a, b) in enumerate(zip(ours, plain)):
        if a != b:
            return i
    return None if len(ours) == len(plain) else min(len(ours), len(plain))


def run_all(runner: Runner, prompts: list[dict], methods: list[str],
            checkpoint: Callable[[list[dict], dict[str, float]], None] = lambda records, first: None,
            ) -> tuple[list[dict], dict[str, float], dict[str, list[str]]]:
    """Cold request per method (first_request_s; a method whose cold request fails is printed and dropped from
    ``methods``), then every prompt through every method, order rotating;
    ``checkpoint`` gets the records so far after each prompt (a run cut short still reports). Also returns why
    dynamo recompiled after the cold requests (guard failures per compiled function)."""
    first = {}
    for method in list(methods):
        sync(runner.lm.model.device)
        start = time.perf_counter()
        try:
            runner.request(method, WARMUP_PROMPT)
        except Exception:  # one broken method must not cost the whole (device-time-limited) run
            traceback.print_exc()
            print(f"cold {method}: failed, left out of this run", flush=True)
            methods.remove(method)
            continue
        first[method] = round(time.perf_counter() - start, 3)
        print(f"cold {method}: {first[method]} s", flush=True)
    warmed = guard_failures()
    records = []
    for n, item in enumerate(prompts):
        order = methods[n % len(methods):] + methods[:n % len(methods)]
        results = {method: runner.request(method, item["prompt"]) for method in order}
        for method, record in results.items():
            plain = results.get("vanilla" + EXACT * method.endswith(EXACT), {}).get("ids")
            tokens = max(len(record["ids"]), 1)
            records.append({"method": method, "category": item["category"], "tokens": tokens,
                            "seconds": record["seconds"], "tokens_per_s": tokens / record["seconds"],
                            "tau": record["tau"], "draft_share": record["draft_share"],
                            "seconds_per_step": record["seconds"] / max(record["forwards"], 1),
                            "recompiles": record["recompiles"], "gc_s": record["gc_s"],
                            "divergence": first_divergence(record["ids"], plain) if plain is not None else None})
        print(f"prompt {n + 1}/{len(prompts)}: " + ", ".join(
            f"{m} {results[m]['seconds']:.2f}s" for m in methods), flush=True)
        checkpoint(records, first)
    reasons = {name: found[len(warmed.get(name, [])):] for name, found in guard_failures().items()
               if len(found) > len(warmed.get(name, []))}
    return records, first, reasons


def summarise(records: list[dict], methods: list[str], first: dict[str, float]) -> list[dict]:
    rows = []
    categories = ["all"] + sorted({r["category"] for r in records})
    for category in categories:
        chosen = [r for r in records if category == "all" or r["category"] == category]
        plain = [r for r in chosen if r["method"] == "vanilla"]
        exact_plain = any(r["method"] == "vanilla" + EXACT for r in chosen)
        plain_mean = statistics.mean(r["tokens_per_s"] for r in plain) if plain else None
        plain_total = sum(r["tokens"] for r in plain) / sum(r["seconds"] for r in plain) if plain else None
        for method in methods:
            mine = [r for r in chosen if r["method"] == method]
            if not mine:
                continue
            mean = statistics.mean(r["tokens_per_s"] for r in mine)
            total = sum(r["tokens"] for r in mine) / sum(r["seconds"] for r in mine)
            divergences = [r["divergence"] for r in mine if r["divergence"] is not None]
            rows.append({
                "method": method, "category": category, "prompts": len(mine), "tokens_per_s": round(mean, 2),
                "speedup_vs_plain": round(mean / plain_mean, 3) if plain_mean else None,
                "total_speedup_vs_plain": round(total / plain_total, 3) if plain_total else None,
                "tau": round(statistics.mean(r["tau"] for r in mine), 3),
                "draft_share": round(statistics.mean(r["draft_share"] for r in mine), 4),
                "seconds_per_step": round(statistics.median(r["seconds_per_step"] for r in mine), 5),
                "identical_fraction": (round(1 - len(divergences) / len(mine), 3)
                                       if (exact_plain if method.endswith(EXACT) else plain) else None),
                "first_divergences": divergences[:10],
                "recompiles_after_warmup": sum(r["recompiles"] for r in mine),
                "slowest_request_s": round(max(r["seconds"] for r in mine), 3),
                "gc_pause_s": round(sum(r["gc_s"] for r in mine), 3),
                "first_request_s": first[method]})
    return rows


def build(args: argparse.Namespace) -> tuple[TextPipeline, str]:
    """The tab's pipeline and the model name to request: a preset name, a local folder, or a random shape."""
    if args.tiny:
        return TextPipeline(ModelStore(packaged={}), "tiny"), ""
    pipeline = TextPipeline(ModelStore())
    if args.weights:
        use_weights(pipeline, args.model, Path(args.weights))
    if not args.shape:
        return pipeline, args.model
    tokenizer = pipeline.load(args.model).tokenizer  # a real tokenizer (and chat template) for the random shape
    folder = random_model_folder(args.shape, tokenizer, Path(args.models))
    return pipeline, folder


def use_weights(pipeline: TextPipeline, name: str, weights: Path) -> None:
    """Serve the preset entry ``name`` (its trained draft head and prompt tokens included) from ``weights``: a
    model folder or a GGUF file (dequantised once into the cache, as the packaged SmolLM2 is)."""
    spec = pipeline.spec_for(name)
    if not spec.package:
        raise SystemExit(f"--weights replaces a packaged model's weights; {name!r} has no package.")
    folder = convert_gguf(weights.stem.lower(), weights) if weights.suffix == ".gguf" else str(weights)
    pipeline.store.packaged = {**pipeline.store.packaged, spec.package: lambda _spec: folder}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct (packaged)",
                        help="a text-tab model name, Hub id or local folder (with --shape: whose tokenizer to use)")
    parser.add_argument("--weights", help="a model folder or .gguf file holding --model's weights (a packaged "
                        "entry: its trained drafters still apply), e.g. the SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"],
                        help="random weights of this shape instead of --model's (step costs only)")
    parser.add_argument("--prompts", default="benchmarks/prompts/heldout40.jsonl")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    parser.add_argument("--methods", default=",".join(OURS), help="ours, vanilla first")
    parser.add_argument("--anchors", default=",".join(ANCHORS), help="transformers generate anchors ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on this machine: a quick check")
    parser.add_argument("--exact", action="store_true", help="also run each of our methods in exact mode")
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "tokenworks-text-models"))
    parser.add_argument("--host-profile", default="", help="methods to profile on the host after the run (diagnostic)")
    parser.add_argument("--profile-prompts", type=int, default=8)
    parser.add_argument("--device-trace", default="", help="a folder: for each --host-profile method, torch.profiler "
                        "over --profile-prompts, the device's busy share and a Chrome trace (diagnostic)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with diagnostic_methods(args.methods.split(",")):
        return run(args, argv)


@contextmanager
def diagnostic_methods(names: list[str]) -> Iterator[None]:
    """The ``MERGED_VARIANTS`` named in ``names`` registered as decoding methods for the run, and removed after it."""
    added = [name for name in names if name in MERGED_VARIANTS and name not in DECODING_METHODS]
    DECODING_METHODS.update({name: merged_variant(name, MERGED_VARIANTS[name]) for name in added})
    try:
        yield
    finally:
        for name in added:
            del DECODING_METHODS[name]


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    pipeline, model_name = build(args)
    runner = Runner(pipeline, model_name, args.max_new_tokens)
    ours = [m for m in args.methods.split(",") if m]
    exact = [m + EXACT for m in dict.fromkeys(["vanilla", *ours])] if args.exact else []
    methods = ours + exact + [a for a in args.anchors.split(",") if a]
    prompts = read_prompts(args.prompts)[: args.limit or None]
    model = runner.lm.model

    def report_of(records: list[dict], first: dict[str, float], reasons: dict | None = None) -> dict:
        return {"benchmark": "text_served",
                "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
                "model": args.shape and f"random {args.shape} (Qwen2 shape)" or model_name or "tiny preset",
                "dtype": str(model.dtype),
                "settings": {"prompts": args.prompts, "count": len(prompts), "max_new_tokens": args.max_new_tokens,
                             "prompts_done": len(records) // len(methods),
                             "exact_mode_added": args.exact, "greedy": True, "hf_pld_tokens": HF_PLD_TOKENS,
                             "command": command_line(argv)},
                "rows": summarise(records, methods, first), "recompile_reasons_after_warmup": reasons,
                "compile": getattr(runner.lm.fast_forward, "compile_mode", None),
                "cost_curves_ms": {",".join(map(str, buckets)) or "eager":
                                       {n: round(c * 1e3, 4) for n, c in curve.items()}
                                   for buckets, curve in runner.lm.state.curves.items()}}

    records, first, reasons = run_all(runner, prompts, methods,
                                      lambda records, first: write_report(report_of(records, first), args.json))
    report = report_of(records, first, reasons)
    for row in report["rows"]:
        if row["category"] == "all":
            print(row, flush=True)
    print("cost curves (ms):", report["cost_curves_ms"], flush=True)
    write_report(report, args.json)
    for method in filter(None, args.host_profile.split(",")):
        host_profile(runner, method, prompts[: args.profile_prompts])
        if args.device_trace:
            device_trace(runner, method, prompts[: args.profile_prompts], Path(args.device_trace))
    return report


def host_profile(runner: Runner, method: str, prompts: list[dict]) -> None:
    """A diagnostic, not a result: where the host spends a step (cProfile over ``prompts``, our modules only).
    On a GPU the time inside the first read of a step's result is the wait for the device."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for item in prompts:
        runner.request(method, item["prompt"])
    profile.disable()
    print(f"host profile of {method} over {len(prompts)} prompts:", flush=True)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"pipelines/(decoding|tabs/text)", 30)


def device_trace(runner: Runner, method: str, prompts: list[dict], folder: Path) -> dict[str, float]:
    """A diagnostic, not a result: how much of the wall time the device spends running kernels for ``method``
    (the rest it waits for the host), the costliest operators, and a Chrome trace to see the gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as trace:
        started = time.perf_counter()
        for item in prompts:
            runner.request(method, item["prompt"])
        wall = time.perf_counter() - started
    busy = sum(event.time_range.elapsed_us() for event in trace.events() if event.device_type == DeviceType.CUDA) / 1e6
    print(f"device trace of {method} over {len(prompts)} prompts: wall {wall:.3f} s, kernels {busy:.3f} s "
          f"({busy / wall:.0%} busy)", flush=True)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(trace.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    trace.export_chrome_trace(str(folder / f"trace_{method}.json"))
    return {"wall_s": wall, "kernel_s": busy}


if __name__ == "__main__":
    main()
