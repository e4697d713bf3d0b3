"""The ggfuse ops on the CPU against independent references (tests/oracle.py, SPEC §5).

Every output is poisoned before it is written (torch's deterministic mode fills new tensors with NaN,
or 255 for bytes), every run draws fresh random data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import ggfuse
import oracle
from oracle import ALL_MAT_VEC_TYPES, exact_mat_vec, float_mat_vec, random_blocks, rel_err

CPU_EXACT_TOL = 1e-5   # SPEC §5 check 1 on the CPU
FLOAT_TOL = 2e-2       # SPEC §5 check 2 (Q8 activation noise)

# |dequant(Q8_1(x)) - x| / d: half a step, plus 127 quants times the fp16 rounding (2^-11) of d.
Q8_1_STEP_BOUND = 0.5 + 127 * 2.0 ** -11 + 1e-3

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# New tensors, and so every op output, start as NaN / 255 while a test runs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poison_outputs")


def test_poisoning_is_active():
    assert torch.isnan(torch.empty(8)).all()
    assert (torch.empty(8, dtype=torch.uint8) == 255).all()


def randn(*shape, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * np.exp(np.random.uniform(-3, 3))).to(dtype)


# ---------------------------------------------------------------- quantize_q8_1

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (3, 256), (5, 4096), (2, 3, 96)])
def test_quantize_q8_1_matches_spec(dtype, shape):
    x = randn(*shape, dtype=dtype)
    x[..., :32] = 0.0  # an all-zero block: d = 0 and all quants 0
    out = ggfuse.quantize_q8_1(x)
    K = shape[-1]
    assert out.dtype == torch.uint8 and out.shape == (*shape[:-1], K // 32 * 36)
    x2 = x.float().reshape(-1, K).numpy()
    ref = oracle.quantize_q8_1(x2)
    got = out.reshape(-1, K // 32 * 36).numpy()
    blocks = got.reshape(got.shape[0], -1, 36)
    ref_blocks = ref.reshape(ref.shape[0], -1, 36)
    # d and the quants are exact; s is an fp32 sum whose order may differ, so allow one fp16 ulp.
    np.testing.assert_array_equal(blocks[:, :, 0:2], ref_blocks[:, :, 0:2])
    np.testing.assert_array_equal(blocks[:, :, 4:], ref_blocks[:, :, 4:])
    _, s, _ = oracle.parse_q8_1(got)
    _, s_ref, _ = oracle.parse_q8_1(ref)
    np.testing.assert_allclose(s, s_ref, rtol=2 ** -10, atol=1e-30 + np.abs(s_ref).max() * 1e-6)
    # and the blocks represent x to within half a step, plus the fp16 rounding of d times |q| <= 127
    d, _, _ = oracle.parse_q8_1(got)
    err = np.abs(oracle.dequantize_q8_1(got) - x2.astype(np.float64)).reshape(d.shape + (32,))
    assert (err <= d[:, :, None] * Q8_1_STEP_BOUND + 1e-30).all()


# ---------------------------------------------------------------- rms_norm_mul_q8_1

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("shape", [(1, 32), (4, 256), (3, 4096)])
def test_rms_norm_mul_q8_1(dtype, w_dtype, shape):
    w_dtype = dtype if w_dtype == "same" else w_dtype
    x = randn(*shape, dtype=dtype)
    w = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).to(w_dtype)
    eps = 1e-5
    q8, y = ggfuse.rms_norm_mul_q8_1(x, w, eps, return_float=True)
    q8_only = ggfuse.rms_norm_mul_q8_1(x, w, eps)
    assert torch.equal(q8, q8_only)
    assert y.dtype == dtype and y.shape == x.shape
    ref = oracle.rms_norm_ref(x.double().numpy(), w.double().numpy(), eps)
    # the float output is fp32 math rounded to x's dtype
    out_tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(y, ref) < out_tol
    d, _, _ = oracle.parse_q8_1(q8.numpy())
    deq = oracle.dequantize_q8_1(q8.numpy())
    err = np.abs(deq - ref).reshape(d.shape + (32,))
    assert (err <= d[:, :, None] * Q8_1_STEP_BOUND + 1e-5 * np.abs(ref).max()).all()
    if dtype == torch.float32:
        # one pass: the quantized bytes are exactly the Q8_1 of the float output of the same pass
        assert torch.equal(q8, ggfuse.quantize_q8_1(y))


def test_rms_norm_rejects_rows_of_2_31_values():
    """K >= 2^31 is refused on every device (the CUDA norm indexes within a row in 32 bits), before
    any work: the two 4 GiB inputs are allocated but never touched."""
    k = 1 << 31
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN poisoning of 8 GiB
    try:
        x = torch.empty(1, k, dtype=torch.bfloat16)
        w = torch.empty(k, dtype=torch.bfloat16)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    weight = torch.zeros(144, dtype=torch.uint8)  # one Q4_K row of 256 values: never reached
    calls = [lambda: ggfuse.rms_norm_mul_q8_1(x, w),
             lambda: ggfuse.rms_norm_mul_q8_1(x, w, return_float=True),
             lambda: ggfuse.ops.rms_norm_mat_vec_q8_1(x, w, 1e-6, weight, [T.Q4_K], [1], [0])]
    for call in calls:
        with pytest.raises(ValueError, match=r"K = 2147483648 is too long for one norm row"):
            call()


# ---------------------------------------------------------------- dequantize

DEQ_TYPES = ALL_MAT_VEC_TYPES + (T.F32, T.F16, T.BF16)


@pytest.mark.parametrize("qtype", DEQ_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7])
def test_dequantize_equals_gguf_py(qtype, rows):
    k = 512
    w = random_blocks(qtype, rows, k)
    out = ggfuse.dequantize(torch.from_numpy(w), qtype)
    assert out.dtype == torch.float32 and out.shape == (rows, k)
    if qtype == T.BF16:
        ref = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        ref = oracle.dequantize_weight(w, qtype).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_dequantize_leading_dims_and_q8_1():
    w = random_blocks(T.Q4_K, 6, 256).reshape(2, 3, -1)
    out = ggfuse.dequantize(torch.from_numpy(w), T.Q4_K)
    assert out.shape == (2, 3, 256)
    np.testing.assert_array_equal(out.reshape(6, 256).numpy(),
                                  oracle.dequantize_weight(w.reshape(6, -1), T.Q4_K).astype(np.float32))
    x = randn(3, 128)
    xq = ggfuse.quantize_q8_1(x)
    np.testing.assert_allclose(ggfuse.dequantize(xq, T.Q8_1).numpy(), oracle.dequantize_q8_1(xq.numpy()),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- mat_vec_q8_1

def make_fused(segment_specs, k):
    return oracle.fused_buffer(segment_specs, k)


def check_mat_vec(segment_specs, k, batch):
    segments, buf, qtypes, rows, offsets = make_fused(segment_specs, k)
    outs, exacts = [], []
    for _ in range(oracle.exact_check_launches(batch, sum(rows))):  # >= 16 outputs: see there
        x = randn(batch, k)
        xq = ggfuse.quantize_q8_1(x)
        out = ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets)
        assert out.dtype == torch.float32 and out.shape == (batch, sum(rows))
        outs.append(out.double().numpy())
        exacts.append(exact_mat_vec(segments, xq.numpy()))
    assert rel_err(np.concatenate(outs), np.concatenate(exacts)) < CPU_EXACT_TOL
    # The Q8-noise bound is statistical (oracle.float_check_batch): it runs on enough inputs.
    float_batch = oracle.float_check_batch(batch, sum(rows))
    if float_batch != batch:
        x = randn(float_batch, k)
        xq = ggfuse.quantize_q8_1(x)
        out_float = ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets)
    else:
        out_float = out
    assert rel_err(out_float, float_mat_vec(segments, x.numpy())) < FLOAT_TOL
    return out


@pytest.mark.parametrize("qtype", ALL_MAT_VEC_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 768])
@pytest.mark.parametrize("rows", [1, 13])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8, 9, 64])
def test_mat_vec_each_type(qtype, k, rows, batch):
    check_mat_vec([(qtype, rows)], k, batch)


@pytest.mark.parametrize("qtype", ALL_MAT_VEC_TYPES, ids=lambda t: t.name)
def test_mat_vec_cpu_rounds_each_output_once(qtype):
    # The CPU evaluates SPEC §2 in double and rounds each output to float once (cpu/mat_vec.cpp), so
    # every output is within half an fp32 ulp of the exact math, also where its blocks cancel (summed
    # in fp32, ~0.5% of single outputs missed SPEC §5's 1e-5; most outputs are off by more than half
    # an ulp)
    segments, buf, qtypes, rows, offsets = make_fused([(qtype, 64)], 768)
    xq = ggfuse.quantize_q8_1(randn(8, 768))
    out = ggfuse.mat_vec_q8_1(xq, buf, qtypes, rows, offsets).double().numpy()
    exact = exact_mat_vec(segments, xq.numpy())
    assert (np.abs(out - exact) <= 2.0 ** -24 * np.abs(exact) * 1.001 + 1e-38).all()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [32, 96])
def test_mat_vec_small_k(qtype, k):
    check_mat_vec([(qtype, 5)], k, 3)


@pytest.mark.parametrize("specs", [
    [(T.Q4_K, 32), (T.Q4_K, 8), (T.Q6_K, 8)],              # Q4_K_M attention with a Q6_K V
    [(T.Q4_K, 17), (T.Q5_K, 5), (T.Q6_K, 3)],              # Q4_K_S-like, odd sizes
    [(T.Q4_0, 9), (T.Q8_0, 4), (T.Q5_0, 3), (T.Q6_K, 1)],   # 32-blocks mixed with a K-quant
], ids=["q4k_q4k_q6k", "q4k_q5k_q6k", "mixed_32_and_k"])
@pytest.mark.parametrize("batch", [1, 8, 9])
def test_mat_vec_mixed_segments(specs, batch):
    check_mat_vec(specs, 512, batch)


def test_mat_vec_many_segments():
    # more segments than one kernel launch takes (16): the op splits them
    check_mat_vec([(T.Q4_0 if i % 2 else T.Q4_K, 3 + i % 4) for i in range(19)], 256, 2)


def test_mat_vec_large_k():
    check_mat_vec([(T.Q4_K, 4), (T.Q6_K, 3), (T.Q4_0, 2)], 14336, 2)


# ---------------------------------------------------------------- the llama.cpp-made files

@pytest.mark.parametrize("name", ["tiny-llama-q4_0.gguf", "tiny-llama-q4_k_m.gguf"])
def test_testdata_dequantize_every_tensor(name):
    from gguf import GGUFReader
    reader = GGUFReader(oracle.testdata_path(name))
    assert len(reader.tensors) > 0
    for t in reader.tensors:
        if t.tensor_type == T.F32:
            continue
        w = np.asarray(t.data)
        out = ggfuse.dequantize(torch.from_numpy(w.copy()), t.tensor_type).numpy()
        np.testing.assert_array_equal(out, oracle.dequantize_weight(w, t.tensor_type).astype(np.float32),
                                      err_msg=t.name)


@pytest.mark.parametrize("name", ["tiny-llama-q4_0.gguf", "tiny-llama-q4_k_m.gguf"])
def test_testdata_fused_qkv_every_layer(name):
    from gguf import GGUFReader
    reader = GGUFReader(oracle.testdata_path(name))
    tensors = {t.name: t for t in reader.tensors}
    n_layer = int(reader.fields["llama.block_count"].contents())
    seen_types = set()
    for layer in range(n_layer):
        members = []
        for proj in ("q", "k", "v"):
            t = tensors[f"blk.{layer}.attn_{proj}.weight"]
            members.append((proj, torch.from_numpy(np.asarray(t.data).copy()), t.tensor_type))
            seen_types.add(t.tensor_type)
        fused = ggfuse.FusedQuantLinear(members)
        assert not fused.fallbacks
        x = randn(3, fused.in_features)
        xq = ggfuse.quantize_q8_1(x)
        out = fused.forward_q8(xq)
        segments = [(m[1].numpy(), m[2]) for m in members]
        assert rel_err(out, exact_mat_vec(segments, xq.numpy())) < CPU_EXACT_TOL
        # The Q8-noise bound is statistical: over 3 inputs the Q4_0 layers (K = 256) measured a median
        # of 1.3% and a tail past 2% (oracle.float_check_batch), so it runs on enough inputs.
        xf = randn(oracle.float_check_batch(3, sum(fused.out_features)), fused.in_features)
        assert rel_err(fused(xf), float_mat_vec(segments, xf.numpy())) < FLOAT_TOL
    if "q4_k_m" in name:
        assert {T.Q4_K, T.Q6_K} <= seen_types  # the mixed-type QKV of layers 2 and 3 was covered


# ---------------------------------------------------------------- FusedQuantLinear

def test_fused_quant_linear_api_and_split():
    k = 512
    specs = [("q", T.Q4_K, 24), ("k", T.Q4_K, 8), ("v", T.Q6_K, 8)]
    members = [(n, torch.from_numpy(random_blocks(t, r, k)), t) for n, t, r in specs]
    f = ggfuse.FusedQuantLinear(members)
    assert f.names == ("q", "k", "v")
    assert f.qtypes == (T.Q4_K, T.Q4_K, T.Q6_K)
    assert f.out_features == (24, 8, 8) and f.total_out_features == 40 and f.in_features == k
    x = randn(5, k)
    y = f(x)
    assert torch.equal(y, f.forward_q8(ggfuse.quantize_q8_1(x)))
    parts = f.split(y)
    assert [p.shape for p in parts] == [(5, 24), (5, 8), (5, 8)]
    # fused equals per member, bit for bit on the CPU (same per-row arithmetic)
    for (name, w, t), part in zip(members, parts):
        alone = ggfuse.FusedQuantLinear([(name, w, t)])
        assert torch.equal(alone(x), part)
    # leading dimensions
    assert torch.equal(f(x.reshape(5, 1, k)).reshape(5, -1), y)
    assert f.to("cpu").weight.device.type == "cpu"


def test_fused_quant_linear_rms_norm_forward():
    k = 256
    members = [(n, torch.from_numpy(random_blocks(T.Q4_K, 16, k)), T.Q4_K) for n in ("gate", "up")]
    f = ggfuse.FusedQuantLinear(members)
    x = randn(3, k)
    w = torch.rand(k) + 0.5
    y = ggfuse.rms_norm_mat_vec(x, w, 1e-6, f)
    h = oracle.rms_norm_ref(x.numpy(), w.numpy(), 1e-6)
    assert rel_err(y, float_mat_vec([(m[1].numpy(), m[2]) for m in members], h)) < FLOAT_TOL
    assert torch.equal(y, f.forward_q8(ggfuse.rms_norm_mul_q8_1(x, w, 1e-6)))


@pytest.mark.parametrize("fallback_type", [T.F16, T.Q4_1], ids=lambda t: t.name)
def test_fused_quant_linear_fallback_member(fallback_type):
    """A member of a type without a Q8_1 kernel is computed by a float matmul, in member order."""
    from gguf import quants
    k = 256
    gen = oracle.rng()
    if fallback_type == T.Q4_1:
        w_fb = quants.quantize(gen.standard_normal((6, k)).astype(np.float32), T.Q4_1)
    else:
        w_fb = random_blocks(fallback_type, 6, k)
    members = [("q", torch.from_numpy(random_blocks(T.Q4_K, 8, k)), T.Q4_K),
               ("k", torch.from_numpy(w_fb), fallback_type),
               ("v", torch.from_numpy(random_blocks(T.Q6_K, 4, k)), T.Q6_K)]
    f = ggfuse.FusedQuantLinear(members)
    assert list(f.fallbacks) == ["k"] and fallback_type.name in f.fallbacks["k"]
    x = randn(2, k)
    segments = [(m[1].numpy(), m[2]) for m in members]
    W = np.concatenate([oracle.dequantize_weight(w, t) if t != T.Q4_1 else
                        quants.dequantize(w, t).astype(np.float64) for w, t in segments])
    ref = x.double().numpy() @ W.T
    assert rel_err(f(x), ref) < FLOAT_TOL
    q, kk, v = f.split(f(x))
    assert q.shape == (2, 8) and kk.shape == (2, 6) and v.shape == (2, 4)


def test_fused_quant_linear_rejects_bad_members():
    w = torch.from_numpy(random_blocks(T.Q4_K, 4, 256))
    with pytest.raises(ValueError, match="at least one"):
        ggfuse.FusedQuantLinear([])
    with pytest.raises(ValueError, match="same input features"):
        ggfuse.FusedQuantLinear([("a", w, T.Q4_K), ("b", torch.from_numpy(random_blocks(T.Q4_K, 4, 512)), T.Q4_K)])
    with pytest.raises(TypeError, match="uint8"):
        ggfuse.FusedQuantLinear([("a", w.float(), T.Q4_K)])
    with pytest.raises(ValueError, match="whole 144-byte blocks"):
        ggfuse.FusedQuantLinear([("a", w[:, :100], T.Q4_K)])
    with pytest.raises(ValueError, match="unique"):
        ggfuse.FusedQuantLinear([("a", w, T.Q4_K), ("a", w, T.Q4_K)])
    f = ggfuse.FusedQuantLinear([("a", w, T.Q4_K)])
    with pytest.raises(ValueError, match="last dimension 256"):
        f(torch.randn(2, 128))


# ---------------------------------------------------------------- errors

def test_errors_are_clear():
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ggfuse.quantize_q8_1(x.double())
    with pytest.raises(ValueError, match="multiple of 32"):
        ggfuse.quantize_q8_1(torch.randn(2, 48))
    with pytest.raises(ValueError, match="contiguous"):
        ggfuse.quantize_q8_1(torch.randn(64, 2).t())
    with pytest.raises(ValueError, match="weight must be 1-D with K = 64"):
        ggfuse.rms_norm_mul_q8_1(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        ggfuse.rms_norm_mul_q8_1(x, torch.ones(64), float("nan"))
    with pytest.raises(TypeError, match="weight must be float32"):
        ggfuse.rms_norm_mul_q8_1(x, torch.ones(64, dtype=torch.int32), 1e-6)
    # dequantize
    with pytest.raises(NotImplementedError, match="Q4_1"):
        ggfuse.dequantize(torch.zeros(2, 20, dtype=torch.uint8), T.Q4_1)
    with pytest.raises(ValueError, match="unknown GGML type id 99"):
        ggfuse.dequantize(torch.zeros(2, 20, dtype=torch.uint8), 99)
    with pytest.raises(NotImplementedError, match="unknown GGML type .GGML type 99"):
        torch.ops.ggfuse.dequantize(torch.zeros(2, 20, dtype=torch.uint8), 99)
    with pytest.raises(ValueError, match="whole blocks of 18 bytes"):
        ggfuse.dequantize(torch.zeros(2, 20, dtype=torch.uint8), T.Q4_0)
    with pytest.raises(TypeError, match="uint8"):
        ggfuse.dequantize(torch.zeros(2, 18), T.Q4_0)
    # quantize
    with pytest.raises(NotImplementedError, match="Q5_K"):
        ggfuse.quantize(torch.randn(2, 256), T.Q5_K)
    with pytest.raises(ValueError, match="multiple of 256"):
        ggfuse.quantize(torch.randn(2, 128), T.Q4_K)
    with pytest.raises(TypeError, match="float32"):
        ggfuse.quantize(torch.randn(2, 256, dtype=torch.float16), T.Q4_K)
    # mat-vec
    buf = torch.from_numpy(random_blocks(T.Q4_K, 4, 256).reshape(-1))
    xq = ggfuse.quantize_q8_1(torch.randn(2, 256))
    with pytest.raises(ValueError, match="runs past the end"):
        ggfuse.mat_vec_q8_1(xq, buf, [T.Q4_K], [5], [0])
    with pytest.raises(ValueError, match="not a multiple of 16"):
        ggfuse.mat_vec_q8_1(xq, torch.cat([buf, buf]), [T.Q4_K], [4], [8])
    with pytest.raises(NotImplementedError, match="Q2_K"):
        ggfuse.mat_vec_q8_1(xq, buf, [T.Q2_K], [4], [0])
    with pytest.raises(ValueError, match="equal length"):
        ggfuse.mat_vec_q8_1(xq, buf, [T.Q4_K], [4], [0, 0])
    with pytest.raises(ValueError, match="multiple of 256"):
        ggfuse.mat_vec_q8_1(ggfuse.quantize_q8_1(torch.randn(2, 96)), buf, [T.Q4_K], [1], [0])
    with pytest.raises(ValueError, match="2-D"):
        ggfuse.mat_vec_q8_1(xq[0], buf, [T.Q4_K], [4], [0])
    with pytest.raises(ValueError, match="aligned"):
        ggfuse.mat_vec_q8_1(xq, torch.cat([buf, buf])[1:], [T.Q4_K], [4], [0])
    with pytest.raises(ValueError, match="36-byte"):
        ggfuse.mat_vec_q8_1(xq[:, :40].contiguous(), buf, [T.Q4_K], [4], [0])


# ---------------------------------------------------------------- torch.library / torch.compile

def _opcheck_cases():
    x = randn(3, 256)
    w = torch.rand(256) + 0.5
    _, buf, qtypes, rows, offsets = make_fused([(T.Q4_K, 8), (T.Q6_K, 5), (T.Q4_0, 3)], 256)
    xq = ggfuse.quantize_q8_1(x)
    return [
        ("quantize_q8_1", (x,)),
        ("quantize_q8_1", (x.half(),)),
        ("rms_norm_mul_q8_1", (x, w, 1e-6)),
        ("rms_norm_mul_q8_1_float", (x.bfloat16(), w, 1e-6)),
        ("dequantize", (torch.from_numpy(random_blocks(T.Q6_K, 4, 256)), int(T.Q6_K))),
        ("quantize", (x, int(T.Q4_K))),
        ("mat_vec_q8_1", (xq, buf, [int(t) for t in qtypes], rows, offsets)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.ggfuse, name).default, args)


def test_torch_compile_fullgraph_matches_eager():
    k = 256
    members = [(n, torch.from_numpy(random_blocks(t, r, k)), t)
               for n, t, r in (("q", T.Q4_K, 16), ("k", T.Q4_K, 8), ("v", T.Q6_K, 8))]
    f = ggfuse.FusedQuantLinear(members)
    norm_w = torch.rand(k) + 0.5

    def decode_step(x):
        return f.split(f.forward_q8(ggfuse.rms_norm_mul_q8_1(x, norm_w, 1e-6)))

    compiled = torch.compile(decode_step, fullgraph=True)
    for batch in (1, 4):
        x = randn(batch, k)
        for a, b in zip(compiled(x), decode_step(x)):
            assert torch.equal(a, b)
