"""Callbacks: unit tests with a stand-in trainer / module, then tiny real fits whose TensorBoard events are
read back with TensorBoard's own event reader."""
from __future__ import annotations

import json
import os
import random
import types

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_clip.callbacks import (ResultsCallback, RetrievalCallback, TemperatureCallback, VarianceCallback,
                                      default_callbacks)
from lightning_clip.callbacks.results import flatten_hparams
from lightning_clip.eval.calibration import recall_at_1_by_bin, spearman
from lightning_clip.data.oracle import relevance_matrix
from lightning_clip.data.synthetic import sample_caption, sample_scene
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.infonce import InfoNCELoss
from lightning_clip.eval.retrieval import oracle_ceiling, retrieval_metrics
from lightning_clip.outputs import Embeddings, LossOutput


class VarianceLoss(InfoNCELoss):
    """A stand-in family with variance heads (the real one is `probabilistic`)."""

    registry_name = "fake_variance"
    needs = frozenset({"image_ln_std", "text_ln_std"})

    def forward(self, emb: Embeddings) -> LossOutput:
        out = super().forward(emb)
        return LossOutput(out.loss + 1e-3 * (emb.image_ln_std.pow(2).mean() + emb.text_ln_std.pow(2).mean()), {})


class SigmoidLike(ContrastiveLoss):
    registry_name = "sigmoid_like"

    def __init__(self):
        super().__init__(init_scale=10.0, init_bias=-10.0)


# -- a small synthetic validation set: 6 images x 3 captions, with real scenes and constraints --------------
def world(n_images=6, caps=3, dim=8, seed=0):
    rng = random.Random(seed)  # the generator draws scenes and captions from random.Random
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n_images):
        scene = sample_scene(rng)
        for c in range(caps):
            cap = sample_caption(scene, rng)
            items.append(dict(image_id=1000 + i, key=f"{i:04d}", caption=f"{cap['text']} #{c}",
                              specificity=cap["level"], num_objects=len(scene["objects"]), scene=scene,
                              constraints=cap["constraints"]))
    img = torch.randn(n_images, dim, generator=g)
    image = img.repeat_interleave(caps, 0)
    text = image + 0.8 * torch.randn(n_images * caps, dim, generator=g)
    return items, image, text


def meta_of(items, with_truth=True):
    meta = dict(image_id=torch.tensor([it["image_id"] for it in items]), key=[it["key"] for it in items],
                caption=[it["caption"] for it in items],
                specificity=torch.tensor([it["specificity"] for it in items]),
                num_objects=torch.tensor([it["num_objects"] for it in items]))
    if with_truth:
        meta["scene"] = [it["scene"] for it in items]
        meta["constraints"] = [it["constraints"] for it in items]
    else:
        meta["scene"] = [None] * len(items)
        meta["constraints"] = [None] * len(items)
    return meta


class FakeModule:
    def __init__(self, loss):
        self.loss = loss
        self.device = torch.device("cpu")
        self.logged = {}
        self.hparams = {"loss": loss.registry_name, "loss_args": {"label_smoothing": 0.1}, "embed_dim": 8}

    def log(self, name, value, **kw):
        self.logged[name] = float(value)


def fake_trainer(callbacks=(), **kw):
    base = dict(sanity_checking=False, is_global_zero=True, loggers=[], logger=None, callbacks=list(callbacks),
                global_step=3, current_epoch=1, callback_metrics={}, default_root_dir=".")
    base.update(kw)
    return types.SimpleNamespace(**base)


