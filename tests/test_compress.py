"""Wire compression: error bounds from first principles, the wire layout, error feedback, hostile bytes.

Bounds used below (u = unit roundoff of round-to-nearest with p significant bits = 2^-p):
- bf16 (p = 8):  |d - x| <= 2^-8 |x| for normal x; <= 2^-134 (half the smallest subnormal) below.
- fp16 (p = 11): |d - x| <= 2^-11 |x| for 2^-14 <= |x| <= 65504; <= 2^-25 below; clamped beyond.
- int8: |d - x| <= scale / 2 per element of a chunk, scale = max|x| / 127, plus float32 rounding
  of x / scale and q * scale (~254 * 2^-24 relative, so we allow scale / 2 * (1 + 2^-12)), plus
  2^-142 absolute for chunks so tiny that their scale is subnormal.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smolcluster import compress
from smolcluster.compress import Bf16, Encoder, Fp16, Fp32, Int8, codec_for_dtype, make_codec
from smolcluster.wire import DType, ProtocolError

F32_MAX = float(np.finfo(np.float32).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
CHUNK = 64  # small chunks so a few hundred elements exercise many of them and a partial last one


def codecs() -> list[compress.Codec]:
    return [Fp32(), Bf16(), Fp16(), Int8(CHUNK)]


def round_trip(codec: compress.Codec, x: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(x, 12345.0)  # garbage: decode must overwrite every element
    codec.decode(codec.encode(x), out)
    return out


def randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def int8_reference(payload: bytes | memoryview, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, q) parsed from the documented layout with numpy, independently of the codec."""
    k = -(-n // chunk)
    raw = bytes(payload)
    assert len(raw) == 4 * k + n, f"payload {len(raw)} bytes, layout says 4*{k} + {n}"
    return np.frombuffer(raw, "<f4", count=k), np.frombuffer(raw, "<i1", count=n, offset=4 * k)


# --- API, sizes, layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_payload_sizes(n):
    expected = {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "int8": 4 * math.ceil(n / CHUNK) + n}
    for codec in codecs():
        payload = codec.encode(randn(n))
        assert len(payload) == codec.payload_nbytes(n) == expected[codec.name], (
            f"{codec.name}, {n} elements: payload {len(payload)}, payload_nbytes {codec.payload_nbytes(n)}, "
            f"expected {expected[codec.name]}"
        )


def test_dtype_codes_match_the_wire_and_names_map_to_codecs():
    assert [c.dtype for c in codecs()] == [DType.F32, DType.BF16, DType.F16, DType.I8] == [1, 2, 3, 4]
    for name in compress.NAMES:
        codec = make_codec(name, chunk=CHUNK)
        assert codec.name == name and type(codec_for_dtype(codec.dtype, CHUNK)) is type(codec)
    assert make_codec("int8", chunk=7).payload_nbytes(15) == 4 * 3 + 15
    with pytest.raises(ValueError, match="cluster.compression: expected one of fp32, bf16, fp16, int8, got 'int4'"):
        make_codec("int4")
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        Int8(0)


def test_fp32_is_exact_and_zero_copy():
    x = torch.tensor([1.5, -0.0, float("nan"), float("inf"), 1e-45, F32_MAX])
    payload = Fp32().encode(x)
    assert np.frombuffer(payload, np.float32).ctypes.data == x.data_ptr(), "payload is not x's own memory"
    assert bytes(payload) == struct.pack("<6f", *x.tolist())
    assert torch.equal(round_trip(Fp32(), x).view(torch.int32), x.view(torch.int32)), "not bit-exact"
    out = bytearray(24)
    assert Fp32().encode(x, out).obj is out and bytes(out) == bytes(payload)


def test_16_bit_payloads_are_little_endian_halves():
    x = torch.tensor([1.0, -2.0, 65504.0])
    assert bytes(Fp16().encode(x)) == struct.pack("<3e", 1.0, -2.0, 65504.0)
    assert bytes(Bf16().encode(x[:2])) == struct.pack("<2f", 1.0, -2.0)[2:4] + struct.pack("<f", -2.0)[2:4]


def test_int8_layout_scales_then_values():
    x = torch.cat([randn(CHUNK, seed=1), torch.zeros(CHUNK), randn(10, seed=2, scale=1e-3)])
    payload = Int8(CHUNK).encode(x)
    scales, q = int8_reference(payload, x.numel(), CHUNK)
    chunks = [x[:CHUNK], x[CHUNK : 2 * CHUNK], x[2 * CHUNK :]]
    expected = np.array([c.abs().max().item() / 127 for c in chunks], np.float32)
    assert np.array_equal(scales, expected), f"scales {scales}, expected max|x|/127 = {expected}"
    decoded = round_trip(Int8(CHUNK), x).numpy()
    assert np.array_equal(decoded, q.astype(np.float32) * np.repeat(scales, [CHUNK, CHUNK, 10]))


# --- error bounds ---------------------------------------------------------------------------------


def assert_bf16_bound(x: torch.Tensor, d: torch.Tensor) -> None:
    x64, d64 = x.double(), d.double()
    normal = x64.abs() >= 2.0**-126
    err = (d64 - x64).abs()
    rel = (err[normal] / x64[normal].abs()).max().item() if normal.any() else 0.0
    assert rel <= 2.0**-8, f"bf16 relative error {rel:.3g} > 2^-8 = {2.0**-8:.3g}"
    sub = err[~normal].max().item() if (~normal).any() else 0.0
    assert sub <= 2.0**-134, f"bf16 subnormal error {sub:.3g} > 2^-134"


def assert_fp16_bound(x: torch.Tensor, d: torch.Tensor) -> None:
    x64, d64 = x.double(), d.double()
    err = (d64 - x64).abs()
    normal = (x64.abs() >= 2.0**-14) & (x64.abs() <= 65504)
    rel = (err[normal] / x64[normal].abs()).max().item() if normal.any() else 0.0
    assert rel <= 2.0**-11, f"fp16 relative error {rel:.3g} > 2^-11 = {2.0**-11:.3g}"
    tiny = x64.abs() < 2.0**-14
    sub = err[tiny].max().item() if tiny.any() else 0.0
    assert sub <= 2.0**-25, f"fp16 subnormal error {sub:.3g} > 2^-25"
    big = x64.abs() > 65504
    assert torch.equal(d64[big], x64[big].sign() * 65504), f"fp16 did not clamp {x64[big][:5].tolist()} to +-65504"


def assert_int8_bound(x: torch.Tensor, d: torch.Tensor, chunk: int) -> None:
    for start in range(0, x.numel(), chunk):
        xc, dc = x[start : start + chunk].double(), d[start : start + chunk].double()
        scale = xc.abs().max().item() / 127
        err = (dc - xc).abs().max().item()
        bound = scale / 2 * (1 + 2.0**-12) + 2.0**-142
        assert err <= bound, f"int8 chunk at {start}: error {err:.6g} > scale/2 = {scale / 2:.6g} (max|x| {127 * scale:.6g})"


def test_bf16_round_trip_bound_is_met_and_nearly_tight():
    x = torch.cat([randn(4000, seed=3) * 10.0 ** torch.randint(-30, 30, (4000,)), torch.tensor([1e-40, -3e-39])])
    d = round_trip(Bf16(), x)
    assert_bf16_bound(x, d)
    rel = ((d.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel > 2.0**-9, f"max relative error {rel:.3g}: a bound of 2^-8 would be vacuous (still float32?)"


def test_fp16_round_trip_bound_in_range_and_clamping_beyond():
    x = torch.cat([randn(4000, seed=4) * 10.0 ** torch.randint(-9, 6, (4000,)).float(),
                   torch.tensor([65504.0, 65519.0, 65520.0, -7e4, 1e30, -F32_MAX, 3e-8, -2.9e-8, 2.0**-25])])
    d = round_trip(Fp16(), x)
    assert_fp16_bound(x, d)
    assert d[-9:-3].tolist() == [65504.0, 65504.0, 65504.0, -65504.0, 65504.0, -65504.0], (
        f"expected clamping to +-65504, got {d[-9:-3].tolist()}"
    )
    assert torch.isfinite(d).all(), "a finite input became inf"
    assert d[-3].item() == 2.0**-24 and d[-2].item() == 0.0, f"3e-8 -> {d[-3].item()} (2^-24), -2.9e-8 -> {d[-2].item()} (0)"
    assert d[-1].item() == 0.0, f"2^-25 is a tie between 0 and 2^-24 and rounds to even (0), got {d[-1].item()}"


def test_bf16_clamps_beyond_its_max_instead_of_overflowing():
    x = torch.tensor([F32_MAX, -F32_MAX, BF16_MAX, 3.39e38])
    d = round_trip(Bf16(), x)
    assert d.tolist() == [BF16_MAX, -BF16_MAX, BF16_MAX, BF16_MAX], f"{d.tolist()} (bf16 max {BF16_MAX:.6g})"


def test_int8_round_trip_bound_per_chunk_with_a_partial_last_chunk():
    n = 7 * CHUNK + 13
    x = randn(n, seed=5) * torch.repeat_interleave(10.0 ** torch.arange(-6, 2).float(), CHUNK)[:n]
    d = round_trip(Int8(CHUNK), x)
    assert_int8_bound(x, d, CHUNK)
    scales, q = int8_reference(Int8(CHUNK).encode(x), n, CHUNK)
    assert len(scales) == 8 and q.min() >= -127 and q.max() <= 127, f"{len(scales)} scales, q in {q.min()}..{q.max()}"
    last = x[7 * CHUNK :].abs().max().item()
    assert scales[-1] == np.float32(last / 127), f"partial chunk scale {scales[-1]}, expected {last / 127}"


def test_int8_keeps_signs_no_wrap_around():
    """Upstream mapped values to 0..255 and cast to int8, so everything above 127 wrapped negative."""
    x = torch.tensor([-1000.0, -999.0, -500.0, -1.0, 1.0, 500.0, 999.0, 1000.0])

    def upstream(v: torch.Tensor) -> torch.Tensor:
        lo, hi = v.min(), v.max()
        q = ((v - lo) / (hi - lo) * 255).round().to(torch.uint8).to(torch.int8)
        return q.float()  # the bug: these are the values it then treated as signed

    assert not torch.equal(upstream(x).sign(), x.sign()), "the check below would not catch the upstream bug"
    payload = Int8(CHUNK).encode(x)
    _, q = int8_reference(payload, 8, CHUNK)
    assert q.tolist() == [-127, -127, -64, 0, 0, 64, 127, 127], f"q = {q.tolist()}"
    d = round_trip(Int8(CHUNK), x)
    big = x.abs() > 100
    assert torch.equal(d[big].sign(), x[big].sign()), f"signs flipped: {x.tolist()} -> {d.tolist()}"
    assert d[0].item() == -1000.0 and d[-1].item() == 1000.0, f"extremes {d[0].item()}, {d[-1].item()}"


def test_int8_subnormal_scale_cannot_push_q_past_127():
    """max|x| = 190 * 2^-149: scale = 190/127 * 2^-149 rounds to 2^-149, so x / scale = 190, not 127."""
    tiny = 190 * 2.0**-149
    x = torch.tensor([tiny, -tiny, 0.5 * tiny])
    _, q = int8_reference(Int8(CHUNK).encode(x), 3, CHUNK)
    assert q.tolist() == [127, -127, 95], f"q = {q.tolist()} (190 would wrap to {np.int8(np.uint8(190))})"
    assert_int8_bound(x, round_trip(Int8(CHUNK), x), CHUNK)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=0, max_size=40),
    chunk=st.integers(1, 9),
)
def test_round_trip_bounds_hold_for_any_finite_input(values, chunk):
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_trip(Fp32(), x), x)
    assert_bf16_bound(x, round_trip(Bf16(), x))
    assert_fp16_bound(x, round_trip(Fp16(), x))
    if x.numel() and x.abs().max().item() < F32_MAX * (1 - 2.0**-20):  # see the next test for the very top
        assert_int8_bound(x, round_trip(Int8(chunk), x), chunk)


