"""The global contrastive loss (gcl: SogCLR / FastCLIP) and hyperbolic MERU: brute-force loops, gradients,
closed forms, stability at the edges, clear errors, gcl's per-item states (growth, checkpoint, resume, two
DDP ranks over several steps equal to one process) and MERU's geometry logging. The checks every family
gets from `_loss_helpers.CASES` (MERU is there) run in test_losses.py and test_loss_distributed.py."""
from __future__ import annotations

import math
import os
import socket
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from _gloo import leave_together
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.dedup import item_ids
from lightning_clip.losses.gcl import ItemStates
from lightning_clip.outputs import Embeddings


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1))


# -- gcl: brute force ----------------------------------------------------------------------------------------
def brute_gcl(image, text, s, u_image, u_text, gamma, rho, temperature_term, eps=1e-14):
    """The issue's formulas with Python floats; returns (loss, u_image', u_text')."""
    img, txt, n = image.tolist(), text.tolist(), len(image)
    sim = [[sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]
    g_i = [sum(math.exp(s * (sim[i][j] - sim[i][i])) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    g_t = [sum(math.exp(s * (sim[j][i] - sim[i][i])) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    new = lambda u, g: [gi if ui == 0 else (1 - gamma) * ui + gamma * gi for ui, gi in zip(u, g)]  # noqa: E731
    ui, ut = new(u_image.tolist(), g_i), new(u_text.tolist(), g_t)
    a = sum(g_i[i] / (ui[i] + eps) + g_t[i] / (ut[i] + eps) for i in range(n)) / n
    if not temperature_term:
        return a, ui, ut
    log_term = sum(math.log(ui[i]) + math.log(ut[i]) for i in range(n)) / n
    return a / s + rho / s + log_term / (2 * s), ui, ut


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("temperature_term", [True, False])
@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_gcl_equals_brute_force(n, temperature_term, gamma):
    image, text = unit(n, 4, seed=n)
    u_image = torch.tensor([0.0, 2.5, 0.7, 0.0, 11.0][:n], dtype=torch.float64)
    u_text = torch.tensor([1.3, 0.0, 0.2, 4.0, 0.0][:n], dtype=torch.float64)
    loss, ui, ut = LF.gcl(image, text, 7.0, u_image, u_text, gamma=gamma, rho=3.0, temperature_term=temperature_term)
    want, want_i, want_t = brute_gcl(image, text, 7.0, u_image, u_text, gamma, 3.0, temperature_term)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert ui.tolist() == pytest.approx(want_i, rel=1e-10) and ut.tolist() == pytest.approx(want_t, rel=1e-10)
    assert not ui.requires_grad and ui.dtype == torch.float64


def test_gcl_gradient_is_the_gradient_with_frozen_states_and_scale():
    """The value's derivative includes the states' dependence on the features, the gradient must not: it is
    the derivative of a reference in which u' and sg(s) are constants (checked by gradcheck itself)."""
    image, text = unit(4, 3, seed=1)
    ls = torch.tensor(1.2, dtype=torch.float64)
    u_image = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    u_text = torch.tensor([1.5, 0.3, 0.0, 0.8], dtype=torch.float64)
    _, ui, ut = LF.gcl(image, text, ls.exp(), u_image, u_text, gamma=0.6, rho=2.0)
    s0 = float(ls.exp())

    def reference(i, t, log_s):
        s = log_s.exp()
        z = i @ t.T
        off = ~torch.eye(4, dtype=torch.bool)
        g_i = (torch.exp(s * (z - z.diag()[:, None])) * off).sum(1) / 3
        g_t = (torch.exp(s * (z.T - z.diag()[:, None])) * off).sum(1) / 3
        a = (g_i / (ui + 1e-14) + g_t / (ut + 1e-14)).mean()
        return a / s0 + 2.0 / s + (ui.log() + ut.log()).mean() / (2 * s)

    inputs = [x.clone().requires_grad_() for x in (image, text, ls)]
    assert torch.autograd.gradcheck(reference, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    want = torch.autograd.grad(reference(*inputs), inputs)
    got = torch.autograd.grad(LF.gcl(inputs[0], inputs[1], inputs[2].exp(), u_image, u_text, gamma=0.6,
                                     rho=2.0)[0], inputs)
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 16])
def test_gcl_gamma_one_from_zero_states_gives_a_equal_two(n):
    image, text = unit(n, 8, seed=n)
    zeros = torch.zeros(n, dtype=torch.float64)
    loss, ui, ut = LF.gcl(image, text, 2.0, zeros, zeros, gamma=1.0, temperature_term=False)
    assert loss.item() == pytest.approx(2.0, rel=1e-10)
    # and the states are then g itself: a second step from them, at gamma = 1, is again 2
    assert LF.gcl(image, text, 2.0, ui, ut, gamma=1.0, temperature_term=False)[0].item() == pytest.approx(2.0, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["near_identical", "opposite", "equal"])
def test_gcl_stable_at_scale_100_and_zero_states(dtype, layout):
    image, text = unit(8, 16, seed=3, dtype=torch.float32)
    if layout == "near_identical":
        text = F.normalize(image + 1e-3 * text, dim=-1)
    elif layout == "opposite":  # every negative far ahead of its positive: exp(100 * 2) overflows float32
        text = -image.roll(1, 0)
    else:
        text = image = image[:1].expand(8, 16).contiguous()
    image, text = image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()
    ls = torch.tensor(math.log(100.0), requires_grad=True)
    zeros = torch.zeros(8)
    loss, ui, ut = LF.gcl(image, text, ls.exp(), zeros, zeros)
    loss2, _, _ = LF.gcl(image, text, ls.exp(), ui, ut)
    assert torch.isfinite(loss) and torch.isfinite(loss2) and loss.dtype == torch.float32
    assert (ui > 0).all() and torch.isfinite(ui).all() and (ut > 0).all()
    for grad in torch.autograd.grad(loss + loss2, (image, text, ls)):
        assert torch.isfinite(grad).all()


def test_gcl_errors_are_clear():
    image, text = unit(4, 3, seed=0)
    zeros = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        LF.gcl(image[:1], text[:1], 2.0, zeros[:1], zeros[:1])
    with pytest.raises(ValueError, match="same shape"):
        LF.gcl(image, text[:3], 2.0, zeros, zeros)
    with pytest.raises(ValueError, match=r"u_text must have shape \[N\] = \[4\]"):
        LF.gcl(image, text, 2.0, zeros, zeros[:3])
    with pytest.raises(ValueError, match="NaN"):
        LF.gcl(image, text, 2.0, zeros, torch.full((4,), float("nan")))
    with pytest.raises(ValueError, match=r"gamma \(option model.loss_args.gamma\)"):
        build_loss("gcl", gamma=1.5)
    with pytest.raises(ValueError, match="unknown gamma_schedule 'linear'"):
        build_loss("gcl", gamma_schedule="linear")
    with pytest.raises(ValueError, match="needs image_ids and text_ids"):
        build_loss("gcl")(Embeddings(image, text))


# -- gcl: the module's states ------------------------------------------------------------------------------
def emb_with_ids(image, text, image_ids, text_ids):
    return Embeddings(image, text, image_ids=torch.as_tensor(image_ids), text_ids=torch.as_tensor(text_ids))


def test_item_states_grow_look_up_and_keep_the_last_of_repeated_ids():
    table = ItemStates()
    assert table.lookup(torch.tensor([5, 2**52])).tolist() == [0.0, 0.0]
    table.update(torch.tensor([2**52, 7, 3]), torch.tensor([1.0, 2.0, 3.0]))
    table.update(torch.tensor([7, 11, 7]), torch.tensor([4.0, 5.0, 6.0]))
    assert table.ids.tolist() == [3, 7, 11, 2**52]
    assert table.lookup(torch.tensor([7, 2**52, 4, 11])).tolist() == [6.0, 1.0, 0.0, 5.0]
    copy = ItemStates()
    copy.load(table.state())
    assert torch.equal(copy.ids, table.ids) and torch.equal(copy.values, table.values)
    with pytest.raises(ValueError, match="malformed"):
        copy.load({"ids": torch.tensor([3, 3]), "values": torch.tensor([1.0, 2.0])})


def test_gcl_module_keeps_states_per_item_and_only_when_training():
    torch.manual_seed(0)
    module = build_loss("gcl", gamma=0.5).double()
    image, text = unit(4, 6, seed=2)
    out = module(emb_with_ids(image, text, [10, 11, 12, 13], [20, 21, 22, 23]))
    assert float(out.terms["seen"]) == 0.0 and len(module.image_states) == 4 == len(module.text_states)
    _, u_i, u_t = LF.gcl(image, text, module.logit_scale.detach(), torch.zeros(4), torch.zeros(4), gamma=0.5)
    assert torch.allclose(module.image_states.lookup(torch.tensor([10, 11, 12, 13])), u_i, rtol=1e-12)
    # a second batch: two known items, two new; the known ones blend, the new ones start at g
    image2, text2 = unit(4, 6, seed=3)
    out = module(emb_with_ids(image2, text2, [12, 30, 10, 31], [22, 40, 20, 41]))
    assert float(out.terms["seen"]) == 0.5
    _, want_i, _ = LF.gcl(image2, text2, module.logit_scale.detach(), torch.stack([u_i[2], u_i.new_zeros(()), u_i[0],
                                                                                   u_i.new_zeros(())]),
                          torch.zeros(4), gamma=0.5)
    assert torch.allclose(module.image_states.lookup(torch.tensor([12, 30, 10, 31])), want_i, rtol=1e-12)
    assert len(module.image_states) == 6
    before = module.image_states.state()
    module.eval()
    module(emb_with_ids(*unit(4, 6, seed=4), [12, 50, 51, 52], [22, 60, 61, 62]))
    assert torch.equal(module.image_states.state()["values"], before["values"])


def test_gcl_states_and_schedule_survive_a_state_dict_round_trip():
    module = build_loss("gcl", gamma=0.2, gamma_schedule="cosine", gamma_decay_steps=10).double()
    assert module.current_gamma() == 1.0
    for step in range(3):
        module(emb_with_ids(*unit(4, 6, seed=step), [step, step + 1, step + 2, step + 3], [7, 8, 9, step + 10]))
        module.clamp_()
    assert module.current_gamma() == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    state = module.state_dict()
    fresh = build_loss("gcl", gamma=0.2, gamma_schedule="cosine", gamma_decay_steps=10).double()
    fresh.load_state_dict(state)
    for a, b in ((module.image_states, fresh.image_states), (module.text_states, fresh.text_states)):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert fresh.current_gamma() == module.current_gamma()
    batch = emb_with_ids(*unit(4, 6, seed=9), [0, 1, 2, 99], [7, 8, 9, 98])
    assert torch.equal(module(batch).loss, fresh(batch).loss)
    with pytest.raises(RuntimeError, match="_extra_state"):  # a checkpoint without the states is refused
        build_loss("gcl").load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})


def test_gcl_sogclr_keeps_its_scale_fixed_by_default():
    assert not build_loss("gcl", temperature_term=False).log_scale.requires_grad
    assert build_loss("gcl").log_scale.requires_grad
    assert build_loss("gcl", temperature_term=False, learn_scale=True).log_scale.requires_grad


def test_item_ids_key_captions_by_sample_key_and_images_by_image_id():
    meta = {"image_id": torch.tensor([5, 5, 6]), "key": ["a#0", "a#1", "b#0"], "text_id": torch.tensor([1, 1, 1])}
    image, text = item_ids(meta, 3)
    assert image.tolist() == [5, 5, 6] and len(set(text.tolist())) == 3 and text.dtype == torch.long
    assert item_ids(meta, 3)[1].tolist() == text.tolist()  # stable across calls and processes
    with pytest.raises(KeyError, match="meta\\['image_id'\\] and meta\\['key'\\]"):
        item_ids({"image_id": torch.tensor([1])}, 1)


# -- gcl: two DDP ranks, several steps, states included -----------------------------------------------------
N, DIN, DIM, WORLD, STEPS = 8, 6, 4, 2, 3


class Tiny(nn.Module):
    def __init__(self, **loss_args):
        super().__init__()
        torch.manual_seed(0)
        self.loss = build_loss("gcl", gamma=0.6, **loss_args)
        self.proj = nn.Linear(DIN, DIM)

    def forward(self, raw):
        return self.loss(emb_with_ids(self.proj(raw["image"]), self.proj(raw["text"]), raw["image_ids"],
                                      raw["text_ids"])).loss


def step_batches():
    """Three global batches over a pool of 12 items: items recur across steps and across ranks, and step 2
    holds one image twice (on different ranks)."""
    g = torch.Generator().manual_seed(5)
    pool_i, pool_t = torch.randn(12, DIN, generator=g, dtype=torch.float64), torch.randn(12, DIN, generator=g,
                                                                                          dtype=torch.float64)
    picks = [torch.arange(8), torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]), torch.tensor([0, 9, 2, 11, 0, 5, 10, 3])]
    return [{"image": pool_i[p], "text": pool_t[p], "image_ids": p * 1000 + 7, "text_ids": p * 1000 + 8}
            for p in picks]


