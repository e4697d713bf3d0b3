"""The ggfuse CUDA ops against the CPU ops and the independent references (tests/oracle.py, SPEC §5).

Skipped where there is no CUDA device or the library was built without the CUDA kernels, unless
GGFUSE_REQUIRE_CUDA=1, where a missing CUDA fails (test_cuda_is_available, and every other test then
fails on its first CUDA call instead of being skipped).

Outputs are poisoned: torch's deterministic mode fills every new tensor (the ops' outputs included)
with NaN, or 255 for bytes, so an element a kernel never wrote fails the comparison. Every test draws
fresh random data.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import ggfuse
import oracle
from oracle import ALL_MAT_VEC_TYPES, exact_mat_vec, float_mat_vec, random_blocks, rel_err

REQUIRE_CUDA = os.environ.get("GGFUSE_REQUIRE_CUDA") == "1"
HAVE_CUDA = torch.cuda.is_available() and ggfuse.has_cuda_kernels()

pytestmark = pytest.mark.skipif(
    not HAVE_CUDA and not REQUIRE_CUDA,
    reason="no CUDA device, or ggfuse built without CUDA kernels (set GGFUSE_REQUIRE_CUDA=1 to fail instead)")

CUDA_EXACT_TOL = 1e-4   # SPEC §5 check 1 on CUDA
CUDA_CPU_TOL = 1e-4     # CUDA against CPU on the same inputs
FLOAT_TOL = 2e-2        # SPEC §5 check 2 (Q8 activation noise)
MIN_OUTPUTS_FOR_FLOAT_CHECK = 256  # K-quant layers only; the float check is statistical: oracle.float_check_batch
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEV = "cuda"


def test_cuda_is_available():
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    assert ggfuse.has_cuda_kernels(), "ggfuse was built without its CUDA kernels (torch without CUDA?)"


def test_poisoning_reaches_cuda(poison_outputs):
    assert torch.isnan(torch.empty(64, device=DEV)).all()
    assert (torch.empty(64, dtype=torch.uint8, device=DEV) == 255).all()


def randn(*shape, dtype=torch.float32):
    """Normal values at a random overall scale (e^-3 .. e^3), never zeros."""
    return (torch.randn(*shape, dtype=torch.float64) * np.exp(np.random.uniform(-3, 3))).to(dtype)


# ---------------------------------------------------------------- Q8_1 quantization

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 32), (3, 4096), (2, 3, 96), (1, 14336)])
def test_quantize_q8_1_bit_exact_with_cpu(poison_outputs, dtype, shape):
    x = randn(*shape, dtype=dtype)
    x[..., :32] = 0.0  # an all-zero block: d = 0, quants 0
    ref = ggfuse.quantize_q8_1(x)
    got = ggfuse.quantize_q8_1(x.to(DEV))
    assert got.device.type == "cuda" and got.shape == ref.shape and got.dtype == torch.uint8
    # Same fp32 steps in the same order as the CPU: the very same bytes.
    assert torch.equal(got.cpu(), ref)


def test_quantize_q8_1_near_rounding_ties(poison_outputs):
    # Values whose v / d sits on or within a few ulps of a half-integer, where roundf(v / d) depends on
    # the last bit of the IEEE division, at scales from subnormal d to 1e37: the CPU's bytes. (Blocks
    # whose sum overflows fp32 are left out: their s is a NaN, which CUDA's fp16 conversion writes as
    # 0x7fff and the CPU's with its sign and payload.)
    rng = np.random.default_rng()
    n_blocks = 4096
    amax = np.float32(10.0) ** rng.uniform(-40, 37, n_blocks).astype(np.float32)
    amax[:8] = [1e-43, 1e-42, 2.0 ** -120, 2.0 ** -126, 1.0, 127.0, 1e30, 1e37]
    amax = amax.astype(np.float32)
    d = (amax / np.float32(127.0)).astype(np.float32)
    k = rng.integers(-127, 127, size=(n_blocks, 32)).astype(np.float64)
    delta = rng.choice([0.0, 1e-7, -1e-7, 3e-6, -3e-6, 1e-4, -1e-4, 5e-4, -5e-4, 3e-3], size=(n_blocks, 32))
    v = ((k + 0.5 + delta) * d[:, None].astype(np.float64)).astype(np.float32)
    v = np.clip(v, -amax[:, None], amax[:, None])
    v[:, 0] = amax  # amax is a value of the block, so d is exactly what both sides compute
    x = torch.from_numpy(v.reshape(1, -1))
    assert torch.equal(ggfuse.quantize_q8_1(x.to(DEV)).cpu(), ggfuse.quantize_q8_1(x))


def test_quantize_q8_1_unaligned_input(poison_outputs):
    # A view starting 4 bytes into its storage cannot use 16-byte loads; the result must not change.
    base = randn(2 * 256 + 1)
    x = base[1:].view(2, 256)
    xd = base.to(DEV)[1:].view(2, 256)
    assert xd.data_ptr() % 16 != 0
    assert torch.equal(ggfuse.quantize_q8_1(xd).cpu(), ggfuse.quantize_q8_1(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES, ids=str)
# K and the rows pick how many 256-thread blocks share a row (q8_1.cu's norm_subs: up to 8 for <= 64
# rows, one round of 1024 values each; 1 for more rows), with rounds held in registers or read again;
# 3104, 8288 and 16416 end in a partial round; 5120 (5 rounds) launches 8 blocks per row, 3 with no round.
@pytest.mark.parametrize("shape", [(1, 4096), (8, 4096), (3, 96), (1, 2048), (2, 3104), (1, 5120), (1, 8288),
                                   (1, 16416), (2, 2, 14336), (80, 1056)])
def test_rms_norm_mul_q8_1_matches_cpu(poison_outputs, dtype, w_dtype, shape):
    x = randn(*shape, dtype=dtype)
    w = (1.0 + 0.3 * torch.randn(shape[-1], dtype=torch.float64)).to(w_dtype)
    eps = 1e-6
    ref_q, ref_y = ggfuse.rms_norm_mul_q8_1(x, w, eps, return_float=True)
    got_q = ggfuse.rms_norm_mul_q8_1(x.to(DEV), w.to(DEV), eps)
    got_q2, got_y = ggfuse.rms_norm_mul_q8_1(x.to(DEV), w.to(DEV), eps, return_float=True)
    assert got_q.shape == ref_q.shape and got_y.shape == x.shape and got_y.dtype == dtype
    # The CPU sums in the CUDA kernel's orders (sum of squares, block sums): the same bytes, bit for bit.
    assert torch.equal(got_q.cpu(), ref_q)
    assert torch.equal(got_y.cpu(), ref_y)
    assert torch.equal(got_q, got_q2)  # the float output does not change the quantized one
    # y: fp32 math, then x's dtype.
    y64 = oracle.rms_norm_ref(x.double().numpy(), w.double().numpy(), eps)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(got_y.cpu().double().numpy(), y64, rtol=tol, atol=tol * np.abs(y64).max())
    # The quantized output against the float norm: within Q8 rounding.
    deq = oracle.dequantize_q8_1(got_q.cpu().reshape(-1, shape[-1] // 32 * 36).numpy())
    assert rel_err(deq, y64.reshape(deq.shape)) < 1e-2


@pytest.mark.parametrize("which", ["x", "weight"])
def test_rms_norm_mul_q8_1_unaligned_inputs(poison_outputs, which):
    # A view that starts 2 bytes past a 16-byte boundary takes the scalar-load kernel (q8_1.cu's
    # launch_norm); it must write the same bytes.
    k = 4128
    x_base = randn(3 * k + 1, dtype=torch.bfloat16)
    w_base = (1.0 + 0.3 * torch.randn(k + 1, dtype=torch.float64)).to(torch.bfloat16)
    x = x_base[1:].view(3, k) if which == "x" else x_base[:-1].view(3, k)
    w = w_base[1:] if which == "weight" else w_base[:-1]
    xd = x_base.to(DEV)[1:].view(3, k) if which == "x" else x_base.to(DEV)[:-1].view(3, k)
    wd = w_base.to(DEV)[1:] if which == "weight" else w_base.to(DEV)[:-1]
    assert (xd.data_ptr() % 16 != 0) == (which == "x") and (wd.data_ptr() % 16 != 0) == (which == "weight")
    ref_q, ref_y = ggfuse.rms_norm_mul_q8_1(x, w, 1e-5, return_float=True)
    got_q, got_y = ggfuse.rms_norm_mul_q8_1(xd, wd, 1e-5, return_float=True)
    assert torch.equal(got_q.cpu(), ref_q)
    assert torch.equal(got_y.cpu(), ref_y)
    y64 = oracle.rms_norm_ref(x.double().numpy(), w.double().numpy(), 1e-5)
    deq = oracle.dequantize_q8_1(got_q.cpu().reshape(-1, k // 32 * 36).numpy())
    assert rel_err(deq, y64.reshape(deq.shape)) < 1e-2


# ---------------------------------------------------------------- dequantize

@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, *ALL_MAT_VEC_TYPES], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 4096])
def test_dequantize_bit_exact(poison_outputs, qtype, k):
    w = torch.from_numpy(random_blocks(qtype, 7, k))
    got = ggfuse.dequantize(w.to(DEV), qtype)
    ref = ggfuse.dequantize(w, qtype)
    assert got.shape == ref.shape == (7, k)
    assert torch.equal(got.cpu(), ref)
    np.testing.assert_array_equal(got.cpu().double().numpy(), oracle.dequantize_weight(w.numpy(), qtype))


def test_dequantize_q8_1_float_odd_widths_and_offsets(poison_outputs):
    x = randn(3, 2, 160)
    xq = ggfuse.quantize_q8_1(x)
    assert torch.equal(ggfuse.dequantize(xq.to(DEV), T.Q8_1).cpu(), ggfuse.dequantize(xq, T.Q8_1))
    # float rows of any width (not a multiple of 8), and GGUF bytes at an odd address
    f = torch.from_numpy(random_blocks(T.F16, 5, 13))
    assert torch.equal(ggfuse.dequantize(f.to(DEV), T.F16).cpu(), ggfuse.dequantize(f, T.F16))
    w = torch.from_numpy(random_blocks(T.Q4_K, 3, 512))
    big = torch.empty(w.numel() + 1, dtype=torch.uint8, device=DEV)
    odd = big[1:].view(w.shape)
    odd.copy_(w.to(DEV))
    assert odd.data_ptr() % 2 == 1
    assert torch.equal(ggfuse.dequantize(odd, T.Q4_K).cpu(), ggfuse.dequantize(w, T.Q4_K))


# ---------------------------------------------------------------- mat_vec_q8_1

def weight_rows(qtype, rows, k):
    """GGUF bytes [rows, row_bytes]: ggfuse's quantizer where it writes the type, else random blocks."""
    if qtype in (T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K):
        return ggfuse.quantize(torch.randn(rows, k) * k ** -0.5, qtype).numpy()
    return random_blocks(qtype, rows, k)


