//! The f32 CPU reference as a backend: autodiff's training graph run by the reference
//! interpreter, the optimizer's f32 rule — the values a simulated step is checked against.

use std::collections::BTreeMap;

use systolic_compiler::autodiff::{self, Gradients};
use systolic_compiler::graph::Op;
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::{Graph, Tensor, TensorMap};

use super::{Backend, Settings, StepOutput};
use crate::error::{Error, Result};
use crate::session::{self, DROPOUT_STEP};

/// The CPU reference.
pub struct Cpu {
    model: Graph,
    train: Gradients,
    settings: Settings,
    batch: usize,
    /// Every parameter of the model (trainable or not), by name.
    params: TensorMap,
    /// Each trainable parameter's slots, in the optimizer's order.
    slots: BTreeMap<String, Vec<Vec<f32>>>,
    /// The optimizer's shared state (Adam's powers, a schedule's global step).
    shared: Vec<f32>,
    /// Training steps taken (dropout draws each step's mask from it).
    step: u64,
    dropout: bool,
}

impl Cpu {
    pub fn new(model: &Graph, state: TensorMap, batch: usize, settings: Settings) -> Result<Cpu> {
        settings.optimizer.check()?;
        let train = autodiff::training_graph(model, settings.label_smoothing)?;
        let mut params = TensorMap::new();
        for id in model.parameters() {
            let node = model.node(id);
            let t = session::state_tensor(&state, &node.name, &node.shape.dims)?;
            // Standard layout: the optimizer updates parameters as flat slices.
            params.insert(node.name.clone(), t.as_standard_layout().into_owned());
        }
        // Slots for the parameters the loss reaches: one it does not reach is never updated (as
        // on a TPU, whose compiled step has no update and no slots for it).
        let mut slots = BTreeMap::new();
        for id in model.trainable_parameters() {
            let name = &model.node(id).name;
            if train.unconnected.contains(name) {
                continue;
            }
            let len = params[name].len();
            let values = settings
                .optimizer
                .slots()
                .iter()
                .map(|s| {
                    let start = settings.optimizer.slot_initial_value(s);
                    state.get(&format!("{name}/{s}")).map_or(vec![start; len], |t| t.iter().copied().collect())
                })
                .collect();
            slots.insert(name.clone(), values);
        }
        let shared = settings
            .optimizer
            .initial_state()
            .into_iter()
            .map(|(name, init)| state.get(name).and_then(|t| t.iter().next().copied()).unwrap_or(init))
            .collect();
        let dropout = model.nodes().any(|(_, n)| matches!(&n.op, Op::Dropout(d) if d.rate > 0.0));
        let step = state.get(DROPOUT_STEP).and_then(|t| t.iter().next().copied()).unwrap_or(0.0) as u64;
        Ok(Cpu { model: model.clone(), train, settings, batch, params, slots, shared, step, dropout })
    }

    /// The parameters and `batch`'s tensors, as the reference binds them.
    fn bindings(&self, batch: &TensorMap) -> Result<TensorMap> {
        let mut b = self.params.clone();
        for (name, t) in session::inputs(&self.model, batch, self.batch)? {
            b.insert(name, t.clone());
        }
        Ok(b)
    }
}

impl Backend for Cpu {
    fn describe(&self) -> String {
        "the f32 CPU reference".into()
    }

    fn batch(&self) -> usize {
        self.batch
    }

    fn train_step(&mut self, batch: &TensorMap) -> Result<StepOutput> {
        let mut b = self.bindings(batch)?;
        for (name, t) in batch {
            // The labels (integer class ids), which only the training graph reads.
            if self.train.graph.find(name).is_some() && !b.contains_key(name) {
                b.insert(name.clone(), t.clone());
            }
        }
        let out = reference::run_gradients(&self.train, &b, RunOptions::training(self.step))?;
        let opt = &self.settings.optimizer;
        let mut outputs = TensorMap::new();
        // A parameter the loss does not reach has a zero gradient and, like a TPU step (which
        // has no update for it) and TensorFlow's optimizers (which skip a variable without a
        // gradient), no update: weight decay and momentum leave it as it is.
        for name in self.train.unconnected.iter().filter(|n| self.params.contains_key(*n)) {
            if let Some(g) = out.grads.get(name) {
                outputs.insert(session::grad_name(name), g.clone());
            }
        }
        for (name, slots) in &mut self.slots {
            let Some(g) = out.grads.get(name) else { continue };
            outputs.insert(session::grad_name(name), g.clone());
            let grad: Vec<f32> = g.iter().copied().collect();
            let p = self.params.get_mut(name).expect("every trainable parameter is held");
            let shape = p.shape().to_vec();
            let values = p.as_slice_mut().expect("parameters are contiguous");
            opt.apply(name, &shape, values, &grad, slots, &self.shared);
        }
        // The reference refuses non-finite parameters, so a diverging update is reported
        // here, naming the parameter, rather than as the next step's bad binding.
        for (name, p) in &self.params {
            if let Some(&value) = p.iter().find(|v| !v.is_finite()) {
                return Err(Error::NonFiniteState { tensor: name.clone(), value });
            }
        }
        opt.advance(&mut self.shared);
        self.params.extend(out.updates);
        self.step += 1;
        Ok(StepOutput { loss: out.root.iter().next().copied(), outputs, simulated_seconds: None })
    }

    fn predict(&mut self, batch: &TensorMap) -> Result<StepOutput> {
        let (outputs, _) = reference::run_outputs(&self.model, &self.bindings(batch)?, RunOptions::default())?;
        Ok(StepOutput { loss: None, outputs, simulated_seconds: None })
    }

    fn state_shapes(&mut self) -> Result<BTreeMap<String, Vec<usize>>> {
        // Shapes only: the state's own tensors, without copying values.
        let mut shapes: BTreeMap<String, Vec<usize>> =
            self.params.iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect();
        for name in self.slots.keys() {
            let shape = self.params[name].shape().to_vec();
            for slot in self.settings.optimizer.slots() {
                shapes.insert(format!("{name}/{slot}"), shape.clone());
            }
        }
        for (name, _) in self.settings.optimizer.initial_state() {
            shapes.insert(name.to_string(), vec![1]);
        }
        if self.dropout {
            shapes.insert(DROPOUT_STEP.into(), vec![1]);
        }
        Ok(shapes)
    }

    fn state(&mut self) -> Result<TensorMap> {
        let mut state = self.params.clone();
        for (name, slots) in &self.slots {
            let shape = self.params[name].shape().to_vec();
            for (slot, values) in self.settings.optimizer.slots().iter().zip(slots) {
                let t =
                    Tensor::from_shape_vec(shape.clone(), values.clone()).expect("a slot has its parameter's shape");
                state.insert(format!("{name}/{slot}"), t);
            }
        }
        for ((name, _), &v) in self.settings.optimizer.initial_state().iter().zip(&self.shared) {
            state.insert(name.to_string(), session::scalar(v));
        }
        if self.dropout {
            state.insert(DROPOUT_STEP.into(), session::scalar(self.step as f32));
        }
        Ok(state)
    }
}
