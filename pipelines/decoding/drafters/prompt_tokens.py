"""Parallel Prompt Decoding (Chen et al., "Hardware-Aware Parallel Prompt Decoding", arXiv 2405.18628).

A few trained *prompt tokens* ride along in the verify forward. Below a tree node v hangs the chain p1 … pm
(positions pos(v)+1 … pos(v)+m, each seeing v's path and the chain before it); the logits at p_k guess the
token k+1 places below v, i.e. the ones after the bonus token the model picks at v. Whichever node ends up
last on the accepted path, its chain's guesses are the next step's tree (the paper's dynamic sparse tree: one
forward verifies this step and drafts the next). The model stays frozen and unmodified: prompt tokens are
virtual ids past the LM head that the forward's embedding function maps to the trained vectors, so the
verifier treats them as tree nodes no model can ever emit (never accepted, dropped from the cache with the
other rejected nodes). Lossless like every drafter here: only the verifier decides.

Trained weights for a model: ``$TOKENWORKS_CACHE/prompt_tokens/<slug>.safetensors`` (what
``python -m pipelines.decoding.training.prompt_training`` writes), else the ones packaged in ``weights/``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..hardware import StepPrices
from ..trained import TrainedWeights
from ..tree import TokenTree
from ..verify import Drafter

TOP_K = 10  # candidates per prompt token (the paper's K)
CHAIN_LENGTH = 3  # the paper's 3 prompt tokens (13 prompts, GPU curve: tau 2.48 with 4, 2.56 with 3)


@dataclass
class PromptTokens:
    """``vectors[k]`` is prompt token p_{k+1} in the model's input-embedding space (after any embedding scale,
    e.g. Gemma's); its virtual id is ``base + k``, ``base`` being past every id the LM head can emit."""

    vectors: torch.Tensor
    base: int
    model_name: str = ""

    @property
    def ids(self) -> list[int]:
        return [self.base + k for k in range(len(self.vectors))]

    def embedding(self, model) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model's own embedding for real ids and the trained vectors for virtual ones: pure tensor ops,
        so it also runs inside a captured CUDA graph (``StaticForward(embed=...)``)."""
        table = model.get_input_embeddings()
        weight = table.weight
        vectors = self.vectors.to(weight.device, weight.dtype)
        last_real, last_virtual = table.num_embeddings - 1, len(vectors) - 1
        base = self.base

        def embed(ids: torch.Tensor) -> torch.Tensor:
            real = table(ids.clamp(max=last_real))
            virtual = vectors[(ids - base).clamp(0, last_virtual)]
            return torch.where((ids >= base).unsqueeze(-1), virtual, real)

        return embed

    def save(self, path: str | Path, **metadata: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.detach().float().cpu().contiguous()}, str(path),
                  metadata={"model": self.model_name, "base": str(self.base), **metadata})


def virtual_base(model) -> int:
    """First id no real token has, in the input table or the LM head."""
    return max(model.get_input_embeddings().num_embeddings, model.get_output_embeddings().weight.shape[0])


def new_prompt_tokens(model, count: int = 3, model_name: str = "", seed: int = 0) -> PromptTokens:
    """Untrained prompt tokens: the mean input embedding plus noise of the embeddings' own spread (the start
    of training; in tests, a drafter whose guesses are poor but whose mechanics are complete)."""
    table = model.get_input_embeddings()
    scale = getattr(table, "embed_scale", 1.0)  # Gemma scales inside its embedding module
    weight = table.weight.detach().float() * (scale.float().cpu() if torch.is_tensor(scale) else scale)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((count, weight.shape[1]), generator=generator) * weight.std(0).cpu()
    return PromptTokens(weight.mean(0).cpu() + noise, virtual_base(model), model_name)


def load_prompt_tokens(path: str | Path, model) -> PromptTokens:
    """Trained prompt tokens from ``path``, checked against ``model``'s embedding size and vocabulary."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    vectors = tensors["vectors"]
    hidden = model.get_input_embeddings().weight.shape[1]
    base = virtual_base(model)
    if vectors.shape[1] != hidden or int(metadata.get("base", base)) != base:
        raise ValueError(f"The prompt tokens in {path} were trained for {metadata.get('model', 'another model')!r} "
                         f"(hidden size {vectors.shape[1]}, vocabulary {metadata.get('base')}), not this model "
                         f"(hidden size {hidden}, vocabulary {base}).")
    return PromptTokens(vectors, base, metadata.get("model", ""))


TRAINED = TrainedWeights("ppd", "prompt_tokens", load_prompt_tokens)
trained_path, prompt_tokens_for = TRAINED.path, TRAINED.load_for


