"""Does data ever bottleneck training? Generation, loading and training throughput side by side.

    python benchmarks/data_throughput.py [--num-train 4000] [--batches 60] [--steps 30]

Prints
- generation samples/s of the synthetic world (one process, 64x64, JPEG, written to shards);
- loader samples/s of `ClipDataModule` at the default config (batch 64, 2 workers, shuffle buffer 1000),
  steady state (the first batch, which includes worker start-up and the buffer fill, is excluded);
- loader worker CPU per training sample (in-process), without and with the decoded-record cache;
- tar reading, us per member: the loader's own header reader against tarfile, with a check that both
  give the same members;
- image decode, ms per image: PIL + PIL-to-tensor against the loader's `decode_image` (torchvision), on the
  generated JPEGs, with a check that both give the same pixels;
- `relevance_matrix` time for 2,500 captions x 500 images (the semantic-recall oracle) and for one
  training batch (64 x 64, made in the loader worker for every batch);
- training-step samples/s of `ClipModule` with the model section of experiments/base.yaml, fed from
  memory so that only the step is timed (when `lightning_clip.module` is importable).
The loader must be at least 3x faster than the training step (issue 4).
"""
from __future__ import annotations

import argparse
import itertools
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

from lightning_clip.data import ClipDataModule, oracle, synthetic as syn  # noqa: E402


def bench_generation(out: Path, n: int) -> float:
    t0 = time.perf_counter()
    syn.generate(out, num_train=n, num_val=500, seed=0)
    return (n + 500) / (time.perf_counter() - t0)


def bench_loader(root: Path, batches: int, workers: int = 2) -> tuple[float, ClipDataModule]:
    dm = ClipDataModule(str(root / "train"), str(root / "val"), num_workers=workers,
                        epoch_length=64 * (batches + 1))
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # start-up: worker fork, shuffle buffer fill
    t0, n = time.perf_counter(), 0
    for b in itertools.islice(it, batches):
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t0), dm


