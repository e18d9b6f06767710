//! `systolic export`: a model as a `.ron` graph file to edit and load back.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// Where to write the graph.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--out", Some(args.out.as_path()))])?;
    let g = super::load_model(&args.model)?;
    g.save(&args.out)?;
    println!(
        "wrote {} ({} nodes, {} trainable parameters) to {}",
        g.name(),
        g.len(),
        g.trainable_param_count(),
        args.out.display()
    );
    Ok(())
}
