"""MusicGen driven by Tokenworks' own decode loop: delay pattern, batched classifier-free guidance, a static
KV cache, lossless draft-and-verify of codebook columns, and streaming EnCodec decode.

MusicGen (Copet et al., 2023) predicts K EnCodec codebooks per step with the *delay pattern*: codebook k is
shifted right by k steps, so one forward emits one "column" of K tokens and a frame is complete K-1 steps
after its first codebook. transformers' ``generate`` for MusicGen allows only greedy/sampling and calls a
streamer once per run (reference video-audio.md §5.2, §5.4), so the step loop is written here.

Draft-and-verify works on whole columns: a drafter proposes the next few columns (prompt lookup over the
columns decoded so far: music repeats), one forward scores them after the last committed column, and the
longest prefix the model itself would have chosen is kept, plus one bonus column. Chosen tokens are drawn
in the same order and with the same generator as plain decoding, so greedy output is identical and sampled
output follows the same distribution (the sample-and-follow rule for deterministic drafts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.modeling_outputs import BaseModelOutput

from .audio import ChunkSchedule
from .base import CancelToken, Progress
from .codec_stream import EncodecStream, randomize_codebooks
from .decoding.plain import DecodeStats
from .decoding.prompt_lookup import PromptLookup


@dataclass
class MusicgenSampling:
    """Greedy when ``temperature`` is 0. Defaults are MusicGen's (audiocraft / the Hub generation config):
    guidance 3.0, top-k 250, temperature 1."""

    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def build_delay_pattern(codes: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``[B, K, T]`` frames -> ``[B, K, T + K]`` delayed columns: column 0 is the start column (all pad) and
    codebook k of frame f sits at column ``f + 1 + k``; every other cell is pad (transformers' layout)."""
    batch, num_codebooks, frames = codes.shape
    delayed = torch.full((batch, num_codebooks, frames + num_codebooks), pad_id, dtype=codes.dtype,
                         device=codes.device)
    for k in range(num_codebooks):
        delayed[:, k, 1 + k:1 + k + frames] = codes[:, k]
    return delayed


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


def new_cache(model, batch: int, max_columns: int, static: bool) -> EncoderDecoderCache:
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


def guided_logits(logits: torch.Tensor, batch: int, num_codebooks: int, scale: float, guided: bool) -> torch.Tensor:
    """Decoder logits ``[(2)B*K, S, V]`` -> guided ``[B, K, S, V]``: uncond + (cond - uncond) * scale."""
    logits = logits.float().reshape(-1, batch, num_codebooks, *logits.shape[1:])
    if not guided:
        return logits[0]
    cond, uncond = logits[0], logits[1]
    return uncond + (cond - uncond) * scale


def choose_column(logits: torch.Tensor, sampling: MusicgenSampling, generator: torch.Generator | None) -> torch.Tensor:
    """``[B, K, V]`` guided logits -> ``[B, K]`` tokens (argmax, or top-k + temperature sampling)."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1).reshape(-1, scores.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


class ColumnLookupDrafter:
    """The core's prompt lookup (``decoding.prompt_lookup.PromptLookup``) over delayed columns: each distinct
    column ``[K]`` is interned to one integer id, the id sequence is what the lookup indexes, and a proposal is
    the columns that followed the latest earlier occurrence of the last n columns (longest n first)."""

    def __init__(self, max_ngram: int = 3, num_draft: int = 6) -> None:
        self.lookup = PromptLookup(num_tokens=num_draft, max_ngram=max_ngram)
        self._ids: dict[tuple[int, ...], int] = {}
        self._columns: list[tuple[int, ...]] = []

    def extend(self, columns: torch.Tensor) -> None:
        """Append committed columns ``[K, n]`` (batch 1)."""
        ids = []
        for column in map(tuple, columns.T.tolist()):
            if column not in self._ids:
                self._ids[column] = len(self._columns)
                self._columns.append(column)
            ids.append(self._ids[column])
        if self.lookup.context:
            self.lookup.commit(ids)
        else:
            self.lookup.start(ids)

    def propose(self, limit: int) -> list[tuple[int, ...]]:
        limit = min(limit, self.lookup.num_tokens)
        found = self.lookup.matches(self.lookup.context) if limit > 0 else []
        return [self._columns[i] for i in found[0][1][:limit]] if found else []


@dataclass
class MusicgenDecodeStats(DecodeStats):
    drafted: int = 0
    static_cache: bool = True
    columns: torch.Tensor | None = field(default=None, repr=False)


@torch.inference_mode()
def decode_columns(
    model,
    conditioning: MusicgenConditioning,
    num_frames: int,
    sampling: MusicgenSampling,
    drafter: ColumnLookupDrafter | None = None,
    static_cache: bool = True,
    cancel: CancelToken | None = None,
    stats: MusicgenDecodeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield newly committed delayed columns ``[B, K, n]`` until ``num_frames`` frames are complete.

    Every forward feeds the last committed column plus the drafted ones; logits at input j decide column
    ``committed + j``. Drafting needs batch 1 (one lookup table); plain decoding takes any batch."""
    stats = stats if stats is not None else MusicgenDecodeStats()
    stats.static_cache = static_cache
    decoder_config = model.decoder.config
    num_codebooks, pad = decoder_config.num_codebooks, decoder_config.pad_token_id
    batch = conditioning.encoder_hidden_states.shape[0] // (2 if conditioning.guided else 1)
    if drafter is not None and batch != 1:
        raise ValueError("Column drafting decodes one song at a time (batch 1).")
    device = conditioning.encoder_hidden_states.device
    total = num_frames + num_codebooks
    forced = delay_pattern_pad_mask(num_codebooks, num_frames, device)
    columns = torch.full((batch, num_codebooks, total), pad, dtype=torch.long, device=device)
    cache = new_cache(model, batch * (2 if conditioning.guided else 1), total, static_cache)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)
    if drafter is not None:
        drafter.extend(columns[0, :, :1])
    committed = 1
    while committed < total:
        if cancel is not None:
            cancel.raise_if_cancelled()
        started = time.perf_counter()
        draft = drafter.propose(total - committed - 1) if drafter is not None else []
        stats.draft_s += time.perf_counter() - started
        step = columns[:, :, committed - 1:committed]
        if draft:
            draft_tensor = torch.tensor(draft, dtype=torch.long, device=device).T[None]
            step = torch.cat([step, draft_tensor], dim=-1)
        ids = step.reshape(batch * num_codebooks, -1)
        if conditioning.guided:
            ids = ids.repeat(2, 1)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=conditioning.encoder_hidden_states),
            attention_mask=conditioning.attention_mask,
            decoder_input_ids=ids,
            past_key_values=cache,
            use_cache=True,
        )
        logits = guided_logits(out.logits, batch, num_codebooks, sampling.guidance_scale, conditioning.guided)
        accepted = 0
        while True:
            column = choose_column(logits[:, :, accepted], sampling, generator)
            column = torch.where(forced[None, :, committed + accepted], pad, column)
            columns[:, :, committed + accepted] = column
            if accepted < len(draft) and bool((column == step[:, :, 1 + accepted]).all()):
                accepted += 1
                continue
            break
        new = accepted + 1
        rollback_cache(cache, len(draft) - accepted)
        stats.forwards += 1
        stats.new_tokens += new
        stats.drafted += len(draft)
        stats.accepted_per_forward.append(new)
        fresh = columns[:, :, committed:committed + new]
        if drafter is not None:
            drafter.extend(fresh[0])
        committed += new
        stats.step_s += time.perf_counter() - started
        yield fresh
    stats.columns = columns


