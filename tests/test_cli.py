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
BASE = REPO / "experiments" / "base.yaml"
# experiments/executors/ holds the ablation runner's executor options, not training configs
CELLS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p != BASE and "executors" not in p.parts)


class ParseOnlyCLI(ClipCLI):
    """Parse and validate, instantiate nothing (no model, no shards needed)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    return ParseOnlyCLI(ClipModule, ClipDataModule, run=False, args=list(args)).config


def test_there_are_configs_to_check():
    names = {p.name for p in CELLS}
    assert "smoke.yaml" in names


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_config_parses_over_base(cell):
    cfg = parse("--config", str(BASE), "--config", str(cell))
    # the loss named by the cell exists and accepts its options
    build_loss(cfg.model.loss, **(cfg.model.loss_args or {}))
    # cells are deltas: they must not replace the always-on callbacks
    assert "callbacks" not in (yaml.safe_load(cell.read_text()) or {}).get("trainer", {}), cell


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
