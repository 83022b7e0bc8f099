"""Loss families: brute-force agreement, float64 gradcheck, closed forms, stability, input errors, the
registry, and each module's contract (terms, needs, similarity)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import CASES, case_id, dot, finite_loss_and_grads, lse, random_embeddings, softplus
from lightning_clip.losses import LOSSES, build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.base import LOG_SCALE_MAX
from lightning_clip.losses.nce import sample_negatives
from lightning_clip.losses.probabilistic import LN_STD_MAX, LN_STD_MIN
from lightning_clip.losses.sample_temperature import sample_temperature
from lightning_clip.losses.sampled_softmax import sampled_infonce
from lightning_clip.outputs import Embeddings

ALL_NAMES = {"infonce", "siglip", "soft_targets", "multi_positive", "nce", "dcl", "probabilistic", "damsm",
             "cyclip", "hn_nce", "cloob", "pcmepp", "filip", "gcl", "meru", "sample_temperature", "sampled_infonce"}


def build(case, dtype=torch.float64):
    name, kwargs = case
    return build_loss(name, **kwargs).to(dtype)


# -- brute force: plain Python loops over floats (lse, softplus, dot: tests/_loss_helpers.py) --------------


def unit(rows):
    return [[x / math.sqrt(dot(r, r)) for x in r] for r in rows]


def brute_force(name: str, kwargs: dict, emb: Embeddings, module) -> float:
    img, txt = emb.image.tolist(), emb.text.tolist()
    n = len(img)
    s = module.logit_scale.item() if module.log_scale is not None else None
    b = module.bias.item() if module.bias is not None else 0.0
    if name == "soft_targets" and kwargs["mode"] == "tutorial":
        t = 1.0 / s
        logits = [[dot(txt[j], img[i]) / t for i in range(n)] for j in range(n)]  # [text j][image i]
        m = [[(dot(img[j], img[k]) + dot(txt[j], txt[k])) / 2 * t for k in range(n)] for j in range(n)]
        q = [[math.exp(m[j][k] - lse(m[j])) for k in range(n)] for j in range(n)]
        texts = [-sum(q[j][i] * (logits[j][i] - lse(logits[j])) for i in range(n)) for j in range(n)]
        images = [-sum(q[j][i] * (logits[j][i] - lse([logits[k][i] for k in range(n)])) for j in range(n))
                  for i in range(n)]
        return (sum(texts) + sum(images)) / (2 * n)
    if name == "probabilistic":
        if module.normalize:
            img, txt = unit(img), unit(txt)
        ils, tls = emb.image_ln_std.tolist(), emb.text_ln_std.tolist()
        dim = len(img[0])
        dist = [[sum((x - y) ** 2 for x, y in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]

        def logit(d, ln_std):
            ln_std = min(max(ln_std, LN_STD_MIN), LN_STD_MAX)
            var = math.exp(ln_std) ** 2
            return -ln_std - d / var if kwargs["mode"] == "proposal" else -dim * ln_std - d / (2 * var)

        i2t = [lse([logit(dist[i][j], tls[j]) for j in range(n)]) - logit(dist[i][i], tls[i]) for i in range(n)]
        t2i = [lse([logit(dist[i][j], ils[i]) for i in range(n)]) - logit(dist[j][j], ils[j]) for j in range(n)]
        return (sum(i2t) + sum(t2i)) / (2 * n)
    if name == "sample_temperature":  # s * cos / sigma^2 of the query (or of the candidate)
        img, txt = unit(img), unit(txt)
        w = [[math.exp(-2 * min(max(v, LN_STD_MIN), LN_STD_MAX)) for v in t.tolist()]
             for t in (emb.image_ln_std, emb.text_ln_std)]
        query = kwargs.get("side", "query") == "query"
        z = [[s * (w[0][i] if query else w[1][j]) * dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
        zt = [[s * (w[1][j] if query else w[0][i]) * dot(img[i], txt[j]) for i in range(n)] for j in range(n)]
        return sum(lse(z[i]) - z[i][i] + lse(zt[i]) - zt[i][i] for i in range(n)) / (2 * n)
    if name == "damsm":
        return brute_damsm(emb, module)
    if name in BRUTE_RECENT:
        return BRUTE_RECENT[name](emb, module)
    img, txt = unit(img), unit(txt)
    z = [[s * dot(img[i], txt[j]) + b for j in range(n)] for i in range(n)]  # [image i][text j]
    zt = [[z[i][j] for i in range(n)] for j in range(n)]                     # [text j][image i]
    if name == "siglip":
        return sum(softplus(-z[i][j] if i == j else z[i][j]) for i in range(n) for j in range(n)) / n
    if name == "soft_targets":  # fixed; the module divides by its temperature 1 / scale
        t = (1.0 / module.logit_scale).item()
        z = [[dot(img[i], txt[j]) / t for j in range(n)] for i in range(n)]
        zt = [[z[i][j] for i in range(n)] for j in range(n)]
        m = [[(dot(img[i], img[k]) + dot(txt[i], txt[k])) / 2 / t for k in range(n)] for i in range(n)]
        col = [[m[k][i] for k in range(n)] for i in range(n)]
        total = 0.0
        for rows, targ in ((z, m), (zt, col)):
            for i in range(n):
                total += -sum(math.exp(targ[i][j] - lse(targ[i])) * (rows[i][j] - lse(rows[i])) for j in range(n))
        return total / (2 * n)
    if name == "nce":
        k = kwargs["num_negatives"]
        idx = sample_negatives(n, k, torch.Generator().manual_seed(module.sampler.current_seed())).tolist()
        total = 0.0
        for d, rows in enumerate((z, zt)):
            for i in range(n):
                total += softplus(-rows[i][i]) + sum(softplus(rows[i][j]) for j in idx[d][i])
        return total / (2 * n)
    total = 0.0
    for d, rows in enumerate((z, zt)):
        for i in range(n):
            if name == "infonce":
                eps = kwargs.get("label_smoothing", 0.0)
                total += lse(rows[i]) - (1 - eps) * rows[i][i] - eps * sum(rows[i]) / n
            elif name == "dcl":
                others = [rows[i][j] for j in range(n) if j != i]
                total += (lse(others) if others else 0.0) - rows[i][i]
            elif name == "multi_positive":
                gi, gt = emb.image_groups.tolist(), emb.text_groups.tolist()
                if d == 1:
                    gi, gt = gt, gi
                pos = [j for j in range(n) if gi[i] == gt[j] or j == i]
                total += lse(rows[i]) - sum(rows[i][j] for j in pos) / len(pos)
    return total / (2 * n)


def brute_damsm(emb: Embeddings, module) -> float:
    g1, g2, g3 = module.gamma1, module.gamma2, module.gamma3
    regions, words, mask = emb.regions.tolist(), emb.words.tolist(), emb.word_mask.tolist()
    n = len(regions)

    def relevance(a, bb):
        v = regions[a]
        real = [l for l in range(len(words[bb])) if mask[bb][l]]
        e = [words[bb][l] for l in real]
        s = [[dot(w, r) for r in v] for w in e]                       # [word][region]
        sbar = [[math.exp(s[l][r] - lse([s[k][r] for k in range(len(e))])) for r in range(len(v))]
                for l in range(len(e))]                                 # softmax over words
        cos = []
        for l in range(len(e)):
            alpha = [math.exp(g1 * sbar[l][r] - lse([g1 * x for x in sbar[l]])) for r in range(len(v))]
            c = [sum(alpha[r] * v[r][k] for r in range(len(v))) for k in range(len(v[0]))]
            cos.append(dot(c, e[l]) / (math.sqrt(dot(c, c)) * math.sqrt(dot(e[l], e[l]))))
        return lse([g2 * x for x in cos]) / g2

    rel = [[g3 * relevance(a, bb) for bb in range(n)] for a in range(n)]
    img, txt = unit(emb.image.tolist()), unit(emb.text.tolist())
    sent = [[g3 * dot(img[a], txt[bb]) for bb in range(n)] for a in range(n)]
    total = 0.0
    for m in (rel, sent):
        mt = [[m[a][bb] for a in range(n)] for bb in range(n)]
        total += sum(lse(m[i]) - m[i][i] for i in range(n)) / n + sum(lse(mt[i]) - mt[i][i] for i in range(n)) / n
    return total


# -- the five later families (cyclip, hn_nce, cloob, pcmepp, filip), each straight from its formula ------
def _ce_rows(rows):
    return sum(lse(r) - r[i] for i, r in enumerate(rows))


def brute_cyclip(emb, module):
    img, txt = unit(emb.image.tolist()), unit(emb.text.tolist())
    n, s = len(img), module.logit_scale.item()
    z = [[s * dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
    zt = [[z[i][j] for i in range(n)] for j in range(n)]
    ce = (_ce_rows(z) + _ce_rows(zt)) / (2 * n)
    in_modal = sum((dot(img[j], img[k]) - dot(txt[j], txt[k])) ** 2 for j in range(n) for k in range(n)) / n
    cross = sum((dot(img[j], txt[k]) - dot(img[k], txt[j])) ** 2 for j in range(n) for k in range(n)) / n
    return ce + module.lambda_in * in_modal + module.lambda_cross * cross


def brute_hn_nce(emb, module):
    img, txt = unit(emb.image.tolist()), unit(emb.text.tolist())
    n, s, alpha, beta = len(img), module.logit_scale.item(), module.alpha, module.beta
    z = [[s * dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
    zt = [[z[i][j] for i in range(n)] for j in range(n)]
    total = 0.0
    for rows in (z, zt):
        for i in range(n):
            others = [j for j in range(n) if j != i]
            norm = sum(math.exp(beta * rows[i][k]) for k in others)
            denom = alpha * math.exp(rows[i][i]) + sum(
                (n - 1) * math.exp(beta * rows[i][j]) / norm * math.exp(rows[i][j]) for j in others)
            total += -math.log(math.exp(rows[i][i]) / denom)
    return total / (2 * n)


def brute_cloob(emb, module):
    img, txt = unit(emb.image.tolist()), unit(emb.text.tolist())
    n, inv_tau, beta = len(img), module.logit_scale.item(), module.hopfield_beta

    def retrieve(queries, memory):
        out = []
        for q in queries:
            w = [math.exp(beta * dot(q, m)) for m in memory]
            v = [sum(w[j] * memory[j][d] for j in range(n)) / sum(w) for d in range(len(q))]
            out.append(unit([v])[0])
        return out

    def info_loob(a, b):
        total = 0.0
        for i in range(n):
            neg = [inv_tau * dot(a[i], b[j]) for j in range(n) if j != i]
            total += -inv_tau * dot(a[i], b[i]) + (lse(neg) if neg else 0.0)
        return total / n / inv_tau

    return (info_loob(retrieve(img, img), retrieve(txt, img))
            + info_loob(retrieve(txt, txt), retrieve(img, txt)))


def brute_pcmepp(emb, module, image_ln_std=None, text_ln_std=None):
    img, txt = emb.image.tolist(), emb.text.tolist()
    if module.normalize:
        img, txt = unit(img), unit(txt)
    n, dim = len(img), len(img[0])
    a, b = module.a.item(), module.b.item()

    def per_dim(ln_std):  # [N] isotropic or [N, D]; clamped like the module
        rows = [[v] * dim if not isinstance(v, list) else v for v in ln_std.tolist()]
        return [[min(max(x, LN_STD_MIN), LN_STD_MAX) for x in r] for r in rows]

    ils = per_dim(emb.image_ln_std if image_ln_std is None else image_ln_std)
    tls = per_dim(emb.text_ln_std if text_ln_std is None else text_ln_std)
    bce = 0.0
    for i in range(n):
        for j in range(n):
            d = sum((x - y) ** 2 for x, y in zip(img[i], txt[j])) + sum(math.exp(2 * v) for v in ils[i] + tls[j])
            logit = -a * d + b
            bce += softplus(-logit) if i == j else softplus(logit)

    def kl(mu, ln_std):
        return sum(0.5 * sum(m * m + math.exp(2 * v) - 1 - 2 * v for m, v in zip(mu[i], ln_std[i]))
                   for i in range(n)) / n

    return bce / n ** 2 + module.vib_beta * (kl(img, ils) + kl(txt, tls)) / 2


def brute_filip(emb, module, region_mask=None):
    regions = [unit(r) for r in emb.regions.tolist()]
    words = [unit(w) for w in emb.words.tolist()]
    wmask = emb.word_mask.tolist()
    rmask = region_mask.tolist() if region_mask is not None else [[True] * len(regions[0])] * len(regions)
    n, s = len(regions), module.logit_scale.item()
    s_img = [[0.0] * n for _ in range(n)]
    s_txt = [[0.0] * n for _ in range(n)]
    for i in range(n):
        ks = [k for k in range(len(regions[i])) if rmask[i][k]]
        for j in range(n):
            rs = [r for r in range(len(words[j])) if wmask[j][r]]
            s_img[i][j] = sum(max(dot(regions[i][k], words[j][r]) for r in rs) for k in ks) / len(ks)
            s_txt[i][j] = sum(max(dot(regions[i][k], words[j][r]) for k in ks) for r in rs) / len(rs)
    z = [[s * s_img[i][j] for j in range(n)] for i in range(n)]                 # image i over captions j
    zt = [[s * s_txt[i][j] for i in range(n)] for j in range(n)]                # caption j over images i
    return (_ce_rows(z) + _ce_rows(zt)) / (2 * n)


def brute_meru(emb, module):
    """MERU by the formulas, row by row (alpha is -1/2 ln D until the module's first forward sets it)."""
    img, txt = emb.image.tolist(), emb.text.tolist()
    n, d, s = len(img), len(img[0]), module.logit_scale.item()
    c, rc = math.exp(module.log_curv.item()), math.exp(module.log_curv.item() / 2)
    alpha = [math.exp(p.item()) if bool(module.alpha_initialized) else d ** -0.5
             for p in (module.image_log_alpha, module.text_log_alpha)]

    def lift(x, a):
        u = [a * e for e in x]
        r = rc * math.sqrt(dot(u, u))
        return [math.sinh(min(max(r, 1e-8), math.asinh(2 ** 15))) * e / max(r, 1e-8) for e in u]

    v, w = [lift(x, alpha[0]) for x in img], [lift(x, alpha[1]) for x in txt]
    tp = lambda x: math.sqrt(1 / c + dot(x, x))  # noqa: E731
    clip = lambda x: min(max(x, -1 + 1e-8), 1 - 1e-8)  # noqa: E731
    dist = [[math.acosh(max(-c * (dot(v[i], w[j]) - tp(v[i]) * tp(w[j])), 1 + 1e-8)) / rc for j in range(n)]
            for i in range(n)]
    z = [[-s * dist[i][j] for j in range(n)] for i in range(n)]
    zt = [[-s * dist[i][j] for i in range(n)] for j in range(n)]
    entail = 0.0
    for i in range(n):
        norm_w = math.sqrt(dot(w[i], w[i]))
        aper = math.asin(clip(2 * module.min_radius / (norm_w * rc + 1e-8)))
        c_wv = c * (dot(w[i], v[i]) - tp(w[i]) * tp(v[i]))
        ext = math.acos(clip((tp(v[i]) + c_wv * tp(w[i])) / (norm_w * math.sqrt(max(c_wv ** 2 - 1, 1e-8)) + 1e-8)))
        entail += max(0.0, ext - aper) / n
    return (_ce_rows(z) + _ce_rows(zt)) / (2 * n) + module.entail_weight * entail


def brute_sampled_infonce(emb, module):
    img, txt = unit(emb.image.tolist()), unit(emb.text.tolist())
    n, s = len(img), module.logit_scale.item()
    idx = sample_negatives(n, module.num_negatives, torch.Generator().manual_seed(module.sampler.current_seed()),
                           module.replacement).tolist()
    total = 0.0
    for d, (a, c) in enumerate(((img, txt), (txt, img))):
        for i in range(n):  # CE over the positive and the row's k sampled negatives
            total += lse([s * dot(a[i], c[j]) for j in [i, *idx[d][i]]]) - s * dot(a[i], c[i])
    return total / (2 * n)


BRUTE_RECENT = {"cyclip": brute_cyclip, "hn_nce": brute_hn_nce, "cloob": brute_cloob, "pcmepp": brute_pcmepp,
                "filip": brute_filip, "meru": brute_meru, "sampled_infonce": brute_sampled_infonce}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_vectorised_equals_brute_force(case, n):
    module = build(case)
    emb = random_embeddings(n=n, dim=4, seed=n)
    if case[0] == "multi_positive" and n == 5:
        emb.text_groups = torch.tensor([0, 0, 1, 7, 2])  # an unmatched caption id and an uneven group
    expected = brute_force(case[0], case[1], emb, module)
    out = module(emb)
    assert abs(out.loss.item() - expected) <= 1e-10 * max(1.0, abs(expected)), (out.loss.item(), expected)


# -- float64 gradcheck through every input, including log-scale, bias and log-std ---------------------
def _gradcheck_inputs(seed=0, n=4, d=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return g, r


GRADCHECKS = {
    "infonce": lambda r, g: ((r(4, 3), r(4, 3), torch.tensor(1.5, dtype=torch.float64, requires_grad=True),
                              r(())),
                             lambda i, t, ls, b: LF.infonce(i, t, ls.exp(), logit_bias=b, label_smoothing=0.1)),
    "siglip": lambda r, g: ((r(4, 3), r(4, 3), r(()), r(())),
                            lambda i, t, ls, b: LF.siglip(i, t, ls.exp(), b)),
    "soft_targets-tutorial": lambda r, g: ((r(4, 3), r(4, 3), torch.tensor(0.7, dtype=torch.float64,
                                                                             requires_grad=True)),
                                           lambda i, t, tau: LF.soft_targets(i, t, tau, mode="tutorial")),
    # soft_targets "fixed" detaches its targets on purpose, so its gradient is *not* the derivative of
    # its value: test_soft_targets_fixed_gradient_treats_targets_as_constants checks it instead
    "multi_positive": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                                    lambda i, t, ls: LF.multi_positive(i, t, ls.exp(), torch.tensor([0, 0, 1, 2]),
                                                                       torch.tensor([0, 0, 1, 1]))),
    "nce": lambda r, g: ((r(4, 3), r(4, 3), r(()), r(())),
                         lambda i, t, ls, b: LF.nce(i, t, ls.exp(), num_negatives=3, logit_bias=b,
                                                    generator=torch.Generator().manual_seed(1))),
    "sampled_infonce": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                                     lambda i, t, ls: sampled_infonce(i, t, ls.exp(), num_negatives=2,
                                                                      generator=torch.Generator().manual_seed(1))),
    "dcl": lambda r, g: ((r(4, 3), r(4, 3), r(())), lambda i, t, ls: LF.dcl(i, t, ls.exp())),
    "sample_temperature-query": lambda r, g: ((r(4, 3), r(4, 3), r(4) / 4, r(4) / 4, r(())),
                                              lambda i, t, a, b, ls: sample_temperature(
                                                  F.normalize(i, dim=-1), F.normalize(t, dim=-1), a, b, ls.exp())),
    "sample_temperature-candidate": lambda r, g: ((r(4, 3), r(4, 3), r(4) / 4, r(4) / 4, r(())),
                                                  lambda i, t, a, b, ls: sample_temperature(
                                                      F.normalize(i, dim=-1), F.normalize(t, dim=-1), a, b, ls.exp(),
                                                      side="candidate")),
    "probabilistic-proposal": lambda r, g: ((r(4, 3), r(4, 3), r(4) / 4, r(4) / 4),
                                            lambda i, t, a, b: LF.probabilistic(i, t, a, b, mode="proposal")),
    "probabilistic-gaussian": lambda r, g: ((r(4, 3), r(4, 3), r(4) / 4, r(4) / 4),
                                            lambda i, t, a, b: LF.probabilistic(i, t, a, b, mode="gaussian")),
    "damsm": lambda r, g: ((r(3, 4, 3), r(3, 5, 3), r(3, 3), r(3, 3)),
                           lambda reg, w, i, t: LF.damsm(reg, None, w, torch.tensor(
                               [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool),
                               image=i, text=t)),
    "cyclip": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                            lambda i, t, ls: LF.cyclip(i, t, ls.exp(), lambda_in=0.3, lambda_cross=0.7)),
    "hn_nce": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                            lambda i, t, ls: LF.hn_nce(i, t, ls.exp(), alpha=0.8, beta=0.5)),
    "cloob": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                           lambda i, t, ls: LF.cloob(i, t, 3 * ls.exp(), hopfield_beta=2.0)),
    "pcmepp-isotropic": lambda r, g: ((r(4, 3), r(4, 3), r(4) / 4, r(4) / 4, r(()), r(())),
                                      lambda i, t, si, st, a, b: LF.pcmepp(i, t, si, st, a, b, vib_beta=0.3)),
    "pcmepp-per_dim": lambda r, g: ((r(4, 3), r(4, 3), r(4, 3) / 4, r(4, 3) / 4, r(()), r(())),
                                    lambda i, t, si, st, a, b: LF.pcmepp(i, t, si, st, a, b, vib_beta=0.3)),
    # gcl's value depends on its new states and sg(s), which carry no gradient by design, so its gradient is
    # not the derivative of its value. With eps far above every state (x eps) the states drop out of the value
    # (to ~1e-11) and the derivative is the gradient it defines, through the features and the scale
    # (tests/test_losses_gcl_meru.py checks the temperature term against a reference with frozen states).
    "gcl": lambda r, g: ((r(4, 3), r(4, 3), r(())),
                         lambda i, t, ls: 1e12 * LF.gcl(F.normalize(i, dim=-1), F.normalize(t, dim=-1), 2 * ls.exp(),
                                                        torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=torch.float64),
                                                        torch.tensor([1.5, 0.3, 0.0, 0.8], dtype=torch.float64),
                                                        gamma=0.7, temperature_term=False, eps=1e12)[0]),
    "meru": lambda r, g: ((r(4, 3), r(4, 3), r(()), r(()), r(()), r(())),
                          lambda i, t, ls, ai, at, lc: LF.meru(i, t, ls.exp(), ai / 2, at / 2, lc / 2,
                                                               entail_weight=0.5, min_radius=0.3)),
    "filip": lambda r, g: ((r(3, 4, 3), r(3, 5, 3), r(())),
                           lambda x, y, ls: LF.filip(x, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
                                                                     dtype=torch.bool),
                                                     y, torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                                      [1, 1, 1, 0, 0]], dtype=torch.bool),
                                                     ls.exp())),
}


