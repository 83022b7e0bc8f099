"""ClipModule: shapes, optional heads driven by the loss' needs, temperature clamp, weight-decay groups,
learning-rate schedule, and the NaN guard."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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


class FakeTrainer:
    """What configure_optimizers reads from the trainer: the run's number of optimizer steps."""

    def __init__(self, steps: int):
        self.estimated_stepping_batches = steps


def configured(m: ClipModule, steps: int = 10) -> dict:
    m.trainer = FakeTrainer(steps)  # type: ignore[assignment]
    return m.configure_optimizers()


def decay_of(opt) -> dict[int, float]:
    """id(parameter) -> the weight decay the optimizer applies to it (each parameter in one group only)."""
    out: dict[int, float] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = group["weight_decay"]
    return out


@pytest.mark.parametrize("image_model,loss", [("test_resnet", "infonce"), ("test_vit", "siglip"),
                                              ("test_resnet", "pcmepp")])
def test_weight_decay_on_weight_matrices_only(image_model, loss):
    """CLIP's recipe: decay on the linear and convolution weights; none on biases, norm gains, embedding
    tables, or the loss' own scale / bias (decay would pull the learned temperature toward scale 1)."""
    m = ClipModule(image_model=image_model, loss=loss, weight_decay=0.3, lr=2e-3, betas=(0.8, 0.9), **TINY)
    opt = configured(m)["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    # the schedule's first step: warmup = min(warmup_steps 50, 10 steps // 2) = 5, lr * 1 / 6
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 / 6] * 2)
    assert {g["initial_lr"] for g in opt.param_groups} == {2e-3}
    assert {tuple(g["betas"]) for g in opt.param_groups} == {(0.8, 0.9)}
    decay = decay_of(opt)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert set(decay) == {id(p) for p in trainable}                  # every trainable parameter, once
    want: dict[int, float] = {}
    for _, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            want[id(mod.weight)] = 0.3
            if mod.bias is not None:
                want[id(mod.bias)] = 0.0
        elif isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)):
            want.update({id(p): 0.0 for p in mod.parameters(recurse=False)})
    want.update({id(getattr(m.loss, n)): 0.0 for n in m.loss.no_decay if getattr(m.loss, n, None) is not None})
    assert len(want) > 20 and {decay[k] for k in want} >= {0.0, 0.3}
    wrong = [n for n, p in m.named_parameters() if id(p) in want and decay[id(p)] != want[id(p)]]
    assert not wrong, f"wrong weight decay on {wrong}"
    assert any(isinstance(mod, nn.Embedding) for mod in m.modules())  # the embedding rule was exercised


def test_fixed_scale_is_not_handed_to_the_optimizer():
    m = ClipModule(loss_args={"learn_scale": False}, **TINY)
    assert id(m.loss.log_scale) not in decay_of(configured(m)["optimizer"])


def test_optimizer_step_keeps_the_scale_in_the_clamp_range():
    """After every optimizer step the log-scale is cut back to [0, log 100] (open_clip), in the module's
    own step, whatever the update did."""
    m = ClipModule(**TINY)
    opt = configured(m)["optimizer"]
    head = m.image_head.proj.weight
    for start, want in ((10.0, LOG_SCALE_MAX), (-3.0, 0.0), (1.5, None)):
        with torch.no_grad():
            m.loss.log_scale.fill_(start)
        before = head.detach().clone()

        def closure():
            opt.zero_grad()
            loss = m._compute_loss(m(batch())).loss
            loss.backward()
            return loss

        m.optimizer_step(0, 0, opt, closure)
        got = float(m.loss.log_scale.detach())
        if want is None:  # inside the range: the optimizer's update alone (AdamW moves it by at most ~lr)
            assert 0.0 < got < LOG_SCALE_MAX and abs(got - start) < 2 * m.hparams.lr
        else:
            assert got == float(torch.tensor(want))  # exactly the bound, in the parameter's float32
        assert not torch.equal(head.detach(), before)  # a real step was taken


@pytest.mark.parametrize("warmup_steps,total,min_lr_ratio", [(4, 20, 0.0), (4, 20, 0.1), (50, 20, 0.0)])
def test_learning_rate_schedule_values(warmup_steps, total, min_lr_ratio):
    """Linear warmup to lr over min(warmup_steps, total // 2) steps, then a half cosine down to
    min_lr_ratio * lr at the last step, stepped once per optimizer step."""
    lr = 0.5
    m = ClipModule(warmup_steps=warmup_steps, lr=lr, min_lr_ratio=min_lr_ratio, **TINY)
    cfg = configured(m, total)
    assert cfg["lr_scheduler"]["interval"] == "step"
    sched = cfg["lr_scheduler"]["scheduler"]
    warmup = min(warmup_steps, total // 2)
    lrs = []
    for _ in range(total + 3):  # past the end: stays at the floor
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    for step, value in enumerate(lrs):
        if step < warmup:
            want = lr * (step + 1) / (warmup + 1)
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            want = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert value == pytest.approx(want, rel=1e-12), step
    assert lrs[warmup] == pytest.approx(lr)                           # the peak, right after warmup
    assert lrs[total] == pytest.approx(lr * min_lr_ratio, abs=1e-15)  # the floor at the last step
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


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
