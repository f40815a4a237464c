"""Experiment tracking: one W&B run per process, one W&B group per cluster run.

W&B is a guest here. It is offline unless an API key exists and `online` was asked for, it is
never allowed to prompt, `wandb.init` is bounded by `wandb.init_timeout`, and any W&B error
switches tracking off for the rest of the run instead of stopping training. `disabled` never
imports wandb at all (the import alone costs about a second per process).
"""

from __future__ import annotations

import netrc
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol
from urllib.parse import urlsplit

from loguru import logger

from smolcluster.config import Config, WandbConfig

Mode = Literal["online", "offline", "disabled"]
# What WANDB_MODE may say, and what it means to us ("dryrun" and "run" are wandb's old names).
ENV_MODES: dict[str, Mode] = {"online": "online", "run": "online", "offline": "offline",
                              "dryrun": "offline", "disabled": "disabled"}


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any] | None = None) -> None: ...


class NullTracker:
    """Tracks nothing; a run with tracking off behaves exactly like one with it on."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


def has_api_key(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B would find credentials without asking: WANDB_API_KEY, or a netrc entry for its host."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    home = Path(environ.get("HOME") or Path.home())
    paths = [Path(environ["NETRC"])] if environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in paths:
        try:
            if netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def decide_mode(w: WandbConfig, environ: Mapping[str, str] = os.environ) -> tuple[Mode, str | None]:
    """The mode this process runs W&B in, and a warning to log if it is not what was asked for.

    An explicit WANDB_MODE wins over `wandb.mode`; online needs an API key, because without one
    wandb.init would prompt on a terminal (and wait forever) or fail.
    """
    asked: Mode = w.mode
    source = "wandb.mode"
    env = environ.get("WANDB_MODE", "").strip().lower()
    warning = None
    if env in ENV_MODES:
        asked, source = ENV_MODES[env], "WANDB_MODE"
    elif env:
        warning = f"WANDB_MODE={env!r} is not one of {sorted(ENV_MODES)}; using wandb.mode={w.mode}"
    if asked == "online" and not has_api_key(environ):
        return "offline", (
            f"{source} asks for online W&B but there is no API key (WANDB_API_KEY or ~/.netrc; "
            "`wandb login` writes one); logging offline instead"
        )
    return asked, warning


def group_name(cfg: Config) -> str:
    """The W&B group of this cluster run: `wandb.group`, else one made from the time and the model."""
    return cfg.wandb.group or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.type}-{cfg.cluster.num_workers}w"


def run_dir(cfg: Config) -> Path:
    """The folder under which wandb writes this process's run (in a `wandb/` subfolder)."""
    return Path(cfg.wandb.dir or cfg.training.out_dir)


class WandbTracker:
    """A live W&B run; the first W&B error is logged once and switches tracking off."""

    def __init__(self, run: Any, mode: Mode, role: str) -> None:
        self.run: Any | None = run
        self.mode, self.role = mode, role

    def _fail(self, what: str, e: BaseException) -> None:
        logger.warning(f"W&B {what} failed ({type(e).__name__}: {e}); training goes on without W&B")
        self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:
            self._fail(f"log at step {step}", e)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        run, where = self.run, None
        try:
            if summary:
                # The config already is the run's config; everything else is the final word.
                run.summary.update({k: v for k, v in summary.items() if k != "config"})
            where = Path(run.settings.sync_dir)
            run.finish()
        except Exception as e:
            self._fail("finish", e)
            return
        self.run = None
        if self.mode == "offline":
            logger.info(f"W&B run {self.role} saved offline in {where}; upload it later with: wandb sync {where}")


def _bounded(fn: Callable[[], Any], timeout_s: float, on_late: Callable[[Any], None]) -> Any:
    """fn() in a daemon thread, waiting at most `timeout_s` seconds (TimeoutError after).

    A result that arrives after the timeout is handed to `on_late`, so a late run gets closed.
    """
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def target() -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e
            return
        with lock:
            if box.get("abandoned"):
                on_late(value)
            else:
                box["value"] = value

    thread = threading.Thread(target=target, daemon=True, name="wandb-init")
    thread.start()
    thread.join(timeout_s)
    with lock:
        if "value" not in box and "error" not in box:
            box["abandoned"] = True
            raise TimeoutError(f"wandb.init took longer than wandb.init_timeout={timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _close_quietly(run: Any) -> None:
    try:
        run.finish(exit_code=1)
    except Exception:
        pass


def start_tracker(
    cfg: Config, role: str, group: str | None = None, *, init: Callable[..., Any] | None = None,
    environ: Mapping[str, str] = os.environ, device: str = "",
) -> Tracker:
    """The tracker for this process (`role`: "server" or "worker-K") in W&B group `group`; the
    run's config records `device`, what this process computes on.

    Never raises and waits at most `wandb.init_timeout` seconds; `init` replaces `wandb.init`
    (tests inject failing ones).
    """
    w = cfg.wandb
    mode, warning = decide_mode(w, environ)
    if warning:
        logger.warning(warning)
    if mode == "disabled":
        return NullTracker()
    group = group or group_name(cfg)
    try:
        import wandb

        base = run_dir(cfg)
        base.mkdir(parents=True, exist_ok=True)
        # wandb reads WANDB_MODE itself and rejects values we overrule (online without a key, "").
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")  # we log what matters, one line per event
        settings = wandb.Settings(
            mode=mode,
            init_timeout=w.init_timeout,  # wandb's own bound; ours below also covers its setup
            console="off",  # our logs and progress lines stay ours
            silent=True,
        )
        kwargs = dict(
            project=w.project, entity=w.entity, group=group, name=role, job_type=role.split("-")[0],
            config={**cfg.to_dict(), "device": device}, dir=str(base), mode=mode, settings=settings,
        )
        t0 = time.monotonic()
        run = _bounded(lambda: (init or wandb.init)(**kwargs), w.init_timeout, _close_quietly)
    except Exception as e:
        logger.warning(f"W&B could not start ({type(e).__name__}: {e}); training goes on without W&B")
        return NullTracker()
    logger.info(f"W&B {mode}: run {role} in group {group} (project {w.project}), started in {time.monotonic() - t0:.1f} s")
    return WandbTracker(run, mode, role)
