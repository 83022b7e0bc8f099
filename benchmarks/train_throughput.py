"""How much of a training step is the towers? End-to-end fit throughput next to the bare towers.

    python benchmarks/train_throughput.py [--steps 100] [--warmup 5] [--every 50] [--batch-size 64]
                                          [--threads N] [--config experiments/base.yaml [--config ...]]
                                          [--in-memory]

Prints, for the configuration the CLI would run (same parser, links, callbacks, logger, thread policy):
- end-to-end samples/s of `Trainer.fit` with the real `ClipModule` + `ClipDataModule` + TensorBoard logging
  + the project's callbacks, validation off, over `--steps` steps after `--warmup` steps; split into the
  time inside steps (forward, loss, backward, AdamW, logging calls, callbacks) and between steps (waiting
  for the loader, logger writes, loop bookkeeping);
- two references in a hand-written loop, each measured in blocks of `--every` steps that alternate with the
  fit's own blocks in the same run, so that a shared machine's drift hits all sides alike (the fit's step
  after a block is timed from the block's end):
  - the towers: forward+backward+AdamW of the same towers and heads (same precision, thread count, the
    module's own AdamW; a sum of the projections stands in for the loss);
  - the module's step: the same forward, loss, finiteness check, backward, AdamW and temperature clamp that
    `ClipModule.training_step` runs;
  both on the fit's first batch, held in memory;
- with ``--in-memory`` the fit is fed one loader batch over and over (no worker, no prefetch thread), so
  that the loop overhead splits into Lightning's step and the loader's share;
- where that overhead goes: each phase of a step (forward, zero_grad, backward, AdamW step; between steps),
  the fit's cut at Lightning's own hooks against the module's step timed phase by phase;
- the loop overhead: the share of an end-to-end step spent outside the module's step (Lightning's loop and
  hooks, waiting for the loader, logging, callbacks), and the share spent outside the towers (the same plus
  the loss and the module's own code).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402


class StepTimer(L.Callback):
    """perf_counter at each step's start and end (after the optimizer step and the other callbacks).

    With ``references`` (name -> a function of ``(steps, warmup)`` that times that many steps of a
    hand-written reference loop and returns, per step, the seconds of each of `PHASES` and of the step),
    a block of each runs after every ``every``
    steps, so that the measurements alternate through the run and a shared machine's drift hits all alike;
    the step after the blocks has its cycle measured from their end. Blocks start after ``after`` steps
    (the untimed warmup). The first batch the fit receives is kept (``batch``) for references that need
    a real one."""

    def __init__(self, references=None, every: int = 50, after: int = 0):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.resumed: list[float] = []  # per step: when the next cycle starts (its end, or the blocks' end)
        # per step: when Lightning's hooks before zero_grad, before and after backward ran (`PHASES`)
        self.marks: list[dict[str, float]] = []
        self.references, self.every, self.after = references or {}, every, after
        self.phases: dict[str, list[tuple[float, ...]]] = {name: [] for name in self.references}
        self.batch = None  # the first batch, as the module's training_step receives it (on its device)

    # asked once: on a CUDA build without a GPU each call probes NVML (~0.25 ms), which would be charged
    # to the end-to-end step twice per step
    _cuda = torch.cuda.is_available()

    @classmethod
    def _now(cls) -> float:
        if cls._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = batch
        self.starts.append(self._now())
        self.marks.append({})

    # The automatic optimisation's order inside a step: training_step, zero_grad, backward, optimizer step
    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.marks[-1]["zero_grad"] = self._now()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.marks[-1]["backward"] = self._now()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.marks[-1]["optimizer"] = self._now()

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(self._now())
        if self.references and len(self.ends) > self.after and len(self.ends) % self.every == 0:
            # the order alternates from one round to the next: whichever runs right after the fit's
            # block (caches, the loader worker's burst) is not always the same one
            names = list(self.references)
            if (len(self.ends) // self.every) % 2:
                names.reverse()
            for name in names:
                self.phases[name] += self.references[name](self.every, 3)
        self.resumed.append(self._now() if self.references else self.ends[-1])

    def split(self, warmup: int, steps: int) -> tuple[list[float], list[float]]:
        """Per step after `warmup` steps: (full cycle, end to end; the part inside the step)."""
        if len(self.ends) < warmup + steps:
            raise RuntimeError(f"only {len(self.ends)} steps ran; expected {warmup + steps}")
        cycles = [self.ends[i] - self.resumed[i - 1] for i in range(warmup, warmup + steps)]
        inside = [e - s for s, e in zip(self.starts[warmup:warmup + steps], self.ends[warmup:warmup + steps])]
        return cycles, inside

    def fit_phases(self, warmup: int, steps: int) -> list[tuple[float, ...]]:
        """Per step after `warmup`: seconds of (`PHASES`..., between steps)."""
        out = []
        for i in range(warmup, warmup + steps):
            m = self.marks[i]
            if len(m) < 3:  # a step without the automatic optimisation's hooks (GradCache's manual one)
                continue
            out.append((m["zero_grad"] - self.starts[i], m["backward"] - m["zero_grad"],
                        m["optimizer"] - m["backward"], self.ends[i] - m["optimizer"],
                        self.starts[i] - self.resumed[i - 1]))
        return out


# The phases of a step, in the automatic optimisation's order, as both the fit and the references time them.
PHASES = ("forward", "zero_grad", "backward", "optimizer")


def build(configs: list[str], max_steps: int, batch_size: int | None, run_dir: str):
    """The CLI's own model, data module and trainer (run=False): nothing configured twice."""
    from lightning_clip.cli import ClipCLI
    from lightning_clip.data import ClipDataModule
    from lightning_clip.module import ClipModule

    sys.argv = sys.argv[:1]  # LightningCLI warns when it sees this script's own options as well
    args = [a for c in configs for a in ("--config", c)]
    args += [f"--run_dir={run_dir}", f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
             "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false"]
    if batch_size:
        args.append(f"--data.batch_size={batch_size}")
    return ClipCLI(ClipModule, ClipDataModule, args=args, run=False, save_config_kwargs={"overwrite": True})


