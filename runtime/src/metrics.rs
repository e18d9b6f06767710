//! What training and evaluation report: the built-in metrics (loss, top-1 and top-5
//! accuracy) as streaming means over steps, the JSONL metrics file in the model folder, and
//! the check that stops training at the first non-finite loss.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use systolic_compiler::reference::loss;
use systolic_compiler::{Tensor, TensorMap};

use crate::error::{Error, Result};
use crate::spec::MetricUpdate;

/// Streaming means by metric name (TensorFlow's `tf.metrics.mean` over evaluation steps).
#[derive(Clone, Debug, Default)]
pub struct Means {
    sums: BTreeMap<String, (f64, f64)>,
}

impl Means {
    pub fn add(&mut self, name: &str, u: MetricUpdate) {
        let e = self.sums.entry(name.to_string()).or_default();
        e.0 += u.sum;
        e.1 += u.count;
    }

    /// Each metric's mean so far.
    pub fn values(&self) -> BTreeMap<String, f64> {
        self.sums.iter().map(|(k, &(s, n))| (k.clone(), if n > 0.0 { s / n } else { f64::NAN })).collect()
    }
}

/// The examples whose label is among the `k` largest logits: ties broken towards the lower
/// class, as `tf.nn.in_top_k` counts a tie at the k-th place as a hit only when it fits.
pub fn top_k_hits(logits: &Tensor, labels: &[usize], k: usize) -> usize {
    let classes = *logits.shape().last().expect("logits have a class axis");
    let values = logits.as_standard_layout();
    let rows = values.as_slice().expect("standard layout").chunks(classes);
    rows.zip(labels)
        .filter(|(row, label)| {
            let label = **label;
            let target = row[label];
            // Classes ranked before the label: larger, or equal and earlier.
            let before = row.iter().enumerate().filter(|&(c, &v)| v > target || (v == target && c < label)).count();
            before < k
        })
        .count()
}

/// The built-in evaluation metrics of one step: the mean softmax cross-entropy (with the
/// model's label smoothing) and top-1 / top-5 accuracy of `logits` against `labels`.
pub fn classifier_metrics(
    logits: &Tensor,
    labels_name: &str,
    labels: &Tensor,
    label_smoothing: f32,
) -> Result<Vec<(String, MetricUpdate)>> {
    let classes = *logits.shape().last().ok_or_else(|| Error::Input("logits are a scalar".into()))?;
    let rows = logits.len() / classes.max(1);
    let ids = loss::check_labels(labels_name, &labels.iter().copied().collect::<Vec<_>>(), classes)?;
    if ids.len() != rows {
        return Err(Error::Input(format!("{} labels for {rows} rows of logits", ids.len())));
    }
    let flat: Vec<f32> = logits.iter().copied().collect();
    let mean = loss::cross_entropy(&flat, &ids, classes, label_smoothing) as f64;
    let n = rows as f64;
    let mut out = vec![
        ("loss".to_string(), MetricUpdate { sum: mean * n, count: n }),
        ("accuracy".to_string(), MetricUpdate { sum: top_k_hits(logits, &ids, 1) as f64, count: n }),
    ];
    if classes > 5 {
        out.push(("top_5_accuracy".to_string(), MetricUpdate { sum: top_k_hits(logits, &ids, 5) as f64, count: n }));
    }
    Ok(out)
}

/// The first tensor in `tensors` holding a NaN or an infinity, and that value.
pub fn first_non_finite(tensors: &TensorMap) -> Option<(String, f32)> {
    tensors.iter().find_map(|(name, t)| t.iter().find(|v| !v.is_finite()).map(|&v| (name.clone(), v)))
}

/// The metrics file of a model folder: one JSON object per line (`{"mode": "train",
/// "global_step": 100, "loss": ..., ...}`), appended.
pub struct MetricsFile {
    path: PathBuf,
}

impl MetricsFile {
    pub const NAME: &'static str = "metrics.jsonl";

    pub fn new(model_dir: &Path) -> MetricsFile {
        MetricsFile { path: model_dir.join(Self::NAME) }
    }

    /// Appends one record (flushed to the disk before returning).
    pub fn append(&self, record: &serde_json::Value) -> Result<()> {
        let io = |e| Error::Io { path: self.path.display().to_string(), source: e };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        writeln!(f, "{record}").map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// Every record so far.
    pub fn read(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Io { path: self.path.display().to_string(), source: e }),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| Error::ConfigFile {
                    path: self.path.display().to_string(),
                    line: i + 1,
                    col: e.column(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_ties_towards_lower_classes() {
        let logits = Tensor::from_shape_vec(
            vec![3, 4],
            vec![
                0.1, 0.9, 0.3, 0.2, // label 1: top 1
                0.5, 0.5, 0.1, 0.0, // label 1 ties class 0, which ranks first: top 2
                0.4, 0.3, 0.2, 0.1, // label 3: last
            ],
        )
        .unwrap();
        let labels = [1, 1, 3];
        assert_eq!(top_k_hits(&logits, &labels, 1), 1);
        assert_eq!(top_k_hits(&logits, &labels, 2), 2);
        assert_eq!(top_k_hits(&logits, &labels, 4), 3);
    }

    #[test]
    fn classifier_metrics_are_means_over_examples() {
        let logits = Tensor::from_shape_vec(vec![2, 2], vec![0.0, 0.0, 3.0, 1.0]).unwrap();
        let labels = Tensor::from_shape_vec(vec![2], vec![1.0, 0.0]).unwrap();
        let m = classifier_metrics(&logits, "labels", &labels, 0.0).unwrap();
        let mut means = Means::default();
        for (name, u) in m {
            means.add(&name, u);
        }
        let v = means.values();
        // ln 2 for the tie, ln(1 + e^-2) for the second.
        let want = (2f64.ln() + (1.0 + (-2f64).exp()).ln()) / 2.0;
        assert!((v["loss"] - want).abs() < 1e-6, "{v:?}");
        assert_eq!(v["accuracy"], 0.5);
        let bad = Tensor::from_shape_vec(vec![2], vec![1.0, 2.0]).unwrap();
        assert!(classifier_metrics(&logits, "labels", &bad, 0.0).unwrap_err().to_string().contains("label 2"));
    }

    #[test]
    fn the_first_non_finite_tensor_is_named() {
        let mut t = TensorMap::new();
        t.insert("a".into(), Tensor::zeros(vec![2]));
        t.insert("b".into(), Tensor::from_shape_vec(vec![2], vec![1.0, f32::INFINITY]).unwrap());
        assert_eq!(first_non_finite(&t), Some(("b".to_string(), f32::INFINITY)));
    }
}
