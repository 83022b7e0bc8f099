"""The ablation's page in TensorBoard: one comparison per question, seeds aggregated, hparams = the factors.

`write_tensorboard` (called by `write.write_report`, so `make ablate` writes it) owns these files:

    runs/<ablation>/_summary/events.*          the custom-scalars layout (one category per question, each
                                               chart a margin chart holding every cell) and the HParams
                                               experiment (columns: the ablation's factors, `factors`, and
                                               the headline metrics)
    runs/<ablation>/_summary/<cell>/events.*   per cell and tag, at every step some seed logged:
                                               `<tag>/mean`, `<tag>/lower`, `<tag>/upper`: the mean over seeds
                                               and the 95% Student-t interval of the tables (`stats.t_interval`);
                                               with one seed (QUICK) lower = upper = mean
    runs/<ablation>/<cell>/seed_<k>/events.*.ablation
                                               the run's HParams session (the factors' values from its
                                               config.yaml, trial id = the cell, so the tab groups its seeds)
                                               and `val/rsum`, the sum of the six validation recalls
    runs/<ablation>/_tuning/<cell>/trial_<n>/events.*.ablation
                                               the same for each trial of the tuning stage (its own group,
                                               the tuned keys of trial.yaml as more columns)

Every file here is rewritten whole (the previous one removed first), so the report can be run again. The
ablation runner starts its runs with LIGHTNING_CLIP_HPARAMS=report, and a run started so writes no session
of its own (callbacks/results.py): TensorBoard keeps the first session a run holds.
"""
from __future__ import annotations

import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import factors as F
from .load import Run
from .stats import t_interval

