//! Property tests of the lowering: random convolution and pooling geometries and random
//! batch-norm / activation / residual / dropout blocks, compiled for a simulated core, agree
//! with the CPU reference at HIGHEST precision — the inference outputs, and the loss and every
//! gradient of a training step.

mod common;

use common::lowering::*;
use common::{ConvParams, ConvRanges, add_conv, config, conv_params, pool_params};
use proptest::prelude::*;
use systolic_compiler::graph::*;
use systolic_compiler::lower::{Options, compile};
use systolic_simulator::config::presets;
use systolic_simulator::numerics::Precision;

/// `x -> pre (1x1 conv) -> op -> flatten -> logits`: the op's input gradient reaches a
/// parameter (pre's kernel), so every gradient of the op is checked.
fn around(
    name: &str,
    hw: [usize; 2],
    c: usize,
    op: impl FnOnce(&mut Graph, NodeId) -> Option<NodeId>,
) -> Option<Graph> {
    let mut g = Graph::new(name);
    let x = g.input("x", &[hw[0], hw[1], c]).unwrap();
    let pre = g.conv2d("pre", x, ConvSpec::new(c, 1)).unwrap();
    let y = op(&mut g, pre)?;
    let flat = g.flatten("flat", y).ok()?;
    let logits = g.dense("logits", flat, 10).ok()?;
    g.set_outputs(vec![logits]);
    Some(g)
}

/// The graph compiles and agrees with the reference: inference, then a training step.
fn agrees(g: Graph, batch: usize) {
    agrees_within(g, batch, 1e-5);
}

/// [`agrees`] with inference outputs within `tol` of the magnitude of the terms they sum
/// ([`differential_by_magnitude`]).
fn agrees_within(g: Graph, batch: usize, tol: f64) {
    let m = presets::preset("v2-8").unwrap();
    let opts = options(m, batch, Precision::Highest);
    if let Err(e) = compile(&g, &opts) {
        panic!("{e}");
    }
    for (out, err) in differential_by_magnitude(&g, "v2-8", batch, Precision::Highest) {
        assert!(err < tol, "{out}: {err}");
    }
    let training = Options { training: Some(Default::default()), ..opts };
    if let Err(e) = compile(&g, &training) {
        panic!("{e}");
    }
    gradients_match(g, batch);
}

