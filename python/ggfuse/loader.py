"""`load_gguf`: a GGUF model file as fused projection groups on a device (SPEC §4).

What happens on a load, in order:

1. The header is walked once here with bounds checks on every length and count (`_check_layout`)
   before gguf-py sees the file: gguf-py's `GGUFReader` trusts counts, so an absurd array length
   would make it loop for ever and a bad tensor offset would only fail much later.
2. `GGUFReader(path, "c")` maps the file (copy-on-write, so numpy views are writable and torch takes
   them without warnings or copies); every tensor is a zero-copy view of that map.
3. The hyperparameters are read from the metadata (`HParams`) and every layer is planned
   (`_Planner`): which projections read the output of which norm. The plan follows the consumer,
   not the names: the architecture's rules (`_ARCH_RULES`) say which norm feeds what, the metadata
   says what each layer is (attention, Gated DeltaNet, MoE), and every member's shape is checked
   against the metadata so that a file that disagrees fails with the tensor named.
4. Each group's members are copied into one fused `FusedQuantLinear` buffer on the device, streamed
   from the file through bounded host buffers (`_ChunkedFileCopier`).

The model never reads the whole file into memory; tensors outside the groups (embeddings, output
projections, experts) stay in the map and are returned by `GGUFModel.tensor` without a copy.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    Keys,
    quants,
)

from . import ops
from .formats import DEQUANTIZE_TYPES, MAT_VEC_TYPES, Q8_1_BLOCK_VALUES
from .fused import FusedQuantLinear

__all__ = [
    "FusedGroup",
    "FusionReportRow",
    "GGUFError",
    "GGUFModel",
    "HParams",
    "QuantizedTensor",
    "load_gguf",
]

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_CHUNK_BYTES = 8 << 20       # bytes per read / per host-to-device copy
DEFAULT_STAGING_SLOTS = 8           # pinned chunks in the GPU upload ring: 64 MiB of host memory
DEFAULT_READ_THREADS = 8            # concurrent file reads
PROGRESS_MIN_BYTES = 512 << 20      # show a progress bar (when not asked) from this much upload on
DEFAULT_FULL_ATTENTION_INTERVAL = 4  # llama.cpp's default for qwen3next / qwen35 / qwen35moe

# Header walk limits. The minimum sizes bound the counts by the file size before any loop runs.
_KV_MIN_BYTES = 8 + 4 + 1           # key length, value type, a one-byte value (an empty key is legal)
_TENSOR_INFO_MIN_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset
_MAX_KEY_BYTES = 1 << 16
_MAX_TENSOR_NAME_BYTES = 1 << 10    # ggml allows 63; longer names are kept legal but bounded
_MAX_TENSOR_DIMS = 4                # GGML_MAX_DIMS
_MAX_TENSOR_ELEMENTS = 1 << 52      # far beyond any model, small enough to keep byte sizes exact
_SCALAR_VALUE_BYTES = {t: np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()}


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded: malformed, truncated, or inconsistent with its metadata.

    `path` is the file and `tensor` the tensor at fault (None when it is not about one tensor).
    """

    def __init__(self, path, message: str, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        self.reason = message
        where = f"{self.path}: tensor {tensor!r}: " if tensor else f"{self.path}: "
        super().__init__(where + message)


# ------------------------------------------------------------------------------------------------
# 1. Header walk (bounds only; gguf-py decodes the values afterwards)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorSpan:
    """Where one tensor's data lies in the file."""
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]       # GGUF order: ne[0] is the innermost (input-feature) dimension
    offset: int               # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class _FileLayout:
    version: int
    file_size: int
    alignment: int
    data_offset: int
    tensors: dict[str, _TensorSpan]


class _HeaderCursor:
    """Reads the header of a mapped GGUF file, checking each read against the end of the file."""

    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, message: str, tensor: str | None = None):
        raise GGUFError(self.path, message, tensor)

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes but the file ends at "
                      f"byte {self.size}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str, max_bytes: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if max_bytes is not None and n > max_bytes:
            self.fail(f"{what} is {n} bytes long at byte {self.pos - 8} (at most {max_bytes} allowed): "
                      "corrupt header")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def skip_string(self, what: str) -> None:
        self.skip(self.u64(f"length of {what}"), what)

    def text(self, what: str, max_bytes: int) -> str:
        raw = self.string(what, max_bytes)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8: {raw[:40]!r}")


