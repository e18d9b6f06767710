//! Plain convolutional stacks: simple_cnn, digits_cnn, shapes_cnn, LeNet-5, AlexNet, VGG-16.

use super::ZooOptions;
use crate::error::Result;
use crate::graph::{BatchNorm, ConvSpec, Graph, NodeId, Pool};

fn hw(opts: ZooOptions, default: usize) -> [usize; 2] {
    opts.input_hw.unwrap_or([default, default])
}

fn pool(window: usize, stride: usize) -> Pool {
    Pool { window: [window, window], strides: [stride, stride], ..Pool::default() }
}

/// conv → relu, named `<name>` and `<name>_relu`.
fn conv_relu(g: &mut Graph, name: &str, x: NodeId, spec: ConvSpec) -> Result<NodeId> {
    let x = g.conv2d(name, x, spec)?;
    g.relu(&format!("{name}_relu"), x)
}

/// dense → relu, named `<name>` and `<name>_relu`.
fn dense_relu(g: &mut Graph, name: &str, x: NodeId, units: usize) -> Result<NodeId> {
    let x = g.dense(name, x, units)?;
    g.relu(&format!("{name}_relu"), x)
}

/// The classic MNIST CNN: 104,590 trainable parameters at 28×28×1.
pub fn simple_cnn(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 28);
    let mut g = Graph::new("simple_cnn");
    let x = g.input("image", &[h, w, 1])?;
    let x = conv_relu(&mut g, "conv1", x, ConvSpec::new(10, 5))?;
    let x = g.max_pool("pool1", x, pool(2, 2))?;
    let x = conv_relu(&mut g, "conv2", x, ConvSpec::new(20, 5))?;
    let x = g.max_pool("pool2", x, pool(2, 2))?;
    let x = g.flatten("flatten", x)?;
    let x = dense_relu(&mut g, "fc1", x, 300)?;
    let x = g.dropout("dropout", x, 0.25, 1)?;
    let logits = g.dense("logits", x, opts.classes.unwrap_or(10))?;
    g.add_output(logits);
    Ok(g)
}

/// A small CNN for the 8×8 UCI digits (shipped in `data/digits`).
pub fn digits_cnn(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 8);
    let mut g = Graph::new("digits_cnn");
    let x = g.input("image", &[h, w, 1])?;
    let x = conv_relu(&mut g, "conv1", x, ConvSpec::new(16, 3).same())?;
    let x = g.max_pool("pool1", x, pool(2, 2))?;
    let x = conv_relu(&mut g, "conv2", x, ConvSpec::new(32, 3).same())?;
    let x = g.max_pool("pool2", x, pool(2, 2))?;
    let x = g.flatten("flatten", x)?;
    let x = dense_relu(&mut g, "fc1", x, 64)?;
    let logits = g.dense("logits", x, opts.classes.unwrap_or(10))?;
    g.add_output(logits);
    Ok(g)
}

/// A small RGB CNN for the generated shapes (and transfer learning's frozen features): three
/// 3×3 convolution blocks with batch norm (16, 32, 64 channels; the first two pooled), global
/// average pooling and a dense classifier (3 classes).
pub fn shapes_cnn(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 32);
    let mut g = Graph::new("shapes_cnn");
    let mut x = g.input("image", &[h, w, 3])?;
    for (i, channels) in [16, 32, 64].into_iter().enumerate() {
        let name = format!("conv{}", i + 1);
        x = g.conv2d(&name, x, ConvSpec::new(channels, 3).same())?;
        x = g.batch_norm(&format!("{name}_bn"), x, BatchNorm::default())?;
        x = g.relu(&format!("{name}_relu"), x)?;
        if i < 2 {
            x = g.max_pool(&format!("pool{}", i + 1), x, pool(2, 2))?;
        }
    }
    let dims = g.node(x).shape.dims.clone();
    let x = g.avg_pool("global_pool", x, Pool { window: [dims[0], dims[1]], strides: [1, 1], ..Pool::default() })?;
    let x = g.flatten("flatten", x)?;
    let logits = g.dense("logits", x, opts.classes.unwrap_or(3))?;
    g.add_output(logits);
    Ok(g)
}