def _reference(module, trainer, get_batch, compute, after_step=None):
    """A block function ``(steps, warmup) -> per step (seconds of each of PHASES, of the step)``, after
    ``warmup`` untimed steps, of a hand-written loop on ``module`` in the automatic optimisation's order:
    ``compute(module, batch)`` under the trainer's precision, zero_grad, backward, the module's own AdamW
    (`ClipModule.build_optimizer`: groups, fused kernel), then ``after_step(module)``.
    ``batch`` is ``get_batch()``, read when the first block runs: the fit's first batch, on its device."""
    module = module.to(trainer.strategy.root_device).train()
    opt = module.build_optimizer()
    precision = trainer.strategy.precision_plugin
    held = {}

    now = StepTimer._now

    def step() -> tuple[float, ...]:
        """One step, in the automatic optimisation's order (`PHASES`); returns each phase's seconds and
        the whole step's."""
        if "batch" not in held:
            held["batch"] = get_batch()
        t0 = now()
        with precision.forward_context():
            loss = compute(module, held["batch"])
        t1 = now()
        opt.zero_grad(set_to_none=True)
        t2 = now()
        loss.backward()
        t3 = now()
        opt.step()
        if after_step is not None:
            after_step(module)
        t4 = now()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0

    def block(steps: int, warmup: int) -> list[tuple[float, ...]]:
        for _ in range(warmup):
            step()
        return [step() for _ in range(steps)]

    return block


def _towers(module, batch):
    """Forward of the towers and heads alone; a sum of the projections stands in for the loss."""
    pooled_i, _ = module.image_tower(batch["image"])
    pooled_t, _, _ = module.text_tower(batch["input_ids"], batch["attention_mask"])
    return module.image_head(pooled_i).float().sum() + module.text_head(pooled_t).float().sum()


def tower_steps(module, trainer, get_batch):
    """The bare towers' reference (`_reference`): forward+backward+AdamW of the towers and heads."""
    return _reference(module, trainer, get_batch, _towers)


def module_steps(module, trainer, get_batch):
    """The module's own step (`_reference`): `ClipModule._loss` (towers, heads, the loss in float32, the
    finiteness check), backward, AdamW and the temperature clamp. What it leaves out is what the fit adds
    around it: Lightning's loop and hooks, the loader, logging."""
    return _reference(module, trainer, get_batch, lambda m, b: m._loss(b, "train")[1].loss,
                      after_step=lambda m: m.loss.clamp_())


