"""The model registry, each model's shape, the seeded initialisation, and the flat buffers."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from smolcluster.config import ConfigError, ModelConfig, load_config
from smolcluster.flat import FlatModel
from smolcluster.models import MODELS, PRESETS, buffers, build_model, layout, resolve
from smolcluster.models.gpt import GPT, generate


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@dataclass(frozen=True)
class Meta:
    """A stand-in for the datasets' DataMeta."""

    task: str = "classify"
    classes: int = 10
    input_shape: tuple[int, ...] = (1, 28, 28)
    vocab: str = ""


def text_meta(vocab: str = "abcdefgh", context: int = 16) -> Meta:
    return Meta("lm", len(vocab), (context,), vocab)


def config(preset: str, **changes) -> ModelConfig:
    return ModelConfig(**{**PRESETS[preset], **changes})


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


IMAGE_PRESETS = [name for name, p in PRESETS.items() if p["type"] != "GPT"]


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_every_image_model_maps_mnist_images_to_ten_logits(name):
    model = build_model(config(name), seed=0)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_every_registered_model_has_a_preset():
    assert {p["type"] for p in PRESETS.values()} == set(MODELS)


def test_mlp_takes_any_list_of_hidden_sizes():
    model = build_model(ModelConfig(type="MLP", hidden=[512, 256, 128]), seed=0)
    assert sum(p.numel() for p in model.parameters()) == 567434


def test_same_seed_same_weights():
    a, b = build_model(ModelConfig(), 5), build_model(ModelConfig(), 5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# sha256 (first 16 hex digits) of the state_dicts the code before models/ existed built (commit
# 60461b8, torch 2.15): the built-in MNIST models must keep starting from exactly these weights.
BEFORE = {
    ("SimpleNN", 128, None, 0): "769972d6abe1b7bb",
    ("SimpleNN", 128, None, 42): "76c54837844ce62b",
    ("MLP", (512, 256, 128), None, 0): "4f7bd1b383d8249d",
    ("MLP", (512, 256, 128), None, 42): "a286d34de866b430",
    ("CNN", 128, (16, 32), 0): "ff82b87e1d6f0022",
    ("CNN", 128, (16, 32), 42): "1589097bc8f05bf3",
}


@pytest.mark.parametrize("key", list(BEFORE))
@pytest.mark.parametrize("meta", [None, Meta()], ids=["no meta", "MNIST meta"])
def test_mnist_models_start_from_the_same_bits_as_before(key, meta):
    kind, hidden, channels, seed = key
    cfg = ModelConfig(type=kind, hidden=list(hidden) if isinstance(hidden, tuple) else hidden,
                      **({"channels": list(channels)} if channels else {}))
    assert cfg.input_dim == 0 and cfg.out == 0  # the defaults now come from the data
    assert digest(build_model(cfg, seed, meta)) == BEFORE[key]


def test_the_default_config_builds_todays_default_model():
    assert digest(build_model(load_config().model, 42)) == BEFORE["SimpleNN", 128, None, 42]
    assert digest(build_model(ModelConfig(input_dim=784, out=10), 42)) == BEFORE["SimpleNN", 128, None, 42]


def test_sizes_of_zero_come_from_the_data():
    cifar = Meta(classes=100, input_shape=(3, 32, 32))
    mlp = build_model(ModelConfig(type="MLP", hidden=[64]), 0, cifar)
    assert [p.shape for p in mlp.parameters()][::2] == [(64, 3072), (100, 64)]
    cnn = build_model(config("CNN-BN"), 0, cifar)
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert resolve(ModelConfig(), None).input_dim == 784 and resolve(ModelConfig(), None).out == 10


@pytest.mark.parametrize("cfg, meta, message", [
    (ModelConfig(input_dim=784), Meta(input_shape=(3, 32, 32)), "model.input_dim: 784, but the data's samples have 3072"),
    (ModelConfig(out=5), Meta(), "model.out: 5 outputs, but the data has 10 classes"),
    (ModelConfig(type="GPT"), Meta(), "model.type: GPT does not fit a 'classify' dataset"),
    (ModelConfig(type="CNN"), text_meta(), "model.type: CNN does not fit a 'lm' dataset; use GPT"),
    (ModelConfig(type="CNN"), Meta(input_shape=(784,)), "CNN takes images (channels, height, width)"),
    (ModelConfig(type="CNN", channels=[4] * 5), Meta(), "model.channels: 5 pooling stages shrink 28x28"),
    (ModelConfig(type="GPT", context=8), text_meta(context=16), "model.context: 8 positions, but the data's samples are 16"),
    (ModelConfig(type="GPT", out=65), None, "model.context: 0 takes it from the data, and no text dataset"),
])
def test_a_model_that_cannot_take_the_data_is_a_config_error(cfg, meta, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(cfg, 0, meta)


@pytest.mark.parametrize("override, message", [
    ("model.dropout=1.0", "dropout: expected a probability"),
    ("model.n_head=3", "n_head: 3 heads do not divide n_embd (128)"),
    ("model.n_layer=0", "n_layer: expected a number > 0"),
    ("model.context=-1", "context: expected a number >= 0"),
    ("model.options={a: 1}", "options: only an import-path model takes options"),
])
def test_bad_model_keys_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=r"^--set model\." + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, None, [override])


def test_dropout_follows_each_hidden_relu_and_adds_no_parameters():
    plain = build_model(ModelConfig(type="MLP", hidden=[512, 256, 128]), 0)
    model = build_model(ModelConfig(type="MLP", hidden=[512, 256, 128], dropout=0.2), 0)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU",
                     "Dropout", "Linear"]
    assert all(m.p == 0.2 for m in model if isinstance(m, nn.Dropout))
    assert layout(model) != layout(plain) and [s for _, s in layout(model)] == [s for _, s in layout(plain)]
    assert not any(isinstance(m, nn.Dropout) for m in plain)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))  # no dropout at evaluation
    model.train()
    assert not torch.equal(model(x), model(x))
    simple = build_model(ModelConfig(dropout=0.5), 0)
    assert [type(m).__name__ for m in simple] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]


