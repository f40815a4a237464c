"""DDP comm hooks with our codecs, on a real 2-rank gloo group over 127.0.0.1.

One spawn of two processes runs every scenario and saves what it saw (each rank's local gradient
from a hook-free copy of the model, the buckets the hook was handed, the gradients DDP applied);
the tests judge it here in float64, against the codec bounds that test_compress.py derives:
bf16 2^-8 |x| (2^-134 subnormal), fp16 2^-11 |x| for 2^-14 <= |x| <= 65504 (2^-25 below),
int8 scale / 2 per chunk (scale = max|x| / 127), each rank with its own bound, averaged over ranks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from helpers import free_port
from smolcluster import ddp_hooks

WORLD, CHUNK, STEPS = 2, 64, 40
CODECS = ("bf16", "fp16", "int8")
BUCKET_MB = 0.001  # ~262 floats: three buckets once DDP rebuilds them after the first step
NAN_STEP = 2
NAN_AT = ("0.weight", 0)  # parameter, flat element poisoned on rank 1 at NAN_STEP
SPAWN_TIMEOUT_S = 60


# --- what each rank runs --------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank, as DDP requires
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(),
                         nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))


def backward(model: nn.Module, rank: int) -> None:
    """The same batch every step, different on each rank: a fixed gradient per rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 20, generator=gen), torch.randn(32, 5, generator=gen)
    nn.functional.mse_loss(model(x), y).backward()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone().reshape(-1) for n, p in model.named_parameters()}


