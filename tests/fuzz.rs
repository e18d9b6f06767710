//! The fuzz targets (`systolic::fuzz`) on stable, in CI: each target's seeds (`fuzz/seeds/`)
//! and a few thousand seeded mutations of them — bit flips, byte edits, splices, truncation,
//! and for text number and line edits. The long runs are libFuzzer's (`fuzz/`, nightly;
//! docs/validation.md). A panic fails the test and prints the input that caused it.
//!
//! `cargo test --test fuzz -- --ignored write_seeds` rewrites the generated seeds.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use systolic::compiler::graph::{BatchNorm, ConvSpec, Graph, Pool};
use systolic::compiler::{autodiff, zoo};
use systolic::fuzz;
use systolic::simulator::config::presets;

/// Mutated inputs per target (each target's seeds run as they are, too).
const CASES: usize = 40_000;
/// ... for the lowering, each of whose inputs compiles twice and trains on both backends.
const LOWERING_CASES: usize = 3_000;
/// ... for collectives, each of whose inputs runs a whole slice.
const COLLECTIVE_CASES: usize = 5_000;

/// SplitMix64: the same mutations on every run, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Numbers that sit on the edges of what parsers and checks accept.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "-0.0",
    "0.5",
    "1e-45",
    "1e308",
    "-1e308",
    "3.4e38",
    "NaN",
    "inf",
    "-inf",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "17179869184",
    "99999999999",
    "65536",
    "7",
];

/// One mutation of `data`; `other` is another seed to splice from.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], text: bool) {
    let at = |rng: &mut Rng, data: &Vec<u8>| rng.below(data.len() + 1);
    match rng.below(if text { 10 } else { 7 }) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = [0, 0xff, 0x7f, 0x80, 1, b'0', b'"', b'('][rng.below(8)];
        }
        2 => {
            let i = at(rng, data);
            let n = 1 + rng.below(4);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(64));
            data.drain(i..i + n);
        }
        4 if !other.is_empty() => {
            // Splice: this input's start, then the other's tail from a random point.
            let (i, j) = (at(rng, data), rng.below(other.len()));
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        5 => {
            let i = at(rng, data);
            data.truncate(i);
        }
        6 if !data.is_empty() => {
            // Duplicate a range in place (repeated nodes, fields, tensors).
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(256));
            let piece = data[i..i + n].to_vec();
            let j = at(rng, data);
            data.splice(j..j, piece);
        }
        7 | 8 => {
            // Replace the k-th number of the text by an edge value.
            let numbers: Vec<(usize, usize)> = number_spans(data);
            if !numbers.is_empty() {
                let (s, e) = numbers[rng.below(numbers.len())];
                data.splice(s..e, NUMBERS[rng.below(NUMBERS.len())].bytes());
            }
        }
        9 => {
            // Delete or duplicate a whole line.
            let lines: Vec<usize> = std::iter::once(0)
                .chain(data.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
                .collect();
            let k = rng.below(lines.len());
            let (s, e) = (lines[k], lines.get(k + 1).copied().unwrap_or(data.len()));
            if rng.below(2) == 0 {
                data.drain(s..e);
            } else {
                let line = data[s..e].to_vec();
                data.splice(s..s, line);
            }
        }
        _ => {}
    }
}

/// Byte ranges of the numbers in `data` (digits with a sign, point and exponent).
fn number_spans(data: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let start = if i > 0 && data[i - 1] == b'-' { i - 1 } else { i };
            while i < data.len() && (data[i].is_ascii_alphanumeric() || data[i] == b'.') {
                i += 1;
            }
            spans.push((start, i));
        }
        i += 1;
    }
    spans
}

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = seeds_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.expect("a seed file").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    files.iter().map(|f| std::fs::read(f).expect("a seed reads")).collect()
}

/// Runs `target` on its seeds and `CASES` mutations of them; a panic fails with the input.
fn fuzz(name: &str, target: fn(&[u8]), text: bool) {
    fuzz_from(name, &[name], CASES, target, text);
}

/// [`fuzz`] with the seeds of the targets `seeds_of` and `cases` mutations.
fn fuzz_from(name: &str, seeds_of: &[&str], cases: usize, target: fn(&[u8]), text: bool) {
    let seeds: Vec<Vec<u8>> = seeds_of.iter().flat_map(|t| seeds(t)).collect();
    let mut rng = Rng(name.bytes().fold(0, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let run = |case: usize, input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
            let shown = if text { String::from_utf8_lossy(input).into_owned() } else { format!("{input:?}") };
            panic!("fuzz target {name} panicked on case {case}; the input:\n{shown}");
        }
    };
    for (i, seed) in seeds.iter().enumerate() {
        run(i, seed);
    }
    for case in 0..cases {
        let mut data = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut data, other, text);
        }
        run(seeds.len() + case, &data);
    }
}

