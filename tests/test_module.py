"""ClipModule: shapes, optional heads driven by the loss' needs, temperature clamp, weight-decay groups,
learning-rate schedule, and the NaN guard."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_clip.losses.base import LOG_SCALE_MAX
from lightning_clip.module import ClipModule

TINY = dict(embed_dim=16, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
            vocab_size=60, image_size=32)


def batch(n=4, length=7, size=32):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0  # one padded caption
    return dict(image=torch.randn(n, 3, size, size, generator=g),
                input_ids=torch.randint(5, 60, (n, length), generator=g) * mask, attention_mask=mask,
                meta=dict(image_group=torch.arange(n), text_group=torch.arange(n)))


def test_forward_shapes_and_no_unused_heads():
    m = ClipModule(**TINY)
    emb = m(batch())
    assert emb.image.shape == (4, 16) and emb.text.shape == (4, 16)
    assert emb.image_ln_std is None and emb.regions is None
    assert not hasattr(m, "image_var") and not hasattr(m, "region_head")


def test_unknown_image_model_names_the_option():
    with pytest.raises(ValueError, match=r"unknown timm image model 'vit_nonexistent_xyz'.*model\.image_model"):
        ClipModule(image_model="vit_nonexistent_xyz", **TINY)


def test_unknown_loss_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown loss 'clipp'.*infonce"):
        ClipModule(loss="clipp", **TINY)


def test_cnn_tower_takes_any_size():
    m = ClipModule(image_model="test_resnet", **TINY)
    assert m(batch()).image.shape == (4, 16)


@pytest.mark.parametrize("image_model", ["test_resnet", "test_vit"])
def test_channels_last_is_a_layout_change_only(image_model):
    torch.manual_seed(0)
    nhwc = ClipModule(image_model=image_model, channels_last=True, **TINY).double()
    nchw = ClipModule(image_model=image_model, channels_last=False, **TINY).double()
    nchw.load_state_dict(nhwc.state_dict())
    conv = next(p for p in nhwc.image_tower.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    b = batch()
    b["image"] = b["image"].double()
    a, c = nhwc(b), nchw(b)
    torch.testing.assert_close(a.image, c.image, rtol=1e-10, atol=1e-12)
    a.image.sum().backward()
    c.image.sum().backward()
    ga = [p.grad for p in nhwc.image_tower.parameters()]
    gc = [p.grad for p in nchw.image_tower.parameters()]
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_log_scale_not_decayed_and_clamped_after_step():
    m = ClipModule(**TINY)

    class FakeTrainer:
        estimated_stepping_batches = 10

    m.trainer = FakeTrainer()  # type: ignore[assignment]
    opt = m.configure_optimizers()["optimizer"]
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert any(p is m.loss.log_scale for p in no_decay["params"])
    decay = next(g for g in opt.param_groups if g["weight_decay"] > 0)
    assert all(p is not m.loss.log_scale for p in decay["params"])
    with torch.no_grad():
        m.loss.log_scale.fill_(10.0)
    m.loss.clamp_()
    assert float(m.loss.log_scale.detach()) == pytest.approx(LOG_SCALE_MAX)
    with torch.no_grad():
        m.loss.log_scale.fill_(-3.0)
    m.loss.clamp_()
    assert float(m.loss.log_scale.detach()) == 0.0


def test_build_optimizer_is_the_optimizer_the_module_trains_with():
    # benchmarks time a hand-written loop with build_optimizer(): it must be configure_optimizers' own
    m = ClipModule(weight_decay=0.3, **TINY)

    class FakeTrainer:
        estimated_stepping_batches = 10

    m.trainer = FakeTrainer()  # type: ignore[assignment]
    configured, built = m.configure_optimizers()["optimizer"], m.build_optimizer()
    assert type(configured) is type(built)
    for a, b in zip(configured.param_groups, built.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        # the schedule scales lr from its initial value (warmup): compare that
        assert a["initial_lr"] == b["lr"]
        assert {k: v for k, v in a.items() if k not in ("params", "initial_lr", "lr")} == \
            {k: v for k, v in b.items() if k not in ("params", "lr")}
    assert {g["weight_decay"] for g in built.param_groups} == {0.3, 0.0}


def test_warmup_then_cosine():
    m = ClipModule(warmup_steps=4, lr=1.0, **TINY)

    class FakeTrainer:
        estimated_stepping_batches = 20

    m.trainer = FakeTrainer()  # type: ignore[assignment]
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] < lrs[4]          # warmup rises
    assert lrs[4] == pytest.approx(1.0)                         # peak after warmup
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))       # cosine decays
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_nan_features_raise_a_clear_error():
    m = ClipModule(**TINY)
    b = batch()
    b["image"][1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"train step at global step 0, loss family 'infonce': "
                                                 r"non-finite features \(.*image.*NaN.*\).*lower model.lr "
                                                 r"\(now 0.001\), check the data"):
        m.training_step(b, 0)


def test_non_finite_loss_names_step_family_and_remedy(monkeypatch):
    m = ClipModule(**TINY, loss="siglip", lr=0.02)
    out = m._compute_loss(m(batch()))
    out.loss = torch.tensor(float("inf"))
    with pytest.raises(FloatingPointError, match=r"val step at global step 0, loss family 'siglip': loss is inf "
                                                 r"\(batch keys \['k0#0'\]...\).*lower model.lr \(now 0.02\)"):
        m._check_finite(out, {"meta": {"key": ["k0#0"]}}, "val")


def test_oracle_loss_gets_the_batch_relevance_and_groups_loss_does_not():
    b = batch()
    rel = torch.eye(4, dtype=torch.bool)
    rel[0, 1] = True
    b["meta"]["relevance"] = rel
    oracle = ClipModule(**TINY, loss="multi_positive", loss_args={"positives": "oracle"})
    emb = oracle(b)
    assert emb.relevance is rel and emb.image_groups is None
    groups = ClipModule(**TINY, loss="multi_positive")(b)
    assert groups.relevance is None and groups.image_groups is not None
    assert ClipModule(**TINY)(b).relevance is None  # infonce needs neither
    del b["meta"]["relevance"]
    with pytest.raises(ValueError, match=r"positives='oracle' \(option model\.loss_args\.positives\)"):
        oracle.training_step(b, 0)


def _logged(m: ClipModule) -> dict:
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))  # no trainer attached
    return logged


def test_false_negatives_are_a_running_mean_over_the_run():
    m = ClipModule(**TINY)
    logged = _logged(m)
    b = batch()
    m.training_step(b, 0)  # no relevance (real data): nothing to log
    assert "train/false_negatives" not in logged and "train/loss" in logged
    # the loader's share of relevant off-diagonal pairs (tests/test_data_relevance.py checks it)
    share = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    b["meta"]["false_negative_share"] = share(3 / 12)
    m.training_step(b, 1)
    assert logged["train/false_negatives"] == pytest.approx(3 / 12)
    b["meta"]["false_negative_share"] = share(1.0)  # every pair
    m.training_step(b, 2)
    assert logged["train/false_negatives"] == pytest.approx((3 / 12 + 1.0) / 2)
    b["meta"]["false_negative_share"] = share(0.0)
    m.training_step(b, 3)
    assert logged["train/false_negatives"] == pytest.approx((3 / 12 + 1.0 + 0.0) / 3)
    assert ClipModule(**TINY)._false_negative_batches == 0  # per module, not shared through the class


def test_scale_is_logged_once_by_the_temperature_callback_not_by_the_step():
    m = ClipModule(**TINY)
    logged = _logged(m)
    m.training_step(batch(), 0)
    assert "train/logit_scale" not in logged and set(logged) >= {"train/loss", "train/loss/i2t"}


def _tower_batch_sizes(m):
    sizes = []
    m.image_tower.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    return sizes


@pytest.mark.parametrize("loss", ["infonce", "damsm"])  # damsm: the regions are expanded too
def test_eval_forward_runs_each_distinct_image_once_with_the_same_outputs(loss):
    torch.manual_seed(0)
    m = ClipModule(loss=loss, image_model="test_resnet", **TINY).eval()
    b = batch(6)
    b["image"][3:] = b["image"][:3]  # rows 3-5 repeat the images of rows 0-2, as a caption-per-row batch does
    b["meta"]["image_id"] = torch.tensor([7, 2, 9, 7, 2, 9])
    sizes = _tower_batch_sizes(m)
    with torch.no_grad():
        deduped = m(b)
        b["meta"]["image_id"] = torch.arange(6)  # every row its own image: the tower sees all six
        full = m(b)
    assert sizes == [3, 6]
    assert torch.equal(deduped.image, full.image)
    if loss == "damsm":
        assert torch.equal(deduped.regions, full.regions)


def test_rows_sharing_an_id_but_not_pixels_are_not_merged_and_training_never_merges():
    m = ClipModule(image_model="test_resnet", **TINY).eval()
    b = batch(4)
    b["meta"]["image_id"] = torch.tensor([1, 1, 2, 2])  # ids say two images; the pixels say four
    sizes = _tower_batch_sizes(m)
    with torch.no_grad():
        m(b)
    b["image"][1], b["image"][3] = b["image"][0], b["image"][2]
    m.train()  # batch norm on batch statistics: every row must be in the tower's batch
    m(b)
    assert sizes == [4, 4]
