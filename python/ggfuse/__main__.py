"""`python -m ggfuse COMMAND`: inspect a GGUF file's fusion plan, run the demo, run benchmarks.

    inspect FILE      the fusion plan: per layer, each group's norm, members, types, rows, fused or
                      fallback and why; totals
    demo [FILE]       load a model (default: a small synthetic Q4_K_M llama), run and check every group
    bench ...         kernel benchmarks (ggfuse.bench)
    bench-load ...    load throughput on a multi-GB synthetic model (ggfuse.load_bench)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.table import Table

COMMANDS = {
    "inspect": "show the fusion plan of a GGUF file",
    "demo": "load a model, run every fused group, check it against gguf-py",
    "bench": "kernel benchmarks (ggfuse.bench)",
    "bench-load": "load throughput (GB/s) and peak host memory on a multi-GB synthetic model",
}


def _short(name: str, layer: int | None) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q' inside layer 3's rows."""
    if layer is not None:
        name = name.removeprefix(f"blk.{layer}.")
    return name.removesuffix(".weight")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_fusion_plan(model, console: Console) -> None:
    hp = model.hparams
    console.print(f"[bold]{model.path}[/bold]: GGUF v{model.version}, arch [bold]{model.arch}[/bold]", highlight=False)
    if hp is not None:
        heads = hp.n_head[0] if len(set(hp.n_head)) == 1 else list(hp.n_head)
        kv = hp.n_head_kv[0] if len(set(hp.n_head_kv)) == 1 else list(hp.n_head_kv)
        line = (f"{hp.n_layer} layers, n_embd {hp.n_embd}, heads {heads} (KV {kv}) x {hp.head_dim_k}, "
                f"{'RMSNorm' if hp.norm_kind == 'rms' else 'LayerNorm'} eps {hp.norm_eps:g}")
        if hp.full_attention_interval is not None:
            line += f", full attention every {hp.full_attention_interval} layers"
        if hp.n_expert:
            line += f", {hp.n_expert} experts"
        console.print(line, highlight=False)
    table = Table(title="fusion plan", show_lines=False)
    # Short cells stay on one line; member lists and reasons wrap when the console is narrow.
    for col, just, wrap in (("layer", "right", False), ("kind", "left", False), ("norm", "left", False),
                            ("members", "left", True), ("types", "left", True), ("rows", "right", True),
                            ("status", "left", False), ("why", "left", True)):
        table.add_column(col, justify=just, no_wrap=not wrap, overflow="fold")
    colors = {"fused": "green", "fused+fallback": "yellow", "fallback": "yellow", "not fused": "red"}
    for row in model.fusion_report():
        table.add_row(
            "" if row.layer is None else str(row.layer), row.kind,
            "" if row.norm is None else _short(row.norm, row.layer),
            ", ".join(_short(m, row.layer) for m in row.members),
            "/".join(row.types), "+".join(map(str, row.rows)),
            f"[{colors[row.status]}]{row.status}[/{colors[row.status]}]", row.reason)
    console.print(table)
    t = model.fusion_totals()
    console.print(
        f"{len(model.groups())} groups; fused {_human_bytes(t['fused_bytes'])}, fallback "
        f"{_human_bytes(t['fallback_bytes'])}, outside groups {_human_bytes(t['other_bytes'])} of "
        f"{_human_bytes(t['total_bytes'])}: [bold]{t['fused_fraction']:.1%}[/bold] of all tensor bytes fused "
        f"({t['group_fused_fraction']:.1%} of the grouped projections)", highlight=False)


def _inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggfuse inspect", description=COMMANDS["inspect"])
    parser.add_argument("file", help="a GGUF model file")
    args = parser.parse_args(argv)
    from .loader import GGUFError, load_gguf
    try:
        model = load_gguf(args.file, load_weights=False)
    except (GGUFError, OSError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    # Piped output gets a wide table ($COLUMNS, else 200) rather than rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 200))
    print_fusion_plan(model, console)
    return 0


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("ggfuse.bench")
    except ModuleNotFoundError as e:
        if e.name != "ggfuse.bench":
            raise
        Console(stderr=True).print("[red]error:[/red] the kernel benchmarks (ggfuse.bench) are not part of "
                                   "this installation", highlight=False)
        return 2
    return int(bench.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m ggfuse", description="ggfuse: fused GGUF projections for PyTorch",
        epilog="run `python -m ggfuse COMMAND -h` for a command's options")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    # Each command parses its own options, so the dispatcher only reads the command name.
    if not argv or argv[0] not in COMMANDS:
        parser.print_help(sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "inspect":
        return _inspect(rest)
    if command == "demo":
        from . import demo
        return demo.main(rest)
    if command == "bench":
        return _bench(rest)
    from . import load_bench
    return load_bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
