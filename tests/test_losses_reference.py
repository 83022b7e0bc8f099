"""Every case of ../shared/reference/loss_vectors.json (float64 numbers from open_clip, transformers, the
tutorial and the seed proposal, as written): our values and gradients agree to 1e-10 relative.

The file records the inputs and results but not the scales the peers ran with; they are the peers'
defaults: open_clip/transformers CLIP ln(1/0.07), SigLIP ln(10) with bias -10, tutorial temperature 1.0,
and the identity-target case states its scale (10)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_clip.losses import functional as LF
from lightning_clip.losses.infonce import infonce_terms
from lightning_clip.losses.multi_positive import multi_positive_terms

SHARED = Path(os.environ.get("LIGHTNING_CLIP_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
VECTORS = SHARED / "reference" / "loss_vectors.json"
RTOL = 1e-10


@pytest.fixture(scope="module")
def ref():
    if not VECTORS.is_file():
        pytest.skip(f"reference vectors absent: {VECTORS} (../shared/reference/loss_vectors.json)")
    data = json.loads(VECTORS.read_text())
    assert data["dtype"] == "float64"
    return data


def tensor(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def assert_close(actual, expected, what):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


def check_case(case: dict, loss, inputs: dict, name: str):
    names = list(case["grads"])
    assert set(names) <= set(inputs), f"{name}: unexpected gradient keys {names}"
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    assert_close(loss.detach(), case["loss"], f"{name} loss")
    for k, g in zip(names, grads):
        assert_close(g, case["grads"][k], f"{name} d/d{k}")


def features(ref, *keys):
    return {k: tensor(ref["inputs"][k]) for k in keys}


def test_the_file_holds_the_cases_we_check(ref):
    assert set(ref["cases"]) == {"open_clip.ClipLoss", "transformers.clip_loss", "open_clip.SigLipLoss",
                                 "tutorial.soft_targets", "proposal.probabilistic", "identity_targets"}


@pytest.mark.parametrize("case", ["open_clip.ClipLoss", "transformers.clip_loss"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_infonce_matches_clip_losses(ref, case, chunk_size):
    x = features(ref, "image_features", "text_features")
    x["log_logit_scale"] = tensor(math.log(1 / 0.07))
    loss = LF.infonce(x["image_features"], x["text_features"], x["log_logit_scale"].exp(), chunk_size=chunk_size)
    check_case(ref["cases"][case], loss, x, case)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_siglip_matches_open_clip(ref, chunk_size):
    x = features(ref, "image_features", "text_features")
    x["log_logit_scale"], x["logit_bias"] = tensor(math.log(10.0)), tensor(-10.0)
    loss = LF.siglip(x["image_features"], x["text_features"], x["log_logit_scale"].exp(), x["logit_bias"],
                     chunk_size=chunk_size)
    check_case(ref["cases"]["open_clip.SigLipLoss"], loss, x, "open_clip.SigLipLoss")


def test_soft_targets_tutorial_matches_the_tutorial_as_written(ref):
    x = features(ref, "raw_image", "raw_text")
    loss = LF.soft_targets(x["raw_image"], x["raw_text"], 1.0, mode="tutorial")
    check_case(ref["cases"]["tutorial.soft_targets"], loss, x, "tutorial.soft_targets")


def test_probabilistic_proposal_matches_the_seed_as_written(ref):
    x = features(ref, "image_features", "text_features", "image_ln_std", "text_ln_std")
    loss = LF.probabilistic(x["image_features"], x["text_features"], x["image_ln_std"], x["text_ln_std"],
                            mode="proposal")
    check_case(ref["cases"]["proposal.probabilistic"], loss, x, "proposal.probabilistic")


def test_identity_targets_equal_class_indices(ref):
    """Seed 003's question: identity-matrix probability targets are the class-index labels arange(N).
    The reference number is matched by both forms, by our InfoNCE's image half, and by multi_positive's
    soft targets with distinct groups."""
    case = ref["cases"]["identity_targets"]
    for form in ("eye", "arange", "infonce_i2t", "multi_positive_i2t"):
        x = features(ref, "image_features", "text_features")
        image, text = x["image_features"], x["text_features"]
        n = image.shape[0]
        if form == "eye":
            loss = F.cross_entropy(10.0 * image @ text.T, torch.eye(n, dtype=torch.float64))
        elif form == "arange":
            loss = F.cross_entropy(10.0 * image @ text.T, torch.arange(n))
        elif form == "infonce_i2t":
            loss = infonce_terms(image, text, 10.0)["i2t"]
        else:
            loss = multi_positive_terms(image, text, 10.0, torch.arange(n), torch.arange(n) + 100)["i2t"]
        check_case(case, loss, x, f"identity_targets via {form}")
