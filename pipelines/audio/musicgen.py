"""MusicGen driven by Tokenworks' own decode loop: delay pattern, batched classifier-free guidance, a static
KV cache, lossless draft-and-verify of codebook columns, and streaming EnCodec decode.

MusicGen (Copet et al., 2023) predicts K EnCodec codebooks per step with the *delay pattern*: codebook k is
shifted right by k steps, so one forward emits one "column" of K tokens and a frame is complete K-1 steps
after its first codebook. transformers' ``generate`` for MusicGen allows only greedy/sampling and calls a
streamer once per run (reference video-audio.md §5.2, §5.4), so the step loop is written here.

Draft-and-verify works on whole columns and runs in the decoding core's one verifier
(``decoding.verify.speculative_decode``): each distinct column is interned to an id, prompt lookup over the ids
proposes the next few columns (music repeats), one forward scores them after the last committed column, and the
longest prefix the model itself would have chosen is kept, plus one bonus column. Chosen tokens are drawn
in the same order and with the same generator as plain decoding, so greedy output is identical and sampled
output follows the same distribution (the sample-and-follow rule for deterministic drafts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.modeling_outputs import BaseModelOutput

from ..base import CancelToken, Progress
from ..decoding.drafters.prompt_lookup import PromptLookup
from ..decoding.plain import DecodeStats, SamplingConfig, make_generator, process_logits
from ..decoding.tree import TokenTree
from ..decoding.verify import Drafter, NoDraft, speculative_decode
from ..models import ModelStore, ResolvedModel
from ..tiny import tiny_musicgen
from .codec_stream import EncodecStream
from .pcm import ChunkSchedule


@dataclass
class Musicgen:
    """A loaded MusicGen (text encoder, decoder, EnCodec) and its tokenizer."""

    model: Any
    tokenizer: Any

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}

    def geometry(self, duration_s: float) -> tuple[int, int, int]:
        """(sample rate, audio samples per EnCodec frame, frames to decode) for about ``duration_s`` seconds."""
        config = self.model.audio_encoder.config
        sample_rate, hop = int(config.sampling_rate), int(np.prod(config.upsampling_ratios))
        return sample_rate, hop, max(1, round(duration_s * (sample_rate / hop)))


def load_musicgen(resolved: ResolvedModel, store: ModelStore) -> Musicgen:
    """The ModelStore loader of the song tab's MusicGen specs: tiny random weights (``tiny.tiny_musicgen``), or
    the model (SDPA attention) and its tokenizer from a resolved folder or Hub id."""
    if resolved.source == "tiny":
        model, tokenizer = tiny_musicgen()
        return Musicgen(model.to(store.device), tokenizer)
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    model = MusicgenForConditionalGeneration.from_pretrained(resolved.location, dtype=store.dtype,
                                                             attn_implementation="sdpa")
    return Musicgen(model.to(store.device).eval(), tokenizer)


def revert_delay_pattern(delayed: torch.Tensor) -> torch.Tensor:
    """``[B, K, C]`` delayed columns (C >= K) -> the ``C - K`` frames that are complete in them."""
    num_codebooks, columns = delayed.shape[1], delayed.shape[2]
    frames = max(columns - num_codebooks, 0)
    return torch.stack([delayed[:, k, 1 + k:1 + k + frames] for k in range(num_codebooks)], dim=1)


def delay_pattern_pad_mask(num_codebooks: int, num_frames: int, device: torch.device | None = None) -> torch.Tensor:
    """``[K, T + K]`` bool: True where the delay pattern forces the pad token (start and end triangles)."""
    columns = torch.arange(num_frames + num_codebooks, device=device)[None, :]
    k = torch.arange(num_codebooks, device=device)[:, None]
    return (columns <= k) | (columns > num_frames + k)


@dataclass
class MusicgenConditioning:
    """Text-encoder states for the decoder's cross-attention; with CFG the unconditional half (zeros, mask 0,
    as in transformers' MusicGen) is stacked after the conditional one so both run in one batch."""

    encoder_hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    guided: bool


