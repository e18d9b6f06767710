//! `Dataset`: TensorFlow's `tf.data` pipeline over a random-access [`Source`] — shard,
//! shuffle, repeat, map, batch, take and prefetch — where every batch is a pure function of
//! its position.
//!
//! That is what makes checkpoints exact and cheap: a shuffle is a seeded permutation per
//! epoch (a perfect shuffle, TensorFlow's with a buffer as large as the data), a map draws its
//! randomness from the element's running count (freshly random for every example in every
//! epoch, the same on any thread), so `seek(position)` jumps to any batch without reading the
//! ones before it, and a resumed run reads exactly the batches it would have.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use systolic_compiler::TensorMap;
use systolic_compiler::rng::{derive, mix64};

use crate::error::{Error, Result};
use crate::input::Input;

/// Examples by index: what a pipeline reads.
pub trait Source: Send + Sync {
    /// How many examples there are.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`, stacked: every tensor `[indices.len(), ...]`, by name.
    fn gather(&self, indices: &[usize]) -> Result<TensorMap>;

    /// Each tensor's shape for one example (without the batch axis), by name.
    fn shapes(&self) -> BTreeMap<String, Vec<usize>>;
}

/// Examples `range` of another source (a train/test split that copies nothing).
pub struct Subset {
    source: Arc<dyn Source>,
    range: std::ops::Range<usize>,
}

impl Subset {
    pub fn new(source: Arc<dyn Source>, range: std::ops::Range<usize>) -> Result<Subset> {
        if range.end > source.len() || range.start >= range.end {
            return Err(Error::Input(format!(
                "examples {}..{} of a data set of {}: give a non-empty range inside it",
                range.start,
                range.end,
                source.len()
            )));
        }
        Ok(Subset { source, range })
    }
}

impl Source for Subset {
    fn len(&self) -> usize {
        self.range.len()
    }

    fn gather(&self, indices: &[usize]) -> Result<TensorMap> {
        let shifted: Vec<usize> = indices.iter().map(|&i| i + self.range.start).collect();
        self.source.gather(&shifted)
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.source.shapes()
    }
}

/// A map over a batch: the batch, and each example's running count in the stream (the key
/// for its randomness).
pub type MapFn = Arc<dyn Fn(TensorMap, &[u64]) -> Result<TensorMap> + Send + Sync>;

/// One epoch's shuffled order of source indices, and the epoch.
type EpochOrder = (u64, Arc<Vec<usize>>);

/// How many times the data is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeat {
    Times(u64),
    Forever,
}

/// The pipeline's description: pure, so any batch can be computed from its position.
#[derive(Clone)]
struct Plan {
    source: Arc<dyn Source>,
    /// The source's examples this pipeline reads (after `shard`), in order.
    indices: Arc<Vec<usize>>,
    shuffle: Option<u64>,
    repeat: Repeat,
    maps: Vec<MapFn>,
    batch: usize,
    drop_remainder: bool,
    take: Option<u64>,
    /// The last epoch's shuffled order.
    order: Arc<Mutex<Option<EpochOrder>>>,
}

impl Plan {
    /// Elements in the stream (`None`: endless).
    fn elements(&self) -> Option<u64> {
        match self.repeat {
            Repeat::Forever => None,
            Repeat::Times(n) => Some(n * self.indices.len() as u64),
        }
    }

    /// Batches in the stream (`None`: endless).
    fn batches(&self) -> Option<u64> {
        let by_elements = self.elements().map(|e| {
            let b = self.batch as u64;
            if self.drop_remainder { e / b } else { e.div_ceil(b) }
        });
        match (by_elements, self.take) {
            (Some(a), Some(t)) => Some(a.min(t)),
            (a, t) => a.or(t),
        }
    }

    /// Batch `b`, or `None` past the end.
    fn batch_at(&self, b: u64) -> Result<Option<TensorMap>> {
        if self.batches().is_some_and(|n| b >= n) {
            return Ok(None);
        }
        let first = b * self.batch as u64;
        let end = match self.elements() {
            Some(e) => (first + self.batch as u64).min(e),
            None => first + self.batch as u64,
        };
        let counts: Vec<u64> = (first..end).collect();
        let m = self.indices.len() as u64;
        let indices: Vec<usize> = match self.shuffle {
            None => counts.iter().map(|&e| self.indices[(e % m) as usize]).collect(),
            Some(_) => {
                let mut out = Vec::with_capacity(counts.len());
                for &e in &counts {
                    out.push(self.epoch_order(e / m)[(e % m) as usize]);
                }
                out
            }
        };
        let mut batch = self.source.gather(&indices)?;
        for map in &self.maps {
            batch = map(batch, &counts)?;
        }
        Ok(Some(batch))
    }