def train(model, batches, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        if rank is not None:
            batch = {k: v[rank * N // WORLD:(rank + 1) * N // WORLD] for k, v in batch.items()}
        wrapped = model if rank is None else nn.parallel.DistributedDataParallel(model)
        loss = wrapped(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.loss.clamp_()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "states": model.loss.get_extra_state()}


def ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = train(Tiny().double(), step_batches(), rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_together(out_dir, rank, WORLD)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gcl_two_ranks_over_several_steps_equal_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = train(Tiny().double(), step_batches())
    mean_losses = sum(r["losses"] for r in ranks) / WORLD
    assert torch.allclose(mean_losses, single["losses"], rtol=1e-6)
    for r in ranks:
        for name, value in single["params"].items():
            assert torch.allclose(r["params"][name], value, rtol=1e-6, atol=1e-12), name
        for side in ("image", "text"):  # every rank holds every item's state, equal to one process's
            assert torch.equal(r["states"][side]["ids"], single["states"][side]["ids"])
            assert torch.allclose(r["states"][side]["values"], single["states"][side]["values"], rtol=1e-6)
    assert len(single["states"]["image"]["ids"]) == 12


# -- gcl through ClipModule: checkpoint and resume -----------------------------------------------------------
@pytest.mark.slow
def test_gcl_states_survive_a_checkpoint_and_a_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from _data_helpers import small_dm
    from lightning_clip.data import synthetic as syn
    from lightning_clip.module import ClipModule

    world = syn.generate(tmp_path / "world", num_train=12, num_val=4, seed=0, image_size=32)
    tiny = dict(loss="gcl", embed_dim=16, image_size=32, warmup_steps=1,
                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1))

    class StopAt4(L.Callback):  # an interruption: max_steps stays 7, so the learning-rate schedule is the same
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                trainer.should_stop = True

    def fit(max_steps, root, ckpt_path=None, stop=False):
        L.seed_everything(0)
        dm = small_dm(world, batch_size=4, epoch_length=12, num_workers=0, image_size=32)
        model = ClipModule(**tiny, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
        trainer = L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, accelerator="cpu",
                            callbacks=[ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1),
                                       *([StopAt4()] if stop else [])])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.loss

    full = fit(7, tmp_path / "full")
    assert len(full.image_states) > 0 and int(full.steps) == 7
    saved = torch.load(tmp_path / "full" / "last.ckpt", weights_only=False)["state_dict"]["loss._extra_state"]
    assert torch.equal(saved["image"]["ids"], full.image_states.ids.cpu())
    assert int(fit(7, tmp_path / "cut", stop=True).steps) == 4
    resumed = fit(7, tmp_path / "cut", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    for a, b in ((full.image_states, resumed.image_states), (full.text_states, resumed.text_states)):
        assert torch.equal(a.ids, b.ids)
        assert torch.allclose(a.values, b.values, rtol=1e-4)
    assert int(resumed.steps) == 7


# -- meru ------------------------------------------------------------------------------------------------------
def test_meru_closed_forms():
    module = build_loss("meru").double()
    x = torch.randn(5, 8, dtype=torch.float64)
    module(Embeddings(x, x))  # sets alpha = -1/2 ln D
    assert module.image_log_alpha.item() == pytest.approx(-0.5 * math.log(8))
    sim = module.similarity(x * math.exp(-module.image_log_alpha.item() + module.text_log_alpha.item()), x)
    # identical points: distance arccosh(1 + 1e-8) / sqrt(c), the clamp's floor; elsewhere farther
    assert sim.diag().double().neg().max().item() == pytest.approx(math.acosh(1 + 1e-8), rel=1e-3)
    assert (sim.diag()[:, None] >= sim).all()
    # a caption's distance from the origin is the length of its tangent vector alpha x
    assert torch.allclose(module.origin_distance(x).double(), x.norm(dim=-1) / math.sqrt(8), rtol=1e-5)
    # an image farther out on its caption's ray lies inside the caption's cone: no entailment loss
    w = torch.randn(4, 3, dtype=torch.float64)
    terms = LF.meru(3 * w, w, 10.0, 0.0, 0.0, 0.0, entail_weight=1.0) - LF.meru(3 * w, w, 10.0, 0.0, 0.0, 0.0,
                                                                                entail_weight=0.0)
    assert abs(terms.item()) < 1e-6
    # and an image on the opposite ray, outside every cone of aperture < pi/2, is penalised
    assert (LF.meru(-3 * w, w, 10.0, 0.0, 0.0, 0.0, entail_weight=1.0)
            - LF.meru(-3 * w, w, 10.0, 0.0, 0.0, 0.0, entail_weight=0.0)).item() > 1.0


@pytest.mark.parametrize("norm", [1e-12, 1e-6, 1.0, 1e3, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meru_stable_at_tiny_and_huge_norms(norm, dtype):
    module = build_loss("meru")
    with torch.no_grad():
        module.log_scale.fill_(math.log(100.0))
    x, y = unit(8, 16, seed=1, dtype=torch.float32)
    y = F.normalize(x + 1e-3 * y, dim=-1)  # near-identical pairs
    image, text = (norm * x).to(dtype).requires_grad_(), (norm * y).to(dtype).requires_grad_()
    out = module(Embeddings(image, text))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    params = [p for p in module.parameters() if p.requires_grad]
    for grad in torch.autograd.grad(out.loss, [image, text, *params]):
        assert torch.isfinite(grad).all()
    assert torch.isfinite(module.similarity(image, text)).all()
    assert torch.isfinite(module.origin_distance(text)).all()


def test_meru_clamps_after_each_step_and_keeps_alpha_in_the_state_dict():
    module = build_loss("meru", init_curv=2.0)
    module(Embeddings(torch.randn(3, 16), torch.randn(3, 16)))
    with torch.no_grad():
        module.image_log_alpha.fill_(0.5)
        module.log_curv.fill_(5.0)
        module.log_scale.fill_(7.0)
    module.clamp_()
    assert module.image_log_alpha.item() == 0.0
    assert module.log_curv.item() == pytest.approx(math.log(20.0))
    assert module.log_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        module.log_curv.fill_(-9.0)
        module.text_log_alpha.fill_(-1.0)
    module.clamp_()
    assert module.log_curv.item() == pytest.approx(math.log(0.2)) and module.text_log_alpha.item() == -1.0
    fresh = build_loss("meru", init_curv=2.0)
    fresh.load_state_dict(module.state_dict())
    fresh(Embeddings(torch.randn(3, 16), torch.randn(3, 16)))  # a resumed run does not re-initialise alpha
    assert fresh.text_log_alpha.item() == -1.0
    assert set(module.no_decay) >= {"image_log_alpha", "text_log_alpha", "log_curv", "log_scale"}


def test_meru_errors_are_clear():
    with pytest.raises(ValueError, match=r"min_radius \(option model.loss_args.min_radius\)"):
        build_loss("meru", min_radius=0)
    with pytest.raises(ValueError, match="entail_weight"):
        LF.meru(torch.randn(3, 4), torch.randn(3, 4), 1.0, 0.0, 0.0, 0.0, entail_weight=-1)
    with pytest.raises(ValueError, match="same shape"):
        LF.meru(torch.randn(3, 4), torch.randn(2, 4), 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        LF.meru(torch.randn(3, 4), torch.full((3, 4), float("nan")), 1.0, 0.0, 0.0, 0.0)


def test_meru_distances_per_specificity_are_logged():
    from types import SimpleNamespace

    from lightning_clip.callbacks.variance import VarianceCallback

    logged = {}
    module = SimpleNamespace(log=lambda key, value, **kw: logged.__setitem__(key, float(value)))
    spec = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, -1])
    distance = spec.float().clamp_min(0) + torch.tensor([0.1, 0.0, 0.2, 0.1, -0.1, 0.0, -0.2, 0.3, 9.0])
    VarianceCallback._log_origin_distance(module, distance, spec)
    assert logged["hyperbolic/text/distance_level_1"] == pytest.approx(1.0)
    assert logged["hyperbolic/text/distance_level_4"] == pytest.approx(4.2)
    assert logged["hyperbolic/text/spearman_specificity"] > 0.9  # ties within a level keep it below 1
    assert "hyperbolic/text/distance_level_-1" not in logged


@pytest.mark.slow
def test_meru_fit_logs_its_geometry_and_gcl_fits(tmp_path, monkeypatch):
    import json

    from lightning_clip import cli
    from lightning_clip.data.synthetic import generate

    shards = generate(tmp_path / "data", num_train=32, num_val=16, image_size=32, num_captions=2)
    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    for loss in ("meru", "gcl"):
        run = tmp_path / loss
        cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml",
                  f"--run_dir={run}", f"--model.loss={loss}", "--trainer.max_steps=3",
                  "--trainer.limit_train_batches=3", "--trainer.val_check_interval=3",
                  "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
                  f"--data.train_shards={shards / 'train'}", f"--data.val_shards={shards / 'val'}",
                  "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0",
                  "--model.image_model=test_vit", "--model.image_model_args={patch_size: 8}"])
        final = json.loads((run / "final_metrics.json").read_text())
        assert final["loss_family"] == loss and final["val/t2i/R@1"] is not None
        if loss == "meru":
            assert final["hyperbolic/text/spearman_specificity"] is not None
            assert any(k.startswith("hyperbolic/text/distance_level_") for k in final)
            assert final["train/loss/entailment"] is not None
        else:
            assert final["train/loss/seen"] is not None


class IdBatches(L.LightningDataModule):
    """Fixed global batches whose meta carries image ids and keys; rank r takes its slice of each (at module
    level, so ddp_spawn can pickle it)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        per = self.batches[0]["image"].shape[0] // world
        rows = slice(rank * per, (rank + 1) * per)
        mine = [{"image": b["image"][rows], "input_ids": b["input_ids"][rows], "attention_mask": b["attention_mask"][rows],
                 "meta": {"key": b["meta"]["key"][rows], "image_id": b["meta"]["image_id"][rows]}} for b in self.batches]
        return torch.utils.data.DataLoader(mine, batch_size=None)


def fit_ids(module, batches, **trainer_kwargs):
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=IdBatches(batches))
    return module


@pytest.mark.slow  # two spawned interpreters importing torch, lightning and transformers
@pytest.mark.distributed
def test_gcl_through_lightning_ddp_matches_one_process_states_included():
    """ClipModule under Lightning's DDP: the ids reach the loss from the batch, and rank 0's weights and
    item states after three steps (items recurring across steps) equal one process on the whole batches."""
    import copy

    from test_scale import TINY, SGDClip, fixed_batches

    batches = fixed_batches(3, 8)
    for batch, items in zip(batches, ([0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, 10, 11], [0, 9, 2, 11, 0, 5, 10, 3])):
        batch["meta"] = {"key": [f"item{i}#0" for i in items], "image_id": torch.tensor(items) + 100}
    torch.manual_seed(0)
    start = SGDClip(**{**TINY, "loss": "gcl", "loss_args": {"gamma": 0.5}})
    single = fit_ids(copy.deepcopy(start), batches, devices=1)
    ddp = fit_ids(copy.deepcopy(start), batches, devices=2, strategy="ddp_spawn")
    assert len(single.loss.image_states) == 12
    for side in ("image_states", "text_states"):
        a, b = getattr(single.loss, side), getattr(ddp.loss, side)
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=0)
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        if name != "loss._extra_state":
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