#[test]
fn graph_files() {
    fuzz("graph_file", fuzz::graph_file, true);
}

/// Model files and graphs decoded from bytes, lowered: the model files' seeds, random bytes
/// (`fuzz/seeds/lowering/`) and their mutations (fewer: each compiles twice and trains once).
#[test]
fn lowerings() {
    fuzz_from("lowering", &["graph_file", "lowering"], LOWERING_CASES, fuzz::lowering, false);
}

/// Collectives on slices of 1 to 18 cores, checked against their definitions.
#[test]
fn collectives() {
    fuzz_from("collectives", &["collectives"], COLLECTIVE_CASES, fuzz::collectives, false);
}

#[test]
fn machine_files() {
    fuzz("machine_file", fuzz::machine_file, true);
}

#[test]
fn safetensors_files() {
    fuzz("safetensors", fuzz::safetensors, false);
}

#[test]
fn programs() {
    fuzz("program", fuzz::program, false);
}

#[test]
fn specs() {
    fuzz("specs", fuzz::specs, true);
}

/// A small model with most forward ops: convolutions (strided, grouped), batch norm, ReLU6,
/// both pools, concatenation, a residual add, dropout, a reshape and dense layers.
fn blocks() -> Graph {
    let mut g = Graph::new("blocks");
    let x = g.input("image", &[6, 6, 2]).unwrap();
    let a = g.conv2d("conv1", x, ConvSpec::new(4, 3).same().stride(2)).unwrap();
    let a = g.batch_norm("bn1", a, BatchNorm::default()).unwrap();
    let a = g.relu6("relu6", a).unwrap();
    let b = g.conv2d("conv2", x, ConvSpec::new(2, 1).groups(2)).unwrap();
    let b = g.max_pool("pool", b, Pool::default()).unwrap();
    let c =
        g.avg_pool("avg", x, Pool { padding: systolic::compiler::graph::Padding::Same, ..Pool::default() }).unwrap();
    let ab = g.concat("concat", &[a, b], -1).unwrap();
    let ab = g.add_op("add", ab, g.find("conv1").unwrap()).unwrap_or(ab);
    let abc = g.concat("concat2", &[ab, c], 3).unwrap();
    let f = g.flatten("flatten", abc).unwrap();
    let f = g.dropout("dropout", f, 0.25, 1).unwrap();
    let h = g.dense("fc", f, 5).unwrap();
    let h = g.relu("fc_relu", h).unwrap();
    let h = g.reshape("reshape", h, &[5]).unwrap();
    let logits = g.dense("logits", h, 3).unwrap();
    g.add_output(logits);
    g
}

