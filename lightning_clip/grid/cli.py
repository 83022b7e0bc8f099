"""`python -m lightning_clip.ablate` (`make ablate`): run the ablation grid (cells x seeds) resumably,
evaluate every finished run, then write the tables.

    experiments/ablations/<ablation>/<cell>.yaml   a short delta over experiments/base.yaml (grid.cells)
    runs/<ablation>/<cell>/seed_<k>/               one run: TensorBoard events, config.yaml,
                                                   final_metrics.json, eval.json, run.log, DONE (grid.store)
    results/<ablation>.{md,csv}, results/<ablation>_{curves,bars}.png      (lightning_clip.report)

`--quick` adds experiments/quick.yaml to every run, keeps only the cells marked `# @quick` (and each
baseline) and one seed, and writes to runs/quick/ and results/quick/, so a smoke run never mixes with a
full run's stamps. A second call redoes nothing that is complete (grid.store says what is).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from lightning_clip.grid import cells as C
from lightning_clip.grid import fork as forking
from lightning_clip.grid import inherit, stages, store
from lightning_clip.grid.executors import Local, Slurm
from lightning_clip.grid.plan import BASE_CONFIG, QUICK_CONFIG, Run, plan_runs
from lightning_clip.grid.progress import Progress, hms
from lightning_clip.grid.runner import Failure, run_jobs
from lightning_clip.grid.slurm import SLURM_CONFIG, load_options

CMD_ENV = "LIGHTNING_CLIP_ABLATE_CMD"  # replaces `python -m lightning_clip fit` (tests use a fake)


def default_command() -> list[str]:
    custom = os.environ.get(CMD_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "lightning_clip", "fit"]


def training_jobs(runs: Sequence[Run], prefix: Sequence[str]) -> list[store.Job]:
    return [store.Job(r.label, r.run_dir, [*prefix, *r.args], store.LOG, store.METRICS, r.fingerprint, r, r.cost)
            for r in runs]


def evaluate(runs: Sequence[Run], executor, parallel: int = 1, quick: bool = False,
             split: str = "val") -> list[Failure]:
    """`python -m lightning_clip eval` on every complete run without its eval file (a copied run's
    original once; the copy then shares its file), through the same loop as the training runs. On the
    validation split the whole suite (eval.json); on the test split the retrieval measures only
    (eval_test.json: no linear probes, which the tables do not take from the test split)."""
    todo, copies = store.evaluations_to_do(runs, split)
    failures: list[Failure] = []
    if todo:
        out, log = store.eval_files(split)
        print(f"evaluating {len(todo)} run(s) on the {split} split ({out})", flush=True)
        if split != "val":
            extra = [f"--split={split}", "--probe_images=0"]
        else:
            extra = ["--probe_images=500"] if quick else []
        jobs = [store.Job(f"eval of {r.label}" + ("" if split == "val" else f" ({split})"), r.run_dir,
                          [sys.executable, "-m", "lightning_clip", "eval", f"--ckpt_path={r.run_dir}", *extra],
                          log, out, f"{r.run_dir}:{split}", r) for r in todo]
        failures = run_jobs(jobs, executor, store.Evaluations(), parallel=parallel)
    store.share_evaluations(copies, split)
    return failures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.ablate", description=__doc__.split("\n")[0],
                                epilog="Arguments after `--` go to every run, e.g. -- --trainer.max_steps=50.")
    p.add_argument("--ablation", nargs="+", metavar="NAME",
                   help="ablations to run (default: every folder under --ablations-dir that is not a study)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per cell, 0..N-1, for every ablation (default: the cell's '# @seeds N', else "
                        f"{C.DEFAULT_SEEDS}, or confirm.seeds ({C.CONFIRM_SEEDS}) on the test protocol; {C.QUICK_SEEDS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"only the '# @quick' cells, {QUICK_CONFIG} on top, into <runs-dir>/quick and "
                        "<results-dir>/quick")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--ablations-dir", type=Path, default=C.ABLATIONS_DIR)
    p.add_argument("--base", type=Path, default=BASE_CONFIG, help="the config every cell is a delta over")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: a 2-core machine)")
    p.add_argument("--cmd", default=None,
                   help=f"the command a run starts with (default: `python -m lightning_clip fit`, or ${CMD_ENV})")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: child processes on this machine (default); slurm: one SLURM job per run "
                        "through submitit, with the resources of --slurm-config")
    p.add_argument("--slurm-config", type=Path, default=SLURM_CONFIG,
                   help="partition, time, nodes and GPUs per run for --executor slurm")
    p.add_argument("--no-fork", action="store_true",
                   help="start every run and evaluation as a fresh interpreter (default on Linux: forked from "
                        "this process after one import of torch, Lightning and the towers)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with each run's state, run nothing")
    p.add_argument("--no-report", action="store_true", help="run only; write no tables or plots")
    p.add_argument("--stages", default="grid,tune,confirm", metavar="LIST",
                   help="which stages to run, comma-separated (default grid,tune,confirm): grid = the cells' "
                        "default-recipe runs; tune and confirm only for ablations that declare them")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the tuning and confirm stages of ablations that declare them (`tune:` in _ablation.yaml)")
    p.add_argument("--retune", action="store_true",
                   help="tune again even where results/<ablation>_tuning.yaml holds a choice for the same configs")
    p.add_argument("--tune-storage", default=None, metavar="URL",
                   help="the Optuna storage of the studies (default: SQLite in runs/<ablation>/_tuning/study.db; "
                        "on a cluster an RDB URL)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation suite (eval.json per run: zero-shot, probes, geometry)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = p.parse_args(argv)
    if any(a.startswith(("--run_dir", "--seed_everything")) for a in extra):
        p.error("the runner sets --run_dir and --seed_everything of each run itself")
    args.extra = extra
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - {"grid", "tune", "confirm"})
    if unknown or not args.stages:
        p.error(f"--stages: unknown stage(s) {unknown}; choose from grid, tune, confirm")
    if args.no_tune:
        args.stages = [s for s in args.stages if s == "grid"]
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ablations(args) -> list[C.Ablation]:
    names = args.ablation or [n for n in C.available(args.ablations_dir)
                              if not C.load_ablation(n, args.ablations_dir).study]
    if not names:
        raise SystemExit(f"no ablations under {args.ablations_dir}")
    ablations = C.with_requirements([C.load_ablation(n, args.ablations_dir) for n in names], args.ablations_dir)
    if not args.quick:
        return ablations
    for a in ablations:
        if not any(c.quick for c in a.cells):
            print(f"--quick: skipping ablation '{a.name}' (none of its cells is marked '# @quick')")
    return [a.quick_subset() for a in ablations if any(c.quick for c in a.cells)]


def _test_margin(a) -> float | None:
    return stages.confirm_settings(a)["margin"] if a.on_test_split else None


def _reports(ablations, plans, confirmed, runs_dir: Path, results_dir: Path, test_split: bool = True) -> list[str]:
    """Every table; a problem is returned as a message, so that it does not hide the run summary. An
    ablation with a tuning stage names its default-recipe table `<name>_default`: `<name>` is the confirm
    stage's test-split table of default and tuned recipes."""
    from lightning_clip import report

    problems = []
    jobs = [(a.name, lambda a=a: report.write_report(a.name, runs_dir=runs_dir, results_dir=results_dir,
                                                     out=f"{a.name}_default" if a.tune else
                                                     f"{a.name}_val" if a.on_test_split else a.name))
            for a in ablations if plans[a.name]]
    jobs += [(a.name, lambda a=a: report.write_test(a.name, runs_dir=runs_dir, results_dir=results_dir,
                                                    margin=_test_margin(a)))
             for a in ablations if plans[a.name] and a.on_test_split and test_split]
    for name, (conf, margin) in confirmed.items():
        jobs.append((conf.name, lambda c=conf: report.write_report(c.name, runs_dir=runs_dir, results_dir=results_dir)))
        jobs.append((name, lambda n=name, m=margin: report.write_confirm(n, runs_dir=runs_dir, results_dir=results_dir,
                                                                            margin=m)))
    for name, write in jobs:
        try:
            written = write()
        except Exception as e:  # noqa: BLE001 - reported with the others, after the run summary
            problems.append(f"report of '{name}': {type(e).__name__}: {e}")
            continue
        print(f"{name}: wrote " + ", ".join(str(p) for p in written.values()))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for required in [args.base, *([QUICK_CONFIG] if args.quick else [])]:
        if not Path(required).is_file():
            raise SystemExit(f"{required} not found: run from the repository root (or pass --base)")
    runs_dir = args.runs_dir / "quick" if args.quick else args.runs_dir
    results_dir = args.results_dir / "quick" if args.quick else args.results_dir
    loaded = _ablations(args)
    # An ablation with `# @from` cells reads another's tuning file, which this very invocation may write:
    # it is resolved and planned after every tune and confirm stage (`later`), the rest up front.
    later = [a for a in loaded if any(c.start_from for c in a.cells)]
    for a in later:
        if a.tune:
            raise SystemExit(f"ablation '{a.name}': '# @from' cells and its own 'tune:' (tune it or inherit, not both)")
    ablations = [a for a in loaded if a not in later]
    seeds = {a.name: C.seeds_for(a, args.seeds, args.quick) for a in loaded}

    def plan(a: C.Ablation) -> list[Run]:
        return plan_runs(a, seeds[a.name], runs_dir, base=args.base, extra=args.extra,
                         quick_config=QUICK_CONFIG if args.quick else None,
                         per_cell_seeds=args.seeds is None and not args.quick)

    def resolve_later() -> list[C.Ablation]:
        return [a for a in (inherit.resolve(a, runs_dir, results_dir, quick=args.quick, base=args.base,
                                            quick_config=QUICK_CONFIG if args.quick else None, extra=args.extra,
                                            ablations_dir=args.ablations_dir) for a in later) if a]

    plans = {a.name: plan(a) for a in ablations}
    runs = [r for p in plans.values() for r in p]
    if args.dry_run:
        for r in runs + [r for a in resolve_later() for r in plan(a)]:
            print(f"{store.state(r):8s} {r.label:45s} {r.run_dir}")
        return 0

    counts = {len(v) for v in seeds.values()}
    seed_text = (f"seeds {next(iter(seeds.values()))}" if len(counts) <= 1 and seeds else
                 "seeds per ablation " + ", ".join(f"{n}: {len(v)}" for n, v in seeds.items()))
    print(f"ablate: {', '.join(plans)}; {seed_text}; {len(runs)} runs into {runs_dir}"
          + (" (quick)" if args.quick else "")
          + (f"; then {', '.join(a.name for a in later)}, from the tuned settings" if later else ""), flush=True)
    prefix = shlex.split(args.cmd) if args.cmd else default_command()
    stand_in = args.cmd is not None or CMD_ENV in os.environ  # a fake fit command (tests): no evaluation
    fork = not args.no_fork and args.executor == "local" and not stand_in and forking.available()
    if fork:
        forking.preload()
    local = Local(args.jobs, fork)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # A runner started in the background of a non-interactive shell (`make ablate &`, nohup) inherits
    # SIGINT as ignored, and Python then keeps it ignored: kill -INT would not stop it. Stopping with
    # Ctrl-C / SIGINT is this runner's documented way to interrupt, so it always listens.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    totals = {"ok": 0, "failed": 0, "copied": 0, "complete": 0}
    start = time.monotonic()
    stage, confirmed = "training", {}

    def train(plan: list[Run]) -> list[Failure]:
        chosen = store.select(plan)
        progress = Progress(len(chosen.pending), args.jobs)
        for run, why in chosen.redo:
            progress.event(f"redo {run.label}: {why} (clearing {run.run_dir})")
        if chosen.complete:
            progress.event(f"{chosen.complete} run(s) already complete (stamp {store.STAMP}); {len(chosen.pending)} to go")
        failed = run_jobs(training_jobs(chosen.pending, prefix), executor, store.TrainingRuns(runs_dir),
                          parallel=max(1, len(chosen.pending)) if slurm else args.jobs, progress=progress, poll=poll)
        for key, value in (("ok", progress.ok), ("failed", progress.failed), ("copied", progress.copied),
                           ("complete", chosen.complete)):
            totals[key] += value
        return failed

    evaluating = not args.no_eval and not stand_in  # the suite needs a real run's checkpoint

    def grid(these: list[C.Ablation]) -> list[Failure]:
        """The default-recipe runs of these ablations (what another ablation reads, a teacher's checkpoint,
        first), their evaluations, and the test split's for a design on the protocol."""
        nonlocal stage
        these_runs = [r for a in these for r in plans[a.name]]
        first = C.required_names(these)
        failed = []
        for phase in ([r for r in these_runs if r.cell.ablation in first],
                      [r for r in these_runs if r.cell.ablation not in first]):
            if phase:
                stage = "training"
                failed += train(phase)
        if evaluating:
            stage = "evaluation"
            failed += evaluate(these_runs, local, args.jobs, args.quick)
            stage = "the test-split evaluation"
            failed += evaluate([r for a in these if a.on_test_split for r in plans[a.name]], local, args.jobs,
                               args.quick, split="test")
        return failed
    slurm = args.executor == "slurm"
    executor, poll = local, 0.2
    try:
        with store.Lock(runs_dir):
            if slurm:
                opts = load_options(args.slurm_config)
                executor, poll = Slurm(opts, Path(opts["folder"] or runs_dir / ".submitit")), opts["poll_s"]
            for a in ablations:
                store.write_manifest(a, runs_dir, seeds[a.name], _test_margin(a))
            failures = []
            if "grid" in args.stages:
                failures += grid(ablations)
            for a in (a for a in ablations if a.tune):
                common = dict(base=args.base, extra=args.extra, quick_config=QUICK_CONFIG if args.quick else None)
                if "tune" in args.stages:
                    stage = f"the tuning of {a.name}"
                    failures += stages.tune(a, runs_dir=runs_dir, results_dir=results_dir, prefix=prefix,
                                            executor=executor, parallel=args.jobs, storage=args.tune_storage,
                                            retune=args.retune, **common)
                if "confirm" not in args.stages:
                    continue
                stage = f"the confirm stage of {a.name}"
                conf = stages.confirm_ablation(a, runs_dir, results_dir)
                if conf is None:
                    continue
                conf_seeds = list(range(stages.confirm_settings(a, args.quick)["seeds"]))
                store.write_manifest(conf, runs_dir, conf_seeds)
                conf_runs = plan_runs(conf, conf_seeds, runs_dir, **common)
                failures += train(conf_runs)
                confirmed[a.name] = (conf, stages.confirm_settings(a, args.quick)["margin"])
                if evaluating:
                    failures += evaluate(conf_runs, local, args.jobs, args.quick)
                    failures += evaluate(plans[a.name] + conf_runs, local, args.jobs, args.quick, split="test")
            if later:
                stage = "the ablations that start from tuned settings"
                resolved = resolve_later()
                for a in resolved:
                    store.write_manifest(a, runs_dir, seeds[a.name], _test_margin(a))
                    plans[a.name] = plan(a)
                ablations = ablations + resolved
                if "grid" in args.stages:
                    failures += grid(resolved)
    except KeyboardInterrupt:
        print(f"\ninterrupted during {stage}: complete runs keep their stamps; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

    problems = [str(f) for f in failures]
    if not args.no_report:
        problems += _reports([a for a in ablations if "grid" in args.stages], plans, confirmed, runs_dir, results_dir,
                             test_split=evaluating)
    print(f"finished in {hms(time.monotonic() - start)}: {totals['ok']} run(s) ok, {totals['failed']} failed, "
          f"{totals['copied']} copied, {totals['complete']} already complete")
    if problems:
        print("failed:\n" + "\n".join("  " + p for p in problems), file=sys.stderr)
        return 1
    return 0
