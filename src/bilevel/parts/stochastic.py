"""Parts of the stochastic methods: oracles on separate batches, lower SGD, stochastic
multipliers, the variance-reduced estimators and the averaged upper direction.

Notation: ``H v = ∇²_yy g · v``, ``J v = ∇²_xy g · v``, ξ lower batches, ζ upper batches.
The library's sign: the multiplier solves ``H v = ∇_y f`` and the direction is
``∇_x f − J v`` (SOBA's paper and benchopt store ``−v``).

* :func:`evaluate` — the five oracles of one single-loop iteration at ``(x, y, v)``:
  ``∇_y g(ξ)``, ``(H v, J v)(ξ)`` by one vector–Jacobian product of ``∇_y g``, and
  ``(∇_x f, ∇_y f)(ζ)`` by one backward pass: cost ``1 Gy + 1 HJ + 1 Gf``.
* Estimators of the three directions ``D_y = ∇_y g``, ``D_v = H v − ∇_y f``,
  ``D_x = ∇_x f − J v`` (a "global" wrapper over all of them): :class:`PlainEstimate`
  (SOBA), :class:`SagaEstimate` (SABA), :class:`SarahEstimate` (SRBA).
* :class:`LowerSGD` — lower SGD steps with a step schedule, a fresh batch per step.
* :class:`StochasticNeumann` (StocBiO) and :class:`DualSteps` (AmIGO) — multipliers from
  a fresh Hessian batch per term / step.
* :class:`AveragedDirection` — the moving average of MA-SOBA (a direction estimator).
* :class:`PenaltyIncrements` — F2SA's growing penalty λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch

from .. import tree as T
from ..linsolve import LinearSolveResult
from ..oracles import Oracles
from ..problem import Problem
from ..schedules import Schedule, ScheduleLike, as_schedule
from ..state import EmptyState, part_state
from ..tree import Tree
from ..validation import check_choice, check_count, check_fraction, check_nonnegative, check_positive, check_step_size

__all__ = [
    "AveragedDirection",
    "AveragedDirectionState",
    "DualSteps",
    "LowerSGD",
    "LowerShadowState",
    "OracleValues",
    "PenaltyIncrements",
    "PenaltyState",
    "PlainEstimate",
    "SagaEstimate",
    "SagaState",
    "SarahEstimate",
    "SarahState",
    "StochasticNeumann",
    "evaluate",
    "sarah_period",
]


class OracleValues(NamedTuple):
    """The oracles of one point on one lower batch ξ and one upper batch ζ."""

    grad_y_g: Tree  # ∇_y g(x, y; ξ)
    hv: Tree  # H(ξ) v
    jv: Tree  # J(ξ) v
    grad_y_f: Tree  # ∇_y f(x, y; ζ)
    grad_x_f: Tree  # ∇_x f(x, y; ζ)
    upper_loss: torch.Tensor  # f(x, y; ζ)


def evaluate(oracles: Oracles, problem: Problem, x: Tree, y: Tree, v: Tree, lower: Any, upper: Any) -> OracleValues:
    """The five oracles at ``(x, y, v)``: ``1 Gy + 1 HJ`` on ξ = ``lower``, ``1 Gf`` on ζ = ``upper``."""
    point = oracles.linearize(problem.lower, x, y, lower)
    jv, hv = point.both(v)
    grad_x_f, grad_y_f, value = oracles.gradients(problem.upper, x, y, upper)
    return OracleValues(point.grad_y, hv, jv, grad_y_f, grad_x_f, value)


Evaluate = Callable[[Tree, Tree, Tree, Any, Any], OracleValues]


def _directions(o: OracleValues) -> tuple[Tree, Tree, Tree]:
    d_v, d_x = T.differences((o.hv, o.grad_y_f), (o.grad_x_f, o.jv))  # one fused kernel
    return o.grad_y_g, d_v, d_x


@dataclass(frozen=True)
class PlainEstimate:
    """The mini-batch directions themselves (SOBA): ``D_y = ∇_y g(ξ)``,
    ``D_v = H(ξ) v − ∇_y f(ζ)``, ``D_x = ∇_x f(ζ) − J(ξ) v``, with ξ, ζ independent
    draws of the iteration. Stateless; cost ``1 Gy + 1 HJ + 1 Gf``, one batch per stream.

    Example:
        >>> import torch, bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=8, n_upper=8, dim_x=2, dim_y=2, seed=0)
        >>> part = bl.parts.PlainEstimate()
        >>> ev = lambda x, y, v, lo, up: bl.parts.evaluate(bl.Oracles(), p, x, y, v, lo, up)
        >>> draws = bl.streams.as_draws(None)                  # full batch
        >>> (dy, dv, dx), _, _ = part.estimate(ev, p.x_init, p.y_init, p.y_init, draws, part.init(None, None, None, draws, None), 0)
        >>> torch.allclose(dx["x"], p.means["q"])            # ∇_x f at x = y = v = 0
        True
    """

    def init(self, x: Tree, y: Tree, v: Tree, draws: Any, evaluate: Evaluate | None) -> EmptyState:
        return EmptyState()

    def estimate(self, evaluate: Evaluate, x: Tree, y: Tree, v: Tree, draws: Any, state: Any, k: int) -> tuple[tuple, OracleValues, Any]:
        o = evaluate(x, y, v, draws.lower(0), draws.upper(0))
        return _directions(o), o, state


@part_state
class SagaState(NamedTuple):
    """SAGA memory: per-block rows and their weighted means, lower-indexed
    (``grad_y_g``, ``hv``, ``jv``) and upper-indexed (``grad_y_f``, ``grad_x_f``).

    The rows are written in place (they are n-sized), so a state can be stepped once:
    ``rows["writes"]`` (a CPU counter shared by every state that holds these tables) counts
    the writes made, and ``writes`` is the count this state expects. A second step from the
    same state would read rows that a later iteration already overwrote and move the means
    by the wrong amount — a bias that never goes away — so it is refused instead.
    """

    rows: dict
    means: dict
    writes: int = 0


_LOWER_KEYS = ("grad_y_g", "hv", "jv")
_UPPER_KEYS = ("grad_y_f", "grad_x_f")


def _stack_zeros(tree: Tree, count: int) -> Tree:
    return T.tree_map(lambda t: torch.zeros((count, *t.shape), dtype=t.dtype, device=t.device), tree)


@dataclass(frozen=True)
class SagaEstimate:
    """SAGA memory on the five oracle streams (SABA, Dagréou et al. 2022).

    Each stream keeps one row per block and the weighted mean ``m̄ = Σ_k w_k m_k``; on
    drawing block k with the fresh value o::

        out = o − m_k + m̄,    m̄ ← m̄ + w_k (o − m_k),    m_k ← o

    ``∇_y g``, ``H v``, ``J v`` are indexed by the lower block i, ``∇_y f``, ``∇_x f`` by
    the upper block j; then ``D_y = out(∇_y g)``, ``D_v = out(Hv) − out(∇_y f)``,
    ``D_x = out(∇_x f) − out(Jv)``. E[out] is the full-sum value at the current point
    (uniform block draws with probability w_k).

    Cost: ``1 Gy + 1 HJ + 1 Gf`` per iteration and the row writes (in place: the tables
    are n-sized, so the state passed to ``estimate`` is updated, not copied).
    Memory: ``(2 d_y + d_x) N_lower + (d_y + d_x) N_upper`` numbers (N = blocks), i.e.
    ``(2 d_y + d_x)/b`` lower and ``(d_y + d_x)/b`` upper numbers per sample for batch b
    (×8 bytes in float64, ×4 in float32).

    Args:
        init_memory: ``"zero"`` (tables start at 0, as the benchmark runs it) or
            ``"full"`` (one pass over the blocks at the initial point fills the rows
            of ``∇_y g``, ``∇_y f``, ``∇_x f``; H v and J v are 0 there since v₀ = 0).
    """

    init_memory: str = "zero"

    def __post_init__(self) -> None:
        check_choice("SagaEstimate", "init_memory", self.init_memory, ("zero", "full"))

    def init(self, x: Tree, y: Tree, v: Tree, draws: Any, evaluate: Evaluate | None) -> SagaState:
        nl, nu = draws.lower_blocks, draws.upper_blocks
        rows = {"grad_y_g": _stack_zeros(y, nl), "hv": _stack_zeros(y, nl), "jv": _stack_zeros(x, nl)}
        rows.update({"grad_y_f": _stack_zeros(y, nu), "grad_x_f": _stack_zeros(x, nu)})
        rows["writes"] = torch.zeros(1, dtype=torch.int64)  # on the CPU: reading it never waits for a device
        means = {"grad_y_g": T.zeros_like(y), "hv": T.zeros_like(y), "jv": T.zeros_like(x)}
        means.update({"grad_y_f": T.zeros_like(y), "grad_x_f": T.zeros_like(x)})
        if self.init_memory == "full" and evaluate is not None:
            streams = getattr(draws, "streams", None)
            for which, count, keys in (("lower", nl, ("grad_y_g",)), ("upper", nu, _UPPER_KEYS)):
                weights = draws.lower_weights() if which == "lower" else draws.upper_weights()
                for block in range(count):
                    batch = getattr(streams, which).take(block) if streams is not None else draws.lower(0)
                    pair = (batch, draws.upper(0)) if which == "lower" else (draws.lower(0), batch)
                    o = evaluate(x, y, v, *pair)
                    for key in keys:
                        value = getattr(o, key)
                        for row, leaf in zip(T.leaves(rows[key]), T.leaves(value), strict=True):
                            row[block].copy_(leaf)
                        means[key] = T.axpy(weights[block], value, means[key])
        return SagaState(rows=rows, means=means)

    def estimate(
        self, evaluate: Evaluate, x: Tree, y: Tree, v: Tree, draws: Any, state: SagaState, k: int
    ) -> tuple[tuple, OracleValues, SagaState]:
        counter = state.rows.get("writes")
        if counter is not None and int(counter[0]) != state.writes:
            raise ValueError(
                f"this SABA state was stepped before: its SAGA tables are updated in place and already hold "
                f"{int(counter[0]) - state.writes} later write(s), so a second step from it would bias the estimate for good; "
                f"step each state once, or step a copy (copy.deepcopy(state)) to branch"
            )
        i, wi, lower = draws.lower_block(0)
        j, wj, upper = draws.upper_block(0)
        o = evaluate(x, y, v, lower, upper)
        keys = (*_LOWER_KEYS, *_UPPER_KEYS)
        fresh = [getattr(o, key) for key in keys]
        # the rows of the drawn blocks (views of the tables), each oracle's row in its block
        rows = [[table[i if key in _LOWER_KEYS else j] for table in T.leaves(state.rows[key])] for key in keys]
        # every oracle at once, one fused kernel per operation (elementwise the same arithmetic):
        # δ = fresh − row, the estimate δ + mean, the mean moved by w δ, the rows overwritten
        deltas = T.differences(*((f, T.unflatten_like(row, f)) for f, row in zip(fresh, rows, strict=True)))
        out = dict(zip(keys, T.sums(*((delta, state.means[key]) for delta, key in zip(deltas, keys, strict=True))), strict=True))
        n_lower = len(_LOWER_KEYS)
        moved = T.axpys(wi, *((delta, state.means[key]) for delta, key in zip(deltas[:n_lower], _LOWER_KEYS, strict=True)))
        moved += T.axpys(wj, *((delta, state.means[key]) for delta, key in zip(deltas[n_lower:], _UPPER_KEYS, strict=True)))
        means = {**state.means, **dict(zip(keys, moved, strict=True))}
        torch._foreach_copy_([t for row in rows for t in row], [t for f in fresh for t in T.leaves(f)])
        if counter is not None:
            counter += 1
        return _directions(o._replace(**out)), o, SagaState(rows=state.rows, means=means, writes=state.writes + 1)


@part_state
class SarahState(NamedTuple):
    """SRBA's recursion: the previous point and the three running directions."""

    x: Any
    y: Any
    v: Any
    d_y: Any
    d_v: Any
    d_x: Any


