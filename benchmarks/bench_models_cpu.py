"""Model-level CPU benchmark: ``python benchmarks/bench_models_cpu.py [--out DIR]``.

Same as ``pruneattn bench --cpu-models``: DeiT-S 224 (batch 16, 1) and ViT-S/16 384 (batch 8, 1),
unpatched vs ``pruneattn.patch(model, keep_rate=0.7, layers=(3, 6, 9), stat="var")`` vs the EViT-style
eager patch; latency (interleaved medians), images/s, FLOP-count bound, peak RSS per configuration in
a fresh subprocess.
"""
import sys

from pruneattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cpu-models", *sys.argv[1:]]))
