"""Non-bilevel baselines for the hyper-cleaning tables, and retraining with learned weights.

Prints, per hyper-cleaning configuration (default: ``hyperclean_demo``, plus the full
MNIST/FashionMNIST ones when their data are installed; a message says which are skipped):

1. the five baselines of :func:`bilevel.experiments.baselines.hyperclean_baselines`
   (mean ± std over the seeds), next to the configuration's own fixed no-cleaning row
   (``problem.baseline_lr`` for ``problem.baseline_steps`` steps, as the runner computes it);
2. the fraction of wrong labels and the F1 ceiling of both corruption rules (new label drawn
   among all classes, as the papers' code; or among the other classes only);
3. with ``--runs DIR ...``: for each run directory (``bilevel run``/``bench`` output), the
   test accuracy as trained next to that of a fresh classifier retrained with the run's
   learned weights ``σ(x)`` (``checkpoint.pt``, ``state.x``), alone and + validation;
4. the few-shot raw-pixel row (``--fewshot``, default ``fewshot_demo``): the meta-test of
   the identity feature map with the configuration's normalisation and heads.

The data of a run are rebuilt as the runner does: data seed ``problem.seed + run.seed``,
classifier seed ``run.seed``.

Examples::

    PYTHONPATH=src python benchmarks/baselines.py --seeds 0,1,2
    PYTHONPATH=src python benchmarks/baselines.py --configs hyperclean_demo --seeds 0 problem.n_val=200
    PYTHONPATH=src python benchmarks/baselines.py --no-baselines --runs runs/demo-bench/*-seed*
    PYTHONPATH=src python benchmarks/baselines.py --select runs/grid-lr0.1 runs/grid-lr0.03 runs/grid-lr0.3

5. with ``--select BENCH ...`` (only that): the choice of a grid on validation data, per
   method the bench (setting) and iteration count with the best mean ``val_accuracy``.

``--device cuda`` moves the hyper-cleaning data (built on the CPU, seeded) to the GPU for the
baselines and the retraining; the few-shot raw-pixel row builds its data with the experiment
runner's loaders, on the CPU, and stays there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from bilevel.checkpoint import load_checkpoint  # noqa: E402
from bilevel.data import DatasetError, make_hyperclean_data  # noqa: E402
from bilevel.data.hyperclean import (  # noqa: E402
    data_f1_ceiling,
    expected_wrong_label_fraction,
    f1_ceiling,
    wrong_label_fraction,
)
from bilevel.experiments import apply_overrides, load_config, resolve_config  # noqa: E402
from bilevel.experiments.baselines import (  # noqa: E402
    BASELINES,
    fewshot_raw_pixel_baseline,
    hyperclean_baselines,
    retrain_with_weights,
)
from bilevel.problems.hyperclean import fit_lower, hyperclean_problem  # noqa: E402

DEFAULT_CONFIGS = ("hyperclean_demo", "hyperclean_mnist_liu", "hyperclean_fashion_liu")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def build_data(config: dict, run_seed: int, exclude_true_class: bool | None = None, device: str = "cpu"):
    """The run's data, built on the CPU (seeded), then moved to ``device``."""
    p = config["problem"]
    exclude = p.get("exclude_true_class", False) if exclude_true_class is None else exclude_true_class
    kwargs = dict(exclude_true_class=True) if exclude else {}
    data = make_hyperclean_data(
        p["dataset"],
        noise_rate=float(p["noise_rate"]),
        seed=int(p["seed"]) + int(run_seed),
        n_train=p["n_train"],
        n_val=p["n_val"],
        n_test=p["n_test"],
        root=p["data_dir"],
        dtype=_DTYPES[p.get("dtype", "float32")],
        **kwargs,
    )
    return data if device == "cpu" else data.to(device)


def fixed_no_cleaning(config: dict, data, run_seed: int) -> float:
    """The runner's no-cleaning row: baseline_lr for baseline_steps steps, test accuracy (%)."""
    p = config["problem"]
    problem = hyperclean_problem(data, model=p["model"], reg=float(p["reg"]), hidden=int(p["hidden"]), seed=int(run_seed))
    y = fit_lower(problem, problem.x_init, problem.y_init, steps=int(p["baseline_steps"]), lr=float(p["baseline_lr"]))
    return problem.evaluate(problem.x_init, y)["test_accuracy"]