def sarah_period(draws: Any, period_frac: float) -> int:
    """q = max(1, int((n + m) · period_frac / b)) (the benchmark's rule; 1 for a full batch)."""
    streams = getattr(draws, "streams", None)
    if streams is None:
        return 1
    n_total = streams.lower.n + streams.upper.n
    return max(1, int(n_total * period_frac / streams.lower.batch_size))


@dataclass(frozen=True)
class SarahEstimate:
    """SARAH recursion with a periodic full refresh (SRBA, Dagréou et al. 2024).

    Every q iterations (``k mod q = 0``, the first one included) the three directions are
    computed on the full data; otherwise ξ_k, ζ_k are drawn once and every oracle is taken
    with the **same** batches at the current and the previous point::

        D ← D + [value(x_k, y_k, v_k; ξ_k, ζ_k)] − [value(x_{k−1}, y_{k−1}, v_{k−1}; ξ_k, ζ_k)]

    for D = (D_y, D_v, D_x). q = ``period`` or ``max(1, int((n + m)·period_frac / b))``.

    Cost: ordinary step ``2 (Gy + HJ) + 2 Gf``; refresh ``Gy + HJ + Gf`` on all n + m
    samples. Memory: the previous (x, y, v) and the three directions (no n-sized table).

    Args:
        period_frac: the benchmark's ``period_frac`` (default 0.5).
        period: q itself (overrides ``period_frac``).
    """

    period_frac: float = 0.5
    period: int | None = None

    def __post_init__(self) -> None:
        check_positive("SarahEstimate", "period_frac", self.period_frac)
        check_count("SarahEstimate", "period", self.period, allow_none=True)

    def init(self, x: Tree, y: Tree, v: Tree, draws: Any, evaluate: Evaluate | None) -> SarahState:
        zy, zx = T.zeros_like(y), T.zeros_like(x)
        return SarahState(x=T.clone(x), y=T.clone(y), v=T.clone(v), d_y=zy, d_v=zy, d_x=zx)

    def estimate(
        self, evaluate: Evaluate, x: Tree, y: Tree, v: Tree, draws: Any, state: SarahState, k: int
    ) -> tuple[tuple, OracleValues, SarahState]:
        q = self.period if self.period is not None else sarah_period(draws, self.period_frac)
        if k % q == 0:
            o = evaluate(x, y, v, draws.lower_full(), draws.upper_full())
            d_y, d_v, d_x = _directions(o)
        else:
            lower, upper = draws.lower(0), draws.upper(0)
            o = evaluate(x, y, v, lower, upper)
            old = evaluate(state.x, state.y, state.v, lower, upper)
            new_d, old_d = _directions(o), _directions(old)
            changes = T.differences(*zip(new_d, old_d, strict=True))  # one fused kernel per operation
            d_y, d_v, d_x = T.sums(*zip((state.d_y, state.d_v, state.d_x), changes, strict=True))
        return (d_y, d_v, d_x), o, SarahState(x=x, y=y, v=v, d_y=d_y, d_v=d_v, d_x=d_x)


