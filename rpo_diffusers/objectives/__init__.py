"""Training methods as objectives on one loop: ``method`` picks one (DESIGN.md section 3).

    rpo         RPO: L_sim + w_pref L_pref on (reference, base-model image) pairs labelled by the λ-harmonic reward
    dreambooth  DreamBooth: L_sim (+ prior preservation)
    dpg         DPG: DreamBooth + a "look forward" reward on x0_hat, learned by a critic

A fourth method is a new module with an :class:`Objective` subclass, added to ``OBJECTIVES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AuxiliaryPart, EpochSampler, LoopContext, Objective, TrainingSet
from .dpg import DPGObjective
from .dreambooth import DreamBoothObjective
from .rpo import RPOObjective

if TYPE_CHECKING:
    from ..config import RPOConfig

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (RPOObjective, DreamBoothObjective, DPGObjective)
}
METHODS = tuple(OBJECTIVES)


def objective_class(method: str) -> type[Objective]:
    """The objective of ``method``, or a clear error that lists the methods."""
    if method not in OBJECTIVES:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    return OBJECTIVES[method]


def make_objective(config: RPOConfig) -> Objective:
    return objective_class(config.method)(config)


__all__ = [
    "METHODS",
    "OBJECTIVES",
    "AuxiliaryPart",
    "DPGObjective",
    "DreamBoothObjective",
    "EpochSampler",
    "LoopContext",
    "Objective",
    "RPOObjective",
    "TrainingSet",
    "make_objective",
    "objective_class",
]
