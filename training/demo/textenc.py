"""Word-level tokenizer and a tiny transformer text encoder for the demo world.

Token ids: 0 = PAD, 1 = BOS, 2 = EOS, then the world's vocabulary. Every caption becomes
``[BOS, words..., EOS, PAD...]`` of fixed length (16), so BOS sits at position 0 as in CLIP
(soft tokens are inserted right after it). The empty caption (CFG's unconditional branch)
is ``[BOS, EOS, PAD...]``. The encoder is trained together with the tiny UNet and frozen
afterwards.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")


class WordTokenizer:
    """Fixed vocabulary, fixed length. Unknown words raise ValueError."""

    def __init__(self, words: list, length: int = 16):
        self.words = list(words)
        self.length = length
        self.ids = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.words)

    def __call__(self, texts: list) -> torch.Tensor:
        """LongTensor (N, length) of token ids."""
        out = torch.full((len(texts), self.length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"unknown word(s) {unknown} in {text!r}; the demo vocabulary is {self.words}")
            if len(words) + 2 > self.length:
                raise ValueError(f"caption {text!r} has {len(words)} words; at most {self.length - 2} fit")
            ids = [BOS] + [self.ids[w] for w in words] + [EOS]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


class TinyTextEncoder(nn.Module):
    """Token + position embeddings, a few pre-norm transformer layers, a final LayerNorm."""

    def __init__(self, vocab_size: int, length: int = 16, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, width) context; attention sees the whole sequence."""
        return self.norm(self.blocks(self.tok(ids) + self.pos[: ids.shape[1]]))
