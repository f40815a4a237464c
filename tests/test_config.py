"""Config loading: typed, validated, with errors that name the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smolcluster.config import ConfigError, diff_fingerprints, load_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_load_with_the_documented_defaults():
    cfg = load_config()
    assert cfg.cluster.port == 65432 and cfg.cluster.num_workers == 2
    assert cfg.model.type == "SimpleNN" and cfg.dataset.name == "MNIST"
    assert cfg.cluster.quorum == 1  # keep training while one worker remains


def test_unknown_key_names_file_and_key(tmp_path):
    nn = write(tmp_path, "nn.yaml", "training:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"nn\.yaml: training\.batch_sise: unknown key"):
        load_config(None, nn)


def test_unknown_section_names_the_file(tmp_path):
    nn = write(tmp_path, "nn.yaml", "cluster:\n  port: 1\n")  # the cluster has its own file
    with pytest.raises(ConfigError, match=r"nn\.yaml: cluster: unknown section; known sections are training, model"):
        load_config(None, nn)


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    cluster = write(tmp_path, "c.yaml", "step_timeout: fast\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: step_timeout: expected a number, got 'fast'"):
        load_config(cluster, None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.batch_size=0", "batch_size: expected a number > 0"),
        ("training.optimizer=rmsprop", r"optimizer: expected one of \['sgd', 'adam', 'adamw'\]"),
        ("cluster.port=70000", "port: expected 1..65535"),
        ("cluster.min_workers=3", r"min_workers: expected 1..num_workers \(2\)"),
        ("cluster.tls_cert=a.pem", "tls_cert and tls_key"),
        ("model.type=ResNet", "unknown model 'ResNet'"),
        ("model.hidden=[128, -1]", "hidden: expected positive sizes"),
        ("training.nope=1", "training.nope: unknown key"),
        ("nope.x=1", r"--set nope\.x: unknown section 'nope'; known sections are cluster, training"),
        ("training.batch_size", "expected KEY=VALUE"),
    ],
)
def test_impossible_values_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, None, [override])


def test_errors_from_overrides_say_so():
    with pytest.raises(ConfigError, match=r"^--set training\.batch_size: expected an integer"):
        load_config(None, None, ["training.batch_size=big"])
    with pytest.raises(ConfigError, match=r"^--set cluster\.port: expected an integer"):
        load_config(None, None, ["cluster.port=x"])


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, None, ["model.type=MLP", "model.hidden=[512, 256]", "training.learning_rate=1e-2"])
    assert cfg.model.hidden_sizes == [512, 256] and cfg.training.learning_rate == 0.01


def test_upstream_files_keep_working_with_a_warning(tmp_path):
    cluster = write(tmp_path, "cluster_config.yaml",
                    "host_ip: 10.0.0.1\nport: 65432\nnum_workers: 2\ntimeout: 0.5\nserver: mini1\n"
                    "workers: [mini2, mini3]\n")
    nn = write(tmp_path, "nn_config.yaml",
               "batch_size: 64\nlearning_rate: 0.001\nnum_epochs: 3\neval_steps: 100\ntrack_gradients: true\n"
               "model: {type: SimpleNN, input_dim: 784, hidden: 128, out: 10}\ndataset: {name: MNIST}\n")
    cfg = load_config(cluster, nn)
    assert cfg.cluster.step_timeout == 0.5 and cfg.training.batch_size == 64
    assert cfg.training.track_gradients and cfg.cluster.workers == ["mini2", "mini3"]


def test_host_ip_map_picks_this_host_then_default():
    cfg = load_config(None, None, ["cluster.host_ip={mini2: 10.0.0.1, default: 192.168.1.5}"])
    assert cfg.cluster.server_address("mini2") == "10.0.0.1"
    assert cfg.cluster.server_address("laptop") == "192.168.1.5"
    assert cfg.cluster.bind_address() == "0.0.0.0"


def test_fingerprint_diff_says_what_differs():
    a = load_config().fingerprint()
    b = load_config(None, None, ["training.learning_rate=0.01"]).fingerprint()
    assert diff_fingerprints(a, b) == ["training.learning_rate: server has 0.003, worker has 0.01"]
    assert diff_fingerprints(a, a) == []


# --- the ssh section (launch.sh) --------------------------------------------------------------

MINIS = """\
server: mini1
workers: [mini2, mini3]
ssh:
  default: {user: alice, key: ~/.ssh/id_ed25519}
  mini1: {address: 192.168.1.10, port: 2222, dir: /opt/sc}
  mini3: {user: bob, uv: /opt/homebrew/bin/uv}
