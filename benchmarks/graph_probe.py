# Torch-captured chain of ggfuse norm kernels (docs/PERFORMANCE.md, "Where the norm's 3.3 us go"): the
# chain's time with each layer's output dropped (the caching allocator may hand the next layer the same
# block) or kept (every layer writes its own buffer), and the graph's nodes and edges (debug dump).
# Usage on a GPU machine with ggfuse installed: python3 benchmarks/graph_probe.py OUT_DIR
import os, re, sys, torch, ggfuse
out_dir = sys.argv[1]
dev, k, n = "cuda", 4096, 64
x = torch.randn(1, k, device=dev).to(torch.bfloat16)
ws = [(1.0 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16) for _ in range(n)]
def time_chain(fn, label, dump=None):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    if dump: g.enable_debug_mode()
    with torch.cuda.graph(g):
        keep = fn()
    if dump: g.debug_dump(dump)
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / n)
    ts.sort(); print(f"{label}: {ts[len(ts)//2]:.2f} us per layer", flush=True)
def dropped():
    for w in ws: ggfuse.rms_norm_mul_q8_1(x, w, 1e-6)
def kept():
    return [ggfuse.rms_norm_mul_q8_1(x, w, 1e-6) for w in ws]
time_chain(dropped, "norm chain, outputs dropped (bench)", os.path.join(out_dir, "norm_graph.dot"))
time_chain(kept, "norm chain, outputs kept")
path = os.path.join(out_dir, "norm_graph.dot")
if not os.path.exists(path):  # seen on torch 2.11: debug_dump() warned but wrote nothing
    print("no graph dump was written")
    sys.exit(0)
dot = open(path).read()
kinds = re.findall(r'label="\{?([A-Z_]+)[^"]*"', dot)
print("node labels:", {kk: kinds.count(kk) for kk in set(kinds)})
print("edges:", len(re.findall(r"->", dot)), "| programmatic mentions:", len(re.findall(r"(?i)programmatic", dot)))
print("\n".join([l for l in dot.splitlines() if "->" in l][:6]))
