//! Optimizers as update rules on f32 values: the reference for the updates the lowering
//! emits for the vector unit, and the CPU path's own updates.
//!
//! The rules follow TensorFlow's optimizers, which TPUEstimator users train with:
//! `GradientDescentOptimizer`, `MomentumOptimizer` (not Nesterov) and `AdamOptimizer`
//! (Kingma & Ba, 2015, with the bias correction folded into the step size and the `beta^t`
//! powers kept as state, as TF does).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// `p -= lr · g`.
    Sgd { learning_rate: f32 },
    /// `v = momentum · v + g; p -= lr · v`.
    Momentum { learning_rate: f32, momentum: f32 },
    /// `m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²; p -= lr_t · m / (sqrt(v) + eps)` with
    /// `lr_t = lr · sqrt(1 - b2^t) / (1 - b1^t)` at step `t` (from 1).
    Adam { learning_rate: f32, beta1: f32, beta2: f32, epsilon: f32 },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Sgd { learning_rate: 0.01 }
    }
}

/// State shared by every parameter: Adam's `beta1^t` and `beta2^t` (TF's `beta1_power`,
/// `beta2_power`), each a one-element tensor.
pub const ADAM_POWERS: [&str; 2] = ["optimizer/beta1_power", "optimizer/beta2_power"];

impl Optimizer {
    /// Parses `sgd`, `momentum` or `adam` with a learning rate (TF's defaults for the rest:
    /// momentum 0.9; Adam's 0.9, 0.999, 1e-8).
    pub fn parse(name: &str, learning_rate: f32) -> Result<Optimizer> {
        let opt = match name {
            "sgd" => Optimizer::Sgd { learning_rate },
            "momentum" => Optimizer::Momentum { learning_rate, momentum: 0.9 },
            "adam" => Optimizer::Adam { learning_rate, beta1: 0.9, beta2: 0.999, epsilon: 1e-8 },
            other => {
                return Err(Error::Graph {
                    graph: "optimizer".into(),
                    reason: format!("unknown optimizer '{other}': use sgd, momentum or adam"),
                });
            }
        };
        opt.check()?;
        Ok(opt)
    }

    /// Rejects rates and decays that cannot train.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Graph { graph: "optimizer".into(), reason });
        let lr = self.learning_rate();
        if !lr.is_finite() || lr <= 0.0 {
            return bad(format!("learning rate {lr} must be a positive number"));
        }
        match *self {
            Optimizer::Momentum { momentum, .. } if !(0.0..1.0).contains(&momentum) => {
                bad(format!("momentum {momentum} must be in [0, 1)"))
            }
            Optimizer::Adam { beta1, beta2, epsilon, .. }
                if !(0.0..1.0).contains(&beta1)
                    || !(0.0..1.0).contains(&beta2)
                    || epsilon.is_nan()
                    || epsilon <= 0.0 =>
            {
                bad(format!("Adam needs beta1 {beta1} and beta2 {beta2} in [0, 1) and epsilon {epsilon} > 0"))
            }
            _ => Ok(()),
        }
    }

    pub fn learning_rate(&self) -> f32 {
        match *self {
            Optimizer::Sgd { learning_rate }
            | Optimizer::Momentum { learning_rate, .. }
            | Optimizer::Adam { learning_rate, .. } => learning_rate,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Momentum { .. } => "momentum",
            Optimizer::Adam { .. } => "adam",
        }
    }

    /// The per-parameter slots, named `<param>/<slot>`, each of the parameter's shape and
    /// starting at zero.
    pub fn slots(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd { .. } => &[],
            Optimizer::Momentum { .. } => &["momentum"],
            Optimizer::Adam { .. } => &["m", "v"],
        }
    }

    /// Initial values of the shared state (Adam's powers start at `beta1`, `beta2`: step 1's).
    pub fn initial_state(&self) -> Vec<(&'static str, f32)> {
        match *self {
            Optimizer::Adam { beta1, beta2, .. } => vec![(ADAM_POWERS[0], beta1), (ADAM_POWERS[1], beta2)],
            _ => Vec::new(),
        }
    }

    /// Adam's step size for the powers `beta1^t`, `beta2^t`, in f32 as the vector unit
    /// computes it.
    pub fn adam_step_size(learning_rate: f32, beta1_power: f32, beta2_power: f32) -> f32 {
        learning_rate * (1.0 - beta2_power).sqrt() / (1.0 - beta1_power)
    }

    /// One update of `param` with `grad`; `slots` in the order of [`Optimizer::slots`];
    /// `state` in the order of [`Optimizer::initial_state`] (read only: advance it once per
    /// step, after every parameter, with [`Optimizer::advance`]).
    pub fn apply(&self, param: &mut [f32], grad: &[f32], slots: &mut [Vec<f32>], state: &[f32]) {
        match *self {
            Optimizer::Sgd { learning_rate } => {
                for (p, &g) in param.iter_mut().zip(grad) {
                    *p -= learning_rate * g;
                }
            }
            Optimizer::Momentum { learning_rate, momentum } => {
                for ((p, &g), v) in param.iter_mut().zip(grad).zip(slots[0].iter_mut()) {
                    *v = momentum * *v + g;
                    *p -= learning_rate * *v;
                }
            }
            Optimizer::Adam { learning_rate, beta1, beta2, epsilon } => {
                let step = Self::adam_step_size(learning_rate, state[0], state[1]);
                let (ms, vs) = slots.split_at_mut(1);
                for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(ms[0].iter_mut()).zip(vs[0].iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * (g * g);
                    *p -= step * *m / (v.sqrt() + epsilon);
                }
            }
        }
    }

    /// The shared state after a step.
    pub fn advance(&self, state: &mut [f32]) {
        if let Optimizer::Adam { beta1, beta2, .. } = *self {
            state[0] *= beta1;
            state[1] *= beta2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_of_each_rule() {
        let g = [0.5f32, -2.0];
        let mut p = [1.0f32, 1.0];
        Optimizer::Sgd { learning_rate: 0.1 }.apply(&mut p, &g, &mut [], &[]);
        assert_eq!(p, [0.95, 1.2]);

        let opt = Optimizer::Momentum { learning_rate: 0.1, momentum: 0.9 };
        let (mut p, mut slots) = ([1.0f32, 1.0], vec![vec![1.0f32, 0.0]]);
        opt.apply(&mut p, &g, &mut slots, &[]);
        assert_eq!(slots[0], vec![1.4, -2.0]);
        assert_eq!(p, [1.0 - 0.1 * 1.4, 1.2]);

        // Adam's first step moves each parameter by about lr, whatever the gradient's scale.
        let opt = Optimizer::parse("adam", 0.001).unwrap();
        let mut state: Vec<f32> = opt.initial_state().iter().map(|s| s.1).collect();
        let (mut p, mut slots) = ([1.0f32, 1.0], vec![vec![0.0; 2], vec![0.0; 2]]);
        opt.apply(&mut p, &g, &mut slots, &state);
        assert!((p[0] - 0.999).abs() < 1e-6 && (p[1] - 1.001).abs() < 1e-6, "{p:?}");
        opt.advance(&mut state);
        assert_eq!(state, vec![0.9 * 0.9, 0.999 * 0.999]);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Optimizer::parse("adagrad", 0.1).unwrap_err().to_string().contains("sgd, momentum or adam"));
        assert!(Optimizer::parse("sgd", 0.0).unwrap_err().to_string().contains("positive"));
        let e = Optimizer::Momentum { learning_rate: 0.1, momentum: 1.0 }.check().unwrap_err();
        assert!(e.to_string().contains("[0, 1)"));
    }
}
