//! Optimizers as update rules on f32 values: the reference for the updates the lowering
//! emits for the vector unit, and the CPU path's own updates.
//!
//! The rules follow TensorFlow's optimizers, which TPUEstimator users train with:
//! `GradientDescentOptimizer`, `MomentumOptimizer` (with `use_nesterov`), `AdamOptimizer`
//! (Kingma & Ba, 2015, with the bias correction folded into the step size and the `beta^t`
//! powers kept as state, as TF does), `RMSPropOptimizer` (not centered) and
//! `tf.contrib.opt.LARSOptimizer` (You et al., 2017; the large-batch ResNet-50 recipes).
//! Momentum with Nesterov, RMSProp and LARS use the arithmetic of TF's kernels
//! (`training_ops.cc`), operation for operation.
//!
//! Weight decay is L2 regularisation folded into the gradient (`g + wd · w`) of the
//! parameters [`Optimizer::decays`] names; the loss a step reports does not include the L2
//! term. The learning rate follows a [`Schedule`] of the global step, which is then optimizer
//! state ([`STEP`]).

pub mod scalars;
pub mod schedule;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use systolic_simulator::functional::unary;
use systolic_simulator::isa::{BinaryOp, UnaryOp};

use crate::error::{Error, Result};
pub use scalars::{Reg, ScalarOp, Scalars};
pub use schedule::{Decay, MAX_STEPS, Schedule};

/// An update rule, a learning-rate schedule and weight decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub rule: Rule,
    pub schedule: Schedule,
    /// L2 weight decay (0: none), on the parameters [`Optimizer::decays`] names.
    pub weight_decay: f32,
}

/// How a parameter moves given its gradient `g` (weight decay included) and the step's rate
/// `lr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Rule {
    /// `p -= lr · g`.
    Sgd,
    /// `v = v · momentum + g`; `p -= v · lr`, or with Nesterov
    /// `p -= g · lr + v · momentum · lr` (TF's `ApplyMomentum`).
    Momentum { momentum: f32, nesterov: bool },
    /// `m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²; p -= lr_t · m / (sqrt(v) + eps)` with
    /// `lr_t = lr · sqrt(1 - b2^t) / (1 - b1^t)` at step `t` (from 1).
    Adam { beta1: f32, beta2: f32, epsilon: f32 },
    /// `ms += (g² - ms) · (1 - decay); mom = mom · momentum + g · lr / sqrt(ms + eps);
    /// p -= mom`, `ms` starting at 1 (TF's `ApplyRMSProp`, not centered).
    RmsProp { decay: f32, momentum: f32, epsilon: f32 },
    /// Momentum on the gradient scaled by a per-parameter trust ratio:
    /// `ratio = eta·‖w‖ / (‖g‖ + wd·‖w‖ + eps)` when both norms are positive, else 1;
    /// `v = v · momentum + (g + wd·w) · (lr · ratio)`; `p -= v`. Parameters that do not
    /// decay (batch norm, biases) take `ratio = 1` and no decay, as the ResNet recipe's
    /// `skip_list` does.
    Lars { momentum: f32, eta: f32, epsilon: f32 },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::sgd(0.01)
    }
}

/// State shared by every parameter: Adam's `beta1^t` and `beta2^t` (TF's `beta1_power`,
/// `beta2_power`), each a one-element tensor.
pub const ADAM_POWERS: [&str; 2] = ["optimizer/beta1_power", "optimizer/beta2_power"];

/// The global step a non-constant schedule reads (an integer-valued f32 from 0, one element),
/// advanced by each step.
pub const STEP: &str = "optimizer/step";

fn bad<T>(reason: String) -> Result<T> {
    Err(Error::Graph { graph: "optimizer".into(), reason })
}

impl Optimizer {
    /// `rule` at a constant `learning_rate`, without weight decay.
    pub fn new(rule: Rule, learning_rate: f32) -> Optimizer {
        Optimizer { rule, schedule: Schedule::constant(learning_rate), weight_decay: 0.0 }
    }

    pub fn sgd(learning_rate: f32) -> Optimizer {
        Optimizer::new(Rule::Sgd, learning_rate)
    }

