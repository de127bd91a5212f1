"""Inter-layer table ("layer"): the experts a token used at the previous n layers -> this layer's.

Notation
    T: tokens.   L: MoE layers.   l: the layer being predicted.   k: top-k.   E: experts.
    n: the longest context (layers looked back).   j: a context order, 1 <= j <= min(n, l).
    W: 64-bit words per expert set, ceil(E / 64).   U: distinct contexts seen for one (l, j).
    q_l: layer l's frequency prior (``_common.frequency_prior``).

Context key. The context of order j is the sequence of the token's expert *sets* (top-k sorted,
so the router's order within a layer does not matter) at layers l-1, l-2, ..., l-j. Each set is a
bitmask of W uint64 words. The table is exact by construction: contexts are grouped by their
words themselves (never by a hash), and the lookup compares the stored words at every probe. The
j*W words are hashed to one uint64 only to find the row fast: each word goes through the
splitmix64 finaliser (every input bit reaches every output bit, so experts 56-63, which differ only
in the top bits of a word, spread over the whole hash) and is folded into the running hash, which
is finalised again. The index is a power-of-two slot array at most half full with linear probing,
vectorised over the batch; two contexts with equal hashes are simply two rows, found by their
words.

Back-off with smoothing (an interpolated n-gram). With p_0 = q_l and, for j = 1 .. min(n, l),

    p_j = (c_j + alpha * k * p_{j-1}) / (N_j * k + alpha * k)    if the context was seen in at
                                                                  least ``min_count`` tokens,
    p_j = p_{j-1}                                                 otherwise,

where c_j [E] counts the experts chosen after that context and N_j is its number of tokens, the
scores are p_min(n, l). A rare long context thus falls back to the shorter one, and layer 0 (or a
context without history) scores the prior. n, ``min_count`` and ``alpha`` left as ``None`` are
chosen on the fitting data only: tables are fitted on its first part and scored (top-1 hit rate,
then log-likelihood of the true experts) on the last ``val_fraction`` (``_common.validation_split``),
then refitted on all of it with the chosen values. The paper uses n = 2.

Fit time (issue 15's budget: 1M tokens x 60 layers x 256 experts in 10 minutes on 2 cores). The
search is capped the way the history MLP's fit is: ``max_search_tokens`` fitting and
``max_val_tokens`` held-out tokens at most (seeded uniform samples of the two parts, kept in trace
order), each held-out context is looked up once per (layer, order) and reused by every candidate,
and the orders are tried shortest first, stopping at the first n whose best top-1 (4 digits) does
not beat n - 1's (early stop). ``max_fit_tokens`` caps the tokens the final tables count (a seeded
sample; the frequency prior still sees every token). Contexts rarer than the chosen ``min_count``
are not stored (a lookup of one falls through, as it would have). Beyond the caps fit time no longer
grows with T. ``estimate_fit_seconds`` times the search and the final fit on a sample before
fitting; ``tools/bench_fit.py --part layer`` measures the accuracy cost of the caps.
Memory: counts are dense, [U, E] per (layer, order), U <= the counted tokens, in the narrowest
unsigned dtype that holds the largest count (uint8 when no context has chosen an expert more than
255 times, as on routes where most contexts are distinct; else uint16 or uint32).
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from megatron_specmoe.predict.common import (
    FittedTables,
    NotFittedError,
    check_history,
    check_state,
    frequency_prior,
    validation_split,
)
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["LayerTable", "DEFAULT_GRID", "MAX_SEARCH_TOKENS", "MAX_VAL_TOKENS", "MAX_FIT_TOKENS", "hash_keys"]

# Candidate values tried when a hyper-parameter is left as None.
DEFAULT_GRID: dict[str, tuple] = {
    "n": (1, 2, 3),
    "min_count": (1, 2, 4, 8),
    "alpha": (0.25, 1.0, 4.0),
}
# Default caps (module docstring, "Fit time"); None in the constructor means no cap.
MAX_SEARCH_TOKENS = 65536
MAX_VAL_TOKENS = 16384
MAX_FIT_TOKENS = 131072

_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))  # uint64 [64], 1 << i
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FMIX1 = np.uint64(0xBF58476D1CE4E5B9)
_FMIX2 = np.uint64(0x94D049BB133111EB)
_SEED = np.uint64(0x243F6A8885A308D3)


def set_words(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """uint64 [T, n, W]: the bitmask of each token's expert set at each of n layers.

    Args:
        experts: int [T, n, k].
        num_experts: E.
    """
    tokens, layers, topk = experts.shape
    words = (num_experts + 63) // 64
    ex = experts.astype(np.int64, copy=False)
    bits = _BIT[ex & 63]  # uint64 [T, n, k]; a table gather is cheaper than a shift
    out = np.zeros((tokens, layers, words), dtype=np.uint64)
    if words == 1:
        # k is small: OR slot by slot (a reduce over a length-k axis is slow in numpy).
        acc = bits[:, :, 0].copy()
        for slot in range(1, topk):
            acc |= bits[:, :, slot]
        out[:, :, 0] = acc
        return out
    word_idx = ex >> 6
    for slot in range(topk):
        for w in range(words):
            out[:, :, w] |= np.where(word_idx[:, :, slot] == w, bits[:, :, slot], np.uint64(0))
    return out


def _narrow(counts: np.ndarray) -> np.ndarray:
    """``counts`` (non-negative integers) in the narrowest of uint8 / uint16 / uint32 that holds them."""
    if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
        raise ValueError("layer predictor state: counts must be non-negative integers; re-save it with to_state()")
    top = int(counts.max()) if counts.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return counts.astype(dtype, copy=False)
    raise ValueError(f"layer predictor: a count of {top} exceeds uint32")


def _fmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 [T] (wrapping arithmetic): a bijection in which every
    input bit affects every output bit."""
    z = (z ^ (z >> np.uint64(30))) * _FMIX1
    z = (z ^ (z >> np.uint64(27))) * _FMIX2
    return z ^ (z >> np.uint64(31))


