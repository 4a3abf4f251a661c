"""Milliseconds per decoding step, stock eager (``CausalLMForward`` on a ``DynamicCache``) vs the static fast
path (``StaticForward``: static cache, padded buckets, CUDA graphs; optionally inductor-compiled), against
the memory-bandwidth floor.

    python benchmarks/text_gpu_step.py --device cuda
    python benchmarks/text_gpu_step.py --tiny            # CPU check of the script

Random bf16 weights of the real shapes (values do not change the cost). Each step is the forward over a
``--context``-token cache plus the argmax the verifier does, timed with CUDA events from before the host
builds the inputs to after the argmax, so launch overhead counts; the cache is rolled back after every
step. Methods and sizes are interleaved per repeat; medians are reported. The floor is
(weight bytes read per step + K/V bytes at the context) / device-to-device copy bandwidth measured here.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402
from pipelines.decoding.static import StaticForward  # noqa: E402
from pipelines.decoding.tree import TokenTree  # noqa: E402
from pipelines.decoding.verify import CausalLMForward  # noqa: E402

CONFIGS = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 4096},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 1024},
}
SIZES = (1, 8, 16, 32, 64, 128, 256)


def build(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(CONFIGS[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def bytes_per_step(model, context: int) -> tuple[int, int]:
    """Weight bytes a step must read (an untied input embedding is only gathered, so it is left out) and
    K/V bytes at ``context``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        weights -= embedding.numel() * embedding.element_size()
    config = model.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * heads * head_dim * context * embedding.element_size()
    return weights, kv


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), median of 10."""
    source = torch.randn(int(gib * 2**30) // 4, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        seconds = timed(lambda: target.copy_(source), device)
        times.append(seconds)
    return 2 * source.numel() * 4 / statistics.median(times[2:])


def timed(step, device: torch.device) -> float:
    """Seconds for ``step()`` (plus its result's argmax) with CUDA events, or a synced host clock on a CPU."""
    if device.type != "cuda":
        started = time.perf_counter()
        step()
        return time.perf_counter() - started
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def random_tree(size: int, vocab: int, rng: random.Random) -> TokenTree:
    return TokenTree([rng.randrange(vocab) for _ in range(size)], [-1] + [rng.randrange(i) for i in range(1, size)])


def stepper(forward, cache, context: int, tree: TokenTree):
    """One verification step at cache length ``context``: inputs, forward, argmax to the host, rollback."""

    def step():
        mask, positions = forward.block_inputs(tree, 0, context)
        logits = forward(tree.tokens, positions, mask, cache, keep=len(tree))
        logits.argmax(-1).tolist()
        cache.crop(-len(tree))

    return step


def print_kernels(step, key: tuple[str, int], rows: int = 25) -> None:
    """A diagnostic: the step's device kernels by total time over 10 steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for _ in range(10):
            step()
    print(f"kernels of {key[0]} n={key[1]} (10 steps):", flush=True)
    print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile-configs", default="llama-2-7b",
                        help="configs that also get the inductor-compiled fast path ('' for none)")
    parser.add_argument("--compile-modes", default="layers,dynamic",
                        help="StaticForward compile modes to time besides 'off' (layers: the decoder layers' norms "
                        "and MLPs; dynamic: the whole step)")
    parser.add_argument("--compile-sizes", default="1,64")
    parser.add_argument("--cache-len", type=int, default=0,
                        help="the static cache's length (default: context + largest size + 8; the tab uses >= 4096)")
    parser.add_argument("--kernels", default="", help="method:size pairs whose kernels to print (diagnostic)")
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny config, small sizes, eager fast path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.configs, args.device, args.context, args.sizes = "tiny", "cpu", 64, "1,8,16"
        args.repeats, args.compile_configs = 2, ""
    return args


def forwards_for(name: str, model, args: argparse.Namespace, sizes: list[int]) -> dict:
    """The forwards to time for one config: eager, static, and static compiled in each requested mode."""
    cache_len = args.cache_len or args.context + max(sizes) + 8
    methods = {"eager": CausalLMForward(model), "static": StaticForward(model, max_cache_len=cache_len)}
    if name in args.compile_configs.split(","):
        for mode in filter(None, args.compile_modes.split(",")):
            methods[f"static_compiled_{mode}"] = StaticForward(model, max_cache_len=cache_len, compile=mode)
    return methods


def ready_steps(name: str, methods: dict, prompt: list[int], args: argparse.Namespace, sizes: list[int],
                vocab: int) -> tuple[dict, dict, dict]:
    """Each (method, tree size) step after its prompt and two warm-up calls: steps, failures, warm-up seconds."""
    compile_sizes = {int(s) for s in args.compile_sizes.split(",") if s}
    caches = {}
    for method, forward in methods.items():
        cache = forward.new_cache()
        mask, positions = forward.block_inputs(TokenTree([prompt[-1]], [-1]), args.context - 1, 0)
        forward(prompt, positions, mask, cache, keep=1)
        caches[method] = cache
    rng = random.Random(0)
    trees = {n: random_tree(n, vocab, rng) for n in sizes}
    steps, failed, first_call = {}, {}, {}
    for n in sizes:
        for method, forward in methods.items():
            if method.startswith("static_compiled") and n not in compile_sizes:
                continue
            step = stepper(forward, caches[method], args.context, trees[n])
            warm = time.perf_counter()
            try:
                step()
                step()
            except Exception as error:  # noqa: BLE001 - report the method as failed and go on
                failed[(method, n)] = repr(error)[:300]
                print(f"{name} {method} n={n} failed: {failed[(method, n)]}", flush=True)
                continue
            steps[(method, n)] = step
            first_call[(method, n)] = time.perf_counter() - warm
            print(f"{name} {method} n={n} ready ({first_call[(method, n)]:.1f}s)", flush=True)
    return steps, failed, first_call


def measure_config(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   bandwidth: float) -> list[dict]:
    """Rows for one config: median ms per step of every method and tree size, repeats interleaved."""
    began = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = build(name, device, dtype)
    weights, kv = bytes_per_step(model, args.context)
    floor_ms = (weights + kv) / bandwidth * 1e3
    vocab = model.config.vocab_size
    prompt = [random.Random(1).randrange(vocab) for _ in range(args.context)]
    methods = forwards_for(name, model, args, sizes)
    with torch.inference_mode():
        steps, failed, first_call = ready_steps(name, methods, prompt, args, sizes, vocab)
        times = {key: [] for key in steps}
        for _ in range(args.repeats):
            for key, step in steps.items():
                times[key].append(timed(step, device))
        for key in (k for k in steps if f"{k[0]}:{k[1]}" in args.kernels.split(",")):
            print_kernels(steps[key], key)
    plain = {method: statistics.median(times[(method, 1)]) for method in methods if (method, 1) in times}
    rows = []
    for (method, n), samples in times.items():
        ms = statistics.median(samples) * 1e3
        row = {"method": method, "config": name, "query_tokens": n, "ms": round(ms, 4),
               "min_ms": round(min(samples) * 1e3, 4), "floor_ms": round(floor_ms, 4),
               "ratio_to_floor": round(ms / floor_ms, 3),
               "first_two_calls_s": round(first_call[(method, n)], 2),
               "captured": bool(getattr(methods[method], "graphs", {}))}
        if method in plain:
            row["ratio_to_plain"] = round(ms / (plain[method] * 1e3), 3)
        rows.append(row)
        print(row, flush=True)
    rows.extend({"method": method, "config": name, "query_tokens": n, "error": error}
                for (method, n), error in failed.items())
    print(f"{name}: weights {weights / 1e9:.2f} GB, KV {kv / 1e9:.3f} GB, floor {floor_ms:.3f} ms, "
          f"{time.perf_counter() - began:.0f}s", flush=True)
    del model, methods, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, 1.0 if device.type == "cuda" else 0.05)
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.3f} TB/s", flush=True)
    rows = [row for name in args.configs.split(",") for row in measure_config(name, args, device, dtype, bandwidth)]
    result = benchmark_report(
        "text_gpu_step", device_name(device), args.configs,
        {"dtype": str(dtype), "attn": "sdpa", "context": args.context, "repeats": args.repeats,
         "statistic": "median over interleaved repeats", "weights": "random",
         "copy_bandwidth_tb_s": round(bandwidth / 1e12, 4),
         "floor": "(weight bytes read + KV bytes at context) / measured D2D copy bandwidth",
         "step": "inputs + forward + argmax to host + rollback"},
        rows, argv)
    if args.json or not args.tiny:
        path = Path(args.json or f"benchmarks/results/text_gpu_step_{device.type}.json")
        write_report(result, path)
        print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