@dataclass(frozen=True)
class LowerSGD:
    """Lower SGD: ``steps`` steps ``y ← y − β_k ∇_y g(x, y; ξ_{k,t})``, a fresh batch ξ_{k,t}
    (lower draw t of iteration k) per step; β a number or a schedule of the iteration k.

    Stateless (:class:`~bilevel.state.EmptyState`); cost ``steps`` Gy, ``steps`` lower batches.

    Args:
        lr: β, a positive number or a schedule ``k -> β_k``.
        steps: T, steps per upper iteration.
    """

    lr: ScheduleLike = 0.1
    steps: int = 1

    def __post_init__(self) -> None:
        check_step_size("LowerSGD", "lr", self.lr)
        check_count("LowerSGD", "steps", self.steps)

    @cached_property
    def schedule(self) -> Schedule:
        return as_schedule(self.lr)

    def init(self, y: Tree) -> EmptyState:
        return EmptyState()

    def averaging(self, k: int) -> float:
        return 0.0

    def step(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, oracles: Oracles, k: int = 0, scale: torch.Tensor | None = None
    ) -> tuple[Tree, Tree]:
        """One step on the lower draw t of ``batch`` (a :class:`~bilevel.streams.Draws`, or a
        batch); ``scale`` multiplies β_k (the auto steps' 1/λ̂)."""
        lower = batch.lower(t) if hasattr(batch, "lower_block") else batch
        grad_g, _ = oracles.gradient_y(problem.lower, x, y, lower)
        return T.axpy(-self.step_size(k, scale), grad_g, y), grad_g

    def step_size(self, k: int, scale: torch.Tensor | None = None) -> Any:
        """β_k, times ``scale`` when one is given."""
        beta = self.schedule(k)
        return beta if scale is None else beta * scale

    def run(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: Any = None, k: int = 0
    ) -> tuple[Tree, Tree, Any]:
        direction: Tree = None
        for t in range(self.steps):
            y, direction = self.step(problem, x, y, batch, t, oracles, k)
        return y, direction, EmptyState() if state is None else state

    def differentiable_step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, k: int = 0) -> tuple[Tree, Tree]:
        raise NotImplementedError("LowerSGD is for the stochastic methods; unrolled methods use LowerGD")

    def apply(self, y: Tree, gradient: Tree) -> Tree:
        return self.apply_at(y, gradient, 0)

    def apply_at(self, y: Tree, gradient: Tree, k: int, scale: torch.Tensor | None = None) -> Tree:
        """``y − β_k D_y`` from a direction the caller has (the single-loop methods)."""
        return T.axpy(-self.step_size(k, scale), gradient, y)


