"""`python -m ggfuse inspect / demo / bench / bench-load`, run as a user would (subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ggfuse
from ggfuse import demo


def run_cli(*args, cwd, timeout=240) -> subprocess.CompletedProcess:
    # Wide, plain output so that table cells are not folded and assertions can read them.
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "ggfuse", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_inspect_shows_the_fusion_plan(testdata_dir, tmp_path):
    r = run_cli("inspect", testdata_dir / "tiny-llama-q4_k_m.gguf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "arch llama" in out and "4 layers" in out
    assert "attn_q, attn_k, attn_v" in out and "ffn_gate, ffn_up" in out
    assert "Q4_K/Q4_K/Q6_K" in out and "256+128+128" in out   # layer 2's mixed QKV
    assert out.count("fused") >= 8
    assert "8 groups" in out and "of all tensor bytes fused" in out


def test_inspect_names_fallbacks_and_left_out_tensors(tmp_path, gguf_file):
    from test_loader_families import qwen35moe
    fam = qwen35moe()
    path = gguf_file(fam.arch, fam.metadata, fam.tensors)
    r = run_cli("inspect", path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "linear_attention" in r.stdout and "attn_qkv, attn_gate, ssm_beta, ssm_alpha" in r.stdout
    assert "not fused" in r.stdout and "MoE router" in r.stdout and "routed experts" in r.stdout
    assert "full attention every 4 layers" in r.stdout


def test_inspect_a_bad_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    r = run_cli("inspect", bad, cwd=tmp_path)
    assert r.returncode == 2
    assert "error" in r.stderr and str(bad) in r.stderr.replace("\n", "") and "Traceback" not in r.stderr


def test_demo_without_a_file(tmp_path):
    r = run_cli("demo", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 8 groups match" in r.stdout
    assert "Q4_K/Q4_K/Q6_K" in r.stdout   # the Q4_K_M mix reached a fused QKV
    assert "FAIL" not in r.stdout


def test_demo_on_a_file(testdata_dir, tmp_path):
    r = run_cli("demo", testdata_dir / "tiny-llama-q4_0.gguf", "--batch", "2", "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 8 groups match" in r.stdout


def test_demo_exits_non_zero_when_a_check_fails(testdata_dir, monkeypatch, capsys):
    monkeypatch.setattr(demo, "FLOAT_TOL", 0.0)  # nothing can pass
    assert demo.main([str(testdata_dir / "tiny-llama-q4_k_m.gguf"), "--steps", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_dispatch(tmp_path):
    r = run_cli("bench", "--help", cwd=tmp_path, timeout=120)
    try:
        import ggfuse.bench  # noqa: F401
    except ModuleNotFoundError:
        assert r.returncode == 2 and "ggfuse.bench" in r.stderr and "Traceback" not in r.stderr
    else:
        assert r.returncode == 0, r.stderr


def test_bench_load_small(tmp_path):
    r = run_cli("bench-load", "--size-gb", "0.1", "--device", "cpu", "--repeats", "1", "--dir", tmp_path,
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GB/s" in r.stdout and "peak RSS" in r.stdout
    assert not list(tmp_path.glob("ggfuse-bench-load-*/*.gguf"))  # the model file was removed


def test_usage(tmp_path):
    r = run_cli(cwd=tmp_path)
    assert r.returncode == 0 and "inspect" in r.stdout and "bench-load" in r.stdout
    r = run_cli("nonsense", cwd=tmp_path)
    assert r.returncode == 2


@pytest.mark.parametrize("command", ["inspect", "demo", "bench-load"])
def test_command_help(command, tmp_path):
    r = run_cli(command, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout


def test_exported_api():
    for name in ("load_gguf", "GGUFError", "GGUFModel", "FusedGroup", "QuantizedTensor", "FusionReportRow"):
        assert hasattr(ggfuse, name) and name in ggfuse.__all__
    assert issubclass(ggfuse.GGUFError, ValueError)
