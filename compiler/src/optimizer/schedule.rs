//! Learning-rate schedules: the rate as a function of the global step `t` (from 0), as
//! TensorFlow's recipes build it — an optional linear warm-up, then a constant rate, step
//! decay (`piecewise_constant`), polynomial decay (`polynomial_decay`) or cosine decay
//! (`cosine_decay`), each a function of the global step with the warm-up taking its place
//! for `t < warmup`.
//!
//! The rate is a [`Scalars`] program over the step: [`Schedule::rate`] evaluates it, and the
//! lowering emits it, so the device computes the reference's bits every step.

use std::fmt;

use serde::{Deserialize, Serialize};
use systolic_simulator::isa::{BinaryOp, UnaryOp};

use crate::error::{Error, Result};
use crate::optimizer::scalars::{Reg, Scalars};

/// Step counts a schedule may name: the step is an f32 on the device, exact up to 2^24.
pub const MAX_STEPS: u64 = 1 << 24;

/// The learning rate at each step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The base rate: the constant rate, the peak of the warm-up, the start of the decay.
    pub learning_rate: f32,
    /// Steps of linear warm-up: `lr · t / warmup` for `t < warmup` (TensorFlow's ResNet and
    /// BERT recipes: the first step's rate is 0).
    pub warmup: u64,
    pub decay: Decay,
}

/// What follows the warm-up, as a function of the global step `t`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Decay {
    /// `lr`.
    Constant,
    /// `lr · factor^k`, `k` the boundaries at or below `t`.
    Step { boundaries: Vec<u64>, factor: f32 },
    /// `(lr - end) · (1 - min(t, steps) / steps)^power + end`.
    Polynomial { steps: u64, end: f32, power: f32 },
    /// `lr · ((1 - alpha) · 0.5 · (1 + cos(π · min(t, steps) / steps)) + alpha)`.
    Cosine { steps: u64, alpha: f32 },
}

fn bad<T>(reason: String) -> Result<T> {
    Err(Error::Graph { graph: "optimizer".into(), reason })
}

const SYNTAX: &str = "use constant, warmup=N, step=B1/B2/...[,factor=F], poly=N[,end=F][,power=F] or \
                      cosine=N[,alpha=F], a decay optionally after warmup=N \
                      (e.g. warmup=500,step=3000/6000/8000,factor=0.1)";

impl Schedule {
    pub fn constant(learning_rate: f32) -> Schedule {
        Schedule { learning_rate, warmup: 0, decay: Decay::Constant }
    }

    /// The same rate at every step (no step count needed on the device).
    pub fn is_constant(&self) -> bool {
        self.warmup == 0 && self.decay == Decay::Constant
    }