def print_phases(fit: list[tuple[float, ...]], own: list[tuple[float, ...]]) -> None:
    """Where the loop overhead goes: each phase of a step, the fit's against the module's hand-written
    step (same order: forward, zero_grad, backward, optimizer step), median ms over the timed steps.
    The fit's phases are cut at Lightning's own hooks (before zero_grad, before and after backward), so
    each also holds the Lightning code around its part."""
    if not fit or not own:
        return
    rows = [("forward; fit: + Lightning's pre-step, closure and hooks, training_step's own code, log calls", 0),
            ("zero_grad; fit: + its hooks", 1),
            ("backward; fit: + Lightning's backward hooks", 2),
            ("AdamW step and clamp; fit: + the closure's exit, batch-end hooks", 3),
            ("between steps; fit: Lightning's post-step (scheduler, logger), next batch, transfer, batch-start hooks", 4)]
    print("| phase (median ms over the timed steps) | end to end | module's step | difference |")
    print("|---|---:|---:|---:|")
    total_fit = total_own = 0.0
    for name, k in rows:
        f = 1000 * statistics.median(p[k] for p in fit)
        o = 1000 * statistics.median(p[k] for p in own) if k < len(PHASES) else 0.0
        total_fit, total_own = total_fit + f, total_own + o
        print(f"| {name} | {f:.2f} | {o:.2f} | {f - o:+.2f} |")
    print(f"| sum of the phase medians | {total_fit:.2f} | {total_own:.2f} | {total_fit - total_own:+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps (after the warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (loader start, allocator)")
    p.add_argument("--every", type=int, default=50,
                   help="steps per block: fit and bare-tower blocks of this many steps alternate")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; default: the CLI's policy (OMP_NUM_THREADS, else cores - workers)")
    p.add_argument("--config", action="append", default=None, help="repeatable; default experiments/base.yaml")
    p.add_argument("--in-memory", action="store_true",
                   help="feed the fit one loader batch over and over (no loader worker, no prefetch thread): "
                        "what is left of the loop overhead is Lightning's step itself")
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step includes the loader's start-up)")
    configs = a.config or [str(REPO / "experiments/base.yaml")]

    with tempfile.TemporaryDirectory() as tmp:
        cli = build(configs, a.warmup + a.steps, a.batch_size, str(Path(tmp) / "run"))
        if a.threads:
            torch.set_num_threads(a.threads)
        threads = torch.get_num_threads()
        model, dm, trainer = cli.model, cli.datamodule, cli.trainer
        if a.in_memory:
            dm.setup("fit")
            loader = iter(dm.train_dataloader())
            batch = next(loader)
            del loader  # its worker goes
            steps = a.warmup + a.steps + 1
            dm.train_dataloader = lambda: torch.utils.data.DataLoader([batch] * steps, batch_size=None)
        bs = dm.batch_size
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
              f"torch {torch.__version__}, {threads} threads, device {trainer.strategy.root_device}, "
              f"precision {trainer.precision}")
        print(f"# configs {' + '.join(configs)}: image {model.hparams.image_model} @ {dm.image_size}px, "
              f"text {model.hparams.text_model or 'BERT from text_config'}, loss {model.hparams.loss}, "
              f"batch {bs}, {'one batch held in memory' if a.in_memory else f'{dm.num_workers} loader workers'}, "
              f"max_length {dm.max_length}")
        towers = tower_steps(copy.deepcopy(model), trainer, lambda: timer.batch)
        own = module_steps(copy.deepcopy(model), trainer, lambda: timer.batch)
        # reference blocks of `every` steps (after 3 untimed ones) between the fit's blocks of `every` steps
        every = max(1, min(a.every, a.steps))  # at least one block of each inside the timed steps
        timer = StepTimer(references={"towers": towers, "module": own}, every=every, after=a.warmup)
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule=dm)
        cycles, inside = timer.split(a.warmup, a.steps)
        towers, own = ([p[-1] for p in timer.phases[name]] for name in ("towers", "module"))
        fit_phases, own_phases = timer.fit_phases(a.warmup, a.steps), timer.phases["module"]

    # Medians of per-step times: this 2-core machine is shared, and a neighbour's burst lands on whichever
    # side happens to run then (means of identical tower runs differed by up to 10% here); the mean is
    # printed too. The two alternate in blocks through one run, so drift hits both alike.
    rows = [("towers: forward+backward+AdamW, one batch in memory", towers),
            ("module's step, hand-written loop: forward, loss, backward, AdamW, clamp; one batch in memory", own),
            ("end to end: Trainer.fit, ClipDataModule, logging, callbacks", cycles),
            ("- inside steps (module, loss, backward, AdamW, log calls, callbacks)", inside),
            ("- between steps (waiting for data, logger writes, loop)", [c - i for c, i in zip(cycles, inside)])]
    print()
    print("| measurement | samples/s (median step) | ms/step median | ms/step mean |")
    print("|---|---:|---:|---:|")
    for i, (name, ts) in enumerate(rows):
        med, mean = 1000 * statistics.median(ts), 1000 * statistics.fmean(ts)
        sps = f"{1000 * bs / med:,.0f}" if i < 3 else ""
        print(f"| {name} | {sps} | {med:.1f} | {mean:.1f} |")
    print()
    print_phases(fit_phases, own_phases)
    print()
    for stat, f in (("median", statistics.median), ("mean", statistics.fmean)):
        e = 1000 * f(cycles)
        for what, ref in (("loop overhead (Lightning's loop and hooks, loader, logging, callbacks)", own),
                          ("outside the towers (the loop overhead plus the loss and the module's code)", towers)):
            t = 1000 * f(ref)
            print(f"{what}, {stat} steps: {100 * (1 - t / e):.1f}% of an end-to-end step ({e - t:.1f} ms of "
                  f"{e:.1f}); end to end = {t / e:.2f}x the reference")


if __name__ == "__main__":
    main()