def make_fused(specs, k):
    return oracle.fused_buffer(specs, k, rows_fn=weight_rows)


def check_mat_vec_cuda(specs, k, batch):
    segments, buf, qtypes, rows, offsets = make_fused(specs, k)
    buf_d = buf.to(DEV)
    outs, exacts, cpus = [], [], []
    for _ in range(oracle.exact_check_launches(batch, sum(rows))):  # >= 16 outputs: see there
        x = randn(batch, k)
        xq = ggfuse.quantize_q8_1(x)
        out = ggfuse.mat_vec_q8_1(xq.to(DEV), buf_d, qtypes, rows, offsets)
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (batch, sum(rows))
        outs.append(out.cpu().double().numpy())
        exacts.append(exact_mat_vec(segments, xq.numpy()))
        cpus.append(ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets).double().numpy())
    assert rel_err(np.concatenate(outs), np.concatenate(exacts)) < CUDA_EXACT_TOL
    assert rel_err(np.concatenate(outs), np.concatenate(cpus)) < CUDA_CPU_TOL
    float_batch = oracle.float_check_batch(batch, sum(rows))
    if float_batch != batch:
        x = randn(float_batch, k)
        xq = ggfuse.quantize_q8_1(x)
        out = ggfuse.mat_vec_q8_1(xq.to(DEV), buf_d, qtypes, rows, offsets)
    assert rel_err(out, float_mat_vec(segments, x.numpy())) < FLOAT_TOL
    return out


