"""Micro-song (the song tab's offline mode) through the served path: ``SongPipeline.generate`` with the committed
note model, plain decoding vs prompt-lookup drafting, interleaved per repeat after a warm-up.

Reports per method the request's wall time, time to first audio, RTF, forwards, tau (body tokens per forward),
the decode's own time, and whether the body's tokens equal plain decoding's (they must: drafting is lossless).

    python benchmarks/microsong.py --repeats 3 --json benchmarks/results/microsong_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402

from components.song_tab import EXAMPLES  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.presets import MICROSONG_MODEL  # noqa: E402
from pipelines.tabs.song import SongPipeline, SongRequest  # noqa: E402

METHODS = {"plain": False, "prompt-lookup": True}


def run_once(pipeline: SongPipeline, lyrics: str, style: str, draft: bool, temperature: float, seed: int) -> dict:
    request = SongRequest(lyrics=lyrics, style=style, mode="offline", draft=draft, temperature=temperature, seed=seed,
                          note_model=MICROSONG_MODEL)
    result = next(event for event in pipeline.generate(request) if isinstance(event, Result))
    return {**result.stats, "tokens": result.metadata["tokens"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example", type=int, default=2, help="which of the song tab's examples to sing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    store = ModelStore(device=torch.device("cpu"))
    pipeline = SongPipeline(store, "auto")
    lyrics, style = EXAMPLES[args.example]
    for draft in METHODS.values():  # warm-up (loads the model)
        run_once(pipeline, lyrics, style, draft, args.temperature, args.seed)
    runs: dict[str, list[dict]] = {name: [] for name in METHODS}
    for repeat in range(args.repeats):
        for name, draft in METHODS.items():
            runs[name].append(run_once(pipeline, lyrics, style, draft, args.temperature, args.seed + repeat))
    baseline = statistics.median(r["time_s"] for r in runs["plain"])
    rows = []
    for name, results in runs.items():
        time_s = statistics.median(r["time_s"] for r in results)
        rows.append({
            "method": name,
            "time_s": round(time_s, 4),
            "decode_s": round(statistics.median(r["decode_s"] for r in results), 4),
            "time_to_first_audio_s": round(statistics.median(r["time_to_first_audio_s"] for r in results), 4),
            "rtf": round(statistics.median(r["rtf"] for r in results), 4),
            "audio_s": results[0]["audio_s"],
            "forwards": [r["forwards"] for r in results],
            "new_tokens": [r["new_tokens"] for r in results],
            "tau": round(statistics.mean(r["tau"] for r in results), 4),
            "speedup_vs_plain": round(baseline / time_s, 3),
            "identical_to_plain": all(r["tokens"] == p["tokens"] for r, p in zip(results, runs["plain"])),
            "lines_matching_syllables": [f'{r["lines_matching_syllables"]}/{r["sung_lines"]}' for r in results],
        })
    report = benchmark_report(
        "microsong", device_name(torch.device("cpu")), MICROSONG_MODEL,
        {"repeats": args.repeats, "temperature": args.temperature,
         "seeds": [args.seed + r for r in range(args.repeats)],
         "lyrics": lyrics, "style": style, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "path": "SongPipeline.generate (offline mode), wall time per request incl. synthesis and WAV writing"},
        rows, argv)
    print(json.dumps(report, indent=2))
    write_report(report, args.json)


if __name__ == "__main__":
    main()
