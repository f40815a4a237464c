"""Logging: loguru everywhere, one line per event, written around progress bars (not through them)."""

from __future__ import annotations

import sys

from loguru import logger
from tqdm import tqdm

FORMAT = "<green>{time:HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | <cyan>{extra[role]}</cyan> | {message}"


def setup(role: str, level: str = "INFO") -> None:
    """Send log lines through tqdm.write so they appear above any progress bar."""
    logger.remove()
    logger.configure(extra={"role": role})
    logger.add(
        lambda msg: tqdm.write(msg, end="", file=sys.stderr),
        format=FORMAT,
        level=level,
        colorize=sys.stderr.isatty(),
    )
