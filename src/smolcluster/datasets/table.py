"""csv: a table with one sample per row, read with the standard library's csv module, in memory.

Keys: `path`, `label_column` (header name or 0-based index), `feature_columns` (default: every
other column), `header` (default true), `test_path` or else `test_fraction` (a seeded split of the
rows, see data.py). Blank lines are skipped; the file is UTF-8 (a byte-order mark is fine).

- Labels: when every label of both files is an integer >= 0, they are the class indices (classes:
  the largest + 1). Otherwise they are names, numbered in sorted order (numeric order when all are
  numbers, so -1 and 1 become 0 and 1).
- Features: float32, standardised per column with the mean and standard deviation of the training
  rows (a constant column is only centred). Why: columns in different units (metres beside grams)
  otherwise need different learning rates, and an MLP trains poorly on raw scales. The training
  rows alone decide, so nothing of the test set leaks into training, and every machine computes
  the same numbers from the same file.
- Every flaw in a file is one DataFileError (exit code 2) naming the file, the row (its 1-based
  line in the file) and the column: a missing file, a missing column, a cell that is not a finite
  number, a row with too few or too many cells, a file with no data rows.
"""

from __future__ import annotations

import csv
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.config import DatasetConfig
from smolcluster.datasets import Data, DataMeta, Split, file_path
from smolcluster.errors import DataFileError, cut


@dataclass
class Table:
    path: Path
    names: list[str] | None  # the header, if the file has one
    header_line: int  # line of the header (or of the first data row)
    rows: list[tuple[int, list[str]]]  # (line, cells) of every data row

    def column(self, j: int) -> str:
        return f"column {self.names[j]!r} (index {j})" if self.names else f"column {j}"

    def where(self, line: int, j: int | None = None) -> str:
        return f"{self.path}: row {line}" + (f", {self.column(j)}" if j is not None else "")

    def index(self, spec: str | int, key: str) -> int:
        width = len(self.names) if self.names else len(self.rows[0][1])
        if isinstance(spec, int):
            if spec >= width:
                raise DataFileError(f"{self.where(self.header_line)}: no column {spec} (dataset.{key}): "
                                    f"the file has {width} columns, 0..{width - 1}")
            return spec
        if self.names is None:
            raise DataFileError(f"{self.path}: dataset.{key} names column {spec!r}, but dataset.header is false: "
                                "give its 0-based index")
        if spec not in self.names:
            raise DataFileError(f"{self.where(self.header_line)}: no column {spec!r} (dataset.{key}); "
                                f"the header has {cut(', '.join(self.names))}")
        return self.names.index(spec)


def read(path: Path, header: bool) -> Table:
    """Every non-blank row of `path` with its line number; ragged rows are an error here."""
    try:
        f = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except OSError as e:
        raise DataFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    rows: list[tuple[int, list[str]]] = []
    with f:
        reader = csv.reader(f)
        try:
            rows = [(reader.line_num, row) for row in reader if row]
        except csv.Error as e:
            raise DataFileError(f"{path}: row {reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataFileError(f"{path}: row {reader.line_num + 1}: not UTF-8 text ({e.reason})") from None
    if not rows:
        raise DataFileError(f"{path}: row 1: the file is empty")
    names = None
    header_line = rows[0][0]
    if header:
        names = [n.strip() for n in rows.pop(0)[1]]
        if not rows:
            raise DataFileError(f"{path}: row {header_line + 1}: no data rows after the header")
    table = Table(path, names, header_line, rows)
    width, source = (len(names), "the header") if names else (len(rows[0][1]), f"row {rows[0][0]}")
    for line, cells in rows:
        if len(cells) < width:
            raise DataFileError(f"{table.where(line, len(cells))}: missing ({len(cells)} cells, {source} has {width})")
        if len(cells) > width:
            raise DataFileError(f"{path}: row {line}, column {width}: one too many ({len(cells)} cells, "
                                f"{source} has {width})")
    return table


def columns(table: Table, cfg: DatasetConfig, like: Table | None = None) -> tuple[int, list[int]]:
    """(label column, feature columns) of `table`; a test file `like` the training one matches it by name."""
    label = table.index(cfg.label_column, "label_column")
    if cfg.feature_columns is not None:
        features = [table.index(c, f"feature_columns[{i}]") for i, c in enumerate(cfg.feature_columns)]
    elif like is not None and like.names and table.names:
        _, theirs = columns(like, cfg)
        features = [table.index(like.names[j], "feature_columns") for j in theirs]
    else:
        width = len(table.names) if table.names else len(table.rows[0][1])
        features = [j for j in range(width) if j != label]
    if label in features:
        raise DataFileError(f"{table.where(table.header_line, label)}: is the label (dataset.label_column) "
                            "and a feature (dataset.feature_columns)")
    if not features:
        raise DataFileError(f"{table.path}: no feature columns besides the label {table.column(label)}")
    return label, features


def numbers(table: Table, features: list[int]) -> torch.Tensor:
    values = array("d")
    for line, cells in table.rows:
        for j in features:
            try:
                v = float(cells[j])
            except ValueError:
                raise DataFileError(f"{table.where(line, j)}: expected a number, got {cut(repr(cells[j]), 60)}") from None
            if not math.isfinite(v):
                raise DataFileError(f"{table.where(line, j)}: expected a finite number, got {cut(repr(cells[j]), 60)}")
            values.append(v)
    return torch.frombuffer(values, dtype=torch.float64).view(len(table.rows), len(features)).clone()


def labels(tables: list[tuple[Table, int]]) -> tuple[list[torch.Tensor], int]:
    """Class indices of each table's rows, and the number of classes (see the module docstring)."""
    raw = []
    for table, j in tables:
        cells = []
        for line, row in table.rows:
            cells.append(row[j].strip())
            if not cells[-1]:
                raise DataFileError(f"{table.where(line, j)}: empty label")
        raw.append(cells)
    every = {v for cells in raw for v in cells}
    if all(v.isascii() and v.isdigit() for v in every):  # 0, 7, 012: class indices
        ys = [torch.tensor([int(v) for v in cells], dtype=torch.int64) for cells in raw]
        return ys, max(int(y.max()) for y in ys) + 1
    try:
        order = sorted(every, key=float)
    except ValueError:
        order = sorted(every)
    index = {v: i for i, v in enumerate(order)}
    return [torch.tensor([index[v] for v in cells], dtype=torch.int64) for cells in raw], len(order)


def load(cfg: DatasetConfig, seed: int) -> Data:
    assert cfg.path is not None and cfg.label_column is not None  # DatasetConfig checks both
    train = read(file_path(cfg.root, cfg.path), cfg.header)
    label, features = columns(train, cfg)
    x = numbers(train, features)
    if cfg.test_path:
        test = read(file_path(cfg.root, cfg.test_path), cfg.header)
        test_label, test_features = columns(test, cfg, like=train)
        (y, y_test), classes = labels([(train, label), (test, test_label)])
        x_test = numbers(test, test_features)
    else:
        from smolcluster.data import split_test

        (y_all,), classes = labels([(train, label)])
        keep, held = split_test(len(y_all), cfg.test_fraction, seed)
        x, x_test, y, y_test = x[keep], x[held], y_all[keep], y_all[held]
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std[std == 0] = 1.0
    x, x_test = ((x - mean) / std).float(), ((x_test - mean) / std).float()
    return Data(Split(x, y), Split(x_test, y_test), DataMeta("classify", classes, (len(features),)))
