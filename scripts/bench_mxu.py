#!/usr/bin/env python3
"""Times Systolic's bit-exact bf16 MXU kernel against NumPy's float32 matmul, in one run.

DESIGN target: at 1024^3 the bit-exact kernel reaches at least 0.8x NumPy's GFLOP/s. NumPy runs
with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from its environment (this workplace sets
them for old OpenBLAS builds; unset, a current NumPy picks its best kernel for the CPU). The two
are timed in alternation, several rounds each, because a shared VM's speed drifts; the best and
the median of the rounds are reported.

    python3 -m venv ~/venvs/bench && ~/venvs/bench/bin/pip install numpy
    cargo build --release
    ~/venvs/bench/bin/python scripts/bench_mxu.py [--size 1024] [--rounds 7]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

NUMPY_TIMER = r"""
import json, sys, time
import numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
for _ in range(3):
    a @ b
times = []
for _ in range(reps):
    t = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t)
times.sort()
info = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
blas = info.get("Build Dependencies", {}).get("blas", {}) if isinstance(info, dict) else {}
print(json.dumps({"fastest": times[0], "median": times[len(times) // 2], "numpy": np.__version__,
                  "blas": f"{blas.get('name', '?')} {blas.get('version', '')}".strip()}))
"""


def kernel_against_numpy(binary, n, rounds, reps):
    """GFLOP/s of the bit-exact kernel and of NumPy's float32 matmul at n^3, timed in
    alternation round by round (a shared VM's speed drifts): two lists, and NumPy's build."""
    flop = 2.0 * n ** 3
    numpy_env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    ours, theirs, meta = [], [], {}
    for _ in range(rounds):
        out = subprocess.run([binary, "mxu", "--m", str(n), "--k", str(n), "--n", str(n), "--values",
                              "--repeat", str(reps), "--json"], check=True, capture_output=True, text=True)
        ours.append(flop / json.loads(out.stdout)["host_seconds_fastest"] / 1e9)
        out = subprocess.run([sys.executable, "-c", NUMPY_TIMER, str(n), str(reps)], check=True,
                             capture_output=True, text=True, env=numpy_env)
        meta = json.loads(out.stdout)
        theirs.append(flop / meta["fastest"] / 1e9)
    return ours, theirs, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10, help="matmuls timed per round")
    ap.add_argument("--systolic", default="target/release/systolic")
    args = ap.parse_args()
    n = args.size
    ours, theirs, meta = kernel_against_numpy(args.systolic, n, args.rounds, args.reps)
    print(f"{n}^3 matmul, {os.cpu_count()} CPUs, numpy {meta['numpy']} ({meta['blas']}), {args.rounds} alternating rounds")
    print(f"systolic bit-exact bf16 MXU kernel: best {max(ours):.1f} GFLOP/s, median {statistics.median(ours):.1f}")
    print(f"numpy float32 matmul:               best {max(theirs):.1f} GFLOP/s, median {statistics.median(theirs):.1f}")
    print(f"ratio (best / best): {max(ours) / max(theirs):.2f}; ratio of medians: "
          f"{statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    main()
