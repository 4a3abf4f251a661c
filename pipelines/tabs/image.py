"""Image tab pipeline: diffusers SD1.5 / SDXL with live previews, Stop, A/B and the token-level controls.

With every control off the diffusers pipeline is called exactly as a user of diffusers would (prompt strings,
generators), so its output is the stock output bit for bit. Controls compose on one ``AttentionControl``
(LPA biases, heatmap and binding recorders) and on the positive ``prompt_embeds`` (leakage fix, ToMe).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Generator, Iterator

import torch

from ..base import (NO_COMPARISON, Event, Partial, Pipeline, Progress, Request, Result, require_choice, require_range,
                    require_text, resolve_seed, same_seed_ab)
from ..diffusion.attention import AttentionControl
from ..diffusion.binding import BindingConfig, SemanticBinding, grid_layers
from ..diffusion.compass import CompassEncoders
from ..diffusion.controls import check_window, encode_controlled, refine_embeds, split_words, start_binding
from ..diffusion.fast import FastUNet, choose_backend
from ..diffusion.heatmaps import heatmap_tokens, save_heatmaps
from ..diffusion.loop import step_callback
from ..diffusion.lpa import LPAConfig
from ..diffusion.models import (SCHEDULERS, LoadedImageModel, latent_size, load_image_model, request_sides,
                                scheduled_pipe)
from ..diffusion.preview import AsyncPreviews
from ..diffusion.prompts import ParsedPrompt, parse_prompt
from ..models import ModelSpec, ModelStore, keep_placement, peak_memory_mb, reset_peak_memory
from ..outputs import save_png
from ..presets import PresetModels
from ..streaming import stream_in_thread

DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
MAX_BATCH = 8
MAX_STEPS = 150
# The A side of a same-seed A/B: every control off (the stock pipeline); asked for without a control, there is none.
COMPARISONS = (NO_COMPARISON, "controls off")


@dataclass
class ImageRequest(Request):
    prompt: str = ""
    negative_prompt: str = ""
    model: str = ""
    steps: int = 30
    cfg: float = 7.5
    width: int = 0  # 0 = the model's native size
    height: int = 0
    scheduler: str = "default"
    batch_size: int = 1
    binding: bool = False  # ToMe semantic binding on the [bracketed] or automatically found groups
    ets_step: int = BindingConfig.ets_step  # end-token substitution step (-1 = off, as in the official config)
    lpa: bool = False  # Local Prompt Adaptation
    style: str = ""  # explicit style for LPA ("" = find "in X style" in the prompt)
    lpa_window: tuple[float, float] = LPAConfig.window  # the paper's best, late-only
    isolate: str = ""  # Follow-the-Flow leakage fix: comma-separated items re-encoded alone
    merge_ratio: float = 0.0  # token merging for speed (pipelines/diffusion/merging.py)
    compass: str = ""  # Compass Control objects as JSON: [{"name": "car", "angle": 90, "box": [x0, y0, x1, y1]}]
    compass_encoder: str = "phrase"  # "phrase" (training-free) or a folder with an official/trained encoder
    heatmap_words: str = ""  # comma-separated words whose cross-attention maps are overlaid
    compare: str = NO_COMPARISON  # "controls off": also render the same seed with every control off (A/B)
    preview_every: int = 1  # 0 = no live previews
    fast: bool = True  # captured UNet loop on CUDA (diffusion/fast.py); eager static path on CPU/ZeroGPU; False = stock

    @property
    def controlled(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate.strip() or self.merge_ratio > 0 or self.compass.strip())


class ImagePipeline(PresetModels, Pipeline):
    task = "image"
    request_type = ImageRequest
    preview_interval_s = 0.1  # live previews at most this often (AsyncPreviews)

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        super().__init__(store, preset)
        self.compass = CompassEncoders()

    def unlisted(self, name: str) -> ModelSpec:
        return ModelSpec(name, "sdxl" if "xl" in name.lower() else "sd15", hub_id=name)

    def load(self, name: str) -> LoadedImageModel:
        return self.store.load(self.spec_for(name), load_image_model)

    def validate(self, request: ImageRequest, spec: ModelSpec) -> None:
        require_text(request.prompt)
        require_range(request.steps, "Steps", 1, MAX_STEPS)
        require_range(request.ets_step, "End-token substitution step", -1, int(request.steps) - 1)
        require_range(request.cfg, "CFG scale", 0.0, 30.0)
        require_range(request.batch_size, "Batch size", 1, MAX_BATCH)
        require_range(request.merge_ratio, "Merge ratio", 0.0, 0.75)
        require_choice(request.compare, "comparison", COMPARISONS)
        require_choice(request.scheduler, "scheduler", SCHEDULERS)
        request_sides(request, spec, DEFAULT_SIZE.get(spec.kind, 512), 16, 2048)
        check_window(request.lpa_window)
        request.seed = resolve_seed(request.seed)

    def generate(self, request: ImageRequest) -> Iterator[Event]:
        spec = self.spec_for(request.model)
        self.validate(request, spec)
        yield Progress(0, int(request.steps), "loading model")
        model = self.load(request.model)
        parsed = parse_prompt(request.prompt, request.style)
        side = partial(self.side, model, request, parsed)
        ab = request.compare != NO_COMPARISON and request.controlled
        render_a = partial(side, "baseline", False) if ab else None
        render_b = partial(side, "controlled" if request.controlled else "image", request.controlled)
        with keep_placement(model.pipe, spec.name):
            result = yield from same_seed_ab(render_a, render_b, request.compare)
        yield result

    def side(self, model: LoadedImageModel, request: ImageRequest, parsed: ParsedPrompt, variant: str,
             controlled: bool) -> Generator[Event, None, Result]:
        """One side of the request on a worker thread, as its Result (the baseline's without the parameters)."""
        outcome = yield from stream_in_thread(
            lambda emit: self.render(model, request, parsed, controlled, variant, emit), request.cancel)
        metadata = {"heatmaps": outcome["heatmaps"], "controls": outcome["controls"]}
        if variant == "baseline":
            return Result(outcome["paths"], outcome["stats"], metadata)
        stats = {"model": self.spec_for(request.model).name, "seed": request.seed, **outcome["stats"]}
        return Result(outcome["paths"], stats, {"parameters": request.parameters(), **metadata})

    def render(self, model: LoadedImageModel, request: ImageRequest, parsed: ParsedPrompt, controlled: bool,
               variant: str, emit: Callable[[Event], None]) -> dict[str, Any]:
        """One full generation (baseline or controlled), run on a worker thread; events go through ``emit``."""
        pipe = scheduled_pipe(model, request.scheduler)
        batch = int(request.batch_size)
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(batch)]
        call: dict[str, Any] = dict(num_inference_steps=int(request.steps), guidance_scale=float(request.cfg),
                                    height=request.height, width=request.width, num_images_per_prompt=batch,
                                    generator=generators, output_type="pil")
        control = AttentionControl(pipe.unet)
        info: dict[str, Any] = {}
        compass = controlled and bool(request.compass.strip())
        if compass:
            parsed = parse_prompt(self.compass.apply(pipe, request, parsed.text, control, info), request.style)
        self.compass.switch_lora(pipe.unet, request.compass_encoder if compass else None)
        heat_tokens = heatmap_tokens(pipe.tokenizer, parsed.text, split_words(request.heatmap_words))
        heat_recorder = (control.record(tokens=[p for _, ps in heat_tokens for p in ps],
                                        layers=grid_layers(pipe.unet, latent_size(pipe, request)))
                         if heat_tokens else None)
        binding = None
        if controlled:
            binding = self.prepare_controls(pipe, model.arch, request, parsed, control, call, info)
        else:
            call.update(prompt=parsed.text, negative_prompt=request.negative_prompt or None)
        reset_peak_memory(pipe._execution_device)
        images, stats = self.denoise(model, pipe, request, call, control, binding, controlled, variant, emit)
        request.cancel.raise_if_cancelled()
        paths = [str(save_png(image, {**request.parameters(), "seed": request.seed + i, "variant": variant,
                                      "prompt_used": parsed.text, "model": self.spec_for(request.model).name,
                                      "controls": info.get("controls", {})}))
                 for i, image in enumerate(images)]
        heatmaps = save_heatmaps(images, heat_recorder, heat_tokens, request.parameters(), request.seed, variant)
        return {"paths": paths, "heatmaps": heatmaps, "stats": stats, "controls": info.get("controls", {})}

    def denoise(self, model: LoadedImageModel, pipe: Any, request: ImageRequest, call: dict[str, Any],
                control: AttentionControl, binding: SemanticBinding | None, controlled: bool, variant: str,
                emit: Callable[[Event], None]) -> tuple[list[Any], dict[str, Any]]:
        """The stock diffusers call with the fast path, token merging and ToMe's refinement; its images and stats."""
        device, steps = pipe._execution_device, int(request.steps)
        backend = choose_backend(device, request.fast, pipe.unet)
        merge = None
        if controlled and request.merge_ratio > 0:
            from ..diffusion.merging import apply_merging, merge_settings

            merge = apply_merging(pipe.unet, float(request.merge_ratio), seed=request.seed,
                                  **merge_settings(model.arch, backend, device))
        fast = FastUNet(pipe.unet, backend, control, lambda: pipe.scheduler.timesteps)
        if binding is not None and backend != "off":
            binding.runner = fast  # the refinement's UNet work on the fast path too (captured forward+backward)
        on_latents = self.previews(model, pipe, request, "A" if variant == "baseline" else "", emit)
        call.update(callback_on_step_end=step_callback(steps, request.cancel, emit, fast,
                                                       refine_embeds(pipe, binding) if binding else None, control,
                                                       on_latents),
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"] if binding else ["latents"])
        tokens_merged = 0
        start = time.perf_counter()
        try:
            with control, fast:
                if binding is not None:
                    start_binding(pipe, binding, call, call["generator"])
                images = pipe(**call).images
        finally:
            if merge is not None:
                from ..diffusion.merging import merging_stats, remove_merging

                tokens_merged = merging_stats(pipe.unet)["tokens_merged"]
                remove_merging(pipe.unet)
        elapsed = time.perf_counter() - start
        stats = {"time_s": round(elapsed, 4), "steps_per_s": round(steps / elapsed, 3) if elapsed > 0 else 0.0,
                 "peak_memory_mb": peak_memory_mb(device), "images": len(images), "tokens_merged": int(tokens_merged),
                 "biased_attention_calls": len(control.applied), **fast.stats()}
        return images, {**stats, **(binding_stats(binding) if binding is not None else {})}

    def previews(self, model: LoadedImageModel, pipe: Any, request: ImageRequest, side: str,
                 emit: Callable[[Event], None]) -> Callable[[int, torch.Tensor], None] | None:
        """Live previews of every ``preview_every``-th step's latents, decoded off the loop (AsyncPreviews)."""
        every, steps = int(request.preview_every), int(request.steps)
        if every <= 0:
            return None
        previews = AsyncPreviews(model.preview_map, upscale=pipe.vae_scale_factor, interval=self.preview_interval_s)

        def on_latents(step: int, latents: torch.Tensor) -> None:
            if step % every == 0 and step < steps:
                previews.add(latents)
                if (ready := previews.ready()) is not None:
                    emit(Partial(ready, side=side))

        return on_latents

    def prepare_controls(self, pipe: Any, arch: str, request: ImageRequest, parsed: ParsedPrompt,
                         control: AttentionControl, call: dict[str, Any],
                         info: dict[str, Any]) -> SemanticBinding | None:
        """Encode the prompt ourselves and apply the embedding-level controls; set up the attention-level ones
        (diffusion/controls.py). A method so a benchmark can add its own controls after the served ones."""
        return encode_controlled(pipe, arch, request, parsed, control, call, info, latent_size(pipe, request))


def binding_stats(binding: SemanticBinding) -> dict[str, Any]:
    """What ToMe's refinement did in one image run."""
    return {"binding_groups": len(binding.groups), "binding_refinement_iterations": len(binding.history),
            "binding_unet_forwards": binding.passes["forward"], "binding_unet_backwards": binding.passes["backward"],
            **binding.summary()}