"""


def test_ssh_entries_fall_back_to_default_then_to_ssh_itself(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", MINIS), None)
    hosts = {name: (role, k, h) for role, k, name, h in cfg.cluster.launch_hosts()}
    assert [(r, k) for r, k, _ in hosts.values()] == [("server", 0), ("worker", 1), ("worker", 2)]
    mini1, mini2, mini3 = (hosts[n][2] for n in ("mini1", "mini2", "mini3"))
    assert (mini1.address, mini1.user, mini1.port, mini1.dir) == ("192.168.1.10", "alice", 2222, "/opt/sc")
    assert (mini2.address, mini2.user, mini2.port, mini2.dir, mini2.uv) == ("mini2", "alice", None, "smolcluster", None)
    assert (mini3.user, mini3.key, mini3.uv) == ("bob", "~/.ssh/id_ed25519", "/opt/homebrew/bin/uv")


def test_paths_on_the_host_are_relative_to_its_home(tmp_path):
    text = "server: a\nworkers: [b]\nnum_workers: 1\nssh: {default: {dir: ~/sc, uv: ~/.local/bin/uv, python: /opt/py}}\n"
    (_, _, _, host), _ = load_config(write(tmp_path, "c.yaml", text), None).cluster.launch_hosts()
    assert (host.dir, host.uv, host.python) == ("sc", ".local/bin/uv", "/opt/py")
    with pytest.raises(ConfigError, match=r"ssh\.a\.dir: expected an absolute path or one relative to the home"):
        load_config(None, None, ["cluster.ssh.a.dir=~bob/sc"])


def test_the_shipped_minis_example_loads():
    from smolcluster.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "cluster_minis.yaml", None)
    assert [name for _, _, name, _ in cfg.cluster.launch_hosts()] == ["mini1", "mini2", "mini3"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("ssh: {mini1: {hostname: x}}", r"c\.yaml: ssh\.mini1\.hostname: unknown key; known keys are address"),
        ("ssh: {mini1: {port: 0}}", r"c\.yaml: ssh\.mini1\.port: expected 1\.\.65535, got 0"),
        ("ssh: {mini1: {dir: 'my dir'}}", r"c\.yaml: ssh\.mini1\.dir: expected no spaces, quotes or shell"),
        ("ssh: {mini1: {user: 'a;rm'}}", r"c\.yaml: ssh\.mini1\.user: expected no spaces"),
        ("ssh: {mini1: [x]}", r"c\.yaml: ssh\.mini1: expected a mapping"),
        ("ssh: [mini1]", r"c\.yaml: ssh: expected a mapping"),
    ],
)
def test_bad_ssh_entries_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "c.yaml", f"server: mini1\nworkers: [mini2, mini3]\n{text}\n"), None)


def test_bad_ssh_override_says_so():
    with pytest.raises(ConfigError, match=r"^--set cluster\.ssh\.mini1\.port: expected"):
        load_config(None, None, ["cluster.ssh.mini1.port=ssh"])


def test_launch_hosts_needs_workers_and_plain_host_names():
    with pytest.raises(ConfigError, match=r"workers: launch.sh needs the list of worker host names"):
        load_config().cluster.launch_hosts()
    cfg = load_config(None, None, ["cluster.workers=[mini2, 'my mini']"])
    with pytest.raises(ConfigError, match=r"workers\[1\]: expected no spaces"):
        cfg.cluster.launch_hosts()


def test_hosts_command_prints_one_line_per_process(tmp_path, capsys):
    from smolcluster.cli import main

    assert main(["hosts", "--cluster-config", str(write(tmp_path, "c.yaml", MINIS))]) == 0
    key = str(Path("~/.ssh/id_ed25519").expanduser())
    assert capsys.readouterr().out.splitlines() == [
        f"server 0 mini1 192.168.1.10 alice 2222 {key} /opt/sc - -",
        f"worker 1 mini2 mini2 alice - {key} smolcluster - -",
        f"worker 2 mini3 mini3 bob - {key} smolcluster /opt/homebrew/bin/uv -",
    ]


@pytest.mark.parametrize("sets, line", [
    ([], "dashboard: on mini1 at http://127.0.0.1:8642/, bound to 127.0.0.1 (cluster.http_bind): from here, "
         "ssh -N -L 8642:127.0.0.1:8642 -p 2222 -i {key} alice@192.168.1.10 and open http://127.0.0.1:8642/"),
    (["cluster.http_bind=0.0.0.0", "cluster.http_port=9000"], "dashboard: http://192.168.1.10:9000/"),
    (["cluster.http_bind=10.0.0.1"], "dashboard: http://10.0.0.1:8642/"),
    (["cluster.http_port=0"], "dashboard: off (cluster.http_port is 0)"),
])
def test_hosts_dashboard_says_where_the_dashboard_is_and_how_to_reach_it(tmp_path, capsys, sets, line):
    from smolcluster.cli import main

    args = [a for kv in sets for a in ("--set", kv)]
    assert main(["hosts", "--dashboard", "--cluster-config", str(write(tmp_path, "c.yaml", MINIS)), *args]) == 0
    key = str(Path("~/.ssh/id_ed25519").expanduser())
    assert capsys.readouterr().out.splitlines() == [line.format(key=key)]


def test_hosts_command_names_the_file_when_workers_are_missing(tmp_path, capsys):
    from smolcluster.cli import main

    path = write(tmp_path, "c.yaml", "server: mini1\n")
    assert main(["hosts", "--cluster-config", str(path)]) == 2
    assert f"{path}: workers: launch.sh needs" in capsys.readouterr().err
# --- the README's table of keys ---------------------------------------------------------------


def config_table():
    import importlib.util

    from smolcluster.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("config_table", REPO_ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_files_say_the_defaults_of_the_code():
    from smolcluster.config import Config

    assert load_config().to_dict() == Config().to_dict()


def test_readme_lists_every_key_with_its_default_and_meaning():
    table = config_table()
    readme = table.README.read_text()
    assert table.readme_with_table(readme) == readme, "run: uv run python scripts/config_table.py --write"
    keys = [row[0] for row in table.rows()]
    assert "cluster.step_timeout" in keys and "training.learning_rate" in keys and "wandb.mode" in keys
    assert all(meaning for *_, meaning in table.rows()), "every key needs a docstring in config.py"


@dataclasses.dataclass
class _Host:
    user: str | None = None


@dataclasses.dataclass
class _Section:
    hosts: dict[str, _Host] = dataclasses.field(default_factory=dict)
    mode: str = "a"


def test_config_table_expands_maps_of_sections():
    docs = {("_Section", "hosts"): "per host", ("_Host", "user"): "login", ("_Section", "mode"): "a | b"}
    assert config_table().rows(_Section, "x.", docs) == [
        ("x.hosts", "`{}`", "map of sections", "per host"),
        ("x.hosts.<name>.user", "`null`", "text or null", "login"),
        ("x.mode", "`a`", "text", "a \\| b"),
    ]


# --- hostile input: alias bombs, NaN, huge values ---------------------------------------------


def laughs(levels: int = 9) -> str:
    """'Billion laughs': each anchor is nine aliases of the one before; 9**9 values in ~330 bytes."""
    names = "abcdefghijklmnop"[:levels]
    first = f"&{names[0]} [{','.join(['lol'] * 9)}]"
    rest = [f"&{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip(names, names[1:])]
    return f"[{','.join([first, *rest])}]"


def timed_error(*args) -> tuple[str, float]:
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    return str(info.value), time.monotonic() - t0


def test_an_alias_bomb_in_a_file_is_refused_at_once_with_a_short_error(tmp_path):
    path = write(tmp_path, "nn.yaml", f"training:\n  batch_size: {laughs()}\n")
    assert len(path.read_bytes()) < 400
    message, seconds = timed_error(None, path)
    assert seconds < 2.0 and len(message) < 1000, (seconds, len(message))
    assert message.startswith(f"{path}: YAML aliases expand to more than 10000 values")


@pytest.mark.parametrize("value", [laughs(), "&a [*a]"])  # nested anchors; an alias inside its own anchor
def test_an_alias_bomb_in_a_set_value_is_refused(value):
    message, seconds = timed_error(None, None, [f"training.batch_size={value}"])
    assert seconds < 2.0 and len(message) < 1000
    assert message.startswith("--set training.batch_size: YAML aliases expand to more than 10000 values")


def test_a_few_aliases_still_work(tmp_path):
    text = "server: a\nworkers: [b]\nnum_workers: 1\nssh:\n  a: &host {user: alice, port: 2222}\n  b: *host\n"
    hosts = load_config(write(tmp_path, "c.yaml", text), None).cluster.launch_hosts()
    assert [(h.user, h.port) for *_, h in hosts] == [("alice", 2222), ("alice", 2222)]


def numeric_keys() -> list[tuple[str, type]]:
    """Every key typed int or float (alone or in a union), in every section, as `section.key`."""
    import types
    import typing

    from smolcluster.config import Config

    out = []
    for section, cls in typing.get_type_hints(Config).items():
        for name, tp in typing.get_type_hints(cls).items():
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            options = typing.get_args(tp) if union else (tp,)
            if float in options or int in options:
                out.append((f"{section}.{name}", float if float in options else int))
    return out


def test_every_numeric_key_is_found():
    keys = dict(numeric_keys())
    assert keys["training.learning_rate"] is float and keys["cluster.step_timeout"] is float
    assert keys["cluster.port"] is int and keys["cluster.min_workers"] is int and keys["wandb.init_timeout"] is float


@pytest.mark.parametrize("key, tp", numeric_keys())
def test_nan_and_infinity_are_refused_for_every_numeric_key(key, tp):
    for value in (".nan", ".inf", "-.inf", "nan", "'inf'", "1e999"):
        message, _ = timed_error(None, None, [f"{key}={value}"])
        expected = "a finite number" if tp is float else "an integer"
        assert message.startswith(f"--set {key}: expected {expected}"), (value, message)


def test_nan_in_a_file_names_the_file_and_the_key(tmp_path):
    message, _ = timed_error(None, write(tmp_path, "nn.yaml", "training:\n  learning_rate: .nan\n"))
    assert message == f"{tmp_path / 'nn.yaml'}: training.learning_rate: expected a finite number, got nan (float)"


def test_nan_given_in_code_is_refused_too():
    from smolcluster.config import ClusterConfig, TrainingConfig

    with pytest.raises(ConfigError, match=r"^learning_rate: expected a finite number > 0, got nan$"):
        TrainingConfig(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match=r"^step_timeout: expected a finite number > 0, got inf$"):
        ClusterConfig(step_timeout=float("inf"))


@pytest.mark.parametrize(
    "override, start",
    [
        ("model.type=" + "x" * 100_000, "--set model.type: unknown model 'xxx"),
        ("training.optimizer=" + "y" * 100_000, "--set training.optimizer: expected one of"),
        ("cluster.ssh.a.user=" + "a b" * 50_000, "--set cluster.ssh.a.user: expected no spaces"),
        ("training.batch_size=" + "[" * 3000, "--set training.batch_size: not usable YAML: nested too deeply"),
        ("training.batch_size=" + "9" * 5000, "--set training.batch_size: not usable YAML: Exceeds the limit"),
        ("training.learning_rate=" + "9" * 400, "--set training.learning_rate: expected a number, got 9999"),
        ("training.batch_size=[1, [" + "z" * 100_000 + "]]", "--set training.batch_size: expected an integer"),
    ],
)
def test_huge_values_are_quoted_short(override, start):
    message, seconds = timed_error(None, None, [override])
    assert message.startswith(start), message[:300]
    assert len(message) < 600 and seconds < 5.0, (len(message), seconds)


def test_a_huge_shared_value_is_described_without_walking_it():
    """What an alias bomb becomes once loaded: 9**9 leaves through shared lists."""
    from smolcluster.config import TrainingConfig, build

    value: list = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9
    with pytest.raises(ConfigError, match=r"^training\.batch_size: expected an integer, got \[\[\[") as info:
        build(TrainingConfig, {"batch_size": value}, "training")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe training: {}", "not UTF-8 text (byte 0)"),
        (b"training: {batch_size: 1", "not valid YAML: while parsing a flow mapping, expected ',' or '}', "
                                      "but got '<stream end>' (line 1, column 25)"),
        (b"# " + b"x" * (1 << 20) + b"\n", f"larger than {1 << 20} bytes"),
        (b"training:\n  ? " + b"k" * 300_000 + b"\n  : 1\n", "training.kkkk"),
        (b"training:\n  " + b"k" * 300_000 + b": 1\n", "not valid YAML: mapping values are not allowed here"),
    ],
)
def test_unreadable_files_are_one_short_line(tmp_path, content, message):
    path = tmp_path / "nn.yaml"
    path.write_bytes(content)
    text, _ = timed_error(None, path)
    assert text.startswith(f"{path}: ") and message in text and len(text) < 1000 and "\n" not in text, text[:300]


def test_a_folder_as_config_file_is_a_config_error(tmp_path):
    text, _ = timed_error(tmp_path, None)
    assert text.startswith(f"{tmp_path}: cannot read it")
