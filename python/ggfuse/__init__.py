"""ggfuse: llama.cpp's quantized GGUF weights as fused, fast PyTorch custom ops.

`import ggfuse` registers `torch.ops.ggfuse.*` (CPU, and CUDA when built with it) with fake
implementations for torch.compile.
"""
from __future__ import annotations

from . import _library

_library.load()

from .formats import MAT_VEC_TYPES, QUANTIZE_TYPES, DEQUANTIZE_TYPES  # noqa: E402
from .ops import dequantize, mat_vec_q8_1, quantize, quantize_q8_1, rms_norm_mul_q8_1  # noqa: E402
from .fused import FusedQuantLinear, rms_norm_mat_vec  # noqa: E402

has_cuda_kernels = _library.has_cuda_kernels

__version__ = "0.1.0"
__all__ = [
    "FusedQuantLinear",
    "dequantize",
    "has_cuda_kernels",
    "mat_vec_q8_1",
    "quantize",
    "quantize_q8_1",
    "rms_norm_mul_q8_1",
    "rms_norm_mat_vec",
    "MAT_VEC_TYPES",
    "QUANTIZE_TYPES",
    "DEQUANTIZE_TYPES",
]

from .loader import (  # noqa: E402
    FusedGroup, FusionReportRow, GGUFError, GGUFModel, HParams, QuantizedTensor, load_gguf)

__all__ += ["FusedGroup", "FusionReportRow", "GGUFError", "GGUFModel", "HParams", "QuantizedTensor",
            "load_gguf"]
