"""Text tab: chat with a causal LM, streamed token by token, with live decoding stats."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from . import settings
from .base import (NO_COMPARISON, Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_range,
                   require_text, resolve_seed, side_of_ab, with_baseline)
from .decoding.divergence import first_divergence
from .decoding.draft_model import DraftModel
from .decoding.exact import EXACT_BLOCK, EXACT_ROWS, ExactForward
from .decoding.hardware import pick_tree_size
from .decoding.lookahead import LookaheadConfig, LookaheadTrie
from .decoding.plain import DecodeStats, SamplingConfig, plain_decode
from .decoding.prompt_lookup import PromptLookup
from .decoding.prompt_tokens import ParallelPromptDecoding
from .decoding.recurrent_drafter import RecurrentDrafting
from .decoding.sliding import UnsupportedAttention, attention_layout
from .decoding.state import DecodingState
from .decoding.static import BUCKETS, COMPILE_MODES, StaticForward, capture_supported
from .decoding.verify import Drafter, speculative_decode
from .models import ModelSpec, ModelStore, ResolvedModel, settle_heap
from .outputs import save_text
from .presets import PresetModels, models_for
from .tiny import tiny_causal_lm, tiny_tokenizer

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

    def parameters(self) -> dict[str, Any]:
        """Every field that reproduces this result (what its sidecar JSON records)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cancel"}


@dataclass
class CausalLM:
    model: Any
    tokenizer: Any
    fast_forward: StaticForward | None = None  # the GPU fast path's adapter, built on first use, lives with the model
    exact_forward: ExactForward | None = None  # exact mode's adapter, likewise
    state: DecodingState = field(init=False)  # what the drafters share across requests (decoding/state.py)
    # the drafters' state and the static cache are the model's shared state: one decode at a time
    # (a stopped request's worker thread finishes its current step before the next request may start)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state = DecodingState(self.model)

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}


def load_causal_lm(resolved: ResolvedModel, store: ModelStore) -> CausalLM:
    """Load tokenizer and model from wherever the store resolved them (or build a tiny one)."""
    if resolved.source == "tiny":
        family = resolved.spec.option("family", "llama")
        return CausalLM(tiny_causal_lm(family).to(store.device), tiny_tokenizer())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolved.location
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=store.dtype, attn_implementation="sdpa", trust_remote_code=False, use_safetensors=None
    )
    return CausalLM(model.to(store.device).eval(), tokenizer)


DrafterFactory = Callable[["TextPipeline", CausalLM, "TextRequest", "StaticForward | None"], Drafter]


@dataclass(frozen=True)
class Method:
    """A decoding method of the tab: its label and how a request gets its drafter (None: plain decoding)."""
    label: str
    drafter: DrafterFactory | None = None

    @property
    def short(self) -> str:
        return self.label.split(" (")[0]


def merged_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                   forward: StaticForward | None) -> Drafter:
    return lm.state.merged(lm.state.step_costs(request.tree_profile, forward))


def recurrent_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    pipeline.require_trained(lm.state.head, request, "draft head", "recurrent_training")
    return RecurrentDrafting(lm.state.head, lm.model, lm.state.step_costs(request.tree_profile, forward))


def ppd_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest, forward: StaticForward | None) -> Drafter:
    pipeline.require_trained(lm.state.prompts, request, "prompt tokens", "prompt_training")
    return ParallelPromptDecoding(lm.state.prompts, lm.state.step_costs(request.tree_profile, forward))


def recycling_nodes(lm: CausalLM, request: TextRequest, forward: StaticForward | None) -> int:
    """The tree size this device affords at the model's measured recycling acceptance."""
    return pick_tree_size(lm.state.recycler().acceptance_rates(), lm.state.step_costs(request.tree_profile, forward))


def recycling_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    recycler = lm.state.recycler()
    recycler.resize(recycling_nodes(lm, request, forward))
    return recycler


def lookahead_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    # alipay's 64-node budget, never more than this device affords
    nodes = min(LookaheadConfig.decoding_length, recycling_nodes(lm, request, forward))
    return LookaheadTrie(LookaheadConfig(decoding_length=nodes), lm.state.trie())


def draft_model_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                        forward: StaticForward | None) -> Drafter:
    return DraftModel(pipeline.load_draft(lm, request).model)


