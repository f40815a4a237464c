"""text: character-level language modelling from one text file, in memory.

Keys: `path` (plain or gzip, told apart by the gzip magic bytes; default: the shipped
data/tinyshakespeare/input.txt.gz), `context` (characters per sample), `test_path` (a second file
for the test set) or else `test_fraction` (default 0.1: the first 90% of the characters train,
the last 10% are the validation/test text, the usual split).

The vocabulary is the sorted unique characters of the whole text (both files with `test_path`);
a character's position in it is its token id (`DataMeta.vocab`). Item i of a split is the window
starting at its i-th character: x = chars[i : i+context], y = chars[i+1 : i+context+1], int64;
a text of n characters has n - context of them. The partition rule (data.py) deals out these
start positions like any other sample indices.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from smolcluster.config import REPO_ROOT, DatasetConfig
from smolcluster.datasets import Data, DataMeta, file_path
from smolcluster.errors import DataFileError

DEFAULT_TEXT = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt.gz"


class Windows(Dataset):
    """Windows of `context` tokens (x) and the same shifted by one (y), starting at `starts`
    (default: every position that leaves room for a whole window)."""

    def __init__(self, tokens: torch.Tensor, context: int, starts: torch.Tensor | None = None) -> None:
        self.tokens, self.context, self.starts = tokens, context, starts
        self.offsets = torch.arange(context)

    def __len__(self) -> int:
        return len(self.starts) if self.starts is not None else max(0, len(self.tokens) - self.context)

    def _start(self, indices: torch.Tensor) -> torch.Tensor:
        return indices if self.starts is None else self.starts[indices]

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(i, torch.Tensor) and i.dim():
            return self.batch(i)
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        s = int(self._start(torch.tensor(i % len(self))))
        return self.tokens[s : s + self.context], self.tokens[s + 1 : s + self.context + 1]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = self._start(indices)[:, None] + self.offsets
        return self.tokens[at], self.tokens[at + 1]

    def subset(self, indices: torch.Tensor) -> Windows:
        return Windows(self.tokens, self.context, self._start(indices))


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # a folder, no permission, a truncated gzip
        raise DataFileError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFileError(f"{path}: row {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text:
        raise DataFileError(f"{path}: row 1: the file is empty")
    return text


def encode(text: str, vocab: str) -> torch.Tensor:
    """Token ids (int64) of `text`; every character must be in the sorted `vocab`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


def load(cfg: DatasetConfig, seed: int) -> Data:
    path = file_path(cfg.root, cfg.path) if cfg.path else DEFAULT_TEXT
    text = read_text(path)
    if cfg.test_path:
        test_file = file_path(cfg.root, cfg.test_path)
        test_text = read_text(test_file)
    else:
        at = int(len(text) * (1 - cfg.test_fraction))
        text, test_text, test_file = text[:at], text[at:], path
    for name, part, where in (("training", text, path), ("test", test_text, test_file)):
        if len(part) <= cfg.context:
            raise DataFileError(f"{where}: {len(part)} characters of {name} text, not more than dataset.context "
                                f"({cfg.context}): no whole window")
    vocab = "".join(sorted(set(text) | set(test_text)))
    meta = DataMeta("lm", len(vocab), (cfg.context,), vocab=vocab)
    return Data(Windows(encode(text, vocab), cfg.context), Windows(encode(test_text, vocab), cfg.context), meta)