def test_int8_near_float32_max_overflows_visibly_not_silently():
    """fl(max/127) * 127 rounds above float32's max: the extremes decode to inf, which the server rejects."""
    x = torch.tensor([F32_MAX, 1.0, -F32_MAX, 0.0])
    d = round_trip(Int8(4), x)
    assert d.tolist() == [math.inf, 0.0, -math.inf, 0.0], f"decoded {d.tolist()}"
    enc = Encoder(Int8(4), 4)
    enc.encode(x)
    assert enc.resets == 1 and not enc.residual.any(), "overflow must reset, not poison, the residual"


# --- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_empty_and_one_element(codec):
    empty = torch.empty(0)
    assert len(codec.encode(empty)) == 0
    codec.decode(b"", empty)
    codec.accumulate(b"", empty, 0.5)
    assert len(Encoder(codec, 0).encode(empty)) == 0
    one = torch.tensor([-0.3])
    d = round_trip(codec, one)
    assert abs(d.item() + 0.3) <= 0.3 * 2.0**-8, f"{codec.name}: -0.3 -> {d.item()}"
    if codec.name == "int8":
        assert d.item() == np.float32(-0.3), "a one-element chunk is its own max: exact"


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_all_zeros(codec):
    x = torch.zeros(3 * CHUNK + 1)
    payload = codec.encode(x)
    assert not any(payload), f"{codec.name}: zeros encode to nonzero bytes"
    assert torch.equal(round_trip(codec, x), x)
    enc = Encoder(codec, x.numel())
    enc.encode(x)
    assert not enc.residual.any()


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_nan_and_inf_stay_non_finite(codec):
    x = randn(3 * CHUNK, seed=6)
    x[5], x[CHUNK + 5], x[2 * CHUNK + 5] = float("nan"), float("inf"), float("-inf")
    d = round_trip(codec, x)
    if codec.name == "int8":  # a non-finite value spoils its chunk's scale: the whole chunk is non-finite
        for c in range(3):
            assert not torch.isfinite(d[c * CHUNK : (c + 1) * CHUNK]).any(), f"chunk {c} has finite values: {d[c * CHUNK:][:4]}"
        assert torch.isnan(d[:CHUNK]).all()
    else:
        assert torch.isnan(d[5]) and d[CHUNK + 5].item() == math.inf and d[2 * CHUNK + 5].item() == -math.inf
        finite = torch.isfinite(x)
        assert torch.isfinite(d[finite]).all()


