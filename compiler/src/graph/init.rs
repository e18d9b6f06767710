//! Parameter initialisation, deterministic from a seed.
//!
//! Each parameter draws from its own stream keyed by `(seed, name)`, so adding a layer does not
//! change the values of the others, and values do not depend on thread count.

use rayon::prelude::*;

use super::op::{Init, Op};
use super::{Graph, NodeId};
use crate::rng;
use crate::tensors::{Tensor, TensorMap};

/// Stddev correction of a standard normal truncated at ±2σ (Keras' `VarianceScaling`).
const TRUNCATED_STDDEV: f32 = 0.879_625_7;

/// Fan-in and fan-out of a weight shape: HWIO kernels `[kh, kw, in, out]`, dense `[in, out]`.
pub fn fans(shape: &[usize]) -> (f32, f32) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f32, *n as f32),
        [i, o] => (*i as f32, *o as f32),
        _ => {
            let receptive: usize = shape[..shape.len() - 2].iter().product();
            let (i, o) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            ((receptive * i) as f32, (receptive * o) as f32)
        }
    }
}

impl Init {
    /// Draws `numel(shape)` values for a parameter whose stream key is `key`.
    pub fn sample(&self, shape: &[usize], key: u64) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let (fan_in, fan_out) = fans(shape);
        let uniform = |low: f32, high: f32| -> Vec<f32> {
            (0..n).into_par_iter().map(|i| low + (high - low) * rng::uniform(key, i as u64)).collect()
        };
        let truncated = |stddev: f32| -> Vec<f32> {
            (0..n).into_par_iter().map(|i| stddev * rng::truncated_normal(key, i as u64)).collect()
        };
        match *self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Constant(c) => vec![c; n],
            Init::Uniform { low, high } => uniform(low, high),
            Init::Normal { mean, stddev } => {
                (0..n).into_par_iter().map(|i| mean + stddev * rng::normal(key, i as u64)).collect()
            }
            Init::GlorotUniform => {
                let limit = (6.0 / (fan_in + fan_out)).sqrt();
                uniform(-limit, limit)
            }
            Init::HeUniform => {
                let limit = (6.0 / fan_in).sqrt();
                uniform(-limit, limit)
            }
            Init::GlorotNormal => truncated((2.0 / (fan_in + fan_out)).sqrt() / TRUNCATED_STDDEV),
            Init::HeNormal => truncated((2.0 / fan_in).sqrt() / TRUNCATED_STDDEV),
        }
    }
}

impl Graph {
    /// Initial values of every parameter (trainable or not), from `seed`.
    pub fn init_parameters(&self, seed: u64) -> TensorMap {
        let mut out = TensorMap::new();
        for id in self.parameters() {
            if let Some(tensor) = self.init_parameter(id, seed) {
                out.insert(self.node(id).name.clone(), tensor);
            }
        }
        out
    }

    /// The initial value of one parameter (None if `id` is not a Parameter).
    pub fn init_parameter(&self, id: NodeId, seed: u64) -> Option<Tensor> {
        let node = self.node(id);
        let Op::Parameter(p) = &node.op else { return None };
        let key = rng::derive(seed, rng::hash_str(&node.name));
        let data = p.init.sample(&p.shape, key);
        Some(Tensor::from_shape_vec(p.shape.clone(), data).expect("sample returns numel values"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fans_follow_keras() {
        assert_eq!(fans(&[3, 3, 16, 32]), (144.0, 288.0));
        assert_eq!(fans(&[300, 10]), (300.0, 10.0));
    }

    #[test]
    fn he_normal_has_the_he_variance() {
        let shape = [3, 3, 64, 64];
        let v = Init::HeNormal.sample(&shape, 11);
        let var = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        let want = 2.0 / (9.0 * 64.0);
        assert!((var / want - 1.0).abs() < 0.03, "variance {var}, want {want}");
    }

    #[test]
    fn glorot_uniform_respects_its_limit() {
        let v = Init::GlorotUniform.sample(&[100, 50], 5);
        let limit = (6.0f32 / 150.0).sqrt();
        assert!(v.iter().all(|x| x.abs() <= limit));
        assert!(v.iter().any(|x| x.abs() > 0.9 * limit));
    }
}
