"""smolcluster: train one PyTorch model on a few machines with a synchronous gradient-averaging
parameter server.

The public API (each name is imported on first use, so `import smolcluster` loads no torch):

- `Job`: your model, data and loss as a job; `job.main()` makes your script the server, a worker,
  or a whole local cluster (see `smolcluster.api`).
- `load_config(cluster_path, nn_path, overrides)`: the validated `Config` the CLI would use.
- `Config`: the typed configuration (sections `cluster`, `training`, `model`, `dataset`, `wandb`).
- `SmolclusterError`: the base of every error smolcluster expects (each has an `exit_code`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "Job", "SmolclusterError", "load_config"]

_WHERE = {"Job": "smolcluster.api", "Config": "smolcluster.config", "load_config": "smolcluster.config",
          "SmolclusterError": "smolcluster.errors"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'smolcluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