    /// Parses a command line's schedule for base rate `learning_rate`: `constant`,
    /// `warmup=N` (then constant), or a decay — `step=B1/B2/...` with `factor=F` (0.1),
    /// `poly=N` with `end=F` (0.0001, TF's) and `power=F` (1), `cosine=N` with `alpha=F` (0)
    /// — optionally with `warmup=N`, comma-separated.
    pub fn parse(spec: &str, learning_rate: f32) -> Result<Schedule> {
        let spec = spec.trim();
        if spec == "constant" {
            let s = Schedule::constant(learning_rate);
            s.check()?;
            return Ok(s);
        }
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for field in spec.split(',').map(str::trim) {
            let Some((key, value)) = field.split_once('=') else {
                return bad(format!("schedule '{spec}': '{field}' is not key=value: {SYNTAX}"));
            };
            let key = key.trim();
            if !["warmup", "step", "factor", "poly", "end", "power", "cosine", "alpha"].contains(&key) {
                return bad(format!("schedule '{spec}': unknown key '{key}': {SYNTAX}"));
            }
            if fields.iter().any(|(k, _)| *k == key) {
                return bad(format!("schedule '{spec}': {key} is given twice: give it once"));
            }
            fields.push((key, value.trim()));
        }
        let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let steps = |key: &str, v: &str| -> Result<u64> {
            v.parse::<u64>().or_else(|_| bad(format!("schedule '{spec}': {key}={v} is not a whole number of steps")))
        };
        let number = |key: &str, default: f32| -> Result<f32> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.parse::<f32>().or_else(|_| bad(format!("schedule '{spec}': {key}={v} is not a number"))),
            }
        };
        let decays: Vec<&str> = ["step", "poly", "cosine"].into_iter().filter(|k| get(k).is_some()).collect();
        if decays.len() > 1 {
            return bad(format!("schedule '{spec}': {} each set a decay: give one", decays.join(" and ")));
        }
        let kind = decays.first().copied();
        for (key, owner) in [("factor", "step"), ("end", "poly"), ("power", "poly"), ("alpha", "cosine")] {
            if get(key).is_some() && kind != Some(owner) {
                return bad(format!("schedule '{spec}': {key} belongs to {owner}=...: add that decay or drop {key}"));
            }
        }
        let decay = match kind {
            None => Decay::Constant,
            Some("step") => {
                let list = get("step").unwrap_or_default();
                let boundaries = list.split('/').map(|b| steps("step", b.trim())).collect::<Result<Vec<u64>>>()?;
                Decay::Step { boundaries, factor: number("factor", 0.1)? }
            }
            Some("poly") => Decay::Polynomial {
                steps: steps("poly", get("poly").unwrap_or_default())?,
                end: number("end", 0.0001)?,
                power: number("power", 1.0)?,
            },
            Some(_) => Decay::Cosine {
                steps: steps("cosine", get("cosine").unwrap_or_default())?,
                alpha: number("alpha", 0.0)?,
            },
        };
        let warmup = match get("warmup") {
            Some(v) => steps("warmup", v)?,
            None => 0,
        };
        if warmup == 0 && decay == Decay::Constant {
            return bad(format!("schedule '{spec}': no warm-up and no decay: {SYNTAX}"));
        }
        let s = Schedule { learning_rate, warmup, decay };
        s.check()?;
        Ok(s)
    }

    /// Rejects schedules that cannot train or that the device cannot count.
    pub fn check(&self) -> Result<()> {
        let lr = self.learning_rate;
        if !lr.is_finite() || lr <= 0.0 {
            return bad(format!("learning rate {lr} must be a positive number"));
        }
        let w = self.warmup;
        let within = |what: &str, n: u64| -> Result<()> {
            if n > MAX_STEPS {
                return bad(format!(
                    "{what} {n} is past step {MAX_STEPS} (2^24, the last step an f32 counts exactly): give fewer steps"
                ));
            }
            if n == 0 {
                return bad(format!("{what} 0 steps: give at least 1"));
            }
            if n <= w {
                return bad(format!("{what} {n} falls within the {w}-step warm-up: give a step after it"));
            }
            Ok(())
        };
        if w > MAX_STEPS {
            return bad(format!("warm-up of {w} steps is past step {MAX_STEPS} (2^24): give fewer steps"));
        }
        match &self.decay {
            Decay::Constant => Ok(()),
            Decay::Step { boundaries, factor } => {
                if boundaries.is_empty() {
                    return bad("step decay needs at least one boundary: step=B1/B2/...".into());
                }
                for pair in boundaries.windows(2) {
                    if pair[1] <= pair[0] {
                        return bad(format!("step boundaries {} then {} must increase", pair[0], pair[1]));
                    }
                }
                boundaries.iter().try_for_each(|&b| within("step boundary", b))?;
                if !factor.is_finite() || *factor <= 0.0 {
                    return bad(format!("step decay factor {factor} must be a positive number (0.1: a tenth)"));
                }
                Ok(())
            }
            Decay::Polynomial { steps, end, power } => {
                within("polynomial decay over", *steps)?;
                if !end.is_finite() || *end < 0.0 {
                    return bad(format!("polynomial decay's end rate {end} must be 0 or more"));
                }
                if !power.is_finite() || *power <= 0.0 {
                    return bad(format!("polynomial decay's power {power} must be a positive number"));
                }
                Ok(())
            }
            Decay::Cosine { steps, alpha } => {
                within("cosine decay over", *steps)?;
                if !(0.0..=1.0).contains(alpha) {
                    return bad(format!(
                        "cosine decay's alpha {alpha} (the final fraction of the rate) must be in [0, 1]"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The rate as a program over one input, the step (an integer-valued f32).
    pub fn program(&self) -> Scalars {
        let lr = self.learning_rate;
        let mut s = Scalars::new(1);
        let t = 0;
        let decayed = match &self.decay {
            Decay::Constant => s.fill(lr),
            Decay::Step { boundaries, factor } => {
                let (mut rate, mut value) = (s.fill(lr), lr);
                for &b in boundaries {
                    value *= factor;
                    // t ≥ b ⟺ t + 1 - b > 0 (integers below 2^24: exact).
                    let past = s.unary(UnaryOp::AddScalar(1.0 - b as f32), t);
                    let v = s.fill(value);
                    rate = s.select(past, v, rate);
                }
                rate
            }
            Decay::Polynomial { steps, end, power } => {
                let done = fraction_done(&mut s, t, *steps);
                let left = s.subtract_from(1.0, done);
                // q^power as exp(power · ln q); ln 0 = -inf gives exactly 0.
                let q = if *power == 1.0 {
                    left
                } else {
                    let l = s.unary(UnaryOp::Log, left);
                    let p = s.unary(UnaryOp::Scale(*power), l);
                    s.unary(UnaryOp::Exp, p)
                };
                let scaled = s.unary(UnaryOp::Scale(lr - end), q);
                s.unary(UnaryOp::AddScalar(*end), scaled)
            }
            Decay::Cosine { steps, alpha } => {
                let done = fraction_done(&mut s, t, *steps);
                let x = s.unary(UnaryOp::Scale(std::f32::consts::PI), done);
                let c = s.unary(UnaryOp::Cos, x);
                let c = s.unary(UnaryOp::AddScalar(1.0), c);
                let c = s.unary(UnaryOp::Scale(0.5), c);
                let c = s.unary(UnaryOp::Scale(1.0 - alpha), c);
                let c = s.unary(UnaryOp::AddScalar(*alpha), c);
                s.unary(UnaryOp::Scale(lr), c)
            }
        };
        if self.warmup == 0 {
            return s;
        }
        let w = s.fill(self.warmup as f32);
        let done = s.binary(BinaryOp::Div, t, w);
        let warm = s.unary(UnaryOp::Scale(lr), done);
        // t < warmup ⟺ warmup - t > 0.
        let warming = s.subtract_from(self.warmup as f32, t);
        s.select(warming, warm, decayed);
        s
    }

    /// The rate at `step` (from 0), in the f32 operations the device performs.
    pub fn rate(&self, step: u64) -> f32 {
        self.program().eval(&[step as f32])
    }
}

/// `min(t, steps) / steps`: how much of the decay is done.
fn fraction_done(s: &mut Scalars, t: Reg, steps: u64) -> Reg {
    let d = s.fill(steps as f32);
    let tc = s.binary(BinaryOp::Min, t, d);
    s.binary(BinaryOp::Div, tc, d)
}

/// The command line's spelling (what [`Schedule::parse`] reads back).
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut fields = Vec::new();
        if self.warmup > 0 {
            fields.push(format!("warmup={}", self.warmup));
        }
        match &self.decay {
            Decay::Constant if self.warmup == 0 => fields.push("constant".into()),
            Decay::Constant => {}
            Decay::Step { boundaries, factor } => {
                let b: Vec<String> = boundaries.iter().map(u64::to_string).collect();
                fields.push(format!("step={},factor={factor}", b.join("/")));
            }
            Decay::Polynomial { steps, end, power } => fields.push(format!("poly={steps},end={end},power={power}")),
            Decay::Cosine { steps, alpha } => fields.push(format!("cosine={steps},alpha={alpha}")),
        }
        f.write_str(&fields.join(","))
    }
}
