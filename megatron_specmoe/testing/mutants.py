"""Deliberate defects, applied on purpose by tests to show that a check catches them.

A mutant is a named, explicit, reversible set of ``Patch``es on the library (``apply_mutant`` /
``revert_mutant``); the harness applies one inside the spawned ranks when a case names it
(``ShuffleCase.mutant``), so a test can assert that the lossless check fails. Nothing here is
applied unless a test asks for it by name.

    reduce_scatter_twice   the shuffle layer sends its shuffled reduce-scatter twice (the same
                           result, so outputs are unchanged) but its own byte counter sees one.
    over_capacity          the shuffle layer's assignment moves one token from the last TP rank
                           to rank 0, so rank 0 is given C + 1 tokens (outputs are unchanged:
                           the plan's permutation is still valid, only its shards are wrong).
"""

from __future__ import annotations

from typing import Literal, get_args

from megatron_specmoe.megatron.patching import Patch, apply_patches, revert_patches

__all__ = ["MutantName", "mutant_patches", "apply_mutant", "revert_mutant"]

MutantName = Literal["reduce_scatter_twice", "over_capacity"]


def _reduce_scatter_twice(original):
    def twice(partial, plan, group, *, fold_rows=None, fold=None, counter=None, workspace=None):
        original(partial, plan, group, fold_rows=fold_rows, fold=fold, counter=None, workspace=workspace)
        return original(partial, plan, group, fold_rows=fold_rows, fold=fold, counter=counter, workspace=workspace)

    return twice


def _over_capacity(original):
    from megatron_specmoe.schedule.assignment import plan_from_home

    def overfull(scores, method="refine", **kwargs):
        plan = original(scores, method, **kwargs)
        home = plan.home_rank.clone()
        last = (home == plan.num_ranks - 1).nonzero()
        if plan.num_ranks > 1 and len(last):
            home[last[0, 0]] = 0
        return plan_from_home(home, plan.num_ranks)

    return overfull


def mutant_patches(name: str) -> list[Patch]:
    """The patches of mutant ``name`` (one of ``MutantName``)."""
    if name not in get_args(MutantName):
        raise ValueError(f"mutant {name!r} is unknown; choose one of {get_args(MutantName)}")
    from megatron_specmoe.megatron import shuffle_layer

    if name == "reduce_scatter_twice":
        return [Patch(owner=shuffle_layer, name="shuffled_reduce_scatter",
                      replacement=_reduce_scatter_twice(shuffle_layer.shuffled_reduce_scatter),
                      why="mutant: the shuffled reduce-scatter is sent twice, counted once")]
    return [Patch(owner=shuffle_layer, name="assign", replacement=_over_capacity(shuffle_layer.assign),
                  why="mutant: rank 0 is assigned one token more than its capacity")]


def apply_mutant(name: str) -> list[Patch]:
    """Apply mutant ``name``; returns the patches to hand to ``revert_mutant``."""
    return apply_patches(mutant_patches(name))


def revert_mutant(patches: list[Patch]) -> None:
    revert_patches(patches)