/// Writes the generated seeds (models, machines, tensor files, option strings) into
/// `fuzz/seeds/`; the program seeds are random bytes and inputs from a libFuzzer corpus, kept by hand.
#[test]
#[ignore]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("graph_file", "digits_cnn.ron", zoo::build("digits_cnn").unwrap().to_ron().as_bytes());
    write("graph_file", "blocks.ron", blocks().to_ron().as_bytes());
    let mut training = autodiff::training_graph(&blocks(), 0.1).unwrap().graph;
    training.set_name("blocks_training");
    write("graph_file", "blocks_training.ron", training.to_ron().as_bytes());
    // Graphs for the lowering, decoded from random bytes (`systolic::fuzz::lowering`).
    let mut rng = Rng(13);
    for i in 0..16 {
        let bytes: Vec<u8> = (0..64).map(|_| rng.next() as u8).collect();
        write("lowering", &format!("random{i:02}.bin"), &bytes);
    }
    // Slices and their collectives, decoded from random bytes (`systolic::fuzz::collectives`).
    let mut rng = Rng(17);
    for i in 0..16 {
        let bytes: Vec<u8> = (0..48).map(|_| rng.next() as u8).collect();
        write("collectives", &format!("random{i:02}.bin"), &bytes);
    }

    let v2 = presets::preset("v2-8").unwrap();
    write("machine_file", "v2-8.ron", v2.to_ron().as_bytes());
    let mut v4 = presets::preset("v4-32").unwrap();
    v4.set_all(&[("core.mxu.timing", "scalesim")]).unwrap();
    v4.slice.links.push(systolic::simulator::config::LinkOverride {
        chip: vec![0, 0, 0],
        axis: 0,
        direction: systolic::simulator::config::Direction::Up,
        bytes_per_second: Some(1e9),
        failed: false,
    });
    v4.slice.slow_chips.push(systolic::simulator::config::SlowChip { chip: vec![1, 0, 0], clock_hz: 5e8 });
    v4.sources.clear();
    v4.validate().unwrap();
    write("machine_file", "v4-32-degraded.ron", v4.to_ron().as_bytes());

    // Safetensors files by hand, to hold every dtype the reader converts.
    let file = |tensors: &[(&str, &str, &[usize], Vec<u8>)], metadata: &str| {
        let mut header = String::from("{");
        let mut data = Vec::new();
        if !metadata.is_empty() {
            header += &format!("\"__metadata__\":{metadata},");
        }
        for (name, dtype, shape, bytes) in tensors {
            let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            header += &format!(
                "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{},{}]}},",
                shape.join(","),
                data.len(),
                data.len() + bytes.len()
            );
            data.extend_from_slice(bytes);
        }
        header.pop();
        header += "}";
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    };
    let f32s = |n: usize| (0..n).flat_map(|i| (i as f32 / 7.0).to_le_bytes()).collect::<Vec<u8>>();
    write("safetensors", "image.safetensors", &file(&[("image", "F32", &[1, 8, 8, 1], f32s(64))], "{\"step\":\"3\"}"));
    let bf16: Vec<u8> = (0..144u16).flat_map(|i| (0x3c00 + i).to_le_bytes()).collect();
    let f16: Vec<u8> = (0..16u16).flat_map(|i| (0x3800 + i).to_le_bytes()).collect();
    write(
        "safetensors",
        "weights.safetensors",
        &file(&[("conv1/kernel", "BF16", &[3, 3, 1, 16], bf16), ("conv1/bias", "F16", &[16], f16)], ""),
    );
    let labels: Vec<u8> = (0..2i64).flat_map(|i| i.to_le_bytes()).collect();
    let mixed = [
        ("image", "F64", &[2, 8, 8, 1][..], (0..128).flat_map(|i| (f64::from(i) / 9.0).to_le_bytes()).collect()),
        ("label", "I64", &[2][..], labels),
        ("mask", "U8", &[2, 3][..], vec![0, 1, 2, 3, 254, 255]),
        ("small", "I8", &[2][..], vec![0x80, 0x7f]),
        ("count", "I32", &[1][..], 7i32.to_le_bytes().to_vec()),
        ("short", "I16", &[1][..], (-3i16).to_le_bytes().to_vec()),
    ];
    write("safetensors", "mixed.safetensors", &file(&mixed, ""));

    for (name, text) in [
        ("optimizer", "\0adam"),
        ("schedule", "\u{1}warmup=500,step=3000/6000,factor=0.1"),
        ("schedule_cosine", "\u{1}warmup=10,cosine=1000,alpha=0.01"),
        ("schedule_poly", "\u{1}poly=100,end=0.001,power=2"),
        ("augment", "\u{2}flip,crop,brightness=0.2,contrast=0.3,saturation=0.4,hue=0.1,zoom=1.5,rotate=15,rescale"),
        (
            "run_config",
            "\u{3}(model_dir: Some(\"out\"), save_checkpoints_steps: Some(100), keep_checkpoint_max: 3, \
             random_seed: Some(1), tpu_config: (iterations_per_loop: \"30s\", num_shards: Some(8), \
             per_host_input_for_training: PerHostV2))",
        ),
        ("size", "\u{4}512MiB"),
        ("iterations", "\u{5}100"),
        ("machine_set", "\u{6}core.mxu.rows=256"),
        ("machine_set_torus", "\u{6}slice.torus=[4, 4]"),
    ] {
        write("specs", &format!("{name}.txt"), text.as_bytes());
    }
    // The option seeds parse (so mutations start from inputs that get through).
    systolic::runtime::RunConfig::from_ron(&seeds_text("run_config")[1..], Path::new("seed")).unwrap();
    systolic::runtime::augment::Augment::parse(&seeds_text("augment")[1..]).unwrap();
    for schedule in ["schedule", "schedule_cosine", "schedule_poly"] {
        systolic::compiler::optimizer::Schedule::parse(&seeds_text(schedule)[1..], 0.1).unwrap();
    }
}

fn seeds_text(name: &str) -> String {
    std::fs::read_to_string(seeds_dir("specs").join(format!("{name}.txt"))).unwrap()
}
