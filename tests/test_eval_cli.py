"""`python -m lightning_clip eval` on a run trained through the CLI: every measure in eval.json (CLIP_benchmark's
record layout) and TensorBoard, the held-out test split, the open_clip interface, and CLIP_benchmark's own
zero-shot evaluator agreeing with ours on the same model and data."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_clip import cli
from lightning_clip.data.synthetic import generate
from lightning_clip.eval import world_tasks
from lightning_clip.eval.records import TABLE_KEYS, flatten

TASKS = {"zeroshot_retrieval", "embedding_geometry", "zeroshot_classification", "linear_probe"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    world = generate(tmp_path_factory.mktemp("world"), num_train=96, num_val=24, num_test=12, image_size=32,
                     num_captions=2)
    run = tmp_path_factory.mktemp("runs") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml", f"--run_dir={run}",
                  "--trainer.max_steps=6", "--trainer.val_check_interval=6", "--trainer.limit_val_batches=1.0",
                  f"--data.train_shards={world / 'train'}", f"--data.val_shards={world / 'val'}",
                  "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0"])
    return run


def _eval(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(["eval", *args])


def test_eval_writes_every_measure_as_records_and_scalars(run):
    out = _eval(f"--ckpt_path={run / 'checkpoints'}", "--probe_images=64")
    assert out == run / "eval.json"
    records = json.loads(out.read_text())
    for r in records:  # CLIP_benchmark's result layout
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert r["pretrained"].endswith(".ckpt") and all(isinstance(v, float) for v in r["metrics"].values())
    assert {r["task"] for r in records} == TASKS  # infonce has no variance heads: no calibration record
    per_attribute = {r["dataset"].rsplit("/", 1)[-1] for r in records if r["task"] == "zeroshot_classification"}
    assert per_attribute == set(world_tasks.TASKS)
    flat = flatten(records)
    assert set(TABLE_KEYS) <= set(flat)
    retrieval = next(r["metrics"] for r in records if r["task"] == "zeroshot_retrieval")
    assert {"image_retrieval_recall@1", "text_retrieval_recall@5", "ceiling_t2i_R@1", "bayes_t2i_R@1",
            "bayes_i2t_R@1"} <= set(retrieval)
    assert any(k.startswith("t2i_R@1_specificity_") for k in retrieval)
    # the validation callback ranked the same model on the same data: the same recall
    final = json.loads((run / "final_metrics.json").read_text())
    assert retrieval["image_retrieval_recall@1"] == pytest.approx(final["val/t2i/R@1"], abs=1e-6)
    assert retrieval["text_retrieval_recall@1"] == pytest.approx(final["val/i2t/R@1"], abs=1e-6)
    for d in ("t2i", "i2t"):  # the same data: the same ceilings
        assert retrieval[f"bayes_{d}_R@1"] == pytest.approx(final[f"val/bayes/{d}/R@1"], abs=1e-6)
        assert retrieval[f"ceiling_{d}_R@1"] == pytest.approx(final[f"val/ceiling/{d}/R@1"], abs=1e-6)
    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert set(TABLE_KEYS) <= tags


def test_eval_on_the_held_out_test_split(run):
    out = _eval(f"--ckpt_path={run}", "--split=test", "--probe_images=0", "--tensorboard=false")
    records = json.loads(out.read_text())
    assert out.name == "eval_test.json"
    assert all(r["dataset"].split("/")[1] == "test" for r in records)  # <world>/test[/<attribute>]
    assert "linear_probe" not in {r["task"] for r in records}  # --probe_images=0
    retrieval = next(r["metrics"] for r in records if r["task"] == "zeroshot_retrieval")
    assert all(0 < retrieval[f"bayes_{d}_R@1"] <= 1 for d in ("t2i", "i2t"))  # the test split's own ceiling


def test_missing_checkpoint_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _eval(f"--ckpt_path={tmp_path}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        _eval(f"--ckpt_path={tmp_path}")


def _module_and_data(run):
    import yaml

    from lightning_clip.data import ClipDataModule
    from lightning_clip.module import ClipModule

    cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    dm = ClipDataModule(**{**cfg, "num_workers": 0})
    dm.setup("validate")
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    return ClipModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval(), dm


def test_open_clip_interface_gives_unit_vectors_and_derives_the_mask(run):
    module, dm = _module_and_data(run)
    batch = next(iter(dm.val_dataloader()))
    img = module.encode_image(batch["image"])
    txt = module.encode_text(batch["input_ids"])  # no mask: padding ids are the padding
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
    assert torch.allclose(txt, module.encode_text(batch["input_ids"], batch["attention_mask"]), atol=1e-6)
    emb = module(batch)  # the same vectors the training forward projects
    assert torch.allclose(txt, torch.nn.functional.normalize(emb.text, dim=-1), atol=1e-5)


def test_clip_benchmark_zero_shot_agrees_with_ours(run, monkeypatch):
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                              reason="clip-benchmark is in the `eval` extra (make install adds it)")
    from lightning_clip.eval.embed import embed_split
    from lightning_clip.eval.zeroshot import evaluate_zero_shot

    module, dm = _module_and_data(run)
    split = embed_split(module, dm.val_dataloader())
    task = world_tasks.TASKS["color"]
    labels = [world_tasks.label("color", s) for s in split.scenes]
    # the labelled images, as tensors, in the embedding order
    images = {}
    for batch in dm.val_dataloader():
        for x, i in zip(batch["image"], batch["meta"]["image_id"].tolist()):
            images.setdefault(i, x)
    keep = [k for k, y in enumerate(labels) if y is not None]
    assert len(keep) >= 4
    xs = torch.stack([images[int(split.image_ids[k])] for k in keep])
    ys = torch.tensor([labels[k] for k in keep])
    class Labelled(torch.utils.data.Dataset):  # CLIP_benchmark reads `dataset.classes`
        classes = list(task.classnames)

        def __len__(self):
            return len(ys)

        def __getitem__(self, i):
            return xs[i], ys[i]

    loader = torch.utils.data.DataLoader(Labelled(), batch_size=5)

    def tokenizer(texts):
        return dm.tokenizer(texts, padding="max_length", truncation=True, max_length=dm.max_length,
                            return_tensors="pt")["input_ids"]

    def embed_text(prompts):
        with torch.no_grad():
            return module.encode_text(tokenizer(prompts))

    def topk_accuracy(output, target, topk=(1,)):
        # clip-benchmark 1.6's own `accuracy` calls float() on a 1-element array, which numpy 2.x refuses;
        # the same formula, read with .item()
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zsc, "accuracy", topk_accuracy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # CLIP_benchmark names the template slot {c}
        theirs = zsc.evaluate(module, loader, tokenizer, task.classnames, [t.replace("{}", "{c}") for t in task.templates],
                              "cpu", amp=False)
    ours = evaluate_zero_shot(split.image_unit[keep], ys, embed_text, task.classnames, task.templates)
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=1e-6)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class"], abs=1e-6)
