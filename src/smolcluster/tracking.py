"""Experiment tracking. W&B arrives in a later change; until then every run gets a NullTracker."""

from __future__ import annotations

from typing import Any

from smolcluster.config import Config


class NullTracker:
    """Tracks nothing; a run with tracking off behaves exactly like one with it on."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


def start_tracker(cfg: Config, role: str) -> NullTracker:
    """The tracker for this process (`role`: "server" or "worker-K")."""
    return NullTracker()