@torch.inference_mode()
def encode_text(model, tokenizer, texts: list[str], guidance_scale: float) -> MusicgenConditioning:
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    input_ids = inputs["input_ids"].to(model.device)
    mask = inputs["attention_mask"].to(model.device)
    states = model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    guided = guidance_scale > 1
    if guided:
        states = torch.cat([states, torch.zeros_like(states)])
        mask = torch.cat([mask, torch.zeros_like(mask)])
    return MusicgenConditioning(states, mask, guided)


def new_cache(model, max_columns: int, static: bool) -> EncoderDecoderCache:
    """Self-attention cache: a StaticCache sized for the whole song (preallocated, compile-friendly) or a
    DynamicCache; the cross-attention cache is filled once and never changes, so it stays dynamic."""
    config = model.decoder.config
    self_cache = StaticCache(config=config, max_cache_len=max_columns) if static else DynamicCache(config=config)
    return EncoderDecoderCache(self_cache, DynamicCache(config=config))


def rollback_cache(cache: EncoderDecoderCache, tokens: int) -> None:
    """Drop the last ``tokens`` self-attention positions. A static layer only moves its write pointer back:
    later writes overwrite the stale rows and the causal mask never reaches past the pointer."""
    if tokens <= 0:
        return
    for layer in cache.self_attention_cache.layers:
        if isinstance(layer, StaticLayer):
            if layer.is_initialized:
                layer.cumulative_length.sub_(tokens)
        else:
            layer.crop(-tokens)


def guided_logits(logits: torch.Tensor, num_codebooks: int, scale: float, guided: bool) -> torch.Tensor:
    """Decoder logits ``[(2)K, S, V]`` of one song -> guided ``[K, S, V]``: uncond + (cond - uncond) * scale."""
    logits = logits.float().reshape(-1, num_codebooks, *logits.shape[1:])
    if not guided:
        return logits[0]
    cond, uncond = logits[0], logits[1]
    return uncond + (cond - uncond) * scale


