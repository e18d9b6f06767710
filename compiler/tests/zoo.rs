//! The zoo's models have the published trainable parameter counts and sensible shapes.

use systolic_compiler::zoo;

fn params(name: &str) -> usize {
    zoo::build(name).unwrap().trainable_param_count()
}

#[test]
fn published_parameter_counts() {
    // torchvision (resnets, vgg16, alexnet), Keras (mobilenet_v1), LeCun et al. 1998 (lenet5).
    assert_eq!(params("resnet18"), 11_689_512);
    assert_eq!(params("resnet34"), 21_797_672);
    assert_eq!(params("resnet50"), 25_557_032);
    assert_eq!(params("vgg16"), 138_357_544);
    assert_eq!(params("mobilenet_v1"), 4_231_976);
    assert_eq!(params("alexnet"), 61_100_840);
    assert_eq!(params("lenet5"), 61_706);
    // conv 5x5x10 (260) + conv 5x5x20 (5020) + dense 320x300 (96300) + dense 300x10 (3010).
    assert_eq!(params("simple_cnn"), 104_590);
    // 3 convs (448 + 4,640 + 18,496), their batch norms' gamma and beta (224), dense 64x3 (195).
    assert_eq!(params("shapes_cnn"), 24_003);
}

#[test]
fn every_model_ends_in_logits() {
    for name in zoo::names() {
        let g = zoo::build(name).unwrap();
        assert_eq!(g.outputs().len(), 1, "{name}");
        let out = g.node(g.outputs()[0]);
        let classes = match name {
            "simple_cnn" | "digits_cnn" | "lenet5" => 10,
            "shapes_cnn" => 3,
            _ => 1000,
        };
        assert_eq!(out.shape.dims, vec![classes], "{name}");
        assert!(out.shape.batched);
    }
}

#[test]
fn resnet50_shapes_follow_the_paper() {
    let g = zoo::build("resnet50").unwrap();
    let dims = |n: &str| g.node(g.find(n).unwrap()).shape.dims.clone();
    assert_eq!(dims("conv1"), vec![112, 112, 64]);
    assert_eq!(dims("maxpool"), vec![56, 56, 64]);
    assert_eq!(dims("layer1.2.relu"), vec![56, 56, 256]);
    assert_eq!(dims("layer2.0.conv2"), vec![28, 28, 128]);
    assert_eq!(dims("layer4.2.relu"), vec![7, 7, 2048]);
    // About 4.1 G multiply-adds per image (He et al. report 3.8-4.1 G FLOPs counting MACs).
    let f = systolic_compiler::cost::flops_per_example(&g) as f64;
    assert!((8.0e9..8.5e9).contains(&f), "{f}");
}

#[test]
fn small_inputs_build() {
    for name in ["resnet18", "resnet50", "mobilenet_v1", "vgg16"] {
        let g = zoo::build_with(name, zoo::ZooOptions { input_hw: Some([32, 32]), classes: Some(10) }).unwrap();
        assert_eq!(g.node(g.outputs()[0]).shape.dims, vec![10]);
    }
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let e = zoo::build("resnet51").unwrap_err().to_string();
    assert!(e.contains("unknown model 'resnet51'") && e.contains("resnet50") && e.contains("mobilenet_v1"), "{e}");
}
