"""Exact streaming EnCodec decode: seams derived from the decoder's receptive field, the LSTM carried as state.

A streamed chunk equals the one-shot decode of the same codes only if every sample it plays depends on nothing
that is still missing or differently padded. The reach is read off the decoder's own modules (kernel sizes,
dilations, strides, each padding side, transposed-convolution trims), never assumed:

- ``tail``: samples at the right end of a decode whose value still changes when more frames arrive. MusicGen's
  32 kHz EnCodec is non-causal: 2402 samples = 3.75 frames, so a holdback of 3 frames plays 2.1e-1 frames early.
  Bark's 24 kHz EnCodec is causal: 0.
- ``head``: samples at the left end of a window that differ from the one-shot decode because the window starts
  after frame 0. Finite for the convolutions; unbounded for the LSTM (its state remembers the whole past, and how
  fast it forgets depends on the trained weights).
- ``need``: input frames that must exist before anything is exact. Reflect padding at the very start of the clip
  reads real samples to the right (frames 1..6 under Bark's causal first convolution), so a too-short first
  chunk would be wrong at its head.

The LSTM is therefore not decoded from a truncated context: its state after the last settled frame is kept and
the next chunk continues from it, which is what a one-shot decode computes, for any weights, at a cost that
grows with the new frames only. The convolutions around it are re-run on a window of exactly their reach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.models.encodec.modeling_encodec import (EncodecConv1d, EncodecConvTranspose1d, EncodecLSTM,
                                                          EncodecResnetBlock)


@dataclass(frozen=True)
class Reach:
    """Receptive field of a layer stack; ``head``/``tail`` in output samples, ``need`` in input samples."""

    upsample: int = 1
    head: int = 0
    tail: int = 0
    need: int = 0

    def then(self, later: Reach) -> Reach:
        """This stack followed by ``later``."""
        need_here = math.ceil((later.need + self.tail) / self.upsample) if later.need else 0
        return Reach(self.upsample * later.upsample, self.head * later.upsample + later.head,
                     self.tail * later.upsample + later.tail, max(self.need, need_here))


def conv_reach(layer: EncodecConv1d) -> Reach:
    """A stride-1 padded convolution reaches its left padding back and its right padding ahead."""
    if getattr(layer, "norm_type", "weight_norm") == "time_group_norm":
        raise ValueError("This EnCodec normalises over the whole clip (time_group_norm): no chunk of it can be "
                         "decoded exactly before the end. Turn streaming off for this model.")
    if int(layer.stride) != 1:
        raise ValueError("A strided convolution in the decoder is not supported by the streaming decode.")
    total = int(layer.padding_total)
    right = 0 if layer.causal else total // 2
    left = total - right
    # reflect padding at the clip's start reads input samples 1..left
    need = left + 1 if layer.pad_mode == "reflect" and left else 0
    return Reach(1, left, right, need)


def transposed_reach(layer: EncodecConvTranspose1d) -> Reach:
    """Input frame i writes outputs [i*s, i*s + k) before the trim; trimming ``left`` samples makes the last
    ``left`` outputs wait for the next frame, and the first ``right`` ones depend on the previous frame."""
    stride, kernel = layer.conv.stride[0], layer.conv.kernel_size[0]
    total = kernel - stride
    right = math.ceil(total * layer.trim_right_ratio) if layer.causal else total // 2
    return Reach(stride, head=right, tail=total - right)


def stack_reach(layers) -> Reach:
    """Receptive field of EnCodec decoder layers applied in order (no LSTM: its reach is unbounded)."""
    reach = Reach()
    for layer in layers:
        reach = reach.then(layer_reach(layer))
    return reach


def layer_reach(layer: nn.Module) -> Reach:
    if isinstance(layer, EncodecConv1d):
        return conv_reach(layer)
    if isinstance(layer, EncodecConvTranspose1d):
        return transposed_reach(layer)
    if isinstance(layer, EncodecResnetBlock):
        block, shortcut = stack_reach(layer.block), stack_reach([layer.shortcut])
        return Reach(1, max(block.head, shortcut.head), max(block.tail, shortcut.tail), max(block.need, shortcut.need))
    if isinstance(layer, (nn.ELU, nn.Identity)):
        return Reach()
    raise ValueError(f"Cannot bound the receptive field of {type(layer).__name__} for an exact streaming decode.")


def split_at_lstm(decoder) -> tuple[list[nn.Module], EncodecLSTM, list[nn.Module]]:
    layers = list(decoder.layers)
    at = [i for i, layer in enumerate(layers) if isinstance(layer, EncodecLSTM)]
    if len(at) != 1:
        raise ValueError("The streaming decode expects EnCodec's decoder layout: one LSTM after the first conv.")
    return layers[:at[0]], layers[at[0]], layers[at[0] + 1:]


def run_layers(layers, hidden: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden)
    return hidden


class EncodecStream:
    """Decode a growing code sequence chunk by chunk; the concatenated chunks equal the one-shot decode.

    ``push(codes)`` takes all frames so far (``[K, T]`` or ``[1, K, T]``) and returns the samples that are now
    final; ``final=True`` flushes the held-back tail (the one-shot decode of exactly these codes ends there)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.before, self.lstm, self.after = split_at_lstm(codec.decoder)
        self.before_reach, self.after_reach = stack_reach(self.before), stack_reach(self.after)
        if self.before_reach.upsample != 1:
            raise ValueError("The streaming decode expects no upsampling before EnCodec's LSTM.")
        whole = self.before_reach.then(self.after_reach)
        self.hop, self.holdback_samples, self.need_frames = whole.upsample, whole.tail, whole.need
        self.played = 0  # samples handed out
        self.settled = 0  # frames whose LSTM output no later frame can change
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lstm_out: torch.Tensor | None = None  # settled LSTM outputs from frame ``kept_from`` on
        self.kept_from = 0

    @property
    def holdback_frames(self) -> int:
        return math.ceil(self.holdback_samples / self.hop)

    def playable(self, frames: int, final: bool) -> int:
        if final:
            return frames * self.hop
        if frames < self.need_frames:
            return 0
        return max(0, frames * self.hop - self.holdback_samples)

    @torch.inference_mode()
    def push(self, codes: torch.Tensor, final: bool = False) -> np.ndarray:
        codes = codes.reshape(1, *codes.shape[-2:])
        frames = codes.shape[-1]
        playable = self.playable(frames, final)
        if playable <= self.played:
            return np.zeros(0, np.float32)
        settled = frames if final else max(self.settled, frames - self.before_reach.tail)
        provisional = self.advance_lstm(codes, settled)
        first = max(0, (self.played - self.after_reach.head) // self.hop)
        self.forget_before(first)
        window = provisional if self.lstm_out is None else torch.cat([self.lstm_out, provisional], dim=-1)
        audio = run_layers(self.after, window).reshape(-1)
        offset = first * self.hop
        new = audio[self.played - offset:playable - offset].float().cpu().numpy()
        self.played = playable
        return new

    def advance_lstm(self, codes: torch.Tensor, settled: int) -> torch.Tensor:
        """Run the LSTM over the frames not yet settled, keep the state at ``settled``; return the outputs of
        the frames after it (provisional: their inputs still change when more frames arrive)."""
        start = max(0, self.settled - self.before_reach.head)
        embeddings = self.codec.quantizer.decode(codes[..., start:].transpose(0, 1))
        inputs = run_layers(self.before, embeddings)[..., self.settled - start:]
        fresh, self.state = self.lstm_step(inputs[..., :settled - self.settled], self.state)
        provisional, _ = self.lstm_step(inputs[..., settled - self.settled:], self.state)
        if fresh.shape[-1]:
            self.lstm_out = fresh if self.lstm_out is None else torch.cat([self.lstm_out, fresh], dim=-1)
        self.settled = settled
        return provisional

    def lstm_step(self, inputs: torch.Tensor, state):
        """EnCodecLSTM's forward (LSTM plus skip, channels-first) continued from ``state``."""
        if not inputs.shape[-1]:
            return inputs, state
        sequence = inputs.permute(2, 0, 1)
        output, state = self.lstm.lstm(sequence, state)
        return (output + sequence).permute(1, 2, 0), state

    def forget_before(self, frame: int) -> None:
        """Drop settled LSTM outputs left of ``frame``: no later window starts before it."""
        if self.lstm_out is not None and frame > self.kept_from:
            self.lstm_out = self.lstm_out[..., frame - self.kept_from:]
            self.kept_from = frame
