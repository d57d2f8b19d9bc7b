"""A small character-level GPT trained on the Python standard library's own
source files (every machine has them: no download), once per optimizer
configuration from one seed, to compare optimizer memory with quality:

- ``adopt_fp32_state``: ADOPT, float32 params and state (12 bytes per param)
- ``adopt_bf16_state``: float32 params, bf16 exp_avg/exp_avg_sq (8)
- ``adopt_8bit_state``: float32 params, 8-bit exp_avg/exp_avg_sq (~6.06)
- ``adopt_bf16_8bit_master24``: bf16 params, 8-bit state, 24-bit master
  weights (bf16 param + 8-bit remainder: ~5.06)
- ``adamw_fused``: ``torch.optim.AdamW(fused=True)``, the baseline users know (12)

    python examples/gpt_train.py                          # CPU defaults, all runs < 10 min
    python examples/gpt_train.py --device cuda --steps 5000 --layers 6 --dim 384 --context 256 --batch 64

Writes <out>/gpt_train.csv (train and validation loss per evaluation, per
run), <out>/gpt_train.png (the curves) and <out>/gpt_train_summary.csv
(bytes per parameter and final validation loss per run).
"""
import argparse
import csv
import math
import pathlib
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adopt_triton import ADOPT


# ---------------------------------------------------------------- the corpus
def corpus_text(max_chars: int) -> str:
    """The standard library's .py files (sorted paths, tests and vendored
    packages left out), concatenated up to ``max_chars`` characters."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__")
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class Corpus:
    """Characters as token ids (printable ASCII, newline; anything else is
    one shared id), split 90/10 into training and validation text."""

    def __init__(self, max_chars: int):
        text = corpus_text(max_chars)
        self.alphabet = ["\n"] + [chr(c) for c in range(32, 127)] + ["\0"]
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        unknown = len(self.alphabet) - 1
        ids = torch.tensor([index.get(ch, unknown) for ch in text], dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @staticmethod
    def batch(ids: torch.Tensor, batch: int, context: int, gen: torch.Generator, device):
        starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=gen)
        rows = starts[:, None] + torch.arange(context + 1)
        chunk = ids[rows].to(device)
        return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------- the model
class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, dim)
        self.positions = torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, ids, targets):
        return F.cross_entropy(self(ids).float().flatten(0, 1), targets.flatten())