def _check_layout(path: str) -> _FileLayout:
    """Walk the header, bounding every count and length by the file size; GGUFError on anything bad."""
    size = os.stat(path).st_size
    if size == 0:
        raise GGUFError(path, "empty file (0 bytes): not a GGUF model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _HeaderCursor(path, buf, size)
        if size < 4 or bytes(buf[:4]) != struct.pack("<I", GGUF_MAGIC):
            raise GGUFError(path, f"not a GGUF file: starts with {bytes(buf[:4])!r}, expected b'GGUF'")
        cur.pos = 4
        version = cur.u32("the version")
        if version not in SUPPORTED_GGUF_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in SUPPORTED_GGUF_VERSIONS:
                cur.fail("big-endian GGUF file: only little-endian files are supported")
            cur.fail(f"unsupported GGUF version {version} (supported: "
                     f"{', '.join(map(str, SUPPORTED_GGUF_VERSIONS))})")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        if n_kv > cur.remaining() // _KV_MIN_BYTES:
            cur.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file: corrupt header")
        if n_tensors > cur.remaining() // _TENSOR_INFO_MIN_BYTES:
            cur.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file: corrupt header")

        alignment = GGUF_DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for i in range(n_kv):
            key = cur.text(f"key of metadata entry {i}", _MAX_KEY_BYTES)
            if key in keys:
                cur.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            vtype = cur.u32(f"type of metadata {key!r}")
            if key == Keys.General.ALIGNMENT:
                if vtype != GGUFValueType.UINT32:
                    cur.fail(f"{key} must be a uint32, got value type {vtype}")
                alignment = cur.u32(key)
                if alignment == 0 or alignment & (alignment - 1):
                    cur.fail(f"{key} = {alignment} is not a power of two")
                continue
            _skip_value(cur, vtype, f"metadata {key!r}")

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.text(f"name of tensor {i}", _MAX_TENSOR_NAME_BYTES)
            if name in names:
                cur.fail("tensor name appears twice", name)
            names.add(name)
            n_dims = cur.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= _MAX_TENSOR_DIMS:
                cur.fail(f"{n_dims} dimensions (1 to {_MAX_TENSOR_DIMS} allowed)", name)
            ne = tuple(cur.u64(f"dimension {d} of {name!r}") for d in range(n_dims))
            raw_type = cur.u32(f"type of {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                cur.fail(f"unknown GGML type id {raw_type}", name)
            if qtype not in GGML_QUANT_SIZES:
                cur.fail(f"GGML type {qtype.name} has no known block size", name)
            rel_offset = cur.u64(f"data offset of {name!r}")
            infos.append((name, ne, qtype, rel_offset))

        data_offset = -(-cur.pos // alignment) * alignment
        tensors: dict[str, _TensorSpan] = {}
        for name, ne, qtype, rel_offset in infos:
            n_elements = 1
            for d in ne:
                n_elements *= d
            if n_elements > _MAX_TENSOR_ELEMENTS:
                cur.fail(f"shape {list(ne)} has {n_elements} elements: corrupt header", name)
            block_values, block_bytes = GGML_QUANT_SIZES[qtype]
            if ne[0] % block_values:
                cur.fail(f"{qtype.name} rows hold whole blocks of {block_values} values, but ne[0] = "
                         f"{ne[0]}", name)
            nbytes = n_elements // block_values * block_bytes
            if rel_offset % alignment:
                cur.fail(f"data offset {rel_offset} is not a multiple of the alignment {alignment}", name)
            start = data_offset + rel_offset
            if start + nbytes > size:
                cur.fail(f"tensor data (bytes {start}..{start + nbytes}) runs past the end of the file "
                         f"({size} bytes): truncated or corrupt", name)
            tensors[name] = _TensorSpan(name, qtype, ne, start, nbytes)
        spans = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
        for prev, nxt in zip(spans, spans[1:]):
            if nxt.offset < prev.offset + prev.nbytes:
                cur.fail(f"tensor data overlaps that of {prev.name!r}", nxt.name)
    return _FileLayout(version, size, alignment, data_offset, tensors)


def _skip_value(cur: _HeaderCursor, vtype: int, what: str) -> None:
    if vtype == GGUFValueType.STRING:
        cur.skip_string(what)
        return
    if vtype in _SCALAR_VALUE_BYTES:
        cur.skip(_SCALAR_VALUE_BYTES[vtype], what)
        return
    if vtype != GGUFValueType.ARRAY:
        cur.fail(f"{what} has unknown value type {vtype}")
    item_type = cur.u32(f"item type of {what}")
    count = cur.u64(f"length of {what}")
    if item_type == GGUFValueType.STRING:
        # Each string costs at least its 8-byte length, which bounds the loop by the file size.
        if count > cur.remaining() // 8:
            cur.fail(f"{what} claims {count} strings, more than the file can hold: corrupt header")
        for i in range(count):
            cur.skip_string(f"item {i} of {what}")
    elif item_type in _SCALAR_VALUE_BYTES:
        item_bytes = _SCALAR_VALUE_BYTES[item_type]
        if count > cur.remaining() // item_bytes:
            cur.fail(f"{what} claims {count} items of {item_bytes} bytes, more than the file can hold: "
                     "corrupt header")
        cur.skip(count * item_bytes, what)
    else:
        cur.fail(f"{what} is an array of value type {item_type}, which GGUF does not allow")


def _open_reader(path: str, layout: _FileLayout) -> GGUFReader:
    try:
        reader = GGUFReader(path, "c")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError... for malformed files
        raise GGUFError(path, f"gguf-py could not read the file: {type(e).__name__}: {e}") from e
    if reader.data_offset != layout.data_offset or len(reader.tensors) != len(layout.tensors):
        raise GGUFError(path, "gguf-py and the header check disagree on the file layout")
    return reader


# ------------------------------------------------------------------------------------------------
# 2. Hyperparameters
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HParams:
    """The hyperparameters the fusion plan depends on, read from the file's metadata.

    Per-layer values are tuples of `n_layer` entries (GGUF stores them as a scalar or an array)."""
    arch: str
    n_embd: int
    n_layer: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_ff: tuple[int, ...] | None
    norm_kind: str                    # "rms" or "layer"
    norm_eps: float
    full_attention_interval: int | None = None   # hybrid archs only
    ssm_state_size: int | None = None            # Gated DeltaNet head dim of keys (and values)
    ssm_group_count: int | None = None           # key heads
    ssm_time_step_rank: int | None = None        # value heads
    ssm_inner_size: int | None = None            # value dim
    ssm_conv_kernel: int | None = None
    n_expert: int | None = None
    n_expert_used: int | None = None
    n_ff_exp: int | None = None
    n_ff_shexp: int | None = None

    def is_linear_attention(self, layer: int) -> bool:
        """Gated DeltaNet layer of a hybrid model: every layer but each `full_attention_interval`-th."""
        interval = self.full_attention_interval
        return interval is not None and (layer + 1) % interval != 0

    @property
    def ssm_key_dim(self) -> int:
        return self.ssm_state_size * self.ssm_group_count

    @property
    def ssm_value_dim(self) -> int:
        if self.ssm_inner_size is not None:
            return self.ssm_inner_size
        return self.ssm_state_size * self.ssm_time_step_rank


class _MetadataReader:
    """Typed access to `{arch}.*` metadata with errors that name the file and the key."""

    def __init__(self, path: str, reader: GGUFReader, arch: str):
        self.path, self.reader, self.arch = path, reader, arch

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def raw(self, template: str):
        f = self.reader.get_field(self.key(template))
        return None if f is None else f.contents()

    def _check_int(self, key: str, v, minimum: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GGUFError(self.path, f"metadata {key} must be an integer, got {v!r}")
        if v < minimum:
            raise GGUFError(self.path, f"metadata {key} = {v} (must be >= {minimum})")
        return int(v)

    def int(self, template: str, *, required: bool, minimum: int = 1, default=None):
        v = self.raw(template)
        if v is None:
            if required:
                raise GGUFError(self.path, f"required metadata {self.key(template)} is missing")
            return default
        if isinstance(v, list):
            raise GGUFError(self.path, f"metadata {self.key(template)} must be one integer, got an array")
        return self._check_int(self.key(template), v, minimum)

    def ints_per_layer(self, template: str, n_layer: int, *, required: bool, minimum: int = 0,
                       default=None) -> tuple[int, ...] | None:
        v = self.raw(template)
        key = self.key(template)
        if v is None:
            if required:
                raise GGUFError(self.path, f"required metadata {key} is missing")
            return None if default is None else (default,) * n_layer
        if isinstance(v, list):
            if len(v) != n_layer:
                raise GGUFError(self.path, f"metadata {key} has {len(v)} per-layer values for "
                                           f"{n_layer} layers")
            return tuple(self._check_int(key, x, minimum) for x in v)
        return (self._check_int(key, v, minimum),) * n_layer

    def float(self, template: str, *, required: bool):
        v = self.raw(template)
        key = self.key(template)
        if v is None:
            if required:
                raise GGUFError(self.path, f"required metadata {key} is missing")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0:
            raise GGUFError(self.path, f"metadata {key} must be a positive number, got {v!r}")
        return float(v)


def _read_hparams(path: str, reader: GGUFReader, arch: str, rules: "_ArchRules",
                  n_tensors: int) -> HParams:
    md = _MetadataReader(path, reader, arch)
    n_layer = md.int(Keys.LLM.BLOCK_COUNT, required=True)
    if n_layer > n_tensors:
        raise GGUFError(path, f"metadata {md.key(Keys.LLM.BLOCK_COUNT)} = {n_layer}, but the file holds "
                              f"only {n_tensors} tensors: corrupt metadata")
    n_embd = md.int(Keys.LLM.EMBEDDING_LENGTH, required=True)
    n_head = md.ints_per_layer(Keys.Attention.HEAD_COUNT, n_layer, required=True)
    if max(n_head) == 0:
        raise GGUFError(path, f"metadata {md.key(Keys.Attention.HEAD_COUNT)} is 0 for every layer")
    n_head_kv = md.ints_per_layer(Keys.Attention.HEAD_COUNT_KV, n_layer, required=False) or n_head
    first_heads = next(h for h in n_head if h)
    head_dim_k = md.int(Keys.Attention.KEY_LENGTH, required=False)
    if head_dim_k is None:
        if n_embd % first_heads:
            raise GGUFError(path, f"{md.key(Keys.Attention.KEY_LENGTH)} is missing and n_embd {n_embd} is "
                                  f"not a multiple of the head count {first_heads}")
        head_dim_k = n_embd // first_heads
    head_dim_v = md.int(Keys.Attention.VALUE_LENGTH, required=False, default=head_dim_k)
    n_ff = md.ints_per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layer, required=False)
    eps_key = Keys.Attention.LAYERNORM_RMS_EPS if rules.norm == "rms" else Keys.Attention.LAYERNORM_EPS
    norm_eps = md.float(eps_key, required=True)
    extra = {}
    if rules.hybrid:
        extra = dict(
            full_attention_interval=md.int(Keys.LLM.FULL_ATTENTION_INTERVAL, required=False,
                                           default=DEFAULT_FULL_ATTENTION_INTERVAL),
            ssm_state_size=md.int(Keys.SSM.STATE_SIZE, required=True),
            ssm_group_count=md.int(Keys.SSM.GROUP_COUNT, required=True),
            ssm_time_step_rank=md.int(Keys.SSM.TIME_STEP_RANK, required=True),
            ssm_inner_size=md.int(Keys.SSM.INNER_SIZE, required=False),
            ssm_conv_kernel=md.int(Keys.SSM.CONV_KERNEL, required=False),
        )
    return HParams(
        arch=arch, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ff=n_ff, norm_kind=rules.norm, norm_eps=norm_eps,
        n_expert=md.int(Keys.LLM.EXPERT_COUNT, required=False, minimum=0),
        n_expert_used=md.int(Keys.LLM.EXPERT_USED_COUNT, required=False, minimum=0),
        n_ff_exp=md.int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, required=False),
        n_ff_shexp=md.int(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, required=False),
        **extra,
    )


# ------------------------------------------------------------------------------------------------
# 3. Fusion plan
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _ArchRules:
    """How one architecture wires norms to projections (facts from llama.cpp's graph builders)."""
    norm: str                                 # "rms": RMSNorm * w; "layer": LayerNorm * w + b
    ffn_norm: MODEL_TENSOR = MODEL_TENSOR.FFN_NORM  # the norm whose output the FFN reads
    ffn_reads_attn_norm: bool = False         # parallel block: the FFN reads the attention norm's output
    gated_ffn: bool = True                    # ffn_gate + ffn_up (SwiGLU/GeGLU); False: ffn_up only
    hybrid: bool = False                      # Gated DeltaNet layers between full-attention layers
    gated_query: bool = False                 # full-attention attn_q holds query rows then gate rows


_LLAMA_LIKE = _ArchRules(norm="rms")
_HYBRID = _ArchRules(norm="rms", ffn_norm=MODEL_TENSOR.ATTN_POST_NORM, hybrid=True, gated_query=True)
_LAYER_NORM_SEQUENTIAL = _ArchRules(norm="layer", gated_ffn=False)
_LAYER_NORM_PARALLEL = _ArchRules(norm="layer", gated_ffn=False, ffn_reads_attn_norm=True)

_ARCH_RULES: dict[str, _ArchRules] = {
    # Pre-norm RMSNorm transformers: attn_norm -> q, k, v (or attn_qkv); ffn_norm -> gate, up.
    # gemma's norm weights are stored with the +1 already added by the converter, so plain RMSNorm.
    **{a: _LLAMA_LIKE for a in ("llama", "mistral3", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma",
                                "gemma2", "gemma3", "granite", "granitemoe", "phi3")},
    # Hybrid Gated DeltaNet / attention: post_attention_norm is their pre-FFN norm.
    **{a: _HYBRID for a in ("qwen3next", "qwen35", "qwen35moe")},
    # LayerNorm with bias. gptneox runs attention and FFN in parallel but with separate norms.
    **{a: _LAYER_NORM_SEQUENTIAL for a in ("gptneox", "bloom", "gpt2", "starcoder")},
    # One norm output feeds both attention and FFN (falcon-40b's attn_norm_2 feeds QKV instead).
    **{a: _LAYER_NORM_PARALLEL for a in ("falcon", "phi2")},
}


def _tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str | None = "weight") -> str:
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}" if suffix else base


