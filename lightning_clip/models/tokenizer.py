"""Offline tokenizers: a closed vocabulary (`tokenizer_from_words`; the synthetic world builds its own from
its words, `lightning_clip.data.synthetic.synthetic_tokenizer`) or a small WordPiece trained on captions.
This module imports nothing of `lightning_clip.data`: the data side hands words and captions in.

Both are `transformers.PreTrainedTokenizerFast` with ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3`` and a
``[CLS] ... [SEP]`` template, lower-casing and BERT pre-tokenisation, so a whole word is (usually) one
token: the DAMSM loss treats token features as words.

`load_tokenizer(spec, train_shards)` resolves the ``data.tokenizer`` option:
- ``"auto"``: ``tokenizer.json`` beside the train shards (written by the synthetic generator), else a
  WordPiece trained on the train captions and cached under ``data/tokenizers/<hash>.json`` (never in the
  shard folder, which may be read-only);
- a path to a ``tokenizer.json`` file;
- anything else goes to ``transformers.AutoTokenizer.from_pretrained`` (a hub name needs the network).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from lightning_clip.files import atomic_write

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _wrap(backend) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=512)


def _pipeline(model):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, decoders

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", SPECIAL_TOKENS.index("[CLS]")), ("[SEP]", SPECIAL_TOKENS.index("[SEP]"))])
    return tok


def tokenizer_from_words(words: Sequence[str]):
    """A WordPiece tokenizer whose vocabulary is exactly the special tokens plus ``words``."""
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    return _wrap(_pipeline(WordPiece(vocab=vocab, unk_token="[UNK]")))


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4000):
    """Train a lower-cased WordPiece on ``texts`` (a few seconds for Flickr8k's 30k captions)."""
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    tok = _pipeline(WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                               show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_tokenizer_file(path: str | os.PathLike):
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(path)))


def shard_list_hash(shards: Sequence[str]) -> str:
    """Identifies a training set by its shard names and sizes (cheap; no need to read the data)."""
    h = hashlib.sha1()
    for s in sorted(shards):
        h.update(str(Path(s).resolve()).encode())
        h.update(str(os.path.getsize(s) if os.path.exists(s) else -1).encode())
    return h.hexdigest()[:16]


def load_tokenizer(spec: str, train_shards: Sequence[str] = (), cache_dir: str | os.PathLike = "data/tokenizers",
                   captions: Iterable[str] | None = None, vocab_size: int = 4000):
    """Resolve the ``data.tokenizer`` option (see the module docstring).

    ``train_shards`` is the expanded shard list; ``captions`` (an iterable of training captions) is
    consumed only when a WordPiece has to be trained.
    """
    if spec != "auto":
        if spec.endswith(".json") and Path(spec).is_file():
            return load_tokenizer_file(spec)
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # OSError offline, ValueError for unknown names
            raise ValueError(f"data.tokenizer={spec!r}: not 'auto', not a tokenizer.json file, and "
                             f"transformers.AutoTokenizer could not load it ({e})") from e
    if train_shards:
        first = Path(sorted(train_shards)[0]).parent
        for cand in (first / "tokenizer.json", first.parent / "tokenizer.json"):
            if cand.is_file():
                return load_tokenizer_file(cand)
    cached = Path(cache_dir) / f"{shard_list_hash(train_shards)}-{vocab_size}.json"
    if cached.is_file():
        return load_tokenizer_file(cached)
    if captions is None:
        raise ValueError("data.tokenizer='auto' found no tokenizer.json beside the train shards and has no "
                         "captions to train a WordPiece on")
    tok = train_wordpiece(captions, vocab_size=vocab_size)
    atomic_write(cached, tok.backend_tokenizer.to_str())  # concurrent runs never read half a tokenizer
    return tok


class CaptionEncoder:
    """Captions -> ``(input_ids, attention_mask)``, each ``[B, max_length]`` long, padded to ``max_length``
    and truncated, exactly as ``tokenizer(captions, padding="max_length", truncation=True)`` gives them.

    Each caption is tokenised once and its row kept: a loader worker sees the same captions again every
    epoch (the synthetic world has a few thousand distinct ones), and the fast tokenizer's per-call Python
    (building one ``Encoding`` conversion per caption) is a large share of what a training sample costs
    the worker. At most ``capacity`` rows are kept; past that the memo starts over.
    """

    def __init__(self, tokenizer, max_length: int, capacity: int = 200_000):
        self.tokenizer, self.max_length, self.capacity = tokenizer, max_length, capacity
        self._rows: dict[str, tuple] = {}

    def __call__(self, captions: Sequence[str]):
        import torch

        distinct = dict.fromkeys(captions)
        missing = [c for c in distinct if c not in self._rows]
        if missing:
            if len(self._rows) + len(missing) > self.capacity:
                self._rows.clear()
                missing = list(distinct)
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            self._rows.update(zip(missing, zip(tok["input_ids"].long(), tok["attention_mask"].long())))
        rows = [self._rows[c] for c in captions]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
