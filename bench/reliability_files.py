"""Damaged files and hostile config input, measured through the real command: rows for the report.

    from bench.reliability_files import file_rows
    rows = file_rows(Path(tmp))      # about a minute on 2 cores

bench/reliability.py measures what peers do to a run; this measures what files do to it: a
checkpoint with a flipped bit, checkpoints that are all damaged, a malformed checkpoint.json,
temp files a killed server left, a YAML alias bomb, a NaN learning rate, a model file whose
metadata disagrees with its tensors. Each case runs `python -m smolcluster ...` as a user would
(cwd the repository, W&B off) and fills a Row from what the user sees: the exit code, the time,
the one error line. The checkpoints are real: one tiny synthetic job writes them (steps 4 and 8
of 12), and every checkpoint case damages a copy. Nothing here asserts; a case that fails says so
in its row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repository root, for `bench`

from bench.cluster import REPO, Cluster, env, smolcluster
from bench.logtimes import Hit, elapsed, find, of_day

if TYPE_CHECKING:
    from bench.reliability import Row

JOB = {
    "dataset.name": "synthetic", "dataset.train_size": 512, "dataset.test_size": 256, "training.batch_size": 16,
    "training.num_epochs": 2, "training.eval_steps": 0, "training.threads": 1, "wandb.mode": "disabled",
    "training.max_steps": 12, "cluster.checkpoint_steps": 4, "cluster.connect_timeout": 60,
    "cluster.join_timeout": 60, "cluster.worker_timeout": 60,
}
"""A job of a few seconds with checkpoints after steps 4 and 8 (keep_checkpoints: 2, the default)."""
ARGS = [a for k, v in JOB.items() for a in ("--set", f"{k}={v}")]
LATEST, PREVIOUS = "checkpoint-00000008", "checkpoint-00000004"
TIMEOUT_S = 90.0


@dataclass
class Result:
    """What a user sees of one command: exit code, output, how long it took."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    def error(self) -> str | None:
        """The ERROR log line's message, when there is exactly one (what a failure must print)."""
        errors = [line.split(" | ", 3)[-1] for line in self.stderr.splitlines() if "| ERROR" in line]
        return errors[0] if len(errors) == 1 else None


