"""Hardware-aware tree size (PPD's idea, Chen et al. arXiv 2405.18628): a bigger tree accepts more tokens
per forward but a forward over more query tokens costs more, by an amount that depends on the device
(nearly flat on a host-bound GPU, close to linear on a CPU). Measure the cost curve, then keep the prefix
of the tree template that maximises expected accepted tokens per second.
"""
from __future__ import annotations

import json
import os
import platform
import time
from itertools import islice
from pathlib import Path

import torch

from .tree import TokenTree
from .verify import CausalLMForward

# H200, Llama-2-7B, bf16, sdpa, 512-token cache: GPU kernel time per forward relative to n = 1
# (reference text-decoding.md §9.2; the static-cache/CUDA-graph regime, where trees cost the most).
GPU_STEP_COST = {1: 1.0, 8: 1.13, 16: 1.18, 32: 1.20, 64: 1.21, 96: 1.28, 128: 1.30, 192: 1.51, 256: 1.61}
# small sizes densely: on a CPU the cost can jump between neighbours (MKL switches GEMM kernels at 4 rows)
DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 81, 96, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_step_cost(model, sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 128, repeats: int = 5,
                      seed: int = 0, forward: CausalLMForward | None = None) -> dict[int, float]:
    """Seconds of one forward with ``n`` query tokens (a root and ``n - 1`` children: a tree mask) after a
    ``context``-token cache, for each ``n`` in ``sizes``. Weights do not matter, only shapes. ``forward`` is the
    adapter that serves requests (the static, captured path on a GPU); the model's own forward by default."""
    forward = forward or CausalLMForward(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (context + max(sizes),), generator=generator).tolist()
    cache = forward.new_cache()
    forward(tokens[:context], torch.arange(context, device=forward.device)[None], None, cache, keep=1)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    # round-robin over sizes so a burst of load from elsewhere hits all sizes alike; first round = warm-up
    for round_ in range(repeats + 1):
        for n in sizes:
            tree = TokenTree(tokens[context:context + n], [-1] + [0] * (n - 1))
            mask, positions = forward.block_inputs(tree, 0, context)
            _sync(forward.device)
            started = time.perf_counter()
            forward(tree.tokens, positions, mask, cache)
            _sync(forward.device)
            if round_:
                samples[n].append(time.perf_counter() - started)
            cache.crop(-n)
    # the minimum, because load from other processes only ever adds time; and a forward over more tokens
    # never costs less, so the curve is kept monotone
    costs, running = {}, 0.0
    for n in sorted(sizes):
        running = max(running, min(samples[n]))
        costs[n] = running
    return costs


def bucketed(costs: dict[int, float], buckets: tuple[int, ...]) -> dict[int, float]:
    """A curve measured at the bucket sizes of a padded forward, for every size up to the largest: ``n`` rows
    cost what their bucket costs, so a tree grows to fill its bucket and never spills into the next one for a
    few nodes (interpolating between buckets would price 65 rows near 64)."""
    top = max(buckets)
    return {n: costs[next(b for b in sorted(buckets) if b >= n)] for n in range(1, top + 1)}


def interpolate(costs: dict[int, float], n: int) -> float:
    """Cost of ``n`` query tokens, linear between measured sizes (and beyond the last two)."""
    sizes = sorted(costs)
    if n in costs:
        return costs[n]
    below = [s for s in sizes if s < n]
    above = [s for s in sizes if s > n]
    lo, hi = (below[-1], above[0]) if below and above else ((sizes[-2], sizes[-1]) if below else (sizes[0], sizes[1]))
    return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)


# rows a step re-feeds besides its tree, on average: the accepted tokens whose cache rows were dropped with a rejected
# sibling before them (verify.py's crop + re-feed). A chain drafter re-feeds none; a tree whose accepted path leaves
# its first chain re-feeds the rest of that path.
REFED_ROWS = 1


def step_cost(costs: dict[int, float], nodes: int) -> float:
    """What a step verifying ``nodes`` tree nodes (root included) costs: the curve at those nodes plus
    ``REFED_ROWS``. Re-fed rows count because they ride in the same forward as the tree: on a CPU each is one more
    row of a near-linear cost, and on a padded forward a tree that fills its bucket alone spills into the next,
    dearer one (``static.StaticForward.fit`` then cuts its last nodes, which the rule had paid for)."""
    return interpolate(costs, nodes + REFED_ROWS)


def step_prices(costs: dict[int, float], sizes: int) -> list[float]:
    """``step_cost`` at index n for every n up to ``sizes`` (index 0 unused): for drafters that size every step."""
    return [0.0] + [step_cost(costs, n) for n in range(1, sizes + 1)]


