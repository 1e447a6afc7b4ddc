"""Bilevel methods: the seed methods (GALET, sl-BAMM, BAGDC), the baselines, and the
templates they are assembled on (:class:`Alternating`, :class:`Unrolled`)."""

from ..parts import LowerAggregated, LowerGD
from ..state import State
from .aid import AID
from .alternating import Alternating
from .bagdc import BAGDC
from .bamm import SlBAMM
from .base import Assembled, Method, StabilityChecked, StabilityWarning, option
from .galet import GALET
from .itd import BDA, ITD, TRHG
from .unrolled import Unrolled

__all__ = [
    "AID",
    "BAGDC",
    "BDA",
    "GALET",
    "ITD",
    "TRHG",
    "Alternating",
    "Assembled",
    "LowerAggregated",
    "LowerGD",
    "Method",
    "SlBAMM",
    "StabilityChecked",
    "StabilityWarning",
    "State",
    "Unrolled",
    "option",
]
