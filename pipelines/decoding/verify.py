"""The one verifier: propose a token tree, score it in one forward, accept the longest path the model itself
would have produced plus one bonus token, roll the cache back. Drafters only decide the tree.

Cache rollback is crop + re-feed (reference §2.3 option b): after a forward the cache holds the committed
prefix, the root and every tree node. The nodes that sit contiguously right after the root *and* were
accepted are exactly what plain decoding would have cached (a chain drafter's accepted prefix always is),
so they stay; everything after them is dropped with ``cache.crop(-k)`` (the only form 5.24 accepts) and
the remaining accepted tokens are re-fed at the head of the next step as causal rows.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from ..base import CancelToken
from .plain import DecodeStats, SamplingConfig, accepts, choose_token, logits_processing, make_generator
from .device_accept import greedy_accept
from .sliding import AttentionLayout, attention_layout
from .tree import TokenTree, block_position_ids, block_visibility


LONG_BLOCK = 256  # committed rows in one step beyond which the step verifies a chain only


class Drafter:
    """Where a tree's tokens come from. ``start``/``finish`` bracket one request; most drafters only need
    ``propose`` and ``update``. Drafters that read the model's features (a draft head) set ``reads_hidden``."""

    reads_hidden = False

    def start(self, prompt: list[int]) -> None:
        """A new request begins with ``prompt`` (ids, the last one is the first root)."""

    def propose(self, context: list[int]) -> TokenTree:
        """A tree whose root is ``context[-1]`` (the last committed token)."""
        raise NotImplementedError

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """After verification: ``logits`` is ``[len(tree), vocab]`` (raw, one row per node) and ``accepted``
        the tokens committed this step (accepted path, then the bonus token)."""

    def read_hidden(self, hidden: torch.Tensor) -> None:
        """Called before ``update`` when ``reads_hidden``: the final hidden states (the LM head's input) of
        the tree's nodes, ``[len(tree), hidden_size]``."""

    def finish(self) -> None:
        """The request is over (finished, stopped at EOS or cancelled)."""

    def drafting_took(self, seconds: float) -> None:
        """The host seconds this step's ``propose`` and ``update`` took, as the verifier timed them for its stats:
        for drafters that price their own drafting (``hardware.DraftingCost``)."""

    def embedding(self, model) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The input embedding the forward needs for this drafter's trees (None: the model's own). Drafters
        with virtual tokens (PPD's prompt tokens) return one that also embeds those."""
        return None

    def trained_used(self) -> dict[str, bool]:
        """Which trained weights the last request really drafted with, as result stats (``draft_head``,
        ``ppd_prompt_tokens``); a drafter that never uses any reports none."""
        return {}


class NoDraft(Drafter):
    """Plain decoding through the verifier's loop (one token per forward): the baseline of a stage that can
    also be drafted, run by the same code (``plain.plain_decode`` is this drafter)."""

    def __init__(self) -> None:
        self.trees: dict[int, TokenTree] = {}  # root -> its one-node tree: the baseline builds none per step

    def propose(self, context: list[int]) -> TokenTree:
        tree = self.trees.get(context[-1])
        if tree is None:
            tree = self.trees[context[-1]] = TokenTree([context[-1]], [-1], [0])
        return tree


class CausalLMForward:
    """How the core calls a model: any causal LM whose forward takes ``input_ids`` (or ``inputs_embeds`` via
    ``embed``), a 4D float mask, ``position_ids`` and a transformers cache, and returns ``.logits``.

    ``tree_attention=False`` is the chain-only mode for attention code that cannot take a 4D mask: trees
    are cut to their first chain and verified with the model's ordinary causal mask.

    Models with sliding-window layers keep every layer's K/V at full length and get one mask per layer type
    (``sliding.AttentionLayout``); models with layers a crop cannot roll back raise ``UnsupportedAttention``.
    ``layout`` replaces the one read from the model's config (``StockForward``)."""

    def __init__(self, model, tree_attention: bool = True, embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 layout: AttentionLayout | None = None):
        self.model = model
        self.tree_attention = tree_attention
        self.embed = embed
        self.record_hidden = False
        self.hidden: torch.Tensor | None = None
        self.layout = attention_layout(model) if layout is None else layout
        self.trims_logits = accepts(model, "logits_to_keep")
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def new_cache(self):
        return self.layout.new_cache(self.model.config)

    def block_inputs(self, tree: TokenTree, before_root: int, past: int):
        """Mask (None for a chain: the model's own causal mask) and position ids for ``before_root`` committed
        tokens then ``tree``, appended at cache length ``past``; adapters with their own layout override it."""
        positions = block_position_ids(tree, before_root, past, self.device)
        if tree.is_chain:
            return None, positions
        visible = torch.from_numpy(block_visibility(tree, before_root, past)).to(self.device)
        keys = torch.cat([torch.arange(past, device=self.device), positions[0]])
        return self.layout.masks(visible, positions[0], keys, self.dtype), positions

    def fit(self, tree: TokenTree, before_root: int) -> TokenTree:
        """The tree cut to what this forward verifies at the cost it was priced at (padded forwards: its bucket)."""
        return tree

    def __call__(self, ids: list[int], position_ids: torch.Tensor, mask: torch.Tensor | None, cache,
                 keep: int | None = None) -> torch.Tensor:
        """Logits ``[keep, vocab]`` for the last ``keep`` of ``ids`` (all when None) appended to ``cache``.
        Skipping the LM head on re-fed and prompt rows matters on a CPU: it is ~20% of a small model."""
        tensor = torch.tensor([ids], device=self.device)
        inputs = {"inputs_embeds": self.embed(tensor)} if self.embed is not None else {"input_ids": tensor}
        if keep is not None and self.trims_logits:
            inputs["logits_to_keep"] = keep
        if self.record_hidden:
            inputs["output_hidden_states"] = True
        out = self.model(**inputs, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         past_key_values=cache)
        if self.record_hidden:
            last = out.hidden_states[-1][0]
            self.hidden = last[-keep:] if keep is not None else last
        return out.logits[0, -keep:] if keep is not None else out.logits[0]


class StockForward(CausalLMForward):
    """The model's own cache, causal mask and positions (from its cache length), chains only: what plain decoding
    needs, as ``generate`` runs it. ``NoDraft`` never rolls a cache back, so this also decodes the layouts a tree
    cannot go through (chunked or linear attention) and keeps sliding layers at their window (an empty layout: no
    per-type masks, transformers' own cache)."""

    def __init__(self, model) -> None:
        super().__init__(model, tree_attention=False, layout=AttentionLayout(()))

    def block_inputs(self, tree: TokenTree, before_root: int, past: int):
        return None, None  # a chain's positions are the cache's next ones: no tensor to build per step


def accept(tree: TokenTree, logits: torch.Tensor, config: SamplingConfig,
           generator: torch.Generator | None,
           process: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None) -> tuple[list[int], list[int]]:
    """Walk down from the root choosing the model's own token at each node (argmax, or a sample from the
    same processed distribution plain decoding uses) and follow the child holding it. Returns the accepted
    node indices and the committed tokens (their tokens, then the bonus). Sampling at the node and matching
    a deterministic draft is lossless (reference §2.4). ``process(logits, path)`` rewrites a node's logits
    given the tokens accepted on the way to it (a model's own per-position logits processors). Greedy steps
    without processors take ``device_accept.greedy_accept`` instead: the same result, one read from the device."""
    children = tree.children()
    node, nodes, tokens = 0, [], []
    while True:
        token = choose_token(logits[node] if process is None else process(logits[node], tokens), config, generator)
        tokens.append(token)
        child = children[node].get(token)
        if child is None:
            return nodes, tokens
        nodes.append(child)
        node = child


def choose_run(tree: TokenTree, logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None,
               process: Callable[[torch.Tensor, list[int]], torch.Tensor] | None) -> tuple[list[int], list[int]]:
    """The accepted nodes and committed tokens of one verified ``tree``. A lone root (plain decoding, a drafter
    with nothing to offer) is one choice at its row, exactly plain decoding's: no walk, one read."""
    if len(tree) == 1:
        return [], [choose_token(logits[0] if process is None else process(logits[0], []), config, generator)]
    if config.greedy and process is None:
        return greedy_accept(tree, logits)
    return accept(tree, logits, config, generator, process)


def contiguous_accepted(nodes: list[int]) -> int:
    """How many accepted nodes sit right after the root in input order (their cache rows stay valid)."""
    count = 0
    while count < len(nodes) and nodes[count] == count + 1:
        count += 1
    return count


@torch.inference_mode()
def verifying_forward(model, drafter: Drafter, forward: CausalLMForward | None) -> CausalLMForward:
    """``forward``, or a new one that embeds what the drafter verifies (prompt tokens) beside the token ids."""
    embed = drafter.embedding(model)
    forward = forward or CausalLMForward(model, embed=embed)
    if embed is not None and forward.embed is None:
        raise ValueError("This drafter verifies prompt tokens: build the forward with embed=drafter.embedding(model).")
    return forward


def block_tree(proposed: TokenTree, forward: CausalLMForward, remaining: int, before_root: int) -> TokenTree:
    """The drafted tree as this step verifies it: no deeper than the token budget; a chain where the forward has
    no tree attention or a long block is re-fed before the root (the prompt: the model's own causal attention,
    where a 4-D mask over it would cost memory and time quadratic in its length, 8000 tokens: 2.8x plain
    decoding); fitted to the forward's row buckets."""
    tree = proposed.truncated(max_depth=remaining - 1)
    if not forward.tree_attention or before_root > LONG_BLOCK:
        tree = tree.first_chain()
    return forward.fit(tree, before_root)


def prefilled_token(model, prefill: dict[str, torch.Tensor], cache, process, config: SamplingConfig,
                    generator: torch.Generator, stats: DecodeStats) -> int:
    """The first token of a prompt given as model inputs (Bark's summed embeddings): its forward alone picks it."""
    logits = model(**prefill, use_cache=True, past_key_values=cache).logits[0, -1]
    token = choose_token(logits if process is None else process(logits, []), config, generator)
    stats.keep_top(logits[None])
    stats.count_forward(1)
    return token


def cut_at_end(nodes: list[int], run: list[int], eos_ids: set[int], remaining: int) -> None:
    """Cut the accepted run (and its tree nodes) in place after an end token or the ``remaining`` budget."""
    for i, token in enumerate(run):
        if token in eos_ids or i + 1 == remaining:
            del run[i + 1:], nodes[i:]
            return


def keep_accepted(cache, tree: TokenTree, nodes: list[int]) -> int:
    """Crop the cache to the block's accepted path; how many of the run's tokens it now holds."""
    kept = contiguous_accepted(nodes)
    dropped = len(tree) - 1 - kept
    if dropped:  # crop(-0) would mean "keep nothing" to a cache that reads it as a length
        cache.crop(-dropped)
    return kept


def processed_prompt(input_ids: torch.Tensor, prefill: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The prompt ids the logits processors read; a prefill's prompt is not ids (Bark's summed embeddings), so its
    processors see zeros of its length."""
    if prefill is None:
        return input_ids[0].detach().cpu()
    return torch.zeros(next(iter(prefill.values())).shape[1], dtype=torch.long)


def update_drafter(drafter: Drafter, forward: CausalLMForward, tree: TokenTree, logits: torch.Tensor,
                   run: list[int]) -> None:
    """Tell the drafter what the block's forward saw (its hidden states, when it reads them) and accepted."""
    if forward.record_hidden:
        drafter.read_hidden(forward.hidden[-len(tree):])
    drafter.update(tree, logits, run)


def account_step(stats: DecodeStats, drafter: Drafter, committed: int, times: tuple[float, float, float, float]
                 ) -> None:
    """Count a verified step: its committed tokens, its time, and the drafter's share of it (proposing the tree
    and updating after it; ``times`` = started, drafted, updating, finished)."""
    started, drafted, updating, finished = times
    drafting = (drafted - started) + (finished - updating)
    stats.count_forward(committed)
    drafter.drafting_took(drafting)
    stats.draft_s += drafting
    stats.step_s += finished - started


@torch.no_grad()  # wraps each resumption of the generator: the caller's grad mode is untouched between yields
def speculative_decode(model, input_ids: torch.Tensor, max_new_tokens: int, config: SamplingConfig, eos_ids: set[int],
                       drafter: Drafter, cancel: CancelToken | None = None, stats: DecodeStats | None = None,
                       forward: CausalLMForward | None = None, *, prefill: dict[str, torch.Tensor] | None = None,
                       processors=None, generator: torch.Generator | None = None) -> Iterator[list[int]]:
    """Same contract as ``plain_decode``, but each step yields the whole accepted run (1 + accepted drafts).
    Greedy output is token-for-token plain greedy where a row's logits do not depend on the block (fp32; any dtype
    through ``exact.ExactForward``; in bf16 a wider forward can flip near-ties); sampled output follows the same
    distribution.

    For models whose prompt is not a list of ids (Bark's semantic prompt is summed text and history
    embeddings): ``prefill`` holds the prompt's model inputs; its forward alone picks the first token and
    ``input_ids`` is only the history the drafter searches (it may be empty). ``processors`` (a
    ``LogitsProcessorList``) rewrite the logits at every verified position exactly where plain decoding would;
    ``generator`` replaces the one seeded from ``config``. Without grad, as transformers' ``generate``: with it,
    the static cache's in-place K/V writes chained every step's autograd graph to the next (a CPU run of
    SmolLM2-135M held 11 GB after three requests)."""
    stats = stats if stats is not None else DecodeStats()
    forward = verifying_forward(model, drafter, forward)
    forward.record_hidden = drafter.reads_hidden  # fixed for the request
    generator = generator or make_generator(config, forward.device)
    cache = forward.new_cache()
    context = input_ids[0].tolist()
    generated: list[int] = []
    process = logits_processing(processors, processed_prompt(input_ids, prefill), generated) if processors else None
    if prefill is not None:
        token = prefilled_token(model, prefill, cache, process, config, generator, stats)
        context.append(token)
        generated.append(token)
        yield [token]
        if token in eos_ids:
            return
    pending = list(context[-1:] if prefill is not None else context)  # committed, not cached; last = root
    drafter.start(list(context))
    try:
        while len(generated) < max_new_tokens:
            if cancel is not None:
                cancel.raise_if_cancelled()
            started = time.perf_counter()
            remaining, past, before_root = max_new_tokens - len(generated), cache.get_seq_length(), len(pending) - 1
            tree = block_tree(drafter.propose(context), forward, remaining, before_root)
            drafted = time.perf_counter()

            mask, positions = forward.block_inputs(tree, before_root, past)
            logits = forward(pending[:-1] + tree.tokens, positions, mask, cache, keep=len(tree))
            nodes, run = choose_run(tree, logits, config, generator, process)
            cut_at_end(nodes, run, eos_ids, remaining)
            stats.keep_top(logits, [0] + nodes)  # the rows the committed tokens were chosen at
            pending = run[keep_accepted(cache, tree, nodes):]
            context.extend(run)
            generated.extend(run)

            updating = time.perf_counter()
            update_drafter(drafter, forward, tree, logits, run)
            account_step(stats, drafter, len(run), (started, drafted, updating, time.perf_counter()))
            yield run
            if run[-1] in eos_ids:
                return
    finally:
        drafter.finish()
