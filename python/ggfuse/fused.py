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
from gguf import GGMLQuantizationType, quants

from . import ops
from .formats import MAT_VEC_TYPES, DEQUANTIZE_TYPES, as_qtype, values_per_row

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


def _dequantize_float(w: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    if qtype in DEQUANTIZE_TYPES:
        return ops.dequantize(w.contiguous(), qtype)
    # Types ggfuse has no kernel for: gguf-py's reference dequantizer (load time only).
    return torch.from_numpy(quants.dequantize(w.cpu().numpy(), qtype).astype(np.float32)).to(w.device)


class FusedQuantLinear(torch.nn.Module):
    """Projections `members = [(name, weight_bytes [N_i, row_bytes_i] uint8, qtype), ...]` sharing
    one input of K features; the output is `[B, sum N_i]` with members' columns in member order."""

    def __init__(self, members: Sequence[tuple], device: torch.device | str | None = None):
        super().__init__()
        if not members:
            raise ValueError("FusedQuantLinear needs at least one member")
        self.names: tuple[str, ...] = tuple(str(m[0]) for m in members)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"member names must be unique, got {self.names}")
        self.qtypes: tuple[GGMLQuantizationType, ...] = tuple(as_qtype(m[2]) for m in members)
        weights = [_as_byte_rows(n, m[1]) for n, m in zip(self.names, members)]
        ks = [values_per_row(t, w.shape[1]) for t, w in zip(self.qtypes, weights)]
        if len(set(ks)) != 1:
            raise ValueError("members must have the same input features K, got "
                             + ", ".join(f"{n}: {k}" for n, k in zip(self.names, ks)))
        self.in_features: int = ks[0]
        self.out_features: tuple[int, ...] = tuple(int(w.shape[0]) for w in weights)
        target = torch.device(device) if device is not None else weights[0].device

        # Segments of the fused buffer, and fallback members kept as float weights.
        self.seg_members: list[int] = []
        self.seg_qtypes: list[int] = []
        self.seg_rows: list[int] = []
        self.seg_offsets: list[int] = []
        self.fallbacks: dict[str, str] = {}
        total = 0
        for i, (t, w) in enumerate(zip(self.qtypes, weights)):
            if t in MAT_VEC_TYPES:
                total = -(-total // SEGMENT_ALIGN) * SEGMENT_ALIGN
                self.seg_members.append(i)
                self.seg_qtypes.append(int(t))
                self.seg_rows.append(int(w.shape[0]))
                self.seg_offsets.append(total)
                total += w.numel()
            else:
                self.fallbacks[self.names[i]] = f"{t.name} has no Q8_1 mat-vec kernel: float matmul"
        buffer = torch.empty(total, dtype=torch.uint8, device=target)
        for i, off in zip(self.seg_members, self.seg_offsets):
            w = weights[i]
            buffer[off:off + w.numel()].copy_(w.reshape(-1), non_blocking=False)
        self.register_buffer("weight", buffer)
        self._fallback_index: list[int] = [i for i in range(len(weights)) if i not in self.seg_members]
        for i in self._fallback_index:
            self.register_buffer(f"fallback_{i}", _dequantize_float(weights[i], self.qtypes[i]).to(target))
        # Output columns of each member: a permutation only when fallbacks sit between segments.
        self._fused_in_order = self.seg_members == list(range(len(self.seg_members)))

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
        return self._project(ops.rms_norm_mul_q8_1(x, norm_weight, eps), None)

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
