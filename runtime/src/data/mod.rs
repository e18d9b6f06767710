//! Data: the `tf.data`-style [`Dataset`] pipeline over random-access [`Source`]s, and the data
//! sets the runtime ships or makes — the 8×8 UCI digits (built into the binary, 57 kB, checked
//! against its SHA-256), generated [`Shapes`], and safetensors files of examples.

pub mod folder;
pub mod pipeline;
pub mod shapes;

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use systolic_compiler::rng::mix64;
use systolic_compiler::{Tensor, TensorMap, tensors};

use crate::error::{Error, Result};
use crate::input::Examples;
pub use folder::ImageFolder;
pub use pipeline::{Dataset, MapFn, Repeat, Source, Subset};
pub use shapes::Shapes;

use crate::augment::Augment;
use systolic_compiler::rng::derive;

/// Mixed into the run's seed for augmentation draws (apart from the shuffle's).
const AUGMENT_TAG: u64 = 0xa0_6e47;

/// A map that augments tensor `name` (`[N, H, W, C]` images) of every batch: each example
/// with its own key, from the run's `seed`, the input pipeline (`input_index`: replicas or
/// hosts reading their own shards draw their own) and the example's running count in the
/// stream — freshly random for every example in every epoch, the same on any thread and
/// after a resume.
pub fn augmentation(name: &str, augment: Augment, seed: u64, input_index: usize) -> MapFn {
    let name = name.to_string();
    let key = derive(derive(seed, AUGMENT_TAG), input_index as u64);
    std::sync::Arc::new(move |mut batch: TensorMap, counts: &[u64]| {
        let images = batch.get(&name).ok_or_else(|| Error::Input(format!("augment: the batch has no '{name}'")))?;
        let out = augment.apply_batch(images, |i| derive(key, counts[i]))?;
        batch.insert(name.clone(), out);
        Ok(batch)
    })
}

/// `data/digits/digits.csv.gz`: 1,797 images of handwritten digits (Alpaydin & Kaynak 1998,
/// CC BY 4.0), one per line: 64 values 0..16, then the label.
const DIGITS_GZ: &[u8] = include_bytes!("../../../data/digits/digits.csv.gz");

/// `data/digits/SHA256SUMS`: the file's published checksum.
const DIGITS_SHA256: &str = include_str!("../../../data/digits/SHA256SUMS");

/// Examples in the training split of [`digits`].
pub const DIGITS_TRAIN: usize = 1500;

/// The digits as examples: `image` `[1797, 8, 8, 1]` scaled to [0, 1] and integer `labels`
/// `[1797]`, in the file's order.
pub fn digits() -> Result<Examples> {
    let what = "the built-in digits data";
    let want = DIGITS_SHA256.split_whitespace().next().unwrap_or_default();
    let got: String = Sha256::digest(DIGITS_GZ).iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(Error::Input(format!("{what}: SHA-256 {got} is not the published {want}: the file is damaged")));
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Input(format!("{what}: {e}")))?;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Input(format!("{what}: line {} is not 65 numbers", i + 1)))?;
        if values.len() != 65 {
            return Err(Error::Input(format!("{what}: line {} has {} values, not 65", i + 1, values.len())));
        }
        images.extend(values[..64].iter().map(|v| v / 16.0));
        labels.push(values[64]);
    }
    let n = labels.len();
    let image = Tensor::from_shape_vec(vec![n, 8, 8, 1], images).expect("64 values per image");
    let labels = Tensor::from_shape_vec(vec![n], labels).expect("one label per image");
    Examples::new([("image".to_string(), image), ("labels".to_string(), labels)].into())
}

/// The fixed split of [`digits`]: a seeded shuffle, then the first [`DIGITS_TRAIN`] for
/// training and the remaining 297 for testing.
pub fn digits_split() -> Result<(Examples, Examples)> {
    let all = digits()?;
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| mix64(i as u64));
    let shuffled = Examples::new(all.gather(&order))?;
    Ok((shuffled.split(0..DIGITS_TRAIN), shuffled.split(DIGITS_TRAIN..shuffled.len())))
}

/// Examples from a safetensors file: every tensor holds the same number of examples.
pub fn load(path: &Path) -> Result<Examples> {
    let t: TensorMap = tensors::load(path)?;
    Examples::new(t).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_input_pipeline_draws_its_own_augmentation() {
        let images = Tensor::from_shape_fn(vec![2, 6, 6, 1], |i| (i[1] * 6 + i[2]) as f32 / 36.0);
        let batch = TensorMap::from([("image".to_string(), images)]);
        let aug = Augment::parse("rotate=20,brightness=0.2").unwrap();
        let run = |seed, index| augmentation("image", aug.clone(), seed, index)(batch.clone(), &[0, 1]).unwrap();
        assert_eq!(run(3, 0), run(3, 0));
        assert_ne!(run(3, 0), run(3, 1), "two replicas' pipelines");
        assert_ne!(run(3, 0), run(4, 0), "another run's seed");
    }

    #[test]
    fn digits_load_and_split() {
        let (train, test) = digits_split().unwrap();
        assert_eq!((train.len(), test.len()), (1500, 297));
        let all = digits().unwrap();
        let b = all.gather(&[0]);
        // The file's first image is a 0 whose top-left pixel is blank.
        assert_eq!(b["labels"][[0]], 0.0);
        assert_eq!(b["image"].shape(), &[1, 8, 8, 1]);
        assert!(b["image"].iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}
