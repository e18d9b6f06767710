//! Transfer learning: frozen parameters get no gradient — the compiled step leaves out their
//! gradients and whatever only they needed, so the simulated step is cheaper — and a model
//! trained on some classes starts another with its head replaced.

use systolic_compiler::TensorMap;
use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::zoo::{self, ZooOptions};
use systolic_runtime::session::grad_name;
use systolic_runtime::{Settings, Target, backend};
use systolic_simulator::config::presets;

fn batch(n: usize) -> TensorMap {
    let image = systolic_compiler::Tensor::from_shape_fn(vec![n, 32, 32, 3], |i| {
        ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 / 11.0
    });
    let labels = systolic_compiler::Tensor::from_shape_fn(vec![n], |i| (i[0] % 3) as f32);
    TensorMap::from([("image".to_string(), image), ("labels".to_string(), labels)])
}

#[test]
fn frozen_features_make_the_simulated_step_cheaper_and_get_no_gradient() {
    let full = zoo::build_with("shapes_cnn", ZooOptions::default()).unwrap();
    let mut frozen = full.clone();
    for id in full.trainable_parameters() {
        let name = &full.node(id).name;
        if name.starts_with("conv") {
            frozen.set_trainable(name, false).unwrap();
        }
    }
    let machine = presets::preset("v2-8").unwrap();
    let settings = Settings::new(Optimizer::momentum(0.05, 0.9));
    let step = |g: &systolic_compiler::Graph| {
        let mut b = backend(Target::Core(machine.clone()), g, full.init_parameters(1), 16, settings.clone()).unwrap();
        b.train_step(&batch(16)).unwrap()
    };
    let (a, b) = (step(&full), step(&frozen));
    let (ta, tb) = (a.simulated_seconds.unwrap(), b.simulated_seconds.unwrap());
    eprintln!("full step {ta:e} s, frozen convolutions {tb:e} s");
    assert!(tb < 0.8 * ta, "freezing the convolutions saves the backward pass through them: {tb} vs {ta}");
    assert!(a.outputs.contains_key(&grad_name("conv1/kernel")));
    assert!(!b.outputs.contains_key(&grad_name("conv1/kernel")) && b.outputs.contains_key(&grad_name("logits/kernel")));
}
