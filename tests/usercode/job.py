"""A user's own training script: their model, data and loss through the Python API."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the user's modules, beside this script

import torch.nn.functional as F  # noqa: E402

import smolcluster  # noqa: E402
from mydata import blobs  # noqa: E402
from mynets import mlp2  # noqa: E402


def smoothed(logits, targets):
    return F.cross_entropy(logits, targets, label_smoothing=0.1)


job = smolcluster.Job(model=lambda: mlp2(hidden=12), data=lambda: blobs(n=768, as_dataset=True), loss=smoothed,
                      overrides=["training.eval_steps=0", "wandb.mode=disabled"])

if __name__ == "__main__":
    raise SystemExit(job.main())
