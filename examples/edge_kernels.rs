//! The classic 3×3 kernels as fixed convolution weights — horizontal edges
//! [1 2 1; 0 0 0; -1 -2 -1], its transpose for vertical edges, and [0 -1 0; -1 4 -1; 0 -1 0]
//! for bright spots — compiled for a simulated TPU core and run there (bf16 MXU passes) and on
//! the f32 CPU reference, on a generated image; the output maps written as PNG.
//!
//! ```text
//! cargo run --release --example edge_kernels -- [--size 64] [--out edges]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use systolic::compiler::graph::{ConvSpec, Graph};
use systolic::compiler::reference::{self, RunOptions};
use systolic::compiler::{Tensor, TensorMap};
use systolic::runtime::augment::{self, Image};
use systolic::runtime::data::{Shapes, Source};
use systolic::runtime::{Settings, Target, backend};
use systolic::simulator::config::presets;

/// The kernels, by name, row by row.
const KERNELS: [(&str, [f32; 9]); 3] = [
    ("horizontal_edges", [1.0, 2.0, 1.0, 0.0, 0.0, 0.0, -1.0, -2.0, -1.0]),
    ("vertical_edges", [1.0, 0.0, -1.0, 2.0, 0.0, -2.0, 1.0, 0.0, -1.0]),
    ("bright_spots", [0.0, -1.0, 0.0, -1.0, 4.0, -1.0, 0.0, -1.0, 0.0]),
];

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// The largest difference between the TPU's and the reference's maps, over the largest
/// magnitude of the reference's.
#[allow(dead_code)] // Read by tests/examples.rs.
pub struct Summary {
    pub relative_error: f64,
    pub files: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let size: usize = arg("--size").map_or(Ok(64), |v| v.parse()).context("--size takes a number")?;
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "edges".into()));
    run(size, &out)?;
    Ok(())
}

/// A one-layer model: the three kernels as a 3×3 convolution with 3 outputs, no bias.
fn model(size: usize) -> Result<(Graph, TensorMap)> {
    let mut g = Graph::new("edge_kernels");
    let x = g.input("image", &[size, size, 1])?;
    let maps = g.conv2d("edges", x, ConvSpec::new(3, 3).same().no_bias())?;
    g.set_outputs(vec![maps]);
    // HWIO: kernel[i][j][0][k] is kernel k's row i, column j.
    let mut w = vec![0.0f32; 9 * 3];
    for (k, (_, taps)) in KERNELS.iter().enumerate() {
        for (t, &v) in taps.iter().enumerate() {
            w[t * 3 + k] = v;
        }
    }
    let weights = TensorMap::from([("edges/kernel".to_string(), Tensor::from_shape_vec(vec![3, 3, 1, 3], w)?)]);
    Ok((g, weights))
}

/// Runs both and writes `out/input.png` and one PNG per kernel.
pub fn run(size: usize, out: &Path) -> Result<Summary> {
    let (g, weights) = model(size)?;
    // A generated image: a shape on a background, as grey levels.
    let rgb = Shapes::new(1, size, 7)?.gather(&[0])?["image"].clone();
    let grey: Vec<f32> = rgb.as_slice().expect("contiguous").chunks(3).map(|p| (p[0] + p[1] + p[2]) / 3.0).collect();
    let image = Tensor::from_shape_vec(vec![1, size, size, 1], grey.clone())?;
    let mut bindings = weights.clone();
    bindings.insert("image".into(), image.clone());
    let (cpu, _) = reference::run_outputs(&g, &bindings, RunOptions::default())?;
    let machine = presets::preset("v2-8")?;
    let mut tpu = backend(Target::Core(machine), &g, weights, 1, Settings::new(Default::default()))?;
    let got = tpu.predict(&TensorMap::from([("image".to_string(), image)]))?.outputs;
    let (want, got) = (&cpu["edges"], &got["edges"]);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let err = want.iter().zip(got.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    println!(
        "3x3 kernels on a {size}x{size} image: simulated v2-8 core against the f32 reference, largest difference {:.2e} of the largest value",
        err
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = vec![out.join("input.png")];
    augment::write_png(&files[0], &Image::new(size, size, 1, grey)?)?;
    for (k, (name, _)) in KERNELS.iter().enumerate() {
        // |response| scaled to [0, 1] by the map's largest.
        let map: Vec<f32> = got.as_slice().expect("contiguous").chunks(3).map(|p| p[k].abs()).collect();
        let top = map.iter().fold(0f32, |m, &v| m.max(v)).max(f32::MIN_POSITIVE);
        let file = out.join(format!("{name}.png"));
        augment::write_png(&file, &Image::new(size, size, 1, map.iter().map(|v| v / top).collect())?)?;
        println!("  wrote {} (the TPU's map, |response| over its largest)", file.display());
        files.push(file);
    }
    Ok(Summary { relative_error: err as f64, files })
}
