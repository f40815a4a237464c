"""GPT: a small character-level transformer in nanoGPT's shape (karpathy/nanoGPT's model.py).

Token and learned position embeddings, `n_layer` pre-LayerNorm blocks (causal self-attention,
then a 4x-wide GELU MLP, each added back to the residual stream), a final LayerNorm, and an
output layer that is the token embedding itself (weight tying).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from smolcluster.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, heads, T, C/heads): every head attends on its own slice
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class FeedForward(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """idx (B, T) int64 token ids, T <= context -> logits (B, T, vocab) for the token after each."""

    def __init__(self, vocab: int, context: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        # GPT-2's initialisation: N(0, 0.02) everywhere, and the projections that add into the
        # residual stream scaled down by sqrt(2 * n_layer) (two per block), so the stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
            elif name.endswith("weight") and p.dim() == 2:  # Linear and Embedding weights
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):  # Linear's (LayerNorm's start at zero anyway)
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"GPT: a sequence of {t} tokens, but the model has {self.context} positions "
                             "(model.context)")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        # The output layer is the token embedding transposed (weight tying): one tensor in the
        # state_dict and on the wire, not two copies of the same values.
        return F.linear(self.ln_f(x), self.wte.weight)


def build(cfg: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    return GPT(cfg.out, cfg.context, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """`idx` (B, T) followed by `tokens` sampled tokens, each conditioned on at most the model's
    last `context` tokens; temperature 0 always takes the likeliest, top_k > 0 samples among the
    k likeliest only. Draws come from `generator` alone: one seed, one text."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(tokens):
            logits = model(idx[:, -model.context:])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    return idx