    /// The source indices of epoch `epoch` in the order a shuffled pipeline reads them
    /// (computed once per epoch and kept).
    fn epoch_order(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut cache = self.order.lock().expect("no panics while the order is computed");
        if let Some((e, order)) = cache.as_ref()
            && *e == epoch
        {
            return order.clone();
        }
        let key = derive(self.shuffle.unwrap_or(0), epoch);
        let mut keyed: Vec<(u64, usize)> = self.indices.iter().map(|&i| (mix64(key ^ i as u64), i)).collect();
        keyed.sort_unstable();
        let order = Arc::new(keyed.into_iter().map(|(_, i)| i).collect::<Vec<_>>());
        *cache = Some((epoch, order.clone()));
        order
    }
}

/// A `tf.data`-style pipeline: build it with the methods in order (shard, shuffle, repeat,
/// map, batch, take, prefetch), then read batches through [`Input`].
pub struct Dataset {
    plan: Plan,
    prefetch: usize,
    position: u64,
    /// The prefetching thread's batches, with the position it started at.
    ahead: Option<Receiver<Result<Option<TensorMap>>>>,
    /// The stream ended (the thread is gone): later reads end too, until a seek.
    ended: bool,
}

impl Dataset {
    /// Every example of `source`, in order, once, one at a time.
    pub fn from_source(source: Arc<dyn Source>) -> Dataset {
        let indices = Arc::new((0..source.len()).collect());
        Dataset {
            plan: Plan {
                source,
                indices,
                shuffle: None,
                repeat: Repeat::Times(1),
                maps: Vec::new(),
                batch: 1,
                drop_remainder: false,
                take: None,
                order: Arc::default(),
            },
            prefetch: 0,
            position: 0,
            ahead: None,
            ended: false,
        }
    }

    /// Only examples `index, index + count, ...` (`tf.data.Dataset.shard`): one input
    /// pipeline's part when several read the same data.
    pub fn shard(mut self, index: usize, count: usize) -> Result<Dataset> {
        if count == 0 || index >= count {
            return Err(Error::Input(format!("shard {index} of {count}: give an index below a positive count")));
        }
        let kept: Vec<usize> = self.plan.indices.iter().copied().skip(index).step_by(count).collect();
        self.plan.indices = Arc::new(kept);
        self.plan.order = Arc::default();
        Ok(self)
    }

    /// A fresh seeded permutation every epoch.
    pub fn shuffle(mut self, seed: u64) -> Dataset {
        self.plan.shuffle = Some(seed);
        self.plan.order = Arc::default();
        self
    }

    pub fn repeat(mut self, repeat: Repeat) -> Dataset {
        self.plan.repeat = repeat;
        self
    }

    /// Applies `f` to every batch (with each example's running count, the key for its
    /// randomness).
    pub fn map(mut self, f: MapFn) -> Dataset {
        self.plan.maps.push(f);
        self
    }

    /// Batches of `size` examples; the last, partial one dropped with `drop_remainder` (as a
    /// TPU needs: every step's batch has one shape).
    pub fn batch(mut self, size: usize, drop_remainder: bool) -> Result<Dataset> {
        if size == 0 {
            return Err(Error::Input("a batch of 0 examples: give at least 1".into()));
        }
        self.plan.batch = size;
        self.plan.drop_remainder = drop_remainder;
        Ok(self)
    }

    /// At most `batches` batches.
    pub fn take(mut self, batches: u64) -> Dataset {
        self.plan.take = Some(batches);
        self
    }

    /// Makes up to `depth` batches ahead on a background thread (0: none).
    pub fn prefetch(mut self, depth: usize) -> Dataset {
        self.prefetch = depth;
        self
    }

    /// Examples this pipeline reads per epoch.
    pub fn examples_per_epoch(&self) -> usize {
        self.plan.indices.len()
    }

