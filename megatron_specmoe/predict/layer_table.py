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
"""

from __future__ import annotations

import itertools
import sys
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

__all__ = ["LayerTable", "DEFAULT_GRID", "hash_keys"]

# Candidate values tried when a hyper-parameter is left as None.
DEFAULT_GRID: dict[str, tuple] = {
    "n": (1, 2, 3),
    "min_count": (1, 2, 4, 8),
    "alpha": (0.25, 1.0, 4.0),
}

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
        counts: uint32 [U, E], experts chosen after the context.
        tokens: uint32 [U], tokens that had the context (N_j).
        mix_a: float32 [U+1, E] and mix_b: float32 [U+1], set by ``compile``: a found context
            gives p_j = mix_a[row] + mix_b[row] * p_{j-1}; the extra last row (a = 0, b = 1) is
            what a miss or a rare context (< min_count tokens) gets, so p_j = p_{j-1}.
    """

    def __init__(self, hashes: np.ndarray, keys: np.ndarray, counts: np.ndarray, tokens: np.ndarray):
        self.hashes, self.keys, self.counts, self.tokens = hashes, keys, counts, tokens
        self.slots: Optional[np.ndarray] = None  # open-addressing index, built by _index()
        self.shift, self.probes = np.uint64(63), 0
        self.mix_a: Optional[np.ndarray] = None
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
        return cls(hashes[first], keys[first], counts.astype(np.uint32), tokens.astype(np.uint32))

    def compile(self, *, topk: int, min_count: int, alpha: float) -> "_Table":
        """Precompute ``mix_a`` / ``mix_b`` for fixed smoothing; returns ``self``."""
        units, num_experts = self.counts.shape
        denom = self.tokens.astype(np.float64) * topk + alpha * topk
        denom = np.maximum(denom, 1e-30)
        use = self.tokens >= min_count
        mix_a = np.zeros((units + 1, num_experts), dtype=np.float32)
        mix_b = np.ones(units + 1, dtype=np.float32)
        mix_a[:units][use] = (self.counts[use] / denom[use, None]).astype(np.float32)
        mix_b[:units][use] = (alpha * topk / denom[use]).astype(np.float32)
        self.mix_a, self.mix_b = mix_a, mix_b
        if self.slots is None and self.hashes.size:
            self._index()
        return self

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
        return self.mix_a[rows] + self.mix_b[rows][:, None] * scores

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mix_a is None else self.mix_a.nbytes + self.mix_b.nbytes
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
    ):
        if n is not None and n < 1:
            raise ValueError(f"LayerTable: n (layers of context) must be >= 1, got {n}")
        if min_count is not None and min_count < 1:
            raise ValueError(f"LayerTable: min_count must be >= 1, got {min_count}")
        if alpha is not None and alpha < 0:
            raise ValueError(f"LayerTable: alpha must be >= 0, got {alpha}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"LayerTable: val_fraction must be in (0, 1), got {val_fraction}")
        self.n, self.min_count, self.alpha = n, min_count, alpha
        self.val_fraction = val_fraction
        self.grid = dict(DEFAULT_GRID, **(grid or {}))
        self.selection: list[dict[str, float]] = []  # the grid scores of the last choice
        self._fitted: Optional[dict[str, Any]] = None

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
        fit_idx, val_idx = validation_split(trace, self.val_fraction)
        fit_ex, val_ex = trace.experts[fit_idx], trace.experts[val_idx]
        ns = (self.n,) if self.n is not None else tuple(self.grid["n"])
        mcs = (self.min_count,) if self.min_count is not None else tuple(self.grid["min_count"])
        alphas = (self.alpha,) if self.alpha is not None else tuple(self.grid["alpha"])
        prior = frequency_prior(fit_ex, trace.num_experts)
        tables = self._build(fit_ex, trace.num_experts, max(ns))
        self.selection = []
        best_key, best = None, None
        for n, mc, alpha in itertools.product(ns, mcs, alphas):
            hits, loglik = [], []
            for layer in range(1, trace.num_layers):
                for table in tables[layer]:
                    table.compile(topk=trace.topk, min_count=mc, alpha=alpha)
                sc = self._scores(tables[layer], prior[layer], val_ex[:, :layer], n)
                truth = val_ex[:, layer].astype(np.int64)
                hits.append((truth == sc.argmax(axis=1)[:, None]).any(axis=1).mean())
                loglik.append(np.log(np.take_along_axis(sc, truth, axis=1) + 1e-12).mean())
            row = {"n": n, "min_count": mc, "alpha": alpha, "top1": float(np.mean(hits)),
                   "loglik": float(np.mean(loglik))}
            self.selection.append(row)
            key = (round(row["top1"], 4), row["loglik"])
            if best_key is None or key > best_key:
                best_key, best = key, (n, mc, alpha)
        print(
            f"[layer] chose n={best[0]} min_count={best[1]} alpha={best[2]} on {len(val_idx)} "
            f"held-out fitting tokens (top-1 {best_key[0]:.4f})",
            file=sys.stderr,
        )
        return best

    def fit(self, trace: RoutingTrace) -> "LayerTable":
        """Choose the free hyper-parameters on a split of ``trace``, then fit on all of it."""
        prior = frequency_prior(trace.experts, trace.num_experts)
        if None in (self.n, self.min_count, self.alpha):
            n, min_count, alpha = self._choose(trace, prior)
        else:
            n, min_count, alpha = self.n, self.min_count, self.alpha
        self._fitted = {
            "num_experts": trace.num_experts,
            "num_layers": trace.num_layers,
            "topk": trace.topk,
            "n": int(n),
            "min_count": int(min_count),
            "alpha": float(alpha),
            "prior": prior,
            "tables": self._compile(
                self._build(trace.experts, trace.num_experts, int(n)), trace.topk, min_count, alpha
            ),
        }
        return self

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
        config = {"kind": self.kind, "val_fraction": self.val_fraction}
        for name in ("num_experts", "num_layers", "topk", "n", "min_count", "alpha"):
            config[name] = st[name]
        return {"config": config, "arrays": arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LayerTable":
        check_state(state, kind=cls.kind, arrays=("prior",))
        cfg, arr = state["config"], state["arrays"]
        out = cls(n=cfg["n"], min_count=cfg["min_count"], alpha=cfg["alpha"], val_fraction=cfg["val_fraction"])
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
                        np.asarray(arr[f"l{layer}.o{j}.counts"], dtype=np.uint32),
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
