"""The `smolcluster` command: server, worker, run (a local cluster), eval, sample, predict, serve-model,
status, and hosts (for launch.sh)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from smolcluster import log
from smolcluster.config import DEFAULT_CLUSTER, Config, ModelConfig, load_config
from smolcluster.errors import ConfigError, SmolclusterError

if TYPE_CHECKING:
    from smolcluster.api import Job
    from smolcluster.data import Split

EPILOG = "Config keys and their defaults: see README.md, or configs/*.yaml."


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--cluster-config", metavar="FILE", help="cluster YAML (default: configs/cluster_config.yaml)")
    g.add_argument("--nn-config", metavar="FILE", help="model/training YAML (default: configs/nn_config.yaml)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override any key, e.g. --set training.batch_size=64 (repeatable)")
    g.add_argument("--workers", type=int, metavar="N", help="= --set cluster.num_workers=N")
    g.add_argument("--epochs", type=int, metavar="E", help="= --set training.num_epochs=E")
    g.add_argument("--model", metavar="NAME", help="SimpleNN, MLP, CNN, CNN-BN or GPT, with its preset sizes")
    g.add_argument("--seed", type=int, metavar="S", help="= --set cluster.seed=S")
    g.add_argument("--out", metavar="DIR", help="= --set training.out_dir=DIR")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


SHORTCUTS = (("workers", "cluster.num_workers"), ("epochs", "training.num_epochs"), ("seed", "cluster.seed"),
             ("out", "training.out_dir"))
"""Flags that stand for one key each: `--workers N` is `--set cluster.num_workers=N`."""


def _shortcut_overrides(args: argparse.Namespace) -> list[str]:
    """Shortcuts first, so an explicit --set always wins."""
    from smolcluster.models import PRESETS

    out: list[str] = []
    if args.model is not None:
        if args.model not in PRESETS:
            raise ConfigError(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
        out += [f"model.{k}={json.dumps(v)}" for k, v in PRESETS[args.model].items()]
    for flag, key in SHORTCUTS:
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return out + args.overrides


def _torchrun_id() -> str:
    """The worker id torchrun's environment gives (RANK + 1), for the log's prefix."""
    rank = os.environ.get("RANK", "")
    return str(int(rank) + 1) if rank.isdigit() else "?"


def _load(args: argparse.Namespace, job: Job | None = None) -> tuple[Config, list[str]]:
    """The validated config, and the flags that reproduce it in a child process (a Job's own
    overrides come first; its children rebuild the job, so they are not passed on)."""
    overrides = _shortcut_overrides(args)
    if job is not None:
        args.cluster_config = args.cluster_config or job.cluster_config
        args.nn_config = args.nn_config or job.nn_config
    try:
        cfg = load_config(args.cluster_config, args.nn_config, [*(job.overrides if job else []), *overrides])
    except ConfigError as e:  # name the flag the user typed, not the --set it stands for
        message = str(e)
        for flag, key in SHORTCUTS:
            if getattr(args, flag) is not None and message.startswith(f"--set {key}:"):
                message = f"--{flag} ({key}){message[len(f'--set {key}'):]}"
        raise ConfigError(message) from None
    passthrough = [*(["--cluster-config", args.cluster_config] if args.cluster_config else []),
                   *(["--nn-config", args.nn_config] if args.nn_config else []),
                   "--log-level", args.log_level]
    for o in overrides:
        passthrough += ["--set", o]
    return cfg, passthrough


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolcluster", description=__doc__, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("server", help="run the parameter server", epilog=EPILOG)
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir/checkpoints")
    s.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without a cluster token (trusted networks only)")
    s.add_argument("--fault", action="append", default=[], metavar="STEP:kill", help="inject a crash (testing)")
    _config_args(s)
    w = sub.add_parser("worker", help="run one worker", epilog=EPILOG)
    w.add_argument("--id", type=int, metavar="K",
                   help="worker id, 1..num_workers (under torchrun: from its environment, RANK + 1)")
    w.add_argument("--resume", action="store_true",
                   help="cluster.backend torch: worker 1 (rank 0) continues from the last checkpoint in "
                        "out_dir/checkpoints (the ps backend's server takes --resume instead)")
    w.add_argument("--host", metavar="NAME", help="this machine's name in a host_ip map (default: hostname)")
    w.add_argument("--fault", action="append", default=[], metavar="STEP:KIND[:ARG]",
                   help="inject a fault (testing): sleep:S, exit, kill, disconnect, garbage, nan")
    w.add_argument("--save-params", metavar="FILE", help="also save this worker's final parameters (safetensors)")
    _config_args(w)
    r = sub.add_parser("run", help="run a server and N workers on this machine (the default job)",
                       description=RUN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir/checkpoints")
    _config_args(r)
    e = sub.add_parser("eval", help="evaluate a saved model.safetensors on the test set", epilog=EPILOG)
    e.add_argument("model_path", metavar="MODEL", help="path to model.safetensors")
    _config_args(e)
    sample = sub.add_parser("sample", help="generate text from a saved text model (GPT)", description=SAMPLE_DOC,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_argument("model_path", metavar="MODEL", help="path to model.safetensors")
    sample.add_argument("--prompt", default="\n", metavar="TEXT", help="text to continue (default: a newline)")
    sample.add_argument("--tokens", type=int, default=500, metavar="N", help="characters to generate (default: 500)")
    sample.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="divide the logits by T: < 1 is more conservative, 0 always picks the likeliest "
                             "(default: 0.8)")
    sample.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample only among the K likeliest characters (default: 0, all)")
    sample.add_argument("--seed", type=int, default=1337, metavar="S",
                        help="random seed: same seed, same text (default: 1337)")
    sample.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    pr = sub.add_parser("predict", help="a saved classifier's top classes for image files or test samples",
                        epilog=EPILOG)
    pr.add_argument("model_path", metavar="MODEL", help="path to model.safetensors")
    pr.add_argument("files", nargs="*", metavar="FILE", help="PNG or JPEG images of any size")
    pr.add_argument("--index", type=int, action="append", default=[], metavar="N",
                    help="sample N of the test set the model was trained with (repeatable)")
    pr.add_argument("--top", type=int, default=3, metavar="K", help="classes to print (default: 3)")
    _config_args(pr)
    sm = sub.add_parser("serve-model", help="a page to draw a digit on (or upload one) and see a saved "
                        "classifier's top classes, live", description=SERVE_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sm.add_argument("model_path", metavar="MODEL", help="path to model.safetensors (a classifier of grey images)")
    sm.add_argument("--port", type=int, default=8643, metavar="P", help="port to listen on (default: 8643; 0: a free one)")
    sm.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                    help="address to listen on (default: 127.0.0.1; 0.0.0.0 lets a phone on the network in)")
    sm.add_argument("--top", type=int, default=3, metavar="K", help="classes to show (default: 3)")
    sm.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    st = sub.add_parser("status", help="print a running server's state (its /api/status) in the terminal")
    st.add_argument("url", nargs="?", default="http://127.0.0.1:8642/", metavar="URL",
                    help="the server's dashboard (default: http://127.0.0.1:8642/, cluster.http_port's default)")
    st.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    h = sub.add_parser("hosts", help="print the hosts launch.sh starts processes on, one line each",
                       description=HOSTS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    h.add_argument("--dashboard", action="store_true",
                   help="print instead the one line saying where the server's dashboard is (launch.sh status)")
    _config_args(h)
    return p


HOSTS_DOC = """\
One line per process, fields separated by one space, '-' where a field is unset:

  ROLE ID NAME ADDRESS USER PORT KEY DIR UV PYTHON
  server 0 mini1 192.168.1.10 alice - /Users/alice/.ssh/id_ed25519 smolcluster - -
  worker 1 mini2 192.168.1.11 alice - /Users/alice/.ssh/id_ed25519 smolcluster - -

