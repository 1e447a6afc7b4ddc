"""Built-in bilevel problems: toys with closed-form answers, the papers' experiments and
benchopt's stochastic benchmark problems (:mod:`bilevel.problems.benchmark`)."""

from .benchmark import StochasticBenchmark, stochastic_benchmark
from .fewshot import EpisodeSource, EpisodicLower, FewshotProblem, fewshot_problem
from .finite_sum import FiniteSumQuadratic, finite_sum_quadratic
from .hyperclean import HypercleanProblem, hyperclean_problem
from .toys import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g, ToyProblem

__all__ = [
    "T1",
    "T2",
    "T3",
    "T3_LOCAL_MINIMA",
    "T4",
    "EpisodeSource",
    "EpisodicLower",
    "FewshotProblem",
    "FiniteSumQuadratic",
    "HypercleanProblem",
    "StochasticBenchmark",
    "T1g",
    "ToyProblem",
    "fewshot_problem",
    "finite_sum_quadratic",
    "hyperclean_problem",
    "stochastic_benchmark",
]