class StepPrices:
    """``step_prices(costs, sizes)`` remembered for the last curve asked about: drafters that size a tree every step
    price the same sizes again (PPD's sizing priced ~300 sizes a step, each an interpolation over the curve: a
    millisecond of host time per step on a CPU)."""

    def __init__(self) -> None:
        self._curve: dict[int, float] | None = None
        self._prices: list[float] = [0.0]

    def __call__(self, costs: dict[int, float], sizes: int) -> list[float]:
        """Index n holds ``step_cost(costs, n)``, for every n up to at least ``sizes``."""
        if self._curve is not costs or len(self._prices) <= sizes:
            self._curve, self._prices = costs, step_prices(costs, sizes)
        return self._prices


def pick_tree_size(path: list[float], costs: dict[int, float], prices: list[float] | None = None,
                   host_s: float = 0.0) -> int:
    """The one tree-size rule: how many leading nodes (root included) of a best-first tree to verify, the prefix
    with the most expected accepted tokens per second of step. ``path[i]`` is the probability that node i is on
    the accepted path (the root's is 1: it always yields the bonus token), so a prefix of n nodes commits
    ``sum(path[:n])`` tokens per step on average, for ``step_cost(costs, n)`` of forward plus, for any tree beyond
    the bare root, ``host_s``: the drafter's measured host seconds per drafted step (``DraftingCost``). A bare root
    is a plain one-token step, which drafts nothing, so where no tree's expected tokens pay for its forward and its
    drafting the rule answers 1 and the drafter falls back to plain steps. Every drafter that sizes its tree
    supplies only ``path`` (and its host cost); ``prices`` is ``step_prices(costs, len(path))`` when the caller
    keeps it."""
    prices = prices if prices is not None else step_prices(costs, len(path))
    best, expected = 1, path[0]
    best_rate = expected / prices[1]
    for n, rate in enumerate(islice(path, 1, None), start=2):
        expected += rate
        throughput = expected / (prices[n] + host_s)
        if throughput > best_rate:
            best, best_rate = n, throughput
    return best


# plain steps after the rule answers a bare root: the first stretch, doubled while drafting keeps not paying
PLAIN_STRETCH, LONGEST_STRETCH = 2, 32


class DraftingCost:
    """What drafting costs the host per drafted step (its ``propose`` and ``update``, wall clock, as the verifier
    times them: on a GPU their reads wait for device work a plain step never starts), and the plain
    fallback the tree-size rule leads to. Where the rule answers a bare root, no tree paid for its drafting: the
    drafter then takes plain one-token steps that draft nothing, ``stretch`` of them (doubled each time drafting
    is found not to pay again, back to the first when it pays, and at every request), then one probe: a step
    priced at no host cost, so it drafts whatever its forward alone pays for and its outcome updates the estimates
    the next step is priced on. ``fixed`` stands in for the measurement (tests: a known price, so the trees are
    deterministic)."""

    def __init__(self, memory: float = 0.9, fixed: float | None = None) -> None:
        self.memory = memory  # the mean follows the last ~10 drafted steps
        self.fixed = fixed
        self._total = self._weight = self._step = 0.0
        self._predicted = self._realized = 0.0  # drafted tokens a drafter's own probabilities expected, and got
        self.stretch = PLAIN_STRETCH
        self.plain_left = 0  # plain steps still to take before drafting again
        self.probing = False  # the step after a plain stretch: priced without the host

    @property
    def seconds(self) -> float:
        """Host seconds per drafted step: the running mean, 0 before any was measured."""
        if self.fixed is not None:
            return self.fixed
        return self._total / self._weight if self._weight else 0.0

    @property
    def charge(self) -> float:
        """Host seconds the tree-size rule charges this step: none on a probe. Charged, a probe would be sized on
        the estimates the plain stretch left unchanged (a merged drafter's rates learn from drafted trees only),
        answer a bare root again, and a request that once fell back would never draft again."""
        return 0.0 if self.probing else self.seconds

    def spent(self, seconds: float) -> None:
        """Host seconds the current drafted step spent drafting (its ``propose``, then its ``update``)."""
        self._step += seconds

    def drafted(self) -> None:
        """The drafted step is over: its host seconds join the running mean."""
        self._total = self._total * self.memory + self._step
        self._weight = self._weight * self.memory + 1.0
        self._step = 0.0

    def accepted(self, predicted: float, realized: int) -> None:
        """A drafted step's drafted tokens: those its path probabilities expected and those accepted."""
        self._predicted = self._predicted * self.memory + predicted
        self._realized = self._realized * self.memory + realized

    @property
    def calibration(self) -> float:
        """How far to scale path probabilities that are a model's own rather than measured rates (a draft head's):
        accepted over expected drafted tokens, over the last ~10 steps, never above 1 (an overconfident head on a
        prompt it drafts badly, a translation, would keep paying for trees that no longer pay). One token expected and
        accepted is the prior: plain steps let the evidence fade towards it, so a stretch ends in a fair probe (with
        no prior a head that had drafted nothing right would be scaled to 0 and never tried again)."""
        return min(1.0, (self._realized + 1.0) / (self._predicted + 1.0))

    def chose(self, size: int) -> None:
        """The rule's answer for a drafted step: a bare root starts a plain stretch (each one longer than the
        last while drafting keeps not paying), a tree ends the doubling. A probe's answer changes neither: the step
        after it decides on what the probe saw."""
        if self.probing:
            self.probing = False
        elif size > 1:
            self.stretch = PLAIN_STRETCH
        else:
            self.plain_left = self.stretch
            self.stretch = min(2 * self.stretch, LONGEST_STRETCH)

    def plain(self) -> bool:
        """Whether the step about to be proposed is a plain one (it counts the stretch down)."""
        if self.plain_left:
            self.plain_left -= 1
            self.probing = not self.plain_left
            self._predicted, self._realized = self._predicted * self.memory, self._realized * self.memory
            return True
        return False

    def start(self) -> None:
        """A new request drafts from its first step: its prompt may copy where the last one did not."""
        self.plain_left, self.stretch, self.probing = 0, PLAIN_STRETCH, False