@pytest.mark.parametrize("codec", [Bf16(), Fp16(), Int8(CHUNK)], ids=lambda c: c.name)
def test_non_finite_step_resets_the_residual_instead_of_poisoning_it(codec):
    n = 2 * CHUNK
    enc = Encoder(codec, n)
    enc.encode(randn(n, seed=7))
    bad = randn(n, seed=8)
    bad[3] = float("nan")
    out = torch.empty(n)
    codec.decode(enc.encode(bad), out)
    assert torch.isnan(out[3]), "the NaN must still reach the server"
    assert enc.resets == 1 and not enc.residual.any(), f"resets {enc.resets}, residual max {enc.residual.abs().max()}"
    codec.decode(enc.encode(randn(n, seed=9)), out)
    assert torch.isfinite(out).all() and torch.isfinite(enc.residual).all()


# --- decoding untrusted bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_decode_checks_the_length(codec):
    n = CHUNK + 3
    payload = bytes(codec.encode(randn(n)))
    want = codec.payload_nbytes(n)
    for bad in (payload[:-1], payload + b"\0"):
        with pytest.raises(ProtocolError, match=f"payload of {len(bad)} bytes, expected {want} for {n} elements"):
            codec.decode(bad, torch.empty(n))
        with pytest.raises(ProtocolError):
            codec.accumulate(bad, torch.zeros(n))


