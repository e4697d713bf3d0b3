"""Synthetic GGUF model files, written with gguf-py's `GGUFWriter`.

- `write_gguf`: any architecture, from metadata and tensor sources; tensors are produced and
  written one at a time, so files larger than memory can be written.
- `write_llama_model`: a llama-architecture model laid out the way llama.cpp's quantizer writes a
  Q4_K_M file (Q6_K `attn_v` / `ffn_down` on the layers llama.cpp gives more bits), used by
  `python -m ggfuse demo` and the load benchmark.

Weights are quantized with `ggfuse.quantize` (Q4_0/Q8_0/Q4_K/Q6_K) or gguf-py's quantizer, so the
bytes are real GGUF blocks that any GGUF reader decodes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    quants,
)

from . import ops
from .formats import QUANTIZE_TYPES

T = GGMLQuantizationType

__all__ = ["LlamaConfig", "TensorSource", "llama_tensor_types", "quantize_rows", "write_gguf",
           "write_llama_model"]


@dataclass(frozen=True)
class TensorSource:
    """One tensor to write: `make()` returns its data, produced only when it is written.

    `shape` is the logical torch-order shape (rows last-but-one, K last); `make()` returns float32
    values (F32), float16 (F16), or uint8 GGUF bytes `[..., row_bytes]` for every other type."""
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        values, block = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // values * block


def quantize_rows(x: np.ndarray | torch.Tensor, qtype) -> np.ndarray:
    """float32 values [..., K] as GGUF data of qtype: float32/float16 arrays for F32/F16, uint8
    bytes [..., row_bytes] for the rest (ggfuse's quantizer where it has one, else gguf-py's)."""
    qtype = GGMLQuantizationType(qtype)
    xt = torch.as_tensor(x, dtype=torch.float32)
    if qtype == T.F32:
        return xt.numpy().copy()
    if qtype == T.F16:
        return xt.numpy().astype(np.float16)
    if qtype in QUANTIZE_TYPES:
        return ops.quantize(xt.contiguous(), qtype).numpy()
    return quants.quantize(xt.numpy(), qtype)


def _add_metadata(writer: GGUFWriter, key: str, value) -> None:
    # Integers go in as uint32 (int32 when negative), the types llama.cpp's converters write.
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            sub = GGUFValueType.UINT32 if min(items) >= 0 else GGUFValueType.INT32
            writer.add_key_value(key, [int(v) for v in items], GGUFValueType.ARRAY, sub_type=sub)
        else:
            writer.add_array(key, items)
    else:
        raise TypeError(f"metadata {key!r}: unsupported value {value!r}")


def write_gguf(path: str | os.PathLike, arch: str, metadata: Mapping[str, object],
               tensors: Sequence[TensorSource], *, on_tensor: Callable[[TensorSource], None] | None = None) -> Path:
    """Write a GGUF file: `general.architecture = arch`, the given metadata (keys may use `{arch}`),
    and the tensors in order. Tensors are made and written one at a time."""
    path = Path(path)
    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        _add_metadata(writer, key.format(arch=arch), value)
    for src in tensors:
        values, block = GGML_QUANT_SIZES[src.qtype]
        if src.qtype in (T.F32, T.F16):
            dtype, shape = (np.float32 if src.qtype == T.F32 else np.float16), src.shape
            writer.add_tensor_info(src.name, shape, np.dtype(dtype), src.nbytes)
        else:
            byte_shape = (*src.shape[:-1], src.shape[-1] // values * block)
            writer.add_tensor_info(src.name, byte_shape, np.dtype(np.uint8), src.nbytes, raw_dtype=src.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for src in tensors:
        data = np.ascontiguousarray(src.make())
        if data.nbytes != src.nbytes:
            raise ValueError(f"{src.name}: made {data.nbytes} bytes, expected {src.nbytes} for "
                             f"{src.qtype.name} {src.shape}")
        writer.write_tensor_data(data)
        if on_tensor is not None:
            on_tensor(src)
    writer.close()
    return path


# ---------------------------------------------------------------- llama, Q4_K_M layout

@dataclass(frozen=True)
class LlamaConfig:
    n_embd: int = 512
    n_layer: int = 4
    n_head: int = 8
    n_head_kv: int = 4
    head_dim: int = 64
    n_ff: int = 1536
    n_vocab: int = 256
    rms_eps: float = 1e-5


def _use_more_bits(layer: int, n_layer: int) -> bool:
    # llama.cpp's Q4_K_M rule for which layers get Q6_K attn_v / ffn_down: the first and last
    # eighth of the layers, and every third layer in between.
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def llama_tensor_types(cfg: LlamaConfig, layer: int) -> dict[MODEL_TENSOR, GGMLQuantizationType]:
    """Per-layer tensor types of a Q4_K_M llama file (what llama.cpp's quantizer picks)."""
    more = T.Q6_K if _use_more_bits(layer, cfg.n_layer) else T.Q4_K
    return {MODEL_TENSOR.ATTN_Q: T.Q4_K, MODEL_TENSOR.ATTN_K: T.Q4_K, MODEL_TENSOR.ATTN_V: more,
            MODEL_TENSOR.ATTN_OUT: T.Q4_K, MODEL_TENSOR.FFN_GATE: T.Q4_K, MODEL_TENSOR.FFN_UP: T.Q4_K,
            MODEL_TENSOR.FFN_DOWN: more}


def write_llama_model(path: str | os.PathLike, cfg: LlamaConfig = LlamaConfig(), *, seed: int = 0,
                      distinct_rows: int | None = None,
                      on_tensor: Callable[[TensorSource], None] | None = None) -> Path:
    """A deterministic llama model with Q4_K_M-style mixed types.

    With `distinct_rows=None` every weight is its own quantized random matrix. For multi-GB files
    (the load benchmark) `distinct_rows=R` quantizes R random rows per tensor shape and type and
    builds each tensor from a seeded random choice of them: valid GGUF blocks, written at disk speed."""
    if cfg.n_embd % 256 or cfg.n_ff % 256:
        raise ValueError("Q4_K/Q6_K rows need n_embd and n_ff to be multiples of 256")
    row_pool: dict[tuple, np.ndarray] = {}

    def weight(name: str, qtype, rows: int, k: int, tag: int) -> TensorSource:
        def make() -> np.ndarray:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + tag)
            if distinct_rows is None:
                return quantize_rows(torch.randn(rows, k, generator=gen) * k ** -0.5, qtype)
            key = (qtype, k)
            if key not in row_pool:
                pool_gen = torch.Generator().manual_seed(seed * 7919 + k + int(qtype))
                row_pool[key] = quantize_rows(torch.randn(distinct_rows, k, generator=pool_gen) * k ** -0.5, qtype)
            pick = torch.randint(0, distinct_rows, (rows,), generator=gen).numpy()
            return row_pool[key][pick]
        return TensorSource(name, GGMLQuantizationType(qtype), (rows, k), make)

    def norm(name: str, tag: int) -> TensorSource:
        def make() -> np.ndarray:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + tag)
            return (1.0 + 0.1 * torch.randn(cfg.n_embd, generator=gen)).numpy()
        return TensorSource(name, T.F32, (cfg.n_embd,), make)

    def tname(kind: MODEL_TENSOR, layer: int | None = None) -> str:
        base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
        return base + ".weight"

    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    tensors = [weight(tname(MODEL_TENSOR.TOKEN_EMBD), T.Q4_K, cfg.n_vocab, cfg.n_embd, 1)]
    for i in range(cfg.n_layer):
        types = llama_tensor_types(cfg, i)
        tag = 100 * (i + 1)
        tensors += [
            norm(tname(MODEL_TENSOR.ATTN_NORM, i), tag + 1),
            weight(tname(MODEL_TENSOR.ATTN_Q, i), types[MODEL_TENSOR.ATTN_Q], q_rows, cfg.n_embd, tag + 2),
            weight(tname(MODEL_TENSOR.ATTN_K, i), types[MODEL_TENSOR.ATTN_K], kv_rows, cfg.n_embd, tag + 3),
            weight(tname(MODEL_TENSOR.ATTN_V, i), types[MODEL_TENSOR.ATTN_V], kv_rows, cfg.n_embd, tag + 4),
            weight(tname(MODEL_TENSOR.ATTN_OUT, i), types[MODEL_TENSOR.ATTN_OUT], cfg.n_embd, q_rows, tag + 5),
            norm(tname(MODEL_TENSOR.FFN_NORM, i), tag + 6),
            weight(tname(MODEL_TENSOR.FFN_GATE, i), types[MODEL_TENSOR.FFN_GATE], cfg.n_ff, cfg.n_embd, tag + 7),
            weight(tname(MODEL_TENSOR.FFN_UP, i), types[MODEL_TENSOR.FFN_UP], cfg.n_ff, cfg.n_embd, tag + 8),
            weight(tname(MODEL_TENSOR.FFN_DOWN, i), types[MODEL_TENSOR.FFN_DOWN], cfg.n_embd, cfg.n_ff, tag + 9),
        ]
    tensors += [norm(tname(MODEL_TENSOR.OUTPUT_NORM), 2),
                weight(tname(MODEL_TENSOR.OUTPUT), T.Q6_K, cfg.n_vocab, cfg.n_embd, 3)]
    metadata = {
        Keys.General.NAME: "ggfuse synthetic llama (Q4_K_M layout)",
        Keys.General.FILE_TYPE: 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        Keys.LLM.CONTEXT_LENGTH: 4096,
        Keys.LLM.EMBEDDING_LENGTH: cfg.n_embd,
        Keys.LLM.BLOCK_COUNT: cfg.n_layer,
        Keys.LLM.FEED_FORWARD_LENGTH: cfg.n_ff,
        Keys.Attention.HEAD_COUNT: cfg.n_head,
        Keys.Attention.HEAD_COUNT_KV: cfg.n_head_kv,
        Keys.Attention.KEY_LENGTH: cfg.head_dim,
        Keys.Attention.VALUE_LENGTH: cfg.head_dim,
        Keys.Attention.LAYERNORM_RMS_EPS: cfg.rms_eps,
        Keys.Rope.DIMENSION_COUNT: cfg.head_dim,
        Keys.Rope.FREQ_BASE: 10000.0,
        Keys.LLM.VOCAB_SIZE: cfg.n_vocab,
    }
    return write_gguf(path, "llama", metadata, tensors, on_tensor=on_tensor)

