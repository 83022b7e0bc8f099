"""GradCache (`model.negatives_from`): one loss over k micro-batches gives the gradient of one big batch."""
from __future__ import annotations

import torch

from lightning_clip.module import ClipModule


def _batches(k=3, n=4, length=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, 3:] = 0
        out.append(dict(image=torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
                        input_ids=torch.randint(5, 50, (n, length), generator=g) * mask, attention_mask=mask))
    return out


def _module(dropout: float, loss="infonce"):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    m = ClipModule(loss=loss, embed_dim=16, text_config=cfg, vocab_size=50, image_size=32, negatives_from=3)
    return m.double().train()


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_close(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_gradcache_equals_one_big_batch_without_dropout():
    m = _module(0.0)
    batches = _batches()
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    m.zero_grad()
    m._compute_loss(m(big)).loss.backward()
    reference = _grads(m)
    m.zero_grad()
    out, n = m.gradcache_backward([(b, m._rng_state()) for b in batches])
    assert n == 12
    _assert_close(_grads(m), reference)


def test_gradcache_replays_dropout():
    m = _module(0.3)
    batches = _batches()
    states = []
    for _ in batches:  # distinct, known RNG states per micro-batch
        states.append(m._rng_state())
        torch.rand(1)
    # reference: all k forwards with graph, under the same RNG states, one loss
    m.zero_grad()
    embs = []
    for b, st in zip(batches, states):
        m._set_rng_state(st)
        embs.append(m(b))
    full = type(embs[0])(image=torch.cat([e.image for e in embs]), text=torch.cat([e.text for e in embs]))
    m._compute_loss(full).loss.backward()
    reference = _grads(m)
    m.zero_grad()
    m.gradcache_backward(list(zip(batches, states)))
    _assert_close(_grads(m), reference)
    # and dropout really is on: a different RNG state changes the gradient
    m.zero_grad()
    m.gradcache_backward([(b, states[0]) for b in batches])
    other = _grads(m)
    assert any(not torch.allclose(other[k], reference[k]) for k in reference)