def _mix(h: np.ndarray, word: np.ndarray) -> np.ndarray:
    """One step of the context hash: fold a uint64 word into uint64 hashes [T]."""
    return _fmix(h ^ _fmix(word + _GOLDEN))


def hash_keys(keys: np.ndarray) -> np.ndarray:
    """uint64 [U]: the hash of each context from its words uint64 [U, j*W] (``context_words``);
    equal to ``context_hashes(...)[j - 1]`` for the same context."""
    h = np.full(keys.shape[0], _SEED, dtype=np.uint64)
    for col in range(keys.shape[1]):
        h = _mix(h, np.ascontiguousarray(keys[:, col]))
    return _fmix(h)


def context_hashes(words: np.ndarray, max_order: int) -> list[np.ndarray]:
    """Hashes of the contexts of order 1..max_order.

    Args:
        words: uint64 [T, m, W], set bitmasks of layers l-m .. l-1 (oldest first), m >= max_order.
        max_order: the longest context to hash.

    Returns:
        ``max_order`` arrays uint64 [T]; entry j-1 hashes layers l-1, ..., l-j (newest first).
    """
    tokens, layers, width = words.shape
    h = np.full(tokens, _SEED, dtype=np.uint64)
    out = []
    for j in range(1, max_order + 1):
        for w in range(width):
            h = _mix(h, words[:, layers - j, w])
        out.append(_fmix(h))
    return out


def context_words(words: np.ndarray, order: int) -> np.ndarray:
    """uint64 [T, order*W]: the words of the order-``order`` context, newest layer first."""
    tokens, layers, width = words.shape
    return words[:, layers - order :, :][:, ::-1, :].reshape(tokens, order * width)


