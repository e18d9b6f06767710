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

impl MetricsFile {
    /// The curves' file beside the metrics file.
    pub const CURVES: &'static str = "curves.svg";

    /// Writes `curves.svg` beside the metrics file: the training loss and the evaluation loss
    /// against the global step (left axis), the evaluation accuracy (right axis). Rewritten
    /// whole, atomically, from every record so far.
    pub fn write_curves(&self) -> Result<PathBuf> {
        let records = self.read()?;
        let series = |mode: &str, key: &str| -> Vec<(f64, f64)> {
            records
                .iter()
                .filter(|r| r["mode"] == mode)
                .filter_map(|r| Some((r["global_step"].as_f64()?, r[key].as_f64()?)))
                .collect()
        };
        let (train, eval_loss, accuracy) =
            (series("train", "loss"), series("eval", "loss"), series("eval", "accuracy"));
        let path = self.path.with_file_name(Self::CURVES);
        let mut svg = String::new();
        draw_curves(&mut svg, &train, &eval_loss, &accuracy)
            .map_err(|e| Error::Input(format!("drawing {}: {e}", path.display())))?;
        systolic_compiler::tensors::write_atomically(&path, svg.as_bytes())?;
        Ok(path)
    }
}

/// The curves as SVG text.
fn draw_curves(
    svg: &mut String,
    train: &[(f64, f64)],
    eval_loss: &[(f64, f64)],
    accuracy: &[(f64, f64)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::with_string(svg, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = train.iter().chain(eval_loss).chain(accuracy);
    let last = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let top = train.iter().chain(eval_loss).map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("training and evaluation", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..last, 0.0..top)?
        .set_secondary_coord(0.0..last, 0.0..1.0);
    chart.configure_mesh().x_desc("global step").y_desc("loss").draw()?;
    chart.configure_secondary_axes().y_desc("accuracy").draw()?;
    for (points, colour, label) in [(train, BLUE, "training loss"), (eval_loss, RED, "evaluation loss")] {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.to_vec(), colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    if !accuracy.is_empty() {
        chart
            .draw_secondary_series(LineSeries::new(accuracy.to_vec(), GREEN.stroke_width(2)))?
            .label("evaluation accuracy")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        chart.draw_secondary_series(accuracy.iter().map(|&p| Circle::new(p, 3, GREEN.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
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
    fn curves_are_drawn_from_the_metrics_file() {
        let dir = std::env::temp_dir().join(format!("systolic-curves-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = MetricsFile::new(&dir);
        for (step, loss) in [(10, 2.0), (20, 1.0), (30, 0.5)] {
            f.append(&serde_json::json!({"mode": "train", "global_step": step, "loss": loss})).unwrap();
        }
        f.append(&serde_json::json!({"mode": "eval", "global_step": 30, "loss": 0.6, "accuracy": 0.8})).unwrap();
        let svg = std::fs::read_to_string(f.write_curves().unwrap()).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("training loss") && svg.contains("evaluation accuracy"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_first_non_finite_tensor_is_named() {
        let mut t = TensorMap::new();
        t.insert("a".into(), Tensor::zeros(vec![2]));
        t.insert("b".into(), Tensor::from_shape_vec(vec![2], vec![1.0, f32::INFINITY]).unwrap());
        assert_eq!(first_non_finite(&t), Some(("b".to_string(), f32::INFINITY)));
    }
}