def valid_ks(qtype):
    # K = 256 and 14336 for every type; K not a multiple of 256 where the blocks are 32 wide, and a
    # Q6_K K (5120) whose 4200-byte rows are not 16-byte aligned.
    ks = [256, 14336]
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):
        ks += [32, 96, 4128]
    if qtype == T.Q6_K:
        ks += [5120]
    return ks


@pytest.mark.parametrize("qtype,k", [(t, k) for t in ALL_MAT_VEC_TYPES for k in valid_ks(t)],
                         ids=lambda v: v.name if isinstance(v, T) else str(v))
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_mat_vec_each_type(poison_outputs, qtype, k, batch):
    rows = 37 if k <= 4128 else 21  # not a multiple of the 16-row tile
    check_mat_vec_cuda([(qtype, rows)], k, batch)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64, 100])
def test_mat_vec_batch_sizes(poison_outputs, batch):
    check_mat_vec_cuda([(T.Q4_K, 40), (T.Q6_K, 9)], 512, batch)


@pytest.mark.parametrize("batch", [3, 4, 7, 8, 11])
@pytest.mark.parametrize("k", [256, 4096])
def test_mat_vec_q4_k_segments_batches(poison_outputs, batch, k):
    # Q4_K-only weights above the dp4a kernel's batches take the direct MMA kernel: several segments,
    # a last tile with a few rows, many tiles per CTA at K = 4096 (1400 rows), a second 8-row chunk
    check_mat_vec_cuda([(T.Q4_K, 1000), (T.Q4_K, 200), (T.Q4_K, 200)] if k == 4096
                       else [(T.Q4_K, 64), (T.Q4_K, 5), (T.Q4_K, 33)], k, batch)


@pytest.mark.parametrize("batch", [5, 8, 11])
@pytest.mark.parametrize("k", [256, 4096, 5120])
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q6_K, T.Q6_K), (T.Q4_0, T.Q4_0)],
                         ids=["q4k_q6k", "q6k", "q4_0"])
def test_mat_vec_direct_kernel_types(poison_outputs, types, k, batch):
    # Q4_K + Q6_K and Q4_0-only weights above the dp4a kernel's batches take the direct MMA kernel:
    # Q6_K rows at every even offset of a granule (K = 5120: 4200-byte rows), a last segment that ends
    # off a 16-byte boundary (its last granule is copied byte by byte), last tiles with a few rows,
    # many tiles per CTA (K = 4096), a second 8-row chunk (B = 11)
    a, b = types
    specs = {256: [(a, 300), (b, 45), (a, 17), (b, 3)], 4096: [(a, 1000), (b, 200), (a, 199)],
             5120: [(a, 150), (b, 37)]}[k]
    check_mat_vec_cuda(specs, k, batch)


@pytest.mark.parametrize("batch", [9, 24, 64, 65, 130])
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K), (T.Q4_K, T.Q6_K), (T.Q4_0, T.Q4_0)],
                         ids=["q4k", "q4k_q6k", "q4_0"])
def test_mat_vec_direct_kernel_batch_chunks(poison_outputs, types, batch):
    # Above 8 rows: by default the wide kernel (64 rows per launch); under GGFUSE_MV_WIDE=0 (device_check
    # variants) the direct kernel, which computes each staged weight item against up to 8 chunks of 8
    # batch rows in one launch, a partial slot per (tile, K group, chunk), where every warp has one
    # item (here: 24 tiles, 16 K steps, one per warp). Batches: a last chunk of one row
    # (B = 9; B = 65: a full launch, then one row through the dp4a kernel), 3 chunks (24), all 8 (64),
    # two full launches and a rest of 2 (130); segments with short last tiles, one ending off a
    # 16-byte boundary.
    a, b = types
    check_mat_vec_cuda([(a, 300), (b, 45), (a, 17), (b, 3)], 4096, batch)


@pytest.mark.parametrize("batch", [17, 64])
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K), (T.Q4_K, T.Q6_K)], ids=["q4k", "q4k_q6k"])
def test_mat_vec_direct_kernel_batch_chunks_many_tiles(poison_outputs, types, batch):
    # By default the wide kernel (3750 groups of 8 tiles, one K step: no split). Under GGFUSE_MV_WIDE=0
    # the direct kernel with 30-40 tiles per CTA at K = 256 (132 SMs): one launch per 8 rows (the warps
    # have several items), or under GGFUSE_MV_CHUNKS=8 several chunks per launch.
    # Q4_K alone: 8 chunks' partial slots (~116 KB) fit next to two weight slots per warp. Q4_K + Q6_K:
    # the Q4_K CTAs' ~38 tiles need ~155 KB for 8 chunks, which do not fit next to the larger Q6_K
    # slots, so a launch takes 4 chunks and the next launch the rest. Every output must be written
    # once, with its full sum.
    a, b = types
    check_mat_vec_cuda([(a, 32000), (b, 28000)], 256, batch)


