"""Evidence for ``"auto"`` step sizes (docs/auto.md): every method with no step size given.

Parts (``--parts``, default all):

* ``zoo``: the toys T1 (κ = 1), Q100 (diagonal, κ = 100), T4 (PL, singular H; GALET's
  class) with f and g scaled by s ∈ {1e-3, 1, 1e3}: iterations for auto to reach a
  relative error 1e-6 in x, and the error of the hand-tuned steps (the docstring
  examples') after the same number of iterations.
* ``kappa``: the diagonal toy at lower condition number 1e4, every method at s = 1.
* ``growing``: learned log-penalties, lower Hessian diag(e^x) from I to 148 I along the
  path: auto against steps fixed from the curvature at ``init``.
* ``cost``: counted oracle calls per iteration, auto against the explicit defaults.
* ``hyperclean``: MNIST and FashionMNIST hyper-cleaning with the linear model, and the
  PBGD MLP on MNIST: one auto configuration per method (the same on both datasets)
  against the tuned presets of the built-in configurations, at equal wall-clock time
  (``--seconds`` per run), F1 and test accuracy; the no-cleaning baseline.
* ``peak``: hyper-cleaning's test accuracy peaks early and then falls for every
  configuration (presets too: the weights over-fit the validation loss), so the preset,
  auto, and auto with ``lr_upper=Adam(0.1)`` or ``lr_upper=bl.auto.AdamDoG()`` are compared
  at their peak within ``--peak-seconds`` (and at the end), on the linear model of each of
  ``--peak-configs`` (MNIST and FashionMNIST).
* ``walltime``: wall-clock per iteration of auto against the preset, interleaved steps.
* ``grid``: a 3×3 grid over BAGDC's (lr_lower, Adam lr_upper) on MNIST linear: its best
  test accuracy and its total time, against the time auto needs to reach it.

``--device cuda`` runs the toy parts (zoo, kappa, growing, cost) on the GPU (data built on the CPU,
then moved); the hyper-cleaning parts (hyperclean, walltime, grid) build their problem with the
experiment runner, which puts it on the CPU, so they stay on the CPU.

Run: ``python benchmarks/auto_steps.py --seconds 20`` (hyper-cleaning needs MNIST and
FashionMNIST: ``bilevel data``). Sizes: 2000/1000/2000 train/val/test, 50 % noise.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import bilevel as bl
from bilevel.problems.toys import T1, T4, ToyProblem
from common import ROOT, environment  # noqa: F401 - puts src/ on sys.path

F64 = torch.float64


# --------------------------------------------------------------------------- toys


def scaled(problem: ToyProblem, s: float) -> ToyProblem:
    return ToyProblem(
        upper=lambda x, y, b: s * problem.upper(x, y, b),
        lower=lambda x, y, b: s * problem.lower(x, y, b),
        x_init=problem.x_init,
        y_init=problem.y_init,
        name=f"{problem.name}*{s:g}",
        x_star=problem.x_star,
    )


def diagonal(n: int = 10, kappa: float = 100.0, device="cpu") -> ToyProblem:
    a = torch.logspace(0.0, math.log10(kappa), n, dtype=F64).to(device)
    c = torch.linspace(-1.0, 1.0, n, dtype=F64).to(device)
    return ToyProblem(
        upper=lambda x, y, _: 0.5 * ((y["y"] - c) ** 2).sum() + 0.5 * (x["x"] ** 2).sum(),
        lower=lambda x, y, _: 0.5 * (a * y["y"] ** 2).sum() - (x["x"] * y["y"]).sum(),
        x_init={"x": torch.ones(n, dtype=F64, device=device)},
        y_init={"y": torch.zeros(n, dtype=F64, device=device)},
        name=f"Q{kappa:g}",
        x_star={"x": (c / a) / (1.0 / a**2 + 1.0)},
    )


def growing(n: int = 5, rho: float = 1.0, x_hat: float = 5.0, device="cpu") -> ToyProblem:
    b, c = torch.linspace(1.0, 2.0, n, dtype=F64), torch.linspace(0.01, 0.02, n, dtype=F64)
    x = torch.full((n,), x_hat, dtype=F64)
    for _ in range(60):
        u = torch.exp(-x)
        x = x - (-b * u * (b * u - c) + rho * (x - x_hat)) / (b * u * (b * u - c) + (b * u) ** 2 + rho)
    b, c, x = b.to(device), c.to(device), x.to(device)
    return ToyProblem(
        upper=lambda x, y, _: 0.5 * ((y["y"] - c) ** 2).sum() + 0.5 * rho * ((x["x"] - x_hat) ** 2).sum(),
        lower=lambda x, y, _: 0.5 * (torch.exp(x["x"]) * y["y"] ** 2).sum() - (b * y["y"]).sum(),
        x_init={"x": torch.zeros(n, dtype=F64, device=device)},
        y_init={"y": torch.zeros(n, dtype=F64, device=device)},
        name="growing",
        x_star={"x": x},
    )


def rel_error(x: dict, problem: ToyProblem) -> float:
    return float(torch.linalg.norm(x["x"] - problem.x_star["x"]) / torch.linalg.norm(problem.x_star["x"]))


def iterations_to(problem: ToyProblem, method, max_iters: int, target: float = 1e-6, every: int = 10) -> tuple[int | None, float]:
    """First checked iteration with relative error ≤ target (None if never), final error."""
    try:
        state = method.init(problem)
        for k in range(1, max_iters + 1):
            state, _ = method.step(problem, state)
            if k % every == 0:
                err = rel_error(state.x, problem)
                if not math.isfinite(err):
                    return None, math.inf
                if err <= target:
                    return k, err
        return None, rel_error(state.x, problem)
    except (RuntimeError, ValueError):
        return None, math.inf


AUTO = {
    "GALET": lambda: bl.GALET(),
    "AID": lambda: bl.AID(),
    "BAGDC": lambda: bl.BAGDC(),
    "SlBAMM": lambda: bl.SlBAMM(mu=lambda k: 0.9 / (k + 1) ** 3),
}
PRESETS = {
    "GALET": lambda: bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5, stability_check="off"),
    "AID": lambda: bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=30),
    "BAGDC": lambda: bl.BAGDC(lr_upper=0.5, lr_lower=0.5, lr_dual=0.5, stability_check="off"),
    "SlBAMM": lambda: bl.SlBAMM(lr_upper=0.5, lr_lower=0.5, mu=lambda k: 0.9 / (k + 1) ** 3, stability_check="off"),
}


def part_zoo(max_iters: int, device="cpu") -> None:
    print("\n## Toy zoo: iterations to relative error 1e-6 (auto) | error of the hand-tuned steps after as many\n")
    print("| problem | method | s = 1e-3 | s = 1 | s = 1e3 |")
    print("|---|---|---|---|---|")
    problems = {"T1": lambda: T1(n=5, device=device), "Q100": lambda: diagonal(10, 100.0, device), "T4": lambda: T4(device=device)}
    for pname, make in problems.items():
        for mname in AUTO:
            if pname == "T4" and mname != "GALET":
                continue
            cells = []
            for s in (1e-3, 1.0, 1e3):
                problem = scaled(make(), s)
                k, err = iterations_to(problem, AUTO[mname](), max_iters)
                _, preset_err = iterations_to(problem, PRESETS[mname](), k or max_iters, target=0.0, every=k or max_iters)
                cells.append(f"{k if k else f'> {max_iters} ({err:.1e})'} \\| {preset_err:.1e}")
            print(f"| {pname} | {mname} | " + " | ".join(cells) + " |", flush=True)


def part_kappa(max_iters: int, device="cpu") -> None:
    print("\n## Condition number 1e4 (Q1e4: diagonal, a = 1 … 1e4): iterations to 1e-6 (auto) | hand-tuned steps after as many\n")
    print("| method | auto | preset |")
    print("|---|---|---|")
    for mname in AUTO:
        problem = diagonal(10, 1e4, device)
        k, err = iterations_to(problem, AUTO[mname](), max_iters)
        _, preset_err = iterations_to(problem, PRESETS[mname](), k or max_iters, target=0.0, every=k or max_iters)
        print(f"| {mname} | {k if k else f'> {max_iters} ({err:.1e})'} | {preset_err:.1e} |", flush=True)


def part_growing(max_iters: int, device="cpu") -> None:
    print("\n## Lower curvature growing with x (diag(e^x): λ_max 1 → 148)\n")
    print("| method | auto: iterations to 1e-6 | steps fixed at init (β = 1/λ_max(x₀), α = 0.05): status |")
    print("|---|---|---|")
    fixed = {
        "GALET": lambda: bl.GALET(lr_upper=0.05, lr_lower=1.0, lr_shadow=1.0),
        "BAGDC": lambda: bl.BAGDC(lr_upper=0.05, lr_lower=1.0, lr_dual=1.0),
        "AID": lambda: bl.AID(lr_upper=0.05, lr_lower=1.0),
        "SlBAMM": lambda: bl.SlBAMM(lr_upper=0.05, lr_lower=1.0, mu=lambda k: 0.9 / (k + 1) ** 3),
    }
    problem = growing(device=device)
    for name, make in fixed.items():
        k, err = iterations_to(problem, AUTO[name](), max_iters)
        result = bl.solve(problem, make(), max_iters=max_iters, on_divergence="status")
        reached = k if k else f"> {max_iters} ({err:.1e})"
        print(f"| {name} | {reached} | {result.status.value} at iteration {result.iterations} |", flush=True)


def part_cost(device="cpu") -> None:
    print("\n## Oracle calls per iteration (T1, 20 iterations; gradient units: products count 2)\n")
    print("| method | explicit | auto | ratio |")
    print("|---|---|---|---|")
    pairs = {
        "GALET": (bl.GALET(lr_upper=0.1, lr_lower=0.5, lr_shadow=0.25), bl.GALET()),
        "BAGDC": (bl.BAGDC(lr_upper=0.01, lr_lower=0.2, lr_dual=0.5), bl.BAGDC()),
        "SlBAMM": (bl.SlBAMM(lr_lower=0.1), bl.SlBAMM()),
        "AID": (bl.AID(lr_upper=0.1, lr_lower=0.1), bl.AID()),
    }
    for name, (explicit, auto) in pairs.items():
        units = []
        for method in (explicit, auto):
            counting = bl.CountingOracles()
            method = method.replace(oracles=counting)
            state = method.init(T1(n=3, device=device))
            counting.reset()
            for _ in range(20):
                state, _ = method.step(T1(n=3, device=device), state)
            units.append(sum(n * (2 if kind in ("hvp", "mixed", "both") else 1) for kind, n in counting.counts.items()) / 20)
        print(f"| {name} | {units[0]:.1f} | {units[1]:.1f} | {units[1] / units[0]:.3f} |", flush=True)


# --------------------------------------------------------------------------- hyper-cleaning


def experiment(config: str, overrides: list[str]):
    from bilevel.experiments import apply_overrides, load_config
    from bilevel.experiments.runner import build_experiment

    sizes = ["problem.n_train=2000", "problem.n_val=1000", "problem.n_test=2000", "problem.baseline_steps=300"]
    return build_experiment(apply_overrides(load_config(config), sizes + overrides))


def timed_run(exp, method, seconds: float, target: float | None = None, every: int = 10) -> dict:
    """Run for ``seconds`` (or until test accuracy ≥ target, checked every ``every`` iterations)."""
    state = method.init(exp.problem)
    start, k, reached = time.perf_counter(), 0, None
    info: dict = {}
    while time.perf_counter() - start < seconds:
        state, info = method.step(exp.problem, state)
        k += 1
        if target is not None and k % every == 0 and exp.evaluate(state)["test_accuracy"] >= target:
            reached = time.perf_counter() - start
            break
    elapsed = time.perf_counter() - start
    metrics = exp.evaluate(state)
    steps = {key: float(info[key]) for key in ("lr_lower", "lr_upper", "lr_dual", "rollbacks") if key in info}
    return {"iterations": k, "time": elapsed, "reached": reached, **metrics, "steps": steps}


AUTO_HC = {  # one configuration per method, the same on every dataset and model
    "GALET": lambda: bl.GALET(lower_steps=5, shadow_steps=5),
    "SlBAMM": lambda: bl.SlBAMM(),
    "BAGDC": lambda: bl.BAGDC(),
    "AID-CG": lambda: bl.AID(lower_steps=5),
}


def part_hyperclean(seconds: float, settings: list[tuple[str, str, list[str]]], names: list[str]) -> None:
    print(f"\n## Hyper-cleaning at equal wall-clock ({seconds:g} s per run, 1 thread, 2000/1000/2000, 50 % noise)\n")
    print("| data | method | preset F1 / test acc / iters | auto F1 / test acc / iters | auto steps at the end |")
    print("|---|---|---|---|---|")
    for label, config, overrides in settings:
        exp = experiment(config, overrides)
        base = exp.baseline()
        print(f"| {label} | no cleaning | {base['f1']:.3f} / {base['test_accuracy']:.1f} | | |", flush=True)
        for name, make in AUTO_HC.items():
            if name not in names:
                continue
            preset = experiment(config, [*overrides, f"method.name={name}"]).method
            p = timed_run(exp, preset, seconds)
            a = timed_run(exp, make(), seconds)
            steps = ", ".join(f"{k}={v:.3g}" for k, v in a["steps"].items())
            print(
                f"| {label} | {name} | {p['f1']:.3f} / {p['test_accuracy']:.1f} / {p['iterations']} | "
                f"{a['f1']:.3f} / {a['test_accuracy']:.1f} / {a['iterations']} | {steps} |",
                flush=True,
            )


def peak_run(exp, method, seconds: float, every: float = 0.5) -> dict:
    """Run for ``seconds`` of stepping (evaluations excluded), evaluating every ``every`` s:
    the peak test accuracy, its F1 and time, and the values at the end."""
    state = method.init(exp.problem)
    spent, due, rows = 0.0, every, []
    while spent < seconds:
        start = time.perf_counter()
        state, _ = method.step(exp.problem, state)
        spent += time.perf_counter() - start
        if spent >= due:
            metrics = exp.evaluate(state)
            rows.append((spent, metrics["test_accuracy"], metrics["f1"]))
            due += every
    best = max(rows, key=lambda row: row[1])
    return {"peak": best[1], "peak_f1": best[2], "peak_time": best[0], "end": rows[-1][1], "end_f1": rows[-1][2]}


PEAK_HC = {  # the auto configuration; part_peak adds an upper optimizer (lower and dual steps stay auto)
    "GALET": lambda **u: bl.GALET(lower_steps=5, shadow_steps=5, **u),
    "SlBAMM": lambda **u: bl.SlBAMM(**u),
    "BAGDC": lambda **u: bl.BAGDC(**u),
    "AID-CG": lambda **u: bl.AID(lower_steps=5, **u),
    "MEHA": lambda **u: bl.MEHA(**u),
    "IAPTT-GM": lambda **u: bl.IAPTTGM(lower_steps=10, **({"lr_init": 0.5, **u} if u else {})),
}


def part_peak(seconds: float, names: list[str], config: str = "hyperclean_mnist_liu") -> None:
    """Hyper-cleaning's test accuracy peaks and then falls for every configuration, tuned
    presets included (the weights over-fit the validation loss), so runs are compared at
    their peak within ``seconds``, and at the end."""
    print(f"\n## Peak test accuracy within {seconds:g} s, {config} linear (2000/1000/2000, 50 % noise, evaluated every 0.5 s)\n")
    overrides = ["problem.model=linear"]
    exp = experiment(config, overrides)
    base = exp.baseline()
    print(f"(no cleaning: F1 {base['f1']:.3f}, test accuracy {base['test_accuracy']:.1f})\n")
    print("| method | preset: peak (F1) @ s / end | auto | auto, lr_upper=Adam(0.1) | auto, lr_upper=AdamDoG() |")
    print("|---|---|---|---|---|")
    presets = load_presets(config)

    def show(r: dict) -> str:
        return f"{r['peak']:.1f} ({r['peak_f1']:.3f}) @ {r['peak_time']:.1f} / {r['end']:.1f}"

    for name, make in PEAK_HC.items():
        if name not in names:
            continue
        preset = "no preset"
        if name in presets:
            preset = show(peak_run(exp, experiment(config, [*overrides, f"method.name={name}"]).method, seconds))
        auto = peak_run(exp, make(), seconds)
        adam = peak_run(exp, make(lr_upper=bl.Adam(0.1)), seconds)
        adam_dog = peak_run(exp, make(lr_upper=bl.auto.AdamDoG()), seconds)
        print(f"| {name} | {preset} | {show(auto)} | {show(adam)} | {show(adam_dog)} |", flush=True)


def load_presets(config: str) -> dict:
    from bilevel.experiments import load_config

    return dict(load_config(config).get("methods") or {})


def part_walltime(repeats: int = 10) -> None:
    print(f"\n## Wall-clock per iteration, auto / preset, MNIST linear (interleaved steps, {repeats} each)\n")
    print("| method | preset ms/iter | auto ms/iter | ratio |")
    print("|---|---|---|---|")
    exp = experiment("hyperclean_mnist_liu", ["problem.model=linear"])
    for name, make in AUTO_HC.items():
        methods = {"preset": experiment("hyperclean_mnist_liu", ["problem.model=linear", f"method.name={name}"]).method, "auto": make()}
        states = {key: method.init(exp.problem) for key, method in methods.items()}
        spent = dict.fromkeys(methods, 0.0)
        for _ in range(repeats):
            for key, method in methods.items():
                start = time.perf_counter()
                states[key], _ = method.step(exp.problem, states[key])
                spent[key] += time.perf_counter() - start
        p, a = (1000 * spent[key] / repeats for key in ("preset", "auto"))
        print(f"| {name} | {p:.0f} | {a:.0f} | {a / p:.2f} |", flush=True)


def part_grid(seconds: float) -> None:
    print(f"\n## 3×3 grid over BAGDC's (lr_lower, Adam lr_upper), MNIST linear, {seconds:g} s per run\n")
    exp = experiment("hyperclean_mnist_liu", ["problem.model=linear"])
    best, total = (None, -1.0), 0.0
    for lr_lower in (0.1, 0.5, 1.0):
        for lr_upper in (0.01, 0.1, 1.0):
            r = timed_run(exp, bl.BAGDC(lr_upper=bl.Adam(lr_upper), lr_lower=lr_lower, lr_dual=0.5, stability_check="off"), seconds)
            total += r["time"]
            print(f"* lr_lower={lr_lower}, lr_upper=Adam({lr_upper}): test acc {r['test_accuracy']:.1f}, F1 {r['f1']:.3f}", flush=True)
            if r["test_accuracy"] > best[1]:
                best = ((lr_lower, lr_upper), r["test_accuracy"])
    auto = timed_run(exp, bl.BAGDC(), 9 * seconds, target=best[1])
    when = f"{auto['reached']:.1f} s" if auto["reached"] is not None else f"not within {9 * seconds:g} s ({auto['test_accuracy']:.1f})"
    print(f"\ngrid: best {best[1]:.1f} at {best[0]}, {total:.0f} s for the 9 runs; auto BAGDC reaches it in {when}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="zoo,kappa,growing,cost,hyperclean,peak,walltime,grid")
    parser.add_argument("--kappa-iters", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=20.0, help="wall-clock budget of each hyper-cleaning run")
    parser.add_argument("--zoo-iters", type=int, default=3000)
    parser.add_argument("--methods", default=",".join(PEAK_HC), help="hyper-cleaning methods (comma-separated)")
    parser.add_argument("--peak-seconds", type=float, default=12.0, help="stepping time of each run of the peak part")
    parser.add_argument("--peak-configs", default="hyperclean_mnist_liu,hyperclean_fashion_liu", help="configurations of the peak part")
    parser.add_argument("--mlp", action="store_true", help="also the PBGD MLP (MNIST)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: the toy parts (zoo, growing, cost); the hyper-cleaning parts stay on the CPU"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(environment(args.device))
    parts = args.parts.split(",")
    if "zoo" in parts:
        part_zoo(args.zoo_iters, args.device)
    if "kappa" in parts:
        part_kappa(args.kappa_iters, args.device)
    if "growing" in parts:
        part_growing(800, args.device)
    if "cost" in parts:
        part_cost(args.device)
    if "hyperclean" in parts:
        settings = [
            ("MNIST linear", "hyperclean_mnist_liu", ["problem.model=linear"]),
            ("FashionMNIST linear", "hyperclean_fashion_liu", ["problem.model=linear"]),
        ]
        if args.mlp:
            settings.append(("MNIST PBGD MLP", "hyperclean_mnist_pbgd", []))
        part_hyperclean(args.seconds, settings, args.methods.split(","))
    if "peak" in parts:
        for config in args.peak_configs.split(","):
            part_peak(args.peak_seconds, args.methods.split(","), config)
    if "walltime" in parts:
        part_walltime()
    if "grid" in parts:
        part_grid(args.seconds)


if __name__ == "__main__":
    main()
