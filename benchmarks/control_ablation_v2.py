"""Which variant of an image control acts on micro-world v2, and why: control_effect_v2's units of one control
(binding, lpa or leakfix) rendered through the served path (``ImagePipeline.generate``) with config variants and
diagnostic probes, each scored by the v2 scorer against the same controls-off baseline. The served defaults are
untouched: a variant replaces the config the request's ``ControlPlan`` builds (``BindingConfig``, ``LPAConfig``) for
this process only, sets request fields as the tab does, or names a probe: a benchmark-only edit made after the served
controls are set up (``DiagnosticPipeline``).

The first variant renders the A/B pair (baseline and control); the others render the control only, paired with that
baseline (same prompt, seed and request, so the same initial noise). ``--attention`` also measures, for LPA's
prompts, the share of cross-attention each kind of prompt token gets on each LPA layer tag, inside and outside the
window, with LPA off and on: whether the masks reach anything at this model's grids.

    # CPU, 32 units (4 prompts x 8 seeds), LPA's variants and the attention shares
    python benchmarks/control_ablation_v2.py --control lpa --units 32 --attention --device cpu \
        --json /tmp/lpa_ablation.json --sheet /tmp/lpa_ablation.png --images /tmp/lpa_ablation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import control_effect_v2 as effect  # noqa: E402
from benchmarks.report import benchmark_report, write_report  # noqa: E402
from pipelines.diffusion import controls  # noqa: E402
from pipelines.diffusion.attention import AttentionRecorder, KeyBias  # noqa: E402
from pipelines.diffusion.binding import BindingConfig, attribute_free_prompt, end_token_substitution  # noqa: E402
from pipelines.diffusion.leakfix import encoded_alone, isolate_items  # noqa: E402
from pipelines.diffusion.lpa import LPAConfig, layer_tags  # noqa: E402
from pipelines.diffusion.prompts import (content_words, encode_positive, end_positions, parse_prompt,  # noqa: E402
                                         span_positions, token_positions)
from pipelines.microworld.scorer import Detection, match  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import NO_COMPARISON, ImagePipeline, ImageRequest  # noqa: E402

WIDE = {"style_tags": ("up1", "up2"), "content_tags": ("down1", "down2", "mid"), "lpa_window": (0.0, 1000.0)}
EVERYWHERE = {"style_tags": (), "content_tags": ("down1", "down2", "mid", "up1", "up2"), "lpa_window": (0.0, 1000.0)}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "binding": {
        "served": {},
        "no_token_refinement": {"token_refinement_steps": 0},
        "no_attention_refinement": {"attention_control_steps": 0},
        "composite_only": {"token_refinement_steps": 0, "attention_control_steps": 0},
        "composite_only_uncapped": {"token_refinement_steps": 0, "attention_control_steps": 0,
                                    "cap_composite_norm": False},
        "ets0": {"ets_step": 0},  # the official RunConfig1: end tokens from the attribute-free prompt from step 0
    },
    "lpa": {
        "served": {},  # the paper's lpa_late_only: style -> up2, content -> down1 + mid, t in [300, 650]
        "causal_style": {"causal_style": True},  # all that has read the style masked on content layers: the end too
        "causal_both": {"causal_style": True, "causal_content": True},  # ... and style layers see the style only
        "wide": WIDE,  # every attention level routed, every step: the most the paper's masks can do
        "wide_causal_style": {**WIDE, "causal_style": True},
        "wide_causal_style_early": {**WIDE, "causal_style": True, "lpa_window": (650.0, 1000.0)},  # which steps
        "wide_causal_style_late": {**WIDE, "causal_style": True, "lpa_window": (0.0, 300.0)},
        # Probes, not LPA: where the style rides. Style words off on every layer at every step, then all that read it.
        "probe_style_words_off": EVERYWHERE,
        "probe_style_causal_off": {**EVERYWHERE, "causal_style": True},
    },
    "leakfix": {
        "served": {},  # each object phrase re-encoded alone at its own positions (leakfix.encoded_at_place)
        "end_tokens_off": {"probe": "end_tokens_off"},  # ... and the end tokens masked: only the patched items speak
        "end_tokens_attribute_free": {"probe": "end_tokens_attribute_free"},  # ... ends from "a circle and a star"
        "probe_end_tokens_off_only": {"isolate": "", "probe": "end_tokens_off"},  # no isolation, ends masked
        # not the paper's: each item re-encoded after the earlier words with their attributes taken out, so it keeps
        # its place in the sentence ("a circle and a" + "red square") but not the earlier items' colours
        "in_neutral_context": {"probe": "isolate_in_neutral_context"},
        # the paper's placement: each item encoded as a prompt of its own, at positions 1..n (``encoded_alone``)
        "paper_placement": {"probe": "isolate_alone"},
    },
}
REQUEST_FIELDS = ("ets_step", "lpa_window", "isolate", "probe")  # set through the request, as the tab does
CONFIGS: dict[str, type] = {"binding": BindingConfig, "lpa": LPAConfig}
METRICS = {"binding": ("binding", "found", "presence", "leakage", "valid"),
           "lpa": ("style_agreement", "found", "presence", "binding", "valid"),
           "leakfix": ("leakage", "binding", "found", "presence", "valid")}
TOKEN_KINDS = ("start", "content", "style", "other_words", "end")


@contextmanager
def config_variant(control: str, overrides: dict[str, Any]) -> Iterator[Any]:
    """Requests with ``control`` on get its config with ``overrides`` (request fields aside) while inside; the served
    defaults (the dataclass itself) are never edited, and the plan builds the stock config again after."""
    fields = {k: v for k, v in overrides.items() if k not in REQUEST_FIELDS}
    if control not in CONFIGS:
        if fields:
            raise ValueError(f"{control} has no config to override: {sorted(fields)}")
        yield None
        return
    cls = CONFIGS[control]
    config = replace(cls(), **fields)
    with mock.patch.object(controls, cls.__name__, lambda **given: replace(config, **given)):
        yield config


@dataclass
class DiagnosticRequest(ImageRequest):
    """An image request that may carry a probe: "end_tokens_off" (the end tokens masked on every layer at every
    step), "end_tokens_attribute_free" (the end tokens from the prompt without its attribute words, ToMe's end-token
    substitution alone), "isolate_in_neutral_context" (``in_neutral_context``), "isolate_alone"
    (``leakfix.encoded_alone``, the paper's placement) or "record" (nothing changed; the run is controlled, so
    ``--attention`` records it)."""

    probe: str = ""

    @property
    def controlled(self) -> bool:
        return bool(self.probe) or super().controlled


@dataclass
class ShareRecorder(AttentionRecorder):
    """Keeps, per (layer tag, inside the window, token kind), the summed share of attention and the count of calls,
    instead of the maps (every layer at every step would not fit)."""

    kinds: dict[str, list[int]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    window: tuple[float, float] = LPAConfig().window
    scheduler: Any = None  # the step's timestep is read from its table (the fast path sets none without biases)
    sums: dict[tuple[str, bool, str], list[float]] = field(default_factory=dict)

    def add(self, step: int, name: str, probs: torch.Tensor) -> None:
        table = self.scheduler.timesteps
        timestep = float(table[min(step, len(table) - 1)])
        inside = self.window[0] <= timestep <= self.window[1]
        share = probs.float().mean(dim=(0, 1, 2))
        for kind, positions in self.kinds.items():
            entry = self.sums.setdefault((self.tags.get(name, "untagged"), inside, kind), [0.0, 0])
            entry[0] += float(share[positions].sum()) if positions else 0.0
            entry[1] += 1

    def shares(self) -> dict[str, dict[str, dict[str, float]]]:
        """{tag: {"window"|"outside": {kind: mean share}}}."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (tag, inside, kind), (total, count) in sorted(self.sums.items()):
            out.setdefault(tag, {}).setdefault("window" if inside else "outside", {})[kind] = round(total / count, 4)
        return out


