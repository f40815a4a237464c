"""What the benchmark measures: models, smolcluster wire variants, emulated links, and bytes per step.

Adding a row is adding an entry to one of the tables below. A smolcluster variant whose config
keys this version of smolcluster rejects is skipped with a note (so `cluster.compression` and
`cluster.overlap` rows light up by themselves once those keys exist).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.ddp import ring_bytes_per_rank
from bench.proxy import LinkSpec
from bench.smol import frame_bytes

MODELS: dict[str, list[str]] = {
    "SimpleNN": ["model.type=SimpleNN", "model.hidden=128"],  # = --model SimpleNN (784-128-10)
    "MLP": ["model.type=MLP", "model.hidden=[512,256,128]"],  # = --model MLP (784-512-256-128-10)
    "MLP-7.9M": ["model.type=MLP", "model.hidden=[2048,2048,1024]"],  # 784-2048-2048-1024-10
}
"""Model name in the report -> the `--set` overrides that build it."""


@dataclass(frozen=True)
class Variant:
    """One way of running smolcluster: config overrides, and payload bytes per parameter on the wire."""

    name: str
    overrides: list[str] = field(default_factory=list)
    elem_bytes: float = 4.0
    note: str = ""


VARIANTS: list[Variant] = [
    Variant("fp32"),
    Variant("bf16", ["cluster.compression=bf16"], 2.0),
    Variant("fp16", ["cluster.compression=fp16"], 2.0),
    Variant("int8", ["cluster.compression=int8"], 1.0, "per-chunk scales not counted"),
    Variant("fp32 overlap=on", ["cluster.overlap=true"]),
    Variant("fp32 overlap=off", ["cluster.overlap=false"]),
]
"""smolcluster rows, in report order."""

@dataclass(frozen=True)
class Link:
    """An emulated network. via="proxy": bench/proxy.py between the workers and the server, one
    link shared by all connections (the server's port), rate and one-way delay per direction.
    via="netns": every process on a host of its own in a star of network namespaces, every port
    shaped by `tc tbf` (rate only: no netem here); the only way to slow DDP down too."""

    name: str
    mbit: float
    delay_ms: float = 0.0
    via: str = "proxy"

    @property
    def spec(self) -> LinkSpec:
        return LinkSpec.from_mbit(self.mbit, self.delay_ms)

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.mbit * 1e6 / 8

    def describe(self) -> str:
        return (f"{self.mbit:g} Mbit/s + {self.delay_ms:g} ms one way via proxy" if self.via == "proxy"
                else f"{self.mbit:g} Mbit/s per port via netns + tbf")


LINKS: dict[str, Link] = {link.name: link for link in [
    Link("1gbit", 1000, delay_ms=0.1),  # wired gigabit LAN: ~0.2 ms round trip
    Link("100mbit", 100, delay_ms=0.5),  # old switch / busy Wi-Fi: ~1 ms round trip
    Link("1gbit-ns", 1000, via="netns"),
    Link("100mbit-ns", 100, via="netns"),
]}
"""Emulated links, in report order."""

TARGETS: dict[str, float] = {"SimpleNN": 0.5, "MLP": 0.9, "MLP-7.9M": 1.0}
"""Issue "Speed": smolcluster fp32 step time must be at most this times DDP-gloo's."""
PICKLE_SPEEDUP_TARGET = 5.0
"""...and at least this many times faster than the pickle parameter server."""


@dataclass(frozen=True)
class WireBytes:
    """Bytes one training step moves. `total`: over every connection, both directions.
    `busiest`: sent + received by the busiest process (the server; any DDP rank).
    `inbound` / `outbound`: the busiest process's two directions, for link-time estimates."""

    total: int
    busiest: int
    inbound: int
    outbound: int
    how: str


def ps_bytes(params: int, workers: int, elem_bytes: float) -> WireBytes:
    """smolcluster: every worker sends one GRAD frame and gets one AVG frame (36-byte header and 8-byte trailer each)."""
    frame = frame_bytes(params, elem_bytes)
    return WireBytes(2 * workers * frame, 2 * workers * frame, workers * frame, workers * frame,
                     f"2 x {workers} frames of 36 + {elem_bytes:g} x (params + 1 loss) + 8 bytes")


def ddp_bytes(params: int, workers: int) -> WireBytes:
    per_rank = ring_bytes_per_rank(4 * params, workers)
    return WireBytes(workers * per_rank, 2 * per_rank, per_rank, per_rank,
                     f"ring allreduce: each rank sends 2 x ({workers}-1)/{workers} x 4 x params bytes "
                     "and receives as many; gloo's message headers not counted")


def pickle_bytes(inbound: float, outbound: float) -> WireBytes:
    i, o = round(inbound), round(outbound)
    return WireBytes(i + o, i + o, i, o, "measured: 4-byte length + len(pickle.dumps(msg)) per message")


def link_wire_s(wire: WireBytes, link: Link, ring_workers: int = 0) -> float:
    """Seconds a step's communication needs on `link` if bytes and latency were the only cost.

    Parameter server: everything in through the server's port, then everything out (two delays).
    DDP ring (`ring_workers` = N): both directions at once, 2(N-1) latency-bound hops.
    """
    if ring_workers:
        return wire.outbound / link.rate + 2 * (ring_workers - 1) * link.delay_ms / 1e3
    return (wire.inbound + wire.outbound) / link.rate + 2 * link.delay_ms / 1e3
