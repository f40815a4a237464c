"""The built-in datasets (csv, image_folder, text), import-path datasets and their config keys,
each from real files written into tmp_path."""

from __future__ import annotations

import dataclasses
import gzip
import sys
import uuid

import pytest
import torch

from smolcluster import data
from smolcluster.config import DatasetConfig, load_config
from smolcluster.datasets import DataMeta, Split
from smolcluster.errors import ConfigError, DataFileError


def csv_config(path, **kw) -> DatasetConfig:
    return DatasetConfig(name="csv", path=str(path), **{"label_column": "species", **kw})


IRIS = """sepal,petal,colour,species
5.1,1.4,1,setosa
7.0,4.7,2,versicolor
6.3,6.0,3,virginica
4.9,1.4,1,setosa
6.4,4.5,2,versicolor
5.8,5.1,3,virginica
"""

# --- csv ------------------------------------------------------------------------------------


def test_csv_with_header_string_labels_and_a_feature_subset(tmp_path):
    (tmp_path / "iris.csv").write_text(IRIS)
    (tmp_path / "test.csv").write_text("species,petal,sepal,colour\nvirginica,5.5,6.5,3\n")
    d = data.load_data(csv_config(tmp_path / "iris.csv", feature_columns=["petal", "sepal"],
                                  test_path=str(tmp_path / "test.csv")), seed=0)
    assert d.meta == DataMeta("classify", 3, (2,), identity=d.meta.identity)
    assert isinstance(d.train, Split) and d.train.x.dtype == torch.float32
    assert d.train.y.tolist() == [0, 1, 2, 0, 1, 2]  # names in sorted order
    assert d.test.y.tolist() == [2]
    petal = torch.tensor([1.4, 4.7, 6.0, 1.4, 4.5, 5.1], dtype=torch.float64)
    mean, std = petal.mean(), petal.std(unbiased=False)
    assert torch.allclose(d.train.x[:, 0], ((petal - mean) / std).float())  # standardised by the training rows
    assert abs(float(d.test.x[0, 0]) - float((5.5 - mean) / std)) < 1e-5  # by name, whatever the test file's order


def test_csv_without_header_by_index_with_integer_labels_and_a_seeded_test_split(tmp_path):
    rows = "\n".join(f"{i},{i * 2},{i % 4}" for i in range(40)) + "\n\n"  # a trailing blank line is skipped
    (tmp_path / "t.csv").write_text(rows)
    cfg = DatasetConfig(name="csv", path=str(tmp_path / "t.csv"), label_column=2, header=False, test_fraction=0.25)
    d = data.load_data(cfg, seed=5)
    assert (len(d.train), len(d.test)) == (30, 10) and d.meta.classes == 4 and d.meta.input_shape == (2,)
    keep, held = data.split_test(40, 0.25, 5)
    assert d.test.y.tolist() == [i % 4 for i in held.tolist()]
    assert data.load_data(cfg, seed=5).test.y.tolist() == d.test.y.tolist()
    assert not torch.equal(data.split_test(40, 0.25, 6)[1], held)
    assert len(data.load_data(dataclasses.replace(cfg, train_size=7), 5).train) == 7


def test_split_test_follows_its_documented_rule():
    import random

    rng = random.Random("smolcluster-test:3")
    draws = [rng.random() for _ in range(20)]
    perm = sorted(range(20), key=lambda i: draws[i])
    keep, held = data.split_test(20, 0.1, seed=3)
    assert held.tolist() == sorted(perm[:2]) and keep.tolist() == sorted(perm[2:])


BAD_CSV = [
    # (file text or None for no file, expected pieces of the message)
    (None, ["file not found"]),
    ("sepal,petal,colour\n1,2,3\n", ["row 1", "column", "'species'"]),
    ("sepal,petal,colour,species\n1,2,3,a\n4,x5,6,b\n", ["row 3", "column 'petal' (index 1)", "'x5'"]),
    ("sepal,petal,colour,species\n1,2,3,a\n\n4,5,b\n", ["row 4", "column 'species' (index 3)", "missing"]),
    ("sepal,petal,colour,species\n1,2,3,a\n4,5,6,b,7\n", ["row 3", "column 4", "one too many"]),
    ("sepal,petal,colour,species\n1,nan,3,a\n", ["row 2", "column 'petal' (index 1)", "finite"]),
    ("", ["row 1", "empty"]),
    ("sepal,petal,colour,species\n", ["row 2", "no data rows"]),
]


