"""Load benchmark: `ggfuse.load_gguf` throughput (GB/s) and peak host memory on a multi-GB synthetic
model written to a temporary folder. The same as `python -m ggfuse bench-load`; options:

    python benchmarks/bench_load.py [--size-gb 4] [--device cuda] [--cold] [--repeats 2] [--dir DIR] [--keep]
"""
import sys

from ggfuse.load_bench import main

if __name__ == "__main__":
    sys.exit(main())