    /// Batches in the stream (`None`: endless).
    pub fn batches(&self) -> Option<u64> {
        self.plan.batches()
    }

    /// Checks that the pipeline yields anything: a training pipeline whose epoch is shorter
    /// than a batch dropped remainders would never yield one.
    pub fn check(&self) -> Result<()> {
        let n = self.plan.indices.len();
        if n == 0 {
            return Err(Error::Input("the dataset (or this shard of it) has no examples".into()));
        }
        if self.plan.drop_remainder && self.plan.repeat == Repeat::Times(1) && n < self.plan.batch {
            return Err(Error::Input(format!(
                "{n} examples make no batch of {} with the remainder dropped: give more examples or a smaller batch",
                self.plan.batch
            )));
        }
        Ok(())
    }

    /// Starts the prefetching thread at the current position.
    fn start_ahead(&mut self) {
        let (tx, rx): (SyncSender<Result<Option<TensorMap>>>, _) = sync_channel(self.prefetch);
        let plan = self.plan.clone();
        let from = self.position;
        std::thread::spawn(move || {
            for b in from.. {
                let batch = plan.batch_at(b);
                let end = !matches!(batch, Ok(Some(_)));
                if tx.send(batch).is_err() || end {
                    return;
                }
            }
        });
        self.ahead = Some(rx);
    }
}

impl Input for Dataset {
    fn next_batch(&mut self) -> Result<Option<TensorMap>> {
        let batch = if self.prefetch == 0 {
            self.plan.batch_at(self.position)?
        } else {
            if self.ended {
                return Ok(None);
            }
            if self.ahead.is_none() {
                self.start_ahead();
            }
            let rx = self.ahead.as_ref().expect("started above");
            let got = rx.recv().map_err(|_| Error::Input("the prefetching thread stopped".into()))?;
            if !matches!(got, Ok(Some(_))) {
                // The thread has sent its last: the end, or an error (reported once; reading on
                // starts again from this position).
                self.ahead = None;
                self.ended = matches!(got, Ok(None));
            }
            got?
        };
        if batch.is_some() {
            self.position += 1;
        }
        Ok(batch)
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn seek(&mut self, position: u64) -> Result<()> {
        self.position = position;
        // The thread's batches were for the old position: start again from the new one.
        self.ahead = None;
        self.ended = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Examples;
    use systolic_compiler::Tensor;

    fn examples(n: usize) -> Arc<dyn Source> {
        let x = Tensor::from_shape_vec(vec![n, 2], (0..2 * n).map(|v| v as f32).collect()).unwrap();
        let y = Tensor::from_shape_vec(vec![n], (0..n).map(|v| v as f32).collect()).unwrap();
        Arc::new(Examples::new([("x".to_string(), x), ("labels".to_string(), y)].into()).unwrap())
    }

    fn labels(b: &TensorMap) -> Vec<usize> {
        b["labels"].iter().map(|&v| v as usize).collect()
    }

    fn all(mut d: Dataset) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        while let Some(b) = d.next_batch().unwrap() {
            out.push(labels(&b));
        }
        out
    }

    #[test]
    fn batches_repeat_and_take_as_tf_data_does() {
        let d = Dataset::from_source(examples(10)).repeat(Repeat::Times(2)).batch(4, false).unwrap();
        assert_eq!(d.batches(), Some(5));
        let b = all(d);
        assert_eq!(b[2], vec![8, 9, 0, 1], "a batch crosses the epoch boundary");
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4; 5]);
        let b = all(Dataset::from_source(examples(10)).batch(4, true).unwrap());
        assert_eq!(b, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let b = all(Dataset::from_source(examples(10)).batch(4, false).unwrap());
        assert_eq!(b.last().unwrap(), &vec![8, 9]);
        let b = all(Dataset::from_source(examples(10)).repeat(Repeat::Forever).batch(3, true).unwrap().take(4));
        assert_eq!(b.len(), 4);
        let b = all(Dataset::from_source(examples(10)).shard(1, 3).unwrap().batch(10, false).unwrap());
        assert_eq!(b, vec![vec![1, 4, 7]]);
    }

