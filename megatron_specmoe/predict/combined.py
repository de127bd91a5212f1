"""Combined predictor ("combined"): arbitrate between member predictors token by token.

Notation
    T: tokens.   E: experts.   S: member predictors.   p_s: float32 [T, E], member s's scores.
    c_s: float32 [T], member s's confidence, its top share max_e p_s[:, e].

Rules (``rule``)
    "max_confidence"  the paper's arbitration: each token takes the scores of the member with the
                      highest confidence (ties: the earlier member).
    "mixture"         confidence-weighted mixture: sum_s c_s * p_s / sum_s c_s. Members that know
                      a token well dominate, but a second opinion still breaks near-ties.

Both rules give rows that sum to 1. ``tools/bench_predictors.py`` reports both on held-out
(cross-domain) data: on the Mixtral MT-Bench traces, members ("layer", "history"), the mixture
put a true expert first more often than max_confidence in every one of 4 leave-one-workload-out
folds (mean top-1 0.662 vs 0.656), so it is the default. The paper combines the token table and
the 2-layer table (``members=("token", "layer")``, the default members); on traces without token
ids use e.g. ``("layer", "history")``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import numpy as np

from megatron_specmoe.predict.common import NotFittedError, check_state
from megatron_specmoe.predict.base import RouteContext, RoutePredictor
from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict.members import fit_member, load_member

__all__ = ["Combined", "CombineRule", "combine_scores_torch"]

CombineRule = Literal["max_confidence", "mixture"]


def combine_scores(scores: Sequence[np.ndarray], rule: str) -> np.ndarray:
    """float32 [T, E] from the members' float32 [T, E] scores under ``rule`` (module docstring)."""
    stack = np.stack([np.asarray(s, dtype=np.float32) for s in scores])  # [S, T, E]
    conf = stack.max(axis=2)  # [S, T]
    if rule == "max_confidence":
        pick = np.argmax(conf, axis=0)  # first maximum: ties go to the earlier member
        return np.take_along_axis(stack, pick[None, :, None], axis=0)[0]
    if rule == "mixture":
        mixed = (conf[:, :, None] * stack).sum(axis=0)
        return mixed / mixed.sum(axis=1, keepdims=True)
    raise ValueError(f"Combined: rule must be one of {list(get_args(CombineRule))}, got {rule!r}")


def combine_scores_torch(scores, rule: str):
    """``combine_scores`` on torch tensors (float32 [T, E] each, any device): the same rule, for
    the run-time device scorers (``device_scorer.CombinedScorer``)."""
    import torch

    stack = torch.stack([s.float() for s in scores])  # [S, T, E]
    conf = stack.amax(dim=2)  # [S, T]
    if rule == "max_confidence":
        # First maximum (ties: the earlier member), as numpy's argmax.
        best = conf.amax(dim=0, keepdim=True)
        first = (conf == best).float().argmax(dim=0)
        return stack.gather(0, first.view(1, -1, 1).expand(1, -1, stack.shape[2]))[0]
    if rule == "mixture":
        mixed = (conf.unsqueeze(2) * stack).sum(dim=0)
        return mixed / mixed.sum(dim=1, keepdim=True)
    raise ValueError(f"Combined: rule must be one of {list(get_args(CombineRule))}, got {rule!r}")


class Combined:
    """Per-token arbitration between fitted member predictors.

    Args:
        members: registry kinds of the members, fitted by ``fit`` (not "combined").
        rule: "mixture" (default, measured better) or "max_confidence" (the paper's).
        member_options: per kind, keyword options for that member's constructor.
    """

    kind = "combined"

    def __init__(
        self,
        *,
        members: Sequence[str] = ("token", "layer"),
        rule: str = "mixture",
        member_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ):
        if rule not in get_args(CombineRule):
            raise ValueError(f"Combined: rule must be one of {list(get_args(CombineRule))}, got {rule!r}")
        if len(members) < 1:
            raise ValueError("Combined: members is empty; name at least one predictor kind")
        if "combined" in members:
            raise ValueError("Combined: a member cannot itself be 'combined'")
        unknown = set(member_options or {}) - set(members)
        if unknown:
            raise ValueError(
                f"Combined: member_options for {sorted(unknown)}, which are not in members {list(members)}"
            )
        self.members = tuple(members)
        self.rule = rule
        self.member_options = {k: dict(v) for k, v in (member_options or {}).items()}
        self._predictors: Optional[list[RoutePredictor]] = None

    @classmethod
    def of(cls, predictors: Sequence[RoutePredictor], *, rule: str = "mixture") -> "Combined":
        """Combine already fitted predictors (they must agree on E and L)."""
        if not predictors:
            raise ValueError("Combined.of: no predictors given")
        shapes = {(p.num_experts, p.num_layers) for p in predictors}
        if len(shapes) != 1:
            raise ValueError(f"Combined.of: members disagree on (experts, layers): {sorted(shapes)}")
        out = cls(members=tuple(p.kind for p in predictors), rule=rule)
        out._predictors = list(predictors)
        return out

    def fit(self, trace: RoutingTrace, *, progress=None) -> "Combined":
        """Fit every member on ``trace``. Returns ``self``. ``progress(done, total)``, when given,
        is called after each member, with the history member's layers counted as its units."""
        units = [trace.num_layers - 1 if kind == "history" else 1 for kind in self.members]
        total, done = max(1, sum(units)), 0
        self._predictors = []
        for kind, unit in zip(self.members, units):
            layer_progress = None
            if kind == "history" and progress is not None:
                layer_progress = (lambda d, _t, base=done: progress(base + d, total))
            self._predictors.append(fit_member(kind, trace, progress=layer_progress,
                                               **self.member_options.get(kind, {})))
            done += unit
            if progress is not None:
                progress(done, total)
        return self

    # ---- protocol -----------------------------------------------------------------------------
    def _members(self) -> list[RoutePredictor]:
        if self._predictors is None:
            raise NotFittedError(
                "Combined is not fitted; call fit(trace), Combined.of() or Combined.from_state()"
            )
        return self._predictors

    @property
    def predictors(self) -> list[RoutePredictor]:
        """The fitted members, in ``members`` order."""
        return list(self._members())

    @property
    def num_experts(self) -> int:
        return int(self._members()[0].num_experts)

    @property
    def num_layers(self) -> int:
        return int(self._members()[0].num_layers)

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        """float32 [T, E]: the members' scores for ``ctx`` combined by ``rule``."""
        return combine_scores([p.expert_scores(ctx) for p in self._members()], self.rule)

    def memory_bytes(self) -> int:
        return int(sum(p.memory_bytes() for p in self._members()))

    # ---- plan artifact ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Members' states nested: config["members"][i] and arrays prefixed "m{i}."."""
        configs, arrays = [], {}
        for i, p in enumerate(self._members()):
            st = p.to_state()
            configs.append(st["config"])
            arrays.update({f"m{i}.{name}": a for name, a in st["arrays"].items()})
        return {"config": {"kind": self.kind, "rule": self.rule, "members": configs}, "arrays": arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Combined":
        check_state(state, kind=cls.kind, arrays=())
        cfg, arr = state["config"], state["arrays"]
        predictors = []
        for i, member_cfg in enumerate(cfg["members"]):
            prefix = f"m{i}."
            sub = {name[len(prefix) :]: a for name, a in arr.items() if name.startswith(prefix)}
            predictors.append(load_member({"config": member_cfg, "arrays": sub}))
        return cls.of(predictors, rule=cfg["rule"])
