"""Route-history model ("history"): a small MLP per layer over the experts used at all earlier layers.

Notation
    T: tokens.   L: MoE layers.   l: the layer being predicted.   k: top-k.   E: experts.
    H: hidden units.   x: float32 [T, l*E], the multi-hot of the expert sets at layers 0 .. l-1
    (layer-major: column i*E + e is 1 when the token used expert e at layer i).

Model. For every layer l >= 1, one hidden layer:

    z = relu(x @ W1 + b1) @ W2 + b2        W1 [l*E, H], b1 [H], W2 [H, E], b2 [E]

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
Inference is a gather-sum of W1 rows (torch ``embedding_bag``) and one small matmul per layer;
``layer_scorer`` hands one layer's weights over as device tensors (``HistoryLayerScorer``), for the
same computation at run time on a history that never leaves the device.

Memory (``history_mlp_bytes``): float32 weights, sum over l = 1 .. L-1 of (l*E*H + H + H*E + E),
plus the [L, E] prior. Mixtral-8x7B (L = 32, E = 8) with H = 128: 2,176,480 B ~ 2.2 MB; a
60-layer model with E = 64 and H = 128: 59,993,344 B ~ 60 MB.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from megatron_specmoe.predict.common import (
    FittedTables,
    NotFittedError,
    check_history,
    check_state,
    frequency_prior,
    multi_hot,
    validation_split,
)
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["HistoryMLP", "HistoryLayerScorer", "history_mlp_bytes"]

_ARRAYS = ("w1", "b1", "w2", "b2")


def history_mlp_bytes(*, layers: int, experts: int, hidden: int) -> int:
    """Bytes a fitted ``HistoryMLP`` holds (module docstring)."""
    weights = sum(l * experts * hidden + hidden + hidden * experts + experts for l in range(1, layers))
    return 4 * (weights + layers * experts)


@dataclass(frozen=True, kw_only=True)
class HistoryLayerScorer:
    """One layer's fitted MLP as torch tensors on the run-time device (``HistoryMLP.layer_scorer``):
    the same scores as ``HistoryMLP.expert_scores`` from a history that lives on the device, with
    no host copy and no synchronisation (the shuffle layer's "history" predictor).

    Attributes:
        layer: l.   num_experts: E.
        prior: float32 [E], the layer's frequency prior (l = 0, or an empty history).
        w1: float32 [l*E, H] (None for l = 0).   b1: float32 [H].   w2: float32 [H, E].   b2: float32 [E].
    """

    layer: int
    num_experts: int
    prior: Any
    w1: Any = None
    b1: Any = None
    w2: Any = None
    b2: Any = None

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
        offsets = torch.arange(self.layer, device=history.device).view(1, -1, 1) * self.num_experts
        rows = (history.long() + offsets).reshape(tokens, -1)
        hidden = torch.relu(torch.nn.functional.embedding_bag(rows, self.w1, mode="sum") + self.b1)
        probs = torch.sigmoid(torch.addmm(self.b2, hidden, self.w2)).clamp_min_(1e-12)
        return probs / probs.sum(dim=1, keepdim=True)

    def rank_scores(self, *, history, hosts_sum, offsets, floor):
        """float32 [T, P]: ``scores(history=history) @ hosts`` for the run-time plan in eight device
        launches (equal up to float rounding: the row sum comes out of the same matmul).

        Args:
            history: int64 [T, l, k] (as ``scores``; l >= 1).
            hosts_sum: float32 [E, P + 1], ``span_hosts(...)`` with a column of ones appended.
            offsets: int64 [1, l, 1], ``arange(l) * E``.
            floor: float32 [P + 1], zeros then 1e-12. The three are constants, made once per
                placement by the caller.
        """
        import torch

        tokens = history.shape[0]
        if self.w1 is None:
            raw = torch.addmm(floor, self.prior.view(1, -1), hosts_sum)
            return (raw[:, :-1] / raw[:, -1:]).expand(tokens, -1)
        rows = (history + offsets).reshape(tokens, -1)
        hidden = torch.relu(torch.nn.functional.embedding_bag(rows, self.w1, mode="sum") + self.b1)
        # floor adds 1e-12 to the sums column in the same launch (a row of zeros would divide by 0).
        raw = torch.addmm(floor, torch.sigmoid(torch.addmm(self.b2, hidden, self.w2)), hosts_sum)  # [T, P + 1]
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
    ):
        counts = {"hidden": hidden, "epochs": epochs, "patience": patience, "batch_size": batch_size,
                  "threads": threads}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"HistoryMLP: {name} must be >= 1, got {value}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"HistoryMLP: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"HistoryMLP: val_fraction must be in (0, 1), got {val_fraction}")
        self.hidden, self.epochs, self.patience = hidden, epochs, patience
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.val_fraction, self.seed, self.threads = val_fraction, seed, threads
        self.fit_log: list[dict[str, float]] = []  # per layer: best epoch and held-out top-1
        self._fitted: Optional[dict[str, Any]] = None

    # ---- fitting ----------------------------------------------------------------------------
    def _fit_layer(self, x_fit, y_fit, x_val, truth_val, rng, gen):
        """Train one layer's MLP; returns numpy (w1, b1, w2, b2) and (best epoch, its held-out top-1).

        x_fit float32 [T1, l*E], y_fit float32 [T1, E] (multi-hot targets),
        x_val float32 [T2, l*E], truth_val int64 [T2, k].
        """
        import torch

        inputs, experts = x_fit.shape[1], y_fit.shape[1]

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
        xf, yf, xv = torch.from_numpy(x_fit), torch.from_numpy(y_fit), torch.from_numpy(x_val)
        yv = torch.zeros(x_val.shape[0], experts).scatter_(1, torch.from_numpy(truth_val), 1.0)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        best = (float("inf"), 0, [p.detach().clone() for p in params], 0.0)  # (loss, epoch, params, top-1)
        stale = 0
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(xf.shape[0], generator=gen)
            for start in range(0, xf.shape[0], self.batch_size):
                idx = order[start : start + self.batch_size]
                w1, b1, w2, b2 = params
                logits = torch.relu(xf[idx] @ w1 + b1) @ w2 + b2
                loss = loss_fn(logits, yf[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                w1, b1, w2, b2 = params
                logits_val = torch.relu(xv @ w1 + b1) @ w2 + b2
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

    def fit(self, trace: RoutingTrace) -> "HistoryMLP":
        """Train the MLPs of layers 1 .. L-1 on ``trace``. Returns ``self``. Progress on stderr."""
        import torch

        # The matrices are tiny: one intra-op thread is fastest (extra threads spin and, on a
        # shared machine, slow each step ~100x). The setting is restored afterwards.
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._fit(trace)
        finally:
            torch.set_num_threads(saved_threads)

    def _fit(self, trace: RoutingTrace) -> "HistoryMLP":
        import torch

        num_experts, layers = trace.num_experts, trace.num_layers
        fit_idx, val_idx = validation_split(trace, self.val_fraction)
        fit_ex, val_ex = trace.experts[fit_idx], trace.experts[val_idx]
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        weights: list[Optional[tuple[np.ndarray, ...]]] = [None]
        self.fit_log = []
        started = time.perf_counter()
        for layer in range(1, layers):
            # Built per layer (not [T, L*E] at once) to keep memory at one layer's inputs.
            x_fit = multi_hot(fit_ex[:, :layer], num_experts)
            y_fit = multi_hot(fit_ex[:, layer : layer + 1], num_experts)
            x_val = multi_hot(val_ex[:, :layer], num_experts)
            truth = val_ex[:, layer].astype(np.int64)
            arrays, (epoch, top1) = self._fit_layer(x_fit, y_fit, x_val, truth, rng, gen)
            weights.append(arrays)
            self.fit_log.append({"layer": layer, "epoch": epoch, "val_top1": top1})
            print(
                f"[history] layer {layer}/{layers - 1}: best epoch {epoch}, held-out top-1 "
                f"{top1:.3f} ({time.perf_counter() - started:.1f}s)",
                file=sys.stderr,
            )
        self._fitted = {
            "num_experts": num_experts,
            "num_layers": layers,
            "topk": trace.topk,
            "prior": frequency_prior(trace.experts, num_experts),
            "weights": weights,
        }
        return self

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
        # x @ W1 for a multi-hot x is the sum of the W1 rows of the l*k experts used: one
        # embedding-bag gather-sum instead of a dense [T, l*E] matmul (~3x less work at E = 8,
        # ~16x at E = 64, k = 6). torch.from_numpy shares memory, nothing is copied.
        tokens, layer, topk = hist.shape
        offsets = np.arange(layer, dtype=np.int64)[None, :, None] * st["num_experts"]
        rows = torch.from_numpy((hist.astype(np.int64) + offsets).reshape(tokens, layer * topk))
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
                                  w1=w1, b1=b1, w2=w2, b2=b2)

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
            "num_experts": st["num_experts"], "num_layers": st["num_layers"], "topk": st["topk"],
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
        )
        weights: list[Optional[tuple[np.ndarray, ...]]] = [None]
        for layer in range(1, layers):
            weights.append(tuple(np.asarray(arr[f"l{layer}.{n}"], dtype=np.float32) for n in _ARRAYS))
        out._fitted = {
            "num_experts": int(cfg["num_experts"]),
            "num_layers": layers,
            "topk": int(cfg["topk"]),
            "prior": np.asarray(arr["prior"], dtype=np.float32),
            "weights": weights,
        }
        return out