def run_validation(callbacks, module, items, image, text, ln_std=None, batch=5, with_truth=True):
    trainer = fake_trainer(callbacks)
    for cb in callbacks:
        if hasattr(cb, "on_validation_epoch_start"):
            cb.on_validation_epoch_start(trainer, module)
    for start in range(0, len(items), batch):
        s = slice(start, start + batch)
        emb = Embeddings(image=image[s], text=text[s])
        if ln_std is not None:
            emb.image_ln_std, emb.text_ln_std = ln_std[0][s], ln_std[1][s]
        out = {"loss": torch.tensor(0.0), "emb": emb, "meta": meta_of(items[s], with_truth)}
        for cb in callbacks:
            cb.on_validation_batch_end(trainer, module, out, None, start // batch)
    for cb in callbacks:
        cb.on_validation_epoch_end(trainer, module)
    return trainer


# -- retrieval -------------------------------------------------------------------------------------------
def test_retrieval_callback_logs_plain_and_semantic_recall():
    items, image, text = world()
    module = FakeModule(InfoNCELoss())
    cb = RetrievalCallback()
    run_validation([cb], module, items, image, text)
    # the same numbers from the pure function on deduplicated images and the oracle's relevance
    img_ids = torch.tensor([it["image_id"] for it in items])
    uniq = image[::3]
    relevance = relevance_matrix([it["constraints"] for it in items], [items[i]["scene"] for i in range(0, 18, 3)])
    want, _, _ = retrieval_metrics(uniq, text, img_ids[::3], img_ids, relevance=relevance)
    want.update({f"ceiling/{k}": v for k, v in oracle_ceiling(relevance, img_ids[::3], img_ids).items()})
    assert set(module.logged) == {f"val/{k}" for k in want}
    for k, v in want.items():
        assert module.logged[f"val/{k}"] == pytest.approx(float(v)), k
    assert cb.last_metrics == module.logged
    assert {"val/i2t/R@1", "val/t2i/R@10", "val/i2t/median_rank", "val/t2i/mean_rank",
            "val/semantic/t2i/R@1", "val/semantic/i2t/R@5"} <= set(module.logged)


def test_retrieval_callback_without_ground_truth_has_no_semantic_keys():
    items, image, text = world()
    module = FakeModule(InfoNCELoss())
    run_validation([RetrievalCallback()], module, items, image, text, with_truth=False)
    assert "val/t2i/R@1" in module.logged
    assert not any("semantic" in k or "ceiling" in k for k in module.logged)


def test_retrieval_callback_logs_the_oracle_ceiling():
    items, image, text = world(n_images=8, caps=3, seed=3)
    module = FakeModule(InfoNCELoss())
    run_validation([RetrievalCallback()], module, items, image, text)
    # by hand: per caption 1 / |images the oracle accepts (own included)|; per image, own share of the
    # accepted captions that fit the fewest images
    scenes = [items[i]["scene"] for i in range(0, len(items), 3)]
    rel = relevance_matrix([it["constraints"] for it in items], scenes)
    own = torch.arange(8).repeat_interleave(3)
    rel[torch.arange(24), own] = True
    t2i = sum(1 / int(rel[j].sum()) for j in range(24)) / 24
    fits = rel.sum(1)  # images each caption fits; per image the best-fitting (fewest) accepted captions win
    i2t = 0.0
    for i in range(8):
        cand = [j for j in range(24) if rel[j, i]]
        best = min(int(fits[j]) for j in cand)
        top = [j for j in cand if int(fits[j]) == best]
        i2t += sum(int(own[j]) == i for j in top) / len(top) / 8
    assert module.logged["val/ceiling/t2i/R@1"] == pytest.approx(t2i)
    assert module.logged["val/ceiling/i2t/R@1"] == pytest.approx(i2t)
    assert 0 < t2i <= 1 and 0 < i2t <= 1
    # the ceiling depends on the oracle only, not on the embeddings
    other = FakeModule(InfoNCELoss())
    run_validation([RetrievalCallback()], other, items, image, image.clone())
    assert other.logged["val/ceiling/t2i/R@1"] == module.logged["val/ceiling/t2i/R@1"]


def test_retrieval_callback_skips_sanity_check_and_names_missing_outputs():
    module = FakeModule(InfoNCELoss())
    cb = RetrievalCallback()
    trainer = fake_trainer([cb], sanity_checking=True)
    cb.on_validation_epoch_start(trainer, module)
    cb.on_validation_epoch_end(trainer, module)
    assert module.logged == {}
    with pytest.raises(TypeError, match="validation_step to return"):
        cb.on_validation_batch_end(trainer, module, torch.tensor(1.0), None, 0)
    out = {"emb": Embeddings(torch.zeros(1, 2), torch.zeros(1, 2)), "meta": {"key": ["a"]}}
    with pytest.raises(KeyError, match="image_id"):
        cb.on_validation_batch_end(trainer, module, out, None, 0)


def test_retrieval_uses_the_family_similarity():
    class Reversed(InfoNCELoss):
        def similarity(self, image, text, image_ln_std=None, text_ln_std=None):
            return -super().similarity(image, text)

    items, image, text = world()
    plain, rev = FakeModule(InfoNCELoss()), FakeModule(Reversed())
    run_validation([RetrievalCallback()], plain, items, image, text)
    run_validation([RetrievalCallback()], rev, items, image, text)
    assert plain.logged["val/t2i/R@1"] > rev.logged["val/t2i/R@1"]


# -- temperature -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss, keys", [(InfoNCELoss(), {"scale", "log_scale"}),
                                        (SigmoidLike(), {"scale", "log_scale", "bias"})])
