//! `systolic data-bench`: how many examples per second this host's input pipeline makes —
//! read (decode), augment and batch, on every core — so a user sees whether a simulated
//! slice would wait on its hosts: `simulate --input-rate` takes the figure, or this command's
//! JSON report.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use systolic::runtime::data::{self, Dataset, Repeat};
use systolic::runtime::input::Input;

#[derive(clap::Args)]
pub struct Args {
    /// As train's --dataset (its training split): digits, shapes, a folder of class folders of
    /// images, or a safetensors file.
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// The model whose input size shapes and folders are made at.
    #[arg(long, default_value = "digits_cnn")]
    model: String,
    /// The augmentation, as train's --augment.
    #[arg(long, value_name = "OPS")]
    augment: Option<String>,
    /// Examples per batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Batches timed (after one to warm up).
    #[arg(long, default_value_t = 20)]
    batches: u64,
    /// Print JSON (`{"examples_per_second", ...}`), which `simulate --input-rate FILE` reads.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch >= 1 && args.batches >= 1, "--batch and --batches must be at least 1");
    let model = super::load_model(&args.model)?;
    let source = super::estimator::dataset(&args.dataset, &model, true)?;
    let augment = super::estimator::parse_augment(args.augment.as_deref(), &model)?;
    let mut d = Dataset::from_source(Arc::clone(&source)).shuffle(0).repeat(Repeat::Forever);
    if let Some(a) = &augment {
        d = d.map(data::augmentation(&super::estimator::image_input(&model)?, a.clone(), 0, 0));
    }
    // No prefetch: the figure is the pipeline's own rate on every core, not hidden latency.
    let mut d = d.batch(args.batch, true)?;
    d.next_batch()?;
    let began = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..args.batches {
        let b = d.next_batch()?.ok_or_else(|| anyhow::anyhow!("the pipeline ended"))?;
        bytes += b.values().map(|t| t.len() * 4).sum::<usize>();
    }
    let seconds = began.elapsed().as_secs_f64();
    let examples = args.batches as f64 * args.batch as f64;
    let rate = examples / seconds;
    let threads = rayon::current_num_threads();
    let augment_text = augment.map_or("none".to_string(), |a| a.to_string());
    if args.json {
        let report = serde_json::json!({
            "dataset": args.dataset, "augment": augment_text, "batch": args.batch, "batches": args.batches,
            "threads": threads, "seconds": seconds, "examples_per_second": rate,
            "bytes_per_second": bytes as f64 / seconds,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {rate:.0} examples/s ({:.1} MB/s of f32 batches) on {threads} threads, batches of {}, augment {augment_text}",
        args.dataset,
        bytes as f64 / seconds / 1e6,
        args.batch
    );
    println!("as a host's infeed in a simulated slice: systolic simulate MODEL --input-rate {rate:.0}");
    Ok(())
}
