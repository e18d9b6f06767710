#!/usr/bin/env python3
"""Times Systolic's f32 CPU reference against JAX (XLA:CPU) on the same model, weights and
input, in one run, and checks that both compute the same logits.

The JAX side is not hand-written per model: it interprets the graph that `systolic inspect
--json` prints (ops, attributes, inputs), so any zoo model or `.ron` file can be compared.

Needs numpy, safetensors and jax (CPU) in the Python environment, e.g.
    python3 -m venv ~/venvs/bench && ~/venvs/bench/bin/pip install numpy safetensors 'jax[cpu]'
    ~/venvs/bench/bin/python scripts/bench_reference.py --model resnet50 --batch 8
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file


def systolic(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(z):
    """SplitMix64's finaliser, as systolic_compiler::rng::mix64 (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dropout_scale(seed, step, shape, rate):
    """Systolic's dropout mask times 1/(1-rate): a pure function of (seed, step, element index)."""
    key = mix64(np.uint64(seed) ^ mix64(np.uint64(step)))
    idx = np.arange(int(np.prod(shape)), dtype=np.uint64)
    u = (mix64(key ^ mix64(idx)) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    keep = np.float32(1.0) / (np.float32(1.0) - np.float32(rate))
    return np.where(u < np.float32(rate), np.float32(0.0), keep).reshape(shape)


def jax_forward(layers, outputs, training=False, step=0):
    """A function (params, inputs) -> outputs that follows the graph's layers in order.
    With `training`, batch norm normalises with batch statistics (dropout is not supported)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def pads(padding, window=None):
        if padding == "Valid":
            return "VALID"
        if padding == "Same":
            return "SAME"
        e = padding["Explicit"]
        return [(e["top"], e["bottom"]), (e["left"], e["right"])]

    def forward(params, inputs):
        env = dict(params)
        env.update(inputs)
        for layer in layers:
            op, attrs = layer["op"], layer["attrs"]
            xs = [env[name] for name in layer["inputs"]]
            x = xs[0]
            if op == "Conv2d":
                a = attrs["Conv2d"]
                y = lax.conv_general_dilated(
                    x, xs[1], window_strides=a["strides"], padding=pads(a["padding"]),
                    rhs_dilation=a["dilation"], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    feature_group_count=a["groups"], precision=lax.Precision.HIGHEST)
                if len(xs) > 2:
                    y = y + xs[2]
            elif op in ("MaxPool", "AvgPool"):
                a = attrs[op]
                p = pads(a["padding"])
                p = p if isinstance(p, str) else [(0, 0), *p, (0, 0)]
                dims, strides = (1, *a["window"], 1), (1, *a["strides"], 1)
                if op == "MaxPool":
                    y = lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, p)
                else:
                    s = lax.reduce_window(x, 0.0, lax.add, dims, strides, p)
                    n = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, dims, strides, p)
                    y = s / n
            elif op == "GlobalAvgPool":
                y = jnp.mean(x, axis=(1, 2))
            elif op == "Dense":
                y = jnp.matmul(x, xs[1], precision=lax.Precision.HIGHEST)
                if len(xs) > 2:
                    y = y + xs[2]
            elif op == "BatchNorm":
                eps = attrs["BatchNorm"]["epsilon"]
                gamma, beta, mean, var = xs[1:]
                if training:
                    axes = tuple(range(x.ndim - 1))
                    mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
                y = (x - mean) * (gamma / jnp.sqrt(var + eps)) + beta
            elif op == "BiasAdd":
                y = x + xs[1]
            elif op == "Add":
                y = x + xs[1]
            elif op == "Mul":
                y = x * xs[1]
            elif op == "Relu":
                y = jnp.maximum(x, 0.0)
            elif op == "Relu6":
                y = jnp.clip(x, 0.0, 6.0)
            elif op == "Dropout":
                a = attrs["Dropout"]
                y = x * dropout_scale(a["seed"], step, x.shape, a["rate"]) if training and a["rate"] > 0 else x
            elif op == "Flatten":
                y = x.reshape(x.shape[0], -1)
            elif op == "Reshape":
                y = x.reshape(x.shape[0], *layer["output_shape"][1:])
            elif op == "Concat":
                y = jnp.concatenate(xs, axis=attrs["Concat"]["axis"])
            elif op == "SoftmaxCrossEntropy":
                smoothing = attrs["SoftmaxCrossEntropy"]["label_smoothing"]
                logp = jax.nn.log_softmax(x, axis=-1)
                classes = x.shape[-1]
                q = jax.nn.one_hot(xs[1].astype(jnp.int32), classes) * (1 - smoothing) + smoothing / classes
                y = -jnp.mean(jnp.sum(q * logp, axis=-1))
            elif op == "Softmax":
                y = jax.nn.softmax(x, axis=-1)
            else:
                raise SystemExit(f"bench_reference.py: op {op} is not interpreted here")
            env[layer["name"]] = y
        return [env[o] for o in outputs]

    return forward


def compare_gradients(args, jax):
    """Gradients of the classifier's cross-entropy from `systolic grad` against jax.grad."""
    info = json.loads(systolic(args.systolic, "inspect", args.model, "--batch", str(args.batch), "--json"))
    with tempfile.TemporaryDirectory() as tmp:
        x_path, w_path = os.path.join(tmp, "x.safetensors"), os.path.join(tmp, "w.safetensors")
        l_path, g_path = os.path.join(tmp, "l.safetensors"), os.path.join(tmp, "g.safetensors")
        rng = np.random.default_rng(0)
        inputs = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) for i in info["inputs"]}
        classes = info["layers"][-1]["output_shape"][-1]
        labels = rng.integers(0, classes, size=args.batch).astype(np.int64)
        save_file(inputs, x_path)
        save_file({"labels": labels}, l_path)
        systolic(args.systolic, "run", args.model, "--seed", "0", "--save-weights", w_path, "--input", x_path,
                 "--output", os.path.join(tmp, "y.safetensors"))
        mode = [] if args.grad == "training" else ["--inference-mode"]
        systolic(args.systolic, "grad", args.model, "--weights", w_path, "--input", x_path, "--labels", l_path,
                 "--output", g_path, *mode)
        params, ours = load_file(w_path), load_file(g_path)
    loss_layer = {"name": "loss", "op": "SoftmaxCrossEntropy", "attrs": {"SoftmaxCrossEntropy": {"label_smoothing": 0.0}},
                  "inputs": [info["outputs"][0], "labels"], "output_shape": []}
    forward = jax_forward(info["layers"] + [loss_layer], ["loss"], training=args.grad == "training")
    trainable = {k: v for k, v in params.items() if k in ours}
    frozen = {k: v for k, v in params.items() if k not in ours}

    def loss_fn(p, x):
        return forward({**p, **frozen}, {**x, "labels": labels})[0]

    loss, (gp, gx) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(trainable, inputs)
    print(f"model {args.model}, batch {args.batch}, {args.grad}-mode batch norm: loss systolic {float(ours['loss']):.6f}, "
          f"jax {float(loss):.6f}")
    worst = 0.0
    for name, g in list(gp.items()) + list(gx.items()):
        g = np.asarray(g)
        err = np.abs(ours[name] - g).max() / max(np.abs(g).max(), 1e-30)
        worst = max(worst, err)
        if err > 1e-3 or args.verbose:
            print(f"  {name}: max error relative to the largest gradient {err:.3g} (largest {np.abs(g).max():.3g})")
    print(f"largest error of any gradient, relative to that gradient's largest element: {worst:.3g} "
          f"over {len(gp) + len(gx)} tensors")
    if worst > 1e-3:
        sys.exit("gradients differ beyond f32 reassociation")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--systolic", default="target/release/systolic", help="the systolic binary")
    ap.add_argument("--verbose", action="store_true", help="print every gradient's error")
    ap.add_argument("--grad", choices=["training", "inference"],
                    help="compare gradients with jax.grad instead of timing the forward pass")
    args = ap.parse_args()

    import jax

    if args.grad:
        compare_gradients(args, jax)
        return
    r = reference_against_jax(args.systolic, args.model, args.batch, args.repeat)
    flops = r["flops"]
    print(f"model {args.model}, batch {args.batch}, {flops / 1e9:.1f} GFLOP per forward pass, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"systolic reference: median {r['systolic']:.3f} s ({flops / r['systolic'] / 1e9:.0f} GFLOP/s)")
    print(f"jax (XLA:CPU):      median {r['jax']:.3f} s ({flops / r['jax'] / 1e9:.0f} GFLOP/s)")
    print(f"ratio systolic / jax: {r['systolic'] / r['jax']:.2f}")
    for name, (diff, scale) in r["outputs"].items():
        print(f"output {name}: max |systolic - jax| = {diff:.3g} (max |value| {scale:.3g})")
        if not diff <= 1e-3 * max(scale, 1.0):
            sys.exit(f"outputs differ beyond f32 reassociation: {diff}")


def reference_against_jax(binary, model, batch, repeat):
    """The reference's and JAX's median forward time (s) on the same weights and input, and
    each output's largest difference and largest value."""
    import jax

    info = json.loads(systolic(binary, "inspect", model, "--batch", str(batch), "--json"))
    with tempfile.TemporaryDirectory() as tmp:
        x_path, w_path = os.path.join(tmp, "x.safetensors"), os.path.join(tmp, "w.safetensors")
        y_path = os.path.join(tmp, "y.safetensors")
        rng = np.random.default_rng(0)
        inputs = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) for i in info["inputs"]}
        save_file(inputs, x_path)
        # Initial weights from Systolic (seed 0), so both sides use the same parameters.
        systolic(binary, "run", model, "--seed", "0", "--save-weights", w_path, "--input", x_path, "--output", y_path)
        params = load_file(w_path)
        timing = json.loads(systolic(binary, "run", model, "--weights", w_path, "--input", x_path,
                                     "--output", y_path, "--repeat", str(repeat), "--json"))
        ours = load_file(y_path)

    forward = jax.jit(jax_forward(info["layers"], info["outputs"]))
    jparams = {k: jax.numpy.asarray(v) for k, v in params.items()}
    jinputs = {k: jax.numpy.asarray(v) for k, v in inputs.items()}
    for _ in range(2):  # compile and warm up
        jax.block_until_ready(forward(jparams, jinputs))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        theirs = jax.block_until_ready(forward(jparams, jinputs))
        times.append(time.perf_counter() - t)
    outputs = {}
    for name, value in zip(info["outputs"], theirs):
        value = np.asarray(value)
        outputs[name] = (float(np.abs(ours[name] - value).max()), float(np.abs(value).max()))
    return {"systolic": timing["median_seconds"], "jax": statistics.median(times), "flops": info["total_flops"],
            "outputs": outputs, "jax_version": jax.__version__}


if __name__ == "__main__":
    main()
