"""Typed, validated configuration loaded from the YAML files in `configs/`.

Two files describe a job, as upstream had them: the cluster (`cluster_config.yaml`, its keys live
under `cluster.`) and the model/training (`nn_config.yaml`, sections `training`, `model`,
`dataset`, `wandb`). Every key is checked at load time; an error names the file and the key path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from loguru import logger

from smolcluster.errors import ConfigError
from smolcluster.errors import cut as _cut

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_config(name: str) -> Path:
    """Where a config file is looked for when no flag names it: ./configs/, then
    ./src/smolcluster/configs/ (where upstream keeps them), then this checkout's configs/."""
    for folder in (Path("configs"), Path("src") / "smolcluster" / "configs", REPO_ROOT / "configs"):
        if (folder / name).is_file():
            return folder / name
    return REPO_ROOT / "configs" / name


DEFAULT_CLUSTER = REPO_ROOT / "configs" / "cluster_config.yaml"
DEFAULT_NN = REPO_ROOT / "configs" / "nn_config.yaml"


IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
"""`package.module:callable`, the way a user names their own model, dataset or loss in YAML."""


def is_import_path(value: object) -> bool:
    return isinstance(value, str) and IMPORT_PATH.fullmatch(value) is not None


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{name}: expected a finite number {bound}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: expected a number {bound}, got {value!r}")


# launch.sh pastes these values into ssh and remote shell commands: no spaces or shell characters.
SHELL_SAFE = re.compile(r"[A-Za-z0-9._~/@%+:-]+")


def _shell_safe(name: str, value: str) -> None:
    if not SHELL_SAFE.fullmatch(value):
        raise ConfigError(f"{name}: expected no spaces, quotes or shell characters, got {_quote(value)}")


@dataclass(kw_only=True, slots=True, frozen=True)
class SshHost:
    """How launch.sh reaches one host over ssh; every key is optional (ssh's own defaults apply,
    including ~/.ssh/config). An entry named `default` fills in what a host's own entry leaves out."""

    address: str | None = None
    """Address or ssh alias to dial; default: the host name."""
    user: str | None = None
    """ssh user; default: ssh's (your local user name, or ~/.ssh/config)."""
    port: int | None = None
    """ssh port; default: ssh's (22)."""
    key: str | None = None
    """Private key file on this machine (~ allowed); default: ssh's usual keys."""
    dir: str | None = None
    """Folder on the host the code is copied to (default: smolcluster). Paths on the host (dir, uv,
    python) are relative to its home unless absolute; ~/ is allowed."""
    uv: str | None = None
    """Path of uv on the host; default: found on PATH, in ~/.local/bin, ~/.cargo/bin or Homebrew's."""
    python: str | None = None
    """Run this Python on the host instead of `uv sync`-ing dir/.venv; it must have smolcluster's
    dependencies (the copied code goes first on PYTHONPATH). Default: uv sync."""

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"port: expected 1..65535, got {self.port}")
        for name in ("address", "user", "key", "dir", "uv", "python"):
            value = getattr(self, name)
            if value is not None:
                _shell_safe(name, value)
        for name in ("dir", "uv", "python"):
            value = getattr(self, name)
            if value and value.startswith("~") and (not value.startswith("~/") or value == "~/"):
                raise ConfigError(f"{name}: expected an absolute path or one relative to the home, got {_quote(value)}")

    def on_host(self) -> SshHost:
        """The same, with ~/ dropped from paths on the host (launch.sh starts in the remote home)."""
        home = {n: v[2:] for n in ("dir", "uv", "python") if (v := getattr(self, n)) and v.startswith("~/")}
        return dataclasses.replace(self, **home)