@dataclass
class Guesses:
    """Per depth below the next root, the top-K tokens of a prompt token's logits and their probabilities."""

    tokens: list[list[int]]
    probs: list[list[float]]

    def tree(self, root: int, max_nodes: int) -> tuple[TokenTree, list[int], list[float]]:
        """The ``max_nodes`` most probable nodes of the product tree (a path's probability is the product of
        its guesses', the paper's independence assumption), best first, so every prefix is a tree. Returns the
        tree, each node's rank among its depth's guesses, and its path probability."""
        tokens, parents, ranks, path = [root], [-1], [0], [1.0]
        frontier = [(-self.probs[0][0], 0, 0, 0)] if self.probs and max_nodes > 1 else []
        while frontier and len(tokens) < max_nodes:
            negative, parent, depth, rank = heapq.heappop(frontier)
            node = len(tokens)
            tokens.append(self.tokens[depth][rank])
            parents.append(parent)
            ranks.append(rank)
            path.append(-negative)
            if rank + 1 < len(self.tokens[depth]):  # the next sibling
                heapq.heappush(frontier, (-path[parent] * self.probs[depth][rank + 1], parent, depth, rank + 1))
            if depth + 1 < len(self.tokens):  # the first child
                heapq.heappush(frontier, (-path[node] * self.probs[depth + 1][0], node, depth + 1, 0))
        return TokenTree(tokens, parents), ranks, path