def test_gradcheck_covers_every_family():
    assert {k.split("-")[0] for k in GRADCHECKS} == ALL_NAMES == set(LOSSES)


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradcheck(name):
    g, r = _gradcheck_inputs()
    inputs, fn = GRADCHECKS[name](r, g)
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    # damsm has ~100 inputs: fast mode checks random directions of the Jacobian instead of every column
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=name == "damsm")


# -- closed forms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 8])
def test_infonce_equal_logits_give_ln_n(n):
    image = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1).expand(n, 5)
    text = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1).expand(n, 5)
    loss = LF.infonce(image, text, 37.0)
    assert loss.item() == pytest.approx(math.log(n), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("bias", [-10.0, 0.0, 3.0])
def test_siglip_at_zero_similarity(bias):
    n = 4
    eye = torch.eye(2 * n, dtype=torch.float64)
    image, text = eye[:n], eye[n:]  # every image orthogonal to every caption
    b = torch.tensor(bias, dtype=torch.float64)
    per_row = F.softplus(-b) + (n - 1) * F.softplus(b)
    assert LF.siglip(image, text, 10.0, bias).item() == pytest.approx(per_row.item(), rel=1e-12)


def test_identity_targets_equal_class_index_targets():
    logits = torch.randn(6, 6, dtype=torch.float64)
    assert torch.allclose(F.cross_entropy(logits, torch.eye(6, dtype=torch.float64)),
                          F.cross_entropy(logits, torch.arange(6)), rtol=1e-14, atol=0)


def test_multi_positive_equals_infonce_when_groups_are_distinct():
    emb = random_embeddings(n=6, groups=False)
    image, text = F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)
    expected = LF.infonce(image, text, 14.0)
    groups = torch.tensor([5, 3, 9, 0, 1, 2])
    assert torch.allclose(LF.multi_positive(image, text, 14.0, groups, groups), expected, rtol=1e-14, atol=0)
    module = build(("multi_positive", {}))
    assert torch.allclose(module(emb).loss, build(("infonce", {}))(emb).loss, rtol=1e-6, atol=0)
    shared = torch.tensor([0, 0, 1, 1, 2, 2])
    assert not torch.allclose(LF.multi_positive(image, text, 14.0, shared, shared), expected)


