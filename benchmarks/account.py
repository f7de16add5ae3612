"""Kernel account: ``python benchmarks/account.py [--out DIR] [--shapes H:N,...]``.

Same as ``pruneattn bench --account``: the exact bytes and ``tl.dot`` FLOPs of every Triton kernel,
counted in Triton's interpreter, with floors, SDPA / eager models and H100 lower bounds (a model).
"""
import sys

from pruneattn.bench.account import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