@dataclass(kw_only=True, slots=True, frozen=True)
class ClusterConfig:
    """Where the server is and how long anyone waits for anyone."""

    host_ip: str | dict[str, str] | None = "127.0.0.1"
    """Address workers connect to; or a map host name -> server address as seen from that host
    (a worker picks its own host name, then `default`); or null (upstream's "detect my address"):
    the server listens on every interface and prints the addresses workers can use, and a worker
    must be told one (`--set cluster.host_ip=ADDRESS`)."""
    bind: str | None = None
    """Address the server listens on; default: `host_ip` when it is one address, else 0.0.0.0."""
    port: int = 65432
    """TCP port the server listens on and workers dial (`smolcluster run` picks a free one)."""
    num_workers: int = 2
    """Workers the server waits for before step 0; ids are 1..num_workers."""
    min_workers: int | None = 1
    """Fewest workers the run goes on with: a step is averaged over at least this many gradients
    once `step_timeout` passed, and the run fails if fewer stay connected (null: all of them)."""
    step_timeout: float = 10.0
    """Seconds the server waits for the rest after a step's first gradient arrives."""
    worker_timeout: float = 120.0
    """Seconds without progress after which a peer is declared gone (either direction)."""
    join_timeout: float = 600.0
    """Seconds the server waits for all workers to join before giving up."""
    connect_timeout: float = 120.0
    """Seconds a worker keeps retrying to reach the server before it gives up."""
    seed: int = 42
    """Initial weights, the data partition and every shuffle derive from it."""
    checksum_steps: int = 100
    """Every this many steps each worker sends a checksum of its parameters (0: never; the last
    step always has one)."""
    drift_tolerance: float = 1e-4
    """Server: a worker whose checksum differs from the server's (devices that round differently,
    say a CPU beside a GPU) is resynced to the server's parameters if its replica is further than
    this from them (the L2 distance over the L2 norm, estimated from a sketch the checksum carries);
    nearer, it trains on. A difference on the last step always resyncs."""
    resync_steps: int = 0
    """Server: every this many steps, resync every worker to the server's parameters whatever its
    checksum says (0: never)."""
    heartbeat_s: float = 2.0
    """Seconds between heartbeats while a side waits; a peer silent for worker_timeout is gone."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has to complete the handshake before it is closed."""
    token_file: str | None = None
    """File holding the shared cluster token ($SMOLCLUSTER_TOKEN wins); never put it on a command line."""
    tls_cert: str | None = None
    """Server: PEM certificate chain; enables TLS (workers then need tls_ca)."""
    tls_key: str | None = None
    """Server: PEM private key for tls_cert."""
    tls_ca: str | None = None
    """Worker: PEM file of the CA (or the self-signed cert) to verify the server with; enables TLS."""
    tls_server_name: str | None = None
    """Worker: name to check the server's certificate against (default: the address dialled)."""
    checkpoint_steps: int = 500
    """The server checkpoints every this many steps into out_dir/checkpoints (0: never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    compression: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    """Gradients on the wire: fp32 (exact), bf16/fp16 (half the bytes), int8 (a quarter); the lossy
    ones carry their rounding error over to the next step (error feedback), so nothing is lost."""
    int8_chunk: int = 2048
    """int8 only: elements sharing one scale."""
    bucket_mb: float = 1.0
    """Gradient bucket size in MiB: each bucket travels and is averaged as soon as it is complete
    (backend ps; torch keeps DDP's own 25 MiB buckets)."""
    overlap: bool = True
    """Worker: send buckets while backward is still running (no effect on the numbers)."""
    reconnect: bool = False
    """Worker: when the server goes away, keep retrying (for connect_timeout) instead of exiting."""
    backend: Literal["ps", "torch"] = "ps"
    """Who averages: ps, smolcluster's parameter server; torch, torch.distributed's
    DistributedDataParallel (gloo on CPU and MPS, NCCL on CUDA) with no server process: worker 1
    is rank 0, holds the rendezvous at host_ip:port, evaluates, checkpoints and saves the model.
    README: "Two backends"."""
    torch_trust_network: bool = False
    """backend torch: allow listening on an address other machines can reach. torch.distributed
    authenticates no one: any machine that reaches its ports can disrupt the job (the cluster
    token still keeps processes of another cluster out)."""
    server: str = "localhost"
    """Host name of the server machine (used by launch.sh)."""
    workers: list[str] = field(default_factory=list)
    """Host names of the workers, ids 1..N in list order (used by launch.sh)."""
    ssh: dict[str, SshHost] = field(default_factory=dict)
    """launch.sh: how to reach each host (address, user, port, key, dir, uv, python), by host name."""
    outlier_factor: float = 10.0
    """Server: a worker's gradient bucket whose norm is more than this many times the median of
    recently accepted norms (the lower median of the step's, for the first steps) is rejected
    like a NaN one, logged and counted; a norm past float32's range always is (0: off)."""
    http_port: int | None = 8642
    """Server: the read-only dashboard, /api/status and Prometheus /metrics on this port (0 or
    null: off; `smolcluster run` picks a free one). A port that is taken is logged; the run goes on."""
    http_linger_s: float = 0.0
    """Server: after the run, keep the dashboard up this many seconds (to read the final state)."""
    http_bind: str = "127.0.0.1"
    """Server: the address the dashboard listens on (0.0.0.0: every interface; it has no token)."""
    max_send_queue_mb: float = 0.0
    """Server: a worker with more than this many MiB of frames queued that it has not read is
    dropped (it resyncs when it rejoins); 0: the larger of 16 MiB and 4 steps of averages."""

    def __post_init__(self) -> None:
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ConfigError(f"http_port: expected 0..65535 (0 or null: off), got {self.http_port}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: expected 1..65535, got {self.port}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: expected an integer >= 1, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"min_workers: expected 1..num_workers ({self.num_workers}), got {self.min_workers}"
            )
        for name in ("step_timeout", "worker_timeout", "join_timeout", "connect_timeout", "heartbeat_s",
                     "handshake_timeout", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        _positive("checksum_steps", self.checksum_steps, allow_zero=True)
        _positive("resync_steps", self.resync_steps, allow_zero=True)
        _positive("http_linger_s", self.http_linger_s, allow_zero=True)
        _positive("drift_tolerance", self.drift_tolerance, allow_zero=True)
        _positive("checkpoint_steps", self.checkpoint_steps, allow_zero=True)
        _positive("bucket_mb", self.bucket_mb)
        _positive("int8_chunk", self.int8_chunk)
        _positive("outlier_factor", self.outlier_factor, allow_zero=True)
        _positive("max_send_queue_mb", self.max_send_queue_mb, allow_zero=True)
        if 0 < self.outlier_factor <= 1:
            raise ConfigError(f"outlier_factor: expected 0 (off) or a number > 1, got {self.outlier_factor!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key: set both (server TLS) or neither")
        if self.workers and len(self.workers) != self.num_workers:
            raise ConfigError(
                f"workers: lists {len(self.workers)} hosts but num_workers is {self.num_workers}"
            )

    @property
    def quorum(self) -> int:
        return self.num_workers if self.min_workers is None else self.min_workers

    def server_address(self, host: str | None = None) -> str:
        """The address a worker on `host` dials."""
        if self.host_ip is None:
            raise ConfigError("host_ip: null lets the server pick its addresses, but a worker must be told "
                              "one: pass --set cluster.host_ip=ADDRESS (the server prints them when it starts)")
        if isinstance(self.host_ip, str):
            return self.host_ip
        import socket

        name = host or socket.gethostname()
        for key in (name, name.split(".")[0], "default"):
            if key in self.host_ip:
                return self.host_ip[key]
        raise ConfigError(f"host_ip: no entry for host {_quote(name)} and no 'default' entry")

    def bind_address(self) -> str:
        if self.bind is not None:
            return self.bind
        return self.host_ip if isinstance(self.host_ip, str) else "0.0.0.0"  # a map, or null

    def reachable_at(self) -> list[str]:
        """This machine's addresses that workers could dial, for a server listening on all of them."""
        import socket

        found: list[str] = []
        try:  # what this machine's name resolves to (on a Mac, its .local address)
            for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
                found.append(str(info[4][0]))
        except OSError:
            pass
        return [a for i, a in enumerate(found) if a not in found[:i] and not a.startswith("127.")] or ["127.0.0.1"]

    def launch_hosts(self) -> list[tuple[str, int, str, SshHost]]:
        """(role, worker id (0: server), host name, how to reach it) for every process launch.sh starts."""
        if not self.workers:
            raise ConfigError("workers: launch.sh needs the list of worker host names (ids 1..N in list order)")
        server = [("server", 0, self.server, "server")] if self.backend == "ps" else []  # torch: worker 1 leads
        procs = [*server, *(("worker", k, name, f"workers[{k - 1}]") for k, name in enumerate(self.workers, 1))]
        fallback = self.ssh.get("default", SshHost())
        out = []
        for role, k, name, key in procs:
            _shell_safe(key, name)
            own = self.ssh.get(name, SshHost())
            merged = {f.name: getattr(own, f.name) if getattr(own, f.name) is not None else getattr(fallback, f.name)
                      for f in dataclasses.fields(SshHost)}
            merged["address"] = merged["address"] or name
            merged["dir"] = merged["dir"] or "smolcluster"
            out.append((role, k, name, SshHost(**merged).on_host()))
        return out


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainingConfig:
    """What every replica does each step; identical on every machine (checked at the handshake)."""

    batch_size: int = 32
    """Samples per worker per step."""
    learning_rate: float = 0.003
    """Peak learning rate (reached after warmup_steps, then follows lr_schedule)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """cosine: decay to 0 over the run; constant: keep learning_rate."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    """The optimizer every replica (workers and server) steps with the averaged gradient."""
    momentum: float = 0.0
    """SGD momentum (sgd only)."""
    weight_decay: float = 0.0
    """L2 penalty (sgd, adam) or decoupled weight decay (adamw)."""
    num_epochs: int = 2
    """Passes over the training set (each worker over its own shard)."""
    eval_steps: int = 200
    """The server evaluates on the test set every this many steps (0: only at the end)."""
    track_gradients: bool = False
    """Log every layer's gradient norm to W&B."""
    threads: int = 0
    """torch threads per process (0: torch's default; `run` gives each process cores / num_workers)."""
    device: str = "auto"
    """Where this process computes: auto (a CUDA GPU if there is one, else an Apple-silicon GPU
    (mps), else the CPU), cpu, cuda, cuda:N or mps. Per machine, like threads: a cluster may mix
    devices (see cluster.drift_tolerance)."""
    out_dir: str = "runs/latest"
    """Where the server writes model.safetensors, summary.json and checkpoints/ (`run` adds logs/);
    relative to the current directory."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs); for quick tries."""
    eval_samples: int = 0
    """Evaluate on at most this many test (and each worker's validation) samples, the same ones every
    time, chosen by the seed (0: all; a text set has a million windows)."""
    max_grad_norm: float = 0.0
    """Clip the averaged gradient to this L2 norm before each optimizer step, on the server and
    every worker alike (0: no clipping)."""
    algorithm: Literal["sync", "local_sgd", "diloco"] = "sync"
    """sync: average gradients every step. local_sgd (FedAvg): each worker takes local_steps
    optimizer steps on its shard, then the server averages the workers' parameter changes
    (weighted by samples) and every replica applies the average. diloco: the same, and the average
    change is the gradient of an outer optimizer (SGD, outer_lr, Nesterov momentum outer_momentum)."""
    local_steps: int = 8
    """local_sgd, diloco: optimizer steps each worker takes between two exchanges (a round)."""
    prox_mu: float = 0.0
    """local_sgd, diloco: FedProx's proximal term, mu/2 * ||w - w_round_start||^2 added to each local
    loss, keeping non-IID workers near the round's parameters (0: off)."""
    prox_adaptive: bool = False
    """prox_mu adapts (FedProx's heuristic): +0.1 after a round whose averaged loss rose, -0.1 after
    5 rounds in a row whose loss fell (never below 0); every replica computes the same mu."""
    balance: bool = False
    """Uneven machines: each worker measures its compute time per sample over the first steps (or
    rounds), and the server then sizes every worker's batch (sync) or local steps (local modes) to
    its speed, so all finish a step together (the average stays weighted by samples). Measured
    timings differ between runs, so balanced runs are not bit-identical reruns."""
    outer_lr: float = 0.7
    """diloco: the outer optimizer's learning rate (the paper's 0.7)."""
    outer_momentum: float = 0.9
    """diloco: the outer optimizer's Nesterov momentum (0: plain SGD)."""
    loss: str = "cross_entropy"
    """cross_entropy (mean over every target; a GPT's (batch, time) targets are flattened), or
    `package.module:callable` taking (logits, targets) and returning the mean loss as a scalar."""

    def __post_init__(self) -> None:
        from smolcluster.devices import check_spec

        check_spec(self.device)
        if self.loss != "cross_entropy" and not is_import_path(self.loss):
            raise ConfigError(f"loss: expected cross_entropy or package.module:callable, got {_quote(self.loss)}")
        for name in ("batch_size", "num_epochs", "learning_rate"):
            _positive(name, getattr(self, name))
        for name in ("momentum", "weight_decay", "eval_steps", "threads", "max_steps", "warmup_steps", "max_grad_norm",
                     "eval_samples", "prox_mu", "outer_momentum"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("local_steps", self.local_steps)
        _positive("outer_lr", self.outer_lr)
        if self.outer_momentum >= 1:
            raise ConfigError(f"outer_momentum: expected 0 <= x < 1, got {self.outer_momentum!r}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    """A model from the registry in models/, with its sizes; or the user's own, by import path.

    Sizes of 0 (input_dim, out, context) are taken from the data when the model is built."""

    OPEN_KEY: ClassVar[str] = "type"

    type: str = "SimpleNN"
    """SimpleNN (input-hidden-out), MLP (any list of hidden sizes), CNN (images) or GPT (text, a
    character transformer); or `package.module:callable` returning an nn.Module, called with this
    section's other keys as keyword arguments."""
    input_dim: int = 0
    """Inputs per sample, SimpleNN and MLP only (0: from the data; 784 for MNIST's 28 x 28 pixels)."""
    hidden: int | list[int] = 128
    """Hidden width (SimpleNN, CNN) or list of widths (MLP)."""
    out: int = 0
    """Outputs: classes, or GPT's vocabulary size (0: from the data; 10 for MNIST)."""
    channels: list[int] = field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each 3x3 conv + 2x2 max-pool stage."""
    dropout: float = 0.0
    """Probability of zeroing an activation while training: after each hidden ReLU (SimpleNN, MLP,
    CNN), before CNN's classifier, and in every GPT block (0: no dropout)."""
    batchnorm: bool = False
    """CNN only: BatchNorm after each conv (its running statistics are buffers, not parameters)."""
    n_layer: int = 4
    """GPT only: transformer blocks."""
    n_head: int = 4
    """GPT only: attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """GPT only: width of the embeddings and of the residual stream."""
    context: int = 0
    """GPT only: positions (characters) the model sees at once (0: the data's sample length)."""
    bias: bool = False
    """GPT only: biases in the Linear and LayerNorm layers (nanoGPT: without is a bit better and faster)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The keyword arguments of an import-path model (its section's keys that are not listed here)."""

    def __post_init__(self) -> None:
        from smolcluster.models import MODELS

        if is_import_path(self.type):
            return  # its keyword arguments: `options`, and the built-in keys it takes (models.call_args)
        if self.type not in MODELS:
            raise ConfigError(f"type: unknown model {_quote(self.type)}; choose one of {sorted(MODELS)} "
                              "or give an import path package.module:callable")
        widths = [self.hidden] if isinstance(self.hidden, int) else self.hidden
        for name, values in (("hidden", widths), ("channels", self.channels)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"{name}: expected positive sizes, got {_quote(values)}")
        if self.type == "SimpleNN" and not isinstance(self.hidden, int):
            raise ConfigError(f"hidden: SimpleNN takes one width, got {_quote(self.hidden)} (use MLP)")
        for name in ("input_dim", "out", "context"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name in ("n_layer", "n_head", "n_embd"):
            _positive(name, getattr(self, name))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: expected a probability 0 <= p < 1, got {self.dropout!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_head: {self.n_head} heads do not divide n_embd ({self.n_embd})")
        if self.options:
            raise ConfigError(f"options: only an import-path model takes options, {self.type} does not")

    @staticmethod
    def _default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def hidden_sizes(self) -> list[int]:
        return [self.hidden] if isinstance(self.hidden, int) else list(self.hidden)


@dataclass(kw_only=True, slots=True, frozen=True)
class DatasetConfig:
    """Which data to train on: a built-in dataset, files of your own, or your own loader by import path."""

    OPEN_KEY: ClassVar[str] = "name"
    BUILT_IN: ClassVar[tuple[str, ...]] = ("MNIST", "synthetic", "csv", "image_folder", "text")
    READ_BY: ClassVar[dict[str, tuple[str, ...]]] = {
        "path": ("csv", "image_folder", "text"), "test_path": ("csv", "image_folder", "text"),
        "test_fraction": ("csv", "image_folder", "text"), "label_column": ("csv",), "feature_columns": ("csv",),
        "header": ("csv",), "image_size": ("image_folder",), "grayscale": ("image_folder",),
        "memory_mb": ("image_folder",), "context": ("text",),
    }
    """The keys only some built-in datasets read; given to another, they are an error, and for an
    import-path dataset they are keyword arguments like its other keys."""
    IMAGES: ClassVar[tuple[str, ...]] = ("MNIST", "synthetic", "image_folder")

    name: str = "MNIST"
    """MNIST (shipped in data/mnist, no download), synthetic (MNIST-shaped noise, for tests), csv (a
    table: path, label_column), image_folder (one folder of images per class: path), text
    (character-level language modelling: path, context); or `package.module:callable` returning
    (train, test), called with this section's other keys (see smolcluster/datasets/custom.py)."""
    root: str | None = None
    """MNIST: folder with the IDX files (default: $SMOLCLUSTER_DATA, else the repository's
    data/mnist). csv, image_folder, text: folder that relative `path` and `test_path` are taken from
    (default: the current directory). Each machine's own: the handshake does not compare it."""
    train_size: int = 0
    """Use only the first this many training samples (0: all; synthetic: default 4096)."""
    test_size: int = 0
    """Use only the first this many test samples (0: all; synthetic: default 1024)."""
    path: str | None = None
    """csv: the file; image_folder: the folder holding one folder of images per class; text: a text
    file, plain or gzip (default: the shipped data/tinyshakespeare/input.txt.gz)."""
    test_path: str | None = None
    """csv, image_folder, text: a separate test file (folder) like `path`; default: none, the test
    set is split off `path` (test_fraction)."""
    test_fraction: float = 0.1
    """Without test_path, this fraction of `path` is the test set: csv and image_folder a seeded
    random choice of samples (data.py says how), text the last characters (0.1: the usual split)."""
    label_column: int | str | None = None
    """csv (required): the label column, by its header name or 0-based index. Integer labels are
    class indices; any other labels are names, numbered in sorted order."""
    feature_columns: list[int | str] | None = None
    """csv: the feature columns, by name or 0-based index; default: every column but the label.
    Features are standardised with the training set's mean and standard deviation per column."""
    header: bool = True
    """csv: the first row names the columns (false: every row is data; columns by index only)."""
    image_size: int | list[int] | None = None
    """image_folder: resize every image to this size (one number: square; or [height, width]);
    default: as the files are (then they must all have one size)."""
    grayscale: bool = False
    """image_folder: one channel instead of three (RGB)."""
    memory_mb: float = 1024.0
    """image_folder: decode every image up front when all of them take at most this many MiB as
    float32, else decode each when its batch is due, in a background thread (0: always the latter)."""
    context: int = 64
    """text: characters per sample (the sequence length); the target is the same shifted by one."""
    version: str | None = None
    """Your name for this data's version; the handshake compares it instead of a digest of a sample
    of the data (which misses a change in samples it did not pick)."""
    validation_split: float = 0.0
    """Fraction of each worker's shard it holds out for validation (0: none; below 1)."""
    augment: bool = False
    """Images: rotate, shift and scale every training sample at random, drawn from (seed, worker,
    epoch, step) so reruns are identical."""
    augment_degrees: float = 10.0
    """augment: largest rotation, in degrees either way."""
    augment_translate: float = 0.1
    """augment: largest shift, as a fraction of the width (height) either way."""
    augment_scale: float = 0.1
    """augment: largest change of size, as a fraction either way (0.1: 0.9x to 1.1x)."""
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    """How the training set is split over the workers: iid (each a random equal share), dirichlet
    (each class split over the workers in proportions drawn from Dirichlet(alpha): non-IID), or
    shards (sorted by label and dealt in labels_per_worker pieces each); rules in partition.py."""
    alpha: float = 0.5
    """dirichlet: concentration; 0.1 gives each worker mostly one or two classes, 100 is nearly IID."""
    labels_per_worker: int = 2
    """shards: pieces of the label-sorted data each worker gets (about that many classes each)."""
    shares: list[float] | None = None
    """iid: each worker's relative share of the data, in worker-id order (e.g. [2, 1, 1] for a
    machine twice as fast); its batch (sync) or local steps (local modes) scale alike, so all
    finish a step together (null: equal shares)."""

    options: dict[str, Any] = field(default_factory=dict)
    """The keyword arguments of an import-path dataset (its section's keys that are not listed here)."""

    def __post_init__(self) -> None:
        if is_import_path(self.name):
            self._hand_loader_keys_to_options()
        elif self.name not in self.BUILT_IN:
            raise ConfigError(f"name: unknown dataset {_quote(self.name)}; choose one of {list(self.BUILT_IN)} "
                              "or give an import path package.module:callable")
        _positive("train_size", self.train_size, allow_zero=True)
        _positive("test_size", self.test_size, allow_zero=True)
        if self.name in ("csv", "image_folder") and not self.path:
            raise ConfigError(f"path: the {self.name} dataset needs it ("
                              + ("the CSV file)" if self.name == "csv" else "a folder with one folder of images per class)"))
        if self.name == "csv" and self.label_column is None:
            raise ConfigError("label_column: the csv dataset needs it (a header name or 0-based column index)")
        for name in ("test_fraction", "validation_split", "augment_translate", "augment_scale"):
            value = getattr(self, name)
            _positive(name, value, allow_zero=True)
            if value >= 1 or (name == "test_fraction" and value == 0):
                bounds = "0 < x < 1" if name == "test_fraction" else "0 <= x < 1"
                raise ConfigError(f"{name}: expected a fraction {bounds}, got {value!r}")
        _positive("augment_degrees", self.augment_degrees, allow_zero=True)
        _positive("alpha", self.alpha)
        _positive("labels_per_worker", self.labels_per_worker)
        if self.shares is not None:
            if not self.shares or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                                          and math.isfinite(w) for w in self.shares):
                raise ConfigError(f"shares: expected a list of positive numbers, one per worker, got {_quote(self.shares)}")
            if self.partition != "iid":
                raise ConfigError(f"shares: sizes the shards of the iid partition; {self.partition} sizes its own")
        _positive("memory_mb", self.memory_mb, allow_zero=True)
        _positive("context", self.context)
        if self.label_column is not None:
            _column("label_column", self.label_column)
        for i, column in enumerate(self.feature_columns or []):
            _column(f"feature_columns[{i}]", column)
        if self.feature_columns is not None and not self.feature_columns:
            raise ConfigError("feature_columns: expected at least one column (or leave it out: all but the label)")
        if self.image_size is not None:
            sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size
            if len(sizes) not in (1, 2) or any(v < 1 for v in sizes):
                raise ConfigError(f"image_size: expected a positive size or [height, width], got {_quote(self.image_size)}")
        for key, readers in self.READ_BY.items():  # after the checks: a key's value may be what is wrong
            if self.name not in readers and getattr(self, key) != _DATASET_DEFAULTS[key]:
                raise ConfigError(f"{key}: {self.name} does not read it (only {', '.join(readers)})")
        if self.augment and self.name in self.BUILT_IN and self.name not in self.IMAGES:
            raise ConfigError(f"augment: only for images ({', '.join(self.IMAGES)}), not {self.name}")

    def _hand_loader_keys_to_options(self) -> None:
        """An import-path dataset's `path: ...` is its keyword argument, not the csv loader's."""
        given = {k: getattr(self, k) for k in self.READ_BY if getattr(self, k) != _DATASET_DEFAULTS[k]}
        if given:
            object.__setattr__(self, "options", {**given, **self.options})
            for key in given:
                object.__setattr__(self, key, _DATASET_DEFAULTS[key])

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """image_size as (height, width), or None."""
        if self.image_size is None:
            return None
        sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size
        return (sizes[0], sizes[-1])


def _column(name: str, value: int | str) -> None:
    """A 0-based index, or a header name that does not read as a number ('3' could mean either)."""
    if isinstance(value, int):
        _positive(name, value, allow_zero=True)
        return
    try:
        float(value)
    except ValueError:
        return
    raise ConfigError(f"{name}: expected an integer (a 0-based column index) or a column name that is not a "
                      f"number, got {_quote(value)}")


_DATASET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DatasetConfig) if f.default is not dataclasses.MISSING}


@dataclass(kw_only=True, slots=True, frozen=True)
class WandbConfig:
    """Weights & Biases; offline unless an API key is set and `online` is asked for."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline: write runs locally (upload later with `wandb sync`); online needs an API key;
    disabled: no W&B at all. $WANDB_MODE wins over this key."""
    project: str = "smolcluster"
    """W&B project."""
    entity: str | None = None
    """W&B user or team (default: your W&B default entity)."""
    group: str | None = None
    """Group of this cluster run; default: a name made from the time and the model."""
    dir: str | None = None
    """Where offline runs are written; default: the run's out_dir."""
    init_timeout: float = 30.0
    """Seconds wandb.init may take before the run goes on without W&B."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Config:
    """One job: the cluster plus what it trains."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What must agree between server and workers for replicas to stay identical."""
        d = self.to_dict()
        t = {k: d["training"][k] for k in FINGERPRINT_TRAINING}
        return {
            "training": t,
            "model": d["model"],
            "dataset": {k: v for k, v in d["dataset"].items() if k not in ("root", "memory_mb")},
            "cluster": {k: d["cluster"][k] for k in FINGERPRINT_CLUSTER},
        }

    def replace(self, section: str, **changes: Any) -> Config:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


FINGERPRINT_TRAINING = (
    "batch_size", "learning_rate", "lr_schedule", "warmup_steps", "optimizer", "momentum", "weight_decay",
    "num_epochs", "max_steps", "max_grad_norm", "loss", "eval_samples", "algorithm", "local_steps", "prox_mu",
    "prox_adaptive", "outer_lr", "outer_momentum", "balance",
)

FINGERPRINT_CLUSTER = ("seed", "num_workers", "compression", "int8_chunk", "bucket_mb")
NN_SECTIONS = ("training", "model", "dataset", "wandb")
"""The sections of nn_config.yaml; the cluster file's keys are the `cluster` section."""

# Keys of upstream's files that moved; their values are carried over with a warning.
LEGACY_CLUSTER = {"timeout": "step_timeout"}
LEGACY_NN = {k: "training" for k in ("batch_size", "learning_rate", "num_epochs", "eval_steps", "track_gradients")}


def diff_fingerprints(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints ('training.learning_rate: 0.001 != 0.01')."""
    out: list[str] = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{line}" for line in diff_fingerprints(a, b)]
        elif a != b:
            out.append(f"{key}: server has {json.dumps(a)}, worker has {json.dumps(b)}")
    return out


# --- loading ---------------------------------------------------------------------------------


MAX_QUOTE = 200
"""Characters of a user's value that an error quotes; a value can be megabytes (or, through YAML
aliases, billions of items), and an error is one line."""
MAX_FILE_BYTES = 1 << 20
"""A config file larger than this is refused (they are a few KiB); nothing reads gigabytes."""
MAX_ALIAS_VALUES = 10_000
"""Values that YAML aliases may add to a document; 400 bytes of nested anchors stand for 9**9."""

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_QUOTE
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def _quote(value: Any) -> str:
    """A bounded repr: reprlib stops at a few items per level, so even a huge value costs nothing."""
    return _cut(_REPR.repr(value))


def _describe(value: Any) -> str:
    return f"{_quote(value)} ({type(value).__name__})"


def _number(value: Any, where: str) -> float:
    """A finite float, or a ConfigError naming the key: NaN and inf pass every range check."""
    try:
        number = float(value)
    except (ValueError, OverflowError):  # 'fast'; an integer beyond float's range
        raise ConfigError(f"{where}: expected a number, got {_describe(value)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {_describe(value)}")
    return number


class _YamlRefused(Exception):
    """Text the loader will not turn into values; the caller says which file or --set it was."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader (plain values only, no code) that refuses documents whose aliases expand past
    MAX_ALIAS_VALUES values ("billion laughs": every later step would walk or print all of them)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        sizes: dict[int, int] = {}
        if _expanded(node, sizes) - len(sizes) > MAX_ALIAS_VALUES:
            raise _YamlRefused(f"YAML aliases expand to more than {MAX_ALIAS_VALUES} values "
                               "(nested anchors, or an alias inside its own anchor); write the values out")
        return node


_ENDLESS = 1 << 62
"""The size of a node while it is being measured: an alias back to it expands forever."""


def _expanded(node: Any, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias written out; aliases share nodes, so
    memoising by node makes this linear in the document, however far it expands."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    sizes[key] = _ENDLESS
    if isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded(k, sizes) + _expanded(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded(v, sizes) for v in node.value)
    else:
        n = 1
    sizes[key] = n
    return n


def _yaml_reason(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line (it spans five, quoting the text): what, and where."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = ", ".join(str(x) for x in (e.context, e.problem) if x)
        return _cut(f"{what} (line {mark.line + 1}, column {mark.column + 1})", 2 * MAX_QUOTE)
    return _cut(" ".join(str(e).split()), 2 * MAX_QUOTE)


def _parse_yaml(text: str) -> Any:
    """YAML as SafeLoader reads it, bounded; any failure is _YamlRefused with a one-line reason."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise _YamlRefused(f"not valid YAML: {_yaml_reason(e)}") from None
    except RecursionError:
        raise _YamlRefused("not usable YAML: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise _YamlRefused(f"not usable YAML: {_cut(str(e))}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the type hint `tp`; return it (ints are accepted for floats)."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e).split(": expected ", 1)[-1])
        raise ConfigError(f"{where}: expected {' or '.join(errors)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{where}.{_cut(str(k))}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
    if tp is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; .nan, .inf and 'nan' are numbers no key wants.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return _number(value, where)
        raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
    if tp is Any:  # an import-path callable's own keyword argument: any YAML value
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = [k for k in raw if k not in names]
    opener = getattr(cls, "OPEN_KEY", None)
    if unknown and opener and is_import_path(raw.get(opener)):
        # A user's callable takes the section's other keys as keyword arguments.
        options = {str(k): raw[k] for k in unknown}
        raw = {**{k: v for k, v in raw.items() if k in names and k not in unknown},
               "options": {**raw.get("options", {}), **options}}
        unknown = []
    if unknown:
        raise ConfigError(f"{prefix}{_cut(str(unknown[0]))}: unknown key; known keys are {', '.join(names)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{prefix}{name}")
        else:
            kwargs[name] = _coerce(tp, value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        data = _parse_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except _YamlRefused as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _migrate(raw: dict[str, Any], moves: dict[str, str], path: Path, nest: bool) -> None:
    for old, new in moves.items():
        if old not in raw:
            continue
        value = raw.pop(old)
        if nest:
            raw.setdefault(new, {})[old] = value
            logger.warning(f"{path}: key '{old}' now lives under '{new}.{old}'; using it from there")
        else:
            raw[new] = value
            logger.warning(f"{path}: key '{old}' is now called '{new}'; using it as that")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.batch_size=64' -> (['training', 'batch_size'], 64); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {_quote(text)}: expected KEY=VALUE, e.g. training.batch_size=64")
    try:
        parsed = _parse_yaml(value) if value.strip() else ""
    except _YamlRefused as e:
        raise ConfigError(f"--set {_cut(key.strip())}: {e}") from None
    return key.strip().split("."), parsed


def load_config(
    cluster_path: str | Path | None = None,
    nn_path: str | Path | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
) -> Config:
    """Load both files, apply `--set` overrides, validate; raises ConfigError naming file and key."""
    cpath = Path(cluster_path) if cluster_path else default_config("cluster_config.yaml")
    npath = Path(nn_path) if nn_path else default_config("nn_config.yaml")
    cluster_raw = _read_yaml(cpath)
    nn_raw = _read_yaml(npath)
    _migrate(cluster_raw, LEGACY_CLUSTER, cpath, nest=False)
    _migrate(nn_raw, LEGACY_NN, npath, nest=True)
    for key in nn_raw:
        if key not in NN_SECTIONS:  # `cluster` too: it lives in its own file
            raise ConfigError(f"{npath}: {key}: unknown section; known sections are {', '.join(NN_SECTIONS)}")
    sections = {"cluster": cluster_raw, **nn_raw}
    for text in overrides:
        keys, value = parse_override(text)
        node = sections
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {_cut(text)}: {_cut(k)} is not a section")
            node = child
        node[keys[-1]] = value
    set_keys = {".".join(parse_override(t)[0]) for t in overrides}
    for key in list(sections):
        if key not in ("cluster", *NN_SECTIONS):  # the files were checked: it came from a --set
            given = next(k for k in sorted(set_keys) if k.split(".")[0] == key)
            raise ConfigError(f"--set {_cut(given)}: unknown section {_quote(key)}; known sections are cluster, {', '.join(NN_SECTIONS)}")

    def located(error: ConfigError, path: Path, prefix: str) -> ConfigError:
        key = prefix + str(error).split(":", 1)[0].split("[", 1)[0]
        if key in set_keys:
            return ConfigError(f"--set {prefix}{error}")
        return ConfigError(f"{path}: {error}")

    try:
        cluster = build(ClusterConfig, sections.pop("cluster"), "")
    except ConfigError as e:
        raise located(e, cpath, "cluster.") from None
    try:
        rest = build(Config, sections, "")
    except ConfigError as e:
        raise located(e, npath, "") from None
    return dataclasses.replace(rest, cluster=cluster)