WIDE_TYPES = [(T.Q4_K, T.Q4_K), (T.Q4_K, T.Q6_K), (T.Q4_0, T.Q4_0)]
WIDE_IDS = ["q4k", "q4k_q6k", "q4_0"]


@pytest.mark.parametrize("batch", [9, 40, 64])
@pytest.mark.parametrize("k", [256, 768, 14336])
@pytest.mark.parametrize("types", WIDE_TYPES, ids=WIDE_IDS)
def test_mat_vec_wide_kernel(poison_outputs, types, k, batch):
    # Above 8 rows the wide kernel: 8 tiles per CTA, every batch chunk's sums in registers, K split
    # over a cluster of CTAs. K = 256: one step (no split); 768: three steps (clusters of up to 3);
    # 14336: 56 steps, shares of unequal size. The segments' last tiles are short, and the last CTA
    # has warps without a tile (17 tiles); B = 9 and 40 end in a chunk of one row.
    a, b = types
    check_mat_vec_cuda([(a, 200), (b, 45), (a, 17)], k, batch)


@pytest.mark.parametrize("env,batch", [({"GGFUSE_MV_WIDE_SPLIT": "1"}, 24), ({"GGFUSE_MV_WIDE_SPLIT": "3"}, 24),
                                       ({"GGFUSE_MV_WIDE_SPLIT": "8"}, 64), ({"GGFUSE_MV_WIDE": "8"}, 8),
                                       ({"GGFUSE_MV_WIDE": "0"}, 24)],
                         ids=["split-1", "split-3", "split-8", "from-8-rows", "off"])
@pytest.mark.parametrize("types", WIDE_TYPES, ids=WIDE_IDS)
def test_mat_vec_wide_kernel_knobs(tmp_path, types, env, batch):
    # The knobs are read once per process, so each runs in a second one: the K split forced to one
    # CTA (no cluster), 3 (16 steps in shares of 5, 5, 6) and 8 CTAs per cluster; the wide kernel
    # taking B = 8 as one chunk; and turned off (the direct kernel per 8 rows). Every output must be
    # written once with its whole sum, within the tolerance of the exact products.
    a, b = types
    segments, buf, qtypes, rows, offsets = make_fused([(a, 300), (b, 45), (a, 17)], 4096)
    xq = ggfuse.quantize_q8_1(randn(batch, 4096))
    torch.save({"xq": xq, "w": buf, "qtypes": [int(t) for t in qtypes], "rows": rows, "offsets": offsets},
               tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", PAIRS_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=dict(os.environ, **env), check=True, timeout=120)
    out = torch.load(tmp_path / "out.pt").double().numpy()
    assert out.shape == (batch, sum(rows)) and np.isfinite(out).all()
    assert rel_err(out, exact_mat_vec(segments, xq.numpy())) < CUDA_EXACT_TOL


def test_mat_vec_wide_kernel_deterministic(poison_outputs):
    # The cluster's sums are added in rank order: the same inputs give the same bits.
    _, buf, qtypes, rows, offsets = make_fused([(T.Q4_K, 500), (T.Q6_K, 100)], 4096)
    xq = ggfuse.quantize_q8_1(randn(33, 4096)).to(DEV)
    buf_d = buf.to(DEV)
    first = ggfuse.mat_vec_q8_1(xq, buf_d, qtypes, rows, offsets)
    for _ in range(3):
        assert torch.equal(ggfuse.mat_vec_q8_1(xq, buf_d, qtypes, rows, offsets), first)


def test_mat_vec_wide_kernel_x_not_16_byte_aligned(poison_outputs):
    # The wide kernel copies x in 16-byte pieces; x_q8 that is only 4-byte aligned (a legal view) takes
    # the direct kernel instead, with the same results.
    segments, buf, qtypes, rows, offsets = make_fused([(T.Q4_K, 100), (T.Q4_K, 20)], 4096)
    xq = ggfuse.quantize_q8_1(randn(16, 4096))
    base = torch.zeros(xq.numel() + 4, dtype=torch.uint8, device=DEV)
    base[4:] = xq.flatten().to(DEV)
    xv = base[4:].view(xq.shape)
    assert xv.data_ptr() % 16 != 0
    out = ggfuse.mat_vec_q8_1(xv, buf.to(DEV), qtypes, rows, offsets)
    assert rel_err(out.cpu().double().numpy(), exact_mat_vec(segments, xq.numpy())) < CUDA_EXACT_TOL


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [256, 4096, 4128, 14336])
def test_mat_vec_q4_0_small_batches(poison_outputs, batch, k):
    # Q4_0 at B <= 2 takes the dp4a kernel: at B = 1 with K % 256 == 0 in 4-block units of 16-byte
    # loads (K = 256: one 144-byte group per row, so only lanes 0 and 1 have a unit), staged otherwise
    # (B = 2, K = 4128)
    specs = {256: [(T.Q4_0, 300), (T.Q4_0, 17)], 4096: [(T.Q4_0, 1000), (T.Q4_0, 200), (T.Q4_0, 9)],
             4128: [(T.Q4_0, 100), (T.Q4_0, 3)], 14336: [(T.Q4_0, 40)]}[k]
    check_mat_vec_cuda(specs, k, batch)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [256, 1280, 14336])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_0], ids=["q4_k", "q4_0"])
