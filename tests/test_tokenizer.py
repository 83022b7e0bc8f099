"""Offline tokenizers: the synthetic closed vocabulary, a trained WordPiece and the "auto" resolution."""
from __future__ import annotations

import random

import pytest

from lightning_clip.data import synthetic as syn
from lightning_clip.data.synthetic import synthetic_tokenizer
from lightning_clip.models.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece


def test_synthetic_tokenizer_has_one_token_per_word():
    tok = synthetic_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.pad_token_id == 0 and len(tok) == len(syn.vocabulary()) + 4
    rng = random.Random(0)
    for _ in range(50):
        text = syn.sample_caption(syn.sample_scene(rng), rng)["text"]
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids[1:-1]) == text.replace(",", " , ").split()


def test_trained_wordpiece_lowercases_and_pads_with_zero():
    corpus = ["A Dog runs on the grass .", "a dog jumps", "The dog and the cat"] * 20
    tok = train_wordpiece(corpus, vocab_size=200)
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2
    enc = tok(["A DOG runs"], padding="max_length", max_length=8)
    assert tok.convert_ids_to_tokens(enc["input_ids"][0][:5]) == ["[CLS]", "a", "dog", "runs", "[SEP]"]
    assert enc["input_ids"][0][5:] == [0, 0, 0]


def test_auto_prefers_tokenizer_json_beside_the_shards(tmp_path):
    root = syn.generate(tmp_path / "w", num_train=8, num_val=4)
    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    tok = load_tokenizer("auto", shards, cache_dir=tmp_path / "cache", captions=iter(()))
    assert len(tok) == len(synthetic_tokenizer()) and not (tmp_path / "cache").exists()


def test_auto_trains_and_caches_outside_the_shard_folder(tmp_path):
    shard = tmp_path / "ro" / "x-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    caps = ["a man rides a horse", "two dogs play in the snow"] * 10
    tok = load_tokenizer("auto", [str(shard)], cache_dir=tmp_path / "cache", captions=iter(caps), vocab_size=300)
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1 and list(shard.parent.iterdir()) == [shard]
    again = load_tokenizer("auto", [str(shard)], cache_dir=tmp_path / "cache", captions=None, vocab_size=300)
    assert again("two dogs")["input_ids"] == tok("two dogs")["input_ids"]


def test_unknown_name_fails_with_the_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="data.tokenizer='no-such/tokenizer-xyz'"):
        load_tokenizer("no-such/tokenizer-xyz")


def test_the_tokenizer_module_imports_nothing_of_the_data_package():
    # the one import circle (data.synthetic -> models.tokenizer -> data.synthetic) stays cut: the world
    # hands its vocabulary to the tokenizer, never the other way round
    import ast
    import inspect

    from lightning_clip.models import tokenizer

    tree = ast.parse(inspect.getsource(tokenizer))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("lightning_clip.data")], imported


def test_caption_encoder_rows_equal_the_tokenizer_and_the_memo_starts_over_when_full():
    import torch

    from lightning_clip.models.tokenizer import CaptionEncoder

    corpus = ["A Dog runs on the grass .", "a dog jumps", "The dog and the cat sat on a very long mat today"]
    tok = train_wordpiece(corpus * 20, vocab_size=200)
    enc = CaptionEncoder(tok, max_length=6, capacity=3)
    # repeats, a caption longer than max_length (truncated), then new captions past the capacity
    for batch in (corpus + corpus[:1], corpus[::-1], ["a cat", "the grass", corpus[0]]):
        ids, mask = enc(batch)
        ref = tok(batch, padding="max_length", truncation=True, max_length=6, return_tensors="pt")
        assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(batch), 6)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
        assert len(enc._rows) <= 3
