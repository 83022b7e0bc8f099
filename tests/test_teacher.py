"""soft_targets with targets="teacher": the formula (brute force), equality with "self" when the teacher
is the student, no gradient into the teacher, two gloo ranks equal one process; and ClipModule's frozen
teacher (model.teacher): loaded from a Lightning run folder, frozen, unchanged by the student's steps,
absent from its optimizer, state dict and checkpoint; and the clear errors."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from _gloo import leave_together
from _data_helpers import small_dm
from lightning_clip.data import synthetic as syn
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.soft_targets import soft_targets_terms
from lightning_clip.module import ClipModule
from lightning_clip.outputs import Embeddings

TINY = dict(embed_dim=16, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
            image_size=32, warmup_steps=1)
TEACHER_LOSS = dict(loss="soft_targets", loss_args={"mode": "fixed", "targets": "teacher"})


def features(n=6, d=5, dt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(n, d), r(n, d), r(n, dt), r(n, dt)


def brute(image, text, t_image, t_text, scale) -> float:
    """The loss written out: logits s I_i.T_j, targets softmax of M = s (It It^T + Tt Tt^T) / 2 (rows for
    the images, columns for the captions), every vector normalised."""
    unit = lambda x: [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x.tolist()]  # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    i, t, ti, tt = unit(image), unit(text), unit(t_image), unit(t_text)
    n = len(i)
    logit = [[scale * dot(i[a], t[b]) for b in range(n)] for a in range(n)]
    m = [[scale * (dot(ti[a], ti[b]) + dot(tt[a], tt[b])) / 2 for b in range(n)] for a in range(n)]

    def soft_ce(pred, target):  # -(softmax(target) * log_softmax(pred)).sum()
        zp, zt = math.log(sum(math.exp(v) for v in pred)), math.log(sum(math.exp(v) for v in target))
        return -sum(math.exp(q - zt) * (p - zp) for p, q in zip(pred, target))

    col = lambda x, b: [x[a][b] for a in range(n)]  # noqa: E731
    i2t = sum(soft_ce(logit[a], m[a]) for a in range(n)) / n
    t2i = sum(soft_ce(col(logit, b), col(m, b)) for b in range(n)) / n
    return (i2t + t2i) / 2


# -- the pure function ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_teacher_targets_equal_the_brute_force_formula(scale):
    image, text, t_image, t_text = features()  # the teacher is 3 wide, the student 5
    got = LF.soft_targets(F.normalize(image, dim=-1), F.normalize(text, dim=-1), 1 / scale, mode="fixed",
                          target_image=F.normalize(t_image, dim=-1), target_text=F.normalize(t_text, dim=-1))
    assert got.item() == pytest.approx(brute(image, text, t_image, t_text, scale), rel=1e-10)
    # and the module: it normalises both the student's and the teacher's features itself
    loss = build_loss("soft_targets", mode="fixed", targets="teacher", init_scale=scale).double()
    out = loss(Embeddings(image, text, teacher_image=t_image, teacher_text=t_text))
    scale = 1 / float(1.0 / loss.logit_scale.detach())  # the module's temperature is a float32 value
    assert out.loss.item() == pytest.approx(brute(image, text, t_image, t_text, scale), rel=1e-10)
    assert set(out.terms) == {"i2t", "t2i"}


def test_a_teacher_equal_to_the_student_is_targets_self_exactly():
    image, text, _, _ = features(seed=1)
    emb = Embeddings(image, text, teacher_image=image.clone(), teacher_text=text.clone())
    own = build_loss("soft_targets", mode="fixed").double()(emb)
    taught = build_loss("soft_targets", mode="fixed", targets="teacher").double()(emb)
    assert torch.equal(taught.loss, own.loss)
    for k in own.terms:
        assert torch.equal(taught.terms[k], own.terms[k])


def test_no_gradient_reaches_the_teacher_and_the_student_gradient_is_self_s():
    image, text, _, _ = features(seed=2)
    leaves = [x.clone().requires_grad_() for x in (image, text, image, text)]
    LF.soft_targets(*(F.normalize(x, dim=-1) for x in leaves[:2]), 0.1, mode="fixed",
                    target_image=F.normalize(leaves[2], dim=-1), target_text=F.normalize(leaves[3], dim=-1)).backward()
    assert leaves[2].grad is None and leaves[3].grad is None
    own = [x.clone().requires_grad_() for x in (image, text)]
    LF.soft_targets(*(F.normalize(x, dim=-1) for x in own), 0.1, mode="fixed").backward()
    assert torch.allclose(leaves[0].grad, own[0].grad, rtol=1e-12, atol=0)
    assert torch.allclose(leaves[1].grad, own[1].grad, rtol=1e-12, atol=0)


def test_pure_function_refuses_half_a_teacher_other_rows_and_the_tutorial_mode():
    image, text, t_image, t_text = features()
    with pytest.raises(ValueError, match="target_image and target_text go together"):
        soft_targets_terms(image, text, 1.0, mode="fixed", target_image=t_image)
    with pytest.raises(ValueError, match="teacher features have 5 rows, the batch 6"):
        soft_targets_terms(image, text, 1.0, mode="fixed", target_image=t_image[:5], target_text=t_text[:5])
    with pytest.raises(ValueError, match=r"targets 'teacher' \(option model\.loss_args\.targets\) needs mode 'fixed'"):
        soft_targets_terms(image, text, 1.0, mode="tutorial", target_image=t_image, target_text=t_text)


def test_loss_options_and_missing_teacher_features_name_what_to_set():
    with pytest.raises(ValueError, match=r"soft_targets: unknown targets 'pretrained' \(option model\.loss_args\.targets\)"):
        build_loss("soft_targets", mode="fixed", targets="pretrained")
    with pytest.raises(ValueError, match=r"needs mode 'fixed' \(option model\.loss_args\.mode\), got mode 'tutorial'"):
        build_loss("soft_targets", targets="teacher")
    assert build_loss("soft_targets", mode="fixed").needs == frozenset()
    loss = build_loss("soft_targets", mode="fixed", targets="teacher")
    assert loss.needs == frozenset({"teacher"})
    image, text, _, _ = features()
    with pytest.raises(ValueError, match="model.teacher"):
        loss(Embeddings(image.float(), text.float()))


# -- two gloo ranks ---------------------------------------------------------------------------------------
def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = slice(rank * 4, rank * 4 + 4)
        image, text, t_image, t_text = (x[rows] for x in features(n=8, seed=3))
        leaves = [image.requires_grad_(), text.requires_grad_()]
        terms = soft_targets_terms(*leaves, 0.2, mode="fixed", normalize_inputs=True, gathered=True,
                                   target_image=t_image, target_text=t_text)
        loss = (terms["i2t"] + terms["t2i"]) / 2
        loss.backward()  # the gather's backward sums every rank's gradient into this rank's rows
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in leaves]}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_together(out_dir, rank, 2)


def test_two_ranks_with_a_teacher_equal_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: a spawned rank re-imports this file (Lightning included), 20 s a rank on 2 busy cores
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    image, text, t_image, t_text = features(n=8, seed=3)
    leaves = [image.requires_grad_(), text.requires_grad_()]
    terms = soft_targets_terms(*leaves, 0.2, mode="fixed", normalize_inputs=True, target_image=t_image,
                               target_text=t_text)
    single = (terms["i2t"] + terms["t2i"]) / 2
    single.backward()
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(single.item(), rel=1e-10)
    for k in range(2):  # DDP would average over the 2 ranks: rank r's rows of the single-process gradient
        got = torch.cat([r["grads"][k] for r in ranks]) / 2
        assert torch.allclose(got, leaves[k].grad, rtol=1e-9, atol=1e-12)


# -- ClipModule's frozen teacher --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("world"), num_train=24, num_val=4, num_test=0, seed=1, image_size=32)


def _fit(model, dm, root: Path, steps: int) -> Path:
    """A few Lightning steps, saving RUN/checkpoints/last.ckpt as the CLI does; returns RUN."""
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt], default_root_dir=root, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    return root


@pytest.fixture(scope="module")
def teacher_run(world, tmp_path_factory) -> tuple[Path, object]:
    dm = small_dm(world, batch_size=4, epoch_length=8, image_size=32)
    teacher = ClipModule(**{**TINY, "embed_dim": 12}, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
    return _fit(teacher, dm, tmp_path_factory.mktemp("teacher"), 2), dm


def _student(dm, teacher, **kw):
    return ClipModule(**{**TINY, **TEACHER_LOSS, "vocab_size": dm.vocab_size, "pad_token_id": dm.pad_token_id,
                         "teacher": str(teacher), **kw})


def test_the_teacher_is_frozen_fills_its_fields_and_stays_out_of_optimizer_and_state(teacher_run):
    run, dm = teacher_run
    student = _student(dm, run)  # a run folder: its checkpoints/last.ckpt
    teacher = student._teacher.module
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.hparams.embed_dim == 12  # its own hyperparameters, from the checkpoint
    plain = ClipModule(**{**TINY, "loss": "soft_targets", "loss_args": {"mode": "fixed"},
                          "vocab_size": dm.vocab_size, "pad_token_id": dm.pad_token_id})
    assert set(student.state_dict()) == set(plain.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    opt = student.build_optimizer()
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    student.train()
    assert not teacher.training  # train() of the student does not reach it
    batch = next(iter(dm.train_dataloader()))
    emb = student(batch)
    assert emb.teacher_image.shape == (4, 12) and emb.teacher_text.shape == (4, 12)
    assert not emb.teacher_image.requires_grad and not emb.teacher_text.requires_grad
    # the teacher's own embeddings of these rows (open_clip's interface), not the student's
    assert torch.allclose(emb.teacher_image, teacher.encode_image(batch["image"]), atol=1e-6)
    assert torch.allclose(emb.teacher_text, teacher.encode_text(batch["input_ids"], batch["attention_mask"]), atol=1e-6)
    student._compute_loss(emb).loss.backward()
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())


def test_a_student_trained_with_lightning_saves_no_teacher_and_reloads_it(teacher_run, tmp_path):
    run, dm = teacher_run
    ckpt = run / "checkpoints" / "last.ckpt"
    student = _student(dm, ckpt)  # a .ckpt file
    teacher = student._teacher.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _fit(student, dm, tmp_path / "student", 2)
    assert not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    saved = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(saved["state_dict"]) == set(student.state_dict())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in saved["state_dict"])
    assert saved["hyper_parameters"]["teacher"] == str(ckpt)  # only its path: loading loads it again
    again = ClipModule.load_from_checkpoint(str(tmp_path / "student" / "checkpoints" / "last.ckpt"),
                                            map_location="cpu").eval()
    batch = next(iter(dm.val_dataloader()))
    student.eval()
    assert torch.allclose(again(batch).teacher_image, student(batch).teacher_image)


def test_clear_errors_name_model_teacher_and_the_path(teacher_run, tmp_path):
    run, dm = teacher_run
    with pytest.raises(ValueError, match="takes its targets from a frozen teacher; set model.teacher"):
        ClipModule(**{**TINY, **TEACHER_LOSS, "vocab_size": dm.vocab_size})
    with pytest.raises(ValueError, match="model.teacher='x'.*'infonce'.*uses no teacher"):
        ClipModule(**TINY, vocab_size=dm.vocab_size, teacher="x")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"model.teacher={missing} does not exist"):
        _student(dm, missing)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"model.teacher=.*empty: no checkpoint in .*checkpoints"):
        _student(dm, tmp_path / "empty")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"model.teacher={bad}: {bad} is not a readable ClipModule checkpoint"):
        _student(dm, bad)
    with pytest.raises(ValueError, match=f"model.teacher={run}: the teacher's vocab_size is {dm.vocab_size}, "
                                         f"this model's {dm.vocab_size + 1}; its token ids"):
        _student(dm, run, vocab_size=dm.vocab_size + 1)
    with pytest.raises(ValueError, match="the teacher's image_size is 32, this model's 48"):
        _student(dm, run, image_size=48)


def test_gradcache_carries_the_teacher_features_without_gradient(teacher_run):
    run, dm = teacher_run
    student = _student(dm, run, negatives_from=2)
    it = iter(dm.train_dataloader())
    cached = [(next(it), student._rng_state()) for _ in range(2)]
    out, n = student.gradcache_backward(cached)
    assert n == 8 and torch.isfinite(out.loss)
    assert all(p.grad is None for p in student._teacher.module.parameters())
    assert student.image_head.proj.weight.grad.abs().sum() > 0  # the student's replayed backward ran
