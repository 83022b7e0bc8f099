"""Text tower: a transformers encoder, from a hub/local name or built from a config (offline default).

Returns a pooled sentence feature and the token features ("words", used by DAMSM) with a mask that keeps
real word tokens only: padding and the BERT-style [CLS]/[SEP] specials are excluded, since attending from
a [SEP] token to image regions means nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig

# A BERT small enough to train on two CPU cores in minutes; hidden sizes match timm's test_vit scale.
TINY_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class TextTower(nn.Module):
    def __init__(self, name: Optional[str] = None, config: Optional[dict] = None, vocab_size: int = 8000,
                 pad_token_id: int = 0, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unknown text pooling {pooling!r} (option model.text_pooling); choose 'mean' or 'cls'")
        self.pooling = pooling
        if name:
            try:
                self.model = AutoModel.from_pretrained(name)
            except OSError as err:
                raise ValueError(f"cannot load text model {name!r} (option model.text_model): {err}. Offline, "
                                 "leave model.text_model empty to build a small BERT from model.text_config") from err
        else:
            cfg = BertConfig(**{**TINY_BERT, **(config or {}), "vocab_size": vocab_size, "pad_token_id": pad_token_id})
            self.model = AutoModel.from_config(cfg, add_pooling_layer=False)
        self.num_features = self.model.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (pooled [N, H], words [N, L, H], word_mask [N, L] bool)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens: converges faster than [CLS] for a randomly initialised encoder
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        # words: drop [CLS] (position 0) and [SEP] (last real token) under right padding
        word_mask = mask.clone()
        word_mask[:, 0] = False
        last = mask.long().sum(1) - 1
        word_mask[torch.arange(len(last), device=last.device), last.clamp_min(0)] = False
        # a one-token caption would otherwise have no words at all: keep its only token
        empty = ~word_mask.any(1)
        word_mask[empty] = mask[empty]
        return pooled, hidden, word_mask
