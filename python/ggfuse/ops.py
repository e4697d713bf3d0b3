"""Python entry points of the ggfuse ops, and their fake (meta) implementations for torch.compile.

Each function here is a thin call of `torch.ops.ggfuse.<name>`; inputs are validated in C++ (the same
checks for CPU and CUDA) and the GGML type may be given as an int, a `gguf.GGMLQuantizationType` or
its name.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, quants

from .formats import DEQUANTIZE_TYPES, Q8_1_BLOCK_BYTES, Q8_1_BLOCK_VALUES, as_qtype

_ops = torch.ops.ggfuse


def quantize_q8_1(x: torch.Tensor) -> torch.Tensor:
    """Q8_1 blocks of float x [..., K] (K a multiple of 32) as uint8 [..., K/32*36]."""
    return _ops.quantize_q8_1(x)


def rms_norm_mul_q8_1(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                      return_float: bool = False):
    """Q8_1 of `rms_norm(x) * weight`, computed in fp32 in one pass over x.

    With `return_float=True` returns `(q8_1, y)` where y is the normalized float output (x's dtype)
    from the same pass, for consumers that need floats.
    """
    if return_float:
        return _ops.rms_norm_mul_q8_1_float(x, weight, float(eps))
    return _ops.rms_norm_mul_q8_1(x, weight, float(eps))


def dequantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """GGUF bytes uint8 [..., row_bytes] of `qtype` to float32 [..., K]."""
    return _ops.dequantize(w, int(as_qtype(qtype)))


def dequantize_any(rows, qtype) -> torch.Tensor:
    """GGUF rows of any type gguf-py reads -> float32 [..., K], on the rows' device.

    `rows` is a uint8 tensor or numpy array of GGUF bytes, or the float array gguf-py's reader gives for
    F32/F16 tensors. ggfuse's kernel does the types it has (`dequantize`); the others (Q4_1, Q2_K,
    IQ*, ...) go through gguf-py's reference dequantizer on the CPU: a load-time path, never a hot one.
    """
    qt = as_qtype(qtype)
    if isinstance(rows, np.ndarray):
        rows = torch.from_numpy(np.ascontiguousarray(rows).view(np.uint8))
    if qt in DEQUANTIZE_TYPES:
        return dequantize(rows.contiguous(), qt)
    out = quants.dequantize(rows.cpu().numpy(), qt).astype(np.float32, copy=False)
    return torch.from_numpy(out).to(rows.device)


def quantize(x: torch.Tensor, qtype) -> torch.Tensor:
    """float32 [..., K] to GGUF bytes of `qtype` (Q4_0, Q8_0, Q4_K, Q6_K), uint8 [..., row_bytes]."""
    return _ops.quantize(x, int(as_qtype(qtype)))


def mat_vec_q8_1(x_q8: torch.Tensor, weight: torch.Tensor, qtypes: Sequence, rows: Sequence[int],
                 offsets: Sequence[int]) -> torch.Tensor:
    """Q8_1 activations [B, K/32*36] times a fused weight -> float32 [B, sum(rows)].

    `weight` is a 1-D uint8 buffer holding consecutive segments: segment i is `rows[i]` GGUF rows of
    `qtypes[i]` starting at byte `offsets[i]` (a multiple of 16).
    """
    return _ops.mat_vec_q8_1(x_q8, weight, [int(as_qtype(t)) for t in qtypes],
                             [int(r) for r in rows], [int(o) for o in offsets])


def rms_norm_mat_vec_q8_1(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          qtypes: Sequence, rows: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """`mat_vec_q8_1(rms_norm_mul_q8_1(x, norm_weight, eps), weight, ...)` as one op: x [..., K] ->
    float32 [..., sum(rows)], one dispatch instead of two. On CUDA the norm kernel and the mat-vec are
    chained by programmatic dependent launch; with GGFUSE_FUSED_NORM=1, up to 8 rows run as a single
    kernel that normalizes x in every thread block (measured slower today: docs/PERFORMANCE.md)."""
    return _ops.rms_norm_mat_vec_q8_1(x, norm_weight, float(eps), weight,
                                      [int(as_qtype(t)) for t in qtypes], [int(r) for r in rows],
                                      [int(o) for o in offsets])


# ---- fake implementations: output shapes and dtypes only, for torch.compile and meta tensors ----

@torch.library.register_fake("ggfuse::quantize_q8_1")
def _quantize_q8_1_fake(x):
    k = x.shape[-1]
    torch._check(k % Q8_1_BLOCK_VALUES == 0, lambda: "K must be a multiple of 32")
    return x.new_empty((*x.shape[:-1], k // Q8_1_BLOCK_VALUES * Q8_1_BLOCK_BYTES), dtype=torch.uint8)


@torch.library.register_fake("ggfuse::rms_norm_mul_q8_1")
def _rms_norm_mul_q8_1_fake(x, weight, eps):
    return _quantize_q8_1_fake(x)


@torch.library.register_fake("ggfuse::rms_norm_mul_q8_1_float")
def _rms_norm_mul_q8_1_float_fake(x, weight, eps):
    return _quantize_q8_1_fake(x), torch.empty_like(x)


@torch.library.register_fake("ggfuse::dequantize")
def _dequantize_fake(w, qtype):
    values, nbytes = GGML_QUANT_SIZES[as_qtype(qtype)]
    return w.new_empty((*w.shape[:-1], w.shape[-1] // nbytes * values), dtype=torch.float32)


@torch.library.register_fake("ggfuse::quantize")
def _quantize_fake(x, qtype):
    values, nbytes = GGML_QUANT_SIZES[as_qtype(qtype)]
    return x.new_empty((*x.shape[:-1], x.shape[-1] // values * nbytes), dtype=torch.uint8)


@torch.library.register_fake("ggfuse::mat_vec_q8_1")
def _mat_vec_q8_1_fake(x_q8, weight, qtypes, rows, offsets):
    return x_q8.new_empty((x_q8.shape[0], sum(rows)), dtype=torch.float32)


@torch.library.register_fake("ggfuse::rms_norm_mat_vec_q8_1")
def _rms_norm_mat_vec_q8_1_fake(x, norm_weight, eps, weight, qtypes, rows, offsets):
    return x.new_empty((*x.shape[:-1], sum(rows)), dtype=torch.float32)


@torch.library.register_fake("ggfuse::_read_probe")
def _read_probe_fake(buf):
    return buf.new_empty((1,), dtype=torch.int64)


__all__ = ["quantize_q8_1", "rms_norm_mul_q8_1", "dequantize", "quantize", "mat_vec_q8_1",
           "rms_norm_mat_vec_q8_1"]
