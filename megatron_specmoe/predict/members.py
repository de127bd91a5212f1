"""The predictors a ``Combined`` may hold: name -> class, checked against ``MemberKind``.

``registry.py`` adds "combined" on top of these; keeping the members apart lets ``Combined`` fit
and load its members without importing the registry that imports it.
"""

from __future__ import annotations

from typing import Any, Mapping, get_args

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict.history_mlp import HistoryMLP
from megatron_specmoe.predict.layer_table import LayerTable
from megatron_specmoe.predict.token_table import TokenTable
from megatron_specmoe.predict.vocabulary import MemberKind

__all__ = ["MEMBERS", "fit_member", "load_member"]

MEMBERS: dict[str, type] = {"token": TokenTable, "layer": LayerTable, "history": HistoryMLP}


def _member_class(kind: str) -> type:
    if kind not in get_args(MemberKind) or kind not in MEMBERS:
        raise ValueError(f"a combined predictor's member must be one of {', '.join(get_args(MemberKind))}, "
                         f"got {kind!r}")
    return MEMBERS[kind]


def fit_member(kind: str, trace: RoutingTrace, *, progress=None, **options: Any):
    """A member predictor of ``kind`` fitted on ``trace``. ``progress(done, total)`` is handed to
    fits that report per layer (the history MLP) and ignored by the others."""
    member = _member_class(kind)(**options)
    return member.fit(trace, progress=progress) if kind == "history" else member.fit(trace)


def load_member(state: Mapping[str, Any]):
    """Rebuild a member from its ``to_state()`` output."""
    return _member_class(state["config"]["kind"]).from_state(state)
