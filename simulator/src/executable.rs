//! An executable: a core program plus where the tensors the host exchanges live in HBM.
//!
//! Compilers produce executables; the functional engine loads tensors into their HBM tiles,
//! runs the program and reads results back; the timing engine runs the same program on the
//! clock. Tensors are row-major; each is seen as a 2-D tile (all but the last dimension
//! flattened into rows).

use serde::{Deserialize, Serialize};

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::functional::Functional;
use crate::host::{self, Need, format_bytes};
use crate::isa::{Program, Tile};

/// Output values by binding name, as the host reads them back.
pub type Outputs = Vec<(String, Vec<f32>)>;

/// What a bound tensor is to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Written by the host before the run (images, labels).
    Input,
    /// Written by the host before the run and possibly updated by it (weights, statistics).
    Parameter,
    /// Read by the host after the run.
    Output,
}

/// A named tensor's place in HBM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    pub role: Role,
    /// The tensor's logical shape (row-major).
    pub shape: Vec<usize>,
    pub tile: Tile,
}

/// A program and its bindings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Executable {
    pub name: String,
    pub program: Program,
    pub bindings: Vec<Binding>,
    /// Bytes of HBM the executable uses at its peak (all buffers, by liveness).
    pub hbm_peak_bytes: u64,
    /// How far the program and its bindings reach into (HBM, VMEM): what the functional
    /// engine holds on the host per core ([`crate::functional::footprint`]).
    pub footprint: (u64, u64),
}

impl Executable {
    /// An executable; measures the program's footprint.
    pub fn new(name: impl Into<String>, program: Program, bindings: Vec<Binding>, hbm_peak_bytes: u64) -> Executable {
        let footprint = crate::functional::footprint(&program, bindings.iter().map(|b| &b.tile));
        Executable { name: name.into(), program, bindings, hbm_peak_bytes, footprint }
    }

    /// What running this executable's values on `cores` functional cores holds on the host:
    /// each core's HBM and VMEM as far as the program reaches, and the outputs read back.
    pub fn memory_need(&self, cores: usize) -> Need {
        let (hbm, vmem) = self.footprint;
        let outputs: u64 = self
            .bindings
            .iter()
            .filter(|b| b.role == Role::Output)
            .map(|b| b.shape.iter().product::<usize>() as u64 * 4)
            .sum();
        let cores_u = cores as u64;
        let mut parts = vec![
            (format!("HBM {} x {cores}", format_bytes(hbm)), hbm * cores_u),
            (format!("VMEM {} x {cores}", format_bytes(vmem)), vmem * cores_u),
            (format!("outputs read back {} x {cores}", format_bytes(outputs)), outputs * cores_u),
        ];
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        Need {
            what: format!(
                "the functional engine running '{}' on {cores} core{}",
                self.name,
                if cores == 1 { "" } else { "s" }
            ),
            bytes: (hbm + vmem + outputs) * cores_u,
            parts,
            lower: "lower the batch per core (HBM and the outputs grow with it) or the number of cores".into(),
        }
    }

    /// A fresh functional core for this executable, after checking that the host can hold it,
    /// its memories sized once.
    pub fn core(&self, machine: &Machine) -> Result<Functional> {
        host::check(self.memory_need(1))?;
        let mut core = Functional::new(machine);
        core.reserve(self.footprint);
        Ok(core)
    }

    pub fn binding(&self, name: &str, role: Role) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.name == name && b.role == role)
    }

    /// Loads `tensors` (name, values) into a fresh core, runs the program and returns every
    /// output by name. Missing or mis-sized inputs are errors naming the tensor.
    pub fn run<'a>(&self, machine: &Machine, tensors: impl Fn(&str) -> Option<&'a [f32]>) -> Result<Outputs> {
        Ok(self.run_with(machine, tensors, false)?.0)
    }

    /// As [`Self::run`], also returning the host time per instruction kind.
    pub fn run_profiled<'a>(
        &self,
        machine: &Machine,
        tensors: impl Fn(&str) -> Option<&'a [f32]>,
    ) -> Result<(Outputs, crate::functional::Profile)> {
        self.run_with(machine, tensors, true)
    }

    fn run_with<'a>(
        &self,
        machine: &Machine,
        tensors: impl Fn(&str) -> Option<&'a [f32]>,
        profile: bool,
    ) -> Result<(Outputs, crate::functional::Profile)> {
        let mut core = self.core(machine)?;
        if profile {
            core.enable_profile();
        }
        self.load(&mut core, tensors)?;
        core.run(&self.program)?;
        Ok((self.outputs(&mut core)?, core.profile()))
    }

    /// Writes every input and parameter from `tensors` into `core`'s HBM.
    pub fn load<'a>(&self, core: &mut Functional, tensors: impl Fn(&str) -> Option<&'a [f32]>) -> Result<()> {
        for b in self.bindings.iter().filter(|b| b.role != Role::Output) {
            let values = tensors(&b.name).ok_or_else(|| Error::Data(format!("tensor '{}' is not given", b.name)))?;
            let want: usize = b.shape.iter().product();
            if values.len() != want {
                return Err(Error::Data(format!(
                    "tensor '{}' has {} values but its shape {:?} holds {want}",
                    b.name,
                    values.len(),
                    b.shape
                )));
            }
            core.write(b.tile, values)?;
        }
        Ok(())
    }

    /// Bytes the host sends for one step: every input's (images, one-hot labels), as stored.
    pub fn input_bytes(&self) -> u64 {
        self.bindings.iter().filter(|b| b.role == Role::Input).map(|b| b.tile.bytes()).sum()
    }

    /// Reads every output from `core`'s HBM, by name.
    pub fn outputs(&self, core: &mut Functional) -> Result<Outputs> {
        self.bindings
            .iter()
            .filter(|b| b.role == Role::Output)
            .map(|b| Ok((b.name.clone(), core.read(b.tile)?)))
            .collect()
    }
}
