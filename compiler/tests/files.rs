//! Model files: every zoo model round-trips through RON exactly, and bad files give errors with
//! the file, line and column and what to change.

use std::path::Path;

use systolic_compiler::{Error, Graph, zoo};

fn parse(text: &str) -> Result<Graph, Error> {
    Graph::from_ron(text, Path::new("model.ron"))
}

const TINY: &str = r#"#![enable(unwrap_variant_newtypes)]
(
  name: "tiny",
  nodes: [
    (name: "image", op: Input(shape: [8, 8, 2])),
    (name: "conv/kernel", op: Parameter(shape: [3, 3, 2, 4], init: HeNormal)),
    (name: "conv", op: Conv2d(padding: Same), inputs: ["image", "conv/kernel"]),
    (name: "relu", op: Relu, inputs: ["conv"]),
  ],
  outputs: ["relu"],
)
"#;

#[test]
fn every_zoo_model_round_trips_exactly() {
    for name in zoo::names() {
        let g = zoo::build(name).unwrap();
        let text = g.to_ron();
        let back = parse(&text).unwrap();
        assert_eq!(back, g, "{name}");
        assert_eq!(back.to_ron(), text, "{name}: saving again gives the same text");
    }
}

#[test]
fn save_and_load_through_a_file() {
    let dir = std::env::temp_dir().join(format!("systolic-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("resnet18.ron");
    let g = zoo::build("resnet18").unwrap();
    g.save(&path).unwrap();
    assert_eq!(Graph::load(&path).unwrap(), g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hand_written_files_may_omit_defaults() {
    let g = parse(TINY).unwrap();
    let conv = g.node(g.find("conv").unwrap());
    assert_eq!(conv.shape.dims, vec![8, 8, 4]);
    assert_eq!(g.node(g.outputs()[0]).name, "relu");
}

fn expect_error(text: &str, line: usize, needle: &str) {
    match parse(text) {
        Err(Error::ModelFile { line: l, reason, .. }) => {
            assert_eq!(l, line, "wrong line for: {reason}");
            assert!(reason.contains(needle), "'{reason}' should mention '{needle}'");
        }
        other => panic!("expected a model-file error, got {other:?}"),
    }
}

#[test]
fn syntax_errors_give_line_and_column() {
    let broken =
        TINY.replace(r#"(name: "relu", op: Relu, inputs: ["conv"]),"#, r#"(name: "relu" op: Relu, inputs: ["conv"]),"#);
    expect_error(&broken, 8, "");
    let e = parse(&broken).unwrap_err().to_string();
    assert!(e.starts_with("model.ron:8:"), "{e}");
}

#[test]
fn unknown_ops_are_named() {
    let broken = TINY.replace("op: Relu,", "op: Gelu,");
    expect_error(&broken, 8, "Gelu");
}

#[test]
fn undefined_inputs_point_at_the_node() {
    let broken = TINY.replace(r#"inputs: ["conv"]"#, r#"inputs: ["conv2"]"#);
    expect_error(&broken, 8, "input 'conv2' is not defined");
}

#[test]
fn mismatched_conv_channels_point_at_the_conv() {
    let broken = TINY.replace("shape: [3, 3, 2, 4]", "shape: [3, 3, 3, 4]");
    expect_error(&broken, 7, "input has 2 channels but the kernel");
    let e = parse(&broken).unwrap_err().to_string();
    assert!(e.contains("node 'conv'") && e.contains("change the kernel's third dimension to 2"), "{e}");
}

#[test]
fn duplicate_names_and_missing_outputs_are_rejected() {
    let dup = TINY.replace(r#"(name: "relu", op: Relu"#, r#"(name: "conv", op: Relu"#);
    expect_error(&dup, 8, "already exists");
    let no_out = TINY.replace(r#"outputs: ["relu"]"#, r#"outputs: ["nope"]"#);
    expect_error(&no_out, 10, "output 'nope' is not a node");
}

#[test]
fn missing_files_say_which() {
    let e = Graph::load("/nonexistent/model.ron").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.ron"), "{e}");
}

#[test]
fn oversized_and_axisless_shapes_are_refused() {
    let huge = TINY.replace(
        "(name: \"relu\", op: Relu, inputs: [\"conv\"]),",
        "(name: \"relu\", op: Reshape(shape: [4294967296, 4294967296, -1]), inputs: [\"conv\"]),",
    );
    expect_error(&huge, 8, "more than 2^34 elements");
    let big_input = TINY.replace("Input(shape: [8, 8, 2])", "Input(shape: [4294967296, 4294967296, 2])");
    expect_error(&big_input, 5, "more than 2^34 elements");
    let scalar = r#"(
  name: "s",
  nodes: [
    (name: "x", op: Input(shape: [])),
    (name: "p", op: Softmax, inputs: ["x"]),
  ],
  outputs: ["p"],
)"#;
    expect_error(scalar, 5, "softmax needs an axis");
}

#[test]
fn convolutions_take_any_explicit_padding_but_pools_do_not() {
    let wide = TINY
        .replace("op: Conv2d(padding: Same)", "op: Conv2d(padding: Explicit(top: 4, bottom: 4, left: 4, right: 4))");
    let g = parse(&wide).unwrap();
    assert_eq!(g.node(g.find("conv").unwrap()).shape.dims, vec![14, 14, 4]);
    let pool = TINY.replace(
        "(name: \"relu\", op: Relu, inputs: [\"conv\"]),",
        "(name: \"relu\", op: MaxPool(window: (2, 2), padding: Explicit(top: 2, bottom: 0, left: 0, right: 0)), inputs: [\"conv\"]),",
    );
    expect_error(&pool, 8, "must be smaller than the window");
}

/// Found by fuzzing (`systolic::fuzz::graph_file`): windows, dilations and explicit padding
/// near `usize::MAX` overflowed while their output size was computed.
#[test]
fn huge_windows_dilations_and_padding_are_refused() {
    let pool = TINY.replace(
        "(name: \"relu\", op: Relu, inputs: [\"conv\"]),",
        "(name: \"relu\", op: MaxPool(window: (18446744073709551615, 2), padding: Same), inputs: [\"conv\"]),",
    );
    expect_error(&pool, 8, "window [18446744073709551615, 2] spans more than 2^34 pixels");
    let dilated =
        TINY.replace("op: Conv2d(padding: Same)", "op: Conv2d(padding: Same, dilation: (9223372036854775807, 1))");
    expect_error(&dilated, 7, "with dilation [9223372036854775807, 1]");
    let padded = TINY.replace(
        "op: Conv2d(padding: Same)",
        "op: Conv2d(padding: Explicit(top: 18446744073709551615, bottom: 1, left: 0, right: 0))",
    );
    expect_error(&padded, 7, "more than 2^34 pixels on a side");
    let gradient = TINY.replace(
        "(name: \"relu\", op: Relu, inputs: [\"conv\"]),",
        "(name: \"relu\", op: AvgPoolGrad(pool: (padding: Same), input_shape: (6, 18446744073709551615, 2)), inputs: [\"conv\"]),",
    );
    expect_error(&gradient, 8, "more than 2^34 elements");
}

#[test]
fn a_model_with_its_own_loss_refuses_extra_label_smoothing() {
    let g = zoo::build("digits_cnn").unwrap();
    let (with_loss, loss) = g.with_classifier_loss(0.0).unwrap();
    assert_eq!(with_loss.node(loss).name, "loss");
    let e = with_loss.with_classifier_loss(0.1).unwrap_err().to_string();
    assert!(e.contains("already has a loss (node 'loss')"), "{e}");
    // A model that already uses the names gets fresh ones.
    let mut g2 = g.clone();
    g2.labels("labels").unwrap();
    g2.input("loss", &[1]).unwrap();
    let (g3, loss3) = g2.with_classifier_loss(0.0).unwrap();
    assert_eq!(g3.node(loss3).name, "loss_1");
    assert_eq!(g3.node(g3.node(loss3).inputs[1]).name, "labels_1");
}
