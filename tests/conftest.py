"""Shared fixtures: the llama.cpp-made test models, GGUF files written in the test, a hang guard.

Nothing here knows about ggfuse's loader: files are written with gguf-py's `GGUFWriter` directly and
weights are quantized by ggfuse's or gguf-py's quantizer (random blocks for types neither writes).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFValueType, GGUFWriter, quants

import oracle

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    """../shared/testdata beside the repository; its absence fails the test (it is not optional)."""
    if not (TESTDATA / "MANIFEST.json").is_file():
        pytest.fail(f"{TESTDATA} is missing: the tests need the llama.cpp-made models in ../shared/testdata "
                    "beside the repository root", pytrace=False)
    return TESTDATA


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail instead of hanging: SIGALRM after `seconds` raises in the main thread."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- weights

# Types ggfuse's quantizer writes; gguf-py's writes these others; the rest get random valid blocks.
_GGFUSE_QUANTIZES = (T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K)
_GGUF_PY_QUANTIZES = (T.Q4_1, T.Q5_0, T.Q5_1, T.BF16)


def encode(x: np.ndarray, qtype: T) -> np.ndarray:
    """float32 values [..., K] stored as qtype: float arrays for F32/F16, uint8 GGUF bytes
    [..., row_bytes] otherwise."""
    shape = x.shape
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, shape[-1])
    if qtype == T.F32:
        return x2.reshape(shape)
    if qtype == T.F16:
        return x2.astype(np.float16).reshape(shape)
    if qtype in _GGFUSE_QUANTIZES:
        import ggfuse
        data = ggfuse.quantize(torch.from_numpy(x2), qtype).numpy()
    elif qtype in _GGUF_PY_QUANTIZES:
        data = quants.quantize(x2, qtype)
        if qtype == T.BF16:
            data = data.view(np.uint8)
    else:  # no quantizer at hand: random valid blocks of the same shape
        data = oracle.random_blocks(qtype, x2.shape[0], x2.shape[1])
    return data.reshape(*shape[:-1], -1)


def make_weight(qtype: T, shape: Sequence[int], rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random values of `shape` (torch order, K last) stored as qtype (see `encode`)."""
    return encode((rng.standard_normal(tuple(shape)) * scale).astype(np.float32), qtype)