SUMMARY = "_summary"
#: the tuning stage's trials (lightning_clip/grid/tuning.py)
TUNING = "_tuning"
#: the suffix of the event files this module owns inside a run folder
SUFFIX = ".ablation"
RSUM = "val/rsum"
RECALLS = tuple(f"val/{d}/R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10))
#: the HParams tab's metric columns: (tag, title); test values exist after `make eval SPLIT=test`
HEADLINE = (("val/t2i/R@1", "val t2i R@1"), ("val/i2t/R@1", "val i2t R@1"),
            (RSUM, "val rsum (R@1+5+10, both ways; 0-6)"),
            ("val/semantic/t2i/R@1", "val semantic t2i R@1"), ("val/semantic/i2t/R@1", "val semantic i2t R@1"),
            ("eval_test/zeroshot_retrieval/image_retrieval_recall@1", "test t2i R@1"),
            ("eval_test/zeroshot_retrieval/text_retrieval_recall@1", "test i2t R@1"))
#: the comparison categories: (title, tags in order or a prefix ending in "/")
QUESTIONS = (
    ("retrieval on validation", ("val/t2i/R@1", "val/i2t/R@1", RSUM, "val/semantic/t2i/R@1",
                                 "val/semantic/i2t/R@1")),
    ("training loss and each term", ("train/loss", "train/loss/", "val/loss")),
    ("temperature: scale and bias", ("temperature/",)),
    ("variance heads", ("variance/",)),
    ("false-negative share of the batches", ("train/false_negatives",)),
)
#: per-seed charts (every run, one line each) in a closed category at the end
PER_SEED = ("val/t2i/R@1", "val/i2t/R@1", "train/loss")


def _wanted(tag: str) -> bool:
    if tag.endswith("log_scale"):  # the log of the scale beside it
        return False
    return not tag.startswith("variance/") or "decile" not in tag  # the deciles are a distribution, not a curve


def chart_tags(present: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(category title, tags)] of the questions some run logged a tag for, in QUESTIONS' order."""
    have = set(present)
    out = []
    for title, wanted in QUESTIONS:
        tags: list[str] = []
        for w in wanted:
            found = sorted(t for t in have if t.startswith(w)) if w.endswith("/") else ([w] if w in have else [])
            tags += [t for t in found if t not in tags and _wanted(t)]
        if tags:
            out.append((title, tags))
    return out


def read_scalars(run_dir: str | os.PathLike, own_sessions: set | None = None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in the run's own event files (not this module's); adds
    ``run_dir`` to ``own_sessions`` when those files hold an HPARAMS session."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    out: dict[str, tuple[list, list]] = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        if path.name.endswith(SUFFIX):
            continue
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        try:
            if own_sessions is not None and metadata.SESSION_START_INFO_TAG in acc.PluginTagToContent(metadata.PLUGIN_NAME):
                own_sessions.add(Path(run_dir))
        except KeyError:  # no hparams data in this file
            pass
        for tag in acc.Tags().get("scalars", []):
            steps, values = out.setdefault(tag, ([], []))
            for e in acc.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
    return {t: (np.asarray(s), np.asarray(v, dtype=float)) for t, (s, v) in out.items()}


def _at_steps(steps: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """{step: value}, a step logged twice keeping its last value."""
    return {int(s): float(v) for s, v in zip(steps, values)}


def with_rsum(scalars: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Adds `val/rsum` (the sum of the six recalls, as fractions) at the steps that logged all six."""
    if not all(t in scalars for t in RECALLS):
        return scalars
    series = [_at_steps(*scalars[t]) for t in RECALLS]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if steps:
        scalars = dict(scalars)
        scalars[RSUM] = (np.asarray(steps), np.asarray([sum(s[k] for s in series) for k in steps], dtype=float))
    return scalars


def aggregate(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, float, float, float]]:
    """[(step, mean, lower, upper)] over seeds at every step some seed logged, with the tables' 95% t-interval
    over the seeds that have that step; one seed (or equal values' zero width) gives lower = upper = mean."""
    by_seed = [_at_steps(s, v) for s, v in series]
    out = []
    for step in sorted(set().union(*by_seed)):
        iv = t_interval([s[step] for s in by_seed if step in s])
        if iv.n == 0:
            continue
        low, high = (iv.low, iv.high) if iv.n > 1 and math.isfinite(iv.low) else (iv.mean, iv.mean)
        out.append((step, iv.mean, low, high))
    return out


def _replace_events(folder: Path, events: Sequence, suffix: str = SUFFIX) -> Path:
    """Writes ``events`` (Event protos) as the folder's one event file with ``suffix``, removing the
    previous ones this module wrote there."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"events.out.tfevents.*{suffix}"):
        old.unlink()
    writer = EventFileWriter(str(folder), filename_suffix=suffix)
    for event in events:
        writer.add_event(event)
    writer.close()
    return Path(writer.get_logdir())


def _event(summary, step: int = 0, wall_time: float | None = None):
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(step=int(step), wall_time=wall_time or time.time(), summary=summary)


def _scalar(tag: str, value: float, step: int, wall_time: float):
    """What `tensorboard.summary.v1.scalar_pb` writes (the scalars plugin's metadata, a float32 tensor),
    without the TensorFlow import that function makes."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.scalar import metadata
    from tensorboard.util import tensor_util

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(display_name=tag, description=""),
                      tensor=tensor_util.make_tensor_proto(np.float32(value)))
    return _event(summary, step, wall_time)


def layout_summary(scalars_layout):
    """`tensorboard.plugins.custom_scalar.summary.pb` (the layout under the plugin's config tag, with its
    metadata) without the TensorFlow import that function makes."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.custom_scalar import metadata
    from tensorboard.util import tensor_util

    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(),
                      tensor=tensor_util.make_tensor_proto(scalars_layout.SerializeToString()))
    return summary


def layout(ablation: str, categories: Sequence[tuple[str, list[str]]]):
    """The custom-scalars layout: a category per question, a margin chart per tag (the summary runs' mean
    line and interval band, one per cell), and a closed category of per-seed charts. Charts are written in
    reverse: TensorBoard's custom-scalars dashboard lists a category's charts last first (seen in Chromium
    on TensorBoard 2.21), so the page reads in QUESTIONS' order."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    cats = []
    for title, tags in categories:
        charts = [layout_pb2.Chart(title=tag, margin=layout_pb2.MarginChartContent(series=[
            layout_pb2.MarginChartContent.Series(value=f"{tag}/mean", lower=f"{tag}/lower", upper=f"{tag}/upper")]))
            for tag in reversed(tags)]  # the dashboard shows a category's charts last first (TensorBoard 2.21)
        cats.append(layout_pb2.Category(title=f"{ablation}: {title} (mean over seeds, 95% t-interval)",
                                        chart=charts))
    cats.append(layout_pb2.Category(title=f"{ablation}: every seed", closed=True, chart=[
        layout_pb2.Chart(title=f"{tag} (each run)", multiline=layout_pb2.MultilineChartContent(
            tag=[f"^{re.escape(tag)}$"])) for tag in reversed(PER_SEED)]))
    return layout_pb2.Layout(category=cats)


def experiment(keys: Sequence[str], sessions: Mapping[str, Mapping[str, object]]):
    """The HParams experiment: the factors (numbers: the interval the runs span; strings and booleans: the
    values they have) and HEADLINE."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    params = []
    for key in keys:
        values = sorted({s[key] for s in sessions.values() if key in s}, key=lambda v: (str(type(v)), v))
        if len(values) > 1 and all(isinstance(v, float) for v in values):
            domain = hp.RealInterval(values[0], values[-1])  # a continuous axis in the parallel coordinates
        else:
            domain = hp.Discrete(values) if values else None
        params.append(hp.HParam(key, domain))
    metrics = [hp.Metric(tag, display_name=title) for tag, title in HEADLINE]
    return hp.hparams_config_pb(hparams=params, metrics=metrics)


def write_tensorboard(ablation: str, ablation_dir: str | os.PathLike, manifest: Mapping,
                      runs: Mapping[str, Mapping[int, Run]]) -> Path:
    """Writes the summary runs, the layout, the HParams experiment and each run's session; returns
    runs/<ablation>/_summary."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    ablation_dir = Path(ablation_dir)
    summary_dir = ablation_dir / SUMMARY
    now = time.time()
    finished = [run for by_seed in runs.values() for run in by_seed.values()]
    own_sessions: set[Path] = set()
    scalars = {run.path: with_rsum(read_scalars(run.path, own_sessions)) for run in finished}
    categories = chart_tags(sorted({t for s in scalars.values() for t in s}))
    tags = [t for _, ts in categories for t in ts]

    for cell, by_seed in runs.items():
        if not by_seed:
            continue
        events = []
        for tag in tags:
            series = [scalars[r.path][tag] for _, r in sorted(by_seed.items()) if tag in scalars[r.path]]
            for step, mean, low, high in (aggregate(series) if series else []):
                events += [_scalar(f"{tag}/mean", mean, step, now), _scalar(f"{tag}/lower", low, step, now),
                           _scalar(f"{tag}/upper", high, step, now)]
        _replace_events(summary_dir / cell, events)

    trials = tuning_trials(ablation_dir)
    keys = F.factor_keys(manifest, ablation_dir, [r.path for r in finished])
    keys += [k for k in F.tuned_keys(path for _, path in trials) if k not in keys]
    sessions = F.session_values(keys, {str(p): F.run_config(p) for p in [r.path for r in finished] +
                                       [path for _, path in trials]})
    _replace_events(summary_dir, [_event(layout_summary(layout(ablation, categories)), 0, now),
                                  _event(experiment(keys, sessions), 0, now)])
    for group, path in [(r.cell, r.path) for r in finished] + trials:
        events = [_event(hp.hparams_pb(sessions[str(path)], trial_id=group, start_time_secs=now), 0, now)]
        own = scalars[path] if path in scalars else with_rsum(read_scalars(path, own_sessions))
        if RSUM in own:
            events += [_scalar(RSUM, v, s, now) for s, v in zip(*own[RSUM])]
        _replace_events(path, events)
    if own_sessions:
        warnings.warn(f"{len(own_sessions)} run(s) of '{ablation}' hold an HPARAMS session of their own (started "
                      f"outside the runner, or before it left sessions to the report), which TensorBoard shows "
                      f"instead of the ablation's, e.g. {sorted(own_sessions)[0]}", stacklevel=2)
    return summary_dir


def tuning_trials(ablation_dir: Path) -> list[tuple[str, Path]]:
    """[(session group, folder)] of the tuning stage's finished trials (runs/<ablation>/_tuning/<cell>/
    trial_<n>/ with final_metrics.json): each trial is its own group, `<cell>/trial_<n>`, so the HParams
    tab's parallel coordinates show the search beside the seeds."""
    return [(f"{p.parent.name}/{p.name}", p) for p in sorted(ablation_dir.glob(f"{TUNING}/*/trial_*"))
            if (p / "final_metrics.json").is_file()]
