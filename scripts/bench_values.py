#!/usr/bin/env python3
"""The three value engines against their peers, in one run, with the ratios issue 13 sets:

1. the functional engine (simulated TPU values, bit-exact bf16 MXU) against the f32 CPU
   reference on ResNet-50 inference at batch 8: target within 1.5x of the reference's time;
2. the bit-exact MXU kernel against NumPy's float32 matmul at 1024^3: target at least 1.0x;
3. the reference's ResNet-50 forward pass at batch 8 against JAX (XLA:CPU): target at most 1.0x.

Each pair is timed on the same host in the same run, alternating where the VM's speed drifts,
so the ratios mean more than the absolute times. Needs numpy, safetensors and jax (CPU):

    python3 -m venv ~/venvs/bench && ~/venvs/bench/bin/pip install numpy safetensors 'jax[cpu]'
    cargo build --release
    ~/venvs/bench/bin/python scripts/bench_values.py [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mxu import kernel_against_numpy  # noqa: E402
from bench_reference import reference_against_jax  # noqa: E402


def run_seconds(binary, backend, model, batch, repeat):
    """Median host seconds of `systolic run` computing the model's values on one backend."""
    out = subprocess.run([binary, "run", model, "--batch", str(batch), "--backend", backend, "--repeat", str(repeat),
                          "--output", os.devnull if os.name != "nt" else "NUL", "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["median_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per pair")
    ap.add_argument("--systolic", default="target/release/systolic")
    args = ap.parse_args()

    functional, reference = [], []
    for _ in range(args.rounds):
        functional.append(run_seconds(args.systolic, "tpu", "resnet50", 8, 3))
        reference.append(run_seconds(args.systolic, "cpu", "resnet50", 8, 3))
    ours, numpy, meta = kernel_against_numpy(args.systolic, 1024, args.rounds, 10)
    jax = reference_against_jax(args.systolic, "resnet50", 8, 3 * args.rounds)

    f, r = statistics.median(functional), statistics.median(reference)
    k, n = statistics.median(ours), statistics.median(numpy)
    print(f"{os.cpu_count()} CPUs; numpy {meta['numpy']} ({meta['blas']}); jax {jax['jax_version']}; "
          f"medians of {args.rounds} alternating rounds")
    print()
    print(f"{'pair':58} {'ours':>12} {'peer':>12} {'ratio':>6} {'target':>8}")
    rows = [
        ("functional engine / reference, ResNet-50 batch 8 (s)", f, r, f / r, "<= 1.5"),
        ("bit-exact MXU kernel / NumPy f32, 1024^3 (GFLOP/s)", k, n, k / n, ">= 1.0"),
        ("reference / JAX, ResNet-50 forward batch 8 (s)", jax["systolic"], jax["jax"],
         jax["systolic"] / jax["jax"], "<= 1.0"),
    ]
    for name, a, b, ratio, target in rows:
        print(f"{name:58} {a:12.3f} {b:12.3f} {ratio:6.2f} {target:>8}")
    for name, (diff, scale) in jax["outputs"].items():
        print(f"(reference and JAX agree: output {name} max |difference| {diff:.3g}, max |value| {scale:.3g})")


if __name__ == "__main__":
    main()
