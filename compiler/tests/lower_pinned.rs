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
        90_891,
        1_515_404_288,
        51_137_532,
        &[
            ("conv1", 3_716_392, 3_297_780, [1, 22717]),
            ("maxpool", 1_030_302, 1_028_105, [22718, 23487]),
            // Strided: im2col (7x7/2) and shifted matmuls (3x3/2) over the stride phases.
            ("layer2.0.conv2", 981_627, 969_332, [53348, 54899]),
            ("layer3.0.conv3", 519_081, 516_433, [66835, 67267]),
            // A 3x3 on a 14x14 map: its im2col matrix gathered by the staging DMAs.
            ("layer3.1.conv2", 919_391, 903_668, [67668, 69219]),
            // By stride phase, four images side by side in each phase row.
            ("layer4.0.conv2", 1_063_665, 1_032_692, [79593, 83963]),
            ("layer4.1.conv2", 1_063_466, 903_668, [85543, 87509]),
            ("fc", 26_761, 22_111, [90872, 90891]),
        ],
    );
}

#[test]
fn resnet50_training_step_on_v3() {
    check(
        "resnet50",
        "v3-8",
        true,
        380_074,
        11_315_483_136,
        214_461_526,
        &[
            ("conv1", 2_829_562, 2_039_783, [1, 28983]),
            ("bn1", 1_723_524, 1_717_747, [28984, 30974]),
            ("layer2.0.conv2", 547_206, 538_374, [97360, 99929]),
            // A 3x3 on a 7x7 map, images side by side sharing their padding columns.
            ("layer4.1.conv2", 562_938, 516_596, [159677, 161132]),
            ("bwd/layer2.2.bn1/input", 752_522, 751_798, [247453, 248293]),
            // Strided input gradients by stride phase (four phases; a 1x1/2 layer's three
            // untouched phases get the epilogue of zeros), a filter gradient over the gathered
            // im2col matrix of a 7x7 map.
            ("bwd/layer3.0.conv2/input", 595_289, 496_228, [223136, 224136]),
            ("bwd/layer3.0.downsample.0/input", 1_664_532, 1_516_229, [228133, 231343]),
            ("bwd/layer4.1.conv2/kernel", 526_604, 479_732, [174035, 176640]),
            ("update/fc/kernel", 64_562, 51_837, [379946, 380067]),
        ],
    );
}

#[test]
fn mobilenet_inference_on_v2() {
    check(
        "mobilenet_v1",
        "v2-8",
        false,
        56_029,
        916_175_360,
        15_933_249,
        &[
            ("conv1", 2_308_130, 1_620_468, [1, 15382]),
            ("conv_dw_1", 2_093_343, 2_090_277, [15383, 28197]),
            // Strided: im2col (3x3/2) and depthwise on the VPU over the stride phases.
            ("conv_dw_2", 1_203_410, 1_072_152, [33590, 38340]),
            ("conv_pw_7", 413_651, 401_908, [50558, 50729]),
            ("conv_preds", 16_160, 11_822, [56014, 56029]),
        ],
    );
}
