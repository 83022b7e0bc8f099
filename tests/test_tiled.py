"""The tiled losses equal the dense ones: values and gradients, over chunk sizes that do and do not divide
N (and chunk >= N), in float64 (1e-10 relative) and float32 (1e-5), on both tile paths (one shared exp
shift per tile, and per-row/per-column shifts when a tile's logits spread too far for one shift)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_clip.losses import tiled
from lightning_clip.losses.tiled import tiled_infonce, tiled_siglip

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# -- dense references, plain torch ---------------------------------------------------------------------
def dense_infonce(image, text, logit_scale, logit_bias=None, label_smoothing=0.0):
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(len(image), device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def dense_siglip(image, text, logit_scale, logit_bias):
    logits = logit_scale * image @ text.T + logit_bias
    signs = 2 * torch.eye(len(image), dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / len(image)


# -- helpers -------------------------------------------------------------------------------------------
def make_inputs(n, dim, dtype, scale, bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    s = torch.tensor(scale, dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, device=device, requires_grad=True)
    return image, text, s, b


def value_and_grads(fn, inputs, **kwargs):
    loss = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), [None if g is None else g.detach() for g in grads]


def assert_close(actual, expected, rtol, what):
    # relative to the tensor's largest entry: entries near zero have no meaningful elementwise relative error
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.fixture
def path_spy(monkeypatch):
    """Records which tile path ran: a float (shared shift) or None (per-row/per-column shifts)."""
    seen = []
    original = tiled._tile_shift

    def spy(tile, limit):
        shift = original(tile, limit)
        seen.append(shift is not None)
        return shift

    monkeypatch.setattr(tiled, "_tile_shift", spy)
    return seen


# "narrow": scale 14.3 keeps every tile within one exp shift. "wide": the scale spreads a tile's logits
# beyond what one shift covers in that dtype (about 79 in float32, 700 in float64), so the per-row /
# per-column fallback runs; the dense float32 reference itself degrades at larger scales, hence 100 there.
SCALES = {"narrow": {torch.float64: 14.3, torch.float32: 14.3},
          "wide": {torch.float64: 2000.0, torch.float32: 100.0}}
CASES = [(37, 5, "narrow"), (37, 16, "narrow"), (37, 37, "narrow"), (37, 64, "narrow"), (64, 1, "narrow"),
         (64, 16, "narrow"), (64, 24, "narrow"), (64, 64, "narrow"), (37, 10, "wide"), (64, 48, "wide")]


# -- InfoNCE -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,chunk,spread", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_infonce_matches_dense(dtype, n, chunk, spread, label_smoothing, path_spy):
    inputs = make_inputs(n, 16, dtype, SCALES[spread][dtype], bias=-2.0)
    ref_loss, ref_grads = value_and_grads(dense_infonce, inputs, label_smoothing=label_smoothing)
    loss, grads = value_and_grads(tiled_infonce, inputs, label_smoothing=label_smoothing, chunk_size=chunk)
    rtol = TOL[dtype]
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close(loss, ref_loss, rtol, "loss")
    for name, g, ref in zip(["image", "text", "logit_scale"], grads, ref_grads):
        assert_close(g, ref, rtol, f"d {name}")
    # the bias cancels in cross-entropy: the dense gradient is rounding noise, the tiled one exactly 0
    assert grads[3] is not None and grads[3].item() == 0.0
    assert abs(ref_grads[3].item()) < 1e3 * rtol
    assert path_spy and all(path_spy) == (spread == "narrow"), path_spy


def test_infonce_without_bias_and_without_scale_grad():
    image, text, s, _ = make_inputs(37, 16, torch.float64, 10.0, 0.0)
    s = s.detach()
    ref_loss = dense_infonce(image, text, s)
    ref_grads = torch.autograd.grad(ref_loss, (image, text))
    loss = tiled_infonce(image, text, s, chunk_size=8)
    grads = torch.autograd.grad(loss, (image, text))
    assert_close(loss, ref_loss, 1e-10, "loss")
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, 1e-10, "grad")


# -- SigLIP --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,chunk,spread", CASES)
@pytest.mark.parametrize("bias", [-10.0, 0.5])
def test_siglip_matches_dense(dtype, n, chunk, spread, bias):
    inputs = make_inputs(n, 16, dtype, SCALES[spread][dtype], bias)
    ref_loss, ref_grads = value_and_grads(dense_siglip, inputs)
    loss, grads = value_and_grads(tiled_siglip, inputs, chunk_size=chunk)
    rtol = TOL[dtype]
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close(loss, ref_loss, rtol, "loss")
    for name, g, ref in zip(["image", "text", "logit_scale", "logit_bias"], grads, ref_grads):
        assert_close(g, ref, rtol, f"d {name}")


def test_siglip_without_grad_gives_the_same_value():
    inputs = make_inputs(37, 16, torch.float64, 10.0, -10.0)
    with torch.no_grad():
        loss = tiled_siglip(*inputs, chunk_size=8)
        assert_close(loss, dense_siglip(*inputs), 1e-10, "loss")
    assert not loss.requires_grad


# -- gradcheck, autocast, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("fn,kwargs", [(tiled_infonce, {"label_smoothing": 0.2}), (tiled_siglip, {})],
                         ids=["infonce", "siglip"])
@pytest.mark.parametrize("scale", [3.0, 2000.0], ids=["shared-shift", "per-row-shift"])
def test_gradcheck(fn, kwargs, scale):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, chunk_size=2, **kwargs), (image, text, s, b))


@pytest.mark.parametrize("fn,dense", [(tiled_infonce, dense_infonce), (tiled_siglip, dense_siglip)],
                         ids=["infonce", "siglip"])
def test_autocast_computes_in_float32(fn, dense):
    image, text, s, b = make_inputs(37, 16, torch.float32, 14.3, -3.0)
    ref_loss, ref_grads = value_and_grads(dense, (image, text, s, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(image, text, s, b, chunk_size=10)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (image, text, s))
    assert_close(loss, ref_loss, 1e-5, "loss")
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, ref, 1e-5, "grad")


def test_half_precision_inputs_are_upcast():
    image, text, s, b = make_inputs(37, 16, torch.float32, 14.3, -3.0)
    image16, text16 = image.detach().bfloat16().requires_grad_(), text.detach().bfloat16().requires_grad_()
    loss = tiled_siglip(image16, text16, s, b, chunk_size=10)
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), dense_siglip(image16.float(), text16.float(), s, b).detach(), 1e-5, "loss")
    loss.backward()
    assert image16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("fn", [tiled_infonce, tiled_siglip])
def test_errors_name_the_argument(fn):
    image, text, s, b = make_inputs(8, 4, torch.float32, 10.0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(image, text, s, b, chunk_size=0)
    with pytest.raises(ValueError, match="same shape"):
        fn(image, text[:5], s, b, chunk_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fn,dense", [(tiled_infonce, dense_infonce), (tiled_siglip, dense_siglip)],
                         ids=["infonce", "siglip"])
def test_cuda_matches_dense(fn, dense):
    inputs = make_inputs(64, 16, torch.float64, 14.3, -3.0, device="cuda")
    ref_loss, ref_grads = value_and_grads(dense, inputs)
    loss, grads = value_and_grads(fn, inputs, chunk_size=24)
    assert_close(loss, ref_loss, 1e-10, "loss")
    for g, ref in zip(grads[:3], ref_grads[:3]):
        assert_close(g, ref, 1e-10, "grad")


# -- memory --------------------------------------------------------------------------------------------
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_extra_mib(fn):
    """Peak resident memory above the current one while fn runs (Linux: VmHWM reset via clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
    except (OSError, KeyError):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


@pytest.mark.parametrize("fn,dense", [(tiled_infonce, dense_infonce), (tiled_siglip, dense_siglip)],
                         ids=["infonce", "siglip"])
def test_memory_does_not_grow_with_n_squared(fn, dense):
    # one [4096, 4096] float32 matrix is 64 MiB and the dense losses keep several; the tiled ones need the
    # [N, D] features and gradients (256 KiB each here) and two 1024 x 1024 tiles (4 MiB each)
    n, dim, chunk = 4096, 16, 1024
    inputs = make_inputs(n, dim, torch.float32, 14.3, -3.0)
    dense_mib = _peak_extra_mib(lambda: torch.autograd.grad(dense(*inputs), inputs[:2]))
    tiled_mib = _peak_extra_mib(lambda: torch.autograd.grad(fn(*inputs, chunk_size=chunk), inputs[:2]))
    assert dense_mib > 64, f"the measurement sees no N^2 matrix in the dense loss ({dense_mib:.0f} MiB)"
    assert tiled_mib < 32, f"tiled loss used {tiled_mib:.1f} MiB extra at N={n} (dense: {dense_mib:.0f} MiB)"