def add_metadata(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
    else:
        raise TypeError(f"{key}: {value!r}")


def write_model(path: Path, arch: str, metadata: Mapping[str, object],
                tensors: Sequence[tuple[str, T, tuple[int, ...]]],
                rng: np.random.Generator | None = None) -> Path:
    """A GGUF file of `arch` with metadata (keys may use `{arch}`) and tensors (name, type, torch-order
    shape) of fresh random values: norms around 1, biases and weights around 0."""
    rng = rng or oracle.rng()
    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        add_metadata(writer, key.format(arch=arch), value)
    for name, qtype, shape in tensors:
        if "norm" in name and len(shape) == 1:
            data = encode((1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32), qtype)
        elif name.endswith(".bias"):
            data = encode((0.1 * rng.standard_normal(shape)).astype(np.float32), qtype)
        else:
            data = make_weight(qtype, shape, rng, scale=shape[-1] ** -0.5)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_file(tmp_path):
    """`gguf_file(arch, metadata, tensors, name="model.gguf")` writes a model into tmp_path."""
    def make(arch, metadata, tensors, name="model.gguf"):
        return write_model(tmp_path / name, arch, metadata, tensors)
    return make



# ---------------------------------------------------------------- group numerics (SPEC §5)

EXACT_TOL = {"cpu": 1e-5, "cuda": 1e-4}   # against the §2 math from the Q8_1 bytes the op consumed
FLOAT_TOL = 2e-2                          # against dequant(W) @ norm(x) with float x
# Q4_0/Q5_0 take their offset through s = the sum of the *unquantized* block (SPEC §1-2), so the
# Q8 noise of a block's sum is not cancelled: it adds an error common to all rows of one input,
# about 1% of the output norm and random in size. One input row can reach 2-3%; the float check
# therefore runs over at least this many input rows, where that common part averages out.
FLOAT_CHECK_ROWS = 32


@pytest.fixture
def poison_outputs():
    """New tensors (every op output, every fresh buffer) start as NaN / 255 while a test runs."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


class FileOracle:
    """A GGUF file read with gguf-py alone: raw bytes, float64 weights, metadata."""

    def __init__(self, path):
        from gguf import GGUFReader
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.field("general.architecture")

    def field(self, key: str):
        f = self.reader.get_field(key.format(arch=getattr(self, "arch", "")))
        return None if f is None else f.contents()

    def qtype(self, name: str) -> T:
        return T(self.tensors[name].tensor_type)

    def rows(self, name: str) -> np.ndarray:
        """uint8 GGUF rows [N, row_bytes] (float types as their bytes)."""
        d = self.tensors[name].data
        return np.ascontiguousarray(d).view(np.uint8).reshape(d.shape[0], -1)

    def f64(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if T(t.tensor_type) in (T.F32, T.F16):
            return np.asarray(t.data, dtype=np.float64)
        return oracle.dequantize_weight(np.ascontiguousarray(t.data), T(t.tensor_type))

    def norm_eps(self, layer_norm: bool) -> float:
        key = "{arch}.attention.layer_norm_epsilon" if layer_norm else "{arch}.attention.layer_norm_rms_epsilon"
        return float(self.field(key))


def _rand(shape, device) -> torch.Tensor:
    # Fresh values, a random overall scale, never zeros.
    return torch.randn(*shape, dtype=torch.float64).mul(float(np.exp(np.random.uniform(-2, 2)))).float().to(device)


def _member_exact(g, file: FileOracle, xq: torch.Tensor, h: torch.Tensor) -> list[np.ndarray]:
    """Per member, the exact output: §2 math from the Q8_1 bytes for types with a kernel, a float
    matmul of the normalized floats for the rest (the documented fallback)."""
    import ggfuse
    out = []
    for name in g.members:
        qt = file.qtype(name)
        if qt in ggfuse.MAT_VEC_TYPES:
            out.append(oracle.exact_mat_vec([(file.rows(name), qt)], xq.cpu().numpy()))
        else:
            out.append(h.double().cpu().numpy() @ file.f64(name).T)
    return out


def _bias(g, file: FileOracle) -> np.ndarray:
    parts = []
    for name, rows in zip(g.members, g.out_features):
        b = name.removesuffix(".weight") + ".bias"
        parts.append(file.f64(b) if b in file.tensors else np.zeros(rows))
    return np.concatenate(parts)


def check_group(g, file: FileOracle, batch: int, x_dtype=torch.float32) -> None:
    """g(x), g.project(h) and g.split(y) against gguf-py in float64 (SPEC §5, both checks)."""
    import ggfuse
    from oracle import rel_err
    dev = g.norm_weight.device
    K = g.in_features
    layer_norm = g.norm_kind == "layer"
    assert g.eps == pytest.approx(file.norm_eps(layer_norm), rel=1e-7)
    W = np.concatenate([file.f64(n) for n in g.members])
    bias = _bias(g, file)
    nw = torch.from_numpy(file.f64(g.norm).astype(np.float32)).to(dev)
    exact_tol = EXACT_TOL[dev.type]

    def norm64(x: torch.Tensor) -> np.ndarray:
        x64 = x.double().cpu().numpy()
        if layer_norm:
            mu = x64.mean(-1, keepdims=True)
            h64 = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + g.eps)
            return h64 * file.f64(g.norm) + file.f64(g.norm_bias_name)
        return x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + g.eps) * file.f64(g.norm)

    # g(x): norm -> Q8_1 -> fused mat-vec; exact against the Q8_1 bytes of that norm.
    x = _rand((batch, K), dev).to(x_dtype)
    y = g(x)
    assert y.shape == (batch, sum(g.out_features)) and y.dtype == torch.float32
    if layer_norm:
        nb = torch.from_numpy(file.f64(g.norm_bias_name).astype(np.float32)).to(dev)
        h = torch.nn.functional.layer_norm(x.float(), (K,), nw, nb, g.eps)
        xq = ggfuse.quantize_q8_1(h)
    else:
        xq, h = ggfuse.rms_norm_mul_q8_1(x, nw, g.eps, return_float=True)
    per_member = _member_exact(g, file, xq, h)
    exact = np.concatenate(per_member, axis=1) + bias
    assert rel_err(y, exact) < exact_tol, (g.norm, rel_err(y, exact))

    # g.split(y): member order and widths, each piece exactly its member's output.
    pieces = g.split(y)
    assert [p.shape[-1] for p in pieces] == list(g.out_features)
    assert torch.equal(torch.cat(pieces, dim=-1), y)
    for piece, ref, b in zip(pieces, per_member, np.split(bias, np.cumsum(g.out_features)[:-1])):
        assert rel_err(piece, ref + b) < exact_tol, (g.norm, rel_err(piece, ref + b))

    # g(x) against float x, over enough input rows (FLOAT_CHECK_ROWS).
    if batch < FLOAT_CHECK_ROWS:
        x = _rand((FLOAT_CHECK_ROWS, K), dev).to(x_dtype)
        y = g(x)
    err = rel_err(y, norm64(x) @ W.T + bias)
    assert err < FLOAT_TOL, (g.norm, err)

    # g.project(h): already-normalized input, both checks.
    hin = _rand((batch, K), dev)
    yp = g.project(hin)
    xq = ggfuse.quantize_q8_1(hin)
    err = rel_err(yp, np.concatenate(_member_exact(g, file, xq, hin), axis=1) + bias)
    assert err < exact_tol, (g.norm, err)
    if batch < FLOAT_CHECK_ROWS:
        hin = _rand((FLOAT_CHECK_ROWS, K), dev)
        yp = g.project(hin)
    err = rel_err(yp, hin.double().cpu().numpy() @ W.T + bias)
    assert err < FLOAT_TOL, (g.norm, err)