    pub fn momentum(learning_rate: f32, momentum: f32) -> Optimizer {
        Optimizer::new(Rule::Momentum { momentum, nesterov: false }, learning_rate)
    }

    pub fn nesterov(learning_rate: f32, momentum: f32) -> Optimizer {
        Optimizer::new(Rule::Momentum { momentum, nesterov: true }, learning_rate)
    }

    /// TF's defaults: beta1 0.9, beta2 0.999, epsilon 1e-8.
    pub fn adam(learning_rate: f32) -> Optimizer {
        Optimizer::new(Rule::Adam { beta1: 0.9, beta2: 0.999, epsilon: 1e-8 }, learning_rate)
    }

    /// TF's defaults: decay 0.9, momentum 0, epsilon 1e-10.
    pub fn rmsprop(learning_rate: f32) -> Optimizer {
        Optimizer::new(Rule::RmsProp { decay: 0.9, momentum: 0.0, epsilon: 1e-10 }, learning_rate)
    }

    /// `LARSOptimizer`'s defaults: momentum 0.9, eta (`eeta`) 0.001, epsilon 0.
    pub fn lars(learning_rate: f32) -> Optimizer {
        Optimizer::new(Rule::Lars { momentum: 0.9, eta: 0.001, epsilon: 0.0 }, learning_rate)
    }

    pub fn with_schedule(self, schedule: Schedule) -> Optimizer {
        Optimizer { schedule, ..self }
    }

    pub fn with_weight_decay(self, weight_decay: f32) -> Optimizer {
        Optimizer { weight_decay, ..self }
    }

    /// Parses `sgd`, `momentum`, `nesterov`, `adam`, `rmsprop` or `lars` at a constant
    /// learning rate, with TF's defaults for the rest (see the constructors).
    pub fn parse(name: &str, learning_rate: f32) -> Result<Optimizer> {
        let opt = match name {
            "sgd" => Optimizer::sgd(learning_rate),
            "momentum" => Optimizer::momentum(learning_rate, 0.9),
            "nesterov" => Optimizer::nesterov(learning_rate, 0.9),
            "adam" => Optimizer::adam(learning_rate),
            "rmsprop" => Optimizer::rmsprop(learning_rate),
            "lars" => Optimizer::lars(learning_rate),
            other => {
                return bad(format!("unknown optimizer '{other}': use sgd, momentum, nesterov, adam, rmsprop or lars"));
            }
        };
        opt.check()?;
        Ok(opt)
    }

    /// Rejects rates, decays and schedules that cannot train.
    pub fn check(&self) -> Result<()> {
        self.schedule.check()?;
        let wd = self.weight_decay;
        if !wd.is_finite() || wd < 0.0 {
            return bad(format!("weight decay {wd} must be 0 (none) or a positive number"));
        }
        let unit = |x: f32| (0.0..1.0).contains(&x);
        match self.rule {
            Rule::Sgd => Ok(()),
            Rule::Momentum { momentum, .. } if !unit(momentum) => bad(format!("momentum {momentum} must be in [0, 1)")),
            Rule::Adam { beta1, beta2, epsilon }
                if !unit(beta1) || !unit(beta2) || !epsilon.is_finite() || epsilon <= 0.0 =>
            {
                bad(format!("Adam needs beta1 {beta1} and beta2 {beta2} in [0, 1) and epsilon {epsilon} > 0"))
            }
            Rule::RmsProp { decay, momentum, epsilon }
                if !unit(decay) || !unit(momentum) || !epsilon.is_finite() || epsilon <= 0.0 =>
            {
                bad(format!("RMSProp needs decay {decay} and momentum {momentum} in [0, 1) and epsilon {epsilon} > 0"))
            }
            Rule::Lars { momentum, eta, epsilon }
                if !unit(momentum) || !eta.is_finite() || eta <= 0.0 || !epsilon.is_finite() || epsilon < 0.0 =>
            {
                bad(format!("LARS needs momentum {momentum} in [0, 1), eta {eta} > 0 and epsilon {epsilon} >= 0"))
            }
            _ => Ok(()),
        }
    }

