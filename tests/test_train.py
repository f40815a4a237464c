"""The shared training arithmetic: the configured loss and the metrics of each task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.config import ConfigError, TrainingConfig, load_config
from smolcluster.data import Split
from smolcluster.train import cross_entropy, make_loss, metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_cross_entropy_is_the_mean_over_every_target_of_a_language_model():
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    expected = torch.stack([F.cross_entropy(logits[b, t : t + 1], targets[b, t : t + 1])
                            for b in range(3) for t in range(5)]).mean()
    torch.testing.assert_close(cross_entropy(logits, targets), expected)
    images, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert torch.equal(cross_entropy(images, labels), F.cross_entropy(images, labels))
    assert make_loss(TrainingConfig()) is cross_entropy


def test_a_loss_by_import_path_is_called_with_logits_and_targets(tmp_path, monkeypatch):
    (tmp_path / "my_losses_a.py").write_text(
        "import torch.nn.functional as F\n\n"
        "def smoothed(logits, targets):\n"
        "    return F.cross_entropy(logits, targets, label_smoothing=0.1)\n\n"
        "def per_sample(logits, targets):\n"
        "    return F.cross_entropy(logits, targets, reduction='none')\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, None, ["training.loss=my_losses_a:smoothed"]).training
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert torch.equal(make_loss(cfg)(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"training.loss: my_losses_a:per_sample returned shape \[4\], expected a scalar"):
        make_loss(TrainingConfig(loss="my_losses_a:per_sample"))(logits, targets)
    with pytest.raises(ConfigError, match="training.loss: my_losses_a has no nope"):
        make_loss(TrainingConfig(loss="my_losses_a:nope"))


def test_an_unknown_loss_fails_at_load_time():
    with pytest.raises(ConfigError, match="--set training.loss: expected cross_entropy or package.module:callable, got 'mse'"):
        load_config(None, None, ["training.loss=mse"])


def test_classify_metrics_are_the_old_evaluate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    split = Split(torch.randn(50, 1, 3, 4), torch.randint(0, 3, (50,)))
    m = metrics(model, split, batch_size=7)
    with torch.no_grad():
        logits = model(split.x)
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, split.y)), rel=1e-6)
    assert m["accuracy"] == 100.0 * int((logits.argmax(1) == split.y).sum()) / 50
    assert set(m) == {"loss", "accuracy"}


class Uniform(nn.Module):
    """Logits that say nothing: every character equally likely, so the loss is ln(vocab)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dropout = nn.Dropout(0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert not self.training, "metrics must evaluate in eval mode"
        return torch.zeros(*idx.shape, self.vocab)


def test_lm_metrics_are_loss_per_character_and_bits_per_character():
    split = Split(torch.randint(0, 16, (9, 8)), torch.randint(0, 16, (9, 8)))
    model = Uniform(16).train()
    m = metrics(model, split, "lm", batch_size=4)
    assert set(m) == {"loss", "bpc"} and model.training  # put back in training mode
    assert m["loss"] == pytest.approx(math.log(16)) and m["bpc"] == pytest.approx(4.0)
    custom = metrics(model, split, "lm", loss=lambda logits, y: cross_entropy(logits, y) * 2)
    assert custom["bpc"] == pytest.approx(8.0)


def test_lm_metrics_weigh_every_character_alike():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 5)).eval()
    split = Split(torch.randint(0, 5, (10, 6)), torch.randint(0, 5, (10, 6)))
    whole = float(cross_entropy(model(split.x), split.y).detach())
    assert metrics(model, split, "lm", batch_size=3)["loss"] == pytest.approx(whole, rel=1e-6)
    assert metrics(model, split, "lm", loss=cross_entropy, batch_size=3)["loss"] == pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="task: expected 'classify' or 'lm'"):
        metrics(model, split, "regress")
