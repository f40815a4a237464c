"""Progress for long work: a tqdm bar on a terminal, a plain log line every few seconds otherwise.

Under `smolcluster run` the children are not on a terminal; they print machine-readable
`@progress {...}` lines instead (SMOLCLUSTER_PROGRESS=json) and the parent draws one bar each.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from loguru import logger
from tqdm import tqdm

PROGRESS_PREFIX = "@progress "


class Progress:
    """Steps done out of `total`, with a few live numbers (loss, steps/s) beside them."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = 10.0) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.json = os.environ.get("SMOLCLUSTER_PROGRESS") == "json"
        self.every_s = 0.5 if self.json else every_s
        self._bar = None
        if not self.json and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
        self._t0 = self._last = time.monotonic()
        self._n0 = initial
        self._fields: dict[str, Any] = {}
        self._emit()

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += n
        self._fields.update(fields)
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix(self._fields, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        if self._bar is not None:
            return
        if self.json:
            state = {"desc": self.desc, "n": self.n, "total": self.total, **self._fields}
            print(PROGRESS_PREFIX + json.dumps(state), file=sys.stderr, flush=True)
        elif self.n > self._n0:
            rate = (self.n - self._n0) / max(time.monotonic() - self._t0, 1e-9)
            extra = " ".join(f"{k}={v}" for k, v in self._fields.items())
            logger.info(f"{self.desc}: step {self.n}/{self.total} ({rate:.1f} steps/s) {extra}".rstrip())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.n < self.total or self.json:
            self._emit()