def token_kinds(tokenizer: Any, parsed: Any) -> dict[str, list[int]]:
    """Key positions of the start token, the content words, the style words, the other words and the end tokens."""
    end = end_positions(tokenizer, parsed.text)
    content = span_positions(tokenizer, parsed.text, content_words(parsed))
    style = token_positions(tokenizer, parsed.text, parsed.style.start, parsed.style.end) if parsed.style else []
    other = [p for p in range(1, end[0]) if p not in content and p not in style]
    return {"start": [0], "content": content, "style": style, "other_words": other, "end": end}


class DiagnosticPipeline(ImagePipeline):
    """The served image pipeline; a ``DiagnosticRequest``'s probe is applied after the served controls are set up,
    and with ``record_shares`` on every controlled run keeps a ``ShareRecorder`` in ``recorded``."""

    record_shares = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[ShareRecorder] = []

    def prepare_controls(self, pipe: Any, arch: str, request: ImageRequest, parsed: Any, control: Any,
                         call: dict[str, Any], info: dict[str, Any]) -> Any:
        binding = super().prepare_controls(pipe, arch, request, parsed, control, call, info)
        probe = getattr(request, "probe", "")
        if probe == "end_tokens_off":
            control.biases.append(KeyBias(tokens=end_positions(pipe.tokenizer, parsed.text), label="probe: end off"))
        elif probe == "end_tokens_attribute_free":
            positive = call["prompt_embeds"]
            free = encode_positive(pipe, attribute_free_prompt(parsed), positive.shape[0]).to(positive.dtype)
            length = end_positions(pipe.tokenizer, parsed.text)[0] - 1
            call["prompt_embeds"] = end_token_substitution(positive, free, length)
        elif probe in ITEM_ENCODERS:
            call["prompt_embeds"] = isolate_items(pipe, parsed.text, controls.split_words(request.isolate),
                                                  call["prompt_embeds"], ITEM_ENCODERS[probe])[0]
        elif probe not in ("", "record"):
            raise ValueError(f"unknown probe {probe!r}")
        if probe:
            info.setdefault("controls", {})["probe"] = probe
        if self.record_shares:
            lpa = controls.ControlPlan.from_request(request).lpa or LPAConfig()
            recorder = ShareRecorder(kinds=token_kinds(pipe.tokenizer, parsed), tags=layer_tags(control.layers),
                                     window=lpa.window, scheduler=pipe.scheduler)
            control.recorders.append(recorder)
            self.recorded.append(recorder)
        return binding


