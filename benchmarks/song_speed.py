"""Song accompaniment speed: MusicGen through Tokenworks' decode loop, streamed.

Methods, interleaved per repeat after a warm-up: plain decoding with a dynamic cache, plain with the static
cache, and lossless column drafting (prompt lookup) with the static cache. Reports time to first audio, RTF,
forwards, tau (columns per forward) and whether each method's codes equal plain decoding's.

    python benchmarks/song_speed.py --device cpu --model tiny --seconds 2 \
        --json benchmarks/results/song_speed_cpu_tiny.json
    python benchmarks/song_speed.py --device cuda --model random-small --seconds 10 \
        --json benchmarks/results/song_speed_cuda.json
    python benchmarks/song_speed.py --device cuda --model facebook/musicgen-small   # real weights: meaningful tau

``random-small`` is the musicgen-small architecture (T5-base encoder, 24x1024 decoder over 4x2048 codes,
EnCodec 32 kHz) with random weights: right for speed, not for acceptance rates.
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

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402

from pipelines.decoding.plain import SamplingConfig  # noqa: E402
from pipelines.audio.musicgen import stream_accompaniment  # noqa: E402
from pipelines.streaming import Returning  # noqa: E402
from pipelines.tiny import tiny_musicgen  # noqa: E402

METHODS = {  # name -> (draft, static cache)
    "plain-dynamic": (False, False),
    "plain-static": (False, True),
    "draft-static": (True, True),
}


def random_small(device: torch.device, dtype: torch.dtype):
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    from pipelines.tiny import tiny_tokenizer

    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
    codec = EncodecConfig(target_bandwidths=[2.2], sampling_rate=32000, audio_channels=1, num_filters=64,
                          hidden_size=128, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, num_lstm_layers=2,
                          use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(vocab_size=2048, num_codebooks=4, hidden_size=1024, num_hidden_layers=24,
                                    num_attention_heads=16, ffn_dim=4096, max_position_embeddings=2048,
                                    pad_token_id=2048, decoder_start_token_id=2048, bos_token_id=2048)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval()
    return model.to(device=device, dtype=dtype), tiny_tokenizer()


def load(name: str, device: torch.device, dtype: torch.dtype):
    if name == "tiny":
        model, tokenizer = tiny_musicgen()
        return model.to(device), tokenizer
    if name == "random-small":
        return random_small(device, dtype)
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)


def run_once(model, tokenizer, prompt: str, frames: int, sampling: SamplingConfig, guidance: float, draft: bool,
             static: bool) -> dict:
    started = time.perf_counter()
    stream = Returning(stream_accompaniment(model, tokenizer, prompt, frames, sampling, guidance, draft=draft,
                                            static_cache=static))
    for _ in stream:
        pass
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    result = stream.value
    return {"time_s": elapsed, "first_audio_s": result.first_audio_s, "forwards": result.stats.forwards,
            "tau": result.stats.tau, "codes": result.codes.cpu(), "audio_s": result.audio.size / result.sample_rate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny | random-small | a Hub id or local folder")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="upbeat acoustic folk with fingerpicked guitar and light percussion")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tokenizer = load(args.model, device, dtype)
    frames = round(args.seconds * 50)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for name, (draft, static) in METHODS.items():  # warm-up
        run_once(model, tokenizer, args.prompt, min(frames, 25), sampling, args.guidance, draft, static)
    runs: dict[str, list[dict]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name, (draft, static) in METHODS.items():
            runs[name].append(run_once(model, tokenizer, args.prompt, frames, sampling, args.guidance, draft, static))
    reference = runs["plain-dynamic"][0]["codes"]
    baseline = statistics.median(r["time_s"] for r in runs["plain-dynamic"])
    rows = []
    for name, results in runs.items():
        time_s = statistics.median(r["time_s"] for r in results)
        audio_s = results[0]["audio_s"]
        rows.append({
            "method": name,
            "time_s": round(time_s, 4),
            "rtf": round(time_s / audio_s, 4),
            "time_to_first_audio_s": round(statistics.median(r["first_audio_s"] for r in results), 4),
            "forwards": results[0]["forwards"],
            "tau": round(results[0]["tau"], 4),
            "ms_per_forward": round(1000 * time_s / results[0]["forwards"], 3),
            "speedup_vs_plain_dynamic": round(baseline / time_s, 3),
            "identical_to_plain": all(torch.equal(r["codes"], reference) for r in results),
        })
    report = benchmark_report(
        "song_speed", device_name(device), args.model,
        {"seconds": args.seconds, "frames": frames, "repeats": args.repeats, "prompt": args.prompt,
         "temperature": args.temperature, "top_k": args.top_k, "guidance_scale": args.guidance,
         "seed": args.seed, "dtype": str(dtype).removeprefix("torch."),
         "torch": torch.__version__, "chunks": "first 25 frames, then doubling up to 150"},
        rows, argv)
    print(json.dumps(report, indent=2))
    write_report(report, args.json)


if __name__ == "__main__":
    main()
