"""Speech latency: time to first audio and real-time factor, streamed vs one-shot, and τ with/without drafting.

Bark rows (interleaved per repeat, after a warm-up, medians): plain or chain-drafted AR stages x streamed
(growing chunks) or one-shot decode. Token ids of every drafted run are checked against the plain run of the same
repeat. hibari rows: the packaged CPU voice, streamed sentence by sentence vs synthesised in one call.

Random weights rarely stop where a real voice would, so for a fixed-length utterance the semantic stage runs to
``--semantic-tokens`` with EOS not treated as a stop (500 semantic tokens = 1502 coarse tokens = 10.0 s at 24 kHz).
Random weights also make τ a property of the random model (it loops), not of speech: quote τ from real weights.

    python benchmarks/speech_latency.py --bark tiny --json benchmarks/results/speech_latency_cpu.json
    python benchmarks/speech_latency.py --bark random-small --device cuda --no-hibari \
        --json benchmarks/results/speech_latency_h200.json
    python benchmarks/speech_latency.py --bark suno/bark-small --device cuda --no-fixed-length ...
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, sync, write_report  # noqa: E402

from pipelines.audio.bark import BarkOutput, BarkSettings, BarkTTS, synthesize  # noqa: E402
from pipelines.decoding.plain import SamplingConfig  # noqa: E402
from pipelines.streaming import Returning  # noqa: E402
from pipelines.tiny import tiny_bark, tiny_bark_tokenizer  # noqa: E402

TEXT = ("Hello, this is a longer sentence that a speech model reads aloud. It goes on for a while, so the first "
        "audio can arrive long before the whole utterance is done.")
METHODS = {  # name: (drafting, stream)
    "plain · one-shot": (False, False),
    "plain · streamed": (False, True),
    "drafting · one-shot": (True, False),
    "drafting · streamed": (True, True),
}


def random_bark_small(seed: int) -> BarkTTS:
    """suno/bark-small's architecture (BarkSubModelConfig defaults are bark-small: 12 layers, 12 heads, 768 wide,
    block 1024) with its vocabularies and EnCodec 24 kHz, random weights; text ids from the small local tokenizer."""
    from transformers import BarkConfig, BarkModel, EncodecConfig
    from transformers.models.bark.generation_configuration_bark import BarkGenerationConfig

    config = BarkConfig(
        semantic_config=dict(input_vocab_size=129_600, output_vocab_size=10_048),
        coarse_acoustics_config=dict(input_vocab_size=12_096, output_vocab_size=12_096),
        fine_acoustics_config=dict(input_vocab_size=1056, output_vocab_size=1056, n_codes_total=8, n_codes_given=1),
        codec_config=EncodecConfig().to_dict(),
    )
    torch.manual_seed(seed)
    model = BarkModel(config).eval()
    generation = BarkGenerationConfig()
    for key in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        setattr(generation, key, getattr(generation, key).to_dict())
    model.generation_config = generation
    return BarkTTS(model, tiny_bark_tokenizer())


def load_bark(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> BarkTTS:
    if name == "tiny":
        tts = tiny_bark(seed)
    elif name == "random-small":
        tts = random_bark_small(seed)
    else:
        from transformers import AutoTokenizer, BarkModel

        tts = BarkTTS(BarkModel.from_pretrained(name, dtype=dtype).eval(), AutoTokenizer.from_pretrained(name))
    tts.model.to(device=device, dtype=dtype)
    return tts


def time_bark(tts: BarkTTS, settings: BarkSettings, device: torch.device) -> tuple[dict, BarkOutput]:
    sync(device)
    start = time.perf_counter()
    first = None
    samples = 0
    stream = Returning(synthesize(tts, TEXT, settings))
    for chunk in stream:
        if first is None and chunk.size:
            first = time.perf_counter() - start
        samples += chunk.size
    sync(device)
    total = time.perf_counter() - start
    audio_s = samples / tts.sample_rate
    output = stream.value
    s, c = output.semantic_stats, output.coarse_stats
    row = {"ttfa_s": first, "time_s": total, "audio_s": audio_s, "rtf": total / audio_s, "ttfa_fraction": first / total,
           "tau": (s.new_tokens + c.new_tokens) / (s.forwards + c.forwards), "tau_semantic": s.tau,
           "tau_coarse": c.tau, "forwards": s.forwards + c.forwards, "semantic_tokens": s.new_tokens,
           "coarse_tokens": c.new_tokens, "chunks": output.chunks}
    return row, output


def bench_bark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    tts = load_bark(args.bark, device, dtype, args.seed)
    if args.fixed_length:
        # A token id that the semantic processors suppress, so EOS never ends the utterance early.
        tts.semantic.eos_token_id = tts.semantic.semantic_pad_token + 1
    base = dict(sampling=SamplingConfig(temperature=args.temperature, seed=args.seed),
                max_semantic_tokens=args.semantic_tokens)
    time_bark(tts, BarkSettings(drafting=True, stream=True, **{**base, "max_semantic_tokens": 16}), device)  # warm-up
    samples: dict[str, list[dict]] = {name: [] for name in METHODS}
    identical: dict[str, bool] = {name: True for name in METHODS}
    names = list(METHODS)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        outputs = {}
        for name in order:
            drafting, stream = METHODS[name]
            row, outputs[name] = time_bark(tts, BarkSettings(drafting=drafting, stream=stream, **base), device)
            samples[name].append(row)
        reference = outputs["plain · one-shot"]
        for name, output in outputs.items():
            identical[name] &= output.semantic == reference.semantic and output.coarse == reference.coarse
    baseline = statistics.median(r["time_s"] for r in samples["plain · one-shot"])
    rows = []
    for name in names:
        row = {key: statistics.median(r[key] for r in samples[name]) for key in samples[name][0]}
        # Target: first audio <= 0.15 x total generation time, read against this run's own total and against
        # the plain one-shot baseline's total (the time a non-streaming user waits).
        row.update(method=f"bark {name}", ids_identical_to_plain=identical[name],
                   speedup_vs_plain_one_shot=baseline / row["time_s"], ttfa_vs_plain_one_shot=row["ttfa_s"] / baseline,
                   ttfa_target_met=max(row["ttfa_fraction"], row["ttfa_s"] / baseline) <= 0.15)
        rows.append({"method": row.pop("method"), **{k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in row.items()}})
    return rows


def bench_hibari(repeats: int) -> list[dict]:
    from hibari import SAMPLE_RATE, Hibari

    start = time.perf_counter()
    tts = Hibari()
    tts.g2p
    cold = time.perf_counter() - start
    tts("Warm up.", seed=0)
    streamed, one_shot = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        first, samples = None, 0
        for chunk in tts.stream(TEXT, seed=0):
            first = first if first is not None else time.perf_counter() - start
            samples += chunk.size
        total = time.perf_counter() - start
        streamed.append({"ttfa_s": first, "time_s": total, "audio_s": samples / SAMPLE_RATE})
        start = time.perf_counter()
        audio = tts(TEXT, seed=0)
        total = time.perf_counter() - start
        one_shot.append({"ttfa_s": total, "time_s": total, "audio_s": audio.size / SAMPLE_RATE})
    rows = []
    for name, runs in (("hibari · streamed by sentence", streamed), ("hibari · one-shot", one_shot)):
        row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        row.update(rtf=row["time_s"] / row["audio_s"], ttfa_fraction=row["ttfa_s"] / row["time_s"], load_s=cold,
                   ttfa_target_met=row["ttfa_s"] < 0.5)
        rows.append({"method": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}})
    return rows


def describe(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {threads} intra-op thread(s), shared 2-core machine)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bark", default="tiny", help="tiny | random-small | a Hub id or local folder")
    parser.add_argument("--semantic-tokens", type=int, default=500)
    parser.add_argument("--no-fixed-length", dest="fixed_length", action="store_false",
                        help="let EOS end the utterance (real weights)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1 suits tiny models)")
    parser.add_argument("--no-hibari", dest="hibari", action="store_false")
    parser.add_argument("--no-bark", dest="bark_rows", action="store_false")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    if args.hibari:
        rows += bench_hibari(args.repeats)
    if args.bark_rows:
        with torch.inference_mode():
            rows += bench_bark(args, device, dtype)
    result = benchmark_report(
        "speech_latency", describe(device, args.threads),
        {"bark": args.bark, "hibari": "hibari-tts heart (packaged)" if args.hibari else None},
        {"text": TEXT, "semantic_tokens": args.semantic_tokens, "fixed_length": args.fixed_length,
         "temperature": args.temperature, "seed": args.seed, "repeats": args.repeats,
         "dtype": str(dtype), "schedule": asdict(BarkSettings().schedule)},
        rows, argv)
    print(json.dumps(result, indent=2))
    write_report(result, args.json)


if __name__ == "__main__":
    main()
