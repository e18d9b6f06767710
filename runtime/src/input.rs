//! Input functions: what an estimator calls to get batches, and the in-memory source every
//! command uses until the data issue adds more.
//!
//! An input function receives an [`InputContext`] (the mode, the batch size this call must
//! yield — per replica or per host, as the [`crate::InputPipeline`] says — and which of the
//! pipelines it is) and returns an [`Input`]: batches of features and labels by name, and a
//! position a checkpoint stores so that a resumed run continues with the next batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use systolic_compiler::{Tensor, TensorMap};

use crate::data::pipeline::{Dataset, Repeat, Source};
use crate::error::{Error, Result};
use crate::spec::{Mode, Params};

/// Why and for whom an input function is called.
#[derive(Clone, Debug)]
pub struct InputContext {
    pub mode: Mode,
    /// The user's params with `batch_size` set: the examples each batch of this input holds.
    pub params: Params,
    /// Which pipeline this is (a replica, a host, or 0), and how many there are: an input
    /// shards its examples by these so pipelines do not repeat each other.
    pub input_index: usize,
    pub inputs: usize,
    /// The run's random seed (RunConfig's `random_seed`).
    pub seed: u64,
}

impl InputContext {
    pub fn batch_size(&self) -> Result<usize> {
        self.params.batch_size()
    }
}

/// A stream of batches.
pub trait Input {
    /// The next batch (features and integer labels by name, each with the batch's examples
    /// first), or `None` at the end of the input.
    fn next_batch(&mut self) -> Result<Option<TensorMap>>;
    /// Batches yielded so far: what a checkpoint stores.
    fn position(&self) -> u64;
    /// Continues after `position` batches, as if they had been read.
    fn seek(&mut self, position: u64) -> Result<()>;
}

/// An input function.
pub type InputFn<'a> = dyn Fn(&InputContext) -> Result<Box<dyn Input>> + 'a;

/// Examples held in memory: tensors of the same number of examples (first axis), by name.
#[derive(Clone, Debug)]
pub struct Examples {
    tensors: TensorMap,
    len: usize,
}

