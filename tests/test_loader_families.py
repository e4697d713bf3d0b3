"""load_gguf on every model family, with files written here the way llama.cpp lays them out.

Each family lists its tensors (names and shapes as llama.cpp's model loader creates them) and, written
out by hand, the groups it must produce: which norm's output each projection reads. Then every
group's numerics are checked against gguf-py in float64 (conftest.check_group).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from gguf import GGMLQuantizationType as T

import ggfuse
from conftest import FileOracle, check_group

pytestmark = pytest.mark.usefixtures("poison_outputs")

E, H, HD, KV, FF, V = 256, 4, 64, 2, 512, 64    # n_embd, heads, head dim, KV heads, n_ff, vocab


@dataclass
class Family:
    arch: str
    metadata: dict
    tensors: list            # (name, type, torch-order shape)
    expected: list           # (layer, norm, members, kind)
    fallbacks: tuple = ()    # members expected on the float fallback


def blk(i: int, name: str, suffix: str = "weight") -> str:
    return f"blk.{i}.{name}.{suffix}" if suffix else f"blk.{i}.{name}"


def rms_md(n_layer: int, **extra) -> dict:
    md = {"{arch}.embedding_length": E, "{arch}.block_count": n_layer, "{arch}.feed_forward_length": FF,
          "{arch}.attention.head_count": H, "{arch}.attention.head_count_kv": KV,
          "{arch}.attention.layer_norm_rms_epsilon": 1e-6, "{arch}.context_length": 256}
    md.update(extra)
    return md


def ln_md(n_layer: int, n_kv: int = H, **extra) -> dict:
    md = {"{arch}.embedding_length": E, "{arch}.block_count": n_layer, "{arch}.feed_forward_length": FF,
          "{arch}.attention.head_count": H, "{arch}.attention.head_count_kv": n_kv,
          "{arch}.attention.layer_norm_epsilon": 1e-5, "{arch}.context_length": 256}
    md.update(extra)
    return md


def globals_(norm_bias: bool = False) -> list:
    t = [("token_embd.weight", T.Q4_K, (V, E)), ("output_norm.weight", T.F32, (E,)),
         ("output.weight", T.Q6_K, (V, E))]
    if norm_bias:
        t.append(("output_norm.bias", T.F32, (E,)))
    return t


def llama_attention(i: int, q=T.Q4_K, k=T.Q4_K, v=T.Q6_K, bias=False, qk_norm=False, head_dim=HD) -> list:
    t = [(blk(i, "attn_norm"), T.F32, (E,)),
         (blk(i, "attn_q"), q, (H * head_dim, E)),
         (blk(i, "attn_k"), k, (KV * head_dim, E)),
         (blk(i, "attn_v"), v, (KV * head_dim, E)),
         (blk(i, "attn_output"), T.Q4_K, (E, H * head_dim))]
    if bias:
        t += [(blk(i, "attn_q", "bias"), T.F32, (H * head_dim,)), (blk(i, "attn_k", "bias"), T.F32, (KV * head_dim,)),
              (blk(i, "attn_v", "bias"), T.F32, (KV * head_dim,))]
    if qk_norm:
        t += [(blk(i, "attn_q_norm"), T.F32, (head_dim,)), (blk(i, "attn_k_norm"), T.F32, (head_dim,))]
    return t


def llama_ffn(i: int, gate=T.Q4_K, up=T.Q4_K, down=T.Q6_K, norm="ffn_norm") -> list:
    return [(blk(i, norm), T.F32, (E,)), (blk(i, "ffn_gate"), gate, (FF, E)), (blk(i, "ffn_up"), up, (FF, E)),
            (blk(i, "ffn_down"), down, (E, FF))]


def qkv(i):
    return [blk(i, "attn_q"), blk(i, "attn_k"), blk(i, "attn_v")]


def gate_up(i):
    return [blk(i, "ffn_gate"), blk(i, "ffn_up")]


# ---------------------------------------------------------------- the families

def llama() -> Family:
    tensors = globals_()
    # Layer 0: a Q4_K_M-style mixed QKV (Q6_K V); layer 1: Q4_K + Q5_K + Q8_0 and Q6_K + Q4_K FFN.
    tensors += llama_attention(0) + llama_ffn(0)
    tensors += llama_attention(1, q=T.Q4_K, k=T.Q5_K, v=T.Q8_0) + llama_ffn(1, gate=T.Q6_K, up=T.Q4_K)
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    return Family("llama", rms_md(2), tensors, expected)


def qwen2() -> Family:
    tensors = globals_()
    for i in range(2):
        tensors += llama_attention(i, bias=True) + llama_ffn(i)
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    return Family("qwen2", rms_md(2), tensors, expected)


def qwen3() -> Family:
    tensors = globals_()
    for i in range(2):
        tensors += llama_attention(i, qk_norm=True) + llama_ffn(i)
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    return Family("qwen3", rms_md(2, **{"{arch}.attention.key_length": HD, "{arch}.attention.value_length": HD}),
                  tensors, expected)


def gemma3() -> Family:
    # Head dim 128: attention width 512 != n_embd 256. post_attention_norm / post_ffw_norm normalize
    # block outputs and feed no projection.
    hd = 128
    tensors = globals_()
    for i in range(2):
        tensors += llama_attention(i, qk_norm=True, head_dim=hd) + llama_ffn(i)
        tensors += [(blk(i, "post_attention_norm"), T.F32, (E,)), (blk(i, "post_ffw_norm"), T.F32, (E,))]
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    md = rms_md(2, **{"{arch}.attention.key_length": hd, "{arch}.attention.value_length": hd})
    return Family("gemma3", md, tensors, expected)


def phi3() -> Family:
    tensors = globals_()
    for i in range(2):
        tensors += [(blk(i, "attn_norm"), T.F32, (E,)), (blk(i, "attn_qkv"), T.Q4_K, (H * HD + 2 * KV * HD, E)),
                    (blk(i, "attn_output"), T.Q4_K, (E, H * HD)), (blk(i, "ffn_norm"), T.F32, (E,)),
                    (blk(i, "ffn_up"), T.Q6_K if i else T.Q4_K, (2 * FF, E)), (blk(i, "ffn_down"), T.Q6_K, (E, FF))]
    expected = [(i, blk(i, n), [blk(i, m)], kind) for i in range(2)
                for n, m, kind in (("attn_norm", "attn_qkv", "attention"), ("ffn_norm", "ffn_up", "ffn"))]
    return Family("phi3", rms_md(2), tensors, expected)


def moe_ffn(i: int, n_expert: int, n_ff_exp: int, norm: str, *, shexp: int | None, fused_gate_up=False) -> list:
    t = [(blk(i, norm), T.F32, (E,)), (blk(i, "ffn_gate_inp"), T.F32, (n_expert, E)),
         (blk(i, "ffn_down_exps"), T.Q6_K, (n_expert, E, n_ff_exp))]
    if fused_gate_up:
        t.append((blk(i, "ffn_gate_up_exps"), T.Q4_K, (n_expert, 2 * n_ff_exp, E)))
    else:
        t += [(blk(i, "ffn_gate_exps"), T.Q4_K, (n_expert, n_ff_exp, E)),
              (blk(i, "ffn_up_exps"), T.Q4_K, (n_expert, n_ff_exp, E))]
    if shexp:
        t += [(blk(i, "ffn_gate_inp_shexp"), T.F32, (E,)), (blk(i, "ffn_gate_shexp"), T.Q4_K, (shexp, E)),
              (blk(i, "ffn_up_shexp"), T.Q6_K, (shexp, E)), (blk(i, "ffn_down_shexp"), T.Q6_K, (E, shexp))]
    return t


def mixtral() -> Family:
    # llama architecture with routed experts: only attention is dense; router/experts stay out.
    tensors = globals_()
    for i in range(2):
        tensors += llama_attention(i) + moe_ffn(i, 4, FF, "ffn_norm", shexp=None)
    expected = [(i, blk(i, "attn_norm"), qkv(i), "attention") for i in range(2)]
    md = rms_md(2, **{"{arch}.expert_count": 4, "{arch}.expert_used_count": 2})
    return Family("llama", md, tensors, expected)


def qwen2moe() -> Family:
    tensors = globals_()
    for i in range(2):
        tensors += llama_attention(i, bias=True) + moe_ffn(i, 4, 256, "ffn_norm", shexp=512)
    expected = [(i, blk(i, n), m, kind) for i in range(2) for n, m, kind in (
        ("attn_norm", qkv(i), "attention"),
        ("ffn_norm", [blk(i, "ffn_gate_shexp"), blk(i, "ffn_up_shexp")], "shared_expert_ffn"))]
    md = rms_md(2, **{"{arch}.expert_count": 4, "{arch}.expert_used_count": 2,
                      "{arch}.expert_feed_forward_length": 256, "{arch}.expert_shared_feed_forward_length": 512})
    return Family("qwen2moe", md, tensors, expected)


# Gated DeltaNet dims: key heads 2, value heads 4, head dim 64 -> key_dim 128, value_dim 256.
SSM_STATE, SSM_GROUPS, SSM_V_HEADS, SSM_CONV = 64, 2, 4, 4
KEY_DIM, VALUE_DIM = SSM_STATE * SSM_GROUPS, SSM_STATE * SSM_V_HEADS


def hybrid_md(n_layer: int, interval: int | None, **extra) -> dict:
    md = rms_md(n_layer, **{"{arch}.attention.key_length": HD, "{arch}.attention.value_length": HD,
                            "{arch}.ssm.conv_kernel": SSM_CONV, "{arch}.ssm.state_size": SSM_STATE,
                            "{arch}.ssm.group_count": SSM_GROUPS, "{arch}.ssm.time_step_rank": SSM_V_HEADS,
                            "{arch}.ssm.inner_size": VALUE_DIM})
    if interval is not None:
        md["{arch}.full_attention_interval"] = interval
    md.update(extra)
    return md


def delta_net(i: int, *, ba: bool, beta_alpha_type=T.F32) -> list:
    t = [(blk(i, "attn_norm"), T.F32, (E,)), (blk(i, "post_attention_norm"), T.F32, (E,)),
         (blk(i, "attn_qkv"), T.Q4_K, (2 * KEY_DIM + VALUE_DIM, E)), (blk(i, "attn_gate"), T.Q6_K, (VALUE_DIM, E)),
         (blk(i, "ssm_conv1d"), T.F32, (2 * KEY_DIM + VALUE_DIM, SSM_CONV)),
         (blk(i, "ssm_dt", "bias"), T.F32, (SSM_V_HEADS,)), (blk(i, "ssm_a", None), T.F32, (SSM_V_HEADS,)),
         (blk(i, "ssm_norm"), T.F32, (SSM_STATE,)), (blk(i, "ssm_out"), T.Q4_K, (E, VALUE_DIM))]
    if ba:
        t.append((blk(i, "ssm_ba"), beta_alpha_type, (2 * SSM_V_HEADS, E)))
    else:
        t += [(blk(i, "ssm_beta"), beta_alpha_type, (SSM_V_HEADS, E)),
              (blk(i, "ssm_alpha"), beta_alpha_type, (SSM_V_HEADS, E))]
    return t


def gated_attention(i: int) -> list:
    return [(blk(i, "attn_norm"), T.F32, (E,)), (blk(i, "post_attention_norm"), T.F32, (E,)),
            (blk(i, "attn_q"), T.Q4_K, (2 * H * HD, E)), (blk(i, "attn_k"), T.Q4_K, (KV * HD, E)),
            (blk(i, "attn_v"), T.Q6_K, (KV * HD, E)), (blk(i, "attn_output"), T.Q4_K, (E, H * HD)),
            (blk(i, "attn_q_norm"), T.F32, (HD,)), (blk(i, "attn_k_norm"), T.F32, (HD,))]


def delta_members(i: int, ba: bool) -> list:
    tail = [blk(i, "ssm_ba")] if ba else [blk(i, "ssm_beta"), blk(i, "ssm_alpha")]
    return [blk(i, "attn_qkv"), blk(i, "attn_gate")] + tail


def qwen3next() -> Family:
    # 4 layers, default interval 4: layers 0-2 Gated DeltaNet, layer 3 full attention; MoE + shared expert.
    tensors = globals_()
    expected = []
    for i in range(4):
        full = (i + 1) % 4 == 0
        tensors += gated_attention(i) if full else delta_net(i, ba=True, beta_alpha_type=T.Q8_0)
        tensors += moe_ffn(i, 4, 256, "post_attention_norm", shexp=512)[1:]  # post_attention_norm is above
        expected.append((i, blk(i, "attn_norm"), qkv(i) if full else delta_members(i, True),
                         "attention" if full else "linear_attention"))
        expected.append((i, blk(i, "post_attention_norm"), [blk(i, "ffn_gate_shexp"), blk(i, "ffn_up_shexp")],
                         "shared_expert_ffn"))
    md = hybrid_md(4, None, **{"{arch}.expert_count": 4, "{arch}.expert_used_count": 2,
                               "{arch}.expert_feed_forward_length": 256,
                               "{arch}.expert_shared_feed_forward_length": 512})
    return Family("qwen3next", md, tensors, expected)


def qwen35() -> Family:
    # Interval 2: layers 1 and 3 full attention. beta/alpha in F32: the float fallback.
    tensors = globals_()
    expected, fallbacks = [], []
    for i in range(4):
        full = (i + 1) % 2 == 0
        tensors += gated_attention(i) if full else delta_net(i, ba=False)
        tensors += llama_ffn(i, norm="post_attention_norm")[1:]
        expected.append((i, blk(i, "attn_norm"), qkv(i) if full else delta_members(i, False),
                         "attention" if full else "linear_attention"))
        expected.append((i, blk(i, "post_attention_norm"), gate_up(i), "ffn"))
        if not full:
            fallbacks += [blk(i, "ssm_beta"), blk(i, "ssm_alpha")]
    return Family("qwen35", hybrid_md(4, 2), tensors, expected, tuple(fallbacks))


def qwen35moe() -> Family:
    tensors = globals_()
    expected = []
    for i in range(4):
        full = (i + 1) % 4 == 0
        tensors += gated_attention(i) if full else delta_net(i, ba=False, beta_alpha_type=T.Q8_0)
        tensors += moe_ffn(i, 4, 256, "post_attention_norm", shexp=256, fused_gate_up=True)[1:]
        expected.append((i, blk(i, "attn_norm"), qkv(i) if full else delta_members(i, False),
                         "attention" if full else "linear_attention"))
        expected.append((i, blk(i, "post_attention_norm"), [blk(i, "ffn_gate_shexp"), blk(i, "ffn_up_shexp")],
                         "shared_expert_ffn"))
    md = hybrid_md(4, 4, **{"{arch}.expert_count": 4, "{arch}.expert_used_count": 2})
    return Family("qwen35moe", md, tensors, expected)


def ln(i: int, name: str) -> list:
    return [(blk(i, name), T.F32, (E,)), (blk(i, name, "bias"), T.F32, (E,))]


def linear(i: int, name: str, qtype, rows: int, k: int = E, bias: bool = True) -> list:
    t = [(blk(i, name), qtype, (rows, k))]
    return t + [(blk(i, name, "bias"), T.F32, (rows,))] if bias else t


def gptneox(arch="gptneox") -> Family:
    tensors = globals_(norm_bias=True)
    if arch == "bloom":
        tensors += [("token_embd_norm.weight", T.F32, (E,)), ("token_embd_norm.bias", T.F32, (E,))]
    for i in range(2):
        tensors += ln(i, "attn_norm") + linear(i, "attn_qkv", T.Q4_K, 3 * E) + linear(i, "attn_output", T.Q4_K, E)
        tensors += ln(i, "ffn_norm") + linear(i, "ffn_up", T.Q6_K, FF) + linear(i, "ffn_down", T.Q4_K, E, FF)
    expected = [(i, blk(i, n), [blk(i, m)], kind) for i in range(2)
                for n, m, kind in (("attn_norm", "attn_qkv", "attention"), ("ffn_norm", "ffn_up", "ffn"))]
    return Family(arch, ln_md(2), tensors, expected)


def falcon7b() -> Family:
    # One norm feeds attention and the (parallel) FFN: one group of QKV + up. Multi-query: 1 KV head.
    tensors = globals_(norm_bias=True)
    for i in range(2):
        tensors += ln(i, "attn_norm") + linear(i, "attn_qkv", T.Q4_K, E + 2 * HD, bias=False)
        tensors += linear(i, "attn_output", T.Q4_K, E, bias=False) + linear(i, "ffn_up", T.Q4_K, FF, bias=False)
        tensors += linear(i, "ffn_down", T.Q6_K, E, FF, bias=False)
    expected = [(i, blk(i, "attn_norm"), [blk(i, "attn_qkv"), blk(i, "ffn_up")], "attention+ffn") for i in range(2)]
    return Family("falcon", ln_md(2, n_kv=1), tensors, expected)


def falcon40b() -> Family:
    # attn_norm_2 feeds QKV, attn_norm feeds the FFN (llama.cpp's falcon graph).
    tensors = globals_(norm_bias=True)
    for i in range(2):
        tensors += ln(i, "attn_norm") + ln(i, "attn_norm_2")
        tensors += linear(i, "attn_qkv", T.Q4_K, E + 2 * KV * HD, bias=False)
        tensors += linear(i, "attn_output", T.Q4_K, E, bias=False) + linear(i, "ffn_up", T.Q6_K, FF, bias=False)
        tensors += linear(i, "ffn_down", T.Q6_K, E, FF, bias=False)
    expected = [(i, blk(i, n), [blk(i, m)], kind) for i in range(2)
                for n, m, kind in (("attn_norm_2", "attn_qkv", "attention"), ("attn_norm", "ffn_up", "ffn"))]
    return Family("falcon", ln_md(2, n_kv=KV), tensors, expected)


def phi2() -> Family:
    tensors = globals_(norm_bias=True)
    for i in range(2):
        tensors += ln(i, "attn_norm") + linear(i, "attn_q", T.Q4_K, E) + linear(i, "attn_k", T.Q5_K, E)
        tensors += linear(i, "attn_v", T.Q6_K, E) + linear(i, "attn_output", T.Q4_K, E)
        tensors += linear(i, "ffn_up", T.Q4_K, FF) + linear(i, "ffn_down", T.Q6_K, E, FF)
    expected = [(i, blk(i, "attn_norm"), qkv(i) + [blk(i, "ffn_up")], "attention+ffn") for i in range(2)]
    return Family("phi2", ln_md(2), tensors, expected)


def llama_fallbacks() -> Family:
    # Members without a Q8_1 kernel (Q5_1, F16, BF16) beside fused ones.
    tensors = globals_() + llama_attention(0, v=T.Q5_1) + llama_ffn(0, gate=T.F16, up=T.Q4_K)
    tensors += llama_attention(1, k=T.BF16, v=T.Q4_1) + llama_ffn(1)
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    fallbacks = (blk(0, "attn_v"), blk(0, "ffn_gate"), blk(1, "attn_k"), blk(1, "attn_v"))
    return Family("llama", rms_md(2), tensors, expected, fallbacks)


def llama_k320() -> Family:
    # n_embd 320 is not a multiple of 256: K-quants are impossible, files fall back to Q5_0 / Q8_0.
    e, heads = 320, 5
    tensors = [("token_embd.weight", T.Q8_0, (V, e)), ("output_norm.weight", T.F32, (e,)),
               ("output.weight", T.Q8_0, (V, e))]
    for i in range(2):
        tensors += [(blk(i, "attn_norm"), T.F32, (e,)), (blk(i, "attn_q"), T.Q5_0, (heads * HD, e)),
                    (blk(i, "attn_k"), T.Q5_0, (KV * HD, e)), (blk(i, "attn_v"), T.Q8_0, (KV * HD, e)),
                    (blk(i, "attn_output"), T.Q5_0, (e, heads * HD)), (blk(i, "ffn_norm"), T.F32, (e,)),
                    (blk(i, "ffn_gate"), T.Q5_0, (FF, e)), (blk(i, "ffn_up"), T.Q5_0, (FF, e)),
                    (blk(i, "ffn_down"), T.Q8_0, (e, FF))]
    md = rms_md(2, **{"{arch}.embedding_length": e, "{arch}.attention.head_count": heads})
    expected = [(i, blk(i, n), m, kind) for i in range(2)
                for n, m, kind in (("attn_norm", qkv(i), "attention"), ("ffn_norm", gate_up(i), "ffn"))]
    return Family("llama", md, tensors, expected)


FAMILIES = {
    "llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3, "phi3": phi3, "mixtral": mixtral,
    "qwen2moe": qwen2moe, "qwen3next": qwen3next, "qwen35": qwen35, "qwen35moe": qwen35moe,
    "gptneox": gptneox, "bloom": lambda: gptneox("bloom"), "falcon-7b": falcon7b, "falcon-40b": falcon40b,
    "phi2": phi2, "llama-fallbacks": llama_fallbacks, "llama-k320": llama_k320,
}


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request, gguf_file):
    fam = FAMILIES[request.param]()
    path = gguf_file(fam.arch, fam.metadata, fam.tensors, name=f"{request.param}.gguf")
    return request.param, fam, path


def test_groups_follow_the_consumers(family_model):
    _, fam, path = family_model
    m = ggfuse.load_gguf(path)
    assert m.arch == fam.arch
    got = [(g.layer, g.norm, list(g.members), g.kind) for g in m.groups()]
    assert got == fam.expected
    shapes = {name: shape for name, _, shape in fam.tensors}
    types = {name: qtype for name, qtype, _ in fam.tensors}
    for g in m.groups():
        assert g.out_features == tuple(shapes[n][0] for n in g.members)
        assert g.qtypes == tuple(types[n] for n in g.members)
        assert g.in_features == shapes[g.norm][0]
        assert g.norm_kind == ("layer" if fam.arch in ("gptneox", "bloom", "falcon", "phi2") else "rms")
    fallbacks = {n for g in m.groups() for n in g.linear.fallbacks}
    assert fallbacks == set(fam.fallbacks)


def test_group_numerics_against_gguf_py(family_model):
    _, fam, path = family_model
    m = ggfuse.load_gguf(path)
    file = FileOracle(path)
    for g in m.groups():
        check_group(g, file, batch=random.choice([1, 2, 3, 5, 8, 13]))


def test_report_names_every_group_and_what_is_left_out(family_model):
    name, fam, path = family_model
    m = ggfuse.load_gguf(path)
    rows = m.fusion_report()
    group_rows = [r for r in rows if r.kind != "unfused"]
    assert [(r.layer, r.norm, list(r.members)) for r in group_rows] == [(l, n, ms) for l, n, ms, _ in fam.expected]
    for r, g in zip(group_rows, m.groups()):
        assert r.types == tuple(t.name for t in g.qtypes) and r.rows == g.out_features
        fb = [mem for mem in r.members if mem in fam.fallbacks]
        layer_norm = g.norm_kind == "layer"
        if not fb and not layer_norm:
            assert r.status == "fused" and r.reason == ""
        else:
            assert r.status in ("fused+fallback", "fallback")
            for mem in fb:
                assert mem in r.reason
            if layer_norm:
                assert "LayerNorm" in r.reason
    unfused = [r for r in rows if r.kind == "unfused"]
    is_moe = any("ffn_gate_inp" in n for n, _, _ in fam.tensors)
    if is_moe:
        left_out = {mem for r in unfused for mem in r.members}
        for n, _, _ in fam.tensors:
            if n.endswith(("ffn_gate_inp.weight", "_exps.weight", "ffn_gate_inp_shexp.weight")) and "down" not in n:
                assert n in left_out, n
        assert all(r.status == "not fused" and r.reason for r in unfused)
        grouped = {mem for g in m.groups() for mem in g.members}
        assert not any("exps" in mem or "gate_inp" in mem for mem in grouped)
    else:
        assert unfused == []


def test_input_dtypes(gguf_file):
    fam = llama()
    path = gguf_file(fam.arch, fam.metadata, fam.tensors)
    m = ggfuse.load_gguf(path)
    file = FileOracle(path)
    for dtype in (torch.float16, torch.bfloat16):
        check_group(m.groups()[0], file, batch=2, x_dtype=dtype)


def test_tensor_of_each_storage_type(gguf_file):
    """F32/F16/BF16 tensors come back as torch tensors of their logical shape (zero-copy views of
    the file), quantized ones as bytes + type; all read the same values as gguf-py."""
    from conftest import FileOracle
    fam = llama_fallbacks()
    path = gguf_file(fam.arch, fam.metadata, fam.tensors)
    m = ggfuse.load_gguf(path, load_weights=False)
    file = FileOracle(path)
    expect = {"blk.0.attn_norm.weight": torch.float32, "blk.0.ffn_gate.weight": torch.float16,
              "blk.1.attn_k.weight": torch.bfloat16}
    for name, dtype in expect.items():
        t = m.tensor(name)
        assert isinstance(t, torch.Tensor) and t.dtype == dtype
        assert t.shape == dict((n, s) for n, _, s in fam.tensors)[name]
        torch.testing.assert_close(t.double(), torch.from_numpy(file.f64(name)), rtol=0, atol=0)
    for name in ("blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.0.attn_q.weight"):
        q = m.tensor(name)
        assert isinstance(q, ggfuse.QuantizedTensor) and q.qtype == file.qtype(name)
        assert q.shape == dict((n, s) for n, _, s in fam.tensors)[name]
        torch.testing.assert_close(q.dequantize().double(), torch.from_numpy(file.f64(name)), rtol=0, atol=0)
