//! Trains `digits_cnn` on the 8×8 UCI handwritten digits with the f32 CPU reference:
//! the training graph from autodiff, plain momentum SGD written out by hand, and test accuracy.
//!
//! ```text
//! cargo run --release --example digits -- [--epochs 8] [--batch 32] [--lr 0.05]
//! ```
//!
//! The data (1,797 images, CC BY 4.0, Alpaydin & Kaynak 1998) ship in `data/digits/`.

use std::io::Read;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use systolic::compiler::reference::{self, RunOptions};
use systolic::compiler::{Tensor, TensorMap, autodiff, zoo};

/// Images scaled to [0, 1] (NHWC, one channel) and labels.
fn load_digits() -> Result<(Vec<f32>, Vec<f32>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits/digits.csv.gz");
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).with_context(|| format!("reading {path}"))?;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{path}: line {} is not 65 numbers", i + 1))?;
        if values.len() != 65 {
            bail!("{path}: line {} has {} values, expected 65", i + 1, values.len());
        }
        images.extend(values[..64].iter().map(|v| v / 16.0));
        labels.push(values[64]);
    }
    Ok((images, labels))
}

fn arg(name: &str, default: f64) -> Result<f64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn batch_of(images: &[f32], labels: &[f32], idx: &[usize]) -> (Tensor, Tensor) {
    let x: Vec<f32> = idx.iter().flat_map(|&i| images[i * 64..(i + 1) * 64].iter().copied()).collect();
    let y: Vec<f32> = idx.iter().map(|&i| labels[i]).collect();
    (Tensor::from_shape_vec(vec![idx.len(), 8, 8, 1], x).unwrap(), Tensor::from_shape_vec(vec![idx.len()], y).unwrap())
}

fn main() -> Result<()> {
    let epochs = arg("--epochs", 8.0)? as usize;
    let batch = arg("--batch", 32.0)? as usize;
    let lr = arg("--lr", 0.05)? as f32;
    let (images, labels) = load_digits()?;
    let n = labels.len();
    // A fixed shuffle, then 1,500 examples for training and the rest for testing.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| systolic::compiler::rng::mix64(i as u64));
    let (train_idx, test_idx) = order.split_at(1500);

    let model = zoo::build("digits_cnn")?;
    let train = autodiff::training_graph(&model, 0.0)?;
    let mut params = model.init_parameters(1);
    let mut velocity: TensorMap = params.iter().map(|(k, v)| (k.clone(), Tensor::zeros(v.raw_dim()))).collect();
    let trainable: Vec<String> = model.trainable_parameters().iter().map(|&p| model.node(p).name.clone()).collect();

    let start = Instant::now();
    let mut step = 0u64;
    for epoch in 0..epochs {
        let mut losses = Vec::new();
        for chunk in train_idx.chunks(batch) {
            let (x, y) = batch_of(&images, &labels, chunk);
            let mut b = params.clone();
            b.insert("image".into(), x);
            b.insert("labels".into(), y);
            let out = reference::run_gradients(&train, &b, RunOptions::training(step))?;
            losses.push(out.root.first().copied().unwrap_or(f32::NAN));
            for name in &trainable {
                let (v, g) = (velocity.get_mut(name).expect("slot"), &out.grads[name]);
                v.zip_mut_with(g, |v, g| *v = 0.9 * *v + g);
                params.get_mut(name).expect("param").zip_mut_with(v, |p, v| *p -= lr * v);
            }
            params.extend(out.updates);
            step += 1;
        }
        let mean = losses.iter().sum::<f32>() / losses.len() as f32;
        println!("epoch {:>2}: mean training loss {mean:.4}", epoch + 1);
    }
    let train_seconds = start.elapsed().as_secs_f64();

    let (x, y) = batch_of(&images, &labels, test_idx);
    let mut b = params.clone();
    b.insert("image".into(), x);
    let (out, _) = reference::run_outputs(&model, &b, RunOptions::default())?;
    let logits = &out["logits"];
    let correct = logits
        .outer_iter()
        .zip(y.iter())
        .filter(|(row, label)| {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
            best.0 as f32 == **label
        })
        .count();
    println!(
        "test accuracy {:.1}% ({correct} of {}) after {step} steps in {train_seconds:.1} s on the CPU reference",
        100.0 * correct as f64 / test_idx.len() as f64,
        test_idx.len()
    );
    Ok(())
}
