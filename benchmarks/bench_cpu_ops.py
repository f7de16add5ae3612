"""CPU op-level benchmark: ``python benchmarks/bench_cpu_ops.py [--out DIR]``.

Same as ``pruneattn bench --cpu-ops``: attention + scores on the CPU path vs SDPA alone vs the eager
path at (16, 6, 197, 64) and (8, 12, 577, 64), fp32, 2 threads, interleaved repeats, medians.
"""
import sys

from pruneattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cpu-ops", *sys.argv[1:]]))