def in_neutral_context(pipe: Any, text: str, span: Any, positions: list[int], batch: int) -> torch.Tensor:
    """The item's states written after the earlier words with their attributes taken out ("a circle and a" + "red
    star"): where Follow the Flow encodes the item alone, this keeps what the earlier words say about its place (a
    second object) and drops only their attributes. In a causal encoder the first item comes out as in the prompt."""
    prefix = attribute_free_prompt(parse_prompt(text), span.start)
    prefix += " " if prefix else ""
    context = prefix + span.text
    inside = token_positions(pipe.tokenizer, context, len(prefix), len(context))
    if len(inside) != len(positions):
        raise ValueError(f"{span.text!r} tokenizes differently after {prefix!r}")
    return encode_positive(pipe, context, batch)[:, inside]


ITEM_ENCODERS = {"isolate_in_neutral_context": in_neutral_context, "isolate_alone": encoded_alone}


def render(pipeline: ImagePipeline, jobs: list[effect.Job], args: argparse.Namespace, overrides: dict[str, Any],
           baseline: bool, control: str = "binding") -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(control paths, baseline paths or [], per-request stats) of ``jobs`` with the variant ``overrides``."""
    on, off, stats = [], [], []
    with config_variant(control, overrides):
        for job in jobs:
            compare = "controls off" if baseline else NO_COMPARISON
            fields = {**job.prompt.fields, **{k: v for k, v in overrides.items() if k in REQUEST_FIELDS}}
            paths, base, st = effect.serve(pipeline, effect.base_request(args, job.seed, job.batch, DiagnosticRequest,
                                                                         compare=compare, **fields))
            on += paths
            off += base
            stats.append(st)
    return on, off, stats


def scores(paths: list[str], truths: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [effect.unit_metrics(score_file(path, truth), False) for path, truth in zip(paths, truths)]


def leakage_by_object(paths: list[str], truths: list[dict[str, Any]]) -> list[float]:
    """Per asked object in prompt order, the share of units where it was drawn in the other object's colour. In a
    causal encoder the first object's words cannot have read the second's: its leak is not one the fix patches."""
    leaks = np.zeros(2)
    for path, truth in zip(paths, truths):
        wanted = truth["objects"]
        detections = [Detection(**d) for d in score_file(path, truth)["detections"]]
        colours = {o["colour"] for o in wanted}
        for i, j in match(wanted, detections)[0].items():
            leaks[i] += detections[j].colour != wanted[i]["colour"] and detections[j].colour in colours
    return [round(float(v), 3) for v in leaks / max(1, len(paths))]


def pixel_change(off_paths: list[str], on_paths: list[str]) -> dict[str, float]:
    """How much a variant moves the picture at all: the mean absolute pixel difference (0-255) from the baseline, and
    the share of units whose difference averages over one level."""
    changes = [float(np.abs(np.asarray(Image.open(a).convert("RGB"), np.float32)
                            - np.asarray(Image.open(b).convert("RGB"), np.float32)).mean())
               for a, b in zip(off_paths, on_paths)]
    moved = float(np.mean(np.array(changes) > 1))
    return {"mean_abs": round(float(np.mean(changes)), 3), "share_over_one_level": moved}


def variant_row(name: str, overrides: dict[str, Any], off: list[dict[str, float]], on: list[dict[str, float]],
                stats: list[dict[str, Any]], seconds: float, resamples: int,
                control: str = "binding") -> dict[str, Any]:
    """The paired comparison against the baseline and the validity kept; for binding also the composite tokens'
    norms (first and last logged) and the entropy refinement's evaluations per refined step and request."""
    metrics = {m: effect.paired(np.array([u[m] for u in off]), np.array([u[m] for u in on]), effect.BETTER[m],
                                resamples) for m in METRICS[control]}
    row = {"method": name, "overrides": overrides, "units": len(on), "metrics": metrics,
           "validity": effect.validity(off, on), "seconds": round(seconds, 1)}
    if control == "binding":
        norms = [list(trace) for st in stats for trace in st.get("binding_token_norm", {}).values()]
        row["token_norm_first_last"] = [[t[0], t[-1]] for t in norms if t]
        row["entropy_iterations_per_step"] = [n for st in stats for n in st.get("binding_entropy_iterations", [])]
    return row