def test_cnn_bn_preset_has_batchnorm_dropout_and_its_statistics_as_buffers():
    model = build_model(config("CNN-BN"), 0)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    # conv 1->32 and 32->64 (3x3, with biases), two BatchNorms' scale and shift, 3136->128->10
    assert sum(p.numel() for p in model.parameters()) == 320 + 18496 + 2 * 32 + 2 * 64 + 401536 + 1290
    assert [name for name, _ in layout(model)] == [name for name, _ in model.named_parameters()]
    assert [name for name, _ in buffers(model)] == ["1.running_mean", "1.running_var", "5.running_mean",
                                                     "5.running_var"]
    before = [b.clone() for _, b in buffers(model)]
    model(torch.randn(8, 1, 28, 28))  # training mode: the running statistics move
    assert all(not torch.equal(a, b) for a, (_, b) in zip(before, buffers(model)))
    assert buffers(build_model(ModelConfig(), 0)) == []


def test_flat_buffers_hold_params_and_grads_through_training():
    model = build_model(ModelConfig(type="CNN", hidden=32, channels=[4]), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatModel(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        flat.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert flat.grads_are_views()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.equal(flat.grads, expected)
        opt.step()
    assert torch.equal(flat.params, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    crc = flat.checksum()
    flat.params[0] += 1
    assert flat.checksum() != crc


def test_loss_rides_in_the_slot_after_the_gradient():
    flat = FlatModel(build_model(ModelConfig(), 0))
    flat.loss = 2.5
    assert flat.loss == 2.5 and len(flat.grad_bytes) == 4 * (flat.numel + flat.nbuf + 1)
    flat.zero_grad()
    assert flat.loss == 2.5


# --- GPT ---------------------------------------------------------------------------------------


def tiny_gpt(vocab: str = "abcdefgh", context: int = 16, seed: int = 0, **changes) -> GPT:
    cfg = ModelConfig(**{"type": "GPT", "n_layer": 2, "n_head": 2, "n_embd": 32, **changes})
    return build_model(cfg, seed, text_meta(vocab, context))


def test_gpt_preset_is_nanogpts_small_cpu_model():
    meta = text_meta("".join(chr(32 + i) for i in range(65)), 64)
    model = build_model(config("GPT"), 0, meta)
    # embeddings 65x128 + 64x128; per block 2 LayerNorms, qkv 128x384, proj 128x128, MLP 128x512x128
    per_block = 2 * 128 + 128 * 384 + 128 * 128 + 2 * 128 * 512
    assert sum(p.numel() for p in model.parameters()) == 65 * 128 + 64 * 128 + 4 * per_block + 128 == 804_096
    assert len(model.blocks) == 4 and model.blocks[0].attn.n_head == 4 and model.context == 64
    assert model(torch.zeros(3, 64, dtype=torch.long)).shape == (3, 64, 65)
    assert not any("lm_head" in name or "bias" in name for name in model.state_dict())  # tied, no biases
    assert buffers(model) == []


def test_gpt_initialisation_is_nanogpts():
    model = build_model(ModelConfig(type="GPT", n_layer=8, n_embd=256, n_head=4), 0, text_meta(context=64))
    params = dict(model.named_parameters())
    assert params["wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["blocks.3.mlp.proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(params["blocks.0.ln1.weight"], torch.ones(256))
    with_bias = build_model(ModelConfig(type="GPT", bias=True), 0, text_meta())
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in with_bias.named_parameters() if n.endswith("bias"))
    assert digest(tiny_gpt(seed=3)) == digest(tiny_gpt(seed=3)) != digest(tiny_gpt(seed=4))


def test_gpt_is_causal():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 8
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gpt_with_explicit_sizes_needs_no_data_description():
    model = build_model(ModelConfig(type="GPT", out=65, context=32, n_layer=1), 0)
    assert model(torch.zeros(1, 32, dtype=torch.long)).shape == (1, 32, 65)


def test_gpt_refuses_sequences_longer_than_its_context():
    with pytest.raises(ValueError, match="17 tokens, but the model has 16 positions"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_overfits_a_tiny_string():
    text = "hello world, hello gpt. "
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text * 2])
    x = torch.stack([ids[i : i + 16] for i in range(8)])
    y = torch.stack([ids[i + 1 : i + 17] for i in range(8)])
    model = tiny_gpt(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # from ln(13) = 2.6; what is left is mostly the first characters of a window
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    out = generate(model, x[:1, :4], 12, temperature=0)
    assert "".join(vocab[i] for i in out[0].tolist()) == (text * 2)[:16]


def test_generate_is_seeded_and_stays_within_the_context():
    model = tiny_gpt(context=8)
    start = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, start, 20, 1.0, 3, torch.Generator().manual_seed(7))
    b = generate(model, start, 20, 1.0, 3, torch.Generator().manual_seed(7))
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], start)
    assert model.training  # put back as it was


