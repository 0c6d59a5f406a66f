"""The CPU reference figure for BENCHMARKS.md: float32 GEMM throughput of numpy's BLAS
(OpenBLAS in the PyPI wheel) on a 512x512x512 product, using every core.
Set-up: python3 -m venv .venv && .venv/bin/pip install numpy
Usage:  .venv/bin/python tools/numpy_sgemm.py [n] [repeats]"""
import sys
import time

import numpy as np

n = int(sys.argv[1]) if len(sys.argv) > 1 else 512
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 200
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
for _ in range(10):
    a @ b
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    best = min(best, (time.perf_counter() - t0) / repeats)
print(f"numpy {np.__version__} sgemm {n}x{n}x{n}: {best * 1e6:.1f} us, {2 * n**3 / best / 1e9:.1f} GFLOP/s")
