"""Bilevel methods: the seed methods (GALET, sl-BAMM, BAGDC), the baselines, and the
templates they are assembled on (:class:`Alternating`, :class:`Unrolled`)."""

from ..parts import LowerAggregated, LowerGD
from ..state import State
from .aid import AID
from .alternating import Alternating
from .bagdc import BAGDC
from .bamm import SlBAMM
from .base import Assembled, Method, StabilityChecked, StabilityWarning, option
from .bome import BOME
from .galet import GALET
from .iaptt import IAPTTGM
from .itd import BDA, ITD, TRHG
from .meha import MEHA
from .pbgd import PBGD
from .stochastic import F2SA, MASOBA, SABA, SOBA, SRBA, AmIGO, DoubleLoop, SingleLoop, StocBiO, Stochastic
from .unrolled import Unrolled

__all__ = [
    "AID",
    "BAGDC",
    "BDA",
    "BOME",
    "F2SA",
    "GALET",
    "IAPTTGM",
    "ITD",
    "MASOBA",
    "MEHA",
    "PBGD",
    "SABA",
    "SOBA",
    "SRBA",
    "TRHG",
    "Alternating",
    "AmIGO",
    "Assembled",
    "DoubleLoop",
    "LowerAggregated",
    "LowerGD",
    "Method",
    "SingleLoop",
    "SlBAMM",
    "StabilityChecked",
    "StabilityWarning",
    "State",
    "StocBiO",
    "Stochastic",
    "Unrolled",
    "option",
]
