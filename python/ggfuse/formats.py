"""GGML type facts the Python side needs, taken from gguf-py rather than restated."""
from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q8_1_BLOCK_BYTES = 36
Q8_1_BLOCK_VALUES = 32

# Weight types the fused Q8_1 mat-vec computes directly (SPEC §2).
MAT_VEC_TYPES = frozenset(
    {
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)
# Types `ggfuse.dequantize` reads (plus the float pass-through types).
DEQUANTIZE_TYPES = MAT_VEC_TYPES | {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_1,
}
# Types `ggfuse.quantize` writes.
QUANTIZE_TYPES = frozenset(
    {
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q6_K,
    }
)


def as_qtype(qtype) -> GGMLQuantizationType:
    """An int or GGMLQuantizationType (or its name, e.g. "Q4_K") as a GGMLQuantizationType."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type name {qtype!r}") from None
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML type id {qtype!r}") from None


def block_values(qtype) -> int:
    return GGML_QUANT_SIZES[as_qtype(qtype)][0]


def row_bytes(qtype, k: int) -> int:
    """Bytes of one GGUF row of k values; ValueError when k is not whole blocks."""
    qt = as_qtype(qtype)
    values, nbytes = GGML_QUANT_SIZES[qt]
    if k <= 0 or k % values:
        raise ValueError(f"{qt.name} rows hold a multiple of {values} values, got K = {k}")
    return k // values * nbytes


def values_per_row(qtype, nbytes: int) -> int:
    """K of a GGUF row of `nbytes` bytes; ValueError when it is not whole blocks."""
    qt = as_qtype(qtype)
    values, block = GGML_QUANT_SIZES[qt]
    if nbytes <= 0 or nbytes % block:
        raise ValueError(f"{qt.name} rows are whole {block}-byte blocks, got {nbytes} bytes")
    return nbytes // block * values