class _Table:
    """Counts after every seen context of one (layer, order), and their smoothed form.

    Attributes:
        hashes: uint64 [U], ``hash_keys(keys)``; two rows may share a hash.
        keys: uint64 [U, j*W], the context words, distinct rows (what a lookup matches).
        counts: uint8 / uint16 / uint32 [U, E] (the narrowest that holds them, ``_narrow``),
            experts chosen after the context.
        tokens: uint32 [U], tokens that had the context (N_j).
        denom: float64 [U+1], use: bool [U+1] and mix_b: float32 [U+1], set by ``compile``: a
            found context gives p_j = counts[row] / denom[row] + mix_b[row] * p_{j-1} (the first
            term in float32, computed for the looked-up rows only, so compiling costs O(U), not
            O(U * E)); the extra last row (use False, b = 1) is what a miss or a rare context
            (< min_count tokens) gets, so p_j = p_{j-1}.
    """

    def __init__(self, hashes: np.ndarray, keys: np.ndarray, counts: np.ndarray, tokens: np.ndarray):
        self.hashes, self.keys, self.counts, self.tokens = hashes, keys, counts, tokens
        self.slots: Optional[np.ndarray] = None  # open-addressing index, built by _index()
        self.shift, self.probes = np.uint64(63), 0
        self.denom: Optional[np.ndarray] = None
        self.use: Optional[np.ndarray] = None
        self.mix_b: Optional[np.ndarray] = None

    @classmethod
    def build(cls, hashes: np.ndarray, keys: np.ndarray, targets: np.ndarray, num_experts: int) -> "_Table":
        """Args: hashes uint64 [T]; keys uint64 [T, j*W]; targets int [T, k] (experts at l).

        Rows are the distinct contexts by their words (exact whatever the hashes do)."""
        if keys.shape[0] == 0:
            return cls(np.zeros(0, np.uint64), keys[:0], np.zeros((0, num_experts), np.uint32),
                       np.zeros(0, np.uint32))
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        units = first.size
        topk = targets.shape[1]
        flat = np.repeat(inverse, topk) * num_experts + targets.reshape(-1).astype(np.int64)
        counts = np.bincount(flat, minlength=units * num_experts).reshape(units, num_experts)
        tokens = np.bincount(inverse, minlength=units)
        return cls(hashes[first], keys[first], _narrow(counts), tokens.astype(np.uint32))

    def compile(self, *, topk: int, min_count: int, alpha: float) -> "_Table":
        """Precompute ``denom`` / ``use`` / ``mix_b`` for fixed smoothing; returns ``self``."""
        units = self.tokens.shape[0]
        denom = self.tokens.astype(np.float64) * topk + alpha * topk
        denom = np.maximum(denom, 1e-30)
        use = self.tokens >= min_count
        self.use = np.append(use, False)
        self.denom = np.append(np.where(use, denom, 1.0), 1.0)
        mix_b = np.ones(units + 1, dtype=np.float32)
        mix_b[:units][use] = (alpha * topk / denom[use]).astype(np.float32)
        self.mix_b = mix_b
        if self.slots is None and self.hashes.size:
            self._index()
        return self

    def pruned(self, min_count: int) -> "_Table":
        """The table without the contexts seen in fewer than ``min_count`` tokens (never used:
        a lookup of one falls through, exactly as the pass-through row does)."""
        keep = self.tokens >= min_count
        if keep.all():
            return self
        return _Table(self.hashes[keep], self.keys[keep], self.counts[keep], self.tokens[keep])

    def _index(self) -> None:
        """Build the open-addressing index: ``slots`` int32 [S] (S = a power of two >= 2U, so at
        most half full) holds row numbers at slot = top bits of the hash, linear probing, -1 empty.
        ``probes`` is the longest probe sequence any row needed. Rebuilt on load, never stored."""
        units = self.hashes.size
        bits = max(1, int(np.ceil(np.log2(max(2 * units, 2)))))
        slots = np.full(1 << bits, -1, dtype=np.int32)
        home = (self.hashes >> np.uint64(64 - bits)).astype(np.int64)
        pending = np.arange(units, dtype=np.int64)
        probe = 0
        while pending.size:
            pos = (home[pending] + probe) & ((1 << bits) - 1)
            free = slots[pos] < 0
            # Of the pending rows that land on the same free slot, the first takes it.
            cand_pos, first = np.unique(pos[free], return_index=True)
            winners = pending[free][first]
            slots[cand_pos] = winners
            taken = np.zeros(pending.size, dtype=bool)
            taken[np.flatnonzero(free)[first]] = True
            pending = pending[~taken]
            probe += 1 if pending.size else 0
        self.slots, self.shift, self.probes = slots, np.uint64(64 - bits), probe

    def lookup(self, hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """int64 [T]: the row of each context, or U (the pass-through row) when it was not seen.

        Args: hashes uint64 [T]; keys uint64 [T, j*W] (the context words: a row matches only if
        its words are equal, so two contexts with one hash are told apart).
        """
        units = self.hashes.size
        rows = np.full(hashes.shape[0], units, dtype=np.int64)
        if units == 0:
            return rows
        if self.slots is None:
            self._index()
        mask = self.slots.size - 1
        pos = (hashes >> self.shift).astype(np.int64)
        todo = np.arange(hashes.shape[0])
        # Every stored row sits within ``probes`` slots of its home; an empty slot ends a search.
        for probe in range(self.probes + 1):
            if todo.size == 0:
                break
            r = self.slots[(pos[todo] + probe) & mask].astype(np.int64)
            occupied = r >= 0
            cand = np.flatnonzero(occupied & (self.hashes[np.maximum(r, 0)] == hashes[todo]))
            found = np.zeros(todo.size, dtype=bool)
            if cand.size:
                same = np.ones(cand.size, dtype=bool)
                stored, query = self.keys[r[cand]], keys[todo[cand]]
                for col in range(keys.shape[1]):  # column by column: no slow reduce over a short axis
                    same &= stored[:, col] == query[:, col]
                rows[todo[cand[same]]] = r[cand[same]]
                found[cand[same]] = True
            todo = todo[occupied & ~found]
        return rows

    def apply(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """float32 [T, E]: one back-off step, p_j from p_{j-1} = ``scores``, for ``rows`` [T]."""
        ok = self.use[rows]
        first = np.zeros((rows.shape[0], self.counts.shape[1]), dtype=np.float32)
        found = rows[ok]
        first[ok] = (self.counts[found] / self.denom[found, None]).astype(np.float32)
        return first + self.mix_b[rows][:, None] * scores

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mix_b is None else self.denom.nbytes + self.use.nbytes + self.mix_b.nbytes
        extra += 0 if self.slots is None else self.slots.nbytes
        return self.hashes.nbytes + self.keys.nbytes + self.counts.nbytes + self.tokens.nbytes + extra


class LayerTable(FittedTables):
    """n-gram over previous layers' expert sets with back-off, per layer.

    Args:
        n: longest context in layers, >= 1; ``None``: chosen from ``grid['n']`` on fitting data.
        min_count: tokens a context needs to be used, >= 1; ``None``: chosen likewise.
        alpha: smoothing strength in pseudo-tokens, >= 0; ``None``: chosen likewise.
        val_fraction: share of the fitting tokens (the last ones) held out for the choice.
        grid: candidate values, defaults ``DEFAULT_GRID``.
        max_search_tokens: fitting tokens the search's tables count, at most (a seeded sample;
            None: all).
        max_val_tokens: held-out tokens the search scores on, at most (None: all).
        max_fit_tokens: tokens the final tables count, at most (None: all).
        seed: seed of the samples.
    """

    kind = "layer"

    def __init__(
        self,
        *,
        n: Optional[int] = None,
        min_count: Optional[int] = None,
        alpha: Optional[float] = None,
        val_fraction: float = 0.2,
        grid: Optional[dict[str, Sequence]] = None,
        max_search_tokens: Optional[int] = MAX_SEARCH_TOKENS,
        max_val_tokens: Optional[int] = MAX_VAL_TOKENS,
        max_fit_tokens: Optional[int] = MAX_FIT_TOKENS,
        seed: int = 0,
    ):
        if n is not None and n < 1:
            raise ValueError(f"LayerTable: n (layers of context) must be >= 1, got {n}")
        if min_count is not None and min_count < 1:
            raise ValueError(f"LayerTable: min_count must be >= 1, got {min_count}")
        if alpha is not None and alpha < 0:
            raise ValueError(f"LayerTable: alpha must be >= 0, got {alpha}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"LayerTable: val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in (("max_search_tokens", max_search_tokens), ("max_val_tokens", max_val_tokens),
                            ("max_fit_tokens", max_fit_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LayerTable: {name} must be a positive int or None (no cap), got {value!r}")
        self.n, self.min_count, self.alpha = n, min_count, alpha
        self.val_fraction = val_fraction
        self.grid = dict(DEFAULT_GRID, **(grid or {}))
        self.max_search_tokens, self.max_val_tokens, self.max_fit_tokens = max_search_tokens, max_val_tokens, max_fit_tokens
        self.seed = int(seed)
        self.selection: list[dict[str, float]] = []  # the grid scores of the last choice
        self._fitted: Optional[dict[str, Any]] = None

    def _sample(self, idx: np.ndarray, cap: Optional[int], salt: int) -> np.ndarray:
        """``idx`` itself, or ``cap`` of its entries drawn uniformly (seeded, kept in trace order)."""
        if cap is None or idx.shape[0] <= cap:
            return idx
        rng = np.random.default_rng([self.seed, salt])
        return np.sort(rng.choice(idx, size=cap, replace=False))

    # ---- fitting ----------------------------------------------------------------------------
    @staticmethod
    def _build(experts: np.ndarray, num_experts: int, max_order: int) -> list[list[_Table]]:
        """tables[l][j-1] for l >= 1, j = 1..min(max_order, l); tables[0] = []."""
        layers = experts.shape[1]
        words = set_words(experts, num_experts)
        tables: list[list[_Table]] = [[]]
        for layer in range(1, layers):
            orders = min(max_order, layer)
            ctx = words[:, layer - orders : layer]
            hashes = context_hashes(ctx, orders)
            tables.append(
                [
                    _Table.build(hashes[j - 1], context_words(ctx, j), experts[:, layer], num_experts)
                    for j in range(1, orders + 1)
                ]
            )
        return tables

    @staticmethod
    def _scores(tables: list[_Table], prior: np.ndarray, history: np.ndarray, n: int) -> np.ndarray:
        """float32 [T, E] for one layer from compiled ``tables``; ``history`` int [T, l, k]."""
        tokens, layer, _ = history.shape
        num_experts = prior.shape[0]
        orders = min(n, layer, len(tables))
        scores = np.broadcast_to(prior, (tokens, num_experts))
        if orders == 0:
            return scores.astype(np.float32)
        words = set_words(history[:, layer - orders :], num_experts)
        hashes = context_hashes(words, orders)
        for j in range(1, orders + 1):
            table = tables[j - 1]
            rows = table.lookup(hashes[j - 1], context_words(words, j))
            scores = table.apply(rows, scores)
        return scores.astype(np.float32, copy=False)

    def _choose(self, trace: RoutingTrace, prior_all: np.ndarray) -> tuple[int, int, float]:
        """The (n, min_count, alpha) of the best held-out top-1, then log-likelihood (module
        docstring: capped samples, one lookup per held-out context, orders shortest first with an
        early stop). ``self.selection`` lists every candidate scored."""
        fit_idx, val_idx = validation_split(trace, self.val_fraction)
        fit_idx = self._sample(fit_idx, self.max_search_tokens, 1)
        val_idx = self._sample(val_idx, self.max_val_tokens, 2)
        fit_ex, val_ex = trace.experts[fit_idx], trace.experts[val_idx]
        ns = (self.n,) if self.n is not None else tuple(sorted(self.grid["n"]))
        mcs = (self.min_count,) if self.min_count is not None else tuple(self.grid["min_count"])
        alphas = (self.alpha,) if self.alpha is not None else tuple(self.grid["alpha"])
        num_experts, layers = trace.num_experts, trace.num_layers
        prior = frequency_prior(fit_ex, num_experts)
        tables = self._build(fit_ex, num_experts, max(ns))
        # Held-out lookups depend on neither min_count nor alpha: once per (layer, order).
        rows: list[list[np.ndarray]] = [[]]
        for layer in range(1, layers):
            orders = min(max(ns), layer)
            words = set_words(val_ex[:, layer - orders : layer], num_experts)
            hashes = context_hashes(words, orders)
            rows.append([tables[layer][j - 1].lookup(hashes[j - 1], context_words(words, j))
                         for j in range(1, orders + 1)])
        truths = [None] + [val_ex[:, layer].astype(np.int64) for layer in range(1, layers)]
        self.selection = []
        best_key, best = None, None
        previous_top1 = None
        for n in ns:
            best_top1_n = None
            for mc, alpha in itertools.product(mcs, alphas):
                hits, loglik = [], []
                for layer in range(1, layers):
                    sc = np.broadcast_to(prior[layer], (val_ex.shape[0], num_experts))
                    for j in range(1, min(n, layer) + 1):
                        table = tables[layer][j - 1].compile(topk=trace.topk, min_count=mc, alpha=alpha)
                        sc = table.apply(rows[layer][j - 1], sc)
                    sc = np.asarray(sc, dtype=np.float32)
                    truth = truths[layer]
                    hits.append((truth == sc.argmax(axis=1)[:, None]).any(axis=1).mean())
                    loglik.append(np.log(np.take_along_axis(sc, truth, axis=1) + 1e-12).mean())
                row = {"n": n, "min_count": mc, "alpha": alpha, "top1": float(np.mean(hits)),
                       "loglik": float(np.mean(loglik))}
                self.selection.append(row)
                key = (round(row["top1"], 4), row["loglik"])
                best_top1_n = key[0] if best_top1_n is None else max(best_top1_n, key[0])
                if best_key is None or key > best_key:
                    best_key, best = key, (n, mc, alpha)
            if previous_top1 is not None and best_top1_n <= previous_top1:
                break  # early stop: a longer context did not help, a still longer one is not tried
            previous_top1 = best_top1_n
        print(
            f"[layer] chose n={best[0]} min_count={best[1]} alpha={best[2]} on {len(val_idx)} "
            f"held-out fitting tokens, tables from {len(fit_idx)} (top-1 {best_key[0]:.4f}; "
            f"{len(self.selection)} candidates scored)",
            file=sys.stderr,
        )
        return best

    def fit(self, trace: RoutingTrace) -> "LayerTable":
        """Choose the free hyper-parameters on a split of ``trace``, then fit on all of it (on a
        seeded sample of ``max_fit_tokens`` tokens beyond that cap)."""
        prior = frequency_prior(trace.experts, trace.num_experts)
        if None in (self.n, self.min_count, self.alpha):
            n, min_count, alpha = self._choose(trace, prior)
        else:
            n, min_count, alpha = self.n, self.min_count, self.alpha
        counted = trace.experts[self._sample(np.arange(trace.num_tokens), self.max_fit_tokens, 3)]
        tables = [[t.pruned(int(min_count)) for t in layer]
                  for layer in self._build(counted, trace.num_experts, int(n))]
        self._fitted = {
            "num_experts": trace.num_experts,
            "num_layers": trace.num_layers,
            "topk": trace.topk,
            "n": int(n),
            "min_count": int(min_count),
            "alpha": float(alpha),
            "prior": prior,
            "tables": self._compile(tables, trace.topk, min_count, alpha),
        }
        return self

    def estimate_fit_seconds(self, trace: RoutingTrace, *, sample_tokens: int = 8192) -> float:
        """Seconds ``fit(trace)`` should take, measured before fitting: the search and the final
        tables are timed apart on the first ``sample_tokens`` tokens and each is scaled, linearly,
        to the tokens it will count under the caps. An estimate, not a bound (the number of
        distinct contexts, not only T, sets the cost)."""
        total = trace.num_tokens
        size = min(total, sample_tokens)
        sample = trace.select(np.arange(size))
        probe = LayerTable(n=self.n, min_count=self.min_count, alpha=self.alpha, val_fraction=self.val_fraction,
                           grid=self.grid, max_search_tokens=None, max_val_tokens=None, max_fit_tokens=None)
        search_s = 0.0
        chosen = (self.n, self.min_count, self.alpha)
        if None in chosen:
            start = time.perf_counter()
            chosen = probe._choose(sample, frequency_prior(sample.experts, sample.num_experts))
            search_s = time.perf_counter() - start
        start = time.perf_counter()
        LayerTable(n=int(chosen[0]), min_count=int(chosen[1]), alpha=float(chosen[2]),
                   max_fit_tokens=None).fit(sample)
        fit_s = time.perf_counter() - start

        def capped(tokens: float, cap: Optional[int]) -> float:
            return tokens if cap is None else min(tokens, cap)

        fit_part = total * (1.0 - self.val_fraction)
        sample_fit = size * (1.0 - self.val_fraction)
        search_scale = (capped(fit_part, self.max_search_tokens) + capped(total - fit_part, self.max_val_tokens)) / size
        if sample_fit <= 0:
            search_scale = 0.0
        return float(search_s * search_scale + fit_s * capped(total, self.max_fit_tokens) / size)

    @staticmethod
    def _compile(tables: list[list[_Table]], topk: int, min_count: int, alpha: float) -> list[list[_Table]]:
        for layer in tables:
            for table in layer:
                table.compile(topk=topk, min_count=min_count, alpha=alpha)
        return tables

    # ---- protocol -----------------------------------------------------------------------------
    @property
    def chosen(self) -> dict[str, Any]:
        """The hyper-parameters in use: n, min_count, alpha."""
        st = self._state()
        return {"n": st["n"], "min_count": st["min_count"], "alpha": st["alpha"]}

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        """float32 [T, E] (module docstring); uses ``ctx.history`` int [T, l, k]."""
        st = self._state()
        hist = check_history(
            ctx, num_layers=st["num_layers"], num_experts=st["num_experts"], topk=st["topk"],
            who="LayerTable", last=st["n"],
        )
        prior = st["prior"][ctx.layer]
        if hist is None:
            return np.broadcast_to(prior, (ctx.num_tokens, prior.shape[0])).astype(np.float32)
        return self._scores(st["tables"][ctx.layer], prior, hist, st["n"])

    def memory_bytes(self) -> int:
        st = self._state()
        return int(st["prior"].nbytes + sum(t.nbytes for layer in st["tables"] for t in layer))

    # ---- plan artifact ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        st = self._state()
        arrays: dict[str, np.ndarray] = {"prior": st["prior"]}
        for layer, tables in enumerate(st["tables"]):
            for j, table in enumerate(tables, start=1):
                for name in ("hashes", "keys", "counts", "tokens"):
                    arrays[f"l{layer}.o{j}.{name}"] = getattr(table, name)
        config = {"kind": self.kind, "val_fraction": self.val_fraction, "max_search_tokens": self.max_search_tokens,
                  "max_val_tokens": self.max_val_tokens, "max_fit_tokens": self.max_fit_tokens, "seed": self.seed}
        for name in ("num_experts", "num_layers", "topk", "n", "min_count", "alpha"):
            config[name] = st[name]
        return {"config": config, "arrays": arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LayerTable":
        check_state(state, kind=cls.kind, arrays=("prior",))
        cfg, arr = state["config"], state["arrays"]
        caps = {name: cfg.get(name, default) for name, default in (
            ("max_search_tokens", MAX_SEARCH_TOKENS), ("max_val_tokens", MAX_VAL_TOKENS),
            ("max_fit_tokens", MAX_FIT_TOKENS))}
        caps = {name: None if v is None else int(v) for name, v in caps.items()}
        out = cls(n=cfg["n"], min_count=cfg["min_count"], alpha=cfg["alpha"], val_fraction=cfg["val_fraction"],
                  seed=int(cfg.get("seed", 0)), **caps)
        tables: list[list[_Table]] = []
        for layer in range(int(cfg["num_layers"])):
            orders = min(int(cfg["n"]), layer)
            parts = ("hashes", "keys", "counts", "tokens")
            names = [f"l{layer}.o{j}.{x}" for j in range(1, orders + 1) for x in parts]
            missing = [x for x in names if x not in arr]
            if missing:
                raise ValueError(
                    f"layer predictor state lacks the arrays {missing[:4]}; re-save it with to_state()"
                )
            tables.append(
                [
                    _Table(
                        # The hash only places rows in the index: recomputed from the words, so
                        # the stored copy cannot mislead a lookup.
                        hash_keys(np.asarray(arr[f"l{layer}.o{j}.keys"], dtype=np.uint64)),
                        np.asarray(arr[f"l{layer}.o{j}.keys"], dtype=np.uint64),
                        _narrow(np.asarray(arr[f"l{layer}.o{j}.counts"])),
                        np.asarray(arr[f"l{layer}.o{j}.tokens"], dtype=np.uint32),
                    )
                    for j in range(1, orders + 1)
                ]
            )
        out._fitted = {
            "num_experts": int(cfg["num_experts"]),
            "num_layers": int(cfg["num_layers"]),
            "topk": int(cfg["topk"]),
            "n": int(cfg["n"]),
            "min_count": int(cfg["min_count"]),
            "alpha": float(cfg["alpha"]),
            "prior": np.asarray(arr["prior"], dtype=np.float32),
            "tables": cls._compile(tables, int(cfg["topk"]), int(cfg["min_count"]), float(cfg["alpha"])),
        }
        return out