def choose_column(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``[K, V]`` guided logits -> ``[K]`` tokens: argmax, or one draw per codebook from the core's processed
    distribution (temperature, top-k, top-p) with ``generator``."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = process_logits(logits, sampling).exp()
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class ColumnVocabulary:
    """Every distinct delayed column ``[K]`` interned to one integer id: the token alphabet in which the core's
    verifier and drafters see MusicGen (music repeats whole columns, which prompt lookup then finds as ids)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, ...], int] = {}
        self.columns: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.columns)

    def id_of(self, column: Sequence[int]) -> int:
        key = tuple(int(token) for token in column)
        if key not in self._ids:
            self._ids[key] = len(self.columns)
            self.columns.append(key)
        return self._ids[key]

    def tensor(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """Column ids -> ``[K, len(ids)]`` codebook tokens."""
        return torch.tensor([self.columns[i] for i in ids], dtype=torch.long, device=device).T


class ColumnCache:
    """The MusicGen cache as the verifier handles it: ``crop(-n)`` drops the last n columns (a static layer moves
    its write pointer back, see ``rollback_cache``)."""

    def __init__(self, cache: EncoderDecoderCache) -> None:
        self.cache = cache

    def get_seq_length(self) -> int:
        return int(self.cache.get_seq_length())

    def crop(self, negative_length: int) -> None:
        rollback_cache(self.cache, -negative_length)


class ColumnForward:
    """The verifier's forward adapter for MusicGen: column ids in, guided logits ``[keep, K, V]`` out. Each id
    becomes its column, the batch is doubled for classifier-free guidance and the text states ride along as
    cross-attention input. Drafts are verified as chains: the decoder builds its own causal mask and positions
    from the cache length, and takes no 4D tree mask."""

    tree_attention = False
    embed = None
    record_hidden = False

    def fit(self, tree: TokenTree, before_root: int) -> TokenTree:
        """Chains are verified whole: this forward has no buckets to fit."""
        return tree

    def __init__(self, model, conditioning: MusicgenConditioning, vocabulary: ColumnVocabulary,
                 guidance_scale: float, max_columns: int, static_cache: bool) -> None:
        self.model, self.conditioning, self.vocabulary = model, conditioning, vocabulary
        self.guidance_scale, self.max_columns, self.static_cache = guidance_scale, max_columns, static_cache
        self.num_codebooks = model.decoder.config.num_codebooks
        self.device = conditioning.encoder_hidden_states.device
        self.drafted = 0  # draft columns scored (tree nodes below the root)

    def new_cache(self) -> ColumnCache:
        return ColumnCache(new_cache(self.model, self.max_columns, self.static_cache))

    def block_inputs(self, tree: TokenTree, before_root: int, past: int) -> tuple[None, None]:
        return None, None

    def __call__(self, ids: list[int], position_ids: None, mask: None, cache: ColumnCache,
                 keep: int | None = None) -> torch.Tensor:
        decoder_ids = self.vocabulary.tensor(ids, self.device)
        if self.conditioning.guided:
            decoder_ids = decoder_ids.repeat(2, 1)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.conditioning.encoder_hidden_states),
                         attention_mask=self.conditioning.attention_mask, decoder_input_ids=decoder_ids,
                         past_key_values=cache.cache, use_cache=True)
        logits = guided_logits(out.logits, self.num_codebooks, self.guidance_scale, self.conditioning.guided)
        keep = keep or len(ids)
        self.drafted += keep - 1
        return logits[:, -keep:].transpose(0, 1)


class ColumnChoice:
    """MusicGen's choice of a whole column, in the verifier's ``processors`` slot: at each verified node the
    guided logits ``[K, V]`` become a point mass on the id of the column the model picks there (``choose_column``,
    then the delay pattern's forced pads). The verifier runs greedy and follows that id, so drafted and plain
    decoding draw the same numbers from ``generator`` in the same order: greedy output is identical and sampled
    output follows the same distribution (sample at the node, follow the matching draft)."""

    def __init__(self, vocabulary: ColumnVocabulary, sampling: SamplingConfig, forced: torch.Tensor, pad: int,
                 generator: torch.Generator | None) -> None:
        self.vocabulary, self.sampling, self.forced, self.pad = vocabulary, sampling, forced, pad
        self.generator = generator

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``ids`` ``[1, n]``: the columns before this node (so this is column n); ``logits`` ``[1, K, V]``."""
        column = choose_column(logits[0], self.sampling, self.generator)
        column = torch.where(self.forced[:, ids.shape[-1]], self.pad, column)
        chosen = self.vocabulary.id_of(column.tolist())
        point_mass = torch.full((1, len(self.vocabulary)), float("-inf"), device=logits.device)
        point_mass[0, chosen] = 0.0
        return point_mass


def column_drafter() -> PromptLookup:
    """Prompt lookup over column ids: up to 6 columns that followed the latest match of the last 1-3 columns."""
    return PromptLookup(num_tokens=6, max_ngram=3)


@dataclass
class MusicgenDecodeStats(DecodeStats):
    drafted: int = 0
    static_cache: bool = True


def decode_columns(
    model,
    conditioning: MusicgenConditioning,
    num_frames: int,
    sampling: SamplingConfig,
    guidance_scale: float = 3.0,
    drafter: Drafter | None = None,
    static_cache: bool = True,
    cancel: CancelToken | None = None,
    stats: MusicgenDecodeStats | None = None,
    vocabulary: ColumnVocabulary | None = None,
) -> Iterator[torch.Tensor]:
    """Yield newly committed delayed columns ``[K, n]`` of one song until ``num_frames`` frames are complete.

    The core's ``speculative_decode`` runs the loop over column ids (``ColumnVocabulary``): ``drafter`` proposes
    ids (None: plain decoding, one column per forward), ``ColumnForward`` scores them after the last committed
    column and ``ColumnChoice`` picks the model's own column at each node; the verifier keeps the longest
    matching prefix plus one bonus column and rolls the cache back. MusicGen has no end token: it stops at the
    delay pattern's last column."""
    stats = stats if stats is not None else MusicgenDecodeStats()
    stats.static_cache = static_cache
    vocabulary = vocabulary if vocabulary is not None else ColumnVocabulary()
    decoder_config = model.decoder.config
    num_codebooks, pad = decoder_config.num_codebooks, decoder_config.pad_token_id
    device = conditioning.encoder_hidden_states.device
    total = num_frames + num_codebooks
    forward = ColumnForward(model, conditioning, vocabulary, guidance_scale, total, static_cache)
    choice = ColumnChoice(vocabulary, sampling, delay_pattern_pad_mask(num_codebooks, num_frames, device), pad,
                          make_generator(sampling, device))
    start = torch.tensor([[vocabulary.id_of([pad] * num_codebooks)]])
    for run in speculative_decode(model, start, total - 1, SamplingConfig(), set(), drafter or NoDraft(), cancel,
                                  stats, forward, processors=choice):
        stats.drafted = forward.drafted
        yield vocabulary.tensor(run, device)


@dataclass
class Accompaniment:
    """A decoded accompaniment track: what ``stream_accompaniment`` returns once its chunks are out."""

    audio: np.ndarray  # [samples] float32 at ``sample_rate``
    sample_rate: int
    codes: torch.Tensor  # [K, T]
    stats: MusicgenDecodeStats
    first_audio_s: float
    decode_s: float


@torch.inference_mode()
def stream_accompaniment(
    model,
    tokenizer,
    prompt: str,
    num_frames: int,
    sampling: SamplingConfig,
    guidance_scale: float = 3.0,
    draft: bool = True,
    static_cache: bool = True,
    cancel: CancelToken | None = None,
) -> Generator[np.ndarray | Progress, None, Accompaniment]:
    """Yield audio chunks (float32, mono) as the decode loop completes frames (ends: ``ChunkSchedule(first=25)``),
    and a Progress (complete frames) after every forward, so a consumer can stop between model steps; return the
    whole track (``yield from`` or ``streaming.Returning``). The concatenated chunks are the whole track."""
    started = time.perf_counter()
    conditioning = encode_text(model, tokenizer, [prompt], guidance_scale)
    stats = MusicgenDecodeStats()
    decoder = EncodecStream(model.audio_encoder)
    num_codebooks = model.decoder.config.num_codebooks
    ends = iter(ChunkSchedule(first=25).boundaries(num_frames))
    next_end = next(ends)
    chunks: list[np.ndarray] = []
    first_audio_s = 0.0
    delayed = [torch.full((num_codebooks, 1), model.decoder.config.pad_token_id, dtype=torch.long,
                          device=model.device)]
    for fresh in decode_columns(model, conditioning, num_frames, sampling, guidance_scale,
                                column_drafter() if draft else None, static_cache, cancel, stats):
        delayed.append(fresh)
        complete = sum(part.shape[-1] for part in delayed) - num_codebooks
        yield Progress(max(complete, 0), num_frames, "accompaniment")
        if next_end < num_frames and complete >= next_end + decoder.holdback_frames:
            chunk = decoder.push(revert_delay_pattern(torch.cat(delayed, dim=-1)[None])[0])
            next_end = next(ends)
            if chunk.size:
                first_audio_s = first_audio_s or time.perf_counter() - started
                chunks.append(chunk)
                yield chunk
    codes = revert_delay_pattern(torch.cat(delayed, dim=-1)[None])[0]
    chunk = decoder.push(codes, final=True)
    if chunk.size:
        first_audio_s = first_audio_s or time.perf_counter() - started
        chunks.append(chunk)
        yield chunk
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return Accompaniment(audio, int(model.audio_encoder.config.sampling_rate), codes, stats, first_audio_s,
                         time.perf_counter() - started)