def poison(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[NAN_AT[1]] = math.nan
    return grad


def train(compression: str, rank: int, steps: int, feedback: bool = True, nan_step: int = -1) -> dict:
    """`steps` steps of DDP through `ddp_hooks.register`, spying on the hook it registers."""
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict = {"calls": [], "inputs": {}, "grads": {}}
    step = 0
    register = ddp.register_comm_hook

    def spying_register(state, hook):
        def spy(state, bucket):
            seen["calls"].append((step, bucket.index(), [names[id(p)] for p in bucket.parameters()]))
            if step < 2:
                seen["inputs"][f"{step}/{bucket.index()}"] = bucket.buffer().clone()
            return hook(state, bucket)

        register(state, spy)

    ddp.register_comm_hook = spying_register
    ddp_hooks.register(ddp, compression, error_feedback=feedback, chunk=CHUNK)
    total = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        handle = model.get_parameter(NAN_AT[0]).register_hook(poison) if step == nan_step and rank == 1 else None
        backward(ddp, rank)
        if handle:
            handle.remove()
        g = grads(model)
        if step in (0, 1, nan_step, nan_step + 1):
            seen["grads"][step] = g
        for n in total:
            total[n] += g[n].double()
    seen["sum"] = total
    return seen


def rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ref = make_model()
        backward(ref, rank)
        runs = {"ref": grads(ref), "none": train("none", rank, 2)}
        for c in CODECS:
            runs[c] = train(c, rank, STEPS)
            runs[f"{c}/no-feedback"] = train(c, rank, STEPS, feedback=False)
            runs[f"{c}/nan"] = train(c, rank, NAN_STEP + 2, nan_step=NAN_STEP)
        torch.save(runs, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# --- judging it here ------------------------------------------------------------------------------


def flat(g: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([g[n].double() for n in names])


def buckets(run: dict, step: int) -> list[list[str]]:
    """The parameter names of each bucket the hook saw at `step`, by bucket index."""
    calls = sorted((i, names) for s, i, names in run["calls"] if s == step)
    return [names for _, names in calls]


def codec_error(codec: str, x: torch.Tensor) -> torch.Tensor:
    """Per element, the most one rank's encoding of bucket `x` (float64) may be off by (compress.py)."""
    a = x.abs()
    if codec == "bf16":
        return torch.where(a >= 2.0**-126, a * 2.0**-8, 2.0**-134)
    if codec == "fp16":
        assert a.max() <= 65504, "clamping is not what these tests check"
        return torch.where(a >= 2.0**-14, a * 2.0**-11, 2.0**-25)
    scale = torch.stack([c.max() for c in a.split(CHUNK)]) / 127
    sizes = [c.numel() for c in a.split(CHUNK)]
    return scale.repeat_interleave(torch.tensor(sizes)) / 2 * (1 + 2.0**-12) + 2.0**-142


def exact(refs: list[dict]) -> dict[str, torch.Tensor]:
    """The exact average of the ranks' local gradients (float64 holds a sum of two float32 exactly)."""
    return {n: sum(r[n].double() for r in refs) / WORLD for n in refs[0]}


def bounds(codec: str, refs: list[dict], layout: list[list[str]]) -> dict[str, torch.Tensor]:
    """Per parameter, the bound on one step's error of the hook's average: each rank's codec error
    for its bucket (int8 chunks run across the bucket), averaged, plus the float32 sum's rounding."""
    avg, out = exact(refs), {}
    for names in layout:
        err = sum(codec_error(codec, flat(r, names)) for r in refs) / WORLD
        out |= dict(zip(names, err.split([avg[n].numel() for n in names])))
    return {n: b + 2.0**-24 * avg[n].abs() for n, b in out.items()}


def worst(err: dict[str, torch.Tensor], bound: dict[str, torch.Tensor]) -> float:
    """max over elements of err / bound."""
    return max((err[n] / bound[n]).max().item() for n in bound)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, so that NaN equals NaN."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32 if a.element_size() == 4 else torch.int64),
                                              b.view(torch.int32 if b.element_size() == 4 else torch.int64))


# --- tests ----------------------------------------------------------------------------------------


def test_register_takes_our_compression_names_and_leaves_fp32_to_ddp():
    hooks: list = []
    fake = SimpleNamespace(register_comm_hook=lambda state, hook: hooks.append(hook), process_group=None)
    for name in ("none", "fp32"):
        ddp_hooks.register(fake, name)
    assert hooks == [], "none/fp32 must leave DDP its own allreduce"
    ddp_hooks.register(fake, "int8", chunk=16)
    assert hooks == [ddp_hooks.compress_hook]
    with pytest.raises(ValueError, match="compression: expected one of none, fp32, bf16, fp16, int8, got 'int4'"):
        ddp_hooks.register(fake, "int4")
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        ddp_hooks.register(fake, "int8", chunk=0)


def test_buckets_hold_the_local_gradient_and_are_rebuilt_after_the_first_step(ranks):
    """What the hook relies on: a bucket is its parameters' gradients in order (that is how each
    parameter's residual follows it), and DDP does regroup them after step 0 (the carrying is exercised)."""
    for rank, run in enumerate(ranks):
        r = run["int8"]
        for step in (0, 1):
            for i, names in enumerate(buckets(r, step)):
                got, want = r["inputs"][f"{step}/{i}"].double(), flat(run["ref"], names)
                assert torch.equal(got, want), f"rank {rank}, step {step}, bucket {i} {names}: not the local gradient"
    first, later = buckets(ranks[0]["int8"], 0), buckets(ranks[0]["int8"], 1)
    assert len(first) == 1 and len(later) >= 3, f"buckets at step 0: {first}, at step 1: {later}"
    assert buckets(ranks[0]["int8"], STEPS - 1) == later


@pytest.mark.parametrize("run", [*CODECS, *(f"{c}/no-feedback" for c in CODECS), *(f"{c}/nan" for c in CODECS), "none"])
def test_every_rank_applies_bit_identical_gradients(ranks, run):
    a, b = ranks[0][run], ranks[1][run]
    for step in a["grads"]:
        for n in a["grads"][step]:
            assert same_bits(a["grads"][step][n], b["grads"][step][n]), f"{run}, step {step}, {n}: ranks differ"
    for n in a["sum"]:
        assert same_bits(a["sum"][n], b["sum"][n]), f"{run}, {n}: the sums over steps differ"


@pytest.mark.parametrize("codec", CODECS)
def test_average_is_within_the_codec_bound_of_the_exact_average(ranks, codec):
    refs, run = [r["ref"] for r in ranks], ranks[0][codec]
    avg = exact(refs)
    b0, b1 = (bounds(codec, refs, buckets(run, step)) for step in (0, 1))
    err0 = {n: (g.double() - avg[n]).abs() for n, g in run["grads"][0].items()}
    assert (w := worst(err0, b0)) <= 1, f"{codec}, step 0: error up to {w:.3f} x its bound"
    assert w > 0.25, f"{codec}, step 0: error only {w:.3f} of its bound (uncompressed?)"
    # Step 1 also sends step 0's residual (carried into the rebuilt buckets): both steps' errors.
    err1 = {n: (g.double() - avg[n]).abs() for n, g in run["grads"][1].items()}
    both = {n: 1.01 * (b0[n] + b1[n]) for n in b0}  # 1.01: x + residual is a little larger than x
    assert (w := worst(err1, both)) <= 1, f"{codec}, step 1: error up to {w:.3f} x the two steps' bounds"


@pytest.mark.parametrize("codec", CODECS)
def test_error_feedback_keeps_the_sum_over_steps_within_one_steps_error(ranks, codec):
    """Fixed gradients, STEPS steps: sum of applied averages = STEPS x exact - the last residual.
    Without feedback the same rounding repeats each step, so the drift grows STEPS-fold."""
    refs = [r["ref"] for r in ranks]
    avg = exact(refs)
    bound = bounds(codec, refs, buckets(ranks[0][codec], STEPS - 1))
    # float32 rounding of t = x + residual, and of residual - decoded, each step
    slack = {n: 1.01 * b + STEPS * 2.0**-22 * sum(r[n].double().abs() for r in refs) / WORLD for n, b in bound.items()}
    drift = {fb: {n: (s - STEPS * avg[n]).abs() for n, s in ranks[0][run]["sum"].items()}
             for fb, run in ((True, codec), (False, f"{codec}/no-feedback"))}
    assert (w := worst(drift[True], slack)) <= 1, f"{codec}: drift after {STEPS} steps is {w:.3f} x one step's bound"
    most = {fb: max(d.max().item() for d in drift[fb].values()) for fb in drift}
    assert most[False] > STEPS / 4 * most[True], (
        f"{codec}: drift without feedback {most[False]:.3g}, with it {most[True]:.3g}: the test has no teeth"
    )


@pytest.mark.parametrize("codec", CODECS)
def test_a_nan_on_one_rank_reaches_every_rank_and_the_next_step_is_clean(ranks, codec):
    name, at = NAN_AT
    for rank, run in enumerate(ranks):
        bad, after = run[f"{codec}/nan"]["grads"][NAN_STEP][name], run[f"{codec}/nan"]["grads"][NAN_STEP + 1]
        assert math.isnan(bad[at].item()), f"rank {rank}, {codec}: the NaN of rank 1 became {bad[at].item()}"
        others = [g for n, g in run[f"{codec}/nan"]["grads"][NAN_STEP].items() if n != name]
        assert all(torch.isfinite(g).all() for g in others), f"rank {rank}, {codec}: NaN spread to other parameters"
        # bf16/fp16 spoil the one element; int8 its chunk (elements chunk-aligned from the bucket's start).
        assert torch.isfinite(bad).sum() >= bad.numel() - (CHUNK if codec == "int8" else 1), (
            f"rank {rank}, {codec}: {bad.numel() - int(torch.isfinite(bad).sum())} non-finite elements"
        )
        assert all(torch.isfinite(g).all() for g in after.values()), f"rank {rank}, {codec}: residual poisoned"


def test_none_leaves_ddp_its_fp32_average(ranks):
    refs = [r["ref"] for r in ranks]
    assert ranks[0]["none"]["calls"] == [], "a hook ran for compression 'none'"
    for n, g in ranks[0]["none"]["grads"][0].items():
        want = (refs[0][n] + refs[1][n]) / WORLD
        assert torch.equal(g, want), f"{n}: max difference {(g - want).abs().max().item():.3g} from the fp32 average"