MatVecAt = Callable[[int], Callable[[Tree], Tree]]


@dataclass(frozen=True)
class StochasticNeumann:
    """StocBiO's multiplier: a truncated Neumann series with a fresh Hessian batch per factor,

        r₀ = b,   r_q = (I − η H(ξ'_q)) r_{q−1}  (q = 1 … K),   v = η Σ_{q=0}^{K} r_q

    so that ``E[v] = H⁻¹(I − (I − ηH)^{K+1}) b`` (independent ξ'_q). Cold start; stateless.
    Cost: K Hessian products on K lower batches. Needs η < 2/L_g.

    Args:
        steps: K, the Hessian factors (the benchmark's ``n_shia_steps``).
        lr: η (``None``: the method ties it to the lower step, as the benchmark does).
    """

    steps: int = 10
    lr: float | None = None

    def __post_init__(self) -> None:
        check_count("StochasticNeumann", "steps", self.steps, minimum=0)
        check_positive("StochasticNeumann", "lr", self.lr, allow_none=True)

    def init(self, v: Tree) -> EmptyState:
        return EmptyState()

    def update(self, matvec: Any, b: Tree, v: Tree, state: Any, k: int, hv: Tree | None = None) -> tuple[LinearSolveResult, Any]:
        """The deterministic series with one matrix (the multiplier protocol); η must be set."""
        return LinearSolveResult(v=self.solve(lambda q: matvec, b, self.lr or 1.0), residual_sq=None), state

    def solve(self, matvec_at: MatVecAt, b: Tree, eta: float) -> Tree:
        """``η Σ_{q=0}^{K} r_q`` with ``matvec_at(q)`` the product of factor q + 1."""
        r, total = b, b
        for q in range(self.steps):
            r = T.axpy(-eta, matvec_at(q)(r), r)
            total = T.add(total, r)
        return T.scale(eta, total)


