//! Figures of whole compiled programs, pinned: the program size, the HBM peak, the simulated
//! step and a few kernels' simulated cycles, estimates and instruction ranges of ResNet-50
//! (inference on v2-8, the training step on v3-8) and MobileNet v1 at batch 128. A change that
//! moves one of these moves what users see (`systolic compile ... --json`): make it on purpose,
//! update the figures here and in docs/performance.md, and say why in the commit.

use systolic_compiler::lower::{Compiled, Options, Training, compile};
use systolic_compiler::zoo;
use systolic_simulator::config::presets;
use systolic_simulator::isa::DType;
use systolic_simulator::numerics::Precision;
use systolic_simulator::timing::simulate;

/// `(kernel, simulated cycles, compiler's estimate, first and last instruction)`.
type KernelFigures = (&'static str, u64, u64, [usize; 2]);

fn check(
    model: &str,
    machine: &str,
    train: bool,
    instructions: usize,
    hbm_peak: u64,
    cycles: u64,
    kernels: &[KernelFigures],
) {
    let machine = presets::preset(machine).unwrap();
    let training = train.then(Training::default);
    let opts = Options { training, activations: DType::F32, ..Options::new(machine.clone(), 128, Precision::Default) };
    let Compiled { executable, kernels: reports, .. } = compile(&zoo::build(model).unwrap(), &opts).unwrap();
    let timing = simulate(&machine, &executable.program, true).unwrap();
    let what = format!("{model} on {}{}", machine.name, if train { " (training step)" } else { "" });
    assert_eq!(executable.program.len(), instructions, "{what}: instructions");
    assert_eq!(executable.hbm_peak_bytes, hbm_peak, "{what}: HBM peak");
    assert_eq!(timing.report.cycles, cycles, "{what}: simulated cycles");
    for &(name, want_cycles, estimate, [first, end]) in kernels {
        let k = reports.iter().find(|k| k.name == name).unwrap_or_else(|| panic!("{what}: no kernel {name}"));
        // The kernel's simulated time: from its first instruction's start to its last's end.
        let spans = timing.spans.iter().filter(|s| k.instructions.contains(&(s.instr as usize)));
        let (lo, hi) = spans.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s.start), hi.max(s.end)));
        assert_eq!(hi - lo, want_cycles, "{what}: {name} simulated cycles");
        assert_eq!(k.estimate_cycles, estimate, "{what}: {name} estimate");
        assert_eq!([k.instructions.start, k.instructions.end], [first, end], "{what}: {name} instructions");
    }
}

#[test]
fn resnet50_inference_on_v2() {
    check(
        "resnet50",
        "v2-8",
        false,
        86360,
        1_515_404_288,
        62_044_951,
        &[
            ("conv1", 6_599_906, 6_595_060, [1, 25356]),
            ("maxpool", 1_030_302, 1_028_105, [25357, 26126]),
            ("layer3.0.conv3", 519_081, 516_433, [70308, 70740]),
            ("fc", 26_761, 22_111, [86341, 86360]),
        ],
    );
}

#[test]
fn resnet50_training_step_on_v3() {
    check(
        "resnet50",
        "v3-8",
        true,
        405_317,
        11_315_483_136,
        229_850_714,
        &[
            ("conv1", 3_529_875, 3_297_780, [1, 37894]),
            ("bn1", 1_723_524, 1_717_747, [37895, 39885]),
            ("bwd/layer2.2.bn1/input", 752_522, 751_798, [258039, 258879]),
            ("update/fc/kernel", 64_562, 51_837, [405189, 405310]),
        ],
    );
}

#[test]
fn mobilenet_inference_on_v2() {
    check(
        "mobilenet_v1",
        "v2-8",
        false,
        59445,
        916_175_360,
        16_903_316,
        &[
            ("conv1", 3_232_730, 3_226_100, [1, 16781]),
            ("conv_dw_1", 2_093_343, 2_090_277, [16782, 29596]),
            ("conv_pw_7", 413_651, 401_908, [54262, 54433]),
            ("conv_preds", 16_160, 11_822, [59430, 59445]),
        ],
    );
}