def attention_row(pipeline: DiagnosticPipeline, args: argparse.Namespace, prompts: int, seeds: int) -> dict[str, Any]:
    """Attention shares of each token kind per LPA layer tag, for ``prompts`` LPA prompts x ``seeds`` seeds, with LPA
    off, served, and with ``causal_style`` (recording runs eagerly; the images are not scored)."""
    jobs = effect.plan("lpa", prompts * seeds, seeds, "")
    settings = {"off": ({"lpa": False, "probe": "record"}, {}), "served": ({}, {}),
                "causal_style": ({}, {"causal_style": True})}
    out: dict[str, Any] = {"method": "attention_shares", "prompts": prompts, "seeds": seeds}
    pipeline.record_shares = True
    try:
        for name, (fields, config) in settings.items():
            pipeline.recorded.clear()
            with config_variant("lpa", config):
                for job in jobs:
                    request = effect.base_request(args, job.seed, job.batch, DiagnosticRequest,
                                                  compare=NO_COMPARISON, **{**job.prompt.fields, **fields})
                    effect.serve(pipeline, request)
            out[name] = mean_shares([r.shares() for r in pipeline.recorded])
            out["layer_tags"] = pipeline.recorded[0].tags
    finally:
        pipeline.record_shares = False
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def encoder_row(pipe: Any, control: str) -> dict[str, Any]:
    """Where the text encoder puts what a control acts on (no image rendered), as relative changes ||a - b|| / ||b||
    of token vectors, averaged over the control's prompts. leakfix: each object phrase's vectors when encoded alone
    (what the fix patches in) and the end token when the two colours trade places (the pairing the scorer's leakage
    reads); lpa: the end token, the style word and the content words when the style word changes."""
    tokenizer, encode = pipe.tokenizer, lambda text: encode_positive(pipe, text, 1)[0].float()
    values: dict[str, list[float]] = {}
    with torch.no_grad():
        for text, alternative, spans in encoder_pairs(control):
            plain, other, end = encode(text), encode(alternative), end_positions(tokenizer, text)[0]
            for name, (start, stop) in spans.items():
                positions = token_positions(tokenizer, text, start, stop)
                alone = encode(text[start:stop])[1:1 + len(positions)] if control == "leakfix" else other[positions]
                values.setdefault(name, []).append(relative(alone, plain[positions]))
            values.setdefault("end_token", []).append(relative(other[end], plain[end]))
    return {"method": "encoder", "prompts": len(values["end_token"]),
            "relative_change": {k: round(float(np.mean(v)), 3) for k, v in values.items()}}