/// LeNet-5 (LeCun et al., 1998) with ReLU and average pooling: 61,706 trainable parameters.
pub fn lenet5(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 32);
    let mut g = Graph::new("lenet5");
    let x = g.input("image", &[h, w, 1])?;
    let x = conv_relu(&mut g, "c1", x, ConvSpec::new(6, 5))?;
    let x = g.avg_pool("s2", x, pool(2, 2))?;
    let x = conv_relu(&mut g, "c3", x, ConvSpec::new(16, 5))?;
    let x = g.avg_pool("s4", x, pool(2, 2))?;
    let x = g.flatten("flatten", x)?;
    let x = dense_relu(&mut g, "c5", x, 120)?;
    let x = dense_relu(&mut g, "f6", x, 84)?;
    let logits = g.dense("logits", x, opts.classes.unwrap_or(10))?;
    g.add_output(logits);
    Ok(g)
}

/// AlexNet as in torchvision (one tower, 64/192/384/256/256 filters): 61,100,840 parameters.
pub fn alexnet(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 224);
    let mut g = Graph::new("alexnet");
    let x = g.input("image", &[h, w, 3])?;
    let x = conv_relu(&mut g, "features.0", x, ConvSpec::new(64, 11).stride(4).pad(2))?;
    let x = g.max_pool("features.2", x, pool(3, 2))?;
    let x = conv_relu(&mut g, "features.3", x, ConvSpec::new(192, 5).pad(2))?;
    let x = g.max_pool("features.5", x, pool(3, 2))?;
    let x = conv_relu(&mut g, "features.6", x, ConvSpec::new(384, 3).pad(1))?;
    let x = conv_relu(&mut g, "features.8", x, ConvSpec::new(256, 3).pad(1))?;
    let x = conv_relu(&mut g, "features.10", x, ConvSpec::new(256, 3).pad(1))?;
    let x = g.max_pool("features.12", x, pool(3, 2))?;
    let x = g.flatten("flatten", x)?;
    let x = g.dropout("classifier.0", x, 0.5, 1)?;
    let x = dense_relu(&mut g, "classifier.1", x, 4096)?;
    let x = g.dropout("classifier.3", x, 0.5, 2)?;
    let x = dense_relu(&mut g, "classifier.4", x, 4096)?;
    let logits = g.dense("classifier.6", x, opts.classes.unwrap_or(1000))?;
    g.add_output(logits);
    Ok(g)
}

/// VGG-16 (configuration D, no batch norm): 138,357,544 parameters.
pub fn vgg16(opts: ZooOptions) -> Result<Graph> {
    let [h, w] = hw(opts, 224);
    let mut g = Graph::new("vgg16");
    let mut x = g.input("image", &[h, w, 3])?;
    let stages: [&[usize]; 5] = [&[64, 64], &[128, 128], &[256, 256, 256], &[512, 512, 512], &[512, 512, 512]];
    for (s, filters) in stages.iter().enumerate() {
        for (i, &f) in filters.iter().enumerate() {
            x = conv_relu(&mut g, &format!("block{}_conv{}", s + 1, i + 1), x, ConvSpec::new(f, 3).pad(1))?;
        }
        x = g.max_pool(&format!("block{}_pool", s + 1), x, pool(2, 2))?;
    }
    let x = g.flatten("flatten", x)?;
    let x = dense_relu(&mut g, "fc1", x, 4096)?;
    let x = g.dropout("fc1_dropout", x, 0.5, 1)?;
    let x = dense_relu(&mut g, "fc2", x, 4096)?;
    let x = g.dropout("fc2_dropout", x, 0.5, 2)?;
    let logits = g.dense("predictions", x, opts.classes.unwrap_or(1000))?;
    g.add_output(logits);
    Ok(g)
}
