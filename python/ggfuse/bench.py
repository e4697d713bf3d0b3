"""Decode-speed benchmark of the fused norm -> quantized projection path (SPEC §6).

Method: >= 32 layers of distinct weight buffers (together more than 4x the L2), every layer's ops in
one CUDA graph, timed with CUDA events over whole replays, median of >= 5 repeats, reported per
layer. The floor of a configuration is its weight bytes over the read bandwidth measured in the same
run (ggfuse's 16-byte-load read probe, `measure_read_bandwidth`), so "% of floor" is how close a path
comes to streaming its weights once at full speed.

Run: `python -m ggfuse.bench` (issue-3 set: 4096 -> 4096+1024+1024, Q4_K / Q4_0 / Q4_K+Q6_K, B = 1, 8),
`python -m ggfuse.bench --matrix` (the full matrix of shapes, types and batch sizes). Results go to
benchmarks/results/<device>/ (or --out) as JSON, markdown and, with matplotlib, a PNG.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

import ggfuse

# (name, K, member sizes)
SHAPES = {
    "2048->2048+512+512": (2048, (2048, 512, 512)),
    "4096->4096+1024+1024": (4096, (4096, 1024, 1024)),
    "5120->5120+1024+1024": (5120, (5120, 1024, 1024)),
    "8192->8192+1024+1024": (8192, (8192, 1024, 1024)),
    "4096->2x14336": (4096, (14336, 14336)),
}
# type label -> member types (the last member gets the second type for the mixed case)
TYPE_SETS = {
    "Q4_K": (T.Q4_K, T.Q4_K),
    "Q4_0": (T.Q4_0, T.Q4_0),
    "Q4_K+Q6_K": (T.Q4_K, T.Q6_K),
}
FP16_FIELDS = {T.Q4_0: (0,), T.Q5_0: (0,), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
EPS = 1e-6


def random_gguf(qtype: T, rows: int, k: int, device) -> torch.Tensor:
    """Random GGUF bytes [rows, row_bytes] with finite, sensibly sized fp16 scales (speed does not
    depend on the values, but zeros or NaN would not be a fair workload)."""
    values, nbytes = GGML_QUANT_SIZES[qtype]
    nb = k // values
    blocks = torch.randint(0, 256, (rows, nb, nbytes), dtype=torch.uint8, device=device)
    for off in FP16_FIELDS[qtype]:
        scale = ((torch.rand(rows, nb, device=device) * 0.8 + 0.2) * 2.0 ** -7).half()
        blocks[:, :, off:off + 2] = scale.view(torch.uint8).view(rows, nb, 2)
    return blocks.view(rows, nb * nbytes)


def member_types(type_label: str, n_members: int):
    first, last = TYPE_SETS[type_label]
    return [first] * (n_members - 1) + [last]


# ---------------------------------------------------------------- timing

def time_graph(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one replay of a CUDA graph capturing fn()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up outside the graph: lazy init, allocator pools
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # The GPU spins first, so the replay is queued before the start event fires: the host's part
        # (the Python call, torch's replay prologue, the graph's submission) stays out of the timing,
        # as in a decode loop that queues its next graph while the GPU runs (benchmarks/graph_probe.py
        # measured it at 0.05-0.18 us per layer over 32 layers).
        torch.cuda._sleep(1_000_000)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del g
    return statistics.median(times)


def measure_read_bandwidth(device, repeats: int = 15) -> tuple[float, str]:
    """Bytes/s of one pure read of a 2 GiB buffer (far larger than the L2) by ggfuse's probe kernel
    (`torch.ops.ggfuse._read_probe`, csrc/cuda/read_probe.cu): 16-byte (uint4) loads, 4 per thread
    and loop iteration, every SM full, the words XOR-reduced to one. One warm-up call, then the median
    of `repeats` (>= 10) calls timed with CUDA events; each call also zeroes its 8-byte output.
    Before each timed call the GPU spins for a while, so the call is queued before the start event
    fires and the host's launch overhead stays out of the timing."""
    n_bytes = 2 << 30
    buf = torch.randint(0, 2 ** 31 - 1, (n_bytes // 4,), dtype=torch.int32, device=device).view(torch.uint8)
    probe = torch.ops.ggfuse._read_probe
    probe(buf)
    torch.cuda.synchronize()
    times = []
    for _ in range(max(10, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU cycles
        start.record()
        probe(buf)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del buf
    torch.cuda.empty_cache()
    return n_bytes / (statistics.median(times) * 1e-3), "ggfuse uint4 read probe"


# ---------------------------------------------------------------- workloads

class Layers:
    """`n` layers of one (shape, type set): fused weights, separate members, norm weights."""

    def __init__(self, k, sizes, types, n, device):
        self.k, self.sizes, self.types = k, sizes, types
        self.fused, self.members, self.norms = [], [], []
        for _ in range(n):
            ws = [random_gguf(t, rows, k, device) for t, rows in zip(types, sizes)]
            self.fused.append(ggfuse.FusedQuantLinear(
                [(f"m{i}", w, t) for i, (w, t) in enumerate(zip(ws, types))], device=device))
            self.members.append([(w.reshape(-1), t, w.shape[0]) for w, t in zip(ws, types)])
            self.norms.append((1.0 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16))
        self.weight_bytes = self.fused[0].weight.numel()


def bench_config(layers: Layers, batch: int, repeats: int, device, variants):
    """Per-layer microseconds of each variant at this batch size."""
    x = torch.randn(batch, layers.k, device=device).to(torch.bfloat16)
    n = len(layers.fused)
    out = {}
    if "fused" in variants:
        def fused():
            for f, w in zip(layers.fused, layers.norms):
                ggfuse.rms_norm_mat_vec(x, w, EPS, f)
        out["fused"] = time_graph(fused, repeats) * 1e3 / n
    if "two_kernels" in variants:  # the same fused weight behind a separate norm kernel
        def two_kernels():
            for f, w in zip(layers.fused, layers.norms):
                xq = ggfuse.rms_norm_mul_q8_1(x, w, EPS)
                ggfuse.mat_vec_q8_1(xq, f.weight, f.seg_qtypes, f.seg_rows, f.seg_offsets)
        out["two_kernels"] = time_graph(two_kernels, repeats) * 1e3 / n
    if "unfused" in variants:
        def unfused():
            for mem, w in zip(layers.members, layers.norms):
                h = F.rms_norm(x, (layers.k,), w, EPS)
                xq = ggfuse.quantize_q8_1(h)
                for wb, t, rows in mem:
                    ggfuse.mat_vec_q8_1(xq, wb, [t], [rows], [0])
        out["unfused"] = time_graph(unfused, repeats) * 1e3 / n
    if "norm" in variants:
        def norm():
            for w in layers.norms:
                ggfuse.rms_norm_mul_q8_1(x, w, EPS)
        out["norm"] = time_graph(norm, repeats) * 1e3 / n
    if "matvec" in variants:
        xqs = [ggfuse.rms_norm_mul_q8_1(x, w, EPS) for w in layers.norms]

        def matvec():
            for f, xq in zip(layers.fused, xqs):
                ggfuse.mat_vec_q8_1(xq, f.weight, f.seg_qtypes, f.seg_rows, f.seg_offsets)
        out["matvec"] = time_graph(matvec, repeats) * 1e3 / n
    return out


def bench_torch(k, n_out, n_layers, batches, repeats, device):
    ws = [torch.randn(n_out, k, device=device, dtype=torch.bfloat16) * k ** -0.5 for _ in range(n_layers)]
    norms = [(1.0 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16) for _ in range(n_layers)]
    res = {}
    for b in batches:
        x = torch.randn(b, k, device=device).to(torch.bfloat16)

        def run():
            for w, nw in zip(ws, norms):
                F.linear(F.rms_norm(x, (k,), nw, EPS), w)
        res[b] = time_graph(run, repeats) * 1e3 / n_layers
    bytes_ = n_out * k * 2
    del ws
    torch.cuda.empty_cache()
    return res, bytes_


# ---------------------------------------------------------------- report

def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    env = os.environ.get("GGFUSE_GIT_COMMIT")
    if env:
        return env
    try:
        here = pathlib.Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def write_report(result: dict, out_dir: pathlib.Path, plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# ggfuse decode benchmark: {result['device']}",
        "",
        f"torch {result['torch']} (CUDA {result['cuda']}), ggfuse commit `{result['git_commit']}`, "
        f"{result['date']}, {result['layers']} layers per graph, median of {result['repeats']} replays.",
        f"Measured read bandwidth: {result['read_bw_tbs']:.2f} TB/s ({result['read_bw_method']}); "
        f"L2 {result['l2_mb']:.0f} MB, {result['sms']} SMs. PDL: {result['pdl']}.",
        *(["", "**L2-resident run (`--l2-resident`): every layer reads one weight buffer, so the times are not "
           "SPEC §6's and the % columns are not bandwidth.**"] if result.get("l2_resident") else []),
        "",
        "µs per layer (norm -> projection); floor = weight bytes / measured read bandwidth;",
        "% = floor / time.",
        "",
        "| shape | types | B | floor µs | fused | % | norm + mat-vec kernels | mat-vec alone | % | norm alone | unfused | torch bf16 | torch floor µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        def f(key):
            v = r.get(key)
            return f"{v:.2f}" if v is not None else "-"

        def pct(key):
            v = r.get(key)
            return f"{100 * r['floor_us'] / v:.0f}%" if v else "-"
        lines.append(f"| {r['shape']} | {r['types']} | {r['batch']} | {r['floor_us']:.2f} | {f('fused')} | "
                     f"{pct('fused')} | {f('two_kernels')} | {f('matvec')} | {pct('matvec')} | {f('norm')} | {f('unfused')} | "
                     f"{f('torch_bf16')} | {f('torch_floor_us')} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    if not plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 3.6 * len(shapes)), squeeze=False)
    for ax_row, shape in zip(axes, shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for types in dict.fromkeys(r["types"] for r in rows):
            sel = sorted((r for r in rows if r["types"] == types), key=lambda r: r["batch"])
            bs = [r["batch"] for r in sel]
            ax_row[0].plot(bs, [r.get("fused") for r in sel], "o-", label=f"fused {types}")
            ax_row[0].plot(bs, [r.get("unfused") for r in sel], "x--", label=f"unfused {types}")
            ax_row[1].plot(bs, [100 * r["floor_us"] / r["matvec"] if r.get("matvec") else None for r in sel],
                           "o-", label=f"mat-vec alone {types}")
            ax_row[1].plot(bs, [100 * r["floor_us"] / r["fused"] if r.get("fused") else None for r in sel],
                           "s:", label=f"norm+mat-vec {types}")
        sel = sorted(rows, key=lambda r: r["batch"])
        tb = sorted({(r["batch"], r.get("torch_bf16")) for r in sel if r.get("torch_bf16")})
        if tb:
            ax_row[0].plot([b for b, _ in tb], [v for _, v in tb], "k^-", label="torch bf16")
        ax_row[0].set_xscale("log", base=2)
        ax_row[0].set_yscale("log")
        ax_row[0].set_title(f"{shape}: µs per layer")
        ax_row[0].set_xlabel("batch")
        ax_row[0].legend(fontsize=7)
        ax_row[1].set_xscale("log", base=2)
        ax_row[1].set_ylim(0, 110)
        ax_row[1].set_title(f"{shape}: % of the weight-streaming floor")
        ax_row[1].set_xlabel("batch")
        ax_row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ggfuse.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", action="store_true", help="every shape, type set and batch size")
    ap.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--types", nargs="*", default=None, help=f"subset of {list(TYPE_SETS)}")
    ap.add_argument("--batches", nargs="*", type=int, default=None)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch bf16 baseline")
    ap.add_argument("--variants", nargs="*", default=["fused", "two_kernels", "unfused", "norm", "matvec"])
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--l2-resident", action="store_true",
                    help="analysis, not SPEC's method: every layer reads the first layer's weights, which "
                         "then stay in L2 (the kernels' speed with DRAM out of the way)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="output folder (default benchmarks/results/<device>/ in the working directory)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not ggfuse.has_cuda_kernels():
        print("ggfuse.bench needs a CUDA device and ggfuse built with its CUDA kernels", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    shapes = args.shapes or (list(SHAPES) if args.matrix else ["4096->4096+1024+1024"])
    types = args.types or list(TYPE_SETS)
    batches = args.batches or ([1, 2, 4, 8, 16, 64] if args.matrix else [1, 8])
    l2 = getattr(props, "L2_cache_size", 50 << 20)

    bw, bw_method = measure_read_bandwidth(device)
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 1e6:.0f} MB, "
          f"measured read bandwidth {bw / 1e12:.2f} TB/s ({bw_method})", flush=True)
    result = {
        "device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "read_bw_tbs": bw / 1e12, "read_bw_method": bw_method, "l2_mb": l2 / 1e6,
        "sms": props.multi_processor_count, "layers": None, "repeats": args.repeats,
        "pdl": os.environ.get("GGFUSE_PDL", "1") != "0", "l2_resident": args.l2_resident, "rows": [],
    }
    print(f"{'shape':24} {'types':10} {'B':>3} {'floor':>7} {'fused':>7} {'%':>4} {'2-kern':>7} {'matvec':>7} {'%':>4} "
          f"{'norm':>6} {'unfused':>8} {'torch':>7}", flush=True)
    for shape in shapes:
        k, sizes = SHAPES[shape]
        torch_res, torch_bytes = ({}, 0)
        for tl_ in types:
            tys = member_types(tl_, len(sizes))
            one_layer = sum(rows * k // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1] for t, rows in zip(tys, sizes))
            n_layers = max(args.layers, -(-4 * l2 // one_layer) + 1)
            result["layers"] = max(result["layers"] or 0, n_layers)
            layers = Layers(k, sizes, tys, 1 if args.l2_resident else n_layers, device)
            if args.l2_resident:  # one layer's buffers, captured n_layers times
                layers.fused *= n_layers
                layers.members *= n_layers
                layers.norms *= n_layers
            if not args.no_torch and not torch_res:
                torch_res, torch_bytes = bench_torch(k, sum(sizes), max(args.layers, -(-4 * l2 // (sum(sizes) * k * 2)) + 1),
                                                     batches, args.repeats, device)
            for b in batches:
                r = bench_config(layers, b, args.repeats, device, args.variants)
                floor_us = layers.weight_bytes / bw * 1e6
                row = {"shape": shape, "types": tl_, "batch": b, "weight_bytes": layers.weight_bytes,
                       "floor_us": floor_us, "layers": n_layers, **r}
                if b in torch_res:
                    row["torch_bf16"] = torch_res[b]
                    row["torch_floor_us"] = torch_bytes / bw * 1e6
                result["rows"].append(row)

                def g(key):
                    v = row.get(key)
                    return f"{v:7.2f}" if v is not None else "      -"
                pf = f"{100 * floor_us / row['fused']:3.0f}%" if row.get("fused") else "   -"
                pm = f"{100 * floor_us / row['matvec']:3.0f}%" if row.get("matvec") else "   -"
                print(f"{shape:24} {tl_:10} {b:3d} {floor_us:7.2f} {g('fused')} {pf} {g('two_kernels')} {g('matvec')} {pm} "
                      f"{g('norm')[1:]} {g('unfused')} {g('torch_bf16')}", flush=True)
            del layers
            torch.cuda.empty_cache()
    out_dir = args.out or pathlib.Path("benchmarks") / "results" / device_slug(props.name)
    write_report(result, out_dir, plot=not args.no_plot)
    print(f"wrote {out_dir}/results.json, results.md" + (", results.png" if (out_dir / "results.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