def test_temperature_logs_what_the_family_has(loss, keys):
    module = FakeModule(loss)
    TemperatureCallback().on_train_batch_end(fake_trainer(), module, None, None, 0)
    assert set(module.logged) == {f"temperature/{k}" for k in keys}
    assert module.logged["temperature/scale"] == pytest.approx(float(loss.logit_scale.detach()))
    if "bias" in keys:
        assert module.logged["temperature/bias"] == -10.0


# -- variance ------------------------------------------------------------------------------------------
def test_spearman_and_bins_hand_computed():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])
    assert float(spearman(x, torch.tensor([1, 3, 2, 4, -1]))) == pytest.approx(1.0)   # -1 ignored
    assert float(spearman(x, torch.tensor([4, 2, 3, 1, 5]))) == pytest.approx(-0.9)
    assert spearman(x, torch.tensor([2, 2, 2, 2, 2])) is None                        # constant: undefined
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    ranks = torch.tensor([1, 1, 3, 2, 1, 1])
    # 3 bins of 2 by value: {1.0, 2.0} -> ranks 1, 2; {3.0, 4.0} -> 1, 3; {5.0, 6.0} -> 1, 1
    got = recall_at_1_by_bin(values, ranks, bins=3)
    assert {k: float(v) for k, v in got.items()} == {1: 0.5, 2: 0.5, 3: 1.0}


def test_variance_callback_for_variance_family_only():
    items, image, text = world(n_images=10, caps=2)
    n = len(items)
    spec = torch.tensor([it["specificity"] for it in items]).float()
    # text log-std decreasing with specificity (vaguer -> larger), image log-std = object count
    ln_std = (torch.tensor([float(items[i]["num_objects"]) for i in range(n)]), -spec + 0.01 * torch.arange(n))
    module = FakeModule(VarianceLoss())
    cbs = [VarianceCallback(), RetrievalCallback()]  # order must not matter
    run_validation(cbs, module, items, image, text, ln_std=ln_std)
    logged = module.logged
    assert logged["variance/text/spearman_specificity"] < -0.9
    assert logged["variance/image/spearman_num_objects"] == pytest.approx(1.0)
    text_ln = ln_std[1]
    assert logged["variance/text/mean"] == pytest.approx(float(text_ln.mean()))
    assert logged["variance/text/std"] == pytest.approx(float(text_ln.std(unbiased=False)))
    assert {f"variance/text/R@1_decile_{d}" for d in range(1, 11)} <= set(logged)
    assert "variance/image/R@1_decile_10" in logged          # 10 images: one per decile
    # decile R@1 agrees with the retrieval callback's overall R@1
    mean_decile = np.mean([logged[f"variance/text/R@1_decile_{d}"] for d in range(1, 11)])
    assert mean_decile == pytest.approx(logged["val/t2i/R@1"])

    plain = FakeModule(InfoNCELoss())
    run_validation([VarianceCallback(), RetrievalCallback()], plain, items, image, text)
    assert not any(k.startswith("variance/") for k in plain.logged)


