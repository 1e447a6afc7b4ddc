"""Parts that bilevel methods are assembled from.

Each part is a frozen configuration, checked when it is built, with pure functions over
its own typed state (a registered ``NamedTuple``; :mod:`bilevel.state`):

==========================  =========================================================  ======================
kind (protocol)             parts                                                      state
==========================  =========================================================  ======================
lower dynamics              :class:`LowerGD`, :class:`LowerAggregated` (BDA, sl-BAMM)  —
multiplier estimator        :class:`LinearSolve` (any solver of ``bilevel.linsolve``),   —, :class:`PeriodicState`
                            :class:`DualCorrection` with :class:`FixedStep`,
                            :class:`LineSearch` or :class:`Periodic`
unrolled differentiation    :class:`Unroll`                                            :class:`UnrollState`
upper-direction estimator   :class:`PlainDirection`                                    —
upper optimizer             :class:`~bilevel.SGD`, :class:`~bilevel.Adam`              ``SGDState``, ``AdamState``
projection                  :class:`~bilevel.Box`                                      —
measure                     :class:`DirectionNorm`, :class:`ShadowResidual` (GALET),    —
                            :class:`KKTResidual` (sl-BAMM, BAGDC)
==========================  =========================================================  ======================

(— : :class:`EmptyState`.) :class:`Parts` records the parts of a method; every preset
shows its own as ``method.parts``, e.g. ``bl.BAGDC().parts.multiplier`` is
``DualCorrection(step=FixedStep(lr=0.5))``. docs/extending.md builds a new method from
them.
"""

from ..state import EmptyState, part_state
from .assembly import Parts
from .base import DirectionEstimator, LowerDynamics, Measure, MultiplierEstimator, Projection, check_weight, projected_sq
from .direction import PlainDirection
from .lower import LowerAggregated, LowerGD
from .measure import DirectionNorm, KKTResidual, Point, ShadowResidual, linearize
from .multiplier import DualCorrection, FixedStep, LinearSolve, LineSearch, Periodic, PeriodicState, StepRule
from .stochastic import (
    AveragedDirection,
    AveragedDirectionState,
    DualSteps,
    LowerSGD,
    LowerShadowState,
    OracleValues,
    PenaltyIncrements,
    PenaltyState,
    PlainEstimate,
    SagaEstimate,
    SagaState,
    SarahEstimate,
    SarahState,
    StochasticNeumann,
    evaluate,
)
from .trajectory import InitState, LearnedInit, pessimistic_step
from .unroll import Unroll, UnrollState
from .value import Penalty, Shadow, ShadowState, check_penalty, value_gap

__all__ = [
    "AveragedDirection",
    "AveragedDirectionState",
    "DirectionEstimator",
    "DirectionNorm",
    "DualCorrection",
    "DualSteps",
    "EmptyState",
    "FixedStep",
    "InitState",
    "KKTResidual",
    "LearnedInit",
    "LineSearch",
    "LinearSolve",
    "LowerAggregated",
    "LowerDynamics",
    "LowerGD",
    "LowerSGD",
    "LowerShadowState",
    "Measure",
    "MultiplierEstimator",
    "OracleValues",
    "Parts",
    "Penalty",
    "PenaltyIncrements",
    "PenaltyState",
    "Periodic",
    "PeriodicState",
    "PlainDirection",
    "PlainEstimate",
    "Point",
    "Projection",
    "SagaEstimate",
    "SagaState",
    "SarahEstimate",
    "SarahState",
    "Shadow",
    "ShadowResidual",
    "ShadowState",
    "StepRule",
    "StochasticNeumann",
    "Unroll",
    "UnrollState",
    "check_penalty",
    "check_weight",
    "evaluate",
    "linearize",
    "part_state",
    "pessimistic_step",
    "projected_sq",
    "value_gap",
]
