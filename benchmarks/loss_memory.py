"""Time and peak extra memory of the contrastive losses, forward + backward, on CPU.

For each batch size N it runs, each in a fresh subprocess (so one run's peak does not hide another's):

- ``dense``:     this repository's dense loss (``lightning_clip.losses.functional`` without ``chunk_size``
                 when that module exists, else the same formula written out with plain torch ops);
- ``tiled``:     ``lightning_clip.losses.tiled`` (exact, O(N*D + chunk^2) memory);
- ``open_clip``: ``open_clip.loss.ClipLoss`` / ``SigLipLoss``, when open_clip is importable (``bench`` extra).

Peak extra memory is the process's peak resident set (VmHWM) minus its resident set once the inputs exist
(the peak is reset there through /proc/self/clear_refs; where that is not allowed, ru_maxrss is used). It
includes the gradients of the features. The dense and open_clip runs hold several N x N float32 matrices;
a case whose estimate exceeds --max-dense-gib, or what the machine has available, is skipped and says so.

    python benchmarks/loss_memory.py                      # N = 4096 ... 65536, both losses
    python benchmarks/loss_memory.py --sizes 4096 8192 --losses infonce
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2 ** 30
# Peak bytes of a dense run per N^2 float32 logits, measured here at N = 16,384: open_clip 3.3.0's
# ClipLoss 4.08 GiB (~4.1 matrices), SigLipLoss 5.05 GiB (~5.1); this repository's dense infonce the same
# as ClipLoss, its dense siglip 2.07 GiB (~2.1: the logits and their gradient).
DENSE_MATRICES = {("dense", "infonce"): 4.3, ("open_clip", "infonce"): 4.3,
                  ("dense", "siglip"): 2.2, ("open_clip", "siglip"): 5.2}
IMPLS = ("dense", "tiled", "open_clip")
LOSSES = ("infonce", "siglip")


# -- one measurement (runs in the subprocess) ----------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _loss_fn(loss: str, impl: str, chunk_size: int):
    import torch
    import torch.nn.functional as F

    if impl == "tiled":
        from lightning_clip.losses.tiled import tiled_infonce, tiled_siglip
        if loss == "infonce":
            return lambda i, t, s, b: tiled_infonce(i, t, s, chunk_size=chunk_size)
        return lambda i, t, s, b: tiled_siglip(i, t, s, b, chunk_size=chunk_size)
    if impl == "open_clip":
        import open_clip.loss as oc
        fn = oc.ClipLoss() if loss == "infonce" else oc.SigLipLoss()
        if loss == "infonce":
            return lambda i, t, s, b: fn(i, t, s)
        return lambda i, t, s, b: fn(i, t, s, b)
    try:  # the repository's dense path, once it exists
        from lightning_clip.losses import functional
        if loss == "infonce":
            return lambda i, t, s, b: functional.infonce(i, t, s)
        return lambda i, t, s, b: functional.siglip(i, t, s, b)
    except ImportError:
        pass

    def dense_infonce(i, t, s, b):
        logits = s * i @ t.T
        labels = torch.arange(len(i))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def dense_siglip(i, t, s, b):
        logits = s * i @ t.T + b
        signs = 2 * torch.eye(len(i)) - 1
        return -F.logsigmoid(signs * logits).sum() / len(i)

    return dense_infonce if loss == "infonce" else dense_siglip


def measure(loss: str, impl: str, n: int, dim: int, chunk_size: int, threads: int = 0, seed: int = 0) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    fn = _loss_fn(loss, impl, chunk_size)
    # warm up the BLAS/OpenMP pools and lazy imports on a small case, so they do not count as extra memory
    small = [torch.nn.functional.normalize(torch.randn(64, dim), dim=-1).requires_grad_() for _ in range(2)]
    fn(small[0], small[1], torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)).backward()
    del small

    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(2):  # normalised in place: no N x D temporaries above the baseline
        x = torch.randn(n, dim, generator=g)
        x.div_(x.norm(dim=1, keepdim=True))
        feats.append(x.requires_grad_())
    image, text = feats
    scale = torch.tensor(10.0, requires_grad=True)  # SigLIP's init: scale 10, bias -10
    bias = torch.tensor(-10.0, requires_grad=True)

    exact = _reset_peak()
    base_kib = _status_kib("VmRSS") if exact else _peak_kib()
    t0 = time.perf_counter()
    value = fn(image, text, scale, bias)
    value.backward()
    seconds = time.perf_counter() - t0
    extra = (_peak_kib() - base_kib) * 1024
    return {"loss": loss, "impl": impl, "n": n, "seconds": seconds, "extra_bytes": extra,
            "value": float(value.detach()), "peak_method": "VmHWM" if exact else "ru_maxrss", "threads": torch.get_num_threads()}


# -- the driver ----------------------------------------------------------------------------------------
def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _open_clip_version() -> str | None:
    try:
        import open_clip
        return getattr(open_clip, "__version__", "?")
    except ImportError:
        return None


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.0f} MiB"


def _run_one(args, loss, impl, n) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", loss, impl, str(n),
           "--dim", str(args.dim), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])  # import lightning_clip from this checkout
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536],
                   help="batch sizes N (default: 4096 8192 16384 32768 65536)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="loss families")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations (open_clip is skipped when not installed)")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default 512)")
    p.add_argument("--chunk-size", type=int, default=2048, help="tile size of the tiled path (default 2048)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every measurement (default: torch's choice, one per core). On a "
                        "machine shared with other jobs, 1 can be faster: a 2-thread op waits at its barrier "
                        "for whichever thread another process has preempted")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each cell this many times, interleaved with the other implementations, and "
                        "keep the fastest (default 1)")
    p.add_argument("--max-dense-gib", type=float, default=18.0,
                   help="skip dense/open_clip cases whose N x N matrices would need more (default 18)")
    p.add_argument("--json", type=Path, help="also write every measurement to this file")
    p.add_argument("--worker", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        loss, impl, n = args.worker
        print(json.dumps(measure(loss, impl, int(n), args.dim, args.chunk_size, args.threads)))
        return 0

    import torch
    oc_version = _open_clip_version()
    impls = [i for i in args.impls if i != "open_clip" or oc_version]
    threads = args.threads or torch.get_num_threads()
    print(f"# torch {torch.__version__}, {threads} thread(s), open_clip {oc_version or 'not installed'}, float32, "
          f"D={args.dim}, forward+backward, tiled chunk {args.chunk_size}, one process per measurement, "
          f"best of {args.repeat}, load average at start {_loadavg()}", flush=True)
    rows = []
    for loss in args.losses:
        for n in args.sizes:
            cells = {impl: {"loss": loss, "impl": impl, "n": n} for impl in impls}
            for impl, row in cells.items():
                if impl != "tiled":
                    need = DENSE_MATRICES[impl, loss] * n * n * 4
                    avail = _available_bytes()
                    limit = args.max_dense_gib * GIB if avail is None else min(args.max_dense_gib * GIB, avail - GIB)
                    if need > limit:
                        row["skipped"] = f"would need ~{need / GIB:.0f} GiB"
            for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every impl alike
                for impl, row in cells.items():
                    if "skipped" in row or "error" in row:
                        continue
                    got = _run_one(args, loss, impl, n)
                    if "error" in got or "seconds" not in row or got["seconds"] < row["seconds"]:
                        row.update(got)
            for impl, row in cells.items():
                rows.append(row)
                print("  " + _cell_text(row, impl), f"({loss}, N={n})", flush=True)
    print(f"# load average at end {_loadavg()}")
    print()
    print(table(rows, impls))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _cell_text(row, impl) -> str:
    if "skipped" in row:
        return f"{impl}: skipped: {row['skipped']}"
    if "error" in row:
        return f"{impl}: failed: {row['error']}"
    return f"{impl}: {row['seconds']:.2f} s, {_fmt_bytes(row['extra_bytes'])}"


def table(rows, impls) -> str:
    """Markdown table: one line per (loss, N), ratios against open_clip where it ran."""
    head = ["loss", "N"]
    for impl in impls:
        head += [f"{impl} time", f"{impl} extra mem"]
    ratio_impls = [i for i in impls if i != "open_clip"] if "open_clip" in impls else []
    for impl in ratio_impls:
        head += [f"{impl} speed-up vs open_clip", f"{impl} mem / open_clip"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["loss"], r["n"]) for r in rows}, key=lambda k: (LOSSES.index(k[0]), k[1]))
    for loss, n in keys:
        cells = {r["impl"]: r for r in rows if r["loss"] == loss and r["n"] == n}
        line = [loss, f"{n:,}"]
        for impl in impls:
            r = cells.get(impl, {})
            if "seconds" in r:
                line += [f"{r['seconds']:.2f} s", _fmt_bytes(r["extra_bytes"])]
            else:
                why = r.get("skipped") or r.get("error") or "-"
                line += [f"skipped: {why}" if "skipped" in r else why, ""]
        ref = cells.get("open_clip", {})
        for impl in ratio_impls:
            r = cells.get(impl, {})
            if "seconds" in r and "seconds" in ref:
                line += [f"{ref['seconds'] / r['seconds']:.1f}x", f"{r['extra_bytes'] / ref['extra_bytes']:.3f}"]
            else:
                line += ["", ""]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
