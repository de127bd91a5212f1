"""Route-history model ("history"): a small MLP per layer over the experts used at earlier layers.

Notation
    T: tokens.   L: MoE layers.   l: the layer being predicted.   k: top-k.   E: experts.
    H: hidden units.   w = min(l, window): the earlier layers read (all of them by default).
    x: float32 [T, w*E], the multi-hot of the expert sets at layers l-w .. l-1 (layer-major:
    column i*E + e is 1 when the token used expert e at layer l-w+i).

Model. For every layer l >= 1, one hidden layer:

    z = relu(x @ W1 + b1) @ W2 + b2        W1 [w*E, H], b1 [H], W2 [H, E], b2 [E]

trained with a multi-label loss (binary cross-entropy of sigmoid(z) against the multi-hot of the
token's k experts at layer l), so sigmoid(z[e]) estimates P(e is selected) and sums to about k.
Scores are sigmoid(z) divided by its row sum: the same "share of the k selections" as the tables,
so confidences compare across predictors. Layer 0, or a context without history, scores the
layer's frequency prior.

Fitting uses torch on the CPU (AdamW, mini-batches), one layer at a time, and stops early: the last
``val_fraction`` of the fitting tokens (``_common.validation_split``) is held out, the epoch with
the lowest loss on it is kept (at most ``epochs``; stop after ``patience`` epochs without
improvement). Weights are initialised from a ``numpy`` generator seeded by ``seed`` and batches
drawn from a private ``torch.Generator``, so fitting is reproducible and touches no global RNG.
x is never built: x @ W1 is the sum of the W1 rows its ones select (torch ``embedding_bag``), in
training as in inference, so a step costs O(batch * w*k*H + w*E*H), not O(batch * w*E*H).

Fit time (issue 15's budget: 1M tokens x 60 layers x 256 experts in 10 minutes on 2 cores).
``max_fit_tokens`` (default ``MAX_FIT_TOKENS``) caps the fitting tokens per layer by a seeded uniform
sample of the fitting part, and ``max_val_tokens`` the held-out part, so beyond the cap the fit
time no longer grows with T (only the O(T) frequency prior and the split do); ``window`` caps w.
``estimate_fit_seconds`` bounds the time before fitting. ``tools/bench_fit.py`` measures fit time
against tokens and the accuracy cost of the caps.

Inference is a gather-sum of W1 rows (torch ``embedding_bag``) and one small matmul per layer;
``layer_scorer`` hands one layer's weights over as device tensors (``HistoryLayerScorer``), for the
same computation at run time on a history that never leaves the device.

Memory (``history_mlp_bytes``): float32 weights, sum over l = 1 .. L-1 of (w*E*H + H + H*E + E),
plus the [L, E] prior. Mixtral-8x7B (L = 32, E = 8) with H = 128: 2,176,480 B ~ 2.2 MB; a
60-layer model with E = 64 and H = 128: 59,993,344 B ~ 60 MB.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

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

__all__ = ["HistoryMLP", "HistoryLayerScorer", "history_mlp_bytes", "MAX_FIT_TOKENS", "MAX_VAL_TOKENS"]

_ARRAYS = ("w1", "b1", "w2", "b2")
MAX_FIT_TOKENS = 16384
MAX_VAL_TOKENS = 4096


def history_mlp_bytes(*, layers: int, experts: int, hidden: int, window: Optional[int] = None) -> int:
    """Bytes a fitted ``HistoryMLP`` holds (module docstring)."""
    weights = sum((l if window is None else min(l, window)) * experts * hidden + hidden + hidden * experts
                  + experts for l in range(1, layers))
    return 4 * (weights + layers * experts)


@dataclass(frozen=True, kw_only=True)
class HistoryLayerScorer:
    """One layer's fitted MLP as torch tensors on the run-time device (``HistoryMLP.layer_scorer``):
    the same scores as ``HistoryMLP.expert_scores`` from a history that lives on the device, with
    no host copy and no synchronisation (the shuffle layer's "history" predictor).

    Attributes:
        layer: l.   num_experts: E.   window: w (None: all l earlier layers).
        prior: float32 [E], the layer's frequency prior (l = 0, or an empty history).
        w1: float32 [w*E, H] (None for l = 0).   b1: float32 [H].   w2: float32 [H, E].   b2: float32 [E].
    """

    layer: int
    num_experts: int
    prior: Any
    w1: Any = None
    b1: Any = None
    w2: Any = None
    b2: Any = None
    window: Optional[int] = None

    def scores(self, *, history, token_ids=None):
        """float32 [T, E] from ``history`` int [T, l, k] (the experts of MoE layers 0 .. l-1 on the
        scorer's device; ``token_ids`` unused); rows sum to 1."""
        import torch

        tokens = history.shape[0]
        if self.w1 is None:
            return self.prior.expand(tokens, -1).clone()
        if history.dim() != 3 or history.shape[1] != self.layer:
            raise ValueError(
                f"HistoryLayerScorer(layer={self.layer}): history must be [T, {self.layer}, k], got "
                f"{tuple(history.shape)}"
            )
        probs = torch.sigmoid(self.logits(history=history)).clamp_min_(1e-12)
        return probs / probs.sum(dim=1, keepdim=True)

    def logit_offsets(self, device):
        """int64 [1, w, 1]: ``arange(w) * E``, the row offset in w1 of each layer the MLP reads
        (a constant of ``logits``, made once by its caller)."""
        import torch

        w = self.layer if self.window is None else min(self.layer, self.window)
        return torch.arange(w, device=device).view(1, -1, 1) * self.num_experts

    def logits(self, *, history, offsets=None):
        """float32 [T, E]: the MLP's output before its sigmoid, from ``history`` int [T, l, k] (the
        last w layers are read; device launches: the index add, the embedding-bag (and its
        offsets), bias, relu, the output matmul). What ``scores``, ``rank_scores`` and the
        one-kernel combination (``predict/combined_triton.py``) start from. ``offsets``:
        ``logit_offsets(device)`` (None: made here). Needs fitted weights."""
        import torch

        w = self.layer if self.window is None else min(self.layer, self.window)
        offsets = self.logit_offsets(history.device) if offsets is None else offsets
        rows = (history[:, self.layer - w :].long() + offsets).reshape(history.shape[0], -1)
        hidden = torch.relu(torch.nn.functional.embedding_bag(rows, self.w1, mode="sum") + self.b1)
        return torch.addmm(self.b2, hidden, self.w2)

    def rank_scores(self, *, history, hosts_sum, offsets, floor):
        """float32 [T, P]: ``scores(history=history) @ hosts`` for the run-time plan in eight device
        launches (equal up to float rounding: the row sum comes out of the same matmul).

        Args:
            history: int64 [T, l, k] (as ``scores``; l >= 1).
            hosts_sum: float32 [E, P + 1], ``span_hosts(...)`` with a column of ones appended.
            offsets: int64 [1, w, 1], ``logit_offsets(device)``.
            floor: float32 [P + 1], zeros then 1e-12. The three are constants, made once per
                placement by the caller.
        """
        import torch

        tokens = history.shape[0]
        if self.w1 is None:
            raw = torch.addmm(floor, self.prior.view(1, -1), hosts_sum)
            return (raw[:, :-1] / raw[:, -1:]).expand(tokens, -1)
        # floor adds 1e-12 to the sums column in the same launch (a row of zeros would divide by 0).
        raw = torch.addmm(floor, torch.sigmoid(self.logits(history=history, offsets=offsets)), hosts_sum)  # [T, P + 1]
        return raw[:, :-1] / raw[:, -1:]


class HistoryMLP(FittedTables):
    """Per-layer one-hidden-layer MLP from the full route history to this layer's experts.

    Args:
        hidden: H, hidden units per layer.
        epochs: most passes over the fitting data per layer.
        patience: epochs without a lower held-out loss before stopping.
        lr: AdamW learning rate.   weight_decay: AdamW weight decay.   batch_size: tokens per step.
        val_fraction: share of the fitting tokens held out for early stopping.
        seed: seeds initialisation and batch order.
        threads: torch intra-op threads while fitting and scoring (restored afterwards).
        max_fit_tokens: fitting tokens per layer at most (a seeded uniform sample beyond it);
            None: all of them.
        max_val_tokens: held-out tokens for early stopping at most; None: all of them.
        window: earlier layers each MLP reads at most (the last ``window``); None: all of them.
    """

    kind = "history"

    def __init__(
        self,
        *,
        hidden: int = 128,
        epochs: int = 12,
        patience: int = 3,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        threads: int = 1,
        max_fit_tokens: Optional[int] = MAX_FIT_TOKENS,
        max_val_tokens: Optional[int] = MAX_VAL_TOKENS,
        window: Optional[int] = None,
    ):
        counts = {"hidden": hidden, "epochs": epochs, "patience": patience, "batch_size": batch_size,
                  "threads": threads}
        for name, value in (("max_fit_tokens", max_fit_tokens), ("max_val_tokens", max_val_tokens),
                            ("window", window)):
            if value is not None:
                counts[name] = value
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"HistoryMLP: {name} must be an integer >= 1, got {value!r}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"HistoryMLP: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"HistoryMLP: val_fraction must be in (0, 1), got {val_fraction}")
        self.hidden, self.epochs, self.patience = hidden, epochs, patience
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.val_fraction, self.seed, self.threads = val_fraction, seed, threads
        self.max_fit_tokens, self.max_val_tokens, self.window = max_fit_tokens, max_val_tokens, window
        self.fit_log: list[dict[str, float]] = []  # per layer: best epoch and held-out top-1
        self._fitted: Optional[dict[str, Any]] = None

    # ---- fitting ----------------------------------------------------------------------------
    def _sample(self, idx: np.ndarray, cap: Optional[int], salt: int) -> np.ndarray:
        """``idx`` itself, or ``cap`` of its entries drawn uniformly (seeded, kept in trace order)."""
        if cap is None or idx.shape[0] <= cap:
            return idx
        rng = np.random.default_rng([self.seed, salt])
        return np.sort(rng.choice(idx, size=cap, replace=False))

    def input_layers(self, layer: int) -> int:
        """How many earlier layers layer ``layer``'s MLP reads (``window`` caps it)."""
        return layer if self.window is None else min(layer, self.window)

    def _fit_layer(self, rows_fit, truth_fit, rows_val, truth_val, inputs, experts, rng, gen):
        """Train one layer's MLP; returns numpy (w1, b1, w2, b2) and (best epoch, its held-out top-1).

        rows_fit int64 [T1, w*k] (the W1 rows a token's history selects: the multi-hot x as
        indices), truth_fit int64 [T1, k]; rows_val int64 [T2, w*k], truth_val int64 [T2, k];
        inputs: w*E, the rows of W1.
        """
        import torch

        def init(fan_in, shape):
            bound = 1.0 / np.sqrt(fan_in)
            return torch.from_numpy(rng.uniform(-bound, bound, size=shape).astype(np.float32))

        params = [
            init(inputs, (inputs, self.hidden)), init(inputs, (self.hidden,)),
            init(self.hidden, (self.hidden, experts)), init(self.hidden, (experts,)),
        ]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        xf, tf, xv = (torch.from_numpy(a) for a in (rows_fit, truth_fit, rows_val))
        yv = torch.zeros(rows_val.shape[0], experts).scatter_(1, torch.from_numpy(truth_val), 1.0)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        bag = torch.nn.functional.embedding_bag

        def logits_of(rows, w1, b1, w2, b2):
            # x @ W1 for a multi-hot x is the sum of the W1 rows it selects (module docstring).
            return torch.addmm(b2, torch.relu(bag(rows, w1, mode="sum") + b1), w2)

        best = (float("inf"), 0, [p.detach().clone() for p in params], 0.0)  # (loss, epoch, params, top-1)
        stale = 0
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(xf.shape[0], generator=gen)
            for start in range(0, xf.shape[0], self.batch_size):
                idx = order[start : start + self.batch_size]
                target = torch.zeros(idx.shape[0], experts).scatter_(1, tf[idx], 1.0)
                loss = loss_fn(logits_of(xf[idx], *params), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                logits_val = logits_of(xv, *params)
                val_loss = float(loss_fn(logits_val, yv))
                pred = logits_val.argmax(dim=1).numpy()
            top1 = float((truth_val == pred[:, None]).any(axis=1).mean())
            if val_loss < best[0]:
                best, stale = (val_loss, epoch, [p.detach().clone() for p in params], top1), 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        arrays = tuple(p.numpy().astype(np.float32) for p in best[2])
        return arrays, (best[1], best[3])

    def fit(self, trace: RoutingTrace, *, progress: Optional[Callable[[int, int], None]] = None) -> "HistoryMLP":
        """Train the MLPs of layers 1 .. L-1 on ``trace``. Returns ``self``. A line per layer on
        stderr, or ``progress(done, total)`` after each layer when given."""
        import torch

        # The matrices are tiny: one intra-op thread is fastest (extra threads spin and, on a
        # shared machine, slow each step ~100x). The setting is restored afterwards.
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._fit(trace, progress)
        finally:
            torch.set_num_threads(saved_threads)

    def _rows(self, experts: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
        """int64 [T, w*k]: the W1 rows of layer ``layer``'s input (its last w layers' experts)."""
        w = self.input_layers(layer)
        hist = experts[:, layer - w : layer].astype(np.int64)
        offsets = np.arange(w, dtype=np.int64)[None, :, None] * num_experts
        return (hist + offsets).reshape(experts.shape[0], -1)

    def _fit(self, trace: RoutingTrace, progress) -> "HistoryMLP":
        import torch

        num_experts, layers = trace.num_experts, trace.num_layers
        fit_idx, val_idx = validation_split(trace, self.val_fraction)
        # Subsampling keeps the fit time flat beyond max_fit_tokens (the accuracy cost is measured
        # in tools/bench_fit.py); only the sampled tokens are ever copied.
        fit_idx = self._sample(fit_idx, self.max_fit_tokens, 1)
        val_idx = self._sample(val_idx, self.max_val_tokens, 2)
        fit_ex, val_ex = trace.experts[fit_idx], trace.experts[val_idx]
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        weights: list[Optional[tuple[np.ndarray, ...]]] = [None]
        self.fit_log = []
        started = time.perf_counter()
        for layer in range(1, layers):
            arrays, (epoch, top1) = self._fit_layer(
                self._rows(fit_ex, layer, num_experts), fit_ex[:, layer].astype(np.int64),
                self._rows(val_ex, layer, num_experts), val_ex[:, layer].astype(np.int64),
                self.input_layers(layer) * num_experts, num_experts, rng, gen,
            )
            weights.append(arrays)
            self.fit_log.append({"layer": layer, "epoch": epoch, "val_top1": top1})
            if progress is not None:
                progress(layer, layers - 1)
            else:
                print(
                    f"[history] layer {layer}/{layers - 1}: best epoch {epoch}, held-out top-1 "
                    f"{top1:.3f} ({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                )
        self._fitted = {
            "num_experts": num_experts,
            "num_layers": layers,
            "topk": trace.topk,
            "window": self.window,
            "prior": frequency_prior(trace.experts, num_experts),
            "weights": weights,
        }
        return self

    def estimate_fit_seconds(self, trace: RoutingTrace, *, probe_steps: int = 2) -> float:
        """An upper bound of ``fit``'s time on ``trace``, measured before fitting: a few training
        steps are timed at the narrowest and the widest input, and every layer is charged
        ``epochs`` passes over its (capped) fitting tokens at the interpolated step time. Early
        stopping usually ends sooner. Costs about ``4 * probe_steps`` steps."""
        import torch

        e, k, layers = trace.num_experts, trace.topk, trace.num_layers
        if layers < 2:
            return 0.0
        fit_tokens = int(round(trace.num_tokens * (1.0 - self.val_fraction)))
        if self.max_fit_tokens is not None:
            fit_tokens = min(fit_tokens, self.max_fit_tokens)
        batch = max(1, min(self.batch_size, fit_tokens))
        steps = -(-fit_tokens // batch)
        gen = np.random.default_rng(0)
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            def step_time(w: int) -> float:
                rows = gen.integers(0, e, (batch, w, k)) + (np.arange(w) * e)[None, :, None]
                truth = np.stack([gen.permutation(e)[:k] for _ in range(min(batch, 64))])
                truth = np.resize(truth, (batch, k)).astype(np.int64)
                rows = rows.reshape(batch, -1).astype(np.int64)
                saved_epochs = self.epochs
                self.epochs = 1

                def run(steps: int) -> float:
                    t0 = time.perf_counter()
                    self._fit_layer(np.resize(rows, (batch * steps, rows.shape[1])),
                                    np.resize(truth, (batch * steps, k)), rows[:8], truth[:8],
                                    w * e, e, np.random.default_rng(0), torch.Generator().manual_seed(0))
                    return time.perf_counter() - t0

                try:
                    run(1)  # warm-up: first-call costs (allocator, kernels) are not per step
                    # The difference removes the per-call set-up (initialisation, validation). On a
                    # busy machine noise can swamp it (a difference <= 0); then charge the whole
                    # call per step, set-up included: larger, so still an upper bound.
                    long = run(1 + probe_steps)
                    per_step = (long - run(1)) / probe_steps
                    return per_step if per_step > 0.0 else long / (1 + probe_steps)
                finally:
                    self.epochs = saved_epochs

            widths = [self.input_layers(l) for l in range(1, layers)]
            lo, hi = min(widths), max(widths)
            t_lo = step_time(lo)
            t_hi = step_time(hi) if hi != lo else t_lo
            per_layer = [t_lo + (t_hi - t_lo) * (w - lo) / max(1, hi - lo) for w in widths]
        finally:
            torch.set_num_threads(saved)
        return float(sum(self.epochs * steps * t for t in per_layer))

    # ---- protocol -----------------------------------------------------------------------------
    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        """float32 [T, E] (module docstring); uses ``ctx.history`` int [T, l, k]."""
        st = self._state()
        hist = check_history(
            ctx, num_layers=st["num_layers"], num_experts=st["num_experts"], topk=st["topk"],
            who="HistoryMLP",
        )
        prior = st["prior"][ctx.layer]
        if hist is None:
            return np.broadcast_to(prior, (ctx.num_tokens, prior.shape[0])).astype(np.float32)
        import torch

        w1, b1, w2, b2 = st["weights"][ctx.layer]
        # x @ W1 for a multi-hot x is the sum of the W1 rows of the w*k experts used: one
        # embedding-bag gather-sum instead of a dense [T, w*E] matmul (~3x less work at E = 8,
        # ~16x at E = 64, k = 6).
        rows = torch.from_numpy(self._rows(hist, ctx.layer, st["num_experts"]))
        # All of it in torch under a scoped thread count: BLAS/OpenMP thread pools that spin on a
        # busy machine made this 10x slower than one thread (measured); restored afterwards.
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            hidden = torch.nn.functional.embedding_bag(rows, torch.from_numpy(w1), mode="sum")
            hidden = torch.relu(hidden + torch.from_numpy(b1))
            logits = torch.addmm(torch.from_numpy(b2), hidden, torch.from_numpy(w2))
            probs = torch.sigmoid(logits).clamp_min_(1e-12)  # a positive row sum, always
            probs = probs / probs.sum(dim=1, keepdim=True)
        finally:
            torch.set_num_threads(saved_threads)
        return probs.numpy().astype(np.float32, copy=False)

    def layer_scorer(self, layer: int, device: Any = "cpu") -> HistoryLayerScorer:
        """Layer ``layer``'s weights as torch tensors on ``device`` (``HistoryLayerScorer``)."""
        import torch

        st = self._state()
        if not 0 <= layer < st["num_layers"]:
            raise ValueError(
                f"HistoryMLP.layer_scorer: layer={layer} is outside the fitted layers 0..{st['num_layers'] - 1}"
            )
        prior = torch.as_tensor(st["prior"][layer], dtype=torch.float32, device=device)
        if layer == 0:
            return HistoryLayerScorer(layer=0, num_experts=st["num_experts"], prior=prior)
        w1, b1, w2, b2 = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in st["weights"][layer])
        return HistoryLayerScorer(layer=layer, num_experts=st["num_experts"], prior=prior,
                                  w1=w1, b1=b1, w2=w2, b2=b2, window=st.get("window"))

    def memory_bytes(self) -> int:
        st = self._state()
        return int(st["prior"].nbytes + sum(a.nbytes for w in st["weights"] if w for a in w))

    # ---- plan artifact ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        st = self._state()
        arrays: dict[str, np.ndarray] = {"prior": st["prior"]}
        for layer, w in enumerate(st["weights"]):
            if w is not None:
                arrays.update({f"l{layer}.{name}": a for name, a in zip(_ARRAYS, w)})
        config = {
            "kind": self.kind, "hidden": self.hidden, "epochs": self.epochs, "patience": self.patience,
            "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "val_fraction": self.val_fraction, "seed": self.seed, "threads": self.threads,
            "max_fit_tokens": self.max_fit_tokens, "max_val_tokens": self.max_val_tokens,
            "window": self.window, "num_experts": st["num_experts"], "num_layers": st["num_layers"], "topk": st["topk"],
        }
        return {"config": config, "arrays": arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "HistoryMLP":
        cfg = state.get("config", {}) if isinstance(state, dict) else {}
        layers = int(cfg.get("num_layers", 0))
        names = ("prior",) + tuple(f"l{l}.{n}" for l in range(1, layers) for n in _ARRAYS)
        check_state(state, kind=cls.kind, arrays=names)
        arr = state["arrays"]
        out = cls(
            hidden=cfg["hidden"], epochs=cfg["epochs"], patience=cfg["patience"], lr=cfg["lr"],
            weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
            val_fraction=cfg["val_fraction"], seed=cfg["seed"], threads=cfg.get("threads", 1),
            # Plans written before the caps existed fitted on every token.
            max_fit_tokens=cfg.get("max_fit_tokens"), max_val_tokens=cfg.get("max_val_tokens"),
            window=cfg.get("window"),
        )
        weights: list[Optional[tuple[np.ndarray, ...]]] = [None]
        for layer in range(1, layers):
            weights.append(tuple(np.asarray(arr[f"l{layer}.{n}"], dtype=np.float32) for n in _ARRAYS))
        out._fitted = {
            "num_experts": int(cfg["num_experts"]),
            "num_layers": layers,
            "topk": int(cfg["topk"]),
            "window": cfg.get("window"),
            "prior": np.asarray(arr["prior"], dtype=np.float32),
            "weights": weights,
        }
        return out
