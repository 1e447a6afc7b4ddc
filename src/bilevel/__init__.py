"""bilevel: fast, verified gradient-based bilevel optimization in PyTorch.

    min_x f(x, y)   s.t.   y ∈ argmin_y g(x, y)

GALET, sl-BAMM and BAGDC — methods that do not need a strongly convex lower level —
next to the classic baselines (ITD/RHG, T-RHG, AID with CG/Neumann/fixed point, BDA),
on a functional core: pure ``init``/``step`` functions over an explicit state.
"""

from . import parts, problems, schedules, streams, tree
from .callbacks import CSVLogger, JSONLinesLogger, ProgressBar, TensorBoardLogger
from .check import HypergradientCheck, check_hypergradient
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .linsolve import CG, FixedPoint, LinearSolveResult, LineSearchStep, Neumann, NormalGD
from .methods import AID, BAGDC, BDA, GALET, ITD, TRHG, LowerAggregated, LowerGD, Method, SlBAMM, StabilityWarning, State
from .methods.bome import BOME
from .methods.iaptt import IAPTTGM
from .methods.meha import MEHA
from .methods.pbgd import PBGD
from .methods.stochastic import F2SA, MASOBA, SABA, SOBA, SRBA, AmIGO, StocBiO
from .oracles import CountingOracles, Linearization, Oracles
from .parts import Parts
from .problem import Problem
from .schedules import Constant, Exponential, Linear, Polynomial, bamm_schedules
from .solve import DivergenceError, FixedBatch, Result, Status, solve
from .streams import Stream, Streams
from .updates import SGD, Adam, Box

__version__ = "0.1.0"

__all__ = [
    "AID",
    "BAGDC",
    "BDA",
    "BOME",
    "CG",
    "F2SA",
    "GALET",
    "IAPTTGM",
    "ITD",
    "MASOBA",
    "MEHA",
    "PBGD",
    "SABA",
    "SGD",
    "SOBA",
    "SRBA",
    "TRHG",
    "Adam",
    "AmIGO",
    "Box",
    "CSVLogger",
    "CheckpointError",
    "Constant",
    "CountingOracles",
    "DivergenceError",
    "Exponential",
    "FixedBatch",
    "FixedPoint",
    "HypergradientCheck",
    "JSONLinesLogger",
    "LineSearchStep",
    "Linear",
    "LinearSolveResult",
    "Linearization",
    "LowerAggregated",
    "LowerGD",
    "Method",
    "Neumann",
    "NormalGD",
    "Oracles",
    "Parts",
    "Polynomial",
    "Problem",
    "ProgressBar",
    "Result",
    "SlBAMM",
    "StabilityWarning",
    "State",
    "Status",
    "StocBiO",
    "Stream",
    "Streams",
    "TensorBoardLogger",
    "__version__",
    "bamm_schedules",
    "check_hypergradient",
    "load_checkpoint",
    "parts",
    "problems",
    "save_checkpoint",
    "schedules",
    "solve",
    "streams",
    "tree",
]
