"""ggfuse::_read_probe, the benchmark's read-bandwidth probe (csrc/cuda/read_probe.cu): the XOR of a
buffer's little-endian 32-bit words, against numpy on the CPU and against the CPU op on CUDA.

The CUDA tests skip without a CUDA device or CUDA kernels, unless GGFUSE_REQUIRE_CUDA=1, where they
run and fail instead. Every test draws fresh random bytes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ggfuse

REQUIRE_CUDA = os.environ.get("GGFUSE_REQUIRE_CUDA") == "1"
HAVE_CUDA = torch.cuda.is_available() and ggfuse.has_cuda_kernels()
needs_cuda = pytest.mark.skipif(
    not HAVE_CUDA and not REQUIRE_CUDA,
    reason="no CUDA device, or ggfuse built without CUDA kernels (set GGFUSE_REQUIRE_CUDA=1 to fail instead)")

probe = torch.ops.ggfuse._read_probe

# Byte counts: empty, single words, every tail length of a 16-byte load (n % 16 = 4, 8, 12), around the
# kernel's 16 KiB per-block chunk, and sizes that leave a partial chunk behind whole ones.
SIZES = [0, 4, 8, 12, 16, 20, 52, 1020, 4096, 16384 - 4, 16384, 16384 + 12, 32768 + 8, 7 * 16384 + 20,
         (1 << 20) + 36]


def random_bytes(n: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, size=n, dtype=np.uint8)


def xor_words(b: np.ndarray) -> int:
    """The reference: XOR of the bytes read as little-endian uint32 words."""
    return int(np.bitwise_xor.reduce(b.view("<u4"), initial=np.uint32(0)))


def as_tensor(b: np.ndarray, device="cpu") -> torch.Tensor:
    return torch.from_numpy(b.copy()).to(device)


# ---------------------------------------------------------------- CPU

@pytest.mark.parametrize("n", SIZES)
def test_cpu_matches_numpy(n):
    b = random_bytes(n)
    out = probe(as_tensor(b))
    assert out.dtype == torch.int64 and out.shape == (1,) and out.device.type == "cpu"
    assert out.item() == xor_words(b)
    assert 0 <= out.item() < 2 ** 32


def test_cpu_high_bits_and_value_range():
    # A single word with every bit set: the result is 2^32 - 1, not -1.
    assert probe(torch.full((4,), 255, dtype=torch.uint8)).item() == 2 ** 32 - 1
    # Equal words cancel; one byte lands in its little-endian place.
    b = np.zeros(32, dtype=np.uint8)
    b[6] = 0xAB
    assert probe(as_tensor(b)).item() == 0xAB << 16


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_cpu_other_integer_dtypes_and_shapes(dtype):
    b = random_bytes(6 * 64)
    t = torch.from_numpy(b.copy()).view(dtype).reshape(6, -1)
    assert probe(t).item() == xor_words(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool])
def test_rejects_non_integer_dtype(dtype):
    with pytest.raises(TypeError, match="integer tensor"):
        probe(torch.zeros(16, dtype=dtype))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 33])
def test_rejects_size_not_multiple_of_4(n):
    with pytest.raises(ValueError, match="multiple of 4"):
        probe(torch.zeros(n, dtype=torch.uint8))


def test_rejects_non_contiguous():
    t = torch.zeros(8, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        probe(t.t())


def test_rejects_misaligned_start():
    t = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="16-byte aligned"):
        probe(t[4:])
    probe(t[16:])  # an aligned view is fine


def test_fake_impl():
    out = probe(torch.empty(64, dtype=torch.uint8, device="meta"))
    assert out.shape == (1,) and out.dtype == torch.int64 and out.device.type == "meta"


# ---------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("n", SIZES + [(64 << 20) + 52])
def test_cuda_matches_cpu(poison_outputs, n):
    b = random_bytes(n)
    t = as_tensor(b)
    out = probe(t.cuda())
    assert out.dtype == torch.int64 and out.shape == (1,) and out.device.type == "cuda"
    expected = probe(t).item()
    assert out.item() == expected
    if n <= (1 << 20) + 36:
        assert expected == xor_words(b)


@needs_cuda
def test_cuda_every_word_counts():
    # Flipping any one bit anywhere (here: in the bulk, in the last whole chunk, in the tail) changes
    # the result by exactly that bit.
    n = 5 * 16384 + 12
    t = as_tensor(random_bytes(n)).cuda()
    base = probe(t).item()
    for pos in (0, 4097, n - 20, n - 5, n - 1):
        u = t.clone()
        u[pos] ^= 0x10
        assert probe(u).item() == base ^ (0x10 << (8 * (pos % 4))), pos


@needs_cuda
def test_cuda_errors_match_cpu():
    with pytest.raises(TypeError, match="integer tensor"):
        probe(torch.zeros(16, dtype=torch.float32, device="cuda"))
    with pytest.raises(ValueError, match="multiple of 4"):
        probe(torch.zeros(18, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match="16-byte aligned"):
        probe(torch.zeros(64, dtype=torch.uint8, device="cuda")[8:])


@needs_cuda
def test_cuda_graph_capture():
    b = random_bytes((1 << 20) + 12)
    t = as_tensor(b).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        probe(t)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = probe(t)
    g.replay()
    torch.cuda.synchronize()
    assert out.item() == xor_words(b)
    t.copy_(torch.from_numpy(b[::-1].copy()))  # new contents, same buffer: replay reads them
    g.replay()
    torch.cuda.synchronize()
    assert out.item() == xor_words(b[::-1].copy())
