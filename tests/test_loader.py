"""load_gguf on the llama.cpp-made models in ../shared/testdata, and the GGUFModel API.

The test models are required: when ../shared/testdata is missing these tests fail, they do not skip.
"""
from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, quants

import ggfuse
from conftest import FileOracle, check_group, write_model

pytestmark = pytest.mark.usefixtures("poison_outputs")

TEST_MODELS = ("tiny-llama-q4_0.gguf", "tiny-llama-q4_k_m.gguf")


@pytest.fixture(params=TEST_MODELS)
def test_model(request, testdata_dir):
    manifest = json.loads((testdata_dir / "MANIFEST.json").read_text())
    return testdata_dir / request.param, manifest[request.param]


def test_groups_of_the_llama_cpp_models(test_model):
    path, info = test_model
    m = ggfuse.load_gguf(path)
    cfg = info["config"]
    assert m.arch == info["arch"] == "llama"
    hp = m.hparams
    assert (hp.n_embd, hp.n_layer, hp.n_head[0], hp.n_head_kv[0], hp.head_dim_k, hp.n_ff[0]) == (
        cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_kv"], cfg["head_dim"], cfg["n_ff"])
    assert m.metadata["llama.embedding_length"] == cfg["n_embd"]
    groups = m.groups()
    assert len(groups) == 2 * cfg["n_layer"]
    types = info["tensor_types"]
    for i in range(cfg["n_layer"]):
        attn, ffn = groups[2 * i], groups[2 * i + 1]
        assert attn.norm == f"blk.{i}.attn_norm.weight" and attn.kind == "attention"
        assert attn.members == tuple(f"blk.{i}.attn_{p}.weight" for p in "qkv")
        assert attn.out_features == (cfg["n_head"] * cfg["head_dim"], cfg["n_kv"] * cfg["head_dim"],
                                     cfg["n_kv"] * cfg["head_dim"])
        assert ffn.norm == f"blk.{i}.ffn_norm.weight" and ffn.kind == "ffn"
        assert ffn.members == (f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight")
        assert ffn.out_features == (cfg["n_ff"], cfg["n_ff"])
        for g in (attn, ffn):
            assert [t.name for t in g.qtypes] == [types[n] for n in g.members]
            assert g.in_features == cfg["n_embd"] and g.norm_kind == "rms"
    if info["ftype"] == "q4_k_m":  # layers 2 and 3 hold a mixed Q4_K/Q6_K QKV
        assert [t.name for t in groups[4].qtypes] == ["Q4_K", "Q4_K", "Q6_K"]


def test_numerics_of_the_llama_cpp_models(test_model):
    path, _ = test_model
    m = ggfuse.load_gguf(path)
    file = FileOracle(path)
    for g in m.groups():
        check_group(g, file, batch=random.choice([1, 4, 8, 11]))


def test_report_and_totals(test_model):
    path, info = test_model
    m = ggfuse.load_gguf(path)
    rows = m.fusion_report()
    assert [(r.layer, r.norm, r.members) for r in rows] == [(g.layer, g.norm, g.members) for g in m.groups()]
    assert all(r.status == "fused" and r.reason == "" for r in rows)
    assert [r.types for r in rows] == [tuple(info["tensor_types"][n] for n in r.members) for r in rows]
    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    totals = m.fusion_totals()
    assert totals["fused_bytes"] == sum(sizes[n] for g in m.groups() for n in g.members)
    assert totals["total_bytes"] == sum(sizes.values())
    assert totals["fallback_bytes"] == 0 and totals["group_fused_fraction"] == 1.0
    assert 0 < totals["fused_fraction"] < 1


def test_tensor_access_is_zero_copy(test_model):
    path, info = test_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on read-only numpy arrays
        m = ggfuse.load_gguf(path)
        reader_tensors = {t.name: t for t in m.reader.tensors}
        norm = m.tensor("blk.0.attn_norm.weight")
        q = m.tensor("blk.1.attn_q.weight")
        out = m.tensor("output.weight")
    file = GGUFReader(path)
    ref = {t.name: t for t in file.tensors}
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float32 and norm.shape == (info["config"]["n_embd"],)
    assert norm.data_ptr() == reader_tensors["blk.0.attn_norm.weight"].data.ctypes.data
    assert np.array_equal(norm.numpy(), ref["blk.0.attn_norm.weight"].data)
    assert isinstance(q, ggfuse.QuantizedTensor) and q.qtype.name == info["tensor_types"]["blk.1.attn_q.weight"]
    assert q.shape == (256, 256) and q.data.dtype == torch.uint8
    assert q.data.data_ptr() == reader_tensors["blk.1.attn_q.weight"].data.ctypes.data
    assert np.array_equal(q.data.numpy(), ref["blk.1.attn_q.weight"].data)
    assert out.qtype == T.Q6_K
    np.testing.assert_array_equal(q.dequantize().numpy(), quants.dequantize(q.data.numpy(), q.qtype))
    assert m.tensor_type("output.weight") == T.Q6_K and "output.weight" in m.tensor_names()
    with pytest.raises(KeyError, match="no tensor"):
        m.tensor("blk.9.attn_q.weight")


def test_streamed_upload_matches_the_direct_construction(test_model):
    """Chunked streaming from the file gives the bytes FusedQuantLinear would hold, with every read
    bounded by the chunk size and no byte outside the groups read."""
    path, _ = test_model
    reads = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        reads.append(sum(memoryview(b).nbytes for b in buffers))
        return real_preadv(fd, buffers, offset)

    chunk = 1 << 16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "preadv", counting_preadv)
        m = ggfuse.load_gguf(path, chunk_bytes=chunk)
    assert reads and max(reads) <= chunk
    assert sum(reads) == sum(g.nbytes for g in m.groups())
    h = torch.randn(3, m.hparams.n_embd)
    for g in m.groups():
        direct = ggfuse.FusedQuantLinear([(n, m.tensor(n).data, m.tensor(n).qtype) for n in g.members])
        assert torch.equal(g.project(h), direct(h))


def test_plan_only_reads_no_weights(test_model):
    path, _ = test_model
    m = ggfuse.load_gguf(path, load_weights=False)
    assert len(m.groups()) == 8 and all(not g.loaded for g in m.groups())
    assert [r.status for r in m.fusion_report()] == ["fused"] * 8
    with pytest.raises(RuntimeError, match="load_weights=False"):
        m.groups()[0](torch.randn(1, 256))


def test_progress_bar(test_model, capsys):
    path, _ = test_model
    m = ggfuse.load_gguf(path, progress=True)
    assert len(m.groups()) == 8


def test_input_checks(test_model):
    path, _ = test_model
    g = ggfuse.load_gguf(path).groups()[0]
    with pytest.raises(ValueError, match=r"\[\.\.\., 256\]"):
        g(torch.randn(2, 128))
    with pytest.raises(ValueError, match="split expects"):
        g.split(torch.randn(2, 7))
    with pytest.raises(KeyError):
        ggfuse.load_gguf(path).group("blk.0.attn_q.weight")
    assert ggfuse.load_gguf(path).group("blk.1.ffn_norm.weight").members[0] == "blk.1.ffn_gate.weight"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(test_model):
    with pytest.raises(RuntimeError, match="CUDA"):
        ggfuse.load_gguf(test_model[0], device="cuda")


@pytest.mark.skipif(not (torch.cuda.is_available() and ggfuse.has_cuda_kernels())
                    and os.environ.get("GGFUSE_REQUIRE_CUDA") != "1",
                    reason="needs CUDA kernels (GGFUSE_REQUIRE_CUDA=1 makes this a failure)")
def test_cuda_groups_match_cpu_and_gguf_py(test_model):
    path, _ = test_model
    mc = ggfuse.load_gguf(path, device="cuda", chunk_bytes=1 << 16)
    m = ggfuse.load_gguf(path)
    file = FileOracle(path)
    for gc, g in zip(mc.groups(), m.groups()):
        assert gc.norm_weight.device.type == "cuda"
        check_group(gc, file, batch=random.choice([1, 4, 8, 11]))
        x = torch.randn(4, g.in_features)
        from oracle import rel_err
        assert rel_err(gc(x.cuda()), g(x).double().numpy()) < 1e-4


def test_unknown_architecture_loads_without_groups(tmp_path):
    tensors = [("token_embd.weight", T.Q8_0, (32, 64)), ("blk.0.attn_norm.weight", T.F32, (64,))]
    path = write_model(tmp_path / "other.gguf", "mamba", {"{arch}.block_count": 1}, tensors)
    m = ggfuse.load_gguf(path)
    assert m.arch == "mamba" and m.groups() == []
    (row,) = m.fusion_report()
    assert row.status == "not fused" and "mamba" in row.reason
    assert isinstance(m.tensor("token_embd.weight"), ggfuse.QuantizedTensor)