def encoder_pairs(control: str) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(prompt, its alternative, named character spans): leakfix's prompts with the colours traded (spans: the two
    object phrases); LPA's prompts with another style (spans: the content words before the style, the style word)."""
    out = []
    for prompt in effect.plan(control, 16, 1, ""):
        text = prompt.prompt.fields["prompt"]
        if control == "leakfix":
            (first, a), (second, b) = [(o["colour"], o["shape"]) for o in prompt.prompt.truth["objects"]]
            traded = text.replace(f"{first} {a}", f"{second} {a}").replace(f"{second} {b}", f"{first} {b}")
            phrases = (f"{first} {a}", f"{second} {b}")
            spans = [(text.index(phrase), text.index(phrase) + len(phrase)) for phrase in phrases]
            out.append((text, traded, {"item_0_alone": spans[0], "item_1_alone": spans[1]}))
        else:
            parsed = parse_prompt(text)
            style = parsed.style.text
            swap = effect.LPA_STYLES[(effect.LPA_STYLES.index(style) + 1) % len(effect.LPA_STYLES)]
            out.append((text, text.replace(f"in {style} style", f"in {swap} style"),
                        {"words_before_style": (0, parsed.style_phrase[0]),
                         "style_word": (parsed.style.start, parsed.style.end)}))
    return out


