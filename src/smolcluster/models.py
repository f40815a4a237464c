"""The model registry: a model is chosen by name (`model.type`) in nn_config.yaml.

torch is imported where a model is built, not at the top: config validation reads the registry,
and `smolcluster run` or a config error should not wait seconds for torch to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from smolcluster.config import ModelConfig


def _mlp(sizes: list[int]) -> list[nn.Module]:
    from torch import nn

    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


def mlp(cfg: ModelConfig) -> nn.Module:
    """input -> hidden... -> out with ReLUs between; SimpleNN is the one-hidden-layer case."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), *_mlp([cfg.input_dim, *cfg.hidden_sizes, cfg.out]))


def cnn(cfg: ModelConfig) -> nn.Module:
    """3x3 conv + ReLU + 2x2 max-pool stages on 1x28x28 images, then hidden -> out."""
    from torch import nn

    layers: list[nn.Module] = []
    channels, side = 1, 28
    for c in cfg.channels:
        layers += [nn.Conv2d(channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels, side = c, side // 2
    return nn.Sequential(*layers, nn.Flatten(), *_mlp([channels * side * side, *cfg.hidden_sizes, cfg.out]))


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {"SimpleNN": mlp, "MLP": mlp, "CNN": cnn}

PRESETS: dict[str, dict[str, object]] = {
    "SimpleNN": {"hidden": 128},
    "MLP": {"hidden": [512, 256, 128]},
    "CNN": {"hidden": 128, "channels": [16, 32]},
}
"""The sizes `--model NAME` picks (a `--set model.hidden=...` after it still wins)."""


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """The model, initialised from `seed` (only the server's initial weights matter: it sends them)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.type](cfg)


def layout(model: nn.Module) -> list[list[Any]]:
    """Name and shape of every trainable parameter, in wire order."""
    return [[name, list(p.shape)] for name, p in model.named_parameters() if p.requires_grad]