def test_mat_vec_row_pairs(poison_outputs, qtype, k, batch):
    # The dp4a kernel runs a warp's two rows as one sequence of units (Q4_K at B <= 2, Q4_0 at B = 1):
    # K = 256 puts all of row B's units on lanes that have none of row A's, K = 1280 (20 or 10 units a
    # row) a lane's units on both rows, K = 14336 several units of each row per lane. Segments of odd
    # sizes give warps whose rows lie in two segments (run one after the other) and a last warp with
    # one row.
    check_mat_vec_cuda([(qtype, 33), (qtype, 18), (qtype, 7)], k, batch)


def test_mat_vec_row_pairs_interleaved(poison_outputs):
    # Types that differ: the CTAs take interleaved rows, so a warp's two rows are far apart, in one
    # segment or in two of different types
    check_mat_vec_cuda([(T.Q4_K, 300), (T.Q4_0, 45), (T.Q4_K, 21)], 4096, 1)


PAIRS_SCRIPT = """
import sys, torch, ggfuse
d = torch.load(sys.argv[1])
out = ggfuse.mat_vec_q8_1(d["xq"].cuda(), d["w"].cuda(), d["qtypes"], d["rows"], d["offsets"])
torch.save(out.cpu(), sys.argv[2])
"""


@pytest.mark.parametrize("qtype,batch", [(T.Q4_K, 1), (T.Q4_K, 2), (T.Q4_0, 1)], ids=["q4_k-1", "q4_k-2", "q4_0-1"])
def test_mat_vec_row_pairs_same_bits_as_rows_in_turn(tmp_path, qtype, batch):
    # GGFUSE_MV_ROW_PAIRS=0 (read once per process: a second process) runs a warp's rows one after the
    # other; both orders put each row's units through the same lanes in the same order
    _, buf, qtypes, rows, offsets = make_fused([(qtype, 301), (qtype, 64)], 4096)
    xq = ggfuse.quantize_q8_1(randn(batch, 4096))
    torch.save({"xq": xq, "w": buf, "qtypes": [int(t) for t in qtypes], "rows": rows, "offsets": offsets},
               tmp_path / "in.pt")
    env = dict(os.environ, GGFUSE_MV_ROW_PAIRS="0")
    subprocess.run([sys.executable, "-c", PAIRS_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    in_turn = torch.load(tmp_path / "out.pt")
    paired = ggfuse.mat_vec_q8_1(xq.to(DEV), buf.to(DEV), qtypes, rows, offsets).cpu()
    assert torch.equal(paired, in_turn)
    assert rel_err(paired.double().numpy(), ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets).double().numpy()) < CUDA_CPU_TOL


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 300])
def test_mat_vec_row_counts(poison_outputs, rows):
    check_mat_vec_cuda([(T.Q4_K, rows)], 4096, 1)


@pytest.mark.parametrize("specs", [
    [(T.Q4_K, 64), (T.Q4_K, 16), (T.Q6_K, 16)],                              # Q4_K_M attention
    [(T.Q4_K, 33), (T.Q6_K, 17)],                                            # odd sizes
    [(T.Q4_K, 17), (T.Q5_K, 5), (T.Q6_K, 3), (T.Q4_0, 9), (T.Q8_0, 4), (T.Q5_0, 3)],  # every type
    [(T.Q6_K, 1), (T.Q4_0, 1), (T.Q6_K, 3)],                                 # tiny, unaligned rows
    [(T.Q6_K, 3), (T.Q4_K, 5), (T.Q4_0, 3)],  # warps with a staged row then an unstaged one, and back
], ids=["q4k_q4k_q6k", "q4k_q6k_odd", "every_type", "tiny", "staged_unstaged"])
@pytest.mark.parametrize("k", [256, 14336])
@pytest.mark.parametrize("batch", [1, 8])
def test_mat_vec_mixed_segments(poison_outputs, specs, k, batch):
    check_mat_vec_cuda(specs, k, batch)


def test_mat_vec_more_segments_than_one_launch(poison_outputs):
    types = [T.Q4_0, T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_K, T.Q5_0]
    check_mat_vec_cuda([(types[i % len(types)], 1 + (7 * i) % 23) for i in range(21)], 512, 3)


def test_mat_vec_large_layer(poison_outputs):
    # a whole fused QKV of a 4096-wide model: many tiles per CTA and the L2 prefetch cap
    check_mat_vec_cuda([(T.Q4_K, 4096), (T.Q4_K, 1024), (T.Q6_K, 1024)], 4096, 2)


def test_mat_vec_many_chunks_per_cta(poison_outputs):
    # ~140 KB of weights per SM: the streaming kernel's shared-memory ring (about 100 KB) refills
    # its slots several times per CTA, across a segment boundary and two row sizes
    check_mat_vec_cuda([(T.Q4_K, 12000), (T.Q6_K, 3001)], 2048, 3)


@pytest.mark.parametrize("specs", [[(T.Q4_K, 37)], [(T.Q4_K, 21), (T.Q6_K, 19)]], ids=["q4k", "q4k_q6k"])
@pytest.mark.parametrize("batch", [1, 2])
def test_mat_vec_long_rows(poison_outputs, specs, batch):
    # K = 8192: the staged dp4a kernel's 16 row slots per CTA would leave fewer than 3 CTAs per SM,
    # so it takes one row per warp (K = 4096 takes two, K = 14336 the unstaged path)
    check_mat_vec_cuda(specs, 8192, batch)