@dataclass(frozen=True)
class DualSteps:
    """AmIGO's multiplier: N warm-started SGD steps on ``½ vᵀH v − bᵀv``,

        v ← v − η (H(ξ'_n) v − b),   n = 1 … N

    a fresh Hessian batch per step, b = ∇_y f(ζ) fixed within the iteration. Stateless
    (v lives in the method state). Cost: N Hessian products on N lower batches.

    Args:
        steps: N (the benchmark's ``n_inner_steps``).
        lr: η (``None``: the lower step, as the benchmark does).
    """

    steps: int = 10
    lr: float | None = None

    def __post_init__(self) -> None:
        check_count("DualSteps", "steps", self.steps)
        check_positive("DualSteps", "lr", self.lr, allow_none=True)

    def init(self, v: Tree) -> EmptyState:
        return EmptyState()

    def update(self, matvec: Any, b: Tree, v: Tree, state: Any, k: int, hv: Tree | None = None) -> tuple[LinearSolveResult, Any]:
        """The deterministic steps with one matrix (the multiplier protocol); η must be set."""
        return LinearSolveResult(v=self.solve(lambda n: matvec, b, self.lr or 1.0, v), residual_sq=None), state

    def solve(self, matvec_at: MatVecAt, b: Tree, eta: float, v: Tree) -> Tree:
        """N steps from ``v`` with ``matvec_at(n)`` the product of step n."""
        for n in range(self.steps):
            v = T.axpy(-eta, T.sub(matvec_at(n)(v), b), v)
        return v


