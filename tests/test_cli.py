"""The CLI: every shipped YAML parses with the real parser (in milliseconds, as litgpt does for its config
hub), and bad configuration fails with a message naming the problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_clip.cli import ClipCLI
from lightning_clip.data import ClipDataModule
from lightning_clip.losses import build_loss
from lightning_clip.module import ClipModule

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
BASE = EXPERIMENTS / "base.yaml"
QUICK = EXPERIMENTS / "quick.yaml"
#: whole-run configs, each given over base.yaml
OVERLAYS = [EXPERIMENTS / "smoke.yaml", QUICK, EXPERIMENTS / "real" / "flickr8k.yaml",
            EXPERIMENTS / "gpu" / "vit_b16_bert_base.yaml"]
#: the ablation cells, each a delta over base.yaml (`_ablation.yaml` holds an ablation's runner settings,
#: not a training config)
CELLS = sorted(p for p in (EXPERIMENTS / "ablations").rglob("*.yaml") if not p.name.startswith("_"))
#: the sections of a config a later --config merges key by key (a key's value is replaced whole)
SECTIONS = ("trainer", "model", "data")


class ParseOnlyCLI(ClipCLI):
    """Parse and validate, instantiate nothing (no model, no shards needed)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    return ParseOnlyCLI(ClipModule, ClipDataModule, run=False, args=list(args)).config


def layered(*paths: Path) -> dict:
    """What the configs say once layered as the CLI does: the last file wins per section key."""
    out: dict = {}
    for path in paths:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if key in SECTIONS:
                out.setdefault(key, {}).update(value or {})
            else:
                out[key] = value
    return out


def resolved(cfg, section: str, key: str):
    value = cfg[section][key] if section in SECTIONS else cfg[section]
    return value.as_dict() if hasattr(value, "as_dict") else value


def assert_resolves_to_the_files(cfg, *paths: Path) -> None:
    want = layered(*paths)
    for section, values in want.items():
        if section not in SECTIONS:
            assert resolved(cfg, section, "") == values, section
            continue
        for key, value in values.items():
            got = resolved(cfg, section, key)
            assert got == value or (isinstance(got, tuple) and list(got) == value), \
                f"{section}.{key}: parsed {got!r}, the files say {value!r} ({[p.name for p in paths]})"


def test_every_shipped_config_is_found():
    names = {str(p.relative_to(EXPERIMENTS)) for p in CELLS}
    ablations = {p.parent.name for p in CELLS}
    assert {"losses", "batch_size", "batch_steps", "duplicates", "variance", "real", "convergence"} <= ablations
    assert {"ablations/losses/infonce.yaml", "ablations/losses/siglip.yaml"} <= names
    assert all(p.exists() for p in [BASE, *OVERLAYS])
    # every YAML under experiments/ is checked here, as a cell or an overlay, or is not a training config
    other = {p for p in EXPERIMENTS.rglob("*.yaml")} - set(CELLS) - set(OVERLAYS) - {BASE}
    assert all(p.name.startswith("_") or "executors" in p.parts for p in other), other


def test_base_resolves_to_the_defaults_every_cell_inherits():
    cfg = parse("--config", str(BASE))
    assert_resolves_to_the_files(cfg, BASE)
    assert cfg.model.loss == "infonce" and cfg.trainer.max_steps == 2000 and cfg.data.batch_size == 64
    assert cfg.model.image_size == cfg.data.image_size == 48  # linked from the data


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_whole_run_config_parses_over_base(overlay):
    cfg = parse("--config", str(BASE), "--config", str(overlay))
    assert_resolves_to_the_files(cfg, BASE, overlay)
    assert cfg.model.image_size == cfg.data.image_size
    build_loss(cfg.model.loss, **(cfg.model.loss_args or {}))


def test_smoke_and_quick_are_short_runs():
    smoke = parse("--config", str(BASE), "--config", str(EXPERIMENTS / "smoke.yaml"))
    assert smoke.trainer.max_steps == 8 and smoke.model.embed_dim == 32 and smoke.data.num_workers == 0
    assert smoke.model.text_config == {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    quick = parse("--config", str(BASE), "--config", str(CELLS[0]), "--config", str(QUICK))
    assert quick.trainer.max_steps == 12 and quick.trainer.val_check_interval == 6


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: str(p.relative_to(EXPERIMENTS / "ablations")))
def test_every_cell_parses_over_base_alone_and_with_the_quick_overlay(cell):
    cfg = parse("--config", str(BASE), "--config", str(cell))
    assert_resolves_to_the_files(cfg, BASE, cell)
    # the loss named by the cell exists and accepts its options
    family = build_loss(cfg.model.loss, **(cfg.model.loss_args or {}))
    assert family.registry_name == cfg.model.loss
    # cells are deltas: they must not replace the always-on callbacks
    assert "callbacks" not in (yaml.safe_load(cell.read_text()) or {}).get("trainer", {}), cell
    # make ablate QUICK=1: the overlay comes last and shortens the run, the cell's model and data stay
    quick = parse("--config", str(BASE), "--config", str(cell), "--config", str(QUICK))
    assert_resolves_to_the_files(quick, BASE, cell, QUICK)
    assert quick.model.loss == cfg.model.loss and quick.data.batch_size == cfg.data.batch_size


def test_cells_resolve_to_what_their_ablation_varies():
    def cfg(rel):
        return parse("--config", str(BASE), "--config", str(EXPERIMENTS / "ablations" / rel))

    siglip = cfg("losses/siglip.yaml")
    assert siglip.model.loss == "siglip" and siglip.model.loss_args == {"init_bias": "prior"}
    assert siglip.trainer.max_steps == 2000 and siglip.data.batch_size == 64   # the rest is base's
    assert cfg("batch_size/infonce-b16.yaml").data.batch_size == 16
    real = cfg("real/infonce.yaml")
    assert real.data.generate is None and real.data.train_shards.endswith("flickr8k-96/train")


def test_unknown_config_key_is_named(capsys):
    with pytest.raises(SystemExit):
        parse("--config", str(BASE), "--model.no_such_option=3")
    assert "no_such_option" in capsys.readouterr().err


def test_unknown_loss_name_lists_choices(tmp_path):
    cfg = parse("--config", str(BASE), "--model.loss=clip_typo")
    with pytest.raises(ValueError, match="registered losses: .*infonce"):
        build_loss(cfg.model.loss, **(cfg.model.loss_args or {}))


def test_args_from_python_raise_no_lightning_warning_about_sys_argv(monkeypatch):
    import warnings

    monkeypatch.setattr("sys.argv", ["pytest", "-q", "tests/"])  # a caller's own options, as under pytest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse("--config", str(BASE))
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]


def test_without_a_gpu_optimizer_steps_stop_probing_nvml(monkeypatch):
    import torch

    import lightning_clip.cli as cli

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the NVML check is left as Lightning set it")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what importing Lightning does
    probes = []
    real = torch.cuda._device_count_nvml
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: probes.append(1) or real())
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], fused=True)

    def step():
        p.grad = torch.ones(3)
        opt.step()

    step()
    assert probes, "the check this guards against is gone from torch: drop _cheap_cuda_probe"
    cli._cheap_cuda_probe()
    probes.clear()
    for _ in range(3):
        step()
    assert probes == [] and not torch.cuda.is_available()