def bench_worker_cost(root: Path, batches: int, num_train: int) -> None:
    """CPU of one loader worker per training sample, in-process (no worker processes, one thread), in its
    steady state: without and with the decoded-record cache (``data.cache_records``, base.yaml's
    20,000), the latter after one pass over every shard has filled it. Also checks that both give the
    same batches."""
    warm = 3 * -(-num_train // 64)  # three passes' worth of batches (shards are drawn with replacement)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost, first = {}, {}
        for cache in (0, 20000):
            dm = ClipDataModule(str(root / "train"), str(root / "val"), num_workers=0, cache_records=cache,
                                epoch_length=10**9)
            dm.setup("fit")
            it = iter(dm.train_dataloader())
            first[cache] = [next(it) for _ in range(warm)][-1]
            t0 = time.perf_counter()
            n = sum(b["image"].shape[0] for b in itertools.islice(it, batches))
            cost[cache] = 1e6 * (time.perf_counter() - t0) / n
            held = dm._train._cached
    finally:
        torch.set_num_threads(threads)
    same = all(torch.equal(first[0][k], first[20000][k]) for k in ("image", "input_ids", "attention_mask"))
    print(f"loader worker CPU per training sample (in-process, 1 thread, after {warm} batches): "
          f"{cost[0]:.0f} us without the record cache, {cost[20000]:.0f} us with it "
          f"({cost[0] / cost[20000]:.1f}x; the cache held {held:,} of {num_train:,} samples); same batches: {same}")


def bench_relevance(root: Path) -> float:
    import json
    import tarfile

    caps, scenes = [], []
    for shard in sorted((root / "val").glob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    scenes.append(meta["scene"])
                    caps += [c["constraints"] for c in meta["captions"]]
    times = []
    for _ in range(5):  # best of 5, as timeit does: the machine may be shared
        t0 = time.perf_counter()
        r = oracle.relevance_matrix(caps, scenes)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    print(f"relevance_matrix {tuple(r.shape)}: {dt * 1000:.0f} ms best of 5, {sorted(times)[2] * 1000:.0f} ms median "
          f"(mean relevance {r.float().mean():.3f})")
    # a training batch's matrix (64 captions x their 64 images), made in the loader worker for every batch
    batch_caps, batch_scenes = caps[:320:5], scenes[:64]
    best = min(_timed(lambda: oracle.relevance_matrix(batch_caps, batch_scenes), 50) for _ in range(5))
    print(f"relevance_matrix (64, 64), one training batch: {best * 1000:.2f} ms best of 5 x 50")
    return dt


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_decode(root: Path, limit: int = 2000) -> None:
    import io
    import tarfile

    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    from lightning_clip.data.shards import decode_image

    shard = sorted((root / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as t:
        raw = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")][:limit]
    timings = {}
    for name, fn in (("PIL + pil_to_tensor", lambda b: pil_to_tensor(Image.open(io.BytesIO(b)).convert("RGB"))),
                     ("decode_image (torchvision)", decode_image)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = [fn(b) for b in raw]
            best = min(best, time.perf_counter() - t0)
        timings[name] = (best / len(raw) * 1000, out)
    (a_ms, a), (b_ms, b) = timings.values()
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    print(f"image decode, {len(raw)} JPEGs of 64x64, best of 3: PIL + pil_to_tensor {a_ms:.3f} ms/image, "
          f"decode_image {b_ms:.3f} ms/image ({a_ms / b_ms:.1f}x), identical pixels: {same}")


def bench_training(dm: ClipDataModule, steps: int) -> float | None:
    try:
        from lightning_clip.module import ClipModule
    except ImportError as e:
        print(f"training step: skipped ({e})")
        return None
    import lightning as L
    import yaml

    model_cfg = yaml.safe_load((REPO / "experiments/base.yaml").read_text()).get("model", {})
    model = ClipModule(**model_cfg, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                       image_size=dm.image_size)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 4))
    warm = 5

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == warm:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *a):
            self.dt = time.perf_counter() - self.t0

    timer = Timer()
    loader = torch.utils.data.DataLoader([batches[i % 4] for i in range(steps + warm)], batch_size=None)
    trainer = L.Trainer(max_steps=steps + warm, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    return steps * dm.batch_size / timer.dt


def bench_tar(root: Path) -> None:
    """Reading every member of the training shards: the loader's own header reader against tarfile."""
    import io

    from lightning_clip.data.tar import fast_tar, tarfile_members

    raw = [f.read_bytes() for f in sorted((root / "train").glob("*.tar"))]  # from memory: no disk in the timing
    times = {}
    for name, read in (("tarfile", tarfile_members), ("own reader", fast_tar)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            members = [m for r in raw for m in read(io.BytesIO(r))]
            best = min(best, time.perf_counter() - t0)
        times[name] = (best, members)
    (t_ref, ref), (t_own, own) = times["tarfile"], times["own reader"]
    print(f"tar members of {len(raw)} training shards ({len(ref)} members), best of 3: tarfile "
          f"{1e6 * t_ref / len(ref):.1f} us/member, own reader {1e6 * t_own / len(own):.1f} us/member "
          f"({t_ref / t_own:.1f}x), identical members: {own == ref}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        gen = bench_generation(root, a.num_train)
        print(f"generation (1 process, 64x64): {gen:,.0f} samples/s")
        load, dm = bench_loader(root, a.batches)
        print(f"loader (batch 64, 2 workers):  {load:,.0f} samples/s")
        bench_tar(root)
        bench_worker_cost(root, a.batches, a.num_train)
        bench_decode(root)
        bench_relevance(root)
        train = bench_training(dm, a.steps)
        if train is not None:
            print(f"training step (base.yaml model, batch 64): {train:,.0f} samples/s")
            verdict = "OK" if load >= 3 * train else "LOADER TOO SLOW"
            print(f"loader / training step = {load / train:.1f}x (need >= 3x): {verdict}")


if __name__ == "__main__":
    main()
