"""SimpleNN and MLP: flatten, then Linear-ReLU(-Dropout) layers, then the classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from smolcluster.config import ModelConfig


def layers(sizes: list[int], dropout: float = 0.0) -> list[nn.Module]:
    """Linear layers through `sizes`, a ReLU (and dropout) after each but the last.

    No Dropout module when dropout is 0: the state_dict keys ('1.weight', '3.weight', ...) stay
    those of files saved before dropout existed."""
    out: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        out.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            out.append(nn.ReLU())
            if dropout:
                out.append(nn.Dropout(dropout))
    return out


def build(cfg: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """input_dim -> hidden... -> out; SimpleNN is the one-hidden-layer case."""
    return nn.Sequential(nn.Flatten(), *layers([cfg.input_dim, *cfg.hidden_sizes, cfg.out], cfg.dropout))
