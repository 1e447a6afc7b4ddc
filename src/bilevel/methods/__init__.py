"""Bilevel methods: the seed methods (GALET, sl-BAMM, BAGDC) and the baselines."""

from .aid import AID
from .bagdc import BAGDC
from .bamm import SlBAMM
from .base import LowerAggregated, LowerGD, Method, StabilityWarning, State
from .galet import GALET
from .itd import BDA, ITD, TRHG

__all__ = ["AID", "BAGDC", "BDA", "GALET", "ITD", "TRHG", "SlBAMM", "LowerAggregated", "LowerGD", "Method", "State", "StabilityWarning"]