class PromptChains:
    """Hangs prompt-token chains below chosen tree nodes and reads the next step's guesses back: the part
    of PPD that the standalone drafter and the merged one share. ``gain`` estimates what guesses are worth
    (accepted tokens they alone proposed, per step that had them); it decides how many chains pay for their
    rows under the cost curve."""

    def __init__(self, prompts: PromptTokens, top_k: int = TOP_K, memory: float = 0.95,
                 length: int = CHAIN_LENGTH) -> None:
        self.prompts = prompts
        self.ids = prompts.ids[:length]  # a prefix of a trained chain is a trained chain (p_k never sees p_>k)
        self.top_k = top_k
        self.memory = memory
        self.gain, self.gain_weight = 1.0, 1.0  # prior: one token per step, worth one step
        self._guesses: Guesses | None = None
        self._pending: tuple[int, torch.Tensor] | None = None  # chain rows and their packed guesses, on the device
        self.chains = 0  # chains attached, over the request (for stats)
        self.prices = StepPrices()

    def start(self) -> None:
        self.guesses = None

    @property
    def guesses(self) -> Guesses | None:
        """The guesses ``read`` kept, read from the device when first asked for (the next ``propose``): the read
        waits for them there, so it waits as late as it can and the host finishes the step meanwhile."""
        if self._pending is not None:
            rows, packed = self._pending
            values = packed.tolist()
            self._guesses, self._pending = Guesses([list(map(int, row)) for row in values[:rows]], values[rows:]), None
        return self._guesses

    @guesses.setter
    def guesses(self, guesses: Guesses | None) -> None:
        self._guesses, self._pending = guesses, None

    def attach(self, tree: TokenTree, path: list[float], expected: float, costs: dict[int, float],
               max_nodes: int) -> TokenTree:
        """``tree`` plus chains below the nodes most likely to be the last accepted one, as many as raise
        expected tokens per unit of forward cost. ``path[i]`` is node i's probability of being accepted and
        ``expected`` the tree's expected tokens (bonus included)."""
        m, n = len(self.ids), len(tree)
        prices = self.prices(costs, max(n, max_nodes))
        below = [0.0] * n
        for i in range(1, n):
            below[tree.parents[i]] += path[i]
        last = [max(path[i] - below[i], 0.0) for i in range(n)]
        order = sorted(range(n), key=lambda i: -last[i])
        best, best_rate, gained = 0, expected / prices[n], expected
        for count, node in enumerate(order, start=1):
            if n + m * count > max_nodes:
                break
            gained += last[node] * self.gain
            rate = gained / prices[n + m * count]
            if rate > best_rate:
                best, best_rate = count, rate
        tokens, parents = list(tree.tokens), list(tree.parents)
        for node in order[:best]:
            parent = node
            for virtual in self.ids:
                tokens.append(virtual)
                parents.append(parent)
                parent = len(tokens) - 1
        self.chains += best
        return TokenTree(tokens, parents)

    def sized(self, tree: TokenTree, path: list[float], costs: dict[int, float], max_nodes: int) -> int:
        """How many leading nodes of a best-first ``tree`` (``path``: their probabilities) to verify: the one rule
        (``hardware.pick_tree_size``, priced by ``hardware.step_cost``) with two more candidates per prefix. Each
        prefix is priced, rows and all, alone (the rule's candidate), with the chain ``attach`` would hang below
        its likeliest end (worth ``gain`` tokens times that node's chance to end the path) and with a chain below
        every node (worth ``gain``: the chances to end the path add up to one). Priced without the chains it carries,
        the tree shrank to the bare root wherever one chain took the forward into a dearer bucket (the static path's
        8-row bucket): the guesses were read on every step and never verified (tau 1.0 served on an H100)."""
        m = len(self.ids)
        prices = self.prices(costs, max(len(path), max_nodes))
        last = [0.0] * len(path)
        ends: list[tuple[float, int]] = []  # max-heap of (-last, node), stale entries dropped when on top
        best, best_rate, expected = 1, 0.0, 0.0
        for node, probability in enumerate(path):
            expected += probability
            last[node] = probability
            heapq.heappush(ends, (-probability, node))
            if node:
                parent = tree.parents[node]
                last[parent] -= probability
                heapq.heappush(ends, (-last[parent], parent))
            while -ends[0][0] != last[ends[0][1]]:
                heapq.heappop(ends)
            rate = expected / prices[node + 1]
            if node + 1 + m <= max_nodes:
                chained = expected + max(last[ends[0][1]], 0.0) * self.gain
                rate = max(rate, chained / prices[node + 1 + m])
            if (node + 1) * (1 + m) <= max_nodes:
                rate = max(rate, (expected + self.gain) / prices[(node + 1) * (1 + m)])
            if rate > best_rate:
                best, best_rate = node + 1, rate
        return best

    def real_part(self, tree: TokenTree) -> int:
        """How many leading nodes are real tokens (chains always come after them)."""
        return sum(token < self.prompts.base for token in tree.tokens)

    def read(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """Keep the guesses of the chain below the last accepted node (none if it had no chain): their top-K
        computed on the device and read in one transfer when ``guesses`` is first asked for; no children table (a
        scan per chain node is cheaper)."""
        node = tree.path_of(accepted)[-1]
        rows, first = [], self.ids[0]
        child = tree.child(node, first)
        while child is not None:
            rows.append(child)
            child = tree.child(child, self.prompts.base + len(rows))
        if not rows:
            self.guesses = None
            return
        contiguous = rows[-1] - rows[0] == len(rows) - 1  # attach lays a chain out in a row: a view, no index upload
        chosen = (logits[rows[0]:rows[-1] + 1] if contiguous else logits[rows]).float()
        top = chosen.topk(self.top_k, dim=-1)
        probs = (top.values - chosen.logsumexp(-1, keepdim=True)).exp()
        self._pending = len(rows), torch.cat([top.indices.double(), probs.double()])  # float64 holds both exactly

    def credit(self, alone: int) -> None:
        """A step that had guesses accepted ``alone`` tokens that only they proposed."""
        self.gain_weight = self.gain_weight * self.memory + 1
        self.gain += (alone - self.gain) / self.gain_weight


class ParallelPromptDecoding(Drafter):
    """PPD on its own: the tree is the product tree of the last accepted node's guesses (size picked by the
    cost curve from the guesses' probabilities), with chains below the nodes likeliest to end the path."""

    def __init__(self, prompts: PromptTokens, costs: dict[int, float], max_nodes: int = 128) -> None:
        self.chains = PromptChains(prompts)
        self.costs = costs
        self.max_nodes = max_nodes
        self.guessed = False  # the last tree verified guesses (a step that offered none says nothing of them)

    def start(self, prompt: list[int]) -> None:
        self.chains.start()

    def embedding(self, model):
        return self.chains.prompts.embedding(model)

    def trained_used(self) -> dict[str, bool]:
        return {"ppd_prompt_tokens": True}

    def propose(self, context: list[int]) -> TokenTree:
        guesses = self.chains.guesses
        if guesses is None:
            tree, path = TokenTree.chain(context[-1], []), [1.0]
        else:
            tree, _, path = guesses.tree(context[-1], self.max_nodes)
            size = self.chains.sized(tree, path, self.costs, self.max_nodes)
            tree, path = tree.truncated(max_nodes=size), path[:size]
        self.guessed = len(tree) > 1
        return self.chains.attach(tree, path, sum(path), self.costs, self.max_nodes)

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        if self.guessed:
            self.chains.credit(len(accepted) - 1)
        self.chains.read(tree, logits, accepted)