# The tab's decoding methods: a new one is its drafter's module plus one entry here.
DECODING_METHODS: dict[str, Method] = {
    "vanilla": Method("Vanilla (one token per forward)"),
    "merged": Method("Merged (prompt lookup + Lookahead + Token Recycling + a trained draft head or PPD prompt "
                     "tokens, in one tree)", merged_drafter),
    "redrafter": Method("Recurrent Drafter (trained draft head)", recurrent_drafter),
    "ppd": Method("Parallel Prompt Decoding (trained prompt tokens)", ppd_drafter),
    "recycling": Method("Token Recycling", recycling_drafter),
    "lookahead": Method("Lookahead (trie)", lookahead_drafter),
    "prompt_lookup": Method("Prompt lookup", lambda pipeline, lm, request, forward: PromptLookup()),
    "draft_model": Method("Draft model", draft_model_drafter),
}
METHODS = tuple(DECODING_METHODS)
METHOD_LABELS = {name: method.label for name, method in DECODING_METHODS.items()}
# which trained weights a request drafted with, in every result's stats (each drafter's ``trained_used``)
TRAINED_STATS = {"draft_head": False, "ppd_prompt_tokens": False}


class TextPipeline(PresetModels, Pipeline):
    task = "text"
    request_type = TextRequest

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        self.store = store
        self.preset = preset
        self.specs = models_for("text", preset)

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
        if request.method not in DECODING_METHODS:
            raise PipelineError(f"Unknown decoding method {request.method!r}. "
                                f"Choose one of: {', '.join(DECODING_METHODS)}.")
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
        eos_ids = eos_token_ids(lm)
        stats = DecodeStats(top_logits=[])
        tokens: list[int] = []
        runs: list[list[int]] = []
        run_ends: list[int] = []  # characters of the shown text after each run
        start = time.perf_counter()
        first_token_s = None
        stops = StopStrings(lm.tokenizer, request.stop_strings)
        with lm.lock:
            total = int(input_ids.shape[1]) + int(request.max_new_tokens)
            forward = exact_forward(lm, total) if request.exact else fast_forward(lm, total)
            warmed = forward.warmup_s if forward is not None else 0.0
            if forward is not None and forward.capture and not forward.graphs:
                yield Progress(0, int(request.max_new_tokens), first_request_note(forward))
            drafter = self.drafter(lm, request, forward)
            decoding = self.decode(lm, input_ids, request, config, eos_ids, stats, forward, drafter)
            for run in decoding:
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                run = stops.cut(tokens, run)
                tokens.extend(run)
                runs.append(run)
                text = stops.trim(lm.tokenizer.decode(strip_eos(tokens, eos_ids), skip_special_tokens=True))
                run_ends.append(len(text))
                yield Partial(text)
                yield Progress(len(tokens), int(request.max_new_tokens))
                if stops.matched is not None:
                    decoding.close()  # the drafter's request ends here, under the lock
                    break
        elapsed = time.perf_counter() - start
        text = stops.trim(lm.tokenizer.decode(strip_eos(tokens, eos_ids), skip_special_tokens=True))
        warmup_s = forward.warmup_s - warmed if forward is not None else 0.0
        if warmup_s:
            settle_heap()  # the compiled, captured steps live as long as the model
        result_stats = {
            "model": self.spec_for(request.model).name,
            "method": request.method,
            "device": lm.model.device.type,
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "exact": bool(request.exact),
            "tokens": len(tokens),
            "time_s": round(elapsed, 4),
            "tokens_per_s": round(len(tokens) / elapsed, 3) if elapsed > 0 else 0.0,
            "time_to_first_token_s": round(first_token_s or 0.0, 4),
            **decoding_stats(stats),
            **TRAINED_STATS, **(drafter.trained_used() if drafter is not None else {}),
            "fast_path_warmup_s": round(warmup_s, 2),  # compile + capture in this request (counted in time_s)
            "seed": request.seed,
            "stopped_by": stop_reason(stops, tokens, eos_ids),
            "stop_string": stops.matched or "",
        }
        saved, sidecar = save_text(text, {**request.parameters(), **result_stats})
        metadata = {"token_ids": tokens, "run_ids": runs, "runs": run_texts(text, run_ends),
                    "top_logits": stats.top_two()[:len(tokens)],
                    "token_texts": lm.tokenizer.batch_decode([[token] for token in tokens]),
                    "prompt_tokens": int(input_ids.shape[1]), "file": str(saved), "sidecar": str(sidecar)}
        yield Result(text, result_stats, metadata)

    def generate_ab(self, request: TextRequest) -> Iterator[Event]:
        """Same-seed A/B: the request decoded with vanilla (A, Partials tagged "A"), then as set (B); B's Result
        carries A's, so a caller sees both texts, both speeds and whether B reproduced A's tokens."""
        if request.compare not in COMPARISONS:
            raise PipelineError(f"Unknown comparison {request.compare!r}. Choose one of: {', '.join(COMPARISONS)}.")
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
        return speculative_decode(lm.model, input_ids, max_new, config, eos_ids, drafter, request.cancel, stats,
                                  forward=forward, processors=processors)

    def drafter(self, lm: CausalLM, request: TextRequest, forward: StaticForward | None = None) -> Drafter | None:
        """The method's drafter (``DECODING_METHODS``), over the model's shared ``lm.state``; tree sizes follow the
        measured cost of a forward on this device, through ``forward`` (the fast path) when requests are served
        by it. None for plain decoding."""
        if request.method not in DECODING_METHODS:
            raise PipelineError(f"Unknown decoding method {request.method!r}. "
                                f"Choose one of: {', '.join(DECODING_METHODS)}.")
        method = DECODING_METHODS[request.method]
        if method.drafter is None:
            return None
        try:
            attention_layout(lm.model)
        except UnsupportedAttention as error:
            raise PipelineError(f"{method.label} cannot decode {self.spec_for(request.model).name!r}: "
                                f"{error} Pick Vanilla for this model.") from error
        return method.drafter(self, lm, request, forward)

    def require_trained(self, weights: Any, request: TextRequest, what: str, command: str) -> None:
        """Stop with how to train them when ``weights`` (a trained drafter's) are missing for the model."""
        if weights is None:
            method = DECODING_METHODS[request.method].short
            raise PipelineError(
                f"No trained {what} for {self.spec_for(request.model).name!r}, so {method} cannot draft with it. "
                f"Train once on a GPU (python -m pipelines.decoding.{command} --model MODEL, which writes them where "
                "this tab looks) or pick another method.")

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


