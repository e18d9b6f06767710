//! ResNets (He et al., "Deep Residual Learning for Image Recognition", 2015) as torchvision
//! builds them: convolutions without bias, each followed by batch norm; ResNet-50 is v1.5
//! (the stride sits in the 3×3 convolution of a bottleneck, not the first 1×1).

use super::ZooOptions;
use crate::error::Result;
use crate::graph::{BatchNorm, ConvSpec, Graph, Init, NodeId, Padding, Pool};

/// PyTorch's BatchNorm2d defaults (momentum 0.1 in PyTorch's convention is 0.9 in Keras').
const BN: BatchNorm = BatchNorm { momentum: 0.9, epsilon: 1e-5 };

fn conv(filters: usize, kernel: usize, stride: usize) -> ConvSpec {
    ConvSpec::new(filters, kernel).stride(stride).pad(kernel / 2).no_bias().kernel_init(Init::HeNormal)
}

/// conv → batch norm, named `<prefix>conv<i>` and `<prefix>bn<i>`.
fn conv_bn(g: &mut Graph, prefix: &str, i: usize, x: NodeId, spec: ConvSpec) -> Result<NodeId> {
    let x = g.conv2d(&format!("{prefix}conv{i}"), x, spec)?;
    g.batch_norm(&format!("{prefix}bn{i}"), x, BN)
}

/// The shortcut: identity, or a strided 1×1 projection with batch norm when the shape changes.
fn shortcut(g: &mut Graph, prefix: &str, x: NodeId, filters: usize, stride: usize) -> Result<NodeId> {
    let cin = *g.node(x).shape.dims.last().unwrap_or(&0);
    if stride == 1 && cin == filters {
        return Ok(x);
    }
    let s = g.conv2d(&format!("{prefix}downsample.0"), x, conv(filters, 1, stride))?;
    g.batch_norm(&format!("{prefix}downsample.1"), s, BN)
}

fn basic_block(g: &mut Graph, prefix: &str, x: NodeId, filters: usize, stride: usize) -> Result<NodeId> {
    let y = conv_bn(g, prefix, 1, x, conv(filters, 3, stride))?;
    let y = g.relu(&format!("{prefix}relu1"), y)?;
    let y = conv_bn(g, prefix, 2, y, conv(filters, 3, 1))?;
    let s = shortcut(g, prefix, x, filters, stride)?;
    let y = g.add_op(&format!("{prefix}add"), y, s)?;
    g.relu(&format!("{prefix}relu"), y)
}

fn bottleneck(g: &mut Graph, prefix: &str, x: NodeId, width: usize, stride: usize) -> Result<NodeId> {
    let y = conv_bn(g, prefix, 1, x, conv(width, 1, 1))?;
    let y = g.relu(&format!("{prefix}relu1"), y)?;
    let y = conv_bn(g, prefix, 2, y, conv(width, 3, stride))?;
    let y = g.relu(&format!("{prefix}relu2"), y)?;
    let y = conv_bn(g, prefix, 3, y, conv(width * 4, 1, 1))?;
    let s = shortcut(g, prefix, x, width * 4, stride)?;
    let y = g.add_op(&format!("{prefix}add"), y, s)?;
    g.relu(&format!("{prefix}relu"), y)
}

fn resnet(name: &str, blocks: [usize; 4], bottlenecks: bool, opts: ZooOptions) -> Result<Graph> {
    let [h, w] = opts.input_hw.unwrap_or([224, 224]);
    let mut g = Graph::new(name);
    let x = g.input("image", &[h, w, 3])?;
    let x = g.conv2d("conv1", x, conv(64, 7, 2))?;
    let x = g.batch_norm("bn1", x, BN)?;
    let x = g.relu("relu", x)?;
    let pad = Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 };
    let mut x = g.max_pool("maxpool", x, Pool { window: [3, 3], strides: [2, 2], padding: pad })?;
    for (stage, &count) in blocks.iter().enumerate() {
        let width = 64 << stage;
        for b in 0..count {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let prefix = format!("layer{}.{b}.", stage + 1);
            x = if bottlenecks {
                bottleneck(&mut g, &prefix, x, width, stride)?
            } else {
                basic_block(&mut g, &prefix, x, width, stride)?
            };
        }
    }
    let x = g.global_avg_pool("avgpool", x)?;
    let logits = g.dense("fc", x, opts.classes.unwrap_or(1000))?;
    g.add_output(logits);
    Ok(g)
}

/// ResNet-18: 11,689,512 trainable parameters.
pub fn resnet18(opts: ZooOptions) -> Result<Graph> {
    resnet("resnet18", [2, 2, 2, 2], false, opts)
}

/// ResNet-34: 21,797,672 trainable parameters.
pub fn resnet34(opts: ZooOptions) -> Result<Graph> {
    resnet("resnet34", [3, 4, 6, 3], false, opts)
}

/// ResNet-50 v1.5: 25,557,032 trainable parameters.
pub fn resnet50(opts: ZooOptions) -> Result<Graph> {
    resnet("resnet50", [3, 4, 6, 3], true, opts)
}