def test_tutorial_collapse_is_a_stationary_point():
    """All embeddings equal: predictions and (gradient-carrying) targets are uniform, the loss is ln N and
    its gradient is exactly zero; InfoNCE on the same input still pushes (its targets are the pairing)."""
    n = 5
    image = torch.randn(1, 4, dtype=torch.float64).expand(n, 4).clone().requires_grad_()
    text = image.detach().clone().requires_grad_()
    loss = LF.soft_targets(image, text, 1.0, mode="tutorial")
    assert loss.item() == pytest.approx(math.log(n), rel=1e-12)
    gi, gt = torch.autograd.grad(loss, [image, text])
    assert gi.abs().max() < 1e-12 and gt.abs().max() < 1e-12
    info = LF.infonce(image + 0.01 * torch.randn(n, 4, dtype=torch.float64), text, 10.0)
    assert torch.autograd.grad(info, image)[0].abs().max() > 1e-3


def test_soft_targets_fixed_gradient_treats_targets_as_constants():
    """The fixed mode's gradient (image, text, temperature) is the gradient of the same cross-entropy with
    the targets frozen as constants; this manual version is itself gradchecked."""
    emb = random_embeddings(n=5)
    image, text = F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)
    tau = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        m = (image @ image.T + text @ text.T) / 2 / tau
    q_rows, q_cols = m.softmax(1), m.softmax(0).T

    def frozen(i, t, temperature):
        logits = i @ t.T / temperature
        return (-(q_rows * logits.log_softmax(1)).sum(1).mean()
                - (q_cols * logits.T.log_softmax(1)).sum(1).mean()) / 2

    inputs = [x.clone().requires_grad_() for x in (image, text, tau)]
    assert torch.autograd.gradcheck(frozen, inputs)
    ours = LF.soft_targets(*inputs, mode="fixed")
    ref = frozen(*inputs)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # the tutorial mode, by contrast, differentiates through its targets
    tut = [x.clone().requires_grad_() for x in (emb.image, emb.text)]
    loss = LF.soft_targets(*tut, 1.0, mode="tutorial")
    with torch.no_grad():
        q = torch.softmax((tut[0] @ tut[0].T + tut[1] @ tut[1].T) / 2, dim=-1)
    logits = tut[1] @ tut[0].T
    detached = (-(q * logits.log_softmax(1)).sum(1) - (q.T * logits.T.log_softmax(1)).sum(1)).mean() / 2
    assert torch.allclose(loss, detached, rtol=1e-12)
    assert not torch.allclose(torch.autograd.grad(loss, tut[0])[0], torch.autograd.grad(detached, tut[0])[0])


