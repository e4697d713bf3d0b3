"""`FusedQuantLinear`: several quantized projections that read the same input, as one fused weight.

The members' GGUF rows are laid end to end in one byte buffer, one segment per member (each segment
starts on a 16-byte boundary), so a single mat-vec launch computes every member's output. Members
whose type the Q8_1 mat-vec does not handle (e.g. F16, Q5_1) are kept apart as dequantized float
weights and computed with a float matmul of the normalized input: correct, just not fused; `fallbacks`
names them and says why.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import ops
from .formats import MAT_VEC_TYPES, as_qtype, values_per_row

SEGMENT_ALIGN = 16  # bytes; matches kSegmentAlign in csrc/ggfuse/formats.h


def _as_byte_rows(name: str, w) -> torch.Tensor:
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"member {name!r}: weight must be a torch.Tensor or numpy array, got {type(w).__name__}")
    if w.dtype != torch.uint8 or w.dim() != 2:
        raise TypeError(f"member {name!r}: weight must be uint8 [rows, row_bytes] GGUF bytes, got "
                        f"{w.dtype} {tuple(w.shape)}")
    return w


class FusedQuantLinear(torch.nn.Module):
    """Projections `members = [(name, weight_bytes [N_i, row_bytes_i] uint8, qtype), ...]` sharing
    one input of K features; the output is `[B, sum N_i]` with members' columns in member order."""

    def __init__(self, members: Sequence[tuple], device: torch.device | str | None = None):
        super().__init__()
        if not members:
            raise ValueError("FusedQuantLinear needs at least one member")
        names = [str(m[0]) for m in members]
        weights = [_as_byte_rows(n, m[1]) for n, m in zip(names, members)]
        target = torch.device(device) if device is not None else weights[0].device
        self._init_layout([(n, w.shape[0], w.shape[1], m[2]) for n, w, m in zip(names, weights, members)],
                          target)
        for i, w in enumerate(weights):
            self.fill_member(i, w)

    @classmethod
    def empty(cls, specs: Sequence[tuple], device: torch.device | str) -> "FusedQuantLinear":
        """The layout of `specs = [(name, rows, row_bytes, qtype), ...]` with unfilled buffers on
        `device`; fill each member with `fill_member` (the GGUF loader streams file bytes this way)."""
        obj = cls.__new__(cls)
        torch.nn.Module.__init__(obj)
        obj._init_layout(specs, torch.device(device))
        return obj

    def _init_layout(self, specs: Sequence[tuple], device: torch.device) -> None:
        if not specs:
            raise ValueError("FusedQuantLinear needs at least one member")
        self.names: tuple[str, ...] = tuple(str(s[0]) for s in specs)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"member names must be unique, got {self.names}")
        self.qtypes: tuple[GGMLQuantizationType, ...] = tuple(as_qtype(s[3]) for s in specs)
        self.out_features: tuple[int, ...] = tuple(int(s[1]) for s in specs)
        self._row_bytes: tuple[int, ...] = tuple(int(s[2]) for s in specs)
        ks = [values_per_row(t, rb) for t, rb in zip(self.qtypes, self._row_bytes)]
        if len(set(ks)) != 1:
            raise ValueError("members must have the same input features K, got "
                             + ", ".join(f"{n}: {k}" for n, k in zip(self.names, ks)))
        self.in_features: int = ks[0]

        # Segments of the fused buffer, and fallback members kept as float weights.
        self.seg_members: list[int] = []
        self.seg_qtypes: list[int] = []
        self.seg_rows: list[int] = []
        self.seg_offsets: list[int] = []
        self.fallbacks: dict[str, str] = {}
        total = 0
        for i, (t, rows, rb) in enumerate(zip(self.qtypes, self.out_features, self._row_bytes)):
            if t in MAT_VEC_TYPES:
                total = -(-total // SEGMENT_ALIGN) * SEGMENT_ALIGN
                self.seg_members.append(i)
                self.seg_qtypes.append(int(t))
                self.seg_rows.append(rows)
                self.seg_offsets.append(total)
                total += rows * rb
            else:
                self.fallbacks[self.names[i]] = f"{t.name} has no Q8_1 mat-vec kernel: float matmul"
        self.register_buffer("weight", torch.empty(total, dtype=torch.uint8, device=device))
        self._fallback_index: list[int] = [i for i in range(len(specs)) if i not in self.seg_members]
        for i in self._fallback_index:
            self.register_buffer(f"fallback_{i}", torch.empty(self.out_features[i], self.in_features,
                                                              dtype=torch.float32, device=device))

    def member_storage(self, i: int) -> torch.Tensor:
        """Where member i lives: its bytes in the fused buffer (uint8 [rows * row_bytes]), or for a
        fallback member its dequantized float32 weight [rows, K]."""
        if i in self.seg_members:
            off = self.seg_offsets[self.seg_members.index(i)]
            return self.weight[off:off + self.out_features[i] * self._row_bytes[i]]
        return getattr(self, f"fallback_{i}")

    def fill_member(self, i: int, rows: torch.Tensor | np.ndarray, row_begin: int = 0) -> None:
        """Copy GGUF rows `rows` (uint8 [n, row_bytes]) of member i into place at row `row_begin`,
        dequantizing them when the member is a fallback."""
        rows = _as_byte_rows(self.names[i], rows)
        n = rows.shape[0]
        if rows.shape[1] != self._row_bytes[i] or not 0 <= row_begin <= self.out_features[i] - n:
            raise ValueError(f"member {self.names[i]!r}: rows [{row_begin}, {row_begin + n}) of "
                             f"{rows.shape[1]} bytes do not fit its {self.out_features[i]} rows of "
                             f"{self._row_bytes[i]} bytes")
        dest = self.member_storage(i)
        if i in self.seg_members:
            rb = self._row_bytes[i]
            dest[row_begin * rb:(row_begin + n) * rb].copy_(rows.reshape(-1))
        else:
            dest[row_begin:row_begin + n].copy_(ops.dequantize_any(rows, self.qtypes[i]))

    @property
    def total_out_features(self) -> int:
        return sum(self.out_features)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def extra_repr(self) -> str:
        parts = [f"{n}: {t.name} x{r}" for n, t, r in zip(self.names, self.qtypes, self.out_features)]
        return f"in_features={self.in_features}, members=[{', '.join(parts)}]"

    # ---- forward paths ----
    def _check_input(self, x: torch.Tensor, what: str, width: int) -> None:
        if x.shape[-1] != width:
            raise ValueError(f"FusedQuantLinear: {what} must have last dimension {width} "
                             f"(in_features {self.in_features}), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float x [..., K] -> Q8_1 -> fused mat-vec -> float32 [..., sum N]."""
        self._check_input(x, "x", self.in_features)
        return self._project(ops.quantize_q8_1(x.contiguous()), x)

    def forward_q8(self, x_q8: torch.Tensor) -> torch.Tensor:
        """Q8_1 activations uint8 [..., K/32*36] -> float32 [..., sum N]."""
        self._check_input(x_q8, "x_q8", self.in_features // 32 * 36)
        return self._project(x_q8, None)

    def rms_norm_forward(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The decode hot path: rms_norm(x) * norm_weight -> Q8_1 -> fused mat-vec, in one norm pass."""
        self._check_input(x, "x", self.in_features)
        x = x.contiguous()
        if self._fallback_index:
            x_q8, h = ops.rms_norm_mul_q8_1(x, norm_weight, eps, return_float=True)
            return self._project(x_q8, h)
        # One op for norm + fused mat-vec (on CUDA: two kernels chained by programmatic dependent launch,
        # or one with GGFUSE_FUSED_NORM=1; docs/PERFORMANCE.md).
        return ops.rms_norm_mat_vec_q8_1(x, norm_weight, eps, self.weight, self.seg_qtypes, self.seg_rows,
                                         self.seg_offsets)

    def _project(self, x_q8: torch.Tensor, x_float: torch.Tensor | None) -> torch.Tensor:
        lead = x_q8.shape[:-1]
        x2 = x_q8.reshape(-1, x_q8.shape[-1])
        fused = None
        if self.seg_members:
            fused = ops.mat_vec_q8_1(x2, self.weight, self.seg_qtypes, self.seg_rows, self.seg_offsets)
            if not self._fallback_index:
                return fused.reshape(*lead, fused.shape[-1])
        # Fallback members: float matmul of the float input (or of the dequantized Q8_1 input when
        # only Q8_1 was given, so forward_q8 sees exactly the activations the fused members see).
        if x_float is None:
            x_float = ops.dequantize(x2, GGMLQuantizationType.Q8_1)
        xf = x_float.reshape(-1, self.in_features).float()
        pieces: list[torch.Tensor] = [None] * len(self.names)  # type: ignore[list-item]
        col = 0
        for i, rows in zip(self.seg_members, self.seg_rows):
            pieces[i] = fused[:, col:col + rows]
            col += rows
        for i in self._fallback_index:
            pieces[i] = xf @ getattr(self, f"fallback_{i}").t()
        out = torch.cat(pieces, dim=-1)
        return out.reshape(*lead, out.shape[-1])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-member views of an output [..., sum N], in member order."""
        if y.shape[-1] != self.total_out_features:
            raise ValueError(f"split: expected last dimension {self.total_out_features}, got {tuple(y.shape)}")
        return tuple(torch.split(y, list(self.out_features), dim=-1))


def rms_norm_mat_vec(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     fused: FusedQuantLinear) -> torch.Tensor:
    """The decode hot path: rms_norm(x) * norm_weight -> Q8_1 -> fused mat-vec -> [B, sum N]."""
    return fused.rms_norm_forward(x, norm_weight, eps)