def mean_shares(runs: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """The mean over runs of ``ShareRecorder.shares`` (the same tags, windows and kinds in every run)."""
    first = runs[0]
    return {tag: {where: {kind: round(float(np.mean([r[tag][where][kind] for r in runs])), 4) for kind in kinds}
                  for where, kinds in windows.items()} for tag, windows in first.items()}


def sheet_indices(jobs: list[effect.Job], count: int) -> list[int]:
    """Up to ``count`` unit indices spread over the jobs' prompts (the first seeds of each)."""
    if not jobs:
        return []
    per = max(1, -(-count // len(jobs)))
    starts = np.cumsum([0] + [j.batch for j in jobs[:-1]])
    return [int(s) + k for s, j in zip(starts, jobs) for k in range(min(per, j.batch))][:count]


def parse(argv: list[str] | None, control: str | None = None) -> argparse.Namespace:
    """Arguments; ``control`` fixed (binding_ablation_v2) drops the ``--control`` option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if control is None:
        parser.add_argument("--control", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--variants", default="", help="comma-separated; default: every variant of the control")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--batch", type=int, default=effect.MAX_BATCH)
    parser.add_argument("--model", default=effect.MICROWORLD_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--scheduler", default="default")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--attention", action="store_true", help="also measure LPA's attention shares per layer tag")
    parser.add_argument("--encoder", action="store_true", help="also measure where the text encoder puts what the "
                                                               "control acts on (no rendering; --units 0: only this)")
    parser.add_argument("--attention-prompts", type=int, default=4)
    parser.add_argument("--attention-seeds", type=int, default=2)
    parser.add_argument("--images", default="")
    parser.add_argument("--sheet", help="contact sheet PNG: the baseline row, then one row per variant")
    parser.add_argument("--sheet-units", type=int, default=8)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    args.control = control or args.control
    args.images = args.images or f"outputs/{benchmark_name(args.control)}"
    return args


def benchmark_name(control: str) -> str:
    return "binding_ablation_v2" if control == "binding" else f"{control}_ablation_v2"


def main(argv: list[str] | None = None, control: str | None = None) -> dict[str, Any]:
    args = parse(argv, control)
    variants = VARIANTS[args.control]
    names = [n.strip() for n in (args.variants or ",".join(variants)).split(",") if n.strip()]
    if not names or any(n not in variants for n in names):
        raise SystemExit(f"--variants: one or more of {', '.join(variants)} (the first renders the baseline too)")
    pipeline = DiagnosticPipeline(ModelStore(device=torch.device(args.device)), "auto")
    jobs = effect.plan(args.control, args.units, args.batch, "")
    truths = [job.prompt.truth for job in jobs for _ in range(job.batch)]
    shown = sheet_indices(jobs, args.sheet_units)
    rows, units, sheet, off = [], [], [], []
    for name in names if jobs else []:
        os.environ["TOKENWORKS_OUTPUT_DIR"] = str((Path(args.images) / name).resolve())
        started = time.perf_counter()
        on_paths, off_paths, stats = render(pipeline, jobs, args, variants[name], not off, args.control)
        if not off:
            off = list(zip(off_paths, scores(off_paths, truths)))
            sheet.append(("controls off", [Image.open(off[i][0]) for i in shown]))
        on = scores(on_paths, truths)
        rows.append(variant_row(name, variants[name], [s for _, s in off], on, stats, time.perf_counter() - started,
                                args.bootstrap, args.control))
        rows[-1]["pixel_change"] = pixel_change([p for p, _ in off], on_paths)
        if args.control == "leakfix":
            rows[-1]["leakage_by_object"] = {"off": leakage_by_object([p for p, _ in off], truths),
                                             "on": leakage_by_object(on_paths, truths)}
        units += [{"variant": name, "seed": job.seed + k, "prompt": job.prompt.fields["prompt"],
                   "off": {"path": off[i][0], **off[i][1]}, "on": {"path": on_paths[i], **on[i]}}
                  for i, (job, k) in enumerate((j, k) for j in jobs for k in range(j.batch))]
        sheet.append((name, [Image.open(on_paths[i]) for i in shown]))
        shown_metrics = {m: [round(v, 3) for v in [row["difference"], *row["ci95"]]]
                         for m, row in rows[-1]["metrics"].items() if m in METRICS[args.control][:2]}
        print(json.dumps({"method": name, "seconds": rows[-1]["seconds"], **shown_metrics}), flush=True)
    if args.encoder:
        rows.append(encoder_row(pipeline.load(args.model).pipe, args.control))
    if args.attention:
        rows.append(attention_row(pipeline, args, args.attention_prompts, args.attention_seeds))
    if args.sheet and sheet:
        effect.contact_sheet(sheet, args.sheet)
    Path(args.images).mkdir(parents=True, exist_ok=True)
    (Path(args.images) / "units.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    settings = {**{k: v for k, v in vars(args).items() if k != "json"},
                "unit": "one (prompt, seed); every variant paired with the first variant's controls-off image"}
    report = benchmark_report(benchmark_name(args.control), str(pipeline.store.device),
                              pipeline.spec_for(args.model).name, settings, rows, argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
