"""Bad GGUF files: each kind must raise ggfuse.GGUFError naming the file (and the tensor at fault),
quickly — never a crash, a hang or a huge allocation. The files are written here.

Header-level damage is built byte by byte with a small GGUF encoder (`gguf_bytes`, from the format
as gguf-py's writer lays it out); metadata / shape damage uses gguf-py's writer (conftest.write_model).
"""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

import ggfuse
from conftest import deadline
from test_loader_families import E, FF, HD, H, llama, qwen35, qwen3next

DEADLINE_S = 20


# ---------------------------------------------------------------- a byte-level GGUF encoder

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, V.STRING, s(value))


def tensor_info(name: str, ne: list[int], qtype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", qtype, offset)


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes, *, magic=b"GGUF", version=3,
               n_kv=None, n_tensors=None, alignment=32, version_bytes=None) -> bytes:
    head = magic + (version_bytes if version_bytes is not None else struct.pack("<I", version))
    head += struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    return body + data


ARCH = kv_str("general.architecture", "llama")


def one_tensor(ne=(32,), qtype=T.F32, offset=0, name="x", extra_kvs=(), data=None, **kw) -> bytes:
    nbytes = int(np.prod(ne)) * 4 if qtype == T.F32 else 0
    data = b"\x01" * nbytes if data is None else data
    return gguf_bytes([ARCH, *extra_kvs], [tensor_info(name, list(ne), qtype, offset)], data, **kw)


def load_error(path, *, tensor: str | None = None, match: str | None = None) -> ggfuse.GGUFError:
    with deadline(DEADLINE_S, f"loading {path}"):
        with pytest.raises(ggfuse.GGUFError) as info:
            ggfuse.load_gguf(path)
    e = info.value
    assert str(path) in str(e) and isinstance(e, ValueError)
    if tensor is not None:
        assert e.tensor == tensor and repr(tensor) in str(e), str(e)
    if match is not None:
        assert match in str(e), str(e)
    return e


@pytest.fixture
def bad_file(tmp_path):
    def write(content: bytes, name="bad.gguf"):
        p = tmp_path / name
        p.write_bytes(content)
        return p
    return write


def test_the_encoder_writes_a_readable_file(bad_file):
    # A well-formed header that only lacks the llama metadata: the error comes from the metadata.
    load_error(bad_file(one_tensor()), match="llama.block_count")


# ---------------------------------------------------------------- header damage

