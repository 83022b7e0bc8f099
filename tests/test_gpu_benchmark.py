"""benchmarks/gpu_train_step.py runs end to end on a CPU at toy sizes, so it is known to work before a
GPU is at hand; and its config builds the intended model (checked without building it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train_step", REPO / "benchmarks" / "gpu_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_gpu_config_is_vit_b16_and_bert_base_in_bf16_with_the_tiled_loss():
    cfg = _script().model_config(_script().CONFIGS, [])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.image_size == 224
    assert cfg.model.image_model == "vit_base_patch16_224" and not cfg.model.image_pretrained
    t = cfg.model.text_config
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"]) == \
        (768, 12, 12, 3072)
    assert cfg.model.loss == "infonce" and cfg.model.loss_args["chunk_size"] > 0


def test_the_benchmark_runs_on_cpu_at_toy_sizes(capsys):
    out = _script().main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"])
    assert out["header"]["precision"] == "bf16" and out["header"]["batch_size"] == 4
    for name in ("ours", "open_clip"):
        assert out[name]["samples_per_s"] > 0 and out[name]["peak_mem_gib"] is None  # no GPU memory on CPU
        assert 0 < out[name]["params_m"] < 1  # the toy models, not ViT-B/16
    printed = capsys.readouterr().out
    assert printed.startswith("# {") and '"ours"' in printed and '"open_clip"' in printed
