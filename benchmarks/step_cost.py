"""Cost of one tree-verification forward vs a plain one-token step, for n = 1..128 query tokens.

    python benchmarks/step_cost.py --device cuda --configs qwen2.5-1.5b,llama-2-7b \
        --json benchmarks/results/step_cost_h200.json

Random weights of the real architectures (shapes set the cost, values do not), bf16 on CUDA, sdpa, a
float 4D tree mask over a ``--context``-token cache. Each forward is timed synchronised, sizes are visited
round-robin and the minimum per size is kept (pipelines/decoding/hardware.py), so this is the same curve
the text pipeline measures to pick its tree size. ``--configs tiny`` checks the script on a CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402
from pipelines.decoding.hardware import measure_step_cost  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 81, 96, 112, 128)


def config_for(name: str):
    """Hand-written configs with the published shapes (no download)."""
    from transformers import LlamaConfig, Qwen2Config

    if name == "qwen2.5-1.5b":
        return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                           tie_word_embeddings=True, rope_theta=1000000.0)
    if name == "llama-2-7b":
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    if name == "tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024)
    raise SystemExit(f"Unknown config {name!r}; choose qwen2.5-1.5b, llama-2-7b or tiny.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="qwen2.5-1.5b,llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(config_for(name), dtype=dtype, attn_implementation="sdpa").eval()
        costs = measure_step_cost(model, sizes=sizes, context=args.context, repeats=args.repeats)
        for n, seconds in costs.items():
            rows.append({"method": "tree_forward", "config": name, "query_tokens": n, "ms": round(seconds * 1e3, 4),
                         "ratio_to_one_token": round(seconds / costs[1], 4)})
            print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = benchmark_report(
        "step_cost", device_name(device), args.configs,
        {"dtype": str(dtype), "attn": "sdpa", "mask": "float 4D", "context": args.context,
         "repeats": args.repeats, "statistic": "min over repeats, monotone", "weights": "random"},
        rows, argv)
    write_report(result, args.json)
    return result


if __name__ == "__main__":
    main()