def test_dcl_single_item_has_no_negatives():
    image, text = torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert LF.dcl(image, text, 10.0).item() == pytest.approx(-6.0)


def test_nce_is_seedable_and_samples_other_items():
    a = sample_negatives(7, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_negatives(7, 50, torch.Generator().manual_seed(3)))
    assert a.shape == (2, 7, 50)
    assert not (a == torch.arange(7)[None, :, None]).any(), "an anchor sampled itself as a negative"
    assert set(a.unique().tolist()) == set(range(7))
    emb = random_embeddings(n=6)
    args = (F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1), 10.0)
    l1 = LF.nce(*args, num_negatives=2, generator=torch.Generator().manual_seed(0))
    l2 = LF.nce(*args, num_negatives=2, generator=torch.Generator().manual_seed(0))
    l3 = LF.nce(*args, num_negatives=2, generator=torch.Generator().manual_seed(1))
    assert l1 == l2 and l1 != l3


# -- stability ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("precision", ["float32", "bf16-autocast", "fp16-inputs"])
def test_stable_at_scale_100_low_precision_and_tiny_batches(case, n, precision):
    module = build(case, torch.float32)
    if module.log_scale is not None:
        with torch.no_grad():
            module.log_scale.fill_(LOG_SCALE_MAX)
    emb = random_embeddings(n=n, dim=16, dtype=torch.float32, seed=n)
    emb.text = emb.image + 1e-3 * emb.text  # near-identical pairs: the sharpest logits at scale 100
    if precision == "fp16-inputs":
        emb = emb.map(lambda t: t.half() if t.is_floating_point() else t)
    finite_loss_and_grads(module, emb, torch.bfloat16 if precision == "bf16-autocast" else None)


