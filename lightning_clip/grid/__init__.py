"""The ablation runner (`python -m lightning_clip.ablate`, `make ablate`), one job per file.

    cells.py      an ablation folder read into typed cells (directives) and its `_ablation.yaml` settings
    plan.py       the runs of an ablation: arguments, fingerprints, order
    store.py      the one owner of "what is finished": stamps, states, equal-run copies, the lock
    executors.py  how a run is started, polled and cancelled: forked, fresh interpreter, SLURM (submitit)
    fork.py       the forked launcher the local executor uses
    runner.py     the one loop over jobs (training runs, evaluations and tuning trials alike)
    tuning.py     the tuning stage: an Optuna study per cell whose trials are jobs of the loop
    stages.py     the tune and confirm stages of an ablation that declares them
    progress.py   what the loop prints
    cli.py        the command line: plan, run, evaluate, report

The grid drives `python -m lightning_clip fit|eval` as processes and never imports the training module;
nothing outside `grid/` imports it.
"""