@dataclass
class AccompanimentResult:
    audio: np.ndarray  # [samples] float32 at ``sample_rate``
    sample_rate: int
    codes: torch.Tensor  # [K, T]
    stats: MusicgenDecodeStats
    first_audio_s: float
    decode_s: float


def stream_accompaniment(
    model,
    tokenizer,
    prompt: str,
    num_frames: int,
    sampling: MusicgenSampling,
    draft: bool = True,
    static_cache: bool = True,
    schedule: ChunkSchedule | None = None,
    cancel: CancelToken | None = None,
    result: dict[str, Any] | None = None,
) -> Iterator[np.ndarray | Progress]:
    """Yield audio chunks (float32, mono) as the decode loop completes frames (chunk ends follow
    ``schedule``), and a Progress (complete frames) after every forward, so a consumer can stop between model
    steps; on exit ``result['value']`` holds the AccompanimentResult. The concatenated chunks are the whole track."""
    schedule = schedule or ChunkSchedule(first=25)
    started = time.perf_counter()
    conditioning = encode_text(model, tokenizer, [prompt], sampling.guidance_scale)
    stats = MusicgenDecodeStats()
    drafter = ColumnLookupDrafter() if draft else None
    decoder = EncodecStream(model.audio_encoder)
    num_codebooks = model.decoder.config.num_codebooks
    ends = iter(schedule.boundaries(num_frames))
    next_end = next(ends)
    chunks: list[np.ndarray] = []
    first_audio_s = 0.0
    delayed = [torch.full((1, num_codebooks, 1), model.decoder.config.pad_token_id, dtype=torch.long,
                          device=model.device)]
    for fresh in decode_columns(model, conditioning, num_frames, sampling, drafter, static_cache, cancel, stats):
        delayed.append(fresh)
        complete = sum(part.shape[-1] for part in delayed) - num_codebooks
        yield Progress(max(complete, 0), num_frames, "accompaniment")
        if next_end < num_frames and complete >= next_end + decoder.holdback_frames:
            chunk = decoder.push(revert_delay_pattern(torch.cat(delayed, dim=-1))[0])
            next_end = next(ends)
            if chunk.size:
                first_audio_s = first_audio_s or time.perf_counter() - started
                chunks.append(chunk)
                yield chunk
    codes = revert_delay_pattern(stats.columns)
    chunk = decoder.push(codes[0], final=True)
    if chunk.size:
        first_audio_s = first_audio_s or time.perf_counter() - started
        chunks.append(chunk)
        yield chunk
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if result is not None:
        result["value"] = AccompanimentResult(audio, int(model.audio_encoder.config.sampling_rate), codes[0], stats,
                                              first_audio_s, time.perf_counter() - started)


def tiny_musicgen(seed: int = 0):
    """A random-initialised MusicgenForConditionalGeneration of the real classes: a 2-layer T5 encoder, a
    2-layer decoder over 4 codebooks of 64 codes, and an EnCodec at MusicGen's 32 kHz / 50 Hz framing."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5Config

    from .tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    pad_token_id=tokenizer.pad_token_id)
    # 4 codebooks of 64 codes (6 bits) at 50 Hz = 1.2 kbps; upsampling 8*5*4*4 = 640 samples per frame at 32 kHz
    codec = EncodecConfig(target_bandwidths=[1.2], sampling_rate=32000, audio_channels=1, hidden_size=32,
                          num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=64,
                          codebook_dim=32, num_lstm_layers=1, use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(vocab_size=64, num_codebooks=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, ffn_dim=64, max_position_embeddings=2048,
                                    pad_token_id=64, decoder_start_token_id=64, bos_token_id=64)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config.update(decoder_start_token_id=64, pad_token_id=64, bos_token_id=64)
    randomize_codebooks(model.audio_encoder, seed)
    return model, tokenizer