@pytest.mark.parametrize("text, pieces", BAD_CSV)
def test_every_bad_csv_is_one_data_file_error_naming_file_row_and_column(tmp_path, text, pieces):
    path = tmp_path / "bad.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataFileError) as e:
        data.load_data(csv_config(path), seed=0)
    assert e.value.exit_code == 2 and isinstance(e.value, ConfigError)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for piece in pieces:
        assert piece in message, message


def test_the_cli_reports_a_bad_csv_in_one_line_with_exit_code_2(tmp_path, capsys):
    from smolcluster.cli import main

    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    code = main(["server", "--set", "dataset.name=csv", "--set", f"dataset.path={path}",
                 "--set", "dataset.label_column=label", "--set", "cluster.join_timeout=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert f"{path}: row 3, column 'b' (index 1): expected a number, got 'oops'" in err[-1]


def test_csv_config_is_checked_up_front():
    with pytest.raises(ConfigError, match="^label_column: the csv dataset needs it"):
        DatasetConfig(name="csv", path="x.csv")
    with pytest.raises(ConfigError, match="^path: the csv dataset needs it"):
        DatasetConfig(name="csv", label_column=0)
    with pytest.raises(ConfigError, match="^label_column: MNIST does not read it"):
        DatasetConfig(label_column="y")
    with pytest.raises(ConfigError, match="^label_column: expected an integer .* not a number, got '3'"):
        DatasetConfig(name="csv", path="x.csv", label_column="3")
    with pytest.raises(ConfigError, match="^augment: only for images"):
        DatasetConfig(name="csv", path="x.csv", label_column=0, augment=True)
    with pytest.raises(ConfigError, match="^test_fraction: expected a fraction 0 < x < 1"):
        DatasetConfig(name="csv", path="x.csv", label_column=0, test_fraction=1.0)


# --- image_folder ---------------------------------------------------------------------------


def write_images(root, classes=("cat", "dog", "emu"), per_class=4, size=(8, 6)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, "RGB").save(root / c / f"{i}.png")


def test_image_folder_classes_sizes_and_grayscale(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", classes=("dog",), per_class=2)
    cfg = DatasetConfig(name="image_folder", path=str(tmp_path / "train"), test_path=str(tmp_path / "test"))
    d = data.load_data(cfg, 0)
    assert d.meta.classes == 3 and d.meta.input_shape == (3, 6, 8)  # (C, H, W) of an 8x6 image
    assert isinstance(d.train, Split) and d.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.test.y.tolist() == [1, 1] and float(d.train.x.min()) >= -1 and float(d.train.x.max()) <= 1
    gray = data.load_data(DatasetConfig(name="image_folder", path=str(tmp_path / "train"), grayscale=True,
                                        image_size=[5, 4], test_fraction=0.25), 0)
    assert gray.meta.input_shape == (1, 5, 4) and (len(gray.train), len(gray.test)) == (9, 3)


def test_image_folder_beyond_memory_mb_is_read_per_item_with_the_same_values(tmp_path):
    write_images(tmp_path / "imgs")
    cfg = DatasetConfig(name="image_folder", path=str(tmp_path / "imgs"), image_size=4)
    eager = data.load_data(cfg, 0)
    lazy = data.load_data(DatasetConfig(name="image_folder", path=str(tmp_path / "imgs"), image_size=4, memory_mb=0), 0)
    assert not hasattr(lazy.train, "batch") and lazy.meta == eager.meta  # identity included
    idx = torch.arange(len(eager.train))
    for a, b in zip(data.fetch(eager.train, idx), data.fetch(lazy.train, idx)):
        assert torch.equal(a, b)


def test_image_folder_flaws_are_data_file_errors_naming_the_file(tmp_path):
    write_images(tmp_path / "imgs", classes=("a",), per_class=2)
    write_images(tmp_path / "imgs", classes=("b",), per_class=2, size=(5, 5))
    cfg = DatasetConfig(name="image_folder", path=str(tmp_path / "imgs"), test_fraction=0.5)
    with pytest.raises(DataFileError, match=r"b/\d\.png: decodes to \(3, 5, 5\), the first image to \(3, 6, 8\); set dataset.image_size"):
        data.load_data(cfg, 0)
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFileError, match=r"broken\.png: not a readable image"):
        data.load_data(DatasetConfig(name="image_folder", path=str(tmp_path / "imgs"), image_size=4), 0)
    with pytest.raises(DataFileError, match="nowhere: not a folder"):
        data.load_data(DatasetConfig(name="image_folder", path=str(tmp_path / "nowhere")), 0)


# --- text -----------------------------------------------------------------------------------

TEXT = "to be or not to be, that is the question.\n" * 5


def test_text_windows_vocabulary_and_the_usual_split(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(TEXT.encode()))
    d = data.load_data(DatasetConfig(name="text", path=str(tmp_path / "t.txt"), context=8), 0)
    vocab = "".join(sorted(set(TEXT)))
    cut = int(len(TEXT) * 0.9)
    assert d.meta == DataMeta("lm", len(vocab), (8,), vocab, d.meta.identity)
    assert (len(d.train), len(d.test)) == (cut - 8, len(TEXT) - cut - 8)
    x, y = d.train[3]
    assert "".join(vocab[i] for i in x) == TEXT[3:11] and "".join(vocab[i] for i in y) == TEXT[4:12]
    assert x.dtype == y.dtype == torch.int64
    tx, ty = d.test[0]
    assert "".join(vocab[i] for i in tx) == TEXT[cut : cut + 8]
    bx, by = d.train.batch(torch.tensor([3, 0]))  # one fancy index for a batch
    assert torch.equal(bx[0], x) and torch.equal(by[0], y)
    shard = data.partition(len(d.train), 2, 0)[1]  # the partition deals out window starts
    sx, _ = data.take(d.train, shard).batch(torch.tensor([0]))
    assert torch.equal(sx[0], d.train[int(shard[0])][0])
    gz = data.load_data(DatasetConfig(name="text", path=str(tmp_path / "t.txt.gz"), context=8), 0)
    assert gz.meta == d.meta and torch.equal(gz.train.tokens, d.train.tokens)


def test_text_with_a_test_file_shares_one_vocabulary_and_short_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("abcabcabcabc")
    (tmp_path / "b.txt").write_text("xyzxyz")
    d = data.load_data(DatasetConfig(name="text", path=str(tmp_path / "a.txt"), test_path=str(tmp_path / "b.txt"),
                                     context=3), 0)
    assert d.meta.vocab == "abcxyz" and len(d.train) == 9 and d.test[0][0].tolist() == [3, 4, 5]
    with pytest.raises(DataFileError, match=r"b\.txt: 6 characters of test text, not more than dataset.context \(6\)"):
        data.load_data(DatasetConfig(name="text", path=str(tmp_path / "a.txt"), test_path=str(tmp_path / "b.txt"),
                                     context=6), 0)


def test_the_shipped_tinyshakespeare_is_the_default_text():
    d = data.load_data(DatasetConfig(name="text", train_size=1000), 0)
    assert d.meta.classes == 65 and len(d.train) == 1000 and len(d.test) == 111_540 - 64
    assert d.meta.vocab[:3] == "\n !"


# --- import-path datasets -------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into tmp_path (the current directory); returns its name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def write(source: str) -> str:
        name = f"userdata_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    return write


PAIRS = """
import torch
def load(n=20, scale=1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g) * scale
    return (x, torch.arange(n) % 5), (x[:4], torch.tensor([0, 1, 2, 7]))
"""

ITEMS = """
import torch
from torch.utils.data import Dataset
class Squares(Dataset):
    def __len__(self): return 12
    def __getitem__(self, i): return torch.full((2, 2), float(i)), i % 3
def load():
    return Squares(), Squares()
"""

DATA = """
import torch
from smolcluster.datasets import Data, DataMeta, Split
def load(context):
    t = torch.arange(40).view(10, 4) % 7
    return Data(Split(t, t[:, 0]), Split(t[:2], t[:2, 0]), DataMeta("lm", 7, (context,), "abcdefg"))
"""


def test_an_import_path_returning_tensor_pairs_gets_the_sections_keys(user_module, tmp_path):
    name = user_module(PAIRS)
    (tmp_path / "nn.yaml").write_text(f"dataset:\n  name: {name}:load\n  n: 30\n  scale: 2.0\n")
    cfg = load_config(None, tmp_path / "nn.yaml").dataset
    assert cfg.options == {"n": 30, "scale": 2.0}
    d = data.load_data(cfg, 0)
    assert isinstance(d.train, Split) and len(d.train) == 30
    assert d.meta.task == "classify" and d.meta.classes == 8 and d.meta.input_shape == (3,)  # label 7 in test


def test_an_import_path_returning_datasets_or_data(user_module):
    d = data.load_data(DatasetConfig(name=f"{user_module(ITEMS)}:load", test_size=5), 0)
    assert not hasattr(d.train, "batch") and (len(d.train), len(d.test)) == (12, 5)
    assert d.meta.classes == 3 and d.meta.input_shape == (2, 2)
    cfg = DatasetConfig(name=f"{user_module(DATA)}:load", context=4)  # a built-in's key is the callable's too
    assert cfg.options == {"context": 4} and cfg.context == 64
    lm = data.load_data(cfg, 0)
    assert lm.meta.task == "lm" and lm.meta.vocab == "abcdefg" and lm.meta.identity["train"] == 10


@pytest.mark.parametrize("source, name, message", [
    (None, "no_such_module_here:load", r"dataset.name: no module 'no_such_module_here' \(looked in the current directory"),
    (PAIRS, "{m}:nope", r"dataset.name: module '{m}' \(.*\) has no 'nope'"),
    ("raise RuntimeError('boom')", "{m}:load", r"dataset.name: importing '{m}' failed: RuntimeError: boom"),
    ("import torch\ndef load(): return torch.zeros(3)", "{m}:load", r"returned tensor\(\[0\., 0\., 0\.\]\); expected \(train, test\)"),
    ("import torch\ndef load(): return torch.zeros(3), torch.zeros(2)", "{m}:load", r"returned one tensor \(3,\) as the training set"),
    ("import torch\ndef load(): return (torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))", "{m}:load",
     r"y must be \(n,\) integer class indices"),
    ("def load(): return [1, 2], [3]", "{m}:load", r"returned a list as the training set"),
    ("def load(other): pass", "{m}:load", r"cannot take the section's keys \['n'\] as keyword arguments"),
])
def test_import_path_failures_are_config_errors_naming_dataset_name(user_module, source, name, message):
    m = user_module(source) if source else ""
    with pytest.raises(ConfigError, match=message.format(m=m)):
        data.load_data(DatasetConfig(name=name.format(m=m), options={"n": 1} if "other" in (source or "") else {}), 0)


# --- identity -------------------------------------------------------------------------------


def test_identity_is_stable_and_tells_different_data_apart(tmp_path):
    syn = DatasetConfig(name="synthetic", train_size=500, test_size=100)
    a, b = data.load_data(syn, 1).meta.identity, data.load_data(syn, 1).meta.identity
    assert a == b and a["train"] == 500 and a["test"] == 100 and len(a["sha256"]) == 64
    assert data.load_data(syn, 2).meta.identity["sha256"] != a["sha256"]
    (tmp_path / "a.csv").write_text(IRIS)
    (tmp_path / "b.csv").write_text(IRIS.replace("6.3,6.0", "6.3,6.1"))
    ids = [data.load_data(csv_config(tmp_path / f), 0).meta.identity for f in ("a.csv", "b.csv")]
    assert ids[0]["sha256"] != ids[1]["sha256"]
    named = data.load_data(csv_config(tmp_path / "a.csv", version="iris-v1"), 0).meta.identity
    assert named == {"train": 5, "test": 1, "version": "iris-v1"}


def test_identity_of_mnist_takes_milliseconds():
    import time

    d = data.load_data(DatasetConfig(), 0)
    start = time.perf_counter()
    ident = data.identity(d.train, d.test, d.meta, 0)
    assert time.perf_counter() - start < 0.2 and ident == d.meta.identity


def test_the_image_transform_is_what_a_transforms_v2_compose_gives(tmp_path):
    from PIL import Image
    from torchvision.transforms import v2

    from smolcluster.datasets.images import transform_for

    write_images(tmp_path / "imgs", classes=("a",), per_class=1)
    cfg = DatasetConfig(name="image_folder", path=str(tmp_path / "imgs"), image_size=[5, 7])
    compose = v2.Compose([v2.ToImage(), v2.Resize((5, 7), antialias=True), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize([0.5] * 3, [0.5] * 3)])
    with Image.open(tmp_path / "imgs" / "a" / "0.png") as img:
        rgb = img.convert("RGB")
    assert torch.equal(transform_for(cfg)(rgb), compose(rgb))