def test_int8_hostile_scales_and_minus_128_decode_to_floats_the_server_can_judge():
    chunk, n = 4, 12
    scales = struct.pack("<3f", float("nan"), float("inf"), 1e38)
    q = bytes([1, 0, 0, 0]) + bytes([0, 1, 0xFF, 0]) + bytes([0x80, 127, 2, 0])  # 0x80 = -128
    d = torch.empty(n)
    Int8(chunk).decode(scales + q, d)  # read-only bytes, as received
    assert torch.isnan(d[:4]).all(), f"NaN scale: {d[:4].tolist()}"
    assert not torch.isfinite(d[4:8]).any(), f"inf scale: {d[4:8].tolist()}"
    assert d[8].item() == -math.inf and d[9].item() == math.inf, f"huge scale overflows: {d[8:].tolist()}"
    assert d[10].item() == np.float32(2e38) and d[11].item() == 0.0


# --- accumulate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_accumulate_is_weighted_decode(codec):
    n = 5 * CHUNK + 9
    acc = randn(n, seed=10)
    payload = codec.encode(randn(n, seed=11))
    decoded = torch.empty(n)
    codec.decode(payload, decoded)
    expected = acc.double() + 0.375 * decoded.double()
    codec.accumulate(payload, acc, 0.375)
    err = (acc.double() - expected).abs().max().item()
    assert err <= 1e-6, f"{codec.name}: accumulate differs from acc + w * decode by {err:.3g}"


