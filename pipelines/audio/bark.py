"""Bark (transformers ``BarkModel``) driven stage by stage through the project's decode loop, streamed in chunks.

Bark is semantic AR (text -> semantic tokens) -> coarse AR (2 EnCodec codebooks, flattened, in sliding windows
of 60 tokens) -> fine (non-causal, the other 6 codebooks) -> EnCodec. The two AR stages run in
the decoding core's ``speculative_decode`` (plain, or lossless chain drafting), re-implementing the prompts and logits
processors of ``BarkSemanticModel.generate`` / ``BarkCoarseModel.generate`` (batch 1, no voice preset) so that
greedy decoding reproduces stock ``BarkModel.generate`` exactly. The coarse windows start as soon as the
semantic tokens they read exist, so the first audio does not wait for the whole semantic pass.

Streaming: the fine stage runs per chunk on the new coarse frames with the fine codes already played as its
history (Bark's own ``fine_prompt`` mechanism), then EnCodec decodes exactly at the seams
(``codec_stream.EncodecStream``). Bark's stock fine pass is bidirectional over up to 1024 frames, so streamed
fine codes differ from a one-shot fine pass; with streaming off the fine pass and the codec decode are Bark's
own, over everything at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generator, Iterator

import numpy as np
import torch
from transformers import AlternatingCodebooksLogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import BarkEosPrioritizerLogitsProcessor, SuppressTokensLogitsProcessor

from ..base import CancelToken, PipelineError, Progress
from ..decoding.drafters.prompt_lookup import PromptLookup
from ..decoding.plain import DecodeStats, SamplingConfig, make_generator
from ..decoding.verify import CausalLMForward, NoDraft, speculative_decode
from ..models import ModelStore, ResolvedModel
from ..streaming import Returning
from ..tiny import tiny_bark
from .codec_stream import EncodecStream
from .pcm import ChunkSchedule

# Original Bark sampling defaults (suno-ai/bark: text_temp=0.7, waveform_temp=0.7; fine_temp=0.5).
BARK_TEMPERATURE = 0.7
BARK_FINE_TEMPERATURE = 0.5


@dataclass
class BarkTTS:
    """A loaded Bark: the model (3 sub-models + EnCodec), its BERT tokenizer and its generation configs."""

    model: Any
    tokenizer: Any
    semantic: Any = field(init=False)
    coarse: Any = field(init=False)
    fine: Any = field(init=False)

    def __post_init__(self) -> None:
        from transformers.models.bark.generation_configuration_bark import (
            BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkSemanticGenerationConfig)

        config = self.model.generation_config
        self.semantic = BarkSemanticGenerationConfig(**as_dict(config.semantic_config))
        self.coarse = BarkCoarseGenerationConfig(**as_dict(config.coarse_acoustics_config))
        self.fine = BarkFineGenerationConfig(**as_dict(config.fine_acoustics_config))
        self.codebook_size = int(config.codebook_size)

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}

    @property
    def sample_rate(self) -> int:
        return int(self.model.codec_model.config.sampling_rate)

    @property
    def hop(self) -> int:
        return int(np.prod(self.model.codec_model.config.upsampling_ratios))

    @property
    def device(self) -> torch.device:
        return self.model.semantic.lm_head.weight.device


def load_bark(resolved: ResolvedModel, store: ModelStore) -> BarkTTS:
    """The ModelStore loader of every Bark spec (speech and the song tab's vocals share it): tiny random weights
    (``tiny.tiny_bark``), or ``BarkModel`` and its tokenizer from a resolved folder or Hub id."""
    if resolved.source == "tiny":
        tts = tiny_bark()
    else:
        from transformers import AutoTokenizer, BarkModel

        model = BarkModel.from_pretrained(resolved.location, dtype=store.dtype)
        tts = BarkTTS(model.eval(), AutoTokenizer.from_pretrained(resolved.location))
    tts.model.to(store.device)
    return tts


def as_dict(config: Any) -> dict:
    return config if isinstance(config, dict) else config.to_dict()


@dataclass
class BarkSettings:
    # the AR stages' sampling (greedy at temperature 0, then the fine stage takes argmax too); stage i draws with
    # seed + i (semantic 0, coarse 1, fine 2 + chunk)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=BARK_TEMPERATURE))
    drafting: bool = True
    stream: bool = True
    schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    max_semantic_tokens: int | None = None  # None = Bark's own limit (768)


@dataclass
class BarkOutput:
    """Everything a run produced, returned by ``synthesize_steps`` (codes = the fine codes that were decoded)."""

    semantic: list[int] = field(default_factory=list)
    coarse: list[int] = field(default_factory=list)
    codes: torch.Tensor | None = None
    semantic_stats: DecodeStats = field(default_factory=DecodeStats)
    coarse_stats: DecodeStats = field(default_factory=DecodeStats)
    chunks: int = 0


def text_ids(tts: BarkTTS, text: str) -> list[int]:
    limit = tts.semantic.max_input_semantic_length
    ids = tts.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > limit:
        raise PipelineError(f"Bark reads at most {limit} text tokens; this text has {len(ids)}. "
                            "Shorten it or split it into several generations.")
    if not ids:
        raise PipelineError("The text has no tokens Bark can read. Type some words.")
    return ids


def semantic_prompt(tts: BarkTTS, ids: list[int]) -> torch.Tensor:
    """The semantic model's prefill embeddings, as ``BarkSemanticModel.generate`` builds them (no voice preset)."""
    config, device = tts.semantic, tts.device
    length = config.max_input_semantic_length
    text = torch.full((1, length), config.text_pad_token, dtype=torch.long, device=device)
    text[0, :len(ids)] = torch.tensor(ids, device=device) + config.text_encoding_offset
    history = torch.full((1, length), config.semantic_pad_token, dtype=torch.long, device=device)
    infer = torch.tensor([[config.semantic_infer_token]], device=device)
    embed = tts.model.semantic.input_embeds_layer
    return torch.cat([embed(text) + embed(history), embed(infer)], dim=1)


def semantic_processors(tts: BarkTTS, device: torch.device) -> LogitsProcessorList:
    config = tts.semantic
    vocab = tts.model.semantic.config.output_vocab_size
    suppress = [*range(config.semantic_vocab_size, config.semantic_pad_token),
                *range(config.semantic_pad_token + 1, vocab)]
    return LogitsProcessorList([
        SuppressTokensLogitsProcessor(suppress, device=device),
        BarkEosPrioritizerLogitsProcessor(eos_token_id=config.eos_token_id, min_eos_p=config.min_eos_p,
                                          device=device),
    ])


def coarse_length(tts: BarkTTS, semantic_count: int) -> int:
    """How many coarse tokens Bark generates for ``semantic_count`` semantic tokens (its own float arithmetic)."""
    ratio = semantic_to_coarse_ratio(tts)
    n = tts.coarse.n_coarse_codebooks
    frames = torch.floor(torch.tensor([semantic_count]) * ratio / n)
    return int(torch.round(frames * n).int().item())


def semantic_to_coarse_ratio(tts: BarkTTS) -> float:
    return tts.coarse.coarse_rate_hz / tts.semantic.semantic_rate_hz * tts.coarse.n_coarse_codebooks


class SemanticStream:
    """Semantic tokens produced lazily, so the coarse windows can start as soon as their input exists."""

    def __init__(self, tts: BarkTTS, ids: list[int], settings: BarkSettings, drafter, cancel: CancelToken | None,
                 stats: DecodeStats) -> None:
        config = settings.sampling
        self.limit = settings.max_semantic_tokens or tts.semantic.max_new_tokens
        self.eos = tts.semantic.eos_token_id
        self.tokens: list[int] = []
        self.finished = False
        # the prompt is summed text and history embeddings, so it is a prefill; no id history to search
        self._runs = speculative_decode(
            tts.model.semantic, torch.zeros((1, 0), dtype=torch.long), self.limit, config, {self.eos}, drafter,
            cancel, stats, chain_forward(tts.model.semantic), prefill={"inputs_embeds": semantic_prompt(tts, ids)},
            processors=semantic_processors(tts, tts.device), generator=stage_generator(config, tts.device, 0))

    @property
    def speech_tokens(self) -> int:
        return len(self.tokens) - (1 if self.tokens and self.tokens[-1] == self.eos else 0)

    def pull(self, until: int) -> Iterator[list[int]]:
        """Decode until ``until`` tokens exist or EOS, yielding each forward's committed run."""
        while not self.finished and len(self.tokens) < until:
            run = next(self._runs, None)
            if run is None:
                self.finished = True
                return
            self.tokens.extend(run)
            self.finished = self.tokens[-1] == self.eos
            yield run


def stage_generator(config: SamplingConfig, device: torch.device, stage: int) -> torch.Generator | None:
    """One generator per AR stage (seed + stage), so drafting cannot reorder draws between stages."""
    return make_generator(replace(config, seed=config.seed + stage), device)


def coarse_tokens(tts: BarkTTS, semantic: SemanticStream, settings: BarkSettings, drafter,
                  cancel: CancelToken | None, stats: DecodeStats) -> Iterator[tuple[str, list[int]]]:
    """Bark's sliding-window coarse generation; yields ``(stage, run)`` per forward of either AR stage: the
    semantic runs it pulls and the coarse ids (with Bark's codebook offsets) it commits."""
    sc, cc = tts.semantic, tts.coarse
    ratio = semantic_to_coarse_ratio(tts)
    max_semantic_history = int(np.floor(cc.max_coarse_history / ratio))
    config = settings.sampling
    generator = stage_generator(config, tts.device, 1)
    forward = chain_forward(tts.model.coarse_acoustics)
    produced: list[int] = []
    while True:
        semantic_idx = int(round(len(produced) / ratio))
        start = max(0, semantic_idx - max_semantic_history)
        window_end = start + cc.max_coarse_input_length
        full_window = len(produced) + cc.sliding_window_len
        # Wait for the semantic tokens this window reads, and until the window's length is certain.
        while not semantic.finished and (len(semantic.tokens) < window_end
                                         or coarse_length(tts, semantic.speech_tokens) < full_window):
            for run in semantic.pull(max(window_end, len(semantic.tokens) + 1)):
                yield "semantic", run
        total = coarse_length(tts, semantic.speech_tokens) if semantic.finished else full_window
        if len(produced) >= total:
            return
        window = [cc.coarse_semantic_pad_token if t == sc.semantic_pad_token else t
                  for t in semantic.tokens[start:window_end]]
        window += [cc.coarse_semantic_pad_token] * (cc.max_coarse_input_length - len(window))
        prompt = window + [cc.coarse_infer_token] + produced[-cc.max_coarse_history:]
        processors = LogitsProcessorList([
            AlternatingCodebooksLogitsProcessor(len(prompt), sc.semantic_vocab_size, tts.codebook_size)])
        new = min(cc.sliding_window_len, total - len(produced))
        for run in speculative_decode(tts.model.coarse_acoustics, torch.tensor([prompt], device=tts.device), new,
                                      config, set(), drafter, cancel, stats, forward,
                                      processors=processors, generator=generator):
            produced.extend(run)
            yield "coarse", run


def new_drafter(settings: BarkSettings) -> PromptLookup | NoDraft:
    """Prompt lookup over each stage's token history (its prompt holds the coarse history Bark feeds back)."""
    return PromptLookup() if settings.drafting else NoDraft()


def chain_forward(model) -> CausalLMForward:
    """Bark's attention applies its own causal mask (``BarkSelfAttention.bias``, bottom-right aligned) and has
    no 4D-mask contract for trees, so drafts are verified as one chain under that mask; audio tokens repeat in
    silences and held vowels, which is what prompt lookup finds."""
    return CausalLMForward(model, tree_attention=False)


def fine_codes(tts: BarkTTS, coarse: list[int], history: torch.Tensor | None, settings: BarkSettings,
               chunk: int) -> torch.Tensor:
    """Bark's fine stage on ``coarse`` (flat ids), with earlier fine codes [8, n] as its history; -> [1, 8, frames]."""
    greedy = settings.sampling.greedy
    prompt = None if history is None else {"fine_prompt": history[:, -tts.fine.max_fine_history_length:]}
    with torch.random.fork_rng(devices=[tts.device] if tts.device.type == "cuda" else []):
        torch.manual_seed(settings.sampling.seed + 2 + chunk)
        return tts.model.fine_acoustics.generate(
            torch.tensor([coarse], device=tts.device), semantic_generation_config=tts.semantic,
            coarse_generation_config=tts.coarse, fine_generation_config=tts.fine, codebook_size=tts.codebook_size,
            history_prompt=prompt, temperature=None if greedy else BARK_FINE_TEMPERATURE)


def codec_decode(tts: BarkTTS, codes: torch.Tensor) -> np.ndarray:
    """EnCodec waveform of fine codes [1, 8, frames] (Bark's own ``codec_decode``), float32 on the CPU."""
    return tts.model.codec_decode(codes)[0].detach().float().cpu().numpy()


def synthesize(tts: BarkTTS, text: str, settings: BarkSettings) -> Generator[np.ndarray, None, BarkOutput]:
    """Yield waveform chunks (float32, ``tts.sample_rate``) as they become ready; return the run's BarkOutput."""
    steps = Returning(synthesize_steps(tts, text, settings))
    yield from (item for item in steps if isinstance(item, np.ndarray))
    return steps.value


@torch.inference_mode()
def synthesize_steps(tts: BarkTTS, text: str, settings: BarkSettings,
                     cancel: CancelToken | None = None) -> Generator[np.ndarray | Progress, None, BarkOutput]:
    """``synthesize`` plus a Progress after every AR forward, so a consumer can stop between model steps."""
    output = BarkOutput()
    semantic = SemanticStream(tts, text_ids(tts, text), settings, new_drafter(settings), cancel,
                              output.semantic_stats)
    max_coarse = coarse_length(tts, semantic.limit)
    n_coarse = tts.coarse.n_coarse_codebooks
    decoder = EncodecStream(tts.model.codec_model)
    fine: torch.Tensor | None = None
    next_end = settings.schedule.size(0)

    def flush(frames: int, final: bool) -> np.ndarray:
        nonlocal fine, next_end
        done = 0 if fine is None else fine.shape[-1]
        new = fine_codes(tts, output.coarse[done * n_coarse:frames * n_coarse], fine, settings, output.chunks)[0]
        fine = new if fine is None else torch.cat([fine, new], dim=-1)
        output.chunks += 1
        next_end = frames + settings.schedule.size(output.chunks)
        return decoder.push(fine[None], final=final)

    for stage, run in coarse_tokens(tts, semantic, settings, new_drafter(settings), cancel, output.coarse_stats):
        if stage == "semantic":
            yield Progress(len(semantic.tokens), semantic.limit, "semantic tokens")
            continue
        output.coarse.extend(run)
        yield Progress(len(output.coarse), max_coarse, "coarse tokens")
        frames = len(output.coarse) // n_coarse
        if settings.stream and frames >= next_end:
            yield flush(frames, final=False)
    output.semantic = list(semantic.tokens)
    frames = len(output.coarse) // n_coarse
    if frames == 0:  # the semantic stage's first token was EOS: Bark chose silence for this text and seed
        raise PipelineError("Bark ended before producing any audio for this text. Try another seed (with a "
                            "temperature above 0: greedy decoding ignores the seed) or a longer text.")
    if settings.stream:
        done = 0 if fine is None else fine.shape[-1]
        yield flush(frames, final=True) if frames > done else decoder.push(fine[None], final=True)
    else:
        fine = fine_codes(tts, output.coarse, None, settings, 0)[0]
        output.chunks = 1
        yield codec_decode(tts, fine[None])
    output.codes = fine[None]
    return output
