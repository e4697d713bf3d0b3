"""`python -m ggfuse demo [FILE]`: load a GGUF model, run every fused group's decode path, check it.

Without FILE the demo writes a small deterministic llama model with the Q4_K_M mix of types (Q6_K
`attn_v` on some layers, so some QKV groups are mixed Q4_K/Q6_K) to a temporary folder. Every group
runs `g(x)` (norm -> Q8_1 -> fused mat-vec) for a number of decode steps of fresh random x, and the
outputs are checked against float64 `norm(x) @ dequant(W).T` with gguf-py's dequantizer (SPEC §5:
relative error under 2e-2, the Q8 activation noise). The error is taken over all steps together:
for Q4_0/Q5_0 weights part of the Q8 noise is common to all outputs of one input row (their offset
goes through the sum of the unquantized block), so one step alone can reach 2-3% by chance.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import quants
from rich.console import Console
from rich.table import Table

from . import _library
from .loader import FusedGroup, GGUFError, GGUFModel, QuantizedTensor, load_gguf
from .model_maker import LlamaConfig, write_llama_model

FLOAT_TOL = 2e-2   # SPEC §5 check 2
TIMED_CALLS = 20


def best_device() -> torch.device:
    if torch.cuda.is_available() and _library.has_cuda_kernels():
        return torch.device("cuda")
    return torch.device("cpu")


def _weight_f64(model: GGUFModel, name: str) -> np.ndarray:
    t = model.tensor(name)
    if isinstance(t, QuantizedTensor):
        return quants.dequantize(t.data.numpy(), t.qtype).astype(np.float64)
    return t.double().numpy()


def _reference(model: GGUFModel, g: FusedGroup, w64: np.ndarray, bias64: np.ndarray | None,
               x: torch.Tensor) -> np.ndarray:
    """float64 norm(x) @ W.T (+ bias), from the file's norm weights and eps."""
    x64 = x.double().cpu().numpy()
    nw = model.tensor(g.norm).double().numpy()
    if g.norm_kind == "layer":
        nb = model.tensor(g.norm_bias_name).double().numpy()
        mu = x64.mean(-1, keepdims=True)
        var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
        h = (x64 - mu) / np.sqrt(var + g.eps) * nw + nb
    else:
        h = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + g.eps) * nw
    y = h @ w64.T
    return y + bias64 if bias64 is not None else y


def _time_call(fn, x: torch.Tensor) -> float:
    """Median µs of one call (after a warm-up), synchronizing around each on a GPU."""
    cuda = x.device.type == "cuda"
    fn(x)
    samples = []
    for _ in range(TIMED_CALLS):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        fn(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def run_demo(path: str | None = None, *, device: str | None = None, steps: int = 16, batch: int = 1,
             console: Console | None = None) -> bool:
    """Load, run and check every group; print a table. True when every check passes."""
    console = console or Console()
    dev = torch.device(device) if device else best_device()
    with tempfile.TemporaryDirectory(prefix="ggfuse-demo-") as tmp:
        if path is None:
            path = str(Path(tmp) / "ggfuse-demo-llama-q4_k_m.gguf")
            cfg = LlamaConfig()
            console.print(f"writing a synthetic llama model (Q4_K_M mix, n_embd {cfg.n_embd}, {cfg.n_layer} "
                          f"layers) to {path}")
            write_llama_model(path, cfg, seed=0)
        t0 = time.perf_counter()
        model = load_gguf(path, dev)
        console.print(f"loaded {model.path} ({model.arch}, {len(model.groups())} fused groups) on {dev} in "
                      f"{time.perf_counter() - t0:.2f} s")

        table = Table(title=f"fused decode path, B={batch}, {steps} steps, on {dev}")
        for col, just in (("layer", "right"), ("group", "left"), ("members", "left"), ("types", "left"),
                          ("rows", "right"), ("rel err", "right"), ("µs / call", "right"), ("", "left")):
            table.add_column(col, justify=just)
        ok_all = True
        for g in model.groups():
            w64 = np.concatenate([_weight_f64(model, n) for n in g.members])
            bias64 = None
            if g.bias is not None:
                bias64 = g.bias.double().cpu().numpy()
            outs, refs = [], []
            for _ in range(steps):
                x = torch.randn(batch, g.in_features, device=dev) * float(np.exp(np.random.uniform(-2, 2)))
                outs.append(g(x).double().cpu().numpy())
                refs.append(_reference(model, g, w64, bias64, x))
            out, ref = np.concatenate(outs), np.concatenate(refs)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.isfinite(out).all() else float("inf")
            us = _time_call(g, torch.randn(batch, g.in_features, device=dev))
            ok = err < FLOAT_TOL
            ok_all &= ok
            short = [n.removeprefix(f"blk.{g.layer}.").removesuffix(".weight") for n in g.members]
            table.add_row(str(g.layer), f"{g.norm.removeprefix(f'blk.{g.layer}.').removesuffix('.weight')} -> {g.kind}",
                          ", ".join(short), "/".join(t.name for t in g.qtypes),
                          str(sum(g.out_features)), f"{err:.2e}", f"{us:.1f}",
                          "[green]ok[/green]" if ok else "[red]FAIL[/red]")
        console.print(table)
        if ok_all:
            console.print(f"[green]all {len(model.groups())} groups match the float64 reference "
                          f"(rel err < {FLOAT_TOL:g})[/green]")
        else:
            console.print(f"[red]some groups exceed the {FLOAT_TOL:g} relative error bound[/red]")
        del model  # release the file map before the temporary folder goes
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggfuse demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="a GGUF model (default: write a small synthetic one)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when ggfuse has CUDA kernels)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per group (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="tokens per step, B (default 1)")
    args = parser.parse_args(argv)
    # Piped output gets a wide table ($COLUMNS, else 160) rather than rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 160))
    try:
        ok = run_demo(args.file, device=args.device, steps=args.steps, batch=args.batch, console=console)
    except GGUFError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    return 0 if ok else 1