@pytest.mark.parametrize("batch", [1, 8])
def test_mat_vec_segments_out_of_buffer_order(poison_outputs, batch):
    # the segment list need not follow the buffer: columns follow the list, bytes the offsets
    segments, buf, qtypes, rows, offsets = make_fused([(T.Q4_K, 300), (T.Q6_K, 70), (T.Q4_0, 50)], 1024)
    order = [2, 0, 1]
    xq = ggfuse.quantize_q8_1(randn(batch, 1024))
    out = ggfuse.mat_vec_q8_1(xq.to(DEV), buf.to(DEV), [qtypes[i] for i in order], [rows[i] for i in order],
                              [offsets[i] for i in order])
    assert rel_err(out, exact_mat_vec([segments[i] for i in order], xq.numpy())) < CUDA_EXACT_TOL


@pytest.mark.parametrize("specs", [[(T.Q4_K, 200), (T.Q6_K, 50)], [(T.Q4_K, 200), (T.Q4_K, 50)],
                                   [(T.Q4_0, 250)]], ids=["q4k_q6k", "q4k", "q4_0"])
@pytest.mark.parametrize("batch", [4, 8])
def test_mat_vec_is_deterministic(poison_outputs, specs, batch):
    segments, buf, qtypes, rows, offsets = make_fused(specs, 4096)
    xq = ggfuse.quantize_q8_1(randn(batch, 4096).to(DEV))
    buf = buf.to(DEV)
    a = ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets)
    b = ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- the fused layer and the hot path

def make_layer(k=4096, sizes=(512, 128, 128), types=(T.Q4_K, T.Q4_K, T.Q6_K)):
    members = [(name, torch.from_numpy(weight_rows(t, n, k)), t)
               for name, n, t in zip(("q", "k", "v"), sizes, types)]
    return members, ggfuse.FusedQuantLinear(members, device=DEV)


@pytest.mark.parametrize("batch", [1, 5, 8, 12])
def test_rms_norm_mat_vec_matches_members_and_cpu(poison_outputs, batch):
    members, fused = make_layer()
    x = randn(batch, 4096, dtype=torch.bfloat16)
    nw = (1.0 + 0.2 * torch.randn(4096)).to(torch.bfloat16)
    eps = 1e-5
    out = ggfuse.rms_norm_mat_vec(x.to(DEV), nw.to(DEV), eps, fused)
    assert out.shape == (batch, 768) and out.device.type == "cuda"
    # per member, through the same Q8_1 activations
    xq = ggfuse.rms_norm_mul_q8_1(x.to(DEV), nw.to(DEV), eps)
    parts = [ggfuse.mat_vec_q8_1(xq, w.reshape(-1).to(DEV), [t], [w.shape[0]], [0]) for _, w, t in members]
    assert rel_err(out, torch.cat(parts, dim=1).double().cpu().numpy()) < 1e-6
    # against the CPU path and the float reference
    cpu = ggfuse.FusedQuantLinear(members).rms_norm_forward(x, nw, eps)
    assert rel_err(out, cpu.double().numpy()) < CUDA_CPU_TOL  # the same Q8_1 bytes (the norm is bit-exact)
    y = oracle.rms_norm_ref(x.double().numpy(), nw.double().numpy(), eps)
    segs = [(w.numpy(), t) for _, w, t in members]
    if batch * 768 >= MIN_OUTPUTS_FOR_FLOAT_CHECK:
        assert rel_err(out, float_mat_vec(segs, y)) < FLOAT_TOL
    assert rel_err(out, exact_mat_vec(segs, xq.cpu().numpy())) < CUDA_EXACT_TOL


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 20])
def test_rms_norm_mat_vec_op(poison_outputs, x_dtype, w_dtype, batch):
    # The one-kernel path (batch <= 8) and its two-kernel fallback against the two ops and the CPU.
    specs = [(T.Q4_K, 40), (T.Q6_K, 9), (T.Q4_0, 5)]
    segments, buf, qtypes, rows, offsets = make_fused(specs, 512)
    x = randn(batch, 512, dtype=x_dtype)
    nw = (1.0 + 0.2 * torch.randn(512)).to(w_dtype)
    got = ggfuse.ops.rms_norm_mat_vec_q8_1(x.to(DEV), nw.to(DEV), 1e-5, buf.to(DEV), qtypes, rows, offsets)
    assert got.shape == (batch, sum(rows)) and got.dtype == torch.float32
    xq = ggfuse.rms_norm_mul_q8_1(x.to(DEV), nw.to(DEV), 1e-5)  # the same Q8_1 bytes, by construction
    two = ggfuse.mat_vec_q8_1(xq, buf.to(DEV), qtypes, rows, offsets)
    assert rel_err(got, two.double().cpu().numpy()) < 1e-6
    assert rel_err(got, exact_mat_vec(segments, xq.cpu().numpy())) < CUDA_EXACT_TOL
    cpu = ggfuse.ops.rms_norm_mat_vec_q8_1(x, nw, 1e-5, buf, qtypes, rows, offsets)
    assert rel_err(got, cpu.double().numpy()) < CUDA_CPU_TOL  # the same Q8_1 bytes (the norm is bit-exact)


def test_rms_norm_mat_vec_op_shapes_and_views(poison_outputs):
    # leading dimensions, an x that is not 16-byte aligned, and more segments than one launch takes
    types = [T.Q4_K, T.Q6_K, T.Q4_0, T.Q8_0, T.Q5_K, T.Q5_0]
    specs = [(types[i % len(types)], 1 + (5 * i) % 17) for i in range(19)]
    segments, buf, qtypes, rows, offsets = make_fused(specs, 256)
    base = randn(2 * 3 * 256 + 2, dtype=torch.bfloat16).to(DEV)
    x = base[2:].view(2, 3, 256)
    assert x.data_ptr() % 16 != 0
    nw = torch.rand(256, device=DEV) + 0.5
    got = ggfuse.ops.rms_norm_mat_vec_q8_1(x, nw, 1e-6, buf.to(DEV), qtypes, rows, offsets)
    assert got.shape == (2, 3, sum(rows))
    xq = ggfuse.rms_norm_mul_q8_1(x, nw, 1e-6).reshape(6, -1)
    two = ggfuse.mat_vec_q8_1(xq, buf.to(DEV), qtypes, rows, offsets).reshape(2, 3, -1)
    assert rel_err(got, two.double().cpu().numpy()) < 1e-6


