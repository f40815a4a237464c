"""A user's own training script with a BatchNorm model on the built-in synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # mynets, beside this file

import torch.nn.functional as F  # noqa: E402

import smolcluster  # noqa: E402
from mynets import bn_net  # noqa: E402


def smoothed(logits, targets):
    return F.cross_entropy(logits, targets, label_smoothing=0.05)


job = smolcluster.Job(model=lambda: bn_net(width=6), loss=smoothed,
                      overrides=["dataset.name=synthetic", "training.eval_steps=0", "wandb.mode=disabled"])

if __name__ == "__main__":
    raise SystemExit(job.main())
