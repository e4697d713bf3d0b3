"""Load benchmark: `load_gguf` throughput (GB/s) and peak host memory on a multi-GB synthetic model.

Writes a llama-shaped Q4_K_M-layout model (llama-3-8B widths, as many layers as the size asks) to a
temporary folder, then loads it in a fresh child process (so the writer's memory does not count)
and reports: seconds, GB/s of fused weights uploaded, the child's peak resident memory and how much
it grew during the load, against the file size. The file was just written, so it is in the page
cache unless `--cold` drops it first (posix_fadvise DONTNEED, no root needed): warm measures the
copy path, cold adds the disk.

    python -m ggfuse bench-load [--size-gb 4] [--device cuda] [--dir DIR] [--keep] [--cold]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

GB = 1e9


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes (Linux; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    # VmHWM is this process's own high-water mark. getrusage's ru_maxrss is not: Linux carries the
    # parent's peak over fork and exec, so a child of a big process reports the parent's peak.
    peak = _proc_status_bytes("VmHWM")
    if peak:
        return peak
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _child(path: str, device: str, chunk_bytes: int) -> None:
    """Runs in a fresh process: load once, print one JSON line."""
    import torch

    import ggfuse
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.empty(1, device=dev)  # create the CUDA context before the baseline
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    model = ggfuse.load_gguf(path, dev, progress=False, chunk_bytes=chunk_bytes)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    uploaded = sum(g.nbytes for g in model.groups())
    print(json.dumps({"seconds": seconds, "uploaded_bytes": uploaded, "groups": len(model.groups()),
                      "rss_before": rss_before, "peak_rss": _peak_rss_bytes(),
                      "device": str(dev), "torch_device_name": (torch.cuda.get_device_name(dev)
                                                                if dev.type == "cuda" else "cpu")}))


def _drop_from_page_cache(path: str) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggfuse bench-load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="approximate file size (default 4)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dir", default=None, help="where to write the model (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model file")
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache before each load")
    parser.add_argument("--repeats", type=int, default=2, help="loads, each in a fresh process (default 2)")
    parser.add_argument("--chunk-mb", type=int, default=8, help="bytes per read, MiB (default 8)")
    parser.add_argument("--child", nargs=3, metavar=("FILE", "DEVICE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    import torch

    from .model_maker import LlamaConfig, write_llama_model
    from .loader import GGUFError
    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # llama-3-8B widths; Q4_K_M-layout bytes per layer, to pick the layer count for the size.
    base = LlamaConfig(n_embd=4096, n_layer=1, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336, n_vocab=256)
    q4k, q6k = 144 / 256, 210 / 256
    per_layer = 4096 * (4096 + 1024 + 4096 + 2 * 14336) * q4k + 4096 * (1024 + 14336) * (q4k + q6k) / 2
    n_layer = max(1, round(args.size_gb * GB / per_layer))
    cfg = LlamaConfig(**{**base.__dict__, "n_layer": n_layer})

    folder = tempfile.mkdtemp(prefix="ggfuse-bench-load-", dir=args.dir)
    path = str(Path(folder) / f"bench-llama-{n_layer}L-q4_k_m.gguf")
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(f"writing {n_layer}-layer model", total=int(per_layer * n_layer))
            write_llama_model(path, cfg, seed=1, distinct_rows=256,
                              on_tensor=lambda src: bar.advance(task, src.nbytes))
        file_size = os.path.getsize(path)
        console.print(f"wrote {path}: {file_size / GB:.2f} GB, {n_layer} layers")

        table = Table(title=f"load_gguf -> {device} ({'cold' if args.cold else 'warm'} page cache)")
        for col in ("run", "seconds", "uploaded GB", "GB/s", "peak RSS MiB", "RSS growth MiB",
                    "growth / file"):
            table.add_column(col, justify="right")
        for run in range(args.repeats):
            if args.cold and not _drop_from_page_cache(path):
                console.print("[yellow]posix_fadvise is unavailable: the load is warm[/yellow]")
            cmd = [sys.executable, "-m", "ggfuse.load_bench", "--child", path, device,
                   str(args.chunk_mb << 20)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                console.print(f"[red]load failed:[/red]\n{proc.stderr}", highlight=False)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            growth = max(0, r["peak_rss"] - r["rss_before"])
            table.add_row(str(run + 1), f"{r['seconds']:.3f}", f"{r['uploaded_bytes'] / GB:.2f}",
                          f"{r['uploaded_bytes'] / GB / r['seconds']:.2f}", f"{r['peak_rss'] / 2**20:.0f}",
                          f"{growth / 2**20:.0f}", f"{growth / file_size:.1%}")
        console.print(table)
        console.print(f"device: {r['torch_device_name']}; GB/s counts the fused group weights uploaded "
                      f"({r['groups']} groups); other tensors stay memory-mapped.")
    except GGUFError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    finally:
        if args.keep:
            console.print(f"kept {path}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