def test_variance_callback_needs_retrieval():
    with pytest.raises(RuntimeError, match="RetrievalCallback"):
        VarianceCallback().on_validation_epoch_end(fake_trainer([]), FakeModule(VarianceLoss()))


# -- results -------------------------------------------------------------------------------------------
def test_results_writes_flat_json_atomically(tmp_path):
    module = FakeModule(InfoNCELoss())
    metrics = {"val/t2i/R@1": torch.tensor(0.25), "train/loss": torch.tensor(float("nan"))}
    trainer = fake_trainer(default_root_dir=str(tmp_path), callback_metrics=metrics)
    cb = ResultsCallback()
    cb.setup(trainer, module, "fit")
    cb.on_validation_end(trainer, module)
    data = json.loads((tmp_path / "final_metrics.json").read_text())
    assert data["val/t2i/R@1"] == 0.25 and data["train/loss"] is None
    assert data["step"] == 3 and data["epoch"] == 1 and data["loss_family"] == "infonce"
    assert data["wall_time_s"] >= 0
    assert os.listdir(tmp_path) == ["final_metrics.json"]        # no temporary file left behind
    # a sanity-check validation leaves the file alone
    trainer.callback_metrics = {"val/t2i/R@1": torch.tensor(0.5)}
    trainer.sanity_checking = True
    cb.on_validation_end(trainer, module)
    assert json.loads((tmp_path / "final_metrics.json").read_text())["val/t2i/R@1"] == 0.25


def test_flatten_hparams():
    flat = flatten_hparams({"loss": "infonce", "loss_args": {"mode": "x", "k": [1, 2]}, "betas": (0.9, 0.98),
                            "text_model": None, "lr": 1e-3})
    assert flat == {"loss": "infonce", "loss_args/mode": "x", "loss_args/k": "[1, 2]", "betas": "(0.9, 0.98)",
                    "text_model": "None", "lr": 1e-3}