HEADER_CASES = {
    "empty": (b"", "empty file"),
    "too short for a magic": (b"GG", "not a GGUF file"),
    "wrong magic": (one_tensor(magic=b"GGML"), "not a GGUF file"),
    "version 1": (one_tensor(version=1), "unsupported GGUF version 1"),
    "version 4": (one_tensor(version=4), "unsupported GGUF version 4"),
    "absurd version": (one_tensor(version=0xFFFFFFFF), "unsupported GGUF version"),
    "big-endian": (one_tensor(version_bytes=struct.pack(">I", 3)), "big-endian"),
    "truncated counts": (b"GGUF" + struct.pack("<IQ", 3, 1), "truncated"),
    "absurd metadata count": (one_tensor(n_kv=1 << 62), "metadata count"),
    "absurd tensor count": (one_tensor(n_tensors=(1 << 64) - 1), "tensor count"),
    "absurd key length": (gguf_bytes([struct.pack("<Q", 1 << 60) + b"k" * 16], [], b""), "bytes long"),
    "absurd string length": (gguf_bytes([kv("a", V.STRING, struct.pack("<Q", 1 << 62))], [], b""), "truncated"),
    "absurd array length": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, 1 << 62))], [], b""),
                            "more than the file can hold"),
    "absurd string array": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 1 << 40))], [], b""),
                            "more than the file can hold"),
    "nested array": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) + struct.pack("<IQ", V.UINT8, 0))],
                                [], b""), "does not allow"),
    "unknown value type": (gguf_bytes([kv("a", 99, b"\0" * 8)], [], b""), "unknown value type"),
    "duplicate key": (gguf_bytes([ARCH, ARCH], [], b""), "appears twice"),
    "key not utf-8": (gguf_bytes([kv(b"\xff\xfe", V.UINT8, b"\0")], [], b""), "UTF-8"),
    "alignment not a power of two": (one_tensor(extra_kvs=[kv_u32("general.alignment", 24)]), "power of two"),
    "alignment of the wrong type": (one_tensor(extra_kvs=[kv_str("general.alignment", "32")]), "uint32"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_damaged_header(case, bad_file):
    content, message = HEADER_CASES[case]
    load_error(bad_file(content), match=message)


TENSOR_CASES = {
    "no dimensions": (dict(ne=()), "0 dimensions"),
    "five dimensions": (dict(ne=(32, 1, 1, 1, 1)), "5 dimensions"),
    "unknown type id": (dict(qtype=99), "unknown GGML type id 99"),
    "removed type id (Q4_2)": (dict(qtype=4), "unknown GGML type id 4"),
    "row not whole blocks": (dict(ne=(33, 2), qtype=T.Q4_0, data=b"\0" * 64), "whole blocks"),
    "offset not aligned": (dict(offset=8), "alignment"),
    "data past the end": (dict(offset=1 << 40), "past the end"),
    "data cut short": (dict(data=b"\1" * 100), "past the end"),
    "absurd shape": (dict(ne=(1 << 40, 1 << 40)), "elements"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_damaged_tensor_info(case, bad_file):
    kwargs, message = TENSOR_CASES[case]
    load_error(bad_file(one_tensor(**kwargs)), tensor="x", match=message)


def test_duplicate_and_overlapping_tensors(bad_file):
    dup = gguf_bytes([ARCH], [tensor_info("x", [32], T.F32, 0), tensor_info("x", [32], T.F32, 128)], b"\0" * 256)
    load_error(bad_file(dup, "dup.gguf"), tensor="x", match="twice")
    overlap = gguf_bytes([ARCH], [tensor_info("a", [32], T.F32, 0), tensor_info("b", [32], T.F32, 64)], b"\0" * 256)
    load_error(bad_file(overlap, "overlap.gguf"), tensor="b", match="overlaps")


def test_truncated_anywhere(testdata_dir, tmp_path):
    """Every cut of a llama.cpp-made file before the end of its last tensor fails cleanly (every
    offset of the header, and a random sample of the data); cuts in the trailing padding load."""
    original = (testdata_dir / "tiny-llama-q4_0.gguf").read_bytes()
    full = ggfuse.load_gguf(testdata_dir / "tiny-llama-q4_0.gguf", load_weights=False)
    data_end = max(t.data_offset + int(t.n_bytes) for t in full.reader.tensors)
    header_end = full.reader.data_offset
    cuts = list(range(0, header_end, 3)) + random.sample(range(header_end, data_end), 64) + [data_end - 1]
    path = tmp_path / "cut.gguf"
    with deadline(60, "the truncation sweep"):
        for n in cuts:
            path.write_bytes(original[:n])
            with pytest.raises(ggfuse.GGUFError) as info:
                ggfuse.load_gguf(path, load_weights=False)
            assert str(path) in str(info.value)
    path.write_bytes(original[:data_end])
    assert len(ggfuse.load_gguf(path).groups()) == 8


def test_file_truncated_while_loading(testdata_dir, tmp_path, monkeypatch):
    """A file that shrinks between the header check and the upload fails cleanly too."""
    import os
    path = tmp_path / "shrinking.gguf"
    path.write_bytes((testdata_dir / "tiny-llama-q4_k_m.gguf").read_bytes())
    real_preadv = os.preadv

    def preadv_of_a_truncated_file(fd, buffers, offset):
        return 0  # end of file
    monkeypatch.setattr(os, "preadv", preadv_of_a_truncated_file)
    load_error(path, match="ended at byte")
    monkeypatch.setattr(os, "preadv", real_preadv)


# ---------------------------------------------------------------- metadata / shape damage

def llama_file(gguf_file, *, drop=(), replace=None, md=None, md_drop=()):
    fam = llama()
    tensors = [t for t in fam.tensors if t[0] not in drop]
    if replace:
        tensors = [replace.get(t[0], t) for t in tensors]
    metadata = {k: v for k, v in fam.metadata.items() if k not in md_drop}
    metadata.update(md or {})
    return gguf_file(fam.arch, metadata, tensors)


def test_missing_required_tensor(gguf_file):
    load_error(llama_file(gguf_file, drop=("blk.1.attn_k.weight",)), match="'blk.1.attn_k.weight' is missing")
    load_error(llama_file(gguf_file, drop=("blk.0.ffn_norm.weight",)), match="'blk.0.ffn_norm.weight' is missing")
    load_error(llama_file(gguf_file, drop=("output_norm.weight",)), match="'output_norm.weight' is missing")


def test_shape_inconsistent_with_metadata(gguf_file):
    bad_q = {"blk.0.attn_q.weight": ("blk.0.attn_q.weight", T.Q4_K, (H * HD + 32, E))}
    e = load_error(llama_file(gguf_file, replace=bad_q), tensor="blk.0.attn_q.weight", match="heads")
    assert "[256, 256]" in str(e)
    bad_up = {"blk.1.ffn_up.weight": ("blk.1.ffn_up.weight", T.Q4_K, (FF // 2, E))}
    load_error(llama_file(gguf_file, replace=bad_up), tensor="blk.1.ffn_up.weight", match="feed_forward_length")
    # The file's heads disagree with the metadata: 4 KV heads declared, K/V rows hold 2.
    load_error(llama_file(gguf_file, md={"{arch}.attention.head_count_kv": 4}), tensor="blk.0.attn_k.weight")
    bad_norm = {"blk.0.attn_norm.weight": ("blk.0.attn_norm.weight", T.F32, (E // 2,))}
    load_error(llama_file(gguf_file, replace=bad_norm), tensor="blk.0.attn_norm.weight")


def test_type_inconsistent_with_its_role(gguf_file):
    quantized_norm = {"blk.0.attn_norm.weight": ("blk.0.attn_norm.weight", T.Q8_0, (E,))}
    load_error(llama_file(gguf_file, replace=quantized_norm), tensor="blk.0.attn_norm.weight", match="F32")


def test_bad_metadata(gguf_file):
    load_error(llama_file(gguf_file, md_drop=("{arch}.block_count",)), match="llama.block_count is missing")
    load_error(llama_file(gguf_file, md_drop=("{arch}.attention.layer_norm_rms_epsilon",)),
               match="layer_norm_rms_epsilon is missing")
    load_error(llama_file(gguf_file, md={"{arch}.block_count": 1 << 31}), match="only")
    load_error(llama_file(gguf_file, md={"{arch}.embedding_length": "wide"}), match="must be an integer")
    load_error(llama_file(gguf_file, md={"{arch}.attention.head_count": [4, 4, 4]}), match="3 per-layer values")
    load_error(llama_file(gguf_file, md={"{arch}.attention.head_count": 0}), match="0 for every layer")


def test_hybrid_layer_kind_must_match_the_file(gguf_file):
    # qwen3next written with the default interval (layer 3 full attention), but metadata says 2:
    # layer 1 would be full attention and holds DeltaNet tensors.
    fam = qwen3next()
    path = gguf_file(fam.arch, {**fam.metadata, "{arch}.full_attention_interval": 2}, fam.tensors)
    e = load_error(path, match="full_attention_interval = 2")
    assert e.tensor is not None and e.tensor.startswith("blk.1.")
    # qwen35 written with interval 2, metadata claims the default 4: layer 1 holds attn_q.
    fam = qwen35()
    md = {k: v for k, v in fam.metadata.items() if k != "{arch}.full_attention_interval"}
    load_error(gguf_file(fam.arch, md, fam.tensors, name="q35.gguf"), tensor="blk.1.attn_q.weight",
               match="linear-attention")


def test_hybrid_ssm_dims_must_match_the_file(gguf_file):
    fam = qwen35()
    md = {**fam.metadata, "{arch}.ssm.group_count": 4}   # key_dim doubles; the file's q|k|v do not
    e = load_error(gguf_file(fam.arch, md, fam.tensors), match="key_dim")
    assert e.tensor in ("blk.0.ssm_conv1d.weight", "blk.0.attn_qkv.weight")


def test_moe_router_must_match_expert_count(gguf_file):
    fam = qwen3next()
    md = {**fam.metadata, "{arch}.expert_count": 8}
    load_error(gguf_file(fam.arch, md, fam.tensors), tensor="blk.0.ffn_gate_inp.weight", match="expert_count")


def test_integer_tensor_as_weight(gguf_file):
    # attn_v written as F32, then its type id patched to I32 (also 4 bytes a value, so the layout holds).
    fam = llama()
    tensors = [t if t[0] != "blk.0.attn_v.weight" else (t[0], T.F32, t[2]) for t in fam.tensors]
    path = gguf_file(fam.arch, fam.metadata, tensors, name="i32.gguf")
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_v.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", raw, type_at)[0] == T.F32
    struct.pack_into("<I", raw, type_at, T.I32)
    path.write_bytes(bytes(raw))
    load_error(path, tensor="blk.0.attn_v.weight", match="not a weight type")
