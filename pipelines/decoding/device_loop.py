"""Token Recycling with the whole step on the device: fill the template from the adjacency matrix, verify it,
accept greedily, move the accepted nodes' K/V rows into place and recycle every node's top-k, captured as one CUDA
graph per key width. The host launches ``BURST`` steps, then reads the committed tokens of the burst before while
the next one runs, so the GPU never waits on Python.

Why (issue 21, an H100, SmolLM2-135M in bf16): the host verifier spends about 2.5 ms of a 5.36 ms merged step
building trees, masks and the acceptance walk while the GPU idles, and a tree's verify costs little more than a
plain step. Token Recycling needs none of that on the host: its tree is a fixed template, its draft a gather from a
``[vocab, k]`` matrix already on the device, and its acceptance a few masked compares per level.

Rollback moves K/V instead of re-feeding: the block writes the root and every node at ``past + node``; the accepted
path's rows are copied to ``past + 1 ..`` so the cache stays the committed prefix, as plain decoding's would be. The
output is the verifier's: at every committed position the model's own argmax (identical to plain greedy decoding
where a row's logits do not depend on the block, as in fp32; in bf16 near-ties can flip, see exact.py).

Greedy decoding without logits processors on a ``StaticForward`` only (``supports``); elsewhere the host verifier
runs the same drafter. Captured on CUDA, eager (the same code, step by step) on a CPU. The stats count no host
drafting time (drafting is part of the captured step) and no forward for the prompt (one before the first step).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import numpy as np
import torch

from ..base import CancelToken
from .captured import CapturedCalls
from .drafters.recycling import TokenRecycling, depth_levels
from .drafters.recycling_lookup import RecyclingLookup, with_chain
from .plain import DecodeStats, SamplingConfig
from .static import StaticForward
from .tree import TokenTree

BURST = 4  # steps launched between reads: each read waits for the burst before, never for the one running
STATE = ("past", "root", "count", "steps")  # device scalars: cache rows committed, next root, tokens out, steps


def supports(drafter: object, forward: object, config: SamplingConfig, processors: object) -> bool:
    """Whether a request runs here: Token Recycling (with or without a lookup chain), greedy, no logits processors,
    on the static step."""
    return (isinstance(drafter, (TokenRecycling, RecyclingLookup)) and isinstance(forward, StaticForward)
            and config.greedy and not processors)


class RecyclingLoop:
    """Device-resident Token Recycling over ``forward``'s static cache, drafting with ``recycler``'s matrix (shared
    with the host path: the paper's hot start across requests) at its active template size, with ``lookup`` > 0 a
    prompt-lookup chain of that many tokens beside the template (``drafters.recycling_lookup``). Built once per
    (forward, recycler, size, lookup) and kept with the forward (``loop_for``): its graphs and buffers serve every
    request."""

    def __init__(self, forward: StaticForward, recycler: TokenRecycling, lookup: int = 0) -> None:
        self.forward, self.recycler, self.lookup = forward, recycler, lookup
        template, device = recycler.active, forward.device
        self.fill_levels, self.drafted = recycler.levels, len(template)  # template nodes, then the chain
        parents = with_chain(list(template.parents), lookup)
        tree = TokenTree([0] * len(parents), parents)
        self.nodes, self.depth = len(parents), max(tree.depths)
        self.size = forward.bucket(self.nodes)
        self.depths = torch.tensor(tree.depths, device=device)
        self.parents = torch.tensor([max(p, 0) for p in parents], device=device)
        self.accept_levels = depth_levels(parents, device)
        self.pattern = torch.from_numpy(block_pattern(tree, self.size)).to(device)
        # index constants of every step, made once
        self.node_ids = torch.arange(self.nodes, device=device)
        self.slots = torch.arange(self.depth + 1, device=device)  # a step's committed tokens: drafts, then the bonus
        self.chain_ids = torch.arange(lookup, device=device)
        self.in_chain = self.node_ids >= self.drafted
        self.starts = torch.arange(forward.max_cache_len, device=device)  # where an earlier n-gram may begin
        self.state = torch.zeros(len(STATE), dtype=torch.long, device=device)
        # every token a request can write: its budget (< the cache), then what two bursts in flight may add
        self.room = forward.max_cache_len + 2 * BURST * (self.depth + 1) + self.depth + 1
        self.out = torch.zeros(self.room, dtype=torch.long, device=device)
        self.context = torch.zeros(self.room + lookup, dtype=torch.long, device=device)  # prompt + committed tokens
        self.committed = torch.zeros(self.room, dtype=torch.long, device=device)  # per step
        self.accepted = torch.zeros(self.drafted, dtype=torch.long, device=device)  # per template node
        self.top = torch.zeros(self.room, 2, device=device), torch.zeros(self.room, 2, dtype=torch.long, device=device)
        self.calls = CapturedCalls(forward.capture)
        # two pinned read-back buffers (state, tokens, tokens per step): one being read while the next burst fills one
        self.host = [torch.zeros(len(STATE) + 2 * self.room, dtype=torch.long, pin_memory=device.type == "cuda")
                     for _ in range(2)]

    def step(self, width: int) -> torch.Tensor:
        """One verified step from the device state: draft, forward, accept, move K/V, recycle, advance."""
        forward, n = self.forward, self.nodes
        past, root, count, steps = self.state.unbind()
        tokens, usable = self.draft(past, root)
        ids, positions, scalars, block, cols = forward._staged_args(self.size, width)
        ids[0, n:].zero_()
        ids[0, :n].copy_(tokens)
        positions[0].copy_(past.expand(self.size))
        positions[0, :n].add_(self.depths)
        scalars.copy_(torch.stack([past, torch.full_like(past, n)]))
        block.copy_(self.pattern)
        logits = forward._step_fn(ids, positions, scalars, block, cols)[0][:n]
        choice = logits.argmax(-1)
        accepted = (tokens == choice[self.parents]) & usable
        accepted[0] = True
        for nodes, parents in self.accept_levels:
            accepted[nodes] &= accepted[parents]
        path, kept = self.accepted_path(accepted)
        slots = self.slots
        bonus = choice.gather(0, path.gather(0, kept.view(1)))
        run = torch.where(slots == kept, bonus, tokens[path[1:]])  # the drafts, the bonus, then unused slots
        self.out.index_copy_(0, count + slots, run)
        self.context.index_copy_(0, past + 1 + slots, run)
        top = logits[path[:-1]].float().topk(2, dim=-1)  # the rows the committed tokens were chosen at
        self.top[0].index_copy_(0, count + slots, top.values)
        self.top[1].index_copy_(0, count + slots, top.indices)
        self.move_rows(past, path[1:-1], kept)
        self.recycler.recycle(tokens, logits)
        self.accepted.add_(accepted[:self.drafted])
        self.committed.index_copy_(0, steps.view(1), (kept + 1).view(1))
        self.state.copy_(torch.stack([past + kept + 1, bonus[0], count + kept + 1, steps + 1]))
        return self.state

    def draft(self, past: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tree's tokens (the template filled from the matrix below ``root``, then the looked-up chain) and
        which nodes may be accepted (a chain shorter than ``lookup`` pads with nodes that may not)."""
        tokens = root.expand(self.nodes).clone()
        for nodes, parents, ranks in self.fill_levels:
            tokens[nodes] = self.recycler.matrix[tokens[parents], ranks]
        usable = torch.ones(self.nodes, dtype=torch.bool, device=tokens.device)
        if self.lookup:
            chain, length = self.looked_up(past + 1)
            tokens[self.drafted:] = chain
            usable[self.drafted:] = self.chain_ids < length
        return tokens, usable

    def looked_up(self, length: torch.Tensor, max_ngram: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt lookup over the ``length`` context tokens: the tokens after the latest earlier occurrence of the
        trailing 3-gram, else 2-gram, else 1-gram (``PromptLookup``'s order), and how many of them there are."""
        context, starts, size = self.context, self.starts, self.forward.max_cache_len
        begin = torch.full_like(length, -1)  # where the continuation starts; -1: nothing found yet
        for n in range(max_ngram, 0, -1):
            trailing = context.gather(0, (length - n + torch.arange(n, device=context.device)).clamp(min=0))
            found = starts + n < length  # an earlier occurrence, with a token after it
            for j in range(n):
                found &= context[j:j + size] == trailing[j]
            latest = torch.where(found, starts, -1).max()
            begin = torch.where((begin < 0) & (latest >= 0), latest + n, begin)
        chain = context.gather(0, begin.clamp(min=0) + self.chain_ids)
        return chain, torch.where(begin >= 0, (length - begin).clamp(max=self.lookup), 0)

    def accepted_path(self, accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The accepted node at each depth (index ``depth + 1`` collects the rest) and how many drafts were accepted.
        The template's siblings hold distinct tokens, so it has one accepted path, and so has the chain; where both
        accept, the longer one is taken (the template on a tie)."""
        depth = self.depth
        if self.lookup:
            on_template, on_chain = accepted & ~self.in_chain, accepted & (self.in_chain | (self.depths == 0))
            longer = on_chain.sum() > on_template.sum()
            accepted = torch.where(longer, on_chain, on_template)
        path = torch.zeros(depth + 2, dtype=torch.long, device=accepted.device)
        path.scatter_(0, torch.where(accepted, self.depths, depth + 1), self.node_ids)
        return path, accepted.sum() - 1

    def move_rows(self, past: torch.Tensor, path: torch.Tensor, kept: torch.Tensor) -> None:
        """Copy the accepted nodes' K/V (rows ``past + node``) to ``past + 1 + i``: the cache then holds the
        committed prefix. Unused slots copy a row onto itself (fixed shapes)."""
        slots = self.slots[:-1]
        target = past + 1 + slots
        source = torch.where(slots < kept, past + path, target)
        for layer in self.forward.cache.layers:
            for buffer in (layer.keys, layer.values):
                buffer.index_copy_(2, target, buffer.index_select(2, source))

    def launch(self, steps: int, width: int, host: torch.Tensor) -> torch.cuda.Event | None:
        """``steps`` replays, then the state, the tokens and the tokens per step copied into ``host`` (pinned);
        the event marks their arrival (None off CUDA, where the copy is done on return)."""
        if self.calls.capture and width not in self.calls.graphs:
            self.capture(width)
        for _ in range(steps):
            self.calls.call(width, lambda: self.step(width))
        for part, source in zip(host.split([len(STATE), self.room, self.room]), (self.state, self.out,
                                                                                 self.committed)):
            part.copy_(source, non_blocking=True)
        if self.forward.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def capture(self, width: int) -> None:
        """Capture the step for ``width``: its warm-up runs advance the state, which is put back (the rows they
        wrote lie at or past the committed length: rewritten or hidden; their recycled rows only steer drafts)."""
        saved = (self.state.clone(), self.accepted.clone())
        self.calls.call(width, lambda: self.step(width))
        self.state.copy_(saved[0])
        self.accepted.copy_(saved[1])

    def burst(self, done: int, in_flight: int, past: int, max_new_tokens: int) -> tuple[int, int]:
        """Steps and key width of the next burst: no more steps than tokens may still be needed (a step commits at
        least one), a width holding every row the burst may reach (a step commits at most depth + 1)."""
        steps = min(BURST, max_new_tokens - done - in_flight)
        reach = past + (in_flight + steps) * (self.depth + 1)
        if reach + self.size > self.forward.max_cache_len:
            raise ValueError(f"The static cache holds {self.forward.max_cache_len} tokens; decoding needs "
                             f"{reach + self.size}.")
        return steps, self.forward.width(reach, self.size)

    def decode(self, prompt: list[int], max_new_tokens: int, eos_ids: set[int], cancel: CancelToken | None,
               stats: DecodeStats) -> Iterator[list[int]]:
        """Yield each step's committed tokens until an end token or ``max_new_tokens``, as ``speculative_decode``
        does. The prompt but its last token is one causal forward first; its last token is the first root."""
        forward = self.forward
        cache = forward.new_cache()
        if len(prompt) > 1:
            forward(prompt[:-1], list(range(len(prompt) - 1)), None, cache, keep=1)
        self.state.copy_(torch.tensor([len(prompt) - 1, prompt[-1], 0, 0]))
        self.context[:len(prompt)].copy_(torch.tensor(prompt))
        self.accepted.zero_()
        started, done, read = time.perf_counter(), 0, 0  # tokens yielded, tokens read back
        past, launched, bursts, flights = len(prompt) - 1, 0, 0, deque()
        try:
            while True:
                while len(flights) < 2 and done + launched < max_new_tokens:
                    steps, width = self.burst(done, launched, past, max_new_tokens)
                    host = self.host[bursts % 2]  # read before the burst after next refills it
                    flights.append((steps, self.launch(steps, width, host), host))
                    launched, bursts = launched + steps, bursts + 1
                if cancel is not None:
                    cancel.raise_if_cancelled()
                steps, event, host = flights.popleft()
                launched -= steps
                if event is not None:
                    event.synchronize()
                state, tokens, per_step = host.split([len(STATE), self.room, self.room])
                past, total_steps = int(state[0]), int(state[3])
                for committed in per_step[total_steps - steps:total_steps].tolist():
                    run = cut_run(tokens[read:read + committed].tolist(), eos_ids, max_new_tokens - done)
                    read, done = read + committed, done + len(run)
                    stats.count_forward(len(run))
                    yield run
                    if done >= max_new_tokens or run[-1] in eos_ids:
                        return
        finally:
            self.finish(done, stats, time.perf_counter() - started)

    def finish(self, tokens: int, stats: DecodeStats, seconds: float) -> None:
        """Wait for what is still running (the next request reuses the cache), hand the acceptance counts of every
        step run to the recycler (its tree size follows them) and the committed rows' top-2 logits to ``stats``."""
        steps = int(self.state[3])
        for node, count in enumerate(self.accepted.tolist()):
            self.recycler.offered[node] += steps
            self.recycler.accepted[node] += count
        if stats.top_logits is not None and tokens:  # copies: the next request writes the same buffers
            stats.top_logits.append((self.top[0][:tokens].clone(), self.top[1][:tokens].clone(), list(range(tokens))))
        stats.step_s += seconds


def cut_run(run: list[int], eos_ids: set[int], remaining: int) -> list[int]:
    """``run`` up to its first end token and at most ``remaining`` tokens."""
    for i, token in enumerate(run[:remaining]):
        if token in eos_ids:
            return run[:i + 1]
    return run[:remaining]


def block_pattern(tree: TokenTree, size: int) -> np.ndarray:
    """The tree's ancestor pattern padded to ``size``: dummy rows see only themselves (as ``StaticForward``
    stages a padded block)."""
    pattern = np.zeros((size, size), dtype=bool)
    pattern[:len(tree), :len(tree)] = tree.ancestor_matrix()
    dummies = np.arange(len(tree), size)
    pattern[dummies, dummies] = True
    return pattern


@torch.no_grad()
def recycling_decode(forward: StaticForward, drafter: TokenRecycling | RecyclingLookup, input_ids: torch.Tensor,
                     max_new_tokens: int, eos_ids: set[int], cancel: CancelToken | None = None,
                     stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Greedy decoding with ``drafter``'s tree built and verified on the device (``RecyclingLoop``):
    ``speculative_decode``'s contract."""
    stats = stats if stats is not None else DecodeStats()
    yield from loop_for(forward, drafter).decode(input_ids[0].tolist(), max_new_tokens, eos_ids, cancel, stats)


def loop_for(forward: StaticForward, drafter: TokenRecycling | RecyclingLookup) -> RecyclingLoop:
    """The loop for ``drafter``'s tree over ``forward``, built on first use and kept with the forward."""
    recycler, lookup = (drafter.recycler, drafter.lookup) if isinstance(drafter, RecyclingLookup) else (drafter, 0)
    key = (id(recycler), len(recycler.active), lookup)
    if key not in forward.loops:  # the loop holds the recycler, so its id names no other while the loop lives
        forward.loops[key] = RecyclingLoop(forward, recycler, lookup)
    return forward.loops[key]
