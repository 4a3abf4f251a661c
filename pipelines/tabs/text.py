"""Text tab: chat with a causal LM, streamed token by token, with live decoding stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from ..base import (NO_COMPARISON, Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_choice,
                    require_range, require_text, resolve_seed, side_of_ab, with_baseline)
from ..decoding import device_loop
from ..decoding.causal_lm import CausalLM, eos_token_ids, load_causal_lm
from ..decoding.methods import TRAINED_STATS, build_drafter, require_method
from ..decoding.plain import DecodeStats, SamplingConfig, plain_decode
from ..decoding.reply import Reply, StopStrings, run_texts
from ..decoding.serving import exact_forward, fast_forward, first_request_note
from ..decoding.static import StaticForward
from ..decoding.verify import Drafter, speculative_decode
from ..models import ModelSpec, settle_heap
from ..outputs import save_text
from ..presets import PresetModels

MAX_NEW_TOKENS_LIMIT = 4096
TOP_K_LIMIT = 1000
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 64
COMPARISONS = (NO_COMPARISON, "vanilla")  # the A side of a same-seed A/B: the request decoded with method vanilla
# Under `auto`, the default draft for a target: a smaller model that shares its tokenizer.
DEFAULT_DRAFTS = {
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "SmolLM2-135M-Instruct (packaged)",
}


@dataclass
class TextRequest(Request):
    prompt: str = ""
    system: str = ""
    model: str = ""  # a model name from the preset, a Hub id or a local folder; "" = the tab default
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    method: str = "vanilla"  # one of DECODING_METHODS
    draft_model: str = ""  # for method "draft_model": a model name, Hub id or folder; "" = the default pair
    tree_profile: str = "auto"  # tree size from the measured step cost ("auto"/"cpu") or the H200 curve ("gpu")
    top_k: int = 0  # sample among the k likeliest tokens only (0 = off)
    repetition_penalty: float = 1.0  # generate's repetition_penalty over prompt and output (1 = off)
    stop_strings: list[str] = field(default_factory=list)  # the output ends at the first one (generate's stop_strings)
    compare: str = NO_COMPARISON  # "vanilla": decode with vanilla first, same seed (A/B; see COMPARISONS)
    exact: bool = False  # exact mode: every method's greedy output bit-identical to plain decoding in it (slower)


class TextPipeline(PresetModels, Pipeline):
    task = "text"
    request_type = TextRequest

    def unlisted(self, name: str) -> ModelSpec:
        return ModelSpec(name, "causal-lm", hub_id=name)

    def load(self, name: str) -> CausalLM:
        spec = self.spec_for(name)
        lm = self.store.load(spec, load_causal_lm)
        lm.state.load_trained(spec.hub_id or "")
        return lm

    def encode_prompt(self, lm: CausalLM, request: TextRequest) -> torch.Tensor:
        tokenizer = lm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": request.system}] if request.system.strip() else []
            messages.append({"role": "user", "content": request.prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        else:
            ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        ids = list(ids)
        limit = getattr(lm.model.config, "max_position_embeddings", None)
        if limit and len(ids) + int(request.max_new_tokens) > limit:
            raise PipelineError(
                f"The prompt is {len(ids)} tokens and {int(request.max_new_tokens)} new tokens were asked for, "
                f"but this model's context is {limit} tokens. Shorten the prompt or lower max new tokens."
            )
        return torch.tensor([ids], device=lm.model.device)

    def validate(self, request: TextRequest) -> SamplingConfig:
        require_text(request.prompt)
        require_range(request.max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS_LIMIT)
        require_method(request.method)
        temperature = require_range(request.temperature, "Temperature", 0.0, 5.0)
        top_p = require_range(request.top_p, "Top-p", 0.01, 1.0)
        top_k = int(require_range(request.top_k, "Top-k", 0, TOP_K_LIMIT))
        require_range(request.repetition_penalty, "Repetition penalty", 0.5, 3.0)
        request.stop_strings = [text for text in (request.stop_strings or []) if text]
        if len(request.stop_strings) > MAX_STOP_STRINGS or any(len(t) > MAX_STOP_CHARS for t in request.stop_strings):
            raise PipelineError(f"Up to {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each.")
        request.seed = resolve_seed(request.seed)
        return SamplingConfig(temperature=temperature, top_p=top_p, seed=request.seed, top_k=top_k)

    def generate(self, request: TextRequest) -> Iterator[Event]:
        if request.compare != NO_COMPARISON:
            yield from self.generate_ab(request)
            return
        config = self.validate(request)
        yield Progress(0, int(request.max_new_tokens), "loading model")
        lm = self.load(request.model)
        input_ids = self.encode_prompt(lm, request)
        stats = DecodeStats(top_logits=[])
        tokenizer = lm.tokenizer
        reply = Reply(tokenizer, eos_token_ids(lm.model, tokenizer), StopStrings(tokenizer, request.stop_strings))
        start = time.perf_counter()
        first_token_s = None
        with lm.lock:
            total = int(input_ids.shape[1]) + int(request.max_new_tokens)
            forward = exact_forward(lm, total) if request.exact else fast_forward(lm, total)
            warmed = forward.warmup_s if forward is not None else 0.0
            if forward is not None and forward.capture and not forward.graphs:
                yield Progress(0, int(request.max_new_tokens), first_request_note(forward))
            drafter = self.drafter(lm, request, forward)
            decoding = self.decode(lm, input_ids, request, config, reply.eos_ids, stats, forward, drafter)
            for run in decoding:
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                yield Partial(reply.add(run))
                yield Progress(len(reply.tokens), int(request.max_new_tokens))
                if reply.stops.matched is not None:
                    decoding.close()  # the drafter's request ends here, under the lock
                    break
        timing = {"time_s": time.perf_counter() - start, "first_token_s": first_token_s or 0.0,
                  "warmup_s": forward.warmup_s - warmed if forward is not None else 0.0}
        if timing["warmup_s"]:
            settle_heap()  # the compiled, captured steps live as long as the model
        yield self.result(request, lm, reply, stats, drafter, timing, int(input_ids.shape[1]))

    def result(self, request: TextRequest, lm: CausalLM, reply: Reply, stats: DecodeStats, drafter: Drafter | None,
               timing: dict[str, float], prompt_tokens: int) -> Result:
        """The finished request: the stats the UI and the API show (saved with the text, so it can be reproduced)
        and the per-token metadata the Compare view reads."""
        tokens, elapsed, text = reply.tokens, timing["time_s"], reply.text()
        result_stats = {
            "model": self.spec_for(request.model).name,
            "method": request.method,
            "device": lm.model.device.type,
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "exact": bool(request.exact),
            "tokens": len(tokens),
            "time_s": round(elapsed, 4),
            "tokens_per_s": round(len(tokens) / elapsed, 3) if elapsed > 0 else 0.0,
            "time_to_first_token_s": round(timing["first_token_s"], 4),
            **decoding_stats(stats),
            **TRAINED_STATS, **(drafter.trained_used() if drafter is not None else {}),
            "fast_path_warmup_s": round(timing["warmup_s"], 2),  # compile + capture in this request (counted in time_s)
            "seed": request.seed,
            "stopped_by": reply.stopped_by(),
            "stop_string": reply.stops.matched or "",
        }
        saved, sidecar = save_text(text, {**request.parameters(), **result_stats})
        metadata = {"token_ids": tokens, "run_ids": reply.runs, "runs": run_texts(text, reply.run_ends),
                    "top_logits": stats.top_two()[:len(tokens)],
                    "token_texts": lm.tokenizer.batch_decode([[token] for token in tokens]),
                    "prompt_tokens": prompt_tokens, "file": str(saved), "sidecar": str(sidecar)}
        return Result(text, result_stats, metadata)

    def generate_ab(self, request: TextRequest) -> Iterator[Event]:
        """Same-seed A/B: the request decoded with vanilla (A, Partials tagged "A"), then as set (B); B's Result
        carries A's, so a caller sees both texts, both speeds and whether B reproduced A's tokens."""
        require_choice(request.compare, "comparison", COMPARISONS)
        request.seed = resolve_seed(request.seed)  # both sides sample with one seed
        single = replace(request, compare=NO_COMPARISON)
        baseline = yield from side_of_ab(self.generate(replace(single, method="vanilla")))
        result = yield from side_of_ab(self.generate(single), side="")
        yield with_baseline(result, baseline, request.compare)

    def decode(self, lm: CausalLM, input_ids: torch.Tensor, request: TextRequest, config: SamplingConfig,
               eos_ids: set[int], stats: DecodeStats, forward: StaticForward | None,
               drafter: Drafter | None) -> Iterator[list[int]]:
        max_new = int(request.max_new_tokens)
        penalty = float(request.repetition_penalty)
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)]) if penalty != 1.0 else None
        if drafter is None:
            return plain_decode(lm.model, input_ids, max_new, config, eos_ids, request.cancel, stats, forward=forward,
                                processors=processors)
        if device_loop.supports(drafter, forward, config, processors):
            return device_loop.recycling_decode(forward, drafter, input_ids, max_new, eos_ids, request.cancel, stats)
        return speculative_decode(lm.model, input_ids, max_new, config, eos_ids, drafter, request.cancel, stats,
                                  forward=forward, processors=processors)

    def drafter(self, lm: CausalLM, request: TextRequest, forward: StaticForward | None = None) -> Drafter | None:
        """The method's drafter (``decoding.methods``), over the model's shared ``lm.state``; tree sizes follow the
        measured cost of a forward on this device, through ``forward`` (the fast path) when requests are served
        by it. None for plain decoding."""
        return build_drafter(self, lm, request, forward)

    def draft_name(self, request: TextRequest) -> str:
        if request.draft_model:
            return request.draft_model
        target = self.spec_for(request.model)
        if self.preset == "tiny":
            others = [spec.name for spec in self.specs if spec.name != target.name]
            return others[0] if others else target.name
        default = DEFAULT_DRAFTS.get(target.hub_id or "")
        if default is None:
            raise PipelineError(
                f"No default draft model is known for {target.name!r}. Pick a smaller model that uses the same "
                "tokenizer as the draft model (for example SmolLM2-135M for SmolLM2-1.7B)."
            )
        return default

    def load_draft(self, lm: CausalLM, request: TextRequest) -> CausalLM:
        draft = self.load(self.draft_name(request))
        if draft.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise PipelineError(
                f"The draft model {self.draft_name(request)!r} does not share the target's tokenizer, so its "
                "tokens cannot be verified. Pick a draft from the same model family."
            )
        return draft


def decoding_stats(stats: DecodeStats) -> dict[str, Any]:
    return {"forwards": stats.forwards, "tau": round(stats.tau, 4),
            "mean_accepted_drafts_per_forward": round(max(stats.tau - 1.0, 0.0), 4),
            "draft_share": round(stats.draft_share, 4)}
