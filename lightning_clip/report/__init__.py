"""Tables, confidence intervals and plots of an ablation: `python -m lightning_clip.report --ablation NAME`.

Reads runs/<ablation>/<cell>/seed_<k>/ (final_metrics.json, eval.json, TensorBoard events; `load`) and the
ablation's manifest (runs/<ablation>/ablation.json; what it asks of the report: `settings`), and writes

    results/<ablation>.md, .csv     one row per cell: mean and 95% Student-t interval over seeds, and the
                                    difference from the baseline cell paired by seed, with its interval
    results/<ablation>_curves.png   validation t2i R@1 and training loss against step (mean, band over seeds),
                                    or the panels the manifest declares
    results/<ablation>_bars.png     R@1 per cell with intervals (grouped by series when the cell names
                                    are `<series>-<prefix><number>`, e.g. `siglip-b64`, `infonce-dup25`)
    results/<ablation>_ranking.csv  the cells ranked by t2i R@1 (and semantic t2i R@1), mean over seeds,
                                    at half budget (the validation nearest max_step / 2) and at the end,
                                    with Kendall's tau between the two rankings (also a section of the .md)

The markdown states the oracle ceiling (`val/ceiling/{t2i,i2t}/R@1`, the expected R@1 of a perfect
scorer with random tie-breaking on the synthetic world) under the table, or as columns when cells differ.
An ablation whose manifest declares ``report.plateau`` gets a plateau table (`budget.plateau_summary`), and
one with ``report.budget_against`` the gap between that ablation's runs and its own (`budget.budget_gaps`).

An ablation with a tuning stage also gets `tuning` (results/<ablation>_tuning.md: every trial) and `confirm`
(results/<ablation>.md: default vs tuned on the test split, Holm-adjusted, with equivalence verdicts); its
default-recipe table is then results/<ablation>_default.md. A design ablation on the protocol (`confirm:`
without `tune:`) gets `test_split` (results/<ablation>.md: each cell against the baseline on the test split,
and for a series grid the interaction, a paired difference of differences); its validation table is then
results/<ablation>_val.md.

Modules: `stats` (intervals, differences, ranks, Holm, TOST), `load` (the manifest and one walk over the runs),
`settings`, `columns`, `tables` (rows, CSV, markdown), `ranking`, `budget`, `plots`, `tuning`, `confirm`, `test_split`,
`machines` (which setups trained the runs: each run's environment.json), `factors` and `tensorboard` (the
ablation's TensorBoard page: runs/<ablation>/_summary/, the README's "Comparing in TensorBoard"), `write`, `cli`.
The names below are the notebook's too (notebooks/compare_losses.ipynb), so it and the tables cannot disagree.
"""
from lightning_clip.report.budget import CONVERGENCE_TAGS
from lightning_clip.report.confirm import write_confirm
from lightning_clip.report.load import Run, curves_of, load_runs, metrics_of, read_manifest
from lightning_clip.report.plots import plot_bars, plot_curves, save_figure
from lightning_clip.report.ranking import RANKING_TAGS
from lightning_clip.report.settings import CURVE_TAGS, ReportSettings, settings_of
from lightning_clip.report.tables import format_markdown, read_csv, summarize
from lightning_clip.report.test_split import write_test
from lightning_clip.report.tuning import write_tuning
from lightning_clip.report.write import write_report

__all__ = ["CONVERGENCE_TAGS", "CURVE_TAGS", "RANKING_TAGS", "ReportSettings", "Run", "curves_of", "format_markdown",
           "load_runs", "metrics_of", "plot_bars", "plot_curves", "read_csv", "read_manifest", "save_figure",
           "settings_of", "summarize", "write_confirm", "write_report", "write_test", "write_tuning"]