TREE_PROFILES = ("auto", "cpu", "gpu")


def step_costs(model, profile: str = "auto", forward: CausalLMForward | None = None,
               measured: dict[tuple[int, ...], dict[int, float]] | None = None) -> dict[int, float]:
    """The cost curve for ``profile``: ``gpu`` is the H200 curve above (what the GPU would use); ``auto``
    measures this model on its own device once and keeps the result in ``measured`` (bucket sizes of the
    forward, () for the model's own -> curve: ``DecodingState.curves``, kept with the model); ``cpu`` does the
    same and insists the model is on the CPU. A padded ``forward`` (one with ``buckets``: the static path) is
    measured itself, at its bucket sizes, and the curve is flat within each bucket (``bucketed``)."""
    if profile not in TREE_PROFILES:
        raise ValueError(f"Unknown tree profile {profile!r}; choose one of {', '.join(TREE_PROFILES)}.")
    if profile == "gpu":
        return dict(GPU_STEP_COST)
    if profile == "cpu" and next(model.parameters()).device.type != "cpu":
        raise ValueError("The cpu tree profile measures the model on the CPU; load it there or use 'auto'.")
    buckets = tuple(getattr(forward, "buckets", ()))
    measured = {} if measured is None else measured
    costs = measured.get(buckets)
    if costs is None:
        sizes = buckets or DEFAULT_SIZES
        path = f"static, compile {getattr(forward, 'compile_mode', 'off')}" if buckets else "eager"
        key = curve_key(model, sizes, path)
        costs = stored_curve(key) if key else None
        if costs is None:
            costs = measure_step_cost(model, sizes, forward=forward if buckets else None)
            if key:
                store_curve(key, costs)
        measured[buckets] = costs = bucketed(costs, buckets) if buckets else costs
    return costs


def curve_key(model, sizes: tuple[int, ...] = DEFAULT_SIZES, path: str = "eager") -> str | None:
    """What a measured curve depends on: the model (by name), its dtype, the device (GPU name, or CPU model and
    thread count), the forward that serves (``path``) and the sizes. None for unnamed models (random test models):
    those are measured per process."""
    name = getattr(model.config, "_name_or_path", "")
    if not name:
        return None
    parameter = next(model.parameters())
    if parameter.device.type == "cuda":
        device = torch.cuda.get_device_name(parameter.device)
    else:
        device = f"{cpu_model()} x{torch.get_num_threads()} threads"
    key = f"{type(model).__name__} | {name} | {parameter.dtype} | {device} | {','.join(map(str, sizes))}"
    return key if path == "eager" else f"{key} | {path}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def curve_file() -> Path:
    """Measured curves, kept across processes (the first request would otherwise spend ~15 s measuring a
    135M model on a 2-core CPU). Delete the file to measure again."""
    from ..settings import cache_dir

    return cache_dir() / "step_costs.json"


def stored_curve(key: str) -> dict[int, float] | None:
    try:
        curve = json.loads(curve_file().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return {int(n): float(c) for n, c in curve.items()} if isinstance(curve, dict) else None


def store_curve(key: str, costs: dict[int, float]) -> None:
    path = curve_file()
    try:
        curves = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        curves = {}
    curves[key] = {str(n): c for n, c in costs.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(curves, indent=1))
        temporary.replace(path)
    except OSError:
        pass  # a read-only cache only costs the next process a measurement