class StopStrings:
    """generate's ``stop_strings`` on a streamed output: the output ends with the token that completes the first
    stop string to appear in the decoded text; the text shown ends with the string itself. Only the tail that
    can hold a stop string is decoded after each token, so the check does not grow with the output."""

    def __init__(self, tokenizer, strings: list[str]) -> None:
        self.tokenizer, self.strings = tokenizer, list(strings)
        self.window = max((len(text) for text in self.strings), default=0) + 4  # tokens: >= 1 character each
        self.matched: str | None = None

    def cut(self, tokens: list[int], run: list[int]) -> list[int]:
        """``run`` up to the token that completes a stop string after ``tokens`` (all of it when none does)."""
        if not self.strings:
            return run
        for i in range(len(run)):
            tail = (tokens[-self.window:] + run[:i + 1])[-self.window:]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            self.matched = next((stop for stop in self.strings if stop in text), None)
            if self.matched is not None:
                return run[:i + 1]
        return run

    def trim(self, text: str) -> str:
        """The output text cut right after the matched stop string."""
        if self.matched is None or self.matched not in text:
            return text
        return text[:text.rindex(self.matched) + len(self.matched)]


def eos_token_ids(lm: CausalLM) -> set[int]:
    ids: set[int] = set()
    for source in (lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def first_request_note(forward) -> str:
    """The progress line while the first request compiles and captures the GPU step."""
    wait = COMPILE_WAIT.get(getattr(forward, "compile_mode", "off"), ")")
    return f"preparing the decode step for this GPU (first request only{wait}"


def decoding_stats(stats: DecodeStats) -> dict[str, Any]:
    return {"forwards": stats.forwards, "tau": round(stats.tau, 4),
            "mean_accepted_drafts_per_forward": round(max(stats.tau - 1.0, 0.0), 4),
            "draft_share": round(stats.draft_share, 4)}


def stop_reason(stops: StopStrings, tokens: list[int], eos_ids: set[int]) -> str:
    if stops.matched is not None:
        return "stop string"
    return "eos" if tokens and tokens[-1] in eos_ids else "max new tokens"


def run_texts(text: str, run_ends: list[int]) -> list[str]:
    """The shown text cut where each forward's accepted run ended (special tokens already stripped). Cutting
    the final text, not decoding each token alone, keeps characters split across tokens whole."""
    texts, start = [], 0
    for end in run_ends:
        end = min(max(end, start), len(text))
        texts.append(text[start:end])
        start = end
    if texts and start < len(text):
        texts[-1] += text[start:]
    return texts


def strip_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens


def compare_stats(vanilla: Result, method: Result) -> dict[str, Any]:
    """The A/B summary the Compare view shows: both runs' speed and τ, the speed-up, what one forward cost in
    each (a method is slower where its forwards cost more than τ repays), and whether the method reproduced
    vanilla's tokens exactly."""
    base, fast = vanilla.stats, method.stats
    base_ms, fast_ms = _ms_per_forward(base), _ms_per_forward(fast)
    return {
        "method": fast["method"],
        "device": fast.get("device", ""),
        "vanilla_tokens_per_s": base["tokens_per_s"],
        "method_tokens_per_s": fast["tokens_per_s"],
        "speedup": round(fast["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else 0.0,
        "vanilla_forwards": base["forwards"],
        "method_forwards": fast["forwards"],
        "vanilla_ms_per_forward": base_ms,
        "method_ms_per_forward": fast_ms,
        "forward_cost_ratio": round(fast_ms / base_ms, 3) if base_ms else 0.0,
        "tau": fast["tau"],
        "draft_share": fast["draft_share"],
        "draft_head": fast.get("draft_head", False),
        "identical": vanilla.metadata["token_ids"] == method.metadata["token_ids"],
        "divergence": divergence_report(vanilla, method),
        "exact": fast.get("exact", False),
        "dtype": fast.get("dtype", ""),
        "seed": fast["seed"],
    }


def divergence_report(vanilla: Result, method: Result) -> dict[str, Any] | None:
    """``decoding.divergence.first_divergence`` of the two runs with the tokens' texts; None when no token differs."""
    plain, drafted = vanilla.metadata, method.metadata
    divergence = first_divergence(plain["token_ids"], drafted["token_ids"], plain.get("top_logits", []),
                                  drafted.get("top_logits", []))
    if divergence is None:
        return None
    index = divergence.index
    return {**divergence.as_dict(), "plain_text": plain["token_texts"][index],
            "method_text": drafted["token_texts"][index]}


def _ms_per_forward(stats: dict[str, Any]) -> float:
    return round(1000 * stats["time_s"] / stats["forwards"], 3) if stats["forwards"] else 0.0


def fast_forward(lm: CausalLM, total_tokens: int) -> StaticForward | None:
    """The static-cache, CUDA-graph step (decoding/static.py) on CUDA; None (stock DynamicCache) elsewhere.

    ``TOKENWORKS_TEXT_FAST``: ``auto`` (default, CUDA only), ``1`` (also on the CPU, uncaptured), ``0`` (off).
    ``TOKENWORKS_TEXT_COMPILE``: ``auto`` (default: ``layers`` where graphs are captured, i.e. CUDA outside
    ZeroGPU), ``layers`` (inductor on the decoder layers' norms and MLPs, one graph per kind for all layers: seconds on the
    first request), ``dynamic`` (the whole step once for every bucket: 206 s on the first request for
    SmolLM2-135M on an H100, benchmarks/results/text_served_h100.json), ``off``/``0``."""
    mode = settings.text_fast()
    if mode == "0" or (mode == "auto" and lm.model.device.type != "cuda"):
        return None
    try:
        attention_layout(lm.model)
    except UnsupportedAttention:
        return None  # chunked or linear layers: the stock cache (vanilla only)
    needed = total_tokens + max(BUCKETS)
    stale = lm.fast_forward is not None and (lm.fast_forward.embed is None) != (lm.state.prompts is None)
    if lm.fast_forward is None or lm.fast_forward.max_cache_len < needed or stale:
        # with prompt tokens every method runs through the embedding that also maps them (real ids: the
        # model's own lookup, bit for bit), so one set of captured graphs serves every method
        embed = lm.state.prompts.embedding(lm.model) if lm.state.prompts is not None else None
        lm.fast_forward = StaticForward(lm.model, max_cache_len=max(4096, needed),
                                        compile=compile_mode(lm.model.device), embed=embed)
    return lm.fast_forward


def exact_forward(lm: CausalLM, total_tokens: int) -> ExactForward:
    """Exact mode's adapter (decoding/exact.py), on every device. Its cache length is a power of two fixed by
    the request's prompt + new tokens alone, so plain and drafted runs of one request share every shape."""
    try:
        attention_layout(lm.model)
    except UnsupportedAttention as error:
        raise PipelineError(f"Exact mode cannot decode this model: {error} Turn exact mode off.") from error
    length = 1 << (total_tokens + EXACT_BLOCK + EXACT_ROWS - 1).bit_length()  # room for a tree and padding
    stale = lm.exact_forward is not None and (lm.exact_forward.embed is None) != (lm.state.prompts is None)
    if lm.exact_forward is None or lm.exact_forward.max_cache_len != length or stale:
        embed = lm.state.prompts.embedding(lm.model) if lm.state.prompts is not None else None
        lm.exact_forward = ExactForward(lm.model, max_cache_len=length, embed=embed)
    return lm.exact_forward


# what the first request's progress line says about the wait (text_served_h100.json / _layers16_h100.json: 206 s
# for the whole step and 23.5 s for whole layers on an H100 for SmolLM2-135M; norms and MLPs compile in less)
COMPILE_WAIT = {"layers": "; compiling takes about half a minute)", "dynamic": "; compiling takes minutes)"}


def compile_mode(device: torch.device) -> str:
    """``TOKENWORKS_TEXT_COMPILE`` resolved for ``device`` (see ``fast_forward``)."""
    choice = settings.text_compile()
    if choice == "auto":
        return "layers" if capture_supported(device) else "off"
    if choice == "0":
        return "off"
    if choice not in COMPILE_MODES:
        raise PipelineError(f"TOKENWORKS_TEXT_COMPILE must be auto, 0 or one of {', '.join(COMPILE_MODES)}; "
                            f"got {choice!r}.")
    return choice