FUSED_NORM_SPECS = {
    "q4_k": [(T.Q4_K, 70)],
    "q4_k+q6_k": [(T.Q4_K, 33), (T.Q6_K, 17)],
    "q4_0+q8_0": [(T.Q4_0, 40), (T.Q8_0, 9)],
    "q5_k+q5_0+q4_k": [(T.Q5_K, 8), (T.Q5_0, 24), (T.Q4_K, 5)],
}


def check_hot_path_equals_two_ops(specs, k, batch):
    """The hot path against the norm op then the mat-vec op on fresh bf16 x, whichever path it takes."""
    segments, buf, qtypes, rows, offsets = make_fused(specs, k)
    x = randn(batch, k, dtype=torch.bfloat16).to(DEV)
    nw = (1.0 + 0.2 * torch.randn(k)).to(torch.bfloat16).to(DEV)
    buf_d = buf.to(DEV)
    got = ggfuse.ops.rms_norm_mat_vec_q8_1(x, nw, 1e-5, buf_d, qtypes, rows, offsets)
    xq = ggfuse.rms_norm_mul_q8_1(x, nw, 1e-5)
    two = ggfuse.mat_vec_q8_1(xq, buf_d, qtypes, rows, offsets)
    # Within fp32 summation order (a one-launch variant may run another mat-vec kernel than the
    # two-kernel path: MMA against dp4a); one flipped quant would show as >= 1e-4.
    assert rel_err(got, two.double().cpu().numpy()) < 1e-6
    assert rel_err(got, exact_mat_vec(segments, xq.cpu().numpy())) < CUDA_EXACT_TOL


@pytest.mark.parametrize("name", list(FUSED_NORM_SPECS))
@pytest.mark.parametrize("k", [256, 4096, 8192])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_rms_norm_mat_vec_equals_two_kernels(poison_outputs, name, k, batch):
    # By default the hot path runs those two kernels; under device_check.sh's variants
    # (GGFUSE_FUSED_NORM=1, GGFUSE_MV_STREAM=8) mat-vec CTAs normalize x themselves and must write the
    # norm kernel's bytes. K = 8192 takes the norm past the rounds it holds in registers.
    check_hot_path_equals_two_ops(FUSED_NORM_SPECS[name], k, batch)


# The hot path at B <= 2 across the norm's CTA splits (K <= 1024: one CTA per row; 2048: two; 5120:
# eight, rounds 5..7 idle; 16384: eight with two rounds each), row counts that leave the dp4a kernel's
# last CTA partly empty, rows in registers (Q4_K, Q4_0 at B = 1) and staged (Q6_K, Q4_0 at B = 2),
# mixed types (the dp4a kernel's interleaved rows). (v16 also measured a one-launch norm in clusters
# of dp4a CTAs against these tests: docs/PERFORMANCE.md.)
SMALL_BATCH_NORM_SPECS = {
    "q4_k": [(T.Q4_K, 70)],
    "q4_k+q6_k": [(T.Q4_K, 37), (T.Q6_K, 19)],
    "q4_0": [(T.Q4_0, 93)],
}


@pytest.mark.parametrize("name", list(SMALL_BATCH_NORM_SPECS))
@pytest.mark.parametrize("k", [256, 1024, 2048, 5120, 16384])
@pytest.mark.parametrize("batch", [1, 2])
def test_rms_norm_mat_vec_small_batches_widths(poison_outputs, name, k, batch):
    check_hot_path_equals_two_ops(SMALL_BATCH_NORM_SPECS[name], k, batch)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_rms_norm_mat_vec_dtypes_and_alignment(poison_outputs, x_dtype, w_dtype, aligned):
    # Every (x, weight) type pair of the hot path, with 16-byte aligned rows (vector loads)
    # and with x and the weight 2 or 4 bytes off (scalar loads); K = 4128 is not a multiple of 256
    # (Q4_0 and Q8_0 rows, staged).
    k = 4128
    specs = [(T.Q4_0, 29), (T.Q8_0, 6)]
    segments, buf, qtypes, rows, offsets = make_fused(specs, k)
    shift = 0 if aligned else 1
    x = randn(k + shift, dtype=x_dtype).to(DEV)[shift:].view(1, k)
    nw = (1.0 + 0.2 * torch.randn(k + shift)).to(w_dtype).to(DEV)[shift:]
    assert (x.data_ptr() % 16 == 0) == aligned and (nw.data_ptr() % 16 == 0) == aligned
    got = ggfuse.ops.rms_norm_mat_vec_q8_1(x, nw, 1e-6, buf.to(DEV), qtypes, rows, offsets)
    xq = ggfuse.rms_norm_mul_q8_1(x, nw, 1e-6)
    assert torch.equal(xq.cpu(), ggfuse.rms_norm_mul_q8_1(x.cpu(), nw.cpu(), 1e-6))  # the CPU's bytes
    two = ggfuse.mat_vec_q8_1(xq, buf.to(DEV), qtypes, rows, offsets)
    assert rel_err(got, two.double().cpu().numpy()) < 1e-6
    assert rel_err(got, exact_mat_vec(segments, xq.cpu().numpy())) < CUDA_EXACT_TOL