@pytest.mark.parametrize("case", [("probabilistic", {"mode": "proposal"}), ("probabilistic", {"mode": "gaussian"}),
                                  ("pcmepp", {"vib_beta": 0.1})], ids=case_id)
@pytest.mark.parametrize("ln_std", [LN_STD_MIN, LN_STD_MAX, -50.0, 50.0, "mixed"])
def test_variance_families_stable_at_the_clamp_edges(case, ln_std):
    module = build(case, torch.float32)
    emb = random_embeddings(n=8, dim=64, dtype=torch.float32)
    if ln_std == "mixed":
        emb.image_ln_std = torch.tensor([LN_STD_MIN, LN_STD_MAX] * 4)
        emb.text_ln_std = torch.tensor([-50.0, 50.0] * 4)
    else:
        emb.image_ln_std = torch.full((8,), float(ln_std))
        emb.text_ln_std = torch.full((8,), float(ln_std))
    finite_loss_and_grads(module, emb)
    assert torch.isfinite(module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)).all()


# -- degenerate input --------------------------------------------------------------------------------------
DEGENERATE = {
    "empty": (lambda e: e.map(lambda t: t[:0]), "empty batch"),
    "mismatched": (lambda e: Embeddings(**{**e.__dict__, "text": e.text[:, :-1]}), "same shape"),
    "nan": (lambda e: Embeddings(**{**e.__dict__, "image": e.image.clone().index_fill_(0, torch.tensor([1]),
                                                                                        float("nan"))}), "NaN"),
    "inf": (lambda e: Embeddings(**{**e.__dict__, "text": e.text.clone().index_fill_(0, torch.tensor([0]),
                                                                                       float("inf"))}), "inf"),
}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", sorted(DEGENERATE))
def test_degenerate_input_raises_a_clear_error(case, kind):
    module = build(case)
    make, message = DEGENERATE[kind]
    with pytest.raises(ValueError, match=message):
        module(make(random_embeddings(n=4)))


