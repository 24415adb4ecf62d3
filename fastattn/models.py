"""A transformer text classifier built from stock torch.nn modules (convert it with fastattn.convert)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["TextClassifier", "sinusoidal_positions"]


def sinusoidal_positions(max_len: int, dim: int) -> Tensor:
    """(max_len, dim) float32 table: sin on even features, cos on odd ones, wavelengths up to 10000*2pi."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


class TextClassifier(nn.Module):
    """Token ids -> logits: embedding + sinusoidal positions -> nn.TransformerEncoder -> masked mean -> linear.

    Sequence-first, like the classic movie-review classifier: the encoder is
    ``nn.TransformerEncoder(nn.TransformerEncoderLayer(embedding_dim, nhead, dim_feedforward, dropout),
    num_layers)`` with ``batch_first=False``; ``fastattn.convert(model)`` swaps fastattn's layers in.

    forward(tokens, padding_mask=None):
      tokens: (L, N) int64 token ids. padding_mask: (N, L) bool, True = padding (ignored by attention
      and by the pooling); None = no padding. Returns (N, num_classes) logits.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 100, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 2048, num_classes: int = 1, dropout: float = 0.1, max_len: int = 512,
                 padding_idx: Optional[int] = 0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim), ("nhead", nhead),
                            ("num_layers", num_layers), ("dim_feedforward", dim_feedforward),
                            ("num_classes", num_classes), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextClassifier: argument '{name}' got {value!r}; expected a positive int")
        if embedding_dim % nhead:
            raise ValueError(f"TextClassifier: argument 'embedding_dim' got {embedding_dim}; expected a multiple "
                             f"of nhead={nhead}")
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.register_buffer("positions", sinusoidal_positions(max_len, embedding_dim), persistent=False)
        self.input_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(embedding_dim, nhead, dim_feedforward, dropout, batch_first=False)
        # Sequence-first batches never take the encoder's NestedTensor path, so say so (no warning).
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"shape {tuple(tokens.shape)}, dtype {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens)
            raise ValueError(f"TextClassifier: argument 'tokens' got {got}; expected (L, N) int64 token ids")
        seq_len, batch = tokens.shape
        if seq_len > self.max_len:
            raise ValueError(f"TextClassifier: argument 'tokens' got length {seq_len}; expected at most "
                             f"max_len={self.max_len}")
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (batch, seq_len):
                raise ValueError(f"TextClassifier: argument 'padding_mask' got shape {tuple(padding_mask.shape)}, "
                                 f"dtype {padding_mask.dtype}; expected (N, L) = {(batch, seq_len)} bool, "
                                 "True = padding")
        x = self.embedding(tokens)  # (L, N, E); N(0, 1) entries, the scale of the positions
        x = x + self.positions[:seq_len].unsqueeze(1).to(x.dtype)
        x = self.input_dropout(x)
        x = self.encoder(x, src_key_padding_mask=padding_mask)  # (L, N, E)
        if padding_mask is None:
            pooled = x.mean(dim=0)
        else:
            keep = (~padding_mask).t().unsqueeze(-1).to(x.dtype)  # (L, N, 1)
            pooled = (x * keep).sum(dim=0) / keep.sum(dim=0).clamp_min(1.0)
        return self.classifier(pooled)