@part_state
class AveragedDirectionState(NamedTuple):
    """The running average h of MA-SOBA (a tree shaped like x; ``None`` before the first step)."""

    h: Any


@dataclass(frozen=True)
class AveragedDirection:
    """MA-SOBA's moving average of the hypergradient estimates (a direction estimator):

        h_{k+1} = (1 − θ) h_k + θ w_k,   the upper step uses h_{k+1};   h_0 = w_0

    (starting from the first estimate, not from 0, so the first ~1/θ steps are not
    damped). Cost: one d_x buffer, no oracle.

    Args:
        theta: θ in (0, 1] (1: SOBA's plain direction).

    Example:
        >>> import torch, bilevel as bl
        >>> part = bl.parts.AveragedDirection(theta=0.5)
        >>> d, s = part.update({"x": torch.ones(1)}, part.init(None), 0)
        >>> part.update({"x": torch.zeros(1)}, s, 1)[0]
        {'x': tensor([0.5000])}
    """

    theta: float = 0.1

    def __post_init__(self) -> None:
        check_fraction("AveragedDirection", "theta", self.theta, low_open=True, high_open=False)

    def init(self, x: Tree) -> AveragedDirectionState:
        return AveragedDirectionState(h=None)

    def update(self, estimate: Tree, state: Any, k: int) -> tuple[Tree, AveragedDirectionState]:
        h = estimate if state.h is None else T.axpy(self.theta, estimate, T.scale(1.0 - self.theta, state.h))
        return h, AveragedDirectionState(h=h)


@part_state
class PenaltyState(NamedTuple):
    """F2SA's penalty λ_k (a float)."""

    lam: float


@part_state
class LowerShadowState(NamedTuple):
    """F2SA's shadow lower variable z (a tree shaped like y)."""

    z: Any


@dataclass(frozen=True)
class PenaltyIncrements:
    """A growing penalty: ``λ_0 = lambda0``, ``λ_{k+1} = λ_k + δ_0 (k + 1)^{−power}``
    (F2SA; the benchmark's λ_k ≈ λ_0 + (7/6) δ_0 k^{6/7} for power 1/7). Cost: none.

    Args:
        lambda0: λ_0 > 0.  delta0: δ_0 ≥ 0 (0: a fixed penalty).  power: the decay of δ_k.
    """

    lambda0: float = 1.0
    delta0: float = 0.1
    power: float = 1.0 / 7.0

    def __post_init__(self) -> None:
        check_positive("PenaltyIncrements", "lambda0", self.lambda0)
        check_nonnegative("PenaltyIncrements", "delta0", self.delta0)
        check_nonnegative("PenaltyIncrements", "power", self.power)

    def init(self) -> PenaltyState:
        return PenaltyState(lam=float(self.lambda0))

    def update(self, state: PenaltyState, k: int) -> PenaltyState:
        return PenaltyState(lam=state.lam + self.delta0 * math.pow(k + 1, -self.power))