def baselines_table(name: str, overrides, seeds, args, record: dict) -> None:
    config = resolve_config(apply_overrides(load_config(name), overrides))
    p = config["problem"]
    try:
        datasets = {s: build_data(config, s, device=args.device) for s in seeds}
    except DatasetError as error:
        print(f"\n## {name}: skipped, dataset {p['dataset']!r} not available ({str(error).splitlines()[0]})")
        print("   `bilevel data` lists the datasets and how to install them.")
        return
    print(f"\n## {name} {' '.join(overrides)}".rstrip())
    first = datasets[seeds[0]]
    print(
        f"dataset {p['dataset']}, model {p['model']}, reg {p['reg']}, n_train/n_val/n_test "
        f"{len(first.y_train_noisy)}/{len(first.y_val)}/{len(first.y_test)}, noise_rate {p['noise_rate']}, "
        f"seeds {','.join(map(str, seeds))} (data seed = problem.seed + seed)"
    )
    rows = defaultdict(list)
    details = defaultdict(list)
    start = time.perf_counter()
    for seed in seeds:
        data = datasets[seed]
        table = hyperclean_baselines(
            data,
            model=p["model"],
            reg=float(p["reg"]),
            seed=seed,
            hidden=int(p["hidden"]),
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            folds=args.folds,
            patience=args.patience,
        )
        for key, row in table.items():
            rows[key].append(row["test_accuracy"])
            details[key].append(row)
        rows["fixed"].append(fixed_no_cleaning(config, data, seed))
        print(f"  seed {seed} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print("\n| baseline | test acc (%) | chosen steps | step size (1/L₀) | L₀ | fitting examples | selection |")
    print("|---|---|---|---|---|---|---|")
    for key in BASELINES:
        d = details[key]
        print(
            f"| {d[0]['description']} | {mean_std(rows[key])} | {', '.join(str(r['best_step']) for r in d)} | "
            f"{statistics.fmean(r['lr'] for r in d):.3f} | {statistics.fmean(r['curvature'] for r in d):.2f} | "
            f"{d[0]['train_size']} | {d[0]['selection']} |"
        )
    halvings = sum(r["halvings"] for d in details.values() for r in d)
    print(
        f"| no cleaning, fixed: lr {p['baseline_lr']} × {p['baseline_steps']} steps (the runner's row) | "
        f"{mean_std(rows['fixed'])} | {p['baseline_steps']} | {p['baseline_lr']} | - | {len(first.y_train_noisy)} | none |"
    )
    stable = 2 / statistics.fmean(r["curvature"] for r in details["no_cleaning"])
    print(
        f"\nrejected steps (halvings) over all fits: {halvings}; stability limit of the fixed row's step "
        f"at the start: 2/L₀ = {stable:.2f} (its lr {p['baseline_lr']})"
    )

    print(
        "\n| corruption rule | wrong labels (expected) | wrong labels (per seed) | "
        "F1 ceiling, positive = clean (closed form; per seed) | F1 ceiling, positive = noisy (closed form; per seed) |"
    )
    print("|---|---|---|---|---|")
    corruption = {}
    for exclude in (False, True):
        per_seed = {s: datasets[s] if not exclude and not p.get("exclude_true_class") else build_data(config, s, exclude) for s in seeds}
        n, c = len(first.y_train_noisy), first.num_classes
        wrong = [wrong_label_fraction(d) for d in per_seed.values()]
        ceil_c = [data_f1_ceiling(d) for d in per_seed.values()]
        ceil_n = [data_f1_ceiling(d, "noisy") for d in per_seed.values()]
        label = "other classes only (exclude_true_class=True)" if exclude else "all classes (papers' code, default)"
        rate = float(p["noise_rate"])
        print(
            f"| {label} | {expected_wrong_label_fraction(rate, c, exclude, n=n):.4f} | "
            f"{', '.join(f'{w:.4f}' for w in wrong)} | {f1_ceiling(rate, c, exclude):.4f}; "
            f"{', '.join(f'{x:.4f}' for x in ceil_c)} | {f1_ceiling(rate, c, exclude, positive='noisy'):.4f}; "
            f"{', '.join(f'{x:.4f}' for x in ceil_n)} |"
        )
        corruption["exclude" if exclude else "include"] = {"wrong": wrong, "f1_ceiling_clean": ceil_c, "f1_ceiling_noisy": ceil_n}
    record[f"{name} {' '.join(overrides)}".strip()] = {
        "baselines": dict(details.items()),
        "fixed_no_cleaning": rows["fixed"],
        "corruption": corruption,
    }


def retrain_runs(run_dirs, args, record: dict) -> None:
    print("\n## Retraining a fresh classifier with each run's learned weights σ(x)")
    print(
        f"(step size 1/L₀, step count chosen on validation, at most {args.max_steps} steps; "
        f"+ validation: {args.folds}-fold CV on the validation set)\n"
    )
    print("| run | method | seed | F1 | test acc as trained (%) | retrained (%) | chosen steps | retrained + validation (%) |")
    print("|---|---|---|---|---|---|---|---|")
    by_method = defaultdict(lambda: defaultdict(list))
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.yaml").is_file():
            print(f"| {run_dir} | skipped: no checkpoint.pt/config.yaml | | | | | | |")
            continue
        config = resolve_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if config["problem"]["kind"] != "hyperclean":
            continue
        p, seed = config["problem"], int(config["run"]["seed"])
        data = build_data(config, seed, device=args.device)  # retrain_with_weights moves x to the data's device
        x = load_checkpoint(run_dir / "checkpoint.pt", map_location="cpu")["state"].x
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        metrics = summary.get("metrics", {})
        common = dict(
            model=p["model"], reg=float(p["reg"]), seed=seed, hidden=int(p["hidden"]), max_steps=args.max_steps, eval_every=args.eval_every
        )
        alone = retrain_with_weights(data, x, **common)
        plus = retrain_with_weights(data, x, with_validation=True, folds=args.folds, **common) if args.with_validation else None
        method = config["method"].get("name", "?")
        as_trained = metrics.get("test_accuracy")
        plus_text = f"{plus['test_accuracy']:.2f}" if plus else "-"
        print(
            f"| {run_dir.name} | {method} | {seed} | {metrics.get('f1', float('nan')):.3f} | "
            f"{f'{as_trained:.2f}' if as_trained is not None else '-'} | {alone['test_accuracy']:.2f} | {alone['best_step']} | "
            f"{plus_text} |",
            flush=True,
        )
        for key, value in (
            ("trained", as_trained),
            ("retrained", alone["test_accuracy"]),
            ("plus_val", plus["test_accuracy"] if plus else None),
            ("f1", metrics.get("f1")),
        ):
            by_method[method][key].append(value)
        record.setdefault("runs", {})[str(run_dir)] = {
            "method": method,
            "seed": seed,
            "as_trained": as_trained,
            "f1": metrics.get("f1"),
            "retrained": alone,
            "retrained_plus_val": plus,
        }
    if by_method:
        print("\n| method | F1 | test acc as trained (%) | retrained (%) | retrained + validation (%) | runs |")
        print("|---|---|---|---|---|---|")
        for method, values in by_method.items():
            f1 = values["f1"]
            f1_text = f"{statistics.fmean(f1):.3f} ± {statistics.pstdev(f1):.3f}" if None not in f1 else "-"
            print(
                f"| {method} | {f1_text} | {mean_std(values['trained'])} | {mean_std(values['retrained'])} | "
                f"{mean_std(values['plus_val'])} | {len(values['retrained'])} |"
            )


def fewshot_rows(names, record: dict) -> None:
    print("\n## Few-shot: raw pixels (identity features) under the learned features' normalisation and heads")
    print("\n| configuration | meta-test acc (%) | 95% CI (%) | tasks | features |")
    print("|---|---|---|---|---|")
    for name in names:
        try:
            row = fewshot_raw_pixel_baseline(load_config(name))
        except DatasetError as error:
            print(f"| {name} | skipped: dataset not available ({str(error).splitlines()[0]}) | | | |")
            continue
        print(f"| {name} | {row['test_accuracy']:.2f} | {row['test_ci95']:.2f} | {row['test_tasks']:.0f} | {row['description']} |")
        record.setdefault("fewshot", {})[name] = row


def select_on_validation(bench_dirs, metric: str, record: dict, seeds=None) -> None:
    """Choose, per method, the bench (a setting of the grid) and the iteration count with the
    highest ``metric`` (a validation metric: ``val_accuracy``) averaged over the seeds; the
    test accuracy of the chosen point is printed next to it but plays no part in the choice.
    Only completed runs count, and a (bench, iteration) is a candidate only when every seed
    of the bench has it."""
    values: dict = defaultdict(lambda: defaultdict(list))
    tests: dict = defaultdict(lambda: defaultdict(list))
    for bench in bench_dirs:
        manifest = json.loads((Path(bench) / "manifest.json").read_text())
        for entry in manifest["runs"]:
            if entry["status"] not in ("max_iters", "converged", "max_time") or (seeds is not None and entry["seed"] not in seeds):
                continue
            for line in (Path(bench) / entry["dir"] / "log.jsonl").read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if metric in rec and rec["iteration"] > 0:
                    values[entry["method"]][(bench, rec["iteration"])].append(rec[metric])
                    tests[entry["method"]][(bench, rec["iteration"])].append(rec.get("test_accuracy"))
    print(f"\n## Selection on {metric} (mean over seeds; test accuracy shown, not used)")
    print("\n| method | bench | iteration | " + f"{metric} | test acc (%) | seeds | chosen |")
    print("|---|---|---|---|---|---|---|")
    for method, points in values.items():
        full = max(len(v) for v in points.values())
        candidates = {key: v for key, v in points.items() if len(v) == full}
        best = max(candidates, key=lambda key: (statistics.fmean(candidates[key]), -key[1]))
        for key in sorted(candidates):
            mark = "**yes**" if key == best else ""
            print(
                f"| {method} | {Path(key[0]).name} | {key[1]} | {mean_std(candidates[key])} | {mean_std(tests[method][key])} | "
                f"{len(candidates[key])} | {mark} |"
            )
        record.setdefault("selection", {})[method] = {
            "bench": str(best[0]),
            "iteration": best[1],
            metric: candidates[best],
            "test_accuracy": tests[method][best],
        }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every configuration")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma-separated hyper-cleaning configurations (those whose data are missing are skipped)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="run seeds (data seed = problem.seed + seed)")
    parser.add_argument("--max-steps", type=int, default=2000, help="horizon of the step-count selection")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5, help="CV folds for baselines trained on validation data (1: one 80/20 split)")
    parser.add_argument("--patience", type=int, default=20, help="evaluations without improvement (noisy_early_stop)")
    parser.add_argument("--runs", nargs="*", default=[], help="run directories to retrain from (checkpoint.pt state.x)")
    parser.add_argument("--no-baselines", action="store_true", help="only the retraining of --runs")
    parser.add_argument(
        "--no-with-validation",
        dest="with_validation",
        action="store_false",
        help="skip the retraining on learned-weight train + validation",
    )
    parser.add_argument(
        "--fewshot", default="fewshot_demo", help="comma-separated few-shot configurations for the raw-pixel row ('' for none)"
    )
    parser.add_argument(
        "--select",
        nargs="*",
        default=[],
        help="bench folders of a grid (one setting each): print the choice on --select-metric per method, and nothing else",
    )
    parser.add_argument("--select-metric", default="val_accuracy", help="validation metric of the logs that --select maximises")
    parser.add_argument("--select-seeds", default=None, help="comma-separated seeds --select looks at (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the hyper-cleaning data (the few-shot row stays on the CPU)")
    parser.add_argument("--json", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(
        f"# hyper-cleaning baselines (python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}"
        + (f", device {args.device})" if args.device == "cpu" else f", device {torch.cuda.get_device_name()})")
    )
    print(f"command: python benchmarks/baselines.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    record: dict = {}
    start = time.perf_counter()
    if args.select:
        chosen_seeds = None if args.select_seeds is None else {int(x) for x in args.select_seeds.split(",") if x.strip()}
        select_on_validation(args.select, args.select_metric, record, chosen_seeds)
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=1, default=float))
        return
    if not args.no_baselines:
        for name in [c for c in args.configs.split(",") if c.strip()]:
            baselines_table(name.strip(), args.overrides, seeds, args, record)
    if args.runs:
        retrain_runs(args.runs, args, record)
    fewshot = [c.strip() for c in args.fewshot.split(",") if c.strip()]
    if fewshot:
        fewshot_rows(fewshot, record)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