# -- tiny real fits, events read back with TensorBoard's reader ---------------------------------------------
class TinyClip(L.LightningModule):
    """Linear 'towers' over fixed features: enough to drive every callback hook through a real Trainer."""

    def __init__(self, variance: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.loss = VarianceLoss() if variance else InfoNCELoss()
        self.image_head, self.text_head = nn.Linear(8, 8), nn.Linear(8, 8)
        self.var = nn.Linear(8, 2) if variance else None

    def forward(self, batch):
        emb = Embeddings(self.image_head(batch["image"]), self.text_head(batch["text"]))
        if self.var is not None:
            emb.image_ln_std = self.var(batch["image"])[:, 0]
            emb.text_ln_std = self.var(batch["text"])[:, 1]
        return emb

    def training_step(self, batch, batch_idx):
        out = self.loss(self(batch))
        self.log("train/loss", out.loss, batch_size=batch["image"].shape[0])
        return out.loss

    def validation_step(self, batch, batch_idx):
        emb = self(batch)
        out = self.loss(emb)
        self.log("val/loss", out.loss, batch_size=emb.batch_size)
        return {"loss": out.loss, "emb": emb.detach(), "meta": batch["meta"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_batches(batch=6):
    items, image, text = world(n_images=8, caps=3)
    return [{"image": image[s:s + batch], "text": text[s:s + batch], "meta": meta_of(items[s:s + batch])}
            for s in range(0, len(items), batch)]


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()
    content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    hparams = None
    if content is not None:
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        hparams = {k: v.string_value or v.number_value for k, v in info.hparams.items()}
    return acc, set(tags["scalars"]), set(tags["histograms"]), hparams


def fit_tiny(tmp_path, variance):
    from lightning.pytorch.loggers import TensorBoardLogger

    data = tiny_batches()
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, logger=logger, callbacks=default_callbacks(),
                        accelerator="cpu", devices=1, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(TinyClip(variance), loader, loader)
    return logger.log_dir


@pytest.mark.parametrize("variance", [False, True])
def test_tiny_fit_writes_tags_json_and_hparams(tmp_path, variance):
    log_dir = fit_tiny(tmp_path, variance)
    acc, scalars, histograms, hparams = read_events(log_dir)
    expected = {f"val/{d}/R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    expected |= {"val/i2t/median_rank", "val/t2i/mean_rank", "val/semantic/t2i/R@1", "val/semantic/i2t/R@10",
                 "val/ceiling/t2i/R@1", "val/ceiling/i2t/R@1", "temperature/scale", "temperature/log_scale", "train/loss", "val/loss"}
    assert expected <= scalars, expected - scalars
    assert "temperature/bias" not in scalars                 # InfoNCE has no bias
    assert len(acc.Scalars("val/t2i/R@1")) == 2               # two validations, the sanity check not logged
    assert len(acc.Scalars("temperature/scale")) == 4         # every training step
    variance_tags = {t for t in scalars | histograms if t.startswith("variance/")}
    if variance:
        assert {"variance/text/ln_std", "variance/image/ln_std"} <= histograms
        assert {"variance/text/mean", "variance/text/std", "variance/text/spearman_specificity",
                "variance/image/spearman_num_objects", "variance/text/R@1_decile_1",
                "variance/image/R@1_decile_1"} <= scalars
    else:
        assert variance_tags == set()
    final = json.loads(open(os.path.join(log_dir, "final_metrics.json")).read())
    assert final["val/t2i/R@1"] == pytest.approx(acc.Scalars("val/t2i/R@1")[-1].value)
    assert 0 < final["val/ceiling/t2i/R@1"] <= 1 and 0 < final["val/ceiling/i2t/R@1"] <= 1
    assert final["loss_family"] == ("fake_variance" if variance else "infonce")
    assert final["step"] == 4
    assert final["temperature/scale"] == pytest.approx(acc.Scalars("temperature/scale")[-1].value)
    assert (final.get("variance/text/spearman_specificity") is not None) == variance
    assert hparams is not None and hparams["loss"] == final["loss_family"]
    (fit,) = json.loads(open(os.path.join(log_dir, "environment.json")).read())["fits"]  # one fit, from step 0
    assert fit["start_step"] == 0 and fit["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


# -- every registered family through the callbacks ----------------------------------------------------------
#: the families the slow fit below drives end to end: plain, variance heads, variance with a and b as scale
#: and bias, token-wise similarity. A renamed or dropped family fails here instead of skipping the fit.
FIT_FAMILIES = ("infonce", "probabilistic", "pcmepp", "filip")


def test_the_families_of_the_fit_test_are_registered():
    from lightning_clip.losses import LOSSES

    missing = set(FIT_FAMILIES) - set(LOSSES)
    assert not missing, f"families the callback fit covers are not registered: {missing} (registered: {sorted(LOSSES)})"


def test_every_registered_family_gets_its_temperature_and_variance_logged():
    from lightning_clip.losses import LOSSES, build_loss

    assert len(LOSSES) >= 10  # the ablation's families, not an empty registry
    for name in sorted(LOSSES):
        loss = build_loss(name)
        module = FakeModule(loss)
        TemperatureCallback().on_train_batch_end(fake_trainer(), module, None, None, 0)
        values = loss.scalars()
        want = {f"temperature/{k}": float(values[k]) for k in ("scale", "log_scale", "bias") if k in values}
        assert module.logged == pytest.approx(want), name
        # the variance callback is on exactly for the families with variance heads
        assert VarianceCallback.applies_to(module) == bool({"image_ln_std", "text_ln_std"} & loss.needs), name


@pytest.mark.slow
@pytest.mark.parametrize("loss", FIT_FAMILIES)
def test_clip_module_fit_logs_callback_tags(tmp_path, loss, monkeypatch):
    from lightning_clip import cli
    from lightning_clip.data.synthetic import generate
    from lightning_clip.losses import build_loss

    family = build_loss(loss)  # an unknown name is an error here, not a skip
    shards = generate(tmp_path / "data", num_train=64, num_val=16, image_size=32, num_captions=2)
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["lightning-clip"])  # LightningCLI warns when pytest's argv is also there
    cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml",
              f"--run_dir={run}", f"--model.loss={loss}", "--trainer.max_steps=2", "--trainer.limit_train_batches=2",
              "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu",
              "--trainer.log_every_n_steps=1",
              f"--data.train_shards={shards / 'train'}", f"--data.val_shards={shards / 'val'}",
              "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0",
              "--model.image_model=test_vit", "--model.image_model_args={patch_size: 8}"])
    _, scalars, histograms, hparams = read_events(run)
    assert {"val/i2t/R@1", "val/t2i/R@5", "val/semantic/t2i/R@1"} <= scalars
    # families without a learned scale (probabilistic: the variance sets the sharpness) log none; pcmepp
    # logs its a and b as scale and bias
    assert ("temperature/scale" in scalars) == ("scale" in family.scalars())
    has_variance = any(t.startswith("variance/") for t in scalars | histograms)
    assert has_variance == bool({"image_ln_std", "text_ln_std"} & family.needs)
    if has_variance:
        assert "variance/text/spearman_specificity" in scalars and "variance/text/ln_std" in histograms
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["loss_family"] == loss and "val/t2i/R@1" in final
    assert hparams["loss"] == loss


# -- distributed: two gloo processes see disjoint halves (plus padding repeats) and agree with one process ---
def _ddp_worker(rank, world, port, items, image, text, queue, sync_dir):
    import torch.distributed as dist

    from _gloo import leave_together

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank 0 takes the first 11 items, rank 1 the rest plus the first two again (DistributedSampler-style
        # padding): uneven sizes, duplicates across ranks
        idx = list(range(11)) if rank == 0 else list(range(11, len(items))) + [0, 1]
        module = FakeModule(VarianceLoss())
        run_validation([RetrievalCallback(), VarianceCallback()], module, [items[i] for i in idx], image[idx],
                       text[idx], ln_std=(image[idx, 0], text[idx, 0]), batch=4)
        queue.put((rank, module.logged))
        queue.close()
        queue.join_thread()  # the result is in the pipe before this process may leave without finalising
    finally:
        dist.destroy_process_group()
    leave_together(sync_dir, rank, world)


@pytest.mark.slow  # ~10 s: two spawned interpreters importing torch
@pytest.mark.distributed
def test_two_ranks_gather_and_deduplicate(tmp_path):
    import socket

    import torch.multiprocessing as mp

    items, image, text = world(n_images=8, caps=3)
    single = FakeModule(VarianceLoss())
    run_validation([RetrievalCallback(), VarianceCallback()], single, items, image, text,
                   ln_std=(image[:, 0], text[:, 0]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, items, image, text, queue, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert "val/semantic/t2i/R@1" in single.logged and "variance/text/spearman_specificity" in single.logged
    for rank in (0, 1):
        assert results[rank].keys() == single.logged.keys()
        for k, v in single.logged.items():
            assert results[rank][k] == pytest.approx(v, abs=1e-6), (rank, k)
