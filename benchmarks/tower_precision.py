"""Where the default step's time went: each tower alone, forward + backward, fp32 against bf16 autocast.

    OMP_NUM_THREADS=1 python benchmarks/tower_precision.py [--batch-size 64] [--repeat 15]

Prints one line per tower configuration (milliseconds per forward+backward on a batch, median of
``--repeat``, after 3 warm-up passes; thread CPU time, so that a busy machine's other processes count
less): the previous default (timm test_resnet at 64 px, a 2-layer BERT of width 128), the current one
(test_resnet at 48 px, a 1-layer BERT of width 64) and the steps between, each in fp32 and under
bf16 autocast. It is the evidence behind `model.image_autocast: bf16` with an fp32 text tower in
`experiments/base.yaml`: bf16 pays off for the convolutions (oneDNN's AVX512-BF16 kernels) and not for
the small text matmuls, where the casts cost more than they save.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_clip.models import ImageTower, TextTower  # noqa: E402

OLD_TEXT = {}  # TINY_BERT: width 128, 2 layers
NEW_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1)


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return 1000 * sorted(times)[len(times) // 2]


def image_case(size: int, bf16: bool, batch: int, repeat: int) -> float:
    torch.manual_seed(0)
    tower = ImageTower("test_resnet", image_size=size, autocast="bf16" if bf16 else None)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def step():
        pooled, _ = tower(x)
        pooled.sum().backward()
    return median_ms(step, repeat)


def text_case(config: dict, bf16: bool, batch: int, repeat: int, length: int = 24) -> float:
    torch.manual_seed(0)
    tower = TextTower(None, config, vocab_size=64)
    ids = torch.randint(1, 64, (batch, length))
    mask = torch.ones_like(ids)
    mask[:, length // 2:] = 0  # half padding, as a typical synthetic batch

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pooled, _, _ = tower(ids, mask)
        pooled.float().sum().backward()
    return median_ms(step, repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args()
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), batch {a.batch_size}, "
          f"ms per forward+backward (median of {a.repeat}, thread CPU time)")
    print("| tower | fp32 | bf16 autocast | bf16 speed-up |")
    print("|---|---:|---:|---:|")
    rows = [("image test_resnet @ 64 px (previous default)", lambda bf: image_case(64, bf, a.batch_size, a.repeat)),
            ("image test_resnet @ 48 px (default)", lambda bf: image_case(48, bf, a.batch_size, a.repeat)),
            ("text BERT 2 x 128 (previous default)", lambda bf: text_case(OLD_TEXT, bf, a.batch_size, a.repeat)),
            ("text BERT 1 x 64 (default)", lambda bf: text_case(NEW_TEXT, bf, a.batch_size, a.repeat))]
    for name, fn in rows:
        fp32, bf16 = fn(False), fn(True)
        print(f"| {name} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    main()