    #[test]
    fn shuffles_are_permutations_per_epoch_and_seek_reproduces_any_batch() {
        let make = |prefetch| {
            Dataset::from_source(examples(12))
                .shuffle(3)
                .repeat(Repeat::Forever)
                .batch(4, true)
                .unwrap()
                .prefetch(prefetch)
        };
        let mut d = make(0);
        let batches: Vec<Vec<usize>> = (0..9).map(|_| labels(&d.next_batch().unwrap().unwrap())).collect();
        for epoch in batches.chunks(3) {
            let mut seen: Vec<usize> = epoch.concat();
            seen.sort();
            assert_eq!(seen, (0..12).collect::<Vec<_>>());
        }
        assert_ne!(batches[0..3], batches[3..6]);
        // Prefetching reads the same batches; seeking (also mid-stream) jumps to any of them.
        let mut p = make(3);
        for b in &batches[..4] {
            assert_eq!(&labels(&p.next_batch().unwrap().unwrap()), b);
        }
        p.seek(7).unwrap();
        assert_eq!(labels(&p.next_batch().unwrap().unwrap()), batches[7]);
        p.seek(1).unwrap();
        assert_eq!(labels(&p.next_batch().unwrap().unwrap()), batches[1]);
        assert_eq!(p.position(), 2);
    }

    #[test]
    fn maps_see_each_examples_running_count() {
        let add_count: MapFn = Arc::new(|mut b: TensorMap, counts: &[u64]| {
            let x = b.get_mut("x").unwrap();
            for (mut row, &c) in x.outer_iter_mut().zip(counts) {
                row.mapv_inplace(|v| v + 1000.0 * c as f32);
            }
            Ok(b)
        });
        let mut d = Dataset::from_source(examples(3)).repeat(Repeat::Times(2)).map(add_count).batch(2, false).unwrap();
        let _ = d.next_batch().unwrap();
        let b = d.next_batch().unwrap().unwrap();
        // Elements 2 and 3: example 2 (x = 4, 5) in epoch 0 and example 0 (x = 0, 1) in epoch 1.
        assert_eq!(b["x"].iter().copied().collect::<Vec<_>>(), vec![2004.0, 2005.0, 3000.0, 3001.0]);
    }

    proptest::proptest! {
        /// Over sizes, shards, batches and repeats: every batch holds the batch size (the last
        /// may be short only without drop_remainder), the stream holds exactly the examples
        /// it should, and `batches()` counts them.
        #[test]
        fn batches_always_have_the_batch_size(
            n in 1usize..40, count in 1usize..4, batch in 1usize..12, times in 1u64..4, drop in proptest::bool::ANY,
            shuffle in proptest::option::of(0u64..5),
        ) {
            let index = n % count;
            let Ok(d) = Dataset::from_source(examples(n)).shard(index, count) else { return Ok(()) };
            let per = d.examples_per_epoch();
            proptest::prop_assume!(per > 0);
            let mut d = d.repeat(Repeat::Times(times));
            if let Some(seed) = shuffle {
                d = d.shuffle(seed);
            }
            let d = d.batch(batch, drop).unwrap();
            let expected = d.batches();
            let got = all(d);
            let total = per * times as usize;
            proptest::prop_assert_eq!(Some(got.len() as u64), expected);
            for (i, b) in got.iter().enumerate() {
                let last = i + 1 == got.len();
                proptest::prop_assert!(b.len() == batch || (!drop && last && b.len() == total % batch));
            }
            let seen: usize = got.iter().map(Vec::len).sum();
            proptest::prop_assert_eq!(seen, if drop { total / batch * batch } else { total });
            // Each epoch reads every example of the shard once.
            if !drop && times == 1 {
                let mut flat: Vec<usize> = got.concat();
                flat.sort();
                let want: Vec<usize> = (index..n).step_by(count).collect();
                proptest::prop_assert_eq!(flat, want);
            }
        }
    }

    #[test]
    fn empty_shards_and_batches_that_cannot_fill_are_refused() {
        assert!(Dataset::from_source(examples(3)).shard(3, 3).is_err());
        assert!(Dataset::from_source(examples(3)).batch(0, true).is_err());
        let d = Dataset::from_source(examples(3)).batch(4, true).unwrap();
        assert!(d.check().unwrap_err().to_string().contains("3 examples make no batch of 4"));
    }
}