@pytest.mark.parametrize("k", [32, 96, 1056])
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_rms_norm_mat_vec_odd_widths(poison_outputs, k, x_dtype):
    # K not a multiple of 256 (blocks of 32 only): norm rounds that leave whole warps and lane groups
    # idle; the norm is the CPU's, bit for bit.
    specs = [(T.Q4_0, 21), (T.Q5_0, 3), (T.Q8_0, 11)]
    segments, buf, qtypes, rows, offsets = make_fused(specs, k)
    x = randn(2, k, dtype=x_dtype).to(DEV)
    nw = (1.0 + 0.2 * torch.randn(k)).to(DEV)
    got = ggfuse.ops.rms_norm_mat_vec_q8_1(x, nw, 1e-6, buf.to(DEV), qtypes, rows, offsets)
    xq = ggfuse.rms_norm_mul_q8_1(x, nw, 1e-6)
    two = ggfuse.mat_vec_q8_1(xq, buf.to(DEV), qtypes, rows, offsets)
    assert rel_err(got, two.double().cpu().numpy()) < 1e-6  # as above
    assert rel_err(got, exact_mat_vec(segments, xq.cpu().numpy())) < CUDA_EXACT_TOL
    assert torch.equal(xq.cpu(), ggfuse.rms_norm_mul_q8_1(x.cpu(), nw.cpu(), 1e-6))


def test_cuda_graph_capture_and_replay():
    members, fused = make_layer()
    nw = (1.0 + 0.2 * torch.randn(4096, device=DEV)).to(torch.bfloat16)
    static_x = randn(2, 4096, dtype=torch.bfloat16).to(DEV)
    eager = ggfuse.rms_norm_mat_vec(static_x, nw, 1e-6, fused)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch recommends before capture
        ggfuse.rms_norm_mat_vec(static_x, nw, 1e-6, fused)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ggfuse.rms_norm_mat_vec(static_x, nw, 1e-6, fused)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    for _ in range(3):  # new inputs through the same graph
        static_x.copy_(randn(2, 4096, dtype=torch.bfloat16).to(DEV))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ggfuse.rms_norm_mat_vec(static_x, nw, 1e-6, fused))


@pytest.mark.parametrize("batch", [1, 3])
def test_torch_compile_reduce_overhead(batch):
    members, fused = make_layer()
    nw = (1.0 + 0.2 * torch.randn(4096, device=DEV)).to(torch.bfloat16)

    def step(x):
        return ggfuse.rms_norm_mat_vec(x, nw, 1e-6, fused) * 2.0

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(4):  # the first calls record, later ones replay the graph
        x = randn(batch, 4096, dtype=torch.bfloat16).to(DEV)
        got = compiled(x).clone()
        torch.testing.assert_close(got, step(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- devices

def test_mixed_devices_are_rejected():
    x = randn(2, 256)
    xq = ggfuse.quantize_q8_1(x)
    w = torch.from_numpy(weight_rows(T.Q4_K, 3, 256)).reshape(-1)
    with pytest.raises(RuntimeError, match="device|cuda|cpu"):
        ggfuse.mat_vec_q8_1(xq.to(DEV), w, [T.Q4_K], [3], [0])
    with pytest.raises(RuntimeError, match="device|cuda|cpu"):
        ggfuse.rms_norm_mul_q8_1(x.to(DEV), torch.ones(256), 1e-6)


def test_quantize_stays_cpu_only():
    with pytest.raises((NotImplementedError, RuntimeError)):
        ggfuse.quantize(randn(2, 256).to(DEV), T.Q4_K)


def test_errors_match_cpu():
    # the same checks run before any CUDA work: same exception types as on the CPU
    buf = torch.zeros(4096, dtype=torch.uint8)
    xq = ggfuse.quantize_q8_1(randn(1, 256))
    for dev in ("cpu", DEV):
        with pytest.raises(ValueError, match="aligned"):
            ggfuse.mat_vec_q8_1(xq.to(dev), buf.to(dev)[1:1 + 144 * 3], [T.Q4_K], [3], [0])
        with pytest.raises(NotImplementedError):
            ggfuse.mat_vec_q8_1(xq.to(dev), buf.to(dev), [T.Q4_1], [3], [0])
        with pytest.raises(TypeError):
            ggfuse.quantize_q8_1(torch.zeros(2, 64, dtype=torch.int32, device=dev))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_second_gpu():
    members, fused0 = make_layer(k=512, sizes=(64, 16, 16))
    fused1 = ggfuse.FusedQuantLinear(members, device="cuda:1")
    x = randn(2, 512, dtype=torch.bfloat16)
    nw = torch.ones(512, dtype=torch.bfloat16)
    ref = ggfuse.rms_norm_mat_vec(x.to("cuda:0"), nw.to("cuda:0"), 1e-6, fused0)
    with torch.cuda.device(0):  # current device 0, tensors on device 1
        out = ggfuse.rms_norm_mat_vec(x.to("cuda:1"), nw.to("cuda:1"), 1e-6, fused1)
    assert out.device == torch.device("cuda:1")
    torch.cuda.synchronize(1)
    assert torch.equal(out.cpu(), ref.cpu())
    with torch.cuda.device(1):
        out0 = ggfuse.rms_norm_mat_vec(x.to("cuda:0"), nw.to("cuda:0"), 1e-6, fused0)
    assert torch.equal(out0.cpu(), ref.cpu())
    with pytest.raises(RuntimeError):
        ggfuse.mat_vec_q8_1(ggfuse.quantize_q8_1(x.float().to("cuda:0")), fused1.weight,
                            fused1.seg_qtypes, fused1.seg_rows, fused1.seg_offsets)