    /// The base learning rate (the schedule's peak).
    pub fn learning_rate(&self) -> f32 {
        self.schedule.learning_rate
    }

    pub fn name(&self) -> &'static str {
        match self.rule {
            Rule::Sgd => "sgd",
            Rule::Momentum { nesterov: false, .. } => "momentum",
            Rule::Momentum { nesterov: true, .. } => "nesterov",
            Rule::Adam { .. } => "adam",
            Rule::RmsProp { .. } => "rmsprop",
            Rule::Lars { .. } => "lars",
        }
    }

    /// The per-parameter slots, named `<param>/<slot>`, each of the parameter's shape and
    /// starting at [`Optimizer::slot_initial_value`].
    pub fn slots(&self) -> &'static [&'static str] {
        match self.rule {
            Rule::Sgd => &[],
            Rule::Momentum { .. } | Rule::Lars { .. } => &["momentum"],
            Rule::Adam { .. } => &["m", "v"],
            Rule::RmsProp { .. } => &["rms", "momentum"],
        }
    }

    /// Where a slot starts: RMSProp's mean square at 1 (TF's), everything else at 0.
    pub fn slot_initial_value(&self, slot: &str) -> f32 {
        match (self.rule, slot) {
            (Rule::RmsProp { .. }, "rms") => 1.0,
            _ => 0.0,
        }
    }

    /// Whether weight decay (and LARS's trust ratio) applies to the parameter `param`: all
    /// but batch norm's `gamma` and `beta` and biases, as the TF ResNet recipes exclude them.
    pub fn decays(param: &str) -> bool {
        !matches!(param.rsplit('/').next(), Some("gamma" | "beta" | "bias"))
    }

    /// The weight decay applied to `param`, if any.
    pub fn decay_of(&self, param: &str) -> Option<f32> {
        (self.weight_decay > 0.0 && Self::decays(param)).then_some(self.weight_decay)
    }

    /// Initial values of the shared state: Adam's powers start at `beta1`, `beta2` (step
    /// 1's), then the global step at 0 when the schedule is not constant.
    pub fn initial_state(&self) -> Vec<(&'static str, f32)> {
        let mut state = Vec::new();
        if let Rule::Adam { beta1, beta2, .. } = self.rule {
            state.extend([(ADAM_POWERS[0], beta1), (ADAM_POWERS[1], beta2)]);
        }
        if !self.schedule.is_constant() {
            state.push((STEP, 0.0));
        }
        state
    }

    /// How each shared state value advances after a step (in the order of
    /// [`Optimizer::initial_state`]): the powers times beta, the step plus one.
    pub fn advances(&self) -> Vec<UnaryOp> {
        let mut ops = Vec::new();
        if let Rule::Adam { beta1, beta2, .. } = self.rule {
            ops.extend([UnaryOp::Scale(beta1), UnaryOp::Scale(beta2)]);
        }
        if !self.schedule.is_constant() {
            ops.push(UnaryOp::AddScalar(1.0));
        }
        ops
    }

    /// The shared state after a step.
    pub fn advance(&self, state: &mut [f32]) {
        for (s, op) in state.iter_mut().zip(self.advances()) {
            *s = unary(op, *s);
        }
    }

    /// Where the global step is in the shared state.
    pub fn step_index(&self) -> Option<usize> {
        self.initial_state().iter().position(|(name, _)| *name == STEP)
    }

    /// The step's learning rate, from the shared state.
    pub fn rate(&self, state: &[f32]) -> f32 {
        match self.step_index() {
            Some(i) => self.schedule.program().eval(&[state[i]]),
            None => self.schedule.learning_rate,
        }
    }

    /// Adam's step size for the powers `beta1^t`, `beta2^t`, in f32 as the vector unit
    /// computes it.
    pub fn adam_step_size(learning_rate: f32, beta1_power: f32, beta2_power: f32) -> f32 {
        learning_rate * (1.0 - beta2_power).sqrt() / (1.0 - beta1_power)
    }

    /// LARS's scaled rate `lr · ratio` as a program over the inputs `Σw²`, `Σg²` and `lr`
    /// (TF's order: `eta·‖w‖ / ((‖g‖ + wd·‖w‖) + eps)`).
    pub fn lars_rate(&self) -> Scalars {
        let (eta, epsilon) = match self.rule {
            Rule::Lars { eta, epsilon, .. } => (eta, epsilon),
            _ => (1.0, 0.0),
        };
        let mut s = Scalars::new(3);
        let (wn, gn) = (s.unary(UnaryOp::Sqrt, 0), s.unary(UnaryOp::Sqrt, 1));
        let num = s.unary(UnaryOp::Scale(eta), wn);
        let wd = s.unary(UnaryOp::Scale(self.weight_decay), wn);
        let den = s.binary(BinaryOp::Add, gn, wd);
        let den = s.unary(UnaryOp::AddScalar(epsilon), den);
        let ratio = s.binary(BinaryOp::Div, num, den);
        let both = s.binary(BinaryOp::Min, wn, gn);
        let one = s.one();
        let ratio = s.select(both, ratio, one);
        s.binary(BinaryOp::Mul, 2, ratio);
        s
    }

    /// `Σ x²` of a parameter of `cols` columns in a fixed order, whatever block sizes the
    /// device streams it in: each row summed left to right, then the row sums top to bottom.
    pub fn sum_of_squares(values: &[f32], cols: usize) -> f32 {
        values.chunks(cols.max(1)).map(|row| row.iter().fold(0.0f32, |s, &x| s + x * x)).fold(0.0f32, |s, r| s + r)
    }

    /// One update of the parameter `name` of `shape` with `grad`; `slots` in the order of
    /// [`Optimizer::slots`]; `state` in the order of [`Optimizer::initial_state`] (read only:
    /// advance it once per step, after every parameter, with [`Optimizer::advance`]).
    pub fn apply(
        &self,
        name: &str,
        shape: &[usize],
        param: &mut [f32],
        grad: &[f32],
        slots: &mut [Vec<f32>],
        state: &[f32],
    ) {
        let lr = self.rate(state);
        let wd = self.decay_of(name);
        let decayed = |p: f32, g: f32| match wd {
            Some(wd) => g + wd * p,
            None => g,
        };
        match self.rule {
            Rule::Sgd => {
                for (p, &g) in param.iter_mut().zip(grad) {
                    *p -= lr * decayed(*p, g);
                }
            }
            Rule::Momentum { momentum, nesterov } => {
                for ((p, &g), v) in param.iter_mut().zip(grad).zip(slots[0].iter_mut()) {
                    let g = decayed(*p, g);
                    *v = *v * momentum + g;
                    *p -= if nesterov { g * lr + *v * momentum * lr } else { *v * lr };
                }
            }
            Rule::Adam { beta1, beta2, epsilon } => {
                let step = Self::adam_step_size(lr, state[0], state[1]);
                let (ms, vs) = slots.split_at_mut(1);
                for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(ms[0].iter_mut()).zip(vs[0].iter_mut()) {
                    let g = decayed(*p, g);
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * (g * g);
                    *p -= step * *m / (v.sqrt() + epsilon);
                }
            }
            Rule::RmsProp { decay, momentum, epsilon } => {
                let (ms, moms) = slots.split_at_mut(1);
                for (((p, &g), ms), mom) in param.iter_mut().zip(grad).zip(ms[0].iter_mut()).zip(moms[0].iter_mut()) {
                    let g = decayed(*p, g);
                    *ms += (g * g - *ms) * (1.0 - decay);
                    *mom = *mom * momentum + g * lr / (*ms + epsilon).sqrt();
                    *p -= *mom;
                }
            }
            Rule::Lars { momentum, .. } => {
                let scaled = if Self::decays(name) {
                    let cols = shape.last().copied().unwrap_or(1);
                    let norms = [Self::sum_of_squares(param, cols), Self::sum_of_squares(grad, cols)];
                    self.lars_rate().eval(&[norms[0], norms[1], lr])
                } else {
                    lr
                };
                for ((p, &g), v) in param.iter_mut().zip(grad).zip(slots[0].iter_mut()) {
                    *v = *v * momentum + decayed(*p, g) * scaled;
                    *p -= *v;
                }
            }
        }
    }
}
