"""Image tower forward+backward in NCHW vs channels_last (NHWC) memory layout, same weights and input.

    python benchmarks/tower_layout.py [--model test_resnet] [--image-size 64] [--batch-size 64]
                                      [--steps 20] [--threads 1]

`ClipModule(channels_last=True)` (the default) converts the timm tower's 4-D weights and its input to NHWC,
which lets oneDNN (CPU) and cuDNN (GPU tensor cores) use their fast convolution kernels. This prints the
time per step of both layouts, measured alternately (best of `--repeat` rounds, so drift on a shared
machine hits both), and the largest difference between their outputs.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_clip.models import ImageTower  # noqa: E402


def step_ms(tower: ImageTower, images: torch.Tensor, steps: int) -> float:
    for _ in range(3):  # warm-up: kernel selection, allocator
        tower(images)[0].sum().backward()
    t0 = time.perf_counter()
    for _ in range(steps):
        tower(images)[0].sum().backward()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    nchw = ImageTower(a.model, image_size=a.image_size, channels_last=False)
    nhwc = copy.deepcopy(nchw)
    nhwc.channels_last = True
    nhwc.model.to(memory_format=torch.channels_last)
    images = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
    with torch.no_grad():
        diff = (nchw(images)[0] - nhwc(images)[0]).abs().max().item()
    best = {"NCHW": float("inf"), "channels_last": float("inf")}
    for _ in range(a.repeat):
        best["NCHW"] = min(best["NCHW"], step_ms(nchw, images, a.steps))
        best["channels_last"] = min(best["channels_last"], step_ms(nhwc, images, a.steps))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; timm {a.model} @ {a.image_size}px, "
          f"batch {a.batch_size}, forward+backward, best of {a.repeat} x {a.steps} steps")
    for name, ms in best.items():
        print(f"{name:14s} {ms:7.1f} ms/step  {a.batch_size * 1000 / ms:7.0f} images/s")
    print(f"speed-up {best['NCHW'] / best['channels_last']:.2f}x; max |pooled output difference| {diff:.2e}")


if __name__ == "__main__":
    main()
