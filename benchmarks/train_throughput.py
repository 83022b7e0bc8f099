"""How much of a training step is the towers? End-to-end fit throughput next to the bare towers.

    python benchmarks/train_throughput.py [--steps 100] [--warmup 5] [--batch-size 64] [--threads N]
                                          [--config experiments/base.yaml [--config CELL.yaml ...]]

Prints, for the configuration the CLI would run (same parser, links, callbacks, logger, thread policy):
- end-to-end samples/s of `Trainer.fit` with the real `ClipModule` + `ClipDataModule` + TensorBoard logging
  + the project's callbacks, validation off, over `--steps` steps after `--warmup` steps; split into the
  time inside steps (forward, loss, backward, AdamW, logging calls, callbacks) and between steps (waiting
  for the loader, logger writes, loop bookkeeping);
- samples/s of forward+backward+AdamW of the same towers and heads on ready in-memory tensors (same batch
  shapes, precision, thread count; a sum of the projections stands in for the loss), the mean of one
  measurement before and one after the fit so that a shared machine's drift hits both sides alike;
- the overhead: the share of an end-to-end step not spent in the towers (module, loss, logging, data).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
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
    """perf_counter at each step's start and end (after the optimizer step and the other callbacks)."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(self._now())

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(self._now())

    def split(self, warmup: int, steps: int) -> tuple[float, float]:
        """(wall time of `steps` full cycles after `warmup` steps, time of those inside the steps)."""
        if len(self.ends) < warmup + steps:
            raise RuntimeError(f"only {len(self.ends)} steps ran; expected {warmup + steps}")
        wall = self.ends[warmup + steps - 1] - self.ends[warmup - 1]
        inside = sum(e - s for s, e in zip(self.starts[warmup:warmup + steps], self.ends[warmup:warmup + steps]))
        return wall, inside


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


def tower_throughput(module, trainer, batch_size: int, image_size: int, length: int, vocab: int,
                     steps: int, warmup: int) -> float:
    """forward+backward+AdamW samples/s of the towers and heads alone on in-memory tensors."""
    device = trainer.strategy.root_device
    module = module.to(device).train()
    g = torch.Generator().manual_seed(0)
    # NHWC like the loader's batches, so neither side pays a layout conversion the other does not
    image = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device).contiguous(
        memory_format=torch.channels_last)
    ids = torch.randint(1, vocab, (batch_size, length), generator=g).to(device)
    mask = torch.ones_like(ids)  # the loader pads to max_length, so every batch has this shape
    # the optimizer the module itself uses (fused kernel on CPU and CUDA), so only the towers differ
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda") or None)
    precision = trainer.strategy.precision_plugin

    def step():
        with precision.forward_context():
            pooled_i, _ = module.image_tower(image)
            pooled_t, _, _ = module.text_tower(ids, mask)
            out = module.image_head(pooled_i).float().sum() + module.text_head(pooled_t).float().sum()
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = StepTimer._now()
    for _ in range(steps):
        step()
    return steps * batch_size / (StepTimer._now() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps (after the warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (loader start, allocator)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; default: the CLI's policy (OMP_NUM_THREADS, else cores - workers)")
    p.add_argument("--config", action="append", default=None, help="repeatable; default experiments/base.yaml")
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
        bs = dm.batch_size
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
              f"torch {torch.__version__}, {threads} threads, device {trainer.strategy.root_device}, "
              f"precision {trainer.precision}")
        print(f"# configs {' + '.join(configs)}: image {model.hparams.image_model} @ {dm.image_size}px, "
              f"text {model.hparams.text_model or 'BERT from text_config'}, loss {model.hparams.loss}, "
              f"batch {bs}, {dm.num_workers} loader workers, max_length {dm.max_length}")
        shapes = dict(batch_size=bs, image_size=dm.image_size, length=dm.max_length, vocab=dm.vocab_size,
                      steps=a.steps, warmup=a.warmup)
        towers = [tower_throughput(copy.deepcopy(model), trainer, **shapes)]

        timer = StepTimer()
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule=dm)
        wall, inside = timer.split(a.warmup, a.steps)
        towers.append(tower_throughput(copy.deepcopy(model), trainer, **shapes))

    tower_sps = sum(towers) / len(towers)
    e2e_sps = a.steps * bs / wall
    tower_ms = 1000 * bs / tower_sps
    step_ms, inside_ms = 1000 * wall / a.steps, 1000 * inside / a.steps
    print()
    print("| measurement | samples/s | ms/step |")
    print("|---|---:|---:|")
    print(f"| towers: forward+backward+AdamW, in-memory tensors (before {towers[0]:,.0f}, "
          f"after {towers[-1]:,.0f}) | {tower_sps:,.0f} | {tower_ms:.1f} |")
    print(f"| end to end: Trainer.fit, ClipDataModule, logging, callbacks | {e2e_sps:,.0f} | {step_ms:.1f} |")
    print(f"| - inside steps (module, loss, backward, AdamW, log calls, callbacks) | | {inside_ms:.1f} |")
    print(f"| - between steps (waiting for data, logger writes, loop) | | {step_ms - inside_ms:.1f} |")
    print()
    print(f"overhead (module, loss, logging and data): {100 * (1 - tower_ms / step_ms):.1f}% of an end-to-end "
          f"step ({step_ms - tower_ms:.1f} ms of {step_ms:.1f}); end to end = {e2e_sps / tower_sps:.2f}x the towers")


if __name__ == "__main__":
    main()
