"""Recurrent Drafter (Cheng et al., "Recurrent Drafter for Fast Speculative Decoding in Large Language
Models", arXiv 2403.09919), as a head on a frozen model.

The head reads the model's own final hidden state h of the last verified token (the LM head's input, which
the verify forward returns anyway) and keeps a small recurrent state over the tokens drafted below it:
``s_0 = h``, ``s_k = SiLU(W [s_(k-1); e(x_k)])``; each state is read out through one residual block over
``[s_k; h]`` into the model's own frozen LM head. So a draft conditions on the whole context (through h) and on
the draft so far (through s), at the cost of a few small matmuls per tree level and no second model. The
tree is grown level by level from the likeliest nodes (ReDrafter's beam, kept as a tree: the verifier takes
any shape). Like FR-Spec (Zhao et al. 2025, arXiv 2502.14856) the head scores only the most frequent part of
the vocabulary (what the model writes in its training data): on a CPU the full 49k-row LM head would cost
more than the draft is worth. Lossless like every drafter here: only the verifier decides.

Trained heads: ``$TOKENWORKS_CACHE/draft_heads/redrafter-<model>.safetensors`` (what
``python -m pipelines.decoding.training.recurrent_training`` writes), else the ones packaged in ``weights/``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..captured import CapturedCalls, capture_supported
from ..hardware import DraftingCost, StepPrices, pick_tree_size
from ..trained import TrainedWeights
from ..tree import TokenTree
from ..verify import Drafter

TOP_K = 8  # children scored per expanded node
# nodes expanded per tree level (level 0: the root) for offers of FULL_OFFER nodes or more (13 prompts, GPU
# curve: (1, 4, 3, 2, 2, 1, 1, 1) tau 3.24, these 3.31, (1, 3, 2, 2, 1, 1) 3.18; two more levels of one node:
# the same 3.31, their nodes never rank among the offered ones)
WIDTHS = (1, 4, 4, 3, 2, 2)
FULL_OFFER = 64
# vocabulary rows the head scores, most frequent first: DRAFT_VOCAB at the first WIDE_LEVELS levels of a wide
# tree, NARROW_VOCAB below them and in a small tree's chain (13 prompts, GPU curve, every level alike: 16384 rows
# tau 3.30 with 11.5% of the step drafting, 8192 rows 3.25 with 9.7%, 4096 rows 3.17 with 9.1%; CPU curve, a
# 4-level chain over 4096 rows: tau 1.77 for 8.9% drafting; 8192 rows, 3 levels: 1.78 for 10.0%)
DRAFT_VOCAB, NARROW_VOCAB, WIDE_LEVELS = 8192, 4096, 2


def lm_head_logits(model, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The model's LM head on chosen rows (optionally only the vocabulary rows in ``weight``), with the
    final soft-capping Gemma applies."""
    logits = model.get_output_embeddings()(hidden) if weight is None else hidden @ weight.T
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class DraftHead(torch.nn.Module):
    """The recurrent head: ``advance`` consumes one drafted token, ``readout`` maps a state to the hidden
    space the model's LM head reads (h plus a learnt correction, zero at initialisation). ``vocab`` holds the
    token ids the head may draft, most frequent first (all of them when empty)."""

    def __init__(self, hidden_size: int, vocab: torch.Tensor | None = None, model_name: str = "") -> None:
        super().__init__()
        width = 2 * hidden_size
        self.cell = torch.nn.Linear(width, hidden_size)
        self.mix = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, hidden_size)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        self.register_buffer("vocab", vocab if vocab is not None else torch.zeros(0, dtype=torch.long))
        self.model_name = model_name

    def advance(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return F.silu(self.cell(torch.cat([_rms(state), _rms(embedded)], -1)))

    def readout(self, state: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([_rms(state), _rms(hidden)], -1)
        x = x + F.silu(self.mix(x))
        return hidden + self.out(x)

    def save(self, path: str | Path, **metadata: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"model": self.model_name, **metadata})


def new_head(model, model_name: str = "", vocab: torch.Tensor | None = None) -> DraftHead:
    """An untrained head for ``model`` on its device and dtype (in tests: poor drafts, complete mechanics)."""
    weight = model.get_output_embeddings().weight
    return DraftHead(weight.shape[1], vocab, model_name).to(weight.device, weight.dtype)


def load_head(path: str | Path, model) -> DraftHead:
    """A trained head from ``path``, checked against ``model``'s hidden size and vocabulary."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    weight = model.get_output_embeddings().weight
    hidden, vocab = tensors["cell.weight"].shape[0], tensors["vocab"]
    if hidden != weight.shape[1] or (len(vocab) and int(vocab.max()) >= weight.shape[0]):
        raise ValueError(f"The draft head in {path} was trained for {metadata.get('model', 'another model')!r} "
                         f"(hidden size {hidden}), not this model (hidden size {weight.shape[1]}, "
                         f"vocabulary {weight.shape[0]}).")
    head = DraftHead(hidden, vocab, metadata.get("model", ""))
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return head.to(weight.device, weight.dtype).eval()


TRAINED = TrainedWeights("redrafter", "draft_heads", load_head)
trained_path, head_for = TRAINED.path, TRAINED.load_for


class HeadDrafts:
    """The head's side of a decoding run: finds the hidden state of the last accepted node after each
    verification and grows the next step's candidate tree from it. Shared by the standalone drafter and the
    merged one."""

    def __init__(self, head: DraftHead, model, top_k: int = TOP_K, widths: tuple[int, ...] = WIDTHS,
                 vocab: int = DRAFT_VOCAB, narrow_vocab: int = NARROW_VOCAB) -> None:
        self.head = head
        self.top_k, self.widths = top_k, widths
        self.embedding = model.get_input_embeddings()
        weight = model.get_output_embeddings().weight
        ids = head.vocab[:vocab] if vocab else head.vocab
        self.lm_weight = weight[ids] if len(ids) else weight  # a prefix of its rows is a narrower vocabulary
        self.id_map = ids if len(ids) else None  # the head's row -> token id (None: the row is the id)
        self.narrow = min(narrow_vocab, len(ids)) if len(ids) else len(weight)  # no frequency order: all rows
        self.model = model
        self.calls = CapturedCalls(capture_supported(weight.device))
        self.anchor: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def start(self) -> None:
        self.anchor = None

    def read_hidden(self, hidden: torch.Tensor) -> None:
        self._rows = hidden

    def update(self, last: int) -> None:
        """Keep the hidden state of node ``last``, the last accepted one: the next root's features."""
        self.anchor = self._rows[last].clone()

    def plan(self, max_nodes: int) -> list[tuple[int, int]]:
        """Per level, how many nodes to expand and over how many vocabulary rows, for an offer of
        ``max_nodes``: the full widths from ``FULL_OFFER`` nodes (a GPU's trees), else one narrow chain of about
        log2(max_nodes) levels, so a CPU's small trees pay for a few one-row head calls only."""
        if max_nodes >= FULL_OFFER:
            return [(width, len(self.lm_weight) if level < WIDE_LEVELS else self.narrow)
                    for level, width in enumerate(self.widths)]
        return [(1, self.narrow)] * max(3, max_nodes.bit_length() - 1)

    def levels(self, max_nodes: int) -> list[tuple[int, int]]:
        """``plan(max_nodes)`` as it runs: nodes expanded per level (never more than the level holds) and rows,
        stopping once ``max_nodes`` nodes are drafted. Host arithmetic only, so every step of an offer has the same
        shapes (one captured graph per offer)."""
        levels, count, level_size = [], 1, 1
        for width, rows in self.plan(max_nodes):
            take = min(width, level_size)
            if take == 0 or count >= max_nodes:
                break
            levels.append((take, rows))
            count, level_size = count + take * self.top_k, take * self.top_k
        return levels

    def grow(self, hidden: torch.Tensor, root: torch.Tensor, levels: tuple[tuple[int, int], ...],
             max_nodes: int) -> torch.Tensor:
        """The tree on the device, fixed shapes only: per level the likeliest ``take`` nodes of the level (ties:
        the earlier node) advance the recurrent state and score their ``top_k`` children. Path probabilities in
        float64, as Python's floats were. Returns ``[5, kept]`` float64 rows: tokens, parents, ranks, conditional
        and path probabilities, best first (a child never before its parent)."""
        device, k = hidden.device, self.top_k
        tokens, parents = root.reshape(1), torch.full((1,), -1, device=device)
        ranks = torch.zeros(1, dtype=torch.long, device=device)
        conditional = torch.ones(1, dtype=torch.float64, device=device)
        path = torch.ones(1, dtype=torch.float64, device=device)
        before, first = hidden[None], 0  # the states the current level's tokens are fed to; its first node
        for take, rows in levels:
            chosen = first + path[first:].sort(descending=True, stable=True).indices[:take]
            states = self.head.advance(before[chosen - first], self.embedding(tokens[chosen]))
            logits = lm_head_logits(self.model, self.head.readout(states, hidden.expand(take, -1)),
                                    self.lm_weight[:rows]).float()
            top = logits.topk(k, dim=-1)
            probs = (top.values - logits.logsumexp(-1, keepdim=True)).exp().double()
            children = self.id_map[top.indices] if self.id_map is not None else top.indices
            first = len(tokens)
            tokens = torch.cat([tokens, children.flatten()])
            parents = torch.cat([parents, chosen.repeat_interleave(k)])
            ranks = torch.cat([ranks, torch.arange(k, device=device).repeat(take)])
            conditional = torch.cat([conditional, probs.flatten()])
            path = torch.cat([path, (path[chosen][:, None] * probs).flatten()])
            before = states.repeat_interleave(k, 0)
        return kept_best_first(tokens, parents, ranks, conditional, path, max_nodes)

    def candidates(self, root: int, max_nodes: int) -> tuple[TokenTree, list[int], list[float], list[float]] | None:
        """Up to ``max_nodes`` nodes below ``root``, likeliest paths first: the tree, each node's rank among its
        siblings, its probability under the head given its parent, and its path probability."""
        grown = self.launch(root, max_nodes)
        return self.read(grown) if grown is not None else None

    @torch.inference_mode()
    def launch(self, root: int, max_nodes: int) -> torch.Tensor | None:
        """Start growing ``candidates``' tree on the device (None before the first verification): one captured
        graph per offer size on a GPU, whose output buffer ``read`` takes (valid until the next launch)."""
        if self.anchor is None:
            return None
        levels = tuple(self.levels(max_nodes))
        root_id = torch.tensor(root).to(self.anchor.device, non_blocking=True)  # staged, no wait for the device
        return self.calls.call((levels, max_nodes), lambda h, r: self.grow(h, r, levels, max_nodes), self.anchor,
                               root_id)

    def read(self, grown: torch.Tensor) -> tuple[TokenTree, list[int], list[float], list[float]]:
        """``candidates``' result from a launched tree: the one read from the device."""
        tokens, parents, ranks, conditional, path = grown.tolist()
        tree = TokenTree(list(map(int, tokens)), list(map(int, parents)))
        return tree, list(map(int, ranks)), conditional, path


def kept_best_first(tokens: torch.Tensor, parents: torch.Tensor, ranks: torch.Tensor, conditional: torch.Tensor,
                    path: torch.Tensor, max_nodes: int) -> torch.Tensor:
    """The ``max_nodes`` likeliest nodes (ties: the earlier), parents renumbered, packed ``[5, kept]`` float64."""
    kept = path.sort(descending=True, stable=True).indices[:max_nodes]
    renumber = torch.full_like(parents, -1)
    renumber[kept] = torch.arange(len(kept), device=kept.device)
    new_parents = torch.where(parents[kept] >= 0, renumber[parents[kept].clamp(min=0)], -1)
    return torch.stack([tokens[kept].double(), new_parents.double(), ranks[kept].double(), conditional[kept],
                        path[kept]])


class RecurrentDrafting(Drafter):
    """ReDrafter on its own: the head's tree below the root, cut where the cost curve says more nodes stop
    paying (by the head's own path probabilities). The next step's head starts in ``update``, as soon as the
    accepted node (its features) and the bonus token (the next root) are known: on a GPU its levels then run
    while the host finishes the step (the run's bookkeeping, the text streamed out) instead of while it waits in
    ``propose``. Same inputs, same tree. With a ``host`` price (served), the rule also charges the measured host
    seconds of a drafted step, on the head's path probabilities scaled down to the tokens it has been getting
    accepted (``DraftingCost.calibration``), and where no tree pays the drafter takes plain steps that launch no
    head."""

    reads_hidden = True

    def __init__(self, head: DraftHead, model, costs: dict[int, float], max_nodes: int = 64,
                 host: DraftingCost | None = None) -> None:
        self.drafts = HeadDrafts(head, model)
        self.costs = costs
        self.max_nodes = max_nodes
        self.prices = StepPrices()
        self.host = host  # the host's price of a drafted step for the tree-size rule, and its plain fallback
        self._launched: tuple[int, torch.Tensor | None] | None = None  # (root, grown tree) started by ``update``
        self._plain_step = False  # this step drafts nothing (the plain fallback)
        self._expected = 0.0  # the drafted tokens the head expected this step

    def start(self, prompt: list[int]) -> None:
        self.drafts.start()
        self._launched = None
        if self.host is not None:
            self.host.start()

    def finish(self) -> None:
        self._launched = None

    def read_hidden(self, hidden: torch.Tensor) -> None:
        self.drafts.read_hidden(hidden)

    def trained_used(self) -> dict[str, bool]:
        return {"draft_head": True}

    def propose(self, context: list[int]) -> TokenTree:
        root, launched = context[-1], self._launched
        self._launched = None
        self._plain_step = self.host is not None and self.host.plain()
        if self._plain_step:
            return TokenTree.chain(root, [])
        started = launched is not None and launched[0] == root
        grown = launched[1] if started else self.drafts.launch(root, self.max_nodes)
        if grown is None:  # no features yet (the first step): nothing drafted, nothing to price
            self._plain_step = True
            return TokenTree.chain(root, [])
        tree, _, _, path = self.drafts.read(grown)
        prices = self.prices(self.costs, max(len(path), self.max_nodes))
        if self.host is None:
            return tree.truncated(max_nodes=pick_tree_size(path, self.costs, prices))
        scale = self.host.calibration  # the head's probabilities, scaled to what it has been getting accepted
        size = pick_tree_size([path[0]] + [p * scale for p in path[1:]] if scale < 1.0 else path, self.costs, prices,
                              self.host.charge)
        self._expected = sum(path[1:size])
        self.host.chose(size)
        return tree.truncated(max_nodes=size)

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.drafts.update(tree.path_of(accepted)[-1])
        if self.host is None or not self.host.plain_left:
            self._launched = accepted[-1], self.drafts.launch(accepted[-1], self.max_nodes)
        if self.host is not None and not self._plain_step:
            self.host.accepted(self._expected, len(accepted) - 1)

    def drafting_took(self, seconds: float) -> None:
        if self.host is not None and not self._plain_step:
            self.host.spent(seconds)
            self.host.drafted()