def cli(*args: str, timeout: float = TIMEOUT_S) -> Result:
    t0 = time.monotonic()
    p = subprocess.run(smolcluster(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def _row(key: str, fault: str, how: str, policy: str) -> Row:
    from bench.reliability import Row

    return Row(key, fault, how, policy)


def _ms(seconds: float) -> str:
    from bench.reliability import ms

    return ms(seconds)


def _outcome(row: Row, result: Result, expect_code: int, tmp: Path) -> None:
    """Recovery, named and quotes of a command that should fail at once with one clear line."""
    error = result.error()
    row.recovery = f"exit {result.code} after {_ms(result.seconds)}" + ("" if result.code == expect_code else
                                                                         f" (**expected {expect_code}**)")
    if error is None or "Traceback" in result.stderr:
        tail = result.stderr.strip().splitlines()[-1:] or ["(nothing)"]
        row.named = f"**no**: not one error line; last: {tail[0][:200]}"
        return
    error = error.replace(str(tmp), "<tmp>")
    row.named = f"yes: one line, {len(error)} characters" if result.code == expect_code else "**no**"
    row.quotes.append(f"stderr: {error}")


# --- config input ------------------------------------------------------------------------------------


def alias_bomb(tmp: Path) -> Row:
    levels = [f"&a [{','.join(['lol'] * 9)}]"] + [f"&{b} [{','.join([f'*{a}'] * 9)}]"
                                                   for a, b in zip("abcdefgh", "bcdefghi")]
    path = tmp / "bomb.yaml"
    path.write_text(f"training:\n  batch_size: [{','.join(levels)}]\n")
    row = _row("file-alias-bomb", "YAML alias bomb (\"billion laughs\")",
               f"{path.stat().st_size}-byte `--nn-config`: 9 nested anchors of 9 aliases (9⁹ values)",
               "YAML aliases may add at most 10,000 values (files and `--set`); errors quote ≤ 200 characters")
    result = cli("run", "--nn-config", str(path))
    _outcome(row, result, 2, tmp)
    row.facts["bomb_s"] = result.seconds
    row.facts["bomb_error_chars"] = len(result.stderr)
    return row


def nan_learning_rate(tmp: Path) -> Row:
    row = _row("file-nan-lr", "NaN learning rate", "`run --set training.learning_rate=.nan`",
               "every numeric key must be a finite number (NaN and ±inf refused by name)")
    _outcome(row, cli("run", "--set", "training.learning_rate=.nan"), 2, tmp)
    return row


def eval_mismatch(tmp: Path) -> Row:
    """A model file whose metadata says hidden=64 while its tensors are 16 wide."""
    from safetensors.torch import save_file

    from smolcluster.config import ModelConfig
    from smolcluster.models import build_model

    tensors = {k: v.contiguous() for k, v in build_model(ModelConfig(hidden=16), 0).state_dict().items()}
    meta = {"smolcluster.model": json.dumps({"type": "SimpleNN", "input_dim": 784, "hidden": 64, "out": 10}),
            "smolcluster.dataset": json.dumps({"name": "synthetic"}), "smolcluster.seed": "42"}
    path = tmp / "model.safetensors"
    save_file(tensors, str(path), metadata=meta)
    row = _row("file-eval-mismatch", "model file: metadata ≠ tensors", "`eval` a file whose metadata says "
               "hidden=64, tensors 16 wide", "names, shapes and dtypes checked against the metadata's config "
               "(built on the meta device: no memory) before loading")
    _outcome(row, cli("eval", str(path)), 1, tmp)
    return row


# --- checkpoints -------------------------------------------------------------------------------------


def reference_run(tmp: Path) -> Cluster:
    """The uninterrupted job: its checkpoints are what the cases damage, its parameters the yardstick."""
    run = Cluster(tmp, workers=2, base=ARGS).start()
    codes = run.wait(TIMEOUT_S)
    if set(codes.values()) != {0}:
        raise RuntimeError(f"the reference run failed: {codes}")
    return run


def damaged_copy(run: Cluster, tmp: Path, damage: Callable[[Path], None]) -> Cluster:
    """A fresh cluster folder holding a copy of the run's checkpoints, damaged."""
    shutil.rmtree(tmp, ignore_errors=True)
    root = tmp / "out" / "checkpoints"
    shutil.copytree(run.out / "checkpoints", root)
    damage(root)
    return Cluster(tmp, workers=2, base=ARGS)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # in the last tensor's bytes, where safetensors itself checks nothing
    path.write_bytes(bytes(data))


def _quote_log(row: Row, c: Cluster, name: str, pattern: str) -> Hit | None:
    hit = find(c.procs[name].output, pattern)
    if hit is not None:
        row.quotes.append(f"{name}: {hit.text.replace(str(c.tmp), '<run>')}")
    return hit


def bitflip_resume(run: Cluster, tmp: Path) -> Row:
    """The whole resumed job, to compare its final parameters with the uninterrupted run's."""
    from bench.reliability import same

    c = damaged_copy(run, tmp, lambda root: flip_bit(root / LATEST / "state.safetensors"))
    row = _row("file-ckpt-bitflip", "bit flip in the latest checkpoint",
               f"1 bit of `{LATEST}/state.safetensors` flipped, then `server --resume`",
               "sha256 of the state file (kept in checkpoint.json) checked on load; a bad checkpoint is skipped "
               "for the previous one (`keep_checkpoints`: 2)")
    server = c.start_server("--resume")
    for k in (1, 2):
        c.start_worker(k)
    codes = c.wait(TIMEOUT_S)
    skipped = _quote_log(row, c, "server", rf"checkpoint .*{LATEST} is not usable: .*")
    resumed = _quote_log(row, c, "server", r"resuming from .* at step (\d+)/")
    row.named = "yes" if skipped and "content hash mismatch" in skipped.text else "**no**"
    if resumed is None:
        row.recovery = f"**did not resume**; exit codes {codes}"
        return row
    step = int(resumed.match[1])
    row.without = f"0; {8 - step} steps redone ({step}–7)"
    training = find(server.output, r"workers joined; training")
    start = _ms(elapsed(of_day(server.started), (training or resumed).t))
    row.recovery = f"{start}: `--resume` → training from step {step}; exit {codes['server']}"
    s, ref = c.summary(), run.summary()
    row.accuracy = f"{s['test_accuracy']:.2f} % ({s['test_accuracy'] - ref['test_accuracy']:+.2f})"
    row.identical = "= uninterrupted run" if same(c.server_params(), run.server_params()) else "**differs from the uninterrupted run**"
    row.notes.append("exit codes " + ", ".join(f"{n} {v}" for n, v in codes.items()))
    return row


def resume_only(run: Cluster, tmp: Path, damage: Callable[[Path], None]) -> tuple[Cluster, Result]:
    """`server --resume` on damaged checkpoints, stopped once it resumed (no workers needed) or exited."""
    c = damaged_copy(run, tmp, damage)
    server = c.start_server("--resume")
    t0 = time.monotonic()
    deadline = t0 + TIMEOUT_S
    while time.monotonic() < deadline and server.popen.poll() is None and "resuming from" not in server.output:
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    c.kill()
    code = server.popen.returncode
    return c, Result(code, "", server.output, seconds)


def all_corrupt(run: Cluster, tmp: Path) -> Row:
    def damage(root: Path) -> None:
        for name in (LATEST, PREVIOUS):
            flip_bit(root / name / "state.safetensors")

    c, result = resume_only(run, tmp, damage)
    row = _row("file-ckpt-all-bad", "every checkpoint damaged", "a bit flipped in both checkpoints, then "
               "`server --resume`", "no usable checkpoint: CheckpointError, one line naming each folder and why")
    _outcome(row, result, 1, c.tmp)
    row.recovery = f"exit {result.code} after {_ms(result.seconds)}; nothing trained"
    return row


def bad_record(run: Cluster, tmp: Path) -> Row:
    c, result = resume_only(run, tmp, lambda root: (root / LATEST / "checkpoint.json").write_text('{"step": 8,'))
    row = _row("file-ckpt-json", "malformed checkpoint.json", f"`{LATEST}/checkpoint.json` cut mid-JSON, then "
               "`server --resume`", "skipped with a warning naming it; the previous checkpoint is used")
    skipped = _quote_log(row, c, "server", rf"checkpoint .*{LATEST} is not usable: .*")
    resumed = _quote_log(row, c, "server", r"resuming from .* at step (\d+)/")
    row.named = "yes" if skipped and "checkpoint.json: not valid JSON" in skipped.text else "**no**"
    row.recovery = (f"{_ms(result.seconds)}: start → resumed at step {resumed.match[1]} (fell back from 8)"
                    if resumed else f"**did not resume**: exit {result.code}")
    return row


def stale_temps(run: Cluster, tmp: Path) -> Row:
    def litter(root: Path) -> None:
        (root / ".checkpoint-00000012.tmp").mkdir()
        (root / ".checkpoint-00000012.tmp" / "state.safetensors").write_bytes(b"\0" * 4096)
        (root / ".latest.x7k2p9").write_text("checkpoint-000")

    c, result = resume_only(run, tmp, litter)
    row = _row("file-ckpt-stale", "temp files of a server killed mid-checkpoint",
               "a `.checkpoint-*.tmp` folder and a `.latest.*` file left in checkpoints/, then `server --resume`",
               "removed (and logged) on load and before every save")
    removed = _quote_log(row, c, "server", r"removed \d+ stale temporary file\(s\).*")
    left = sorted(p.name for p in (c.out / "checkpoints").iterdir() if p.name.startswith("."))
    row.named = "yes" if removed else "**no**"
    row.recovery = f"removed at start-up; left: {left or 'nothing'}"
    _quote_log(row, c, "server", r"resuming from .*")
    return row


# --- all of them -------------------------------------------------------------------------------------


def _failed(key: str, e: Exception) -> Row:
    traceback.print_exc()
    row = _row(key, key, "—", "—")
    row.named = f"**scenario failed**: {(str(e).splitlines() or [type(e).__name__])[0][:200]}"
    return row


def _guarded(key: str, case: Callable[[], Row]) -> Row:
    """One broken case must not hide the others: its row says what happened."""
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
    try:
        return case()
    except Exception as e:
        return _failed(key, e)
    finally:
        print(f"    {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)


def checkpoint_rows(tmp: Path) -> list[Row]:
    run = reference_run(tmp / "reference")
    try:
        return [
            _guarded("file-ckpt-bitflip", lambda: bitflip_resume(run, tmp / "bitflip")),
            _guarded("file-ckpt-all-bad", lambda: all_corrupt(run, tmp / "all-bad")),
            _guarded("file-ckpt-json", lambda: bad_record(run, tmp / "json")),
            _guarded("file-ckpt-stale", lambda: stale_temps(run, tmp / "stale")),
        ]
    finally:
        run.kill()


def file_rows(tmp: Path) -> list[Row]:
    """Every file and config-input case, one Row each, in the order of the module docstring."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = checkpoint_rows(tmp)
    except Exception as e:  # the reference run failed: one row says so, the rest still run
        rows = [_failed("file-checkpoints", e)]
    return rows + [
        _guarded("file-alias-bomb", lambda: alias_bomb(tmp)),
        _guarded("file-nan-lr", lambda: nan_learning_rate(tmp)),
        _guarded("file-eval-mismatch", lambda: eval_mismatch(tmp)),
    ]


if __name__ == "__main__":  # a quick look: the rows as text
    import tempfile

    with tempfile.TemporaryDirectory(prefix="smolcluster-files-") as d:
        for r in file_rows(Path(d)):
            print(f"{r.key}: {r.fault} | {r.how} | {r.recovery} | without {r.without} | identical {r.identical} "
                  f"| named {r.named}")
            for q in r.quotes:
                print(f"    {q}")
            for n in r.notes:
                print(f"    note: {n}")
