//! MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
//! Vision Applications", 2017) as Keras builds it (alpha 1.0): every convolution without bias,
//! then batch norm and ReLU6; stride-2 layers pad one pixel at the bottom and right; the head is
//! global pooling, dropout and a 1×1 convolution with bias.

use super::ZooOptions;
use crate::error::Result;
use crate::graph::{BatchNorm, ConvSpec, Graph, NodeId, Padding};

/// Keras' BatchNormalization defaults.
const BN: BatchNorm = BatchNorm { momentum: 0.99, epsilon: 1e-3 };

/// Keras pads stride-2 layers by (0, 1) on each axis, then applies a VALID convolution.
fn padding(stride: usize) -> Padding {
    if stride == 2 { Padding::Explicit { top: 0, bottom: 1, left: 0, right: 1 } } else { Padding::Same }
}

fn bn_relu6(g: &mut Graph, name: &str, x: NodeId) -> Result<NodeId> {
    let x = g.batch_norm(&format!("{name}_bn"), x, BN)?;
    g.relu6(&format!("{name}_relu"), x)
}

/// MobileNet v1: 4,231,976 trainable parameters.
pub fn mobilenet_v1(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = opts.input_hw.unwrap_or([224, 224]);
    let mut g = Graph::new("mobilenet_v1");
    let x = g.input("image", &[h, w, 3])?;
    let x = g.conv2d("conv1", x, ConvSpec::new(32, 3).stride(2).padding(padding(2)).no_bias())?;
    let mut x = bn_relu6(&mut g, "conv1", x)?;
    let blocks: [(usize, usize); 13] = [
        (64, 1),
        (128, 2),
        (128, 1),
        (256, 2),
        (256, 1),
        (512, 2),
        (512, 1),
        (512, 1),
        (512, 1),
        (512, 1),
        (512, 1),
        (1024, 2),
        (1024, 1),
    ];
    for (i, &(filters, stride)) in blocks.iter().enumerate() {
        let id = i + 1;
        let dw = ConvSpec::depthwise(3).stride(stride).padding(padding(stride)).no_bias();
        x = g.conv2d(&format!("conv_dw_{id}"), x, dw)?;
        x = bn_relu6(&mut g, &format!("conv_dw_{id}"), x)?;
        x = g.conv2d(&format!("conv_pw_{id}"), x, ConvSpec::new(filters, 1).no_bias())?;
        x = bn_relu6(&mut g, &format!("conv_pw_{id}"), x)?;
    }
    let x = g.global_avg_pool("global_average_pooling2d", x)?;
    let x = g.reshape("reshape_1", x, &[1, 1, 1024])?;
    let x = g.dropout("dropout", x, 1e-3, 1)?;
    let x = g.conv2d("conv_preds", x, ConvSpec::new(opts.classes.unwrap_or(1000), 1))?;
    let logits = g.reshape("reshape_2", x, &[-1])?;
    g.add_output(logits);
    Ok(g)
}