# --- models by import path ----------------------------------------------------------------------


def write_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    """`name`.py in tmp_path, the current directory (nothing written when body is empty)."""
    if body:
        (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\n\n" + body)
    monkeypatch.chdir(tmp_path)


def test_an_import_path_model_gets_the_sections_other_keys_and_the_seed(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_models_a", (
        "def tiny(width, out=10, act='relu'):\n"
        "    assert act == 'tanh'\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Tanh(), nn.Linear(width, out))\n"))
    cfg = load_config(None, None, ["model.type=my_models_a:tiny", "model.width=7", "model.act=tanh"]).model
    assert cfg.options == {"width": 7, "act": "tanh"}
    model = build_model(cfg, 3)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and model[1].weight.shape == (7, 784)
    torch.manual_seed(3)
    expected = nn.Sequential(nn.Flatten(), nn.Linear(784, 7), nn.Tanh(), nn.Linear(7, 10))
    assert digest(model) == digest(expected) == digest(build_model(cfg, 3)) != digest(build_model(cfg, 4))


def test_an_import_path_model_gets_the_built_in_keys_its_signature_takes(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_models_g", "def f(p_drop=0.0, dropout=0.0):\n    return nn.Dropout(p_drop + dropout)\n")
    # dropout (a built-in key) is taken by name; hidden and input_dim (from the shipped file) are not.
    cfg = load_config(None, None, ["model.type=my_models_g:f", "model.dropout=0.3", "model.p_drop=0.1",
                                   "model.hidden=64"]).model
    assert cfg.options == {"p_drop": 0.1}
    assert build_model(cfg, 0).p == pytest.approx(0.4)


@pytest.mark.parametrize("body, path, message", [
    ("def f():\n    return [1]\n", "my_models_b:f", "model.type: my_models_b:f returned a list, expected a torch.nn.Module"),
    ("def f():\n    return nn.Linear(1, 1)\n", "my_models_c:g", "model.type: my_models_c has no g"),
    ("", "no_such_module_here:f", r"model.type: cannot import no_such_module_here for no_such_module_here:f "
                                  r"\(ModuleNotFoundError"),
    ("raise RuntimeError('boom')\n", "my_models_d:f", "model.type: cannot import my_models_d .*RuntimeError: boom"),
    ("def f():\n    return nn.Linear(1, 1)\n", "my_models_e:f", r"model.type: my_models_e:f\(\*\*\{'width': 3\}\) failed"),
    ("f = 3\n", "my_models_f:f", "model.type: my_models_f:f is a int, not a callable"),
])
def test_an_import_path_model_that_cannot_be_had_is_a_config_error(tmp_path, monkeypatch, body, path, message):
    write_module(tmp_path, monkeypatch, path.split(":")[0], body)
    cfg = ModelConfig(type=path, options={"width": 3} if "width" in message else {})
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, 0)


def test_the_replica_checksum_covers_batchnorm_statistics_but_not_the_gradient():
    from smolcluster.flat import FlatModel

    flat = FlatModel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    before = flat.checksum()
    flat.grads.add_(1.0)  # gradients and the loss are not the replica's state
    flat.loss = 3.0
    assert flat.checksum() == before
    flat.model[1].running_mean.add_(0.5)  # a buffer is: a replica with other statistics has drifted
    assert flat.checksum() != before
