//! The model zoo: reference CNNs built with the graph builder.
//!
//! Every model is a classifier: an Input named `image` (NHWC) and one output, the logits
//! (no softmax; the training loss adds it). Layer names follow torchvision's (`layer1.0.conv1`)
//! or Keras' (`conv_dw_1`) so weights from either framework map by name, and trainable parameter
//! counts equal the published ones at the default (ImageNet) sizes — tests check each.

mod classic;
mod mobilenet;
mod resnet;

use std::path::Path;

use crate::error::{Error, Result};
use crate::graph::Graph;

/// Size options for a zoo model; `None` means the model's published default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZooOptions {
    /// Input height and width.
    pub input_hw: Option<[usize; 2]>,
    /// Output classes.
    pub classes: Option<usize>,
}

type BuildFn = fn(ZooOptions) -> Result<Graph>;

/// Every zoo model: name, one-line description, builder.
const MODELS: &[(&str, &str, BuildFn)] = &[
    (
        "simple_cnn",
        "28x28x1: conv5x5x10, pool, conv5x5x20, pool, dense 300, dropout 0.25, dense 10",
        classic::simple_cnn,
    ),
    ("digits_cnn", "8x8x1 handwritten digits: two 3x3 convs with pooling, dense 64, dense 10", classic::digits_cnn),
    (
        "shapes_cnn",
        "32x32x3 generated shapes: three 3x3 conv blocks with batch norm, global average pool, dense 3",
        classic::shapes_cnn,
    ),
    ("lenet5", "LeCun et al. 1998, 32x32x1, ReLU and average-pool subsampling", classic::lenet5),
    ("alexnet", "Krizhevsky et al. 2012, torchvision's single-tower variant, 224x224x3", classic::alexnet),
    ("vgg16", "Simonyan & Zisserman 2014, configuration D, 224x224x3", classic::vgg16),
    ("resnet18", "He et al. 2015, basic blocks [2, 2, 2, 2], 224x224x3", resnet::resnet18),
    ("resnet34", "He et al. 2015, basic blocks [3, 4, 6, 3], 224x224x3", resnet::resnet34),
    ("resnet50", "He et al. 2015, v1.5 bottlenecks [3, 4, 6, 3] (stride in the 3x3), 224x224x3", resnet::resnet50),
    ("mobilenet_v1", "Howard et al. 2017, depthwise separable, alpha 1.0, 224x224x3", mobilenet::mobilenet_v1),
];

/// The zoo's model names, in a fixed order.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.0).collect()
}

/// A model's one-line description.
pub fn describe(name: &str) -> Option<&'static str> {
    MODELS.iter().find(|m| m.0 == name).map(|m| m.1)
}

/// Builds zoo model `name` at its default size.
pub fn build(name: &str) -> Result<Graph> {
    build_with(name, ZooOptions::default())
}

/// Builds zoo model `name` with size options (smaller inputs, fewer classes).
pub fn build_with(name: &str, opts: ZooOptions) -> Result<Graph> {
    match MODELS.iter().find(|m| m.0 == name) {
        Some(m) => (m.2)(opts),
        None => Err(Error::UnknownModel { name: name.to_string(), known: names() }),
    }
}

/// A model from the command line: a path to a `.ron` graph, or a zoo name.
pub fn resolve(spec: &str) -> Result<Graph> {
    let path = Path::new(spec);
    if path.is_file() || spec.ends_with(".ron") {
        return Graph::load(path);
    }
    build(spec)
}