impl Examples {
    /// Checks that every tensor holds the same number of examples.
    pub fn new(tensors: TensorMap) -> Result<Examples> {
        let mut len = None;
        for (name, t) in &tensors {
            let n = *t.shape().first().ok_or_else(|| Error::Input(format!("'{name}' is a scalar, not examples")))?;
            match len {
                None => len = Some((name.clone(), n)),
                Some((ref first, m)) if m != n => {
                    return Err(Error::Input(format!("'{name}' holds {n} examples but '{first}' holds {m}")));
                }
                Some(_) => {}
            }
        }
        let (_, len) = len.ok_or_else(|| Error::Input("no tensors: give features and labels".into()))?;
        Ok(Examples { tensors, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Tensor `name`, all examples.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The examples at `indices`, in that order.
    pub fn gather(&self, indices: &[usize]) -> TensorMap {
        self.tensors
            .iter()
            .map(|(name, t)| {
                let per: usize = t.shape()[1..].iter().product();
                let src = t.as_slice().expect("examples are contiguous");
                let values: Vec<f32> =
                    indices.iter().flat_map(|&i| src[i * per..(i + 1) * per].iter().copied()).collect();
                let mut shape = t.shape().to_vec();
                shape[0] = indices.len();
                (name.clone(), Tensor::from_shape_vec(shape, values).expect("gathered rows"))
            })
            .collect()
    }

    /// These examples without tensor `name` (prediction reads no labels).
    pub fn without(mut self, name: &str) -> Examples {
        self.tensors.remove(name);
        self
    }

    /// Examples `range` (a split).
    pub fn split(&self, range: std::ops::Range<usize>) -> Examples {
        let idx: Vec<usize> = range.collect();
        Examples { tensors: self.gather(&idx), len: idx.len() }
    }

    /// Batches of `ctx`'s batch size over this input's shard of the examples: in training
    /// shuffled afresh each epoch (seeded by the run's seed), repeated forever, full batches
    /// only; otherwise in order, once, the last batch partial. [`Examples::dataset`],
    /// batched and prefetched.
    pub fn input(&self, ctx: &InputContext) -> Result<Box<dyn Input>> {
        Ok(Box::new(batched(Examples::dataset(self, ctx)?, ctx)?))
    }

    /// These examples as `ctx`'s pipeline before batching (to add maps such as augmentation):
    /// this input's shard (example `i` belongs to pipeline `i mod inputs`), in training
    /// shuffled afresh each epoch and repeated forever.
    pub fn dataset(&self, ctx: &InputContext) -> Result<Dataset> {
        source_dataset(Arc::new(self.clone()), ctx)
    }
}

/// `source` as `ctx`'s pipeline before batching: this input's shard, in training shuffled
/// afresh each epoch (seeded by the run's seed) and repeated forever.
pub fn source_dataset(source: Arc<dyn Source>, ctx: &InputContext) -> Result<Dataset> {
    let batch = ctx.batch_size()?;
    let mut d = Dataset::from_source(source).shard(ctx.input_index, ctx.inputs.max(1))?;
    if ctx.mode == Mode::Train {
        d = d.shuffle(ctx.seed).repeat(Repeat::Forever);
        if d.examples_per_epoch() < batch {
            return Err(Error::Input(format!(
                "input {} of {} has {} examples, fewer than its batch of {batch}: give more examples or a smaller batch",
                ctx.input_index,
                ctx.inputs,
                d.examples_per_epoch()
            )));
        }
    }
    Ok(d)
}

/// `d` in batches of `ctx`'s size (full ones only in training, as a TPU needs), two made
/// ahead on a background thread.
pub fn batched(d: Dataset, ctx: &InputContext) -> Result<Dataset> {
    let d = d.batch(ctx.batch_size()?, ctx.mode == Mode::Train)?.prefetch(2);
    d.check()?;
    Ok(d)
}

impl Source for Examples {
    fn len(&self) -> usize {
        self.len
    }

    fn gather(&self, indices: &[usize]) -> Result<TensorMap> {
        Ok(Examples::gather(self, indices))
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors.iter().map(|(k, t)| (k.clone(), t.shape()[1..].to_vec())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Examples {
        let x = Tensor::from_shape_vec(vec![n, 2], (0..2 * n).map(|v| v as f32).collect()).unwrap();
        let y = Tensor::from_shape_vec(vec![n], (0..n).map(|v| v as f32).collect()).unwrap();
        Examples::new([("x".to_string(), x), ("labels".to_string(), y)].into()).unwrap()
    }

    fn ctx(mode: Mode, batch: usize, index: usize, inputs: usize) -> InputContext {
        InputContext { mode, params: Params::new().with_batch_size(batch), input_index: index, inputs, seed: 7 }
    }

    #[test]
    fn training_batches_shuffle_each_epoch_and_seek_reproduces_them() {
        let ex = examples(10);
        let mut input = ex.input(&ctx(Mode::Train, 4, 0, 1)).unwrap();
        let labels = |b: TensorMap| b["labels"].iter().map(|&v| v as usize).collect::<Vec<_>>();
        let batches: Vec<Vec<usize>> = (0..6).map(|_| labels(input.next_batch().unwrap().unwrap())).collect();
        // Two full batches per epoch (8 of 10 examples), each epoch a permutation's prefix.
        let epoch0: Vec<usize> = batches[0].iter().chain(&batches[1]).copied().collect();
        let mut sorted = epoch0.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert_ne!(epoch0, batches[2].iter().chain(&batches[3]).copied().collect::<Vec<_>>());
        // The features follow their labels.
        let mut again = ex.input(&ctx(Mode::Train, 4, 0, 1)).unwrap();
        again.seek(4).unwrap();
        let b = again.next_batch().unwrap().unwrap();
        assert_eq!(labels(b.clone()), batches[4]);
        assert_eq!(b["x"][[0, 1]], 2.0 * batches[4][0] as f32 + 1.0);
        assert_eq!(again.position(), 5);
    }

    #[test]
    fn evaluation_reads_each_shard_once_in_order() {
        let ex = examples(10);
        let mut input = ex.input(&ctx(Mode::Eval, 4, 1, 2)).unwrap();
        let first = input.next_batch().unwrap().unwrap();
        assert_eq!(first["labels"].iter().copied().collect::<Vec<_>>(), vec![1.0, 3.0, 5.0, 7.0]);
        let last = input.next_batch().unwrap().unwrap();
        assert_eq!(last["labels"].iter().copied().collect::<Vec<_>>(), vec![9.0]);
        assert!(input.next_batch().unwrap().is_none());
    }

    #[test]
    fn too_few_examples_and_ragged_tensors_are_refused() {
        let e = examples(3).input(&ctx(Mode::Train, 4, 0, 1)).err().unwrap();
        assert!(e.to_string().contains("fewer than its batch of 4"), "{e}");
        let x = Tensor::zeros(vec![3, 2]);
        let y = Tensor::zeros(vec![4]);
        let e = Examples::new([("x".to_string(), x), ("y".to_string(), y)].into()).unwrap_err();
        assert!(e.to_string().contains("holds 4 examples but 'x' holds 3"), "{e}");
    }
}