@dataclass(frozen=True)
class _MemberPlan:
    name: str
    span: _TensorSpan
    rows: int
    bias: str | None          # GGUF name of the member's bias vector, if the file has one

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.span.qtype


@dataclass(frozen=True)
class _GroupPlan:
    layer: int
    kind: str                 # "attention", "linear_attention", "ffn", "shared_expert_ffn", "attention+ffn"
    norm: str
    norm_bias: str | None
    norm_kind: str
    eps: float
    in_features: int
    members: tuple[_MemberPlan, ...]


@dataclass(frozen=True)
class _Unfused:
    """Tensors that read a norm's output but are deliberately left out of the groups."""
    layer: int
    norm: str | None
    names: tuple[str, ...]
    reason: str


def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    if qtype in DEQUANTIZE_TYPES:
        return True
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class _Planner:
    """Builds the fusion plan of one file, validating every shape it relies on."""

    def __init__(self, path: str, layout: _FileLayout, hp: HParams, rules: _ArchRules):
        self.path, self.tensors, self.hp, self.rules = path, layout.tensors, hp, rules
        self.groups: list[_GroupPlan] = []
        self.unfused: list[_Unfused] = []
        self._weight_type_ok: dict[GGMLQuantizationType, bool] = {}

    # ---- tensor lookups with validation ----
    def fail(self, message: str, tensor: str | None = None):
        raise GGUFError(self.path, message, tensor)

    def name(self, kind: MODEL_TENSOR, layer: int, suffix: str | None = "weight") -> str:
        return _tensor_name(kind, layer, suffix)

    def has(self, kind: MODEL_TENSOR, layer: int, suffix: str | None = "weight") -> bool:
        return self.name(kind, layer, suffix) in self.tensors

    def require(self, kind: MODEL_TENSOR, layer: int, why: str) -> str:
        name = self.name(kind, layer)
        if name not in self.tensors:
            self.fail(f"required tensor {name!r} is missing ({why})")
        return name

    def vector(self, name: str, n: int, why: str, *, float_only: bool = True) -> _TensorSpan:
        span = self.tensors[name]
        if span.ne != (n,):
            self.fail(f"shape {list(span.ne)}, but the metadata says [{n}] ({why})", name)
        if float_only and span.qtype not in FLOAT_TYPES:
            self.fail(f"type {span.qtype.name}: a norm weight or bias must be F32, F16 or BF16", name)
        return span

    def matrix(self, name: str, k: int, n: int, why: str) -> _MemberPlan:
        span = self.tensors[name]
        if span.ne != (k, n):
            self.fail(f"shape ne = {list(span.ne)} (inputs, outputs), but the metadata says [{k}, {n}] "
                      f"({why})", name)
        ok = self._weight_type_ok.get(span.qtype)
        if ok is None:
            ok = self._weight_type_ok[span.qtype] = _dequantizable(span.qtype)
        if not ok:
            self.fail(f"type {span.qtype.name} is not a weight type ggfuse or gguf-py can read", name)
        bias = name[: -len(".weight")] + ".bias" if name.endswith(".weight") else None
        if bias is not None and bias in self.tensors:
            self.vector(bias, n, f"bias of {name}")
        else:
            bias = None
        return _MemberPlan(name, span, n, bias)

    # ---- the plan ----
    def plan(self) -> None:
        hp = self.hp
        self.vector(self.require_global(MODEL_TENSOR.OUTPUT_NORM), hp.n_embd, "n_embd")
        embd = self.require_global(MODEL_TENSOR.TOKEN_EMBD)
        if self.tensors[embd].ne[0] != hp.n_embd:
            self.fail(f"shape ne = {list(self.tensors[embd].ne)}, but embedding_length is {hp.n_embd}", embd)
        for layer in range(hp.n_layer):
            self.plan_layer(layer)

    def require_global(self, kind: MODEL_TENSOR) -> str:
        name = _tensor_name(kind)
        if name not in self.tensors:
            self.fail(f"required tensor {name!r} is missing")
        return name

    def norm(self, kind: MODEL_TENSOR, layer: int, why: str) -> tuple[str, str | None]:
        """A norm's weight (and, for LayerNorm, its bias), checked against n_embd."""
        weight = self.require(kind, layer, why)
        self.vector(weight, self.hp.n_embd, "n_embd")
        bias = self.name(kind, layer, "bias")
        if self.rules.norm == "layer":
            if bias not in self.tensors:
                self.fail(f"required tensor {bias!r} is missing (LayerNorm bias of {weight})")
            self.vector(bias, self.hp.n_embd, "n_embd")
            return weight, bias
        if bias in self.tensors:
            self.fail(f"{self.hp.arch} uses RMSNorm, which has no bias", bias)
        return weight, None

    def add_group(self, layer: int, kind: str, norm: tuple[str, str | None],
                  members: Sequence[_MemberPlan]) -> None:
        if self.hp.n_embd % Q8_1_BLOCK_VALUES:
            self.unfused.append(_Unfused(layer, norm[0], tuple(m.name for m in members),
                                         f"n_embd {self.hp.n_embd} is not a multiple of 32: no Q8_1 "
                                         "activations, not fused"))
            return
        self.groups.append(_GroupPlan(layer, kind, norm[0], norm[1], self.rules.norm, self.hp.norm_eps,
                                      self.hp.n_embd, tuple(members)))

    def plan_layer(self, layer: int) -> None:
        hp, rules = self.hp, self.rules
        if rules.hybrid and hp.is_linear_attention(layer):
            attn_kind, attn_members = "linear_attention", self.delta_net_members(layer)
            attn_norm = self.norm(MODEL_TENSOR.ATTN_NORM, layer, "input norm of the Gated DeltaNet layer")
        else:
            attn_kind, attn_members = "attention", self.attention_members(layer)
            # falcon-40b: attn_norm_2 feeds QKV and attn_norm feeds the FFN.
            qkv_norm = MODEL_TENSOR.ATTN_NORM_2 if self.has(MODEL_TENSOR.ATTN_NORM_2, layer) else MODEL_TENSOR.ATTN_NORM
            attn_norm = self.norm(qkv_norm, layer, "input norm of attention")

        if rules.ffn_reads_attn_norm:
            ffn_norm = self.norm(MODEL_TENSOR.ATTN_NORM, layer, "norm read by the parallel FFN")
        else:
            ffn_norm = self.norm(rules.ffn_norm, layer, "input norm of the FFN")
        ffn_kind, ffn_members = self.ffn_members(layer, ffn_norm[0])

        if ffn_norm[0] == attn_norm[0]:
            self.add_group(layer, f"{attn_kind}+ffn", attn_norm, attn_members + ffn_members)
        else:
            self.add_group(layer, attn_kind, attn_norm, attn_members)
            if ffn_members:
                self.add_group(layer, ffn_kind, ffn_norm, ffn_members)

    def attention_members(self, layer: int) -> list[_MemberPlan]:
        hp = self.hp
        n_head, n_head_kv = hp.n_head[layer], hp.n_head_kv[layer]
        if n_head == 0:
            self.fail(f"layer {layer} has 0 attention heads in the metadata but is planned as attention")
        q_rows = n_head * hp.head_dim_k * (2 if self.rules.gated_query else 1)
        k_rows, v_rows = n_head_kv * hp.head_dim_k, n_head_kv * hp.head_dim_v
        heads = (f"{n_head} heads x {hp.head_dim_k}" + (" x 2 (query + gate)" if self.rules.gated_query else "")
                 + f", {n_head_kv} KV heads")
        hybrid_only = (MODEL_TENSOR.SSM_CONV1D, MODEL_TENSOR.SSM_OUT, MODEL_TENSOR.ATTN_GATE,
                       MODEL_TENSOR.SSM_BETA_ALPHA, MODEL_TENSOR.SSM_BETA, MODEL_TENSOR.SSM_ALPHA)
        for ssm in hybrid_only if self.rules.hybrid else ():
            if self.has(ssm, layer):
                self.fail(self.kind_mismatch(layer, "full-attention", "a Gated DeltaNet tensor"),
                          self.name(ssm, layer))
        self.require(MODEL_TENSOR.ATTN_OUT, layer, "attention output projection")
        if self.has(MODEL_TENSOR.ATTN_QKV, layer):
            for part in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V):
                if self.has(part, layer):
                    self.fail(f"layer {layer} holds both a fused attn_qkv and a separate projection",
                              self.name(part, layer))
            name = self.name(MODEL_TENSOR.ATTN_QKV, layer)
            return [self.matrix(name, hp.n_embd, q_rows + k_rows + v_rows, f"Q|K|V rows: {heads}")]
        q = self.require(MODEL_TENSOR.ATTN_Q, layer, "attention query projection")
        k = self.require(MODEL_TENSOR.ATTN_K, layer, "attention key projection")
        v = self.require(MODEL_TENSOR.ATTN_V, layer, "attention value projection")
        return [self.matrix(q, hp.n_embd, q_rows, heads), self.matrix(k, hp.n_embd, k_rows, heads),
                self.matrix(v, hp.n_embd, v_rows, heads)]

    def kind_mismatch(self, layer: int, kind: str, holds: str) -> str:
        interval = self.hp.full_attention_interval
        return (f"layer {layer} is {kind} by the metadata ({self.hp.arch}.full_attention_interval = "
                f"{interval}: layer i is full attention when (i+1) % {interval} == 0), but the file holds "
                f"{holds} there")

    def delta_net_members(self, layer: int) -> list[_MemberPlan]:
        hp = self.hp
        for attn in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V):
            if self.has(attn, layer):
                self.fail(self.kind_mismatch(layer, "linear-attention (Gated DeltaNet)",
                                             "a full-attention projection"), self.name(attn, layer))
        key_dim, value_dim, v_heads = hp.ssm_key_dim, hp.ssm_value_dim, hp.ssm_time_step_rank
        dims = (f"key_dim {key_dim} = state_size {hp.ssm_state_size} x group_count {hp.ssm_group_count}, "
                f"value_dim {value_dim}")
        conv = self.require(MODEL_TENSOR.SSM_CONV1D, layer, "Gated DeltaNet convolution")
        conv_ne = self.tensors[conv].ne
        if len(conv_ne) != 2 or conv_ne[1] != 2 * key_dim + value_dim or (
                hp.ssm_conv_kernel is not None and conv_ne[0] != hp.ssm_conv_kernel):
            self.fail(f"shape ne = {list(conv_ne)}, but the metadata says "
                      f"[{hp.ssm_conv_kernel or 'conv_kernel'}, {2 * key_dim + value_dim}] ({dims})", conv)
        out = self.require(MODEL_TENSOR.SSM_OUT, layer, "Gated DeltaNet output projection")
        if self.tensors[out].ne != (value_dim, hp.n_embd):
            self.fail(f"shape ne = {list(self.tensors[out].ne)}, but the metadata says "
                      f"[{value_dim}, {hp.n_embd}] ({dims})", out)

        members = []
        if self.has(MODEL_TENSOR.ATTN_QKV, layer):
            qkv = self.name(MODEL_TENSOR.ATTN_QKV, layer)
            members.append(self.matrix(qkv, hp.n_embd, 2 * key_dim + value_dim, f"q|k|v of DeltaNet: {dims}"))
            gate = self.require(MODEL_TENSOR.ATTN_GATE, layer, "Gated DeltaNet output gate z")
            members.append(self.matrix(gate, hp.n_embd, value_dim, f"z gate: {dims}"))
        elif self.has(MODEL_TENSOR.SSM_IN, layer):
            # Older qwen3next files: one projection for q, k, v and z.
            ssm_in = self.name(MODEL_TENSOR.SSM_IN, layer)
            members.append(self.matrix(ssm_in, hp.n_embd, 2 * key_dim + 2 * value_dim, f"q|k|v|z: {dims}"))
        else:
            self.fail(f"required tensor {self.name(MODEL_TENSOR.ATTN_QKV, layer)!r} is missing "
                      f"(layer {layer} is a Gated DeltaNet layer)")
        if self.has(MODEL_TENSOR.SSM_BETA_ALPHA, layer):
            ba = self.name(MODEL_TENSOR.SSM_BETA_ALPHA, layer)
            members.append(self.matrix(ba, hp.n_embd, 2 * v_heads, f"beta|alpha: 2 x {v_heads} value heads"))
        else:
            beta = self.require(MODEL_TENSOR.SSM_BETA, layer, "Gated DeltaNet beta projection")
            alpha = self.require(MODEL_TENSOR.SSM_ALPHA, layer, "Gated DeltaNet alpha projection")
            members.append(self.matrix(beta, hp.n_embd, v_heads, f"{v_heads} value heads"))
            members.append(self.matrix(alpha, hp.n_embd, v_heads, f"{v_heads} value heads"))
        return members

    def ffn_members(self, layer: int, norm: str) -> tuple[str, list[_MemberPlan]]:
        hp = self.hp
        if self.has(MODEL_TENSOR.FFN_GATE_INP, layer):
            return "shared_expert_ffn", self.moe_members(layer, norm)
        n_ff = hp.n_ff[layer] if hp.n_ff is not None else None
        if n_ff is None:
            self.fail(f"required metadata {hp.arch}.feed_forward_length is missing (layer {layer} has a "
                      "dense FFN)")
        if n_ff == 0:
            return "ffn", []
        self.require(MODEL_TENSOR.FFN_DOWN, layer, "FFN down projection")
        up = self.require(MODEL_TENSOR.FFN_UP, layer, "FFN up projection")
        why = f"feed_forward_length {n_ff}"
        if self.has(MODEL_TENSOR.FFN_GATE, layer):
            if not self.rules.gated_ffn:
                self.fail(f"{hp.arch} has no gated FFN", self.name(MODEL_TENSOR.FFN_GATE, layer))
            gate = self.name(MODEL_TENSOR.FFN_GATE, layer)
            return "ffn", [self.matrix(gate, hp.n_embd, n_ff, why), self.matrix(up, hp.n_embd, n_ff, why)]
        if self.rules.gated_ffn:
            # phi3-style: ffn_up holds the gate rows then the up rows; used as stored.
            if self.tensors[up].ne != (hp.n_embd, 2 * n_ff):
                self.fail(f"required tensor {self.name(MODEL_TENSOR.FFN_GATE, layer)!r} is missing, and "
                          f"{up} is not a fused gate|up projection ({2 * n_ff} rows)")
            return "ffn", [self.matrix(up, hp.n_embd, 2 * n_ff, f"gate|up rows: 2 x {why}")]
        return "ffn", [self.matrix(up, hp.n_embd, n_ff, why)]

    def moe_members(self, layer: int, norm: str) -> list[_MemberPlan]:
        """Shared-expert gate/up are dense and fused; router and routed experts are left out."""
        hp = self.hp
        router = self.name(MODEL_TENSOR.FFN_GATE_INP, layer)
        r_ne = self.tensors[router].ne
        if len(r_ne) != 2 or r_ne[0] != hp.n_embd or (hp.n_expert is not None and r_ne[1] != hp.n_expert):
            self.fail(f"shape ne = {list(r_ne)}, but the metadata says [{hp.n_embd}, "
                      f"{hp.n_expert if hp.n_expert is not None else 'any'}] (embedding_length, "
                      f"expert_count)", router)
        n_expert = r_ne[1]
        self.unfused.append(_Unfused(layer, norm, (router,),
                                     "MoE router: float logits for top-k expert choice, kept out of groups"))
        experts = []
        for kind, gate_up in ((MODEL_TENSOR.FFN_GATE_UP_EXP, 2), (MODEL_TENSOR.FFN_GATE_EXP, 1),
                              (MODEL_TENSOR.FFN_UP_EXP, 1), (MODEL_TENSOR.FFN_DOWN_EXP, 0)):
            name = self.name(kind, layer)
            if name not in self.tensors:
                continue
            ne = self.tensors[name].ne
            n_ff_exp = hp.n_ff_exp if hp.n_ff_exp is not None else (ne[0] if gate_up == 0 else ne[1] // gate_up)
            want = (n_ff_exp, hp.n_embd, n_expert) if gate_up == 0 else (hp.n_embd, gate_up * n_ff_exp, n_expert)
            if ne != want:
                self.fail(f"shape ne = {list(ne)}, but the metadata says {list(want)} "
                          f"({n_expert} experts of {n_ff_exp})", name)
            experts.append(name)
        if not any(n.endswith(("ffn_down_exps.weight",)) for n in experts):
            self.fail(f"required tensor {self.name(MODEL_TENSOR.FFN_DOWN_EXP, layer)!r} is missing "
                      f"(layer {layer} has a MoE router)")
        up_names = [n for n in experts if "down" not in n]
        if not up_names:
            self.fail(f"required tensor {self.name(MODEL_TENSOR.FFN_UP_EXP, layer)!r} is missing "
                      f"(layer {layer} has a MoE router)")
        self.unfused.append(_Unfused(layer, norm, tuple(up_names),
                                     f"routed experts ({n_expert}): per-token expert choice, out of scope"))
        shexp_gate = self.name(MODEL_TENSOR.FFN_GATE_INP_SHEXP, layer)
        if shexp_gate in self.tensors:
            ne = self.tensors[shexp_gate].ne
            if ne[0] != hp.n_embd or math.prod(ne) != hp.n_embd:
                self.fail(f"shape ne = {list(ne)}, but the metadata says [{hp.n_embd}]", shexp_gate)
            self.unfused.append(_Unfused(layer, norm, (shexp_gate,),
                                         "shared-expert gate: one float output, kept out of groups"))
        members = []
        if self.has(MODEL_TENSOR.FFN_UP_SHEXP, layer):
            up = self.name(MODEL_TENSOR.FFN_UP_SHEXP, layer)
            n_ff_sh = hp.n_ff_shexp if hp.n_ff_shexp is not None else self.tensors[up].ne[-1]
            why = f"shared expert feed_forward_length {n_ff_sh}"
            if self.has(MODEL_TENSOR.FFN_GATE_SHEXP, layer):
                members.append(self.matrix(self.name(MODEL_TENSOR.FFN_GATE_SHEXP, layer), hp.n_embd, n_ff_sh, why))
            members.append(self.matrix(up, hp.n_embd, n_ff_sh, why))
        return members


# ------------------------------------------------------------------------------------------------
# 4. Streaming the weights onto the device
# ------------------------------------------------------------------------------------------------

class _ChunkedFileCopier:
    """Copies byte ranges of the file into device tensors through a bounded ring of host chunks.

    Reads go through `os.preadv` into the destination (CPU) or into pinned staging chunks (GPU),
    not through the mmap: touching the map would fault every page into this process's resident
    set, while page-cache reads keep the host footprint at the staging ring (`slots` chunks of
    `chunk_bytes`). Several threads read at once (one reader is page-cache-copy bound, far below
    the PCIe rate); the main thread retires chunks in order, starting each chunk's copy to the
    device as soon as its read is done, and a chunk is refilled only after its copy has finished."""

    def __init__(self, path: str, reader: GGUFReader, device: torch.device, chunk_bytes: int,
                 on_bytes: Callable[[int], None] | None, *, slots: int = DEFAULT_STAGING_SLOTS,
                 threads: int | None = None):
        self.path, self.reader, self.device = path, reader, device
        self.chunk_bytes = max(1 << 16, int(chunk_bytes))
        self.on_bytes = on_bytes or (lambda n: None)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.threads = threads or max(1, min(DEFAULT_READ_THREADS, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggfuse-load")
        # (read future, staging slot or None, device destination or None, bytes), oldest first.
        self.in_flight: deque[tuple[Future, int | None, torch.Tensor | None, int]] = deque()
        self.max_in_flight = max(2, slots) if device.type == "cuda" else 2 * self.threads
        self.slots: list[torch.Tensor] = []
        self.slot_arrays: list[np.ndarray] = []
        self.slot_copied: list[torch.cuda.Event | None] = []
        self.free_slots: deque[int] = deque()
        if device.type == "cuda":
            self.stream = torch.cuda.current_stream(device)
            self.slots = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
                          for _ in range(max(2, slots))]
            self.slot_arrays = [s.numpy() for s in self.slots]
            self.slot_copied = [None] * len(self.slots)
            self.free_slots = deque(range(len(self.slots)))

    def _read(self, dest: np.ndarray, offset: int) -> None:
        """Fill dest (uint8, contiguous) with the file bytes at offset. Runs on a reader thread."""
        if not hasattr(os, "preadv"):  # no positional vector reads (Windows): copy from the map
            np.copyto(dest, self.reader.data[offset:offset + dest.size])
            return
        view = memoryview(dest).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise GGUFError(self.path, f"the file ended at byte {offset + done} while loading "
                                           "(was it truncated during the load?)")
            done += n

    def copy(self, offset: int, nbytes: int, dest: torch.Tensor) -> None:
        """Queue file bytes [offset, offset + nbytes) into dest (contiguous 1-D uint8 of nbytes).
        Complete only after `finish()`."""
        assert dest.dtype == torch.uint8 and dest.dim() == 1 and dest.numel() == nbytes and dest.is_contiguous()
        on_cpu = dest.device.type == "cpu"
        dest_array = dest.numpy() if on_cpu else None
        for pos in range(0, nbytes, self.chunk_bytes):
            n = min(self.chunk_bytes, nbytes - pos)
            if on_cpu:
                read = self.pool.submit(self._read, dest_array[pos:pos + n], offset + pos)
                self.in_flight.append((read, None, None, n))
            else:
                slot = self._take_slot()
                read = self.pool.submit(self._read, self.slot_arrays[slot][:n], offset + pos)
                self.in_flight.append((read, slot, dest[pos:pos + n], n))
            while len(self.in_flight) > self.max_in_flight:
                self._retire()

    def _take_slot(self) -> int:
        while not self.free_slots:
            self._retire()
        slot = self.free_slots.popleft()
        copied = self.slot_copied[slot]
        if copied is not None:
            copied.synchronize()  # its previous bytes are on the device: safe to overwrite
            self.slot_copied[slot] = None
        return slot

    def _retire(self) -> None:
        read, slot, dest, n = self.in_flight.popleft()
        read.result()  # re-raises a reader thread's error here
        if slot is not None:
            dest.copy_(self.slots[slot][:n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
            self.slot_copied[slot] = copied
            self.free_slots.append(slot)
        self.on_bytes(n)

    def finish(self) -> None:
        """Every queued byte is in its destination when this returns."""
        while self.in_flight:
            self._retire()
        for copied in self.slot_copied:
            if copied is not None:
                copied.synchronize()

    def close(self) -> None:
        """Release threads and the file, also after an error (pending reads are waited for)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.in_flight.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------------------------------------
# 5. The public objects
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized GGUF tensor: its bytes (zero-copy view of the file) and its type.

    `data` is uint8 `[..., row_bytes]` (rows as stored); `shape` is the logical torch-order shape
    (`ne` reversed), e.g. `(out_features, in_features)` for a weight."""
    name: str
    data: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of `shape`, on the CPU."""
        rows = self.data.cpu().reshape(-1, self.data.shape[-1])
        return ops.dequantize_any(rows.numpy(), self.qtype).reshape(self.shape)


@dataclass(frozen=True)
class FusionReportRow:
    """One line of `GGUFModel.fusion_report()`."""
    layer: int | None
    kind: str                  # group kind, or "unfused" for tensors kept out of groups
    norm: str | None           # GGUF name of the norm weight whose output the members read
    members: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[int, ...]
    status: str                # "fused", "fused+fallback", "fallback", "not fused"
    reason: str                # why anything is not on the fused path ("" when all of it is)
    nbytes: int


class FusedGroup(torch.nn.Module):
    """Projections of one layer that read the output of the same norm, as one fused weight.

    `g(x)`: residual-stream x [B, K] -> norm (weight and eps from the file) -> Q8_1 -> fused mat-vec
    -> float32 [B, sum(out_features)] (plus the members' biases when the file has them).
    RMSNorm groups run the fused norm+Q8_1 kernel; LayerNorm groups normalize in torch first."""

    def __init__(self, plan: _GroupPlan):
        super().__init__()
        self.layer: int = plan.layer
        self.kind: str = plan.kind
        self.norm: str = plan.norm
        self.norm_bias_name: str | None = plan.norm_bias
        self.norm_kind: str = plan.norm_kind
        self.eps: float = plan.eps
        self.in_features: int = plan.in_features
        self.members: tuple[str, ...] = tuple(m.name for m in plan.members)
        self.qtypes: tuple[GGMLQuantizationType, ...] = tuple(m.qtype for m in plan.members)
        self.out_features: tuple[int, ...] = tuple(m.rows for m in plan.members)
        self.bias_names: tuple[str | None, ...] = tuple(m.bias for m in plan.members)
        self.nbytes: int = sum(m.span.nbytes for m in plan.members)
        self.fallbacks: dict[str, str] = {
            m.name: f"{m.qtype.name} has no Q8_1 mat-vec kernel: float matmul"
            for m in plan.members if m.qtype not in MAT_VEC_TYPES}
        self.linear: FusedQuantLinear | None = None
        self._plan = plan

    @property
    def loaded(self) -> bool:
        return self.linear is not None

    @property
    def device(self) -> torch.device:
        return self.norm_weight.device if self.loaded else torch.device("meta")

    @property
    def norm_fallback(self) -> str | None:
        """Why the norm does not run in the fused kernel (None when it does)."""
        if self.norm_kind == "layer":
            return "LayerNorm with bias: torch layer_norm, then Q8_1 + fused mat-vec"
        return None

    def extra_repr(self) -> str:
        parts = [f"{n} {t.name} x{r}" for n, t, r in zip(self.members, self.qtypes, self.out_features)]
        return f"layer={self.layer}, kind={self.kind}, norm={self.norm}, K={self.in_features}, [{', '.join(parts)}]"

    def _require_loaded(self) -> None:
        if self.linear is None:
            raise RuntimeError(f"group {self.norm} was planned without its weights (load_weights=False)")

    def _check(self, x: torch.Tensor, what: str) -> None:
        self._require_loaded()
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.norm} group: {what} must be [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device != self.norm_weight.device:
            raise ValueError(f"{self.norm} group: {what} is on {x.device}, the group's weights on "
                             f"{self.norm_weight.device}")

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias if self.bias is not None else y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm alone in float32 (torch), for references and for consumers that need floats."""
        self._check(x, "x")
        xf = x.float()
        if self.norm_kind == "layer":
            return torch.nn.functional.layer_norm(xf, (self.in_features,), self.norm_weight, self.norm_bias,
                                                  self.eps)
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, "x")
        if self.norm_kind == "layer":
            return self._add_bias(self.linear(self.normalize(x)))
        return self._add_bias(self.linear.rms_norm_forward(x, self.norm_weight, self.eps))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Already-normalized h [..., K] -> Q8_1 -> fused mat-vec -> float32 [..., sum(out_features)]."""
        self._check(h, "h")
        return self._add_bias(self.linear(h))

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-member views of an output [..., sum(out_features)], in member order."""
        if y.shape[-1] != sum(self.out_features):
            raise ValueError(f"{self.norm} group: split expects last dimension {sum(self.out_features)}, "
                             f"got {tuple(y.shape)}")
        return tuple(torch.split(y, list(self.out_features), dim=-1))


class GGUFModel:
    """A loaded GGUF file: its metadata, fusion groups (on `device`) and zero-copy tensor access."""

    def __init__(self, path: str, layout: _FileLayout, reader: GGUFReader, arch: str,
                 hparams: HParams | None, rules: _ArchRules | None, groups: list[FusedGroup],
                 unfused: list[_Unfused], device: torch.device, note: str | None):
        self.path = path
        self.arch = arch
        self.hparams = hparams
        self.device = device
        self.reader = reader
        self.version = layout.version
        self._layout = layout
        self._rules = rules
        self._groups = groups
        self._unfused = unfused
        self._note = note
        # Metadata except the tokenizer (large arrays nobody needs for the weights; still in `reader`).
        self.metadata: dict[str, object] = {
            k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("tokenizer.", "GGUF."))}
        self._reader_tensors = {t.name: t for t in reader.tensors}

    def __repr__(self) -> str:
        return (f"GGUFModel({self.path!r}, arch={self.arch!r}, groups={len(self._groups)}, "
                f"device={self.device})")

    # ---- groups ----
    def groups(self) -> list[FusedGroup]:
        """Every fused projection group, in layer order (attention side before FFN side)."""
        return list(self._groups)

    def group(self, norm: str) -> FusedGroup:
        """The group fed by the norm weight named `norm` (e.g. "blk.0.attn_norm.weight")."""
        for g in self._groups:
            if g.norm == norm:
                return g
        raise KeyError(f"no fused group reads the output of {norm!r}")

    # ---- tensors ----
    def tensor_names(self) -> list[str]:
        return list(self._layout.tensors)

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._span(name).qtype

    def _span(self, name: str) -> _TensorSpan:
        try:
            return self._layout.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def tensor(self, name: str, device: torch.device | str | None = None):
        """A tensor by GGUF name, as a zero-copy view of the file (copied only when `device` is given).

        F32/F16/BF16 (and integer) tensors come back as torch tensors of the logical shape; quantized
        ones as `QuantizedTensor` (uint8 rows + type)."""
        span = self._span(name)
        t = self._reader_tensors[name]
        shape = tuple(reversed(span.ne))
        if span.qtype == GGMLQuantizationType.BF16:  # gguf-py gives BF16 as raw bytes
            out = torch.from_numpy(t.data).view(torch.bfloat16).reshape(shape)
        elif t.data.dtype != np.uint8:               # F32, F16, F64 and the integer types
            out = torch.from_numpy(t.data).reshape(shape)
        else:
            data = torch.from_numpy(t.data)
            if device is not None:
                data = data.to(device)
            return QuantizedTensor(name, data, span.qtype, shape)
        return out.to(device) if device is not None else out

    # ---- report ----
    def fusion_report(self) -> list[FusionReportRow]:
        """Per layer: each group (norm, members, types, rows, fused or fallback and why), then the
        tensors that read a norm's output but are kept out of groups (MoE routers and experts)."""
        rows: list[FusionReportRow] = []
        for g in self._groups:
            fallbacks = dict(g.linear.fallbacks) if g.linear is not None else dict(g.fallbacks)
            reasons = ([g.norm_fallback] if g.norm_fallback else []) + [f"{n}: {r}" for n, r in fallbacks.items()]
            if len(fallbacks) == len(g.members):
                status = "fallback"
            elif reasons:
                status = "fused+fallback"
            else:
                status = "fused"
            rows.append(FusionReportRow(g.layer, g.kind, g.norm, g.members, tuple(t.name for t in g.qtypes),
                                        g.out_features, status, "; ".join(reasons), g.nbytes))
        for u in self._unfused:
            spans = [self._layout.tensors[n] for n in u.names]
            rows.append(FusionReportRow(u.layer, "unfused", u.norm, u.names, tuple(s.qtype.name for s in spans),
                                        tuple(s.ne[1] if len(s.ne) > 1 else 1 for s in spans), "not fused",
                                        u.reason, sum(s.nbytes for s in spans)))
        if self._note:
            rows.append(FusionReportRow(None, "unfused", None, (), (), (), "not fused", self._note, 0))
        rows.sort(key=lambda r: (r.layer if r.layer is not None else 1 << 30, r.kind == "unfused"))
        return rows

    def fusion_totals(self) -> dict[str, float]:
        """Bytes by path: `fused` (fast kernel), `fallback` (group members without a kernel),
        `other` (everything else in the file) and the fraction of all tensor bytes that is fused."""
        fused = fallback = 0
        for g in self._groups:
            for name, qtype in zip(g.members, g.qtypes):
                n = self._layout.tensors[name].nbytes
                if qtype in MAT_VEC_TYPES:
                    fused += n
                else:
                    fallback += n
        total = sum(t.nbytes for t in self._layout.tensors.values())
        return {"fused_bytes": fused, "fallback_bytes": fallback, "other_bytes": total - fused - fallback,
                "total_bytes": total, "fused_fraction": fused / total if total else 0.0,
                "group_fused_fraction": fused / (fused + fallback) if fused + fallback else 0.0}


# ------------------------------------------------------------------------------------------------
# 6. load_gguf
# ------------------------------------------------------------------------------------------------

def _resolve_device(device) -> torch.device:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        from . import _library
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        if not _library.has_cuda_kernels():
            raise RuntimeError("ggfuse was built without its CUDA kernels (the torch it was built against "
                               "had no CUDA): load on 'cpu' or rebuild with a CUDA torch")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {dev}: ggfuse runs on 'cpu' and 'cuda'")
    return dev


def _group_on_device(plan: _GroupPlan, reader_tensors: dict, device: torch.device,
                     copier: _ChunkedFileCopier, chunk_bytes: int) -> FusedGroup:
    group = FusedGroup(plan)
    # Buffers are allocated on the target device first and filled straight from the file: fused
    # segments by streamed byte copies, fallback members a bounded block of rows at a time.
    linear = FusedQuantLinear.empty(
        [(m.name, m.rows, m.span.nbytes // m.rows, m.qtype) for m in plan.members], device)
    for index, m in enumerate(plan.members):
        if index in linear.seg_members:
            copier.copy(m.span.offset, m.span.nbytes, linear.member_storage(index))
            continue
        rows_np = reader_tensors[m.name].data.view(np.uint8).reshape(m.rows, -1)
        step = max(1, chunk_bytes // (4 * plan.in_features))
        for r in range(0, m.rows, step):
            linear.fill_member(index, rows_np[r:r + step], row_begin=r)
        copier.on_bytes(m.span.nbytes)
    group.linear = linear

    def small(name: str) -> torch.Tensor:
        t = reader_tensors[name]
        return ops.dequantize_any(t.data.reshape(1, -1), t.tensor_type).reshape(-1).clone().to(device)

    group.register_buffer("norm_weight", small(plan.norm))
    group.register_buffer("norm_bias", small(plan.norm_bias) if plan.norm_bias else None)
    bias = None
    if any(m.bias for m in plan.members):
        bias = torch.cat([small(m.bias) if m.bias else torch.zeros(m.rows, device=device) for m in plan.members])
    group.register_buffer("bias", bias)
    return group


def load_gguf(path: str | os.PathLike, device: torch.device | str | None = "cpu", *,
              load_weights: bool = True, progress: bool | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> GGUFModel:
    """Open a GGUF model and build its fused projection groups on `device` ("cpu", "cuda", ...).

    - `load_weights=False` only plans (for `fusion_report` / `inspect`): no weight is read.
    - `progress`: a rich progress bar over the upload; None shows it for uploads over 512 MiB.
    - `chunk_bytes`: bytes per read of the streamed upload; a GPU load holds 8 such pinned chunks.

    Raises `GGUFError` (a ValueError naming the file, and the tensor where there is one) for files
    that are malformed, truncated, or whose tensors disagree with their metadata."""
    path = os.fspath(path)
    dev = _resolve_device(device) if load_weights else torch.device("meta")
    layout = _check_layout(path)
    reader = _open_reader(path, layout)

    arch_field = reader.get_field(Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise GGUFError(path, f"required metadata {Keys.General.ARCHITECTURE} is missing")
    arch = arch_field.contents()
    if not isinstance(arch, str) or not arch:
        raise GGUFError(path, f"metadata {Keys.General.ARCHITECTURE} must be a non-empty string, got {arch!r}")
    rules = _ARCH_RULES.get(arch)
    if rules is None:
        note = (f"architecture {arch!r} has no fusion rules in ggfuse: nothing fused (tensors are still "
                f"available through GGUFModel.tensor)")
        return GGUFModel(path, layout, reader, arch, None, None, [], [], dev, note)

    hparams = _read_hparams(path, reader, arch, rules, len(layout.tensors))
    planner = _Planner(path, layout, hparams, rules)
    planner.plan()

    if not load_weights:
        groups = [FusedGroup(p) for p in planner.groups]
        return GGUFModel(path, layout, reader, arch, hparams, rules, groups, planner.unfused, dev, None)

    reader_tensors = {t.name: t for t in reader.tensors}
    total = sum(m.span.nbytes for p in planner.groups for m in p.members)
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    groups: list[FusedGroup] = []
    with _UploadProgress(show, total, f"loading {Path(path).name} to {dev}") as advance:
        copier = _ChunkedFileCopier(path, reader, dev, chunk_bytes, advance)
        try:
            for plan in planner.groups:
                groups.append(_group_on_device(plan, reader_tensors, dev, copier, chunk_bytes))
            copier.finish()
        finally:
            copier.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return GGUFModel(path, layout, reader, arch, hparams, rules, groups, planner.unfused, dev, None)


class _UploadProgress:
    """Context manager yielding an `advance(nbytes)` callback, backed by a rich bar when shown."""

    def __init__(self, show: bool, total: int, description: str):
        self.show, self.total, self.description = show, total, description
        self.progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=False)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

