"""Our training step at CLIP size next to open_clip's, on one GPU in one run.

    python benchmarks/gpu_train_step.py [--steps 20] [--warmup 5] [--batch-size 256]
        [--config experiments/base.yaml --config experiments/gpu/vit_b16_bert_base.yaml] [--tiny]

Prints samples/s and peak GPU memory of forward + loss + backward + AdamW step on ready in-memory batches
(random pixels and token ids: the loader is not measured) for
- ours: `ClipModule` built from the configs (ViT-B/16 + BERT-base at 224 px, the tiled InfoNCE kernel),
  under bf16 autocast when the config says bf16-mixed, as Lightning's precision plugin would run it;
- open_clip: `open_clip.create_model("ViT-B-16")` (random init, its own 12-layer text transformer) with
  `open_clip.loss.ClipLoss`, same batch, same precision.
Each model is built, measured and freed in turn, so each peak is its own. `--tiny` shrinks both models and
the batch so the whole script runs on a CPU in seconds (the test runs it so); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = [str(REPO / "experiments/base.yaml"), str(REPO / "experiments/gpu/vit_b16_bert_base.yaml")]
BERT_VOCAB = 30522  # BERT-base's WordPiece vocabulary
# --tiny: the same code paths at toy sizes
TINY_OURS = ["--model.image_model_args={depth: 1, embed_dim: 32, num_heads: 2, patch_size: 8}",
             "--model.text_config={hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, "
             "num_hidden_layers: 1}", "--model.embed_dim=16", "--model.loss_args={chunk_size: 4}",
             "--data.image_size=32"]
TINY_OPEN_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                      text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))


def model_config(configs: list[str], overrides: list[str]):
    """The model and data sections the CLI would build from ``configs`` (parsed by the real parser)."""
    from lightning_clip.cli import ClipCLI
    from lightning_clip.data import ClipDataModule
    from lightning_clip.module import ClipModule

    class ParseOnly(ClipCLI):
        def instantiate_classes(self) -> None:
            pass

    args = [a for c in configs for a in ("--config", c)] + overrides
    return ParseOnly(ClipModule, ClipDataModule, run=False, args=args).config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, make_batch, device: torch.device, steps: int, warmup: int, batch_size: int) -> dict:
    """samples/s over ``steps`` steps after ``warmup``, and the peak memory of the whole measurement."""
    batches = [make_batch() for _ in range(2)]  # alternate two batches: no caching effects, little memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(batches[i % 2])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"samples_per_s": round(batch_size * steps / seconds, 1), "step_ms": round(1000 * seconds / steps, 2)}
    out["peak_mem_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                           if device.type == "cuda" else None)
    return out


def ours(cfg, device, batch_size: int, length: int, bf16: bool, vocab: int):
    from lightning_clip.module import ClipModule

    model_args = {**cfg.model.as_dict(), "vocab_size": vocab, "pad_token_id": 0,
                  "image_size": cfg.data.image_size}
    model = ClipModule(**model_args).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda" or None)
    size = cfg.data.image_size

    def make_batch():
        ids = torch.randint(5, vocab, (batch_size, length), device=device)
        return {"image": torch.randn(batch_size, 3, size, size, device=device), "input_ids": ids,
                "attention_mask": torch.ones_like(ids), "meta": {}}

    def step(batch):
        # what Lightning's bf16-mixed plugin does around training_step; the module takes the loss itself
        # out of autocast (float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(batch)
        out = model._compute_loss(emb, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.loss.clamp_()

    return model, step, make_batch


def open_clip_model(device, batch_size: int, bf16: bool, tiny: bool):
    import open_clip
    from open_clip.loss import ClipLoss

    if tiny:
        model = open_clip.model.CLIP(**TINY_OPEN_CLIP)
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    model = model.to(device).train()
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    length, vocab = model.context_length, model.vocab_size

    def make_batch():
        return (torch.randn(batch_size, 3, size, size, device=device),
                torch.randint(1, vocab, (batch_size, length), device=device))

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image, text, scale = model(*batch)
        loss = loss_fn(image.float(), text.float(), scale.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # open_clip's training loop clamps to ln(100)

    return model, step, make_batch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="configs, in order (default: base + the GPU delta)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of the config")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (the CPU test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = model_config(args.config or CONFIGS, TINY_OURS if args.tiny else [])
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    batch_size = args.batch_size or (4 if args.tiny else cfg.data.batch_size)
    length = 16 if args.tiny else cfg.data.max_length
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch_size": batch_size, "precision": "bf16" if bf16 else "fp32",
              "image_size": cfg.data.image_size, "tokens": length, "steps": args.steps, "warmup": args.warmup}
    print("#", json.dumps(header), flush=True)
    results = {}
    builders = {"ours": lambda: ours(cfg, device, batch_size, length, bf16, 1000 if args.tiny else BERT_VOCAB),
                "open_clip": lambda: open_clip_model(device, batch_size, bf16, args.tiny)}
    for name, build in builders.items():
        model, step, make_batch = build()
        params = sum(p.numel() for p in model.parameters())
        results[name] = {"params_m": round(params / 1e6, 2),
                         **measure(step, make_batch, device, args.steps, args.warmup, batch_size)}
        print(json.dumps({name: results[name]}), flush=True)
        del model, step, make_batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"header": header, **results}


if __name__ == "__main__":
    main()
