# Where the time of a torch-captured chain of ggfuse launches goes (docs/PERFORMANCE.md, v14 section). The same captured graph is timed in several ways, so that what the GPU spends per
# layer separates from what the host adds once per replay:
#   bench    start event, g.replay(), end event on an idle stream (ggfuse.bench's method up to v13): the
#            start event fires at once, so the Python call, torch's replay prologue and the graph's
#            submission fall inside the timing, spread over the layers;
#   queued   the same after a GPU spin (torch.cuda._sleep), so that the replay is queued before the start
#            event fires (the read probe's method);
#   raw      the graph torch captured, instantiated and launched through the driver (no torch replay),
#            queued the same way;
#   5x       five replays queued back to back between the events, divided by five.
# It also lists the captured graph's nodes and edges (driver API; torch's debug_dump wrote nothing on
# torch 2.11) and times the norm chain at several K (how its cost grows with the rounds per row).
# Usage on a GPU machine with ggfuse installed: python3 benchmarks/graph_probe.py [OUT_DIR]
import ctypes
import os
import statistics
import sys

import torch
from gguf import GGMLQuantizationType as T

import ggfuse
from ggfuse.bench import EPS, random_gguf

out_dir = sys.argv[1] if len(sys.argv) > 1 else None
dev = "cuda"
cu = ctypes.CDLL("libcuda.so.1")
NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
              7: "event_record", 10: "mem_alloc", 11: "mem_free", 12: "batch_mem_op", 13: "conditional"}


class EdgeData(ctypes.Structure):  # CUgraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


def check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUresult {rc}")


def describe(graph):
    """Node types and edges (type, from port) of a CUgraph."""
    g = ctypes.c_void_p(graph)
    n = ctypes.c_size_t(0)
    check(cu.cuGraphGetNodes(g, None, ctypes.byref(n)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * n.value)()
    check(cu.cuGraphGetNodes(g, nodes, ctypes.byref(n)), "cuGraphGetNodes")
    kinds = {}
    for node in nodes:
        t = ctypes.c_int(0)
        check(cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "cuGraphNodeGetType")
        kinds[NODE_TYPES.get(t.value, t.value)] = kinds.get(NODE_TYPES.get(t.value, t.value), 0) + 1
    e = ctypes.c_size_t(0)
    check(cu.cuGraphGetEdges_v2(g, None, None, None, ctypes.byref(e)), "cuGraphGetEdges_v2")
    frm, to, data = (ctypes.c_void_p * e.value)(), (ctypes.c_void_p * e.value)(), (EdgeData * e.value)()
    check(cu.cuGraphGetEdges_v2(g, frm, to, data, ctypes.byref(e)), "cuGraphGetEdges_v2")
    edges = {}
    for d in data:
        key = f"type {d.type} port {d.from_port}"  # type 1 = programmatic; port 1 = programmatic, 2 = launch order
        edges[key] = edges.get(key, 0) + 1
    return f"nodes {kinds}, edges {edges}"


def spin():
    torch.cuda._sleep(2_000_000)  # ~1 ms of GPU cycles: the host's submission finishes meanwhile


def median_us(launch, layers, queued, per=1, repeats=15):
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            spin()
        a.record()
        for _ in range(per):
            launch()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (layers * per))
    return statistics.median(ts)


def probe_chain(label, fn, layers, dump=None):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        fn()
    raw_graph = g.raw_cuda_graph()
    info = describe(raw_graph)
    if dump:
        check(cu.cuGraphDebugDotPrint(ctypes.c_void_p(raw_graph), dump.encode(), ctypes.c_uint(1)), "dot print")
    g.instantiate()
    exe = ctypes.c_void_p()
    check(cu.cuGraphInstantiateWithFlags(ctypes.byref(exe), ctypes.c_void_p(raw_graph), ctypes.c_ulonglong(0)),
          "cuGraphInstantiateWithFlags")

    def raw_launch():
        check(cu.cuGraphLaunch(exe, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "cuGraphLaunch")

    for _ in range(3):
        g.replay()
        raw_launch()
    torch.cuda.synchronize()
    r = {"bench": median_us(g.replay, layers, False), "queued": median_us(g.replay, layers, True),
         "raw": median_us(raw_launch, layers, True), "5x": median_us(g.replay, layers, True, per=5)}
    cu.cuGraphExecDestroy(exe)
    print(f"{label:44s} " + "  ".join(f"{k} {v:6.2f}" for k, v in r.items()) + f"   | {info}", flush=True)
    del g
    return r


def norm_chain(k, n):
    x = torch.randn(1, k, device=dev).to(torch.bfloat16)
    ws = [(1.0 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16) for _ in range(n)]

    def fn():
        for w in ws:
            ggfuse.rms_norm_mul_q8_1(x, w, EPS)
    return fn


def qkv_chain(batch, n, types=(T.Q4_K, T.Q4_K, T.Q4_K), k=4096, sizes=(4096, 1024, 1024), variant="fused"):
    fused = [ggfuse.FusedQuantLinear([(f"m{i}", random_gguf(t, r, k, dev), t) for i, (t, r) in
                                      enumerate(zip(types, sizes))], device=dev) for _ in range(n)]
    norms = [(1.0 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16) for _ in range(n)]
    x = torch.randn(batch, k, device=dev).to(torch.bfloat16)
    xqs = [ggfuse.rms_norm_mul_q8_1(x, w, EPS) for w in norms]

    def fused_fn():
        for f, w in zip(fused, norms):
            ggfuse.rms_norm_mat_vec(x, w, EPS, f)

    def matvec_fn():
        for f, xq in zip(fused, xqs):
            ggfuse.mat_vec_q8_1(xq, f.weight, f.seg_qtypes, f.seg_rows, f.seg_offsets)
    return fused_fn if variant == "fused" else matvec_fn


print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
print("µs per layer; columns: timing method (header of this file)")
dump = os.path.join(out_dir, "norm_graph.dot") if out_dir else None
for n in (32, 64, 128):
    probe_chain(f"norm K=4096 B=1, {n} layers", norm_chain(4096, n), n, dump if n == 64 else None)
for k in (1024, 2048, 3072, 5120, 8192, 16384):
    probe_chain(f"norm K={k} B=1, 64 layers", norm_chain(k, 64), 64)
for variant in ("fused", "matvec"):
    for b in (1, 8):
        probe_chain(f"QKV Q4_K {variant} B={b}, 32 layers", qkv_chain(b, 32, variant=variant), 32)
probe_chain("QKV Q4_K fused B=1, 64 layers", qkv_chain(1, 64), 64)
if dump and os.path.exists(dump):
    lines = open(dump).read().splitlines()
    print(f"dot dump: {len(lines)} lines; the first kernel node and edges:")
    print("\n".join([l for l in lines if "->" in l][:4]))