ROLE is server or worker, ID the worker id (0 for the server; with cluster.backend torch there is
no server line: worker 1 leads), NAME the host name from the cluster config, the rest comes from
its `ssh` section (KEY with ~ expanded). launch.sh reads this so that it never parses YAML itself.

With --dashboard, one line instead: where the server's dashboard is (cluster.http_port on the
server host), with the ssh command that reaches it when it listens on 127.0.0.1 there, or that it
is off.
"""


SERVE_DOC = """\
Serve one page with a canvas to draw a digit on (mouse or finger) and a file input for a picture;
as each stroke ends the page posts the image to /predict, which answers the model's top classes
as JSON ({"top": [[class, probability], ...]}). The page needs no internet (no CDN).

exit status: 130 once stopped with Ctrl-C; 1 the port cannot be had, or the file is missing or not a
model; 2 the model is not a classifier of grey images, or a bad argument.
"""


SAMPLE_DOC = """\
Continue --prompt with --tokens characters from a text model saved by a run (its vocabulary is in
the file's metadata) and print the prompt followed by them on stdout.

exit status: 0 done; 1 the file is missing, unreadable or not a text model; 2 a bad argument
(a character of the prompt that is not in the model's vocabulary, a temperature < 0, ...).
"""


RUN_DOC = """\
Start a server and N workers on this machine (on a free port of 127.0.0.1, with a token of their
own), show their progress, copy their logs to OUT/logs/, and print the test accuracy on stdout.
The model and summary.json go to OUT (training.out_dir, default runs/latest).

exit status: 0 done; 1 a process failed (run names it and stops the rest); 2 config error;
130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (every process is stopped first).
"""


def main(argv: list[str] | None = None, job: Job | None = None) -> int:
    """The CLI; with a `Job` (smolcluster.api), the job's model, data and loss replace the config's."""
    args = parser().parse_args(argv)
    role = {"worker": f"worker {getattr(args, 'id', None) or _torchrun_id()}"}.get(args.command, args.command)
    log.setup(role, args.log_level)
    try:
        if args.command == "sample":  # reads a model file, not the configs
            return _sample(args)
        if args.command == "serve-model":  # reads a model file, not the configs
            return _serve_model(args)
        if args.command == "status":  # reads a server's dashboard, not the configs
            from smolcluster.status import print_status

            return print_status(args.url)
        cfg, passthrough = _load(args, job)
        return COMMANDS[args.command](args, cfg, passthrough, job)
    except ConfigError as e:  # DataFileError too: a file the user named is malformed
        logger.error(f"config error: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:
        logger.warning("interrupted")
        return 128 + getattr(e, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM (runner.Stopped)
    except (SmolclusterError, OSError) as e:  # the message is the whole story: one line, no traceback
        logger.error(str(e))
        return getattr(e, "exit_code", 1)


def _server(args: argparse.Namespace, cfg: Config, _: list[str], job: Job | None = None) -> int:
    from smolcluster.runner import watch_parent
    from smolcluster.server import Server

    if cfg.cluster.backend == "torch":
        raise ConfigError("cluster.backend is torch: there is no server; start the workers "
                          "(worker 1 holds the rendezvous at host_ip:port), or use `smolcluster run`")
    watch_parent()
    summary = Server(cfg, resume=args.resume, insecure=args.insecure, faults=_faults(args.fault), job=job).run()
    from smolcluster.results import headline

    print(headline(summary), flush=True)
    return 0


def _faults(texts: list[str]) -> list:
    from smolcluster.faults import parse_fault

    try:
        return [parse_fault(f) for f in texts]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _worker(args: argparse.Namespace, cfg: Config, _: list[str], job: Job | None = None) -> int:
    from smolcluster.rendezvous import from_torchrun
    from smolcluster.runner import watch_parent

    watch_parent()
    save = Path(args.save_params) if args.save_params else None
    if cfg.cluster.backend == "ps" and from_torchrun() is not None:
        logger.info("started by torchrun (RANK and WORLD_SIZE are set): using cluster.backend torch")
        cfg = cfg.replace("cluster", backend="torch")
    if cfg.cluster.backend == "torch":
        from smolcluster.ddp import Rank

        if args.fault:
            raise ConfigError("--fault: injected faults exist on cluster.backend ps only")
        done = Rank(cfg, args.id, host=args.host, job=job, resume=args.resume, save_params=save).run()
        if done:
            from smolcluster.results import headline

            print(headline(done), flush=True)
        return 0
    from smolcluster.worker import Worker

    if args.id is None:
        raise ConfigError("--id: which worker this is, 1..num_workers")
    if args.resume:
        raise ConfigError("--resume: on cluster.backend ps the server resumes (smolcluster server --resume)")
    Worker(cfg, args.id, host=args.host, faults=_faults(args.fault), save_params=save, job=job).run()
    return 0


def _run(args: argparse.Namespace, cfg: Config, passthrough: list[str], job: Job | None = None) -> int:
    from smolcluster.runner import run_local

    # The port is this local cluster's own business: a free one, unless asked for by --set.
    explicit = any(o.partition("=")[0].strip() == "cluster.port" for o in args.overrides)
    code = run_local(cfg, passthrough, port=cfg.cluster.port if explicit else None,
                     program=job.program if job else None, resume=args.resume)
    summary_path = Path(cfg.training.out_dir) / "summary.json"
    if code == 0 and summary_path.exists():
        from smolcluster.results import headline

        summary = json.loads(summary_path.read_text())
        t = cfg.training
        unit = "steps" if t.algorithm == "sync" else f"rounds of {t.local_steps} local steps"
        print(
            f"{headline(summary)} ({summary['steps']} {unit}, "
            f"{summary['workers']} workers, {summary['wall_s']:.1f} s); "
            f"model and summary in {summary_path.parent}/",
            flush=True,
        )
    return code


def _eval(args: argparse.Namespace, cfg: Config, _: list[str], job: Job | None = None) -> int:
    from smolcluster import data
    from smolcluster.results import data_meta, load_model, saved_data
    from smolcluster.train import metrics

    path = Path(args.model_path)
    model, model_cfg, meta = load_model(path)
    # The dataset the model was trained on, unless the command line names another.
    dataset, seed = cfg.dataset, cfg.cluster.seed
    saved_dataset, saved_seed = saved_data(path, meta)
    if saved_dataset is not None and not any(o.startswith("dataset.") for o in args.overrides):
        dataset, seed = saved_dataset, seed if saved_seed is None else saved_seed
    test = data.load_split(dataset, "test", seed)
    _check_fits(path, model_cfg, test)
    saved = data_meta(path, meta)
    if saved is not None and saved.task == "lm":
        m = metrics(model, test, "lm")
        print(f"test bpc: {m['bpc']:.4f} (loss {m['loss']:.4f}, {len(test)} samples)", flush=True)
        return 0
    m = metrics(model, test, "classify")
    print(f"test accuracy: {m['accuracy']:.2f}% (loss {m['loss']:.4f}, {len(test)} samples)", flush=True)
    return 0


def _check_fits(path: Path, model_cfg: ModelConfig, test: Split) -> None:
    """A model whose sizes agree with its own tensors can still not fit the data: say which size."""
    from smolcluster.results import ModelFileError, describe_config

    if not len(test) or model_cfg.type not in ("SimpleNN", "MLP", "CNN", "GPT"):
        return  # an import-path model's sizes are its own business
    features, classes = test.x[0].numel(), int(test.y.max()) + 1
    text = test.x.dim() == 2 and not test.x.is_floating_point()  # token ids (n, T)
    if (model_cfg.type == "GPT") != text:
        raise ModelFileError(f"{path}: the model ({describe_config(model_cfg)}) "
                             f"{'reads text' if model_cfg.type == 'GPT' else 'classifies'}, the test data is "
                             f"{'text' if text else 'not text'} ({list(test.x.shape[1:])} per sample); "
                             "choose its dataset with --set dataset.name=...")
    if model_cfg.type in ("SimpleNN", "MLP") and model_cfg.input_dim != features:
        raise ModelFileError(f"{path}: the model takes {model_cfg.input_dim} inputs ({describe_config(model_cfg)}), "
                             f"the test data has {features} per sample")
    if model_cfg.type == "CNN" and (test.x.dim() != 4 or min(test.x.shape[2:]) >> len(model_cfg.channels) == 0):
        raise ModelFileError(f"{path}: the model's {len(model_cfg.channels)} pooling stages "
                             f"({describe_config(model_cfg)}) do not fit the test data's {list(test.x.shape[1:])} images")
    if model_cfg.type == "GPT" and test.x.shape[-1] > model_cfg.context:
        raise ModelFileError(f"{path}: the model sees {model_cfg.context} characters at once "
                             f"({describe_config(model_cfg)}), the test data's samples are {test.x.shape[-1]} long")
    if model_cfg.out < classes:
        raise ModelFileError(f"{path}: the model has {model_cfg.out} outputs ({describe_config(model_cfg)}), "
                             f"the test data has {classes} classes")


def _sample(args: argparse.Namespace) -> int:
    import math

    import torch

    from smolcluster.models.gpt import GPT, generate
    from smolcluster.results import ModelFileError, data_meta, load_model

    if args.tokens < 0 or not math.isfinite(args.temperature) or args.temperature < 0 or args.top_k < 0:
        raise ConfigError("--tokens, --temperature and --top-k: expected numbers >= 0, got "
                          f"{args.tokens}, {args.temperature}, {args.top_k}")
    if not args.prompt:
        raise ConfigError("--prompt: expected at least one character to continue")
    path = Path(args.model_path)
    model, model_cfg, meta = load_model(path)
    saved = data_meta(path, meta)
    if saved is None or saved.task != "lm" or not saved.vocab or not isinstance(model, GPT):
        raise ModelFileError(f"{path}: not a text model (its metadata has no vocabulary; "
                             f"it is a {model_cfg.type} trained to {'classify' if saved is None else saved.task})")
    index = {ch: i for i, ch in enumerate(saved.vocab)}
    unknown = sorted({ch for ch in args.prompt if ch not in index})
    if unknown:
        raise ConfigError(f"--prompt: {len(unknown)} character(s) the model has never seen: "
                          f"{', '.join(map(repr, unknown[:20]))}; it knows {len(saved.vocab)}: {saved.vocab!r}")
    idx = torch.tensor([[index[ch] for ch in args.prompt]], dtype=torch.long)
    out = generate(model, idx, args.tokens, args.temperature, args.top_k, torch.Generator().manual_seed(args.seed))
    text = "".join(saved.vocab[i] for i in out[0, idx.shape[1]:].tolist())
    print(args.prompt + text, flush=True)
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from smolcluster.serve import serve_model

    if not 0 <= args.port < 65536 or args.top < 1:
        raise ConfigError(f"--port {args.port}, --top {args.top}: expected a port 0..65535 and K >= 1")
    return serve_model(Path(args.model_path), args.bind, args.port, args.top)


def _hosts(args: argparse.Namespace, cfg: Config, _: list[str], job: Job | None = None) -> int:
    c = cfg.cluster
    try:
        procs = c.launch_hosts()
    except ConfigError as e:
        raise ConfigError(f"{args.cluster_config or DEFAULT_CLUSTER}: {e}") from None
    if args.dashboard:
        if c.backend == "torch":
            print("dashboard: none on cluster.backend torch (the parameter server serves it); see the logs")
            return 0
        from smolcluster.status import where_to_look

        _, _, name, server = procs[0]
        print(where_to_look(c, name, server))
        return 0
    unused = sorted(set(c.ssh) - {name for _, _, name, _ in procs} - {"default", c.server})  # torch: no server
    if unused:
        logger.warning(f"ssh: entries {unused} are neither the server ({c.server}) nor a worker {c.workers}")
    for role, k, name, h in procs:
        key = os.path.expanduser(h.key) if h.key else None
        fields = [role, k, name, h.address, h.user, h.port, key, h.dir, h.uv, h.python]
        print(" ".join("-" if v is None else str(v) for v in fields))
    return 0


def _predict(args: argparse.Namespace, cfg: Config, _: list[str], job: Job | None = None) -> int:
    from smolcluster import data
    from smolcluster.predict import image_input, line, load_classifier, top
    from smolcluster.results import saved_data

    path = Path(args.model_path)
    model, shape, meta = load_classifier(path)
    if not args.files and not args.index:
        raise ConfigError("predict: name image FILEs or --index N of the test set")
    for name in args.files:
        print(line(name, top(model, image_input(Path(name), shape), args.top)), flush=True)
    if args.index:
        dataset, seed = cfg.dataset, cfg.cluster.seed
        saved_dataset, saved_seed = saved_data(path, meta)
        if saved_dataset is not None and not any(o.startswith("dataset.") for o in args.overrides):
            dataset, seed = saved_dataset, seed if saved_seed is None else saved_seed
        test = data.load_split(dataset, "test", seed)
        for n in args.index:
            if not 0 <= n < len(test):
                raise ConfigError(f"--index {n}: the test set has samples 0..{len(test) - 1}")
            x, y = test[n]
            print(line(f"test[{n}]", top(model, x.unsqueeze(0), args.top), int(y)), flush=True)
    return 0


COMMANDS = {"server": _server, "worker": _worker, "run": _run, "eval": _eval, "hosts": _hosts, "predict": _predict}


def server_alias() -> int:
    """`uv run server ...` == `smolcluster server ...` (upstream habit)."""
    return main(["server", *sys.argv[1:]])


def worker_alias() -> int:
    """`uv run worker --id K ...` == `smolcluster worker --id K ...`."""
    return main(["worker", *sys.argv[1:]])