@pytest.mark.parametrize("fn,args", [
    (LF.infonce, (2.0,)), (LF.siglip, (2.0, -1.0)), (LF.soft_targets, (1.0,)), (LF.dcl, (2.0,)),
    (lambda i, t: LF.nce(i, t, 2.0, num_negatives=2), ()),
    (lambda i, t: LF.multi_positive(i, t, 2.0, torch.arange(3), torch.arange(3)), ()),
    (lambda i, t: LF.probabilistic(i, t, torch.zeros(3), torch.zeros(3)), ()),
    (LF.cyclip, (2.0,)), (LF.hn_nce, (2.0,)), (LF.cloob, ()),
    (lambda i, t: LF.pcmepp(i, t, torch.zeros(3), torch.zeros(3), 5.0, 5.0), ()),
])
def test_functional_rejects_nan_and_mismatched_shapes(fn, args):
    good = torch.randn(3, 4)
    with pytest.raises(ValueError, match="NaN"):
        fn(good, torch.full((3, 4), float("nan")), *args)
    with pytest.raises(ValueError, match="same shape"):
        fn(good, torch.randn(2, 4), *args)


def test_specific_errors():
    emb = random_embeddings(n=4)
    emb.word_mask[2] = False
    with pytest.raises(ValueError, match=r"word_mask leaves no real entry for item\(s\) \[2\]"):
        build(("damsm", {}))(emb)
    with pytest.raises(ValueError, match="needs regions and words"):
        build(("damsm", {}))(Embeddings(emb.image, emb.text))
    with pytest.raises(ValueError, match="needs image_ln_std and text_ln_std"):
        build(("probabilistic", {}))(Embeddings(emb.image, emb.text))
    with pytest.raises(ValueError, match=r"text_ln_std must have shape \[N\] = \[4\]"):
        LF.probabilistic(emb.image, emb.text, torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="image_groups must be an integer tensor"):
        LF.multi_positive(emb.image, emb.text, 1.0, torch.zeros(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"num_negatives \(option model\.loss_args\.num_negatives\) must be an integer >= 0, got -1"):
        LF.nce(emb.image, emb.text, 1.0, num_negatives=-1)
    for name, bad in (("soft_targets", "exact"), ("probabilistic", "laplace")):
        with pytest.raises(ValueError, match=f"unknown mode '{bad}'.*choose one of"):
            build_loss(name, mode=bad)


def test_unknown_loss_name_lists_every_registered_family():
    with pytest.raises(ValueError) as info:
        build_loss("clip_loss")
    for name in ALL_NAMES:
        assert name in str(info.value)


# -- module contract ---------------------------------------------------------------------------------------
EXPECTED_TERMS = {"infonce": {"i2t", "t2i"}, "siglip": {"positive", "negative"}, "soft_targets": {"i2t", "t2i"},
                  "multi_positive": {"i2t", "t2i", "positives"}, "nce": {"i2t", "t2i"}, "dcl": {"i2t", "t2i"},
                  "probabilistic": {"i2t", "t2i", "image_ln_std", "text_ln_std"},
                  "sample_temperature": {"i2t", "t2i", "image_ln_std", "text_ln_std"},
                  "damsm": {"sentence", "word"}, "cyclip": {"i2t", "t2i", "in_modal", "cross_modal"},
                  "hn_nce": {"i2t", "t2i"}, "cloob": {"i2t", "t2i"}, "filip": {"i2t", "t2i"},
                  "pcmepp": {"bce", "vib", "image_ln_std", "text_ln_std"}, "meru": {"i2t", "t2i", "entailment"},
                  "sampled_infonce": {"i2t", "t2i"}}
EXPECTED_NEEDS = {"multi_positive": {"groups"}, "probabilistic": {"image_ln_std", "text_ln_std"},
                  "sample_temperature": {"image_ln_std", "text_ln_std"},
                  "damsm": {"regions", "words"}, "pcmepp": {"image_ln_std", "text_ln_std"},
                  "filip": {"regions", "words"}}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_terms_needs_and_defaults(case):
    name, _ = case
    module = build(case)
    out = module(random_embeddings(n=5))
    assert set(out.terms) == EXPECTED_TERMS[name]
    assert out.loss.dim() == 0 and all(t.dim() == 0 for t in out.terms.values())
    assert set(module.needs) == EXPECTED_NEEDS.get(name, set())
    scalars = module.scalars()
    defaults = {"infonce": 1 / 0.07, "dcl": 1 / 0.07, "multi_positive": 1 / 0.07, "siglip": 10.0, "nce": 10.0,
                "cyclip": 1 / 0.07, "hn_nce": 1 / 0.07, "filip": 1 / 0.07, "cloob": 30.0, "pcmepp": 5.0,
                "meru": 1 / 0.07, "sampled_infonce": 1 / 0.07, "sample_temperature": 1 / 0.07}
    if name in defaults:
        assert scalars["scale"] == pytest.approx(defaults[name], rel=1e-6)
    if name == "siglip":
        assert scalars["bias"] == pytest.approx(-10.0)
    if name == "nce":
        assert scalars["bias"] == pytest.approx(-math.log(3))
    if name == "pcmepp":
        assert (scalars["a"], scalars["b"]) == (5.0, 5.0)
    if name == "cloob":  # the paper's fixed 1/tau
        assert not module.log_scale.requires_grad


def test_damsm_defaults_and_padding_is_ignored():
    module = build(("damsm", {}))
    assert (module.gamma1, module.gamma2, module.gamma3) == (4.0, 5.0, 10.0)
    emb = random_embeddings(n=4)
    loss = module(emb).loss
    padded = Embeddings(**{**emb.__dict__, "words": emb.words.masked_fill(~emb.word_mask[..., None], 1e3)})
    assert torch.allclose(module(padded).loss, loss, rtol=1e-12)
    longer = Embeddings(**{**emb.__dict__, "words": F.pad(emb.words, (0, 0, 0, 3), value=7.0),
                           "word_mask": F.pad(emb.word_mask, (0, 3), value=False),
                           "regions": F.pad(emb.regions, (0, 0, 0, 2), value=-5.0),
                           "region_mask": F.pad(torch.ones(4, 5, dtype=torch.bool), (0, 2), value=False)})
    assert torch.allclose(module(longer).loss, loss, rtol=1e-12)


def test_probabilistic_similarity_ranks_by_the_training_logits():
    module = build(("probabilistic", {}), torch.float32)
    emb = random_embeddings(n=6, dtype=torch.float32)
    sim = module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    i, t = F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)
    d = torch.cdist(i, t) ** 2
    i2t = -emb.text_ln_std[None] - d / emb.text_ln_std[None].exp() ** 2
    t2i = -emb.image_ln_std[:, None] - d / emb.image_ln_std[:, None].exp() ** 2
    assert torch.allclose(sim, (i2t + t2i) / 2, rtol=1e-5, atol=1e-5)
    # equal variances: the ranking is the cosine ranking
    zeros = torch.zeros(6)
    same = module.similarity(emb.image, emb.text, zeros, zeros)
    assert torch.equal(same.argsort(1), (i @ t.T).argsort(1))