@pytest.mark.parametrize("chunk", [CHUNK, 300], ids=["chunks-per-block", "chunk-bigger-than-block"])
def test_blocks_cover_buffers_larger_than_a_block(monkeypatch, chunk):
    """The codecs work block by block; check the seams with a small block and a buffer of a few."""
    monkeypatch.setattr(compress, "BLOCK", 256)
    n = 5 * 256 + 3 * chunk + 5
    x = randn(n, seed=12)
    for codec in (Bf16(), Int8(chunk)):
        d = round_trip(codec, x)
        if codec.name == "int8":
            scales, q = int8_reference(codec.encode(x), n, chunk)
            ref = q.astype(np.float32) * np.repeat(scales, chunk)[:n]
            assert np.array_equal(d.numpy(), ref), "blocked decode differs from the layout's reference"
            full = x[: (n // chunk) * chunk].view(-1, chunk).abs().amax(1).numpy() / np.float32(127)
            assert len(scales) == len(full) + 1 and np.array_equal(scales[:-1], full), "scales across block seams"
        else:
            assert torch.equal(d, x.to(torch.bfloat16).float())
        acc = torch.zeros(n)
        codec.accumulate(codec.encode(x), acc, 2.0)
        assert torch.equal(acc, 2 * d), f"{codec.name}: accumulate across blocks"
        enc, sent = Encoder(codec, n), torch.zeros(n, dtype=torch.float64)
        for _ in range(3):
            codec.decode(enc.encode(x), d)
            sent += d.double()
        err = (sent + enc.residual.double() - 3 * x.double()).abs().max().item()
        assert err <= 1e-5, f"{codec.name}: error feedback across blocks drifts by {err:.3g}"


# --- error feedback -------------------------------------------------------------------------------


def drift(codec: compress.Codec, steps: int, feedback: bool, n: int = 1000) -> float:
    """max over elements of |sum of decoded + residual - sum of inputs|, in float64, relative to sum|x|."""
    enc = Encoder(codec, n, error_feedback=feedback)
    gen = torch.Generator().manual_seed(13)
    sent, total, mass = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    out = torch.empty(n)
    for _ in range(steps):
        x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-3, 1, (n,), generator=gen).float()
        codec.decode(enc.encode(x), out)
        sent += out.double()
        total += x.double()
        mass += x.double().abs()
    if feedback:
        sent += enc.residual.double()
    return ((sent - total).abs() / mass).max().item()


@pytest.mark.parametrize("codec", [Bf16(), Fp16(), Int8(CHUNK)], ids=lambda c: c.name)
def test_error_feedback_keeps_the_running_sum(codec):
    with_feedback = drift(codec, 100, True)
    without = drift(codec, 100, False)
    # Each step rounds twice in float32 (x + residual, then residual - decoded): <= 2^-23 of the mass.
    assert with_feedback <= 2.0**-22, f"{codec.name}: drift with feedback {with_feedback:.3g} of sum|x|"
    assert without >= 100 * with_feedback and without > 1e-4, (
        f"{codec.name}: drift without feedback {without:.3g} vs with {with_feedback:.3g}: the test has no teeth"
    )


def test_error_feedback_delivers_what_fp16_flushes_to_zero():
    """fp16 rounds 1e-8 to 0 (below 2^-25): without feedback it is lost forever, with it, sent later."""
    n, steps = 16, 100
    x = torch.full((n,), 1e-8)
    out = torch.empty(n)
    for feedback, expect in ((False, 0.0), (True, steps * 1e-8)):
        enc = Encoder(Fp16(), n, error_feedback=feedback)
        sent = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            Fp16().decode(enc.encode(x), out)
            sent += out.double()
        got = sent.mean().item() + enc.residual.double().mean().item() if feedback else sent.mean().item()
        assert got == pytest.approx(expect, rel=1e-5, abs=1e-30), f"feedback={feedback}: sent {got:.4g}, expected {expect:.4g}"
        if feedback:
            assert sent.mean().item() > 0.5 * expect, f"only {sent.mean().item():.3g} of {expect:.3g} actually sent"


def test_encoder_reuses_its_buffer_and_checks_sizes():
    enc = Encoder(Int8(CHUNK), 100)
    a, b = enc.encode(randn(100, seed=14)), enc.encode(randn(100, seed=15))
    assert a.obj is b.obj is enc.payload and len(a) == Int8(CHUNK).payload_nbytes(100)
    with pytest.raises(ValueError, match="encoder built for 100 elements, got 99"):
        enc.encode(randn(99))
    with pytest.raises(ValueError, match="contiguous 1-D float32"):
        enc.encode(torch.zeros(100, dtype=torch.float64))
    x = randn(10)
    fp32 = Encoder(Fp32(), 10)
    assert np.frombuffer(fp32.encode(x), np.float32).ctypes.data == x.data_ptr() and fp32.residual.numel() == 0