/// An ungrouped convolution of `p`'s geometry with at most 3x3 taps and two output channels
/// per group, the channels of `p` (enough for shifted matmuls), agrees forward and backward.
fn wide_convolution_agrees(p: ConvParams) {
    let p = ConvParams { groups: 1, cog: p.cog.min(2), k: [p.k[0].min(3), p.k[1].min(3)], ..p };
    let g = around("conv", p.hw, p.channels(), |g, x| {
        let y = add_conv(g, "conv", ["conv/kernel", "conv/bias"], Init::GlorotUniform, x, &p)?;
        g.relu("conv_relu", y).ok()
    });
    // Up to 9 × 128 products per output, summed in another order than the reference's.
    if let Some(g) = g {
        agrees_within(g, p.n, 1e-4);
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// Strides (equal or not), padding (SAME, VALID, explicit and uneven), dilation, groups
    /// and depthwise.
    #[test]
    fn convolutions_agree_forward_and_backward(
        p in conv_params(ConvRanges { hw: 3..10, cg: 1..5, strides: 1..4 }),
    ) {
        let g = around("conv", p.hw, p.channels(), |g, x| {
            let y = add_conv(g, "conv", ["conv/kernel", "conv/bias"], Init::GlorotUniform, x, &p)?;
            g.relu("conv_relu", y).ok()
        });
        if let Some(g) = g {
            agrees(g, p.n);
        }
    }

    /// Strided convolutions with channels enough that folding the taps into K does not pay:
    /// shifted matmuls over the stride phases of the staged input. (The strided cases above
    /// read the phases too: im2col for few channels, shifted matmuls when grouped or 1x1,
    /// depthwise on the VPU.)
    #[test]
    fn strided_convolutions_by_phase_agree_forward_and_backward(
        p in conv_params(ConvRanges { hw: 3..10, cg: 114..129, strides: 2..4 }),
    ) {
        wide_convolution_agrees(p);
    }

    /// Stride-1 convolutions with channels enough for shifted matmuls: on maps where the
    /// padding is a large share of the padded width, the images of a block lie side by side
    /// in each staged row, sharing their padding columns.
    #[test]
    fn packed_convolutions_agree_forward_and_backward(
        p in conv_params(ConvRanges { hw: 2..9, cg: 114..129, strides: 1..2 }),
    ) {
        wide_convolution_agrees(p);
    }

    /// Max and average windows, strides and paddings, forward and gradient.
    #[test]
    fn pooling_agrees_forward_and_backward(p in pool_params()) {
        let g = around("pool", p.hw, p.c, |g, x| {
            let pool = Pool { window: p.window, strides: p.strides, padding: p.padding };
            if p.max { g.max_pool("pool", x, pool).ok() } else { g.avg_pool("pool", x, pool).ok() }
        });
        if let Some(g) = g {
            agrees(g, p.n);
        }
    }

    /// Two branches concatenated on channels, global or windowed average pooling, a dense
    /// layer per pixel or per example, ReLU6.
    #[test]
    fn concatenated_branches_and_dense_heads_agree(
        (batch, h, w, c) in (1usize..4, 2usize..7, 2usize..7, 1usize..6),
        (ca, cb, units) in (1usize..9, 1usize..9, 1usize..40),
        global in any::<bool>(),
    ) {
        let g = around("head", [h, w], c, |g, x| {
            let a = g.conv2d("a", x, ConvSpec::new(ca, 1)).ok()?;
            let a = g.relu("a_relu", a).ok()?;
            let b = g.conv2d("b", x, ConvSpec::new(cb, 3).same()).ok()?;
            let y = g.concat("cat", &[a, b], -1).ok()?;
            let y = if global {
                g.global_avg_pool("gap", y).ok()?
            } else {
                g.avg_pool("avg", y, Pool { window: [2, 2], strides: [1, 1], padding: Padding::Same }).ok()?
            };
            let y = g.dense("hidden", y, units).ok()?;
            g.relu6("hidden_relu6", y).ok()
        });
        if let Some(g) = g {
            agrees(g, batch);
        }
    }

    /// Concatenation (and, backward, slicing) along the height, width or channel axis.
    #[test]
    fn concatenation_along_any_axis_agrees(
        (batch, h, w, c, k) in (1usize..4, 1usize..6, 1usize..6, 1usize..5, 1usize..7),
        axis in 1i64..4,
    ) {
        let g = around("stack", [h, w], c, |g, x| {
            let a = g.conv2d("a", x, ConvSpec::new(k, 1)).ok()?;
            let b = g.conv2d("b", x, ConvSpec::new(k, 3).same()).ok()?;
            let y = g.concat("cat", &[a, b], axis).ok()?;
            g.relu("cat_relu", y).ok()
        });
        if let Some(g) = g {
            agrees(g, batch);
        }
    }

    /// A softmax over channels gating another branch by an elementwise product.
    #[test]
    fn softmax_gates_and_products_agree(
        (batch, h, w, c) in (1usize..4, 2usize..6, 2usize..6, 1usize..6),
        k in 1usize..12,
    ) {
        let g = around("gate", [h, w], c, |g, x| {
            let a = g.conv2d("a", x, ConvSpec::new(k, 1)).ok()?;
            let gate = g.softmax("gate", a).ok()?;
            let b = g.conv2d("b", x, ConvSpec::new(k, 3).same()).ok()?;
            let y = g.mul("gated", gate, b).ok()?;
            g.relu("gated_relu", y).ok()
        });
        if let Some(g) = g {
            agrees(g, batch);
        }
    }

    /// Batch norm (batch statistics in training), ReLU or ReLU6, a residual add and dropout.
    #[test]
    fn normalised_residual_blocks_agree(
        (batch, h, w, c) in (2usize..4, 2usize..7, 2usize..7, 1usize..9),
        (momentum, epsilon, rate) in (0.5f32..0.999, 1e-5f32..1e-2, 0.0f32..0.7),
        relu6 in any::<bool>(),
    ) {
        let g = around("block", [h, w], c, |g, x| {
            let y = g.conv2d("conv", x, ConvSpec::new(c, 3).same().no_bias()).ok()?;
            let y = g.batch_norm("bn", y, BatchNorm { momentum, epsilon }).ok()?;
            let y = g.add_op("residual", y, x).ok()?;
            let y = if relu6 { g.relu6("act", y).ok()? } else { g.relu("act", y).ok()? };
            g.dropout("drop", y, rate, 5).ok()
        });
        if let Some(g) = g {
            agrees(g, batch);
        }
    }
}
