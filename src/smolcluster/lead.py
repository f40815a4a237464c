"""What the process that leads a run does, on either backend: evaluate the test set, checkpoint,
resume, save the model and write the summary.

On the `ps` backend the server leads; on `torch`, rank 0 (worker 1). Both inherit these methods,
so their files are the same in every byte of format: that is what lets a checkpoint cross
backends and makes every summary.json read alike.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from smolcluster.checkpoint import load_checkpoint, save_checkpoint
from smolcluster.config import Config, diff_fingerprints
from smolcluster.errors import ClusterError
from smolcluster.results import Counters, headline, save_model, step_ms_stats, write_summary
from smolcluster.train import metrics

if TYPE_CHECKING:
    import torch
    from torch import nn

    from smolcluster.data import Split
    from smolcluster.datasets import DataMeta
    from smolcluster.flat import FlatModel
    from smolcluster.train import LossFn
    from smolcluster.web import Board


class Lead:
    """A mixin: the leading process sets these attributes, then calls the methods below."""

    cfg: Config
    model: nn.Module
    flat: FlatModel
    optimizer: torch.optim.Optimizer
    meta: DataMeta
    test: Split
    loss: LossFn
    fingerprint: dict[str, Any]
    step: int
    """The step being run (0-based)."""
    total_steps: int
    steps_per_epoch: float
    board: Board | None
    evals: list[dict[str, Any]]
    counters: Counters
    t_train: float
    """When training started (time.monotonic())."""
    eval_s: float
    """Seconds spent evaluating: left out of the evaluations' training time."""
    bytes_moved: int
    devices: dict[str, str]
    step_times: list[float]

    def _resume(self) -> None:
        """Parameters, optimizer state, step, evaluations and counters from out_dir/checkpoints."""
        root = Path(self.cfg.training.out_dir) / "checkpoints"
        ckpt = load_checkpoint(root, self.flat, self.optimizer)
        diffs = diff_fingerprints(self.fingerprint, ckpt.info.get("fingerprint", {}))
        if diffs:
            raise ClusterError(f"checkpoint in {root} is from another job: " + "; ".join(diffs[:5]))
        self.step = ckpt.step
        self.evals = ckpt.info.get("evals", [])
        known = {f.name for f in dataclasses.fields(Counters)}
        saved = ckpt.info.get("counters", {})
        self.counters = Counters(**{k: int(v) for k, v in saved.items() if k in known and isinstance(v, int)})
        logger.info(f"resuming from {root} at step {self.step}/{self.total_steps}")

    def _evaluate(self) -> dict[str, Any]:
        """The test metrics that fit the task: loss and accuracy, or loss and bits per character;
        with the training time so far (evaluations left out) and the bytes moved, also appended
        to out_dir/evals.jsonl as they come (time to accuracy, read while the run goes on)."""
        t0 = time.monotonic()
        measured = metrics(self.model, self.test, self.meta.task, self.loss)
        result = {"step": self.step + 1, "epoch": round((self.step + 1) / self.steps_per_epoch, 3),
                  **{f"test_{k}": v for k, v in measured.items()},
                  "time_s": round(t0 - self.t_train - self.eval_s, 3), "bytes": self.bytes_moved}
        self.eval_s += time.monotonic() - t0
        self.evals.append(result)
        if self.board is not None:
            self.board.evaluation(result)
        with open(Path(self.cfg.training.out_dir) / "evals.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        logger.info(f"step {self.step + 1}/{self.total_steps}: {headline(result, loss=True)}")
        return result

    def _checkpoint(self) -> None:
        root = Path(self.cfg.training.out_dir) / "checkpoints"
        info = {"epoch": (self.step + 1) / self.steps_per_epoch, "fingerprint": self.fingerprint,
                "evals": self.evals, "counters": dataclasses.asdict(self.counters)}
        path = save_checkpoint(root, self.flat, self.optimizer, self.step + 1, info, self.cfg.cluster.keep_checkpoints)
        logger.info(f"step {self.step + 1}: checkpoint written to {path}")
        if self.board is not None:
            self.board.event("checkpoint", f"step {self.step + 1}: checkpoint {path.name}")

    def _save(self, summary: dict[str, Any]) -> None:
        out = Path(self.cfg.training.out_dir)
        save_model(self.model, self.cfg.model, out / "model.safetensors", {
            "smolcluster.dataset": json.dumps(dataclasses.asdict(self.cfg.dataset)),
            "smolcluster.seed": str(self.cfg.cluster.seed),
        }, meta=self.meta)
        write_summary(summary, out / "summary.json")

    def _summary_of(self, final: dict[str, Any], wall_s: float, train_s: float, samples: int,
                    **extra: Any) -> dict[str, Any]:
        """summary.json: the same keys on both backends (`extra` adds a backend's own, in its place)."""
        c = self.counters
        return {
            **{k: v for k, v in final.items() if k.startswith("test_")},
            "task": self.meta.task,
            "backend": self.cfg.cluster.backend,
            "steps": self.total_steps,
            "epochs": self.total_steps / self.steps_per_epoch,
            "workers": self.cfg.cluster.num_workers,
            "wall_s": round(wall_s, 3),
            "train_s": round(train_s, 3),
            "samples_per_s": round(samples / max(train_s, 1e-9), 1),
            "step_ms": step_ms_stats(self.step_times),
            "bytes_moved": self.bytes_moved,
            "late_gradients": c.late,
            "nonfinite_gradients": c.nonfinite,
            "outlier_gradients": c.outliers,
            "rollbacks": c.rollbacks,
            "workers_dropped": c.dropped,
            "workers_rejoined": c.rejoined,
            "connections_refused": c.refused,
            "connections_shed": extra.pop("connections_shed", 0),
            "replica_mismatches": c.replica_mismatches,
            "drift_resyncs": c.drift_resyncs,
            "periodic_resyncs": c.periodic_resyncs,
            "devices": self.devices,
            **extra,
            "evals": self.evals,
            "checksum": self.flat.checksum(),
            "config": self.cfg.to_dict(),
        }
