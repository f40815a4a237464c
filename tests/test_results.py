"""Model files: every model and its data's description survive save and load; `smolcluster sample`."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import env, smolcluster
from smolcluster.cli import main
from smolcluster.config import ModelConfig
from smolcluster.errors import ModelFileError
from smolcluster.models import PRESETS, DataShape, buffers, build_model
from smolcluster.results import DATA_KEY, data_meta, load_model, save_model

VOCAB = "\n !',.?abcdefghijklmnopqrstuvwxyz"
TEXT = DataShape("lm", len(VOCAB), (16,), VOCAB)
TINY_GPT = ModelConfig(type="GPT", n_layer=1, n_head=2, n_embd=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_gpt_and_its_vocabulary_survive_save_and_load(tmp_path):
    model = build_model(TINY_GPT, 3, TEXT)
    save_model(model, TINY_GPT, tmp_path / "m.safetensors", {"smolcluster.seed": "3"}, meta=TEXT)
    loaded, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert same_state(model, loaded) and meta["smolcluster.seed"] == "3"
    assert cfg.type == "GPT" and cfg.out == len(VOCAB) and cfg.context == 16  # the sizes the data gave
    assert json.loads(meta["smolcluster.model"])["out"] == len(VOCAB)
    assert data_meta(tmp_path / "m.safetensors", meta) == TEXT
    idx = torch.randint(0, len(VOCAB), (2, 16))
    assert torch.equal(model.eval()(idx), loaded.eval()(idx))


def test_a_batchnorm_cnn_keeps_its_running_statistics(tmp_path):
    cfg = ModelConfig(**PRESETS["CNN-BN"])
    cifar = DataShape("classify", 100, (3, 32, 32))
    model = build_model(cfg, 0, cifar)
    model(torch.randn(8, 3, 32, 32))  # moves the running statistics
    save_model(model, cfg, tmp_path / "m.safetensors", meta=cifar)
    loaded, loaded_cfg, _ = load_model(tmp_path / "m.safetensors")
    assert same_state(model, loaded) and loaded_cfg.out == 100
    assert [n for n, _ in buffers(loaded)] == [n for n, _ in buffers(model)]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_a_file_without_a_data_description_is_an_mnist_model(tmp_path):
    """Files saved before the description existed: explicit sizes, no DATA_KEY."""
    model = build_model(ModelConfig(hidden=16), 0)
    save_model(model, ModelConfig(hidden=16), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert DATA_KEY not in meta and json.loads(meta["smolcluster.model"])["input_dim"] == 784
    loaded, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert same_state(model, loaded) and data_meta(tmp_path / "m.safetensors", meta) is None


@pytest.mark.parametrize("value, message", [
    ("{", "metadata smolcluster.data is not usable"),
    ('{"task": "lm", "classes": 3, "input_shape": [16], "vocab": "ab"}', "vocab has 2 characters, classes says 3"),
    ('{"task": "regress", "classes": 3, "input_shape": [16], "vocab": ""}', "task 'regress' is neither"),
    ('{"task": "lm", "classes": 2, "input_shape": [0], "vocab": "ab"}', "input_shape: expected a list of positive"),
    ('{"task": "lm", "classes": 2, "vocab": "ab"}', "expected a JSON object with task, classes, input_shape"),
])
def test_a_damaged_data_description_is_a_model_file_error(tmp_path, value, message):
    path = tmp_path / "m.safetensors"
    save_model(build_model(TINY_GPT, 0, TEXT), TINY_GPT, path, meta=TEXT)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, DATA_KEY: value})
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_batchnorms_step_counter_must_stay_an_integer(tmp_path):
    path = tmp_path / "m.safetensors"
    cfg = ModelConfig(**PRESETS["CNN-BN"])
    save_model(build_model(cfg, 0), cfg, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["1.num_batches_tracked"] = tensors["1.num_batches_tracked"].float()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="tensor 1.num_batches_tracked is torch.float32, expected torch.int64"):
        load_model(path)


# --- smolcluster sample ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny GPT that has seen a little text (enough to sample something not uniform)."""
    torch.set_num_threads(1)
    text = "to be, or not to be, that is the question.\n" * 4
    ids = torch.tensor([VOCAB.index(c) for c in text])
    x = torch.stack([ids[i : i + 16] for i in range(0, 64, 4)])
    y = torch.stack([ids[i + 1 : i + 17] for i in range(0, 64, 4)])
    model = build_model(TINY_GPT, 0, TEXT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("sample") / "model.safetensors"
    save_model(model, TINY_GPT, path, meta=TEXT)
    return path


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(smolcluster("sample", *args), capture_output=True, text=True, timeout=60,
                          env=env(OMP_NUM_THREADS="1"))


@pytest.mark.timeout(120)
def test_sample_prints_the_prompt_then_the_same_characters_for_the_same_seed(text_model, capsys):
    args = [str(text_model), "--prompt", "to be", "--tokens", "40", "--seed", "5", "--top-k", "10"]
    first = sample(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("to be") and len(first.stdout) == len("to be") + 40 + 1
    assert set(first.stdout) <= set(VOCAB)
    assert main(["sample", *args]) == 0 and capsys.readouterr().out == first.stdout  # another process, same text
    assert main(["sample", *args[:-3], "6", *args[-2:]]) == 0 and capsys.readouterr().out != first.stdout
    refused = sample(str(text_model), "--prompt", "To bé")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--prompt: 2 character(s) the model has never seen: 'T', 'é'" in refused.stderr


def test_temperature_zero_always_takes_the_likeliest(text_model, capsys):
    outputs = []
    for seed in ("1", "2"):
        assert main(["sample", str(text_model), "--prompt", "to", "--tokens", "30", "--temperature", "0",
                     "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2 + 30 + 1


def test_sample_refuses_a_model_that_is_not_a_text_model(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_model(build_model(ModelConfig(hidden=8), 0), ModelConfig(hidden=8), path)
    assert main(["sample", str(path), "--prompt", "hi"]) == 1
    assert main(["sample", str(tmp_path / "missing.safetensors")]) == 1
    assert main(["sample", str(path), "--temperature", "-1"]) == 2
