"""smolcluster from Python: your own model, data and loss, trained by the same server and workers.

    import smolcluster

    job = smolcluster.Job(model=make_model, data=load_data, loss=my_loss,
                          overrides=["cluster.num_workers=2", "training.num_epochs=1"])
    if __name__ == "__main__":
        raise SystemExit(job.main())

Then the script is the job on every machine, with the CLI's subcommands and flags:

    python my_job.py run                  # a local cluster, like `smolcluster run`
    python my_job.py server               # on the server machine
    python my_job.py worker --id 2        # on worker machine 2

`run` starts the server and the workers by running the same script again (so it must build the
job the same way each time, and start it under `if __name__ == "__main__"`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

Loss = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass
class Job:
    """What to train: each part is optional and falls back to the config's (`model.*`, `dataset.*`,
    `training.loss`).

    model: a callable with no arguments returning an `nn.Module`; called under the run's seed, so
        every replica starts from the same weights.
    data: a callable with no arguments returning `(train, test)`, or that pair itself; each is a
        `torch.utils.data.Dataset` whose items are `(x, y)`, or an `(x, y)` pair of tensors.
    loss: `(output, target) -> scalar mean loss`; default: cross-entropy.
    overrides: `KEY=VALUE` config overrides applied before the command line's `--set`s.
    cluster_config / nn_config: YAML files to start from (default: as the CLI finds them).
    """

    model: Callable[[], nn.Module] | None = None
    data: Any = None
    loss: Loss | None = None
    overrides: list[str] = field(default_factory=list)
    cluster_config: str | None = None
    nn_config: str | None = None
    version: str | None = None
    """Names this job's data for the handshake instead of a digest of it (say, a dataset release)."""

    def main(self, argv: list[str] | None = None) -> int:
        """Run the subcommand on the command line (`run`, `server`, `worker --id K`, `eval`); the exit code."""
        from smolcluster.cli import main

        return main(sys.argv[1:] if argv is None else argv, job=self)

    @property
    def program(self) -> list[str]:
        """How `run` starts this job's server and workers: this script, run again."""
        return [sys.executable, os.path.abspath(sys.argv[0])]
