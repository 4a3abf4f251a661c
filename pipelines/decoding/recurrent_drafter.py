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
``python -m pipelines.decoding.recurrent_training`` writes), else the ones packaged in ``weights/``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .hardware import pick_tree_size
from .trained import TrainedWeights
from .tree import TokenTree
from .verify import Drafter

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
trained_path, head_for, use_head = TRAINED.path, TRAINED.for_model, TRAINED.use


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
        self.ids = ids.tolist() if len(ids) else None
        self.narrow = min(narrow_vocab, len(ids)) if len(ids) else len(weight)  # no frequency order: all rows
        self.model = model
        self.anchor: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def start(self) -> None:
        self.anchor = None

    def read_hidden(self, hidden: torch.Tensor) -> None:
        self._rows = hidden

    def update(self, tree: TokenTree, accepted: list[int]) -> None:
        """Keep the hidden state of the last accepted node: the next root's features."""
        self.anchor = self._rows[tree.path_of(accepted)[-1]].clone()

    def plan(self, max_nodes: int) -> list[tuple[int, int]]:
        """Per level, how many nodes to expand and over how many vocabulary rows, for an offer of
        ``max_nodes``: the full widths from ``FULL_OFFER`` nodes (a GPU's trees), else one narrow chain of about
        log2(max_nodes) levels, so a CPU's small trees pay for a few one-row head calls only."""
        if max_nodes >= FULL_OFFER:
            return [(width, len(self.lm_weight) if level < WIDE_LEVELS else self.narrow)
                    for level, width in enumerate(self.widths)]
        return [(1, self.narrow)] * max(3, max_nodes.bit_length() - 1)

    @torch.inference_mode()
    def candidates(self, root: int, max_nodes: int) -> tuple[TokenTree, list[int], list[float], list[float]] | None:
        """Up to ``max_nodes`` nodes below ``root``, likeliest paths first: the tree, each node's rank among its
        siblings, its probability under the head given its parent, and its path probability."""
        if self.anchor is None:
            return None
        hidden = self.anchor
        tokens, parents, ranks, conditional, path = [root], [-1], [0], [1.0], [1.0]
        before = {0: hidden}  # the state a node's token is fed to (its parent's)
        level = [0]
        for width, rows in self.plan(max_nodes):
            chosen = sorted(level, key=lambda i: -path[i])[:width]
            if not chosen or len(tokens) >= max_nodes:
                break
            states = self.head.advance(torch.stack([before[i] for i in chosen]),
                                       self.embedding(torch.tensor([tokens[i] for i in chosen], device=hidden.device)))
            readout = self.head.readout(states, hidden.expand(len(chosen), -1))
            logits = lm_head_logits(self.model, readout, self.lm_weight[:rows]).float()
            top = logits.topk(self.top_k, dim=-1)
            probs = (top.values - logits.logsumexp(-1, keepdim=True)).exp().tolist()
            indices = top.indices.tolist()
            level = []
            for j, node in enumerate(chosen):
                for rank, (index, p) in enumerate(zip(indices[j], probs[j])):
                    level.append(len(tokens))
                    before[len(tokens)] = states[j]
                    tokens.append(self.ids[index] if self.ids is not None else index)
                    parents.append(node)
                    ranks.append(rank)
                    conditional.append(p)
                    path.append(path[node] * p)
        # best first (a child's path is never likelier than its parent's, and comes later on ties), so every
        # prefix is a tree and ``truncated`` keeps the likeliest nodes
        kept = sorted(range(len(tokens)), key=lambda i: (-path[i], i))[:max_nodes]
        index = {old: new for new, old in enumerate(kept)}
        tree = TokenTree([tokens[i] for i in kept], [index[parents[i]] if i else -1 for i in kept])
        return tree, [ranks[i] for i in kept], [conditional[i] for i in kept], [path[i] for i in kept]


class RecurrentDrafting(Drafter):
    """ReDrafter on its own: the head's tree below the root, cut where the cost curve says more nodes stop
    paying (by the head's own path probabilities)."""

    reads_hidden = True

    def __init__(self, head: DraftHead, model, costs: dict[int, float], max_nodes: int = 64) -> None:
        self.drafts = HeadDrafts(head, model)
        self.costs = costs
        self.max_nodes = max_nodes

    def start(self, prompt: list[int]) -> None:
        self.drafts.start()

    def read_hidden(self, hidden: torch.Tensor) -> None:
        self.drafts.read_hidden(hidden)

    def propose(self, context: list[int]) -> TokenTree:
        found = self.drafts.candidates(context[-1], self.max_nodes)
        if found is None:
            return TokenTree.chain(context[-1], [])
        tree, _, _, path = found
        return tree.truncated(max_nodes=pick_tree_size(path, self.costs, extra_tokens=0))

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.drafts.update(tree, accepted)
