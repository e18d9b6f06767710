//! Machine presets named like Cloud TPU slices: `v2-8` … `v2-512`, `v3-8` … `v3-2048`,
//! `v4-8` … `v4-8192` (the number counts TensorCores, two per chip).
//!
//! Every figure of a generation lives in one data file, `presets/<generation>.ron`, beside its
//! source: array size, MXUs per core, VMEM, vector unit, DMA, cores per chip, clock, HBM size
//! and bandwidth, ICI links, bandwidth and latency, host link, and the slices (torus shapes).
//! A new generation is one more file in [`GENERATIONS`]; a user's own chip is a machine file
//! (`systolic machines v3-8 --ron > mine.ron`, edited, loaded with `--machine mine.ron`).
//!
//! Sources (keys used in the data files, [`Machine::sources`] and `docs/machines.md`):
//! - ISCA17: Jouppi et al., "In-Datacenter Performance Analysis of a Tensor Processing Unit", ISCA 2017.
//! - HC20: Norrie & Patil, "Google's Training Chips Revealed: TPUv2 and TPUv3", Hot Chips 2020.
//! - CACM20: Jouppi et al., "A Domain-Specific Supercomputer for Training Deep Neural Networks", CACM 2020.
//! - JAX: jax-ml/jax `jax/_src/pallas/mosaic/tpu_info.py` (per-TensorCore figures).
//! - SB: the JAX "How to Scale Your Model" (scaling book) chapter on TPUs.
//! - GC: Cloud TPU documentation (v2, v3, v4, system architecture, performance guide).
//!
//! A figure marked "assumption" has no public source; the reason for the value is given. One
//! entry, `core.mxu.timing`, is a model choice (marked "model: ..."), not a hardware figure.
//! The only figures a preset derives rather than copies are the per-core HBM size and
//! bandwidth: the chip's, split over its cores (bandwidth per core clock cycle).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;

use super::*;

/// The generation data files, compiled in: (file name, RON text).
pub const GENERATIONS: [(&str, &str); 3] = [
    ("v2.ron", include_str!("presets/v2.ron")),
    ("v3.ron", include_str!("presets/v3.ron")),
    ("v4.ron", include_str!("presets/v4.ron")),
];

/// One figure and where it comes from (a source key and the fact, or "assumption: <reason>").
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure<T> {
    pub value: T,
    pub source: String,
}

/// One TPU generation: every figure of its cores, chips, hosts and slices, with sources.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// The preset prefix (`v3`): slices are named `v3-<cores>`.
    pub name: String,
    pub core: CoreFigures,
    pub chip: ChipFigures,
    pub host: HostFigures,
    /// The slices offered as presets; the source covers their torus shapes and wraparound.
    pub slices: Figure<Vec<SliceShape>>,
}

/// Per TensorCore (the fields of [`Core`] except HBM, which is a chip figure).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreFigures {
    pub clock_hz: Figure<f64>,
    pub mxu: MxuFigures,
    pub vmem_bytes: Figure<u64>,
    pub vpu: VpuFigures,
    pub dma: DmaFigures,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MxuFigures {
    pub count: Figure<usize>,
    pub rows: Figure<usize>,
    pub cols: Figure<usize>,
    pub weight_double_buffering: Figure<bool>,
    /// A model choice rather than a published figure: its source names the model.
    pub timing: Figure<MxuTiming>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpuFigures {
    pub lanes: Figure<usize>,
    pub sublanes: Figure<usize>,
    pub alus: Figure<usize>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaFigures {
    pub engines: Figure<usize>,
    pub latency_cycles: Figure<u64>,
}

/// Per chip.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChipFigures {
    pub cores: Figure<usize>,
    pub hbm: HbmFigures,
    pub ici: IciFigures,
}

/// The chip's HBM, shared evenly by its cores.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbmFigures {
    pub bytes: Figure<u64>,
    pub bytes_per_second: Figure<f64>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IciFigures {
    pub links: Figure<usize>,
    pub bytes_per_second: Figure<f64>,
    pub latency_seconds: Figure<f64>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFigures {
    pub chips: Figure<usize>,
    pub pcie_bytes_per_second: Figure<f64>,
}

/// One slice: its TensorCores (the preset's number) and its chips' torus.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceShape {
    pub cores: usize,
    pub torus: Vec<usize>,
    pub wraparound: Vec<bool>,
}

impl Generation {
    /// Parses a generation file; `file` names it in the error (file:line:col).
    pub fn from_ron(file: &str, text: &str) -> Result<Generation> {
        ron::from_str(text).map_err(|e| Error::ConfigFile {
            path: file.into(),
            line: e.span.start.line,
            col: e.span.start.col,
            reason: e.code.to_string(),
        })
    }

    /// The preset for `slice`, named `<generation>-<cores>`, with every figure's source.
    pub fn machine(&self, slice: &SliceShape) -> Machine {
        let (c, chip, host) = (&self.core, &self.chip, &self.host);
        let mut s = Cited::default();
        let cores = s.take("chip.cores", &chip.cores);
        let clock = s.take("core.clock_hz", &c.clock_hz);
        // HBM is a chip figure: each core gets its share, bandwidth per core clock cycle.
        let hbm = &chip.hbm;
        let hbm = Hbm {
            bytes: s.take("core.hbm.bytes", &hbm.bytes) / cores as u64,
            bytes_per_cycle: hbm.bytes_per_second.value / cores as f64 / clock,
        };
        s.cite(
            "core.hbm.bytes_per_cycle",
            format!(
                "derived: {} GB/s per chip / {cores} cores / {} MHz ({})",
                chip.hbm.bytes_per_second.value / 1e9,
                clock / 1e6,
                chip.hbm.bytes_per_second.source
            ),
        );
        s.cite("slice.torus", self.slices.source.clone());
        s.cite("slice.wraparound", self.slices.source.clone());
        Machine {
            name: format!("{}-{}", self.name, slice.cores),
            core: Core {
                clock_hz: clock,
                mxu: Mxu {
                    count: s.take("core.mxu.count", &c.mxu.count),
                    rows: s.take("core.mxu.rows", &c.mxu.rows),
                    cols: s.take("core.mxu.cols", &c.mxu.cols),
                    weight_double_buffering: s.take("core.mxu.weight_double_buffering", &c.mxu.weight_double_buffering),
                    timing: s.take("core.mxu.timing", &c.mxu.timing),
                },
                vmem_bytes: s.take("core.vmem_bytes", &c.vmem_bytes),
                vpu: Vpu {
                    lanes: s.take("core.vpu.lanes", &c.vpu.lanes),
                    sublanes: s.take("core.vpu.sublanes", &c.vpu.sublanes),
                    alus: s.take("core.vpu.alus", &c.vpu.alus),
                },
                hbm,
                dma: Dma {
                    engines: s.take("core.dma.engines", &c.dma.engines),
                    latency_cycles: s.take("core.dma.latency_cycles", &c.dma.latency_cycles),
                },
            },
            chip: Chip {
                cores,
                ici: Ici {
                    links: s.take("chip.ici.links", &chip.ici.links),
                    bytes_per_second: s.take("chip.ici.bytes_per_second", &chip.ici.bytes_per_second),
                    latency_seconds: s.take("chip.ici.latency_seconds", &chip.ici.latency_seconds),
                },
            },
            host: Host {
                chips: s.take("host.chips", &host.chips),
                pcie_bytes_per_second: s.take("host.pcie_bytes_per_second", &host.pcie_bytes_per_second),
            },
            slice: Slice {
                torus: slice.torus.clone(),
                wraparound: slice.wraparound.clone(),
                links: Vec::new(),
                slow_chips: Vec::new(),
            },
            sources: s.0,
        }
    }
}

/// Sources by machine field path, collected as a preset reads its figures.
#[derive(Default)]
struct Cited(BTreeMap<String, String>);

impl Cited {
    /// The figure's value, its source recorded under `field`.
    fn take<T: Clone>(&mut self, field: &str, figure: &Figure<T>) -> T {
        self.cite(field, figure.source.clone());
        figure.value.clone()
    }

    fn cite(&mut self, field: &str, source: String) {
        self.0.insert(field.to_string(), source);
    }
}

/// The generations of [`GENERATIONS`], parsed once. The files are compiled in and tested, so
/// a parse error is a bug in this crate; the panic names the file, line and column.
pub fn generations() -> &'static [Generation] {
    static PARSED: LazyLock<Vec<Generation>> = LazyLock::new(|| {
        GENERATIONS
            .iter()
            .map(|(file, text)| {
                Generation::from_ron(&format!("simulator/src/config/presets/{file}"), text)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    });
    &PARSED
}

/// Every preset name, in order.
pub fn names() -> Vec<String> {
    generations().iter().flat_map(|g| g.slices.value.iter().map(move |s| format!("{}-{}", g.name, s.cores))).collect()
}

/// The preset called `name` (`v3-32`), or an error that lists the presets.
pub fn preset(name: &str) -> Result<Machine> {
    for generation in generations() {
        for slice in &generation.slices.value {
            if name == format!("{}-{}", generation.name, slice.cores) {
                return Ok(generation.machine(slice));
            }
        }
    }
    Err(Error::UnknownMachine { name: name.to_string(), known: names() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_bf16_per_chip_matches_the_published_figures() {
        let tflops = |name: &str| preset(name).unwrap().chip_peak_flops() / 1e12;
        assert!((tflops("v2-8") - 45.9).abs() < 0.05, "{}", tflops("v2-8"));
        assert!((tflops("v3-8") - 123.2).abs() < 0.05, "{}", tflops("v3-8"));
        assert!((tflops("v4-8") - 275.3).abs() < 0.05, "{}", tflops("v4-8"));
    }

    #[test]
    fn generation_files_parse_and_errors_name_the_position() {
        assert_eq!(generations().len(), GENERATIONS.len());
        assert_eq!(names().len(), 20);
        let e = Generation::from_ron("mine.ron", "(name: \"v9\",\n  core: oops)").unwrap_err().to_string();
        assert!(e.starts_with("mine.ron:2:"), "{e}");
        let v3 = GENERATIONS[1].1.replace("clock_hz: (value: 940e6,", "clock_hz: (");
        let e = Generation::from_ron("v3.ron", &v3).unwrap_err().to_string();
        assert!(e.starts_with("v3.ron:9:") && e.contains("value"), "{e}");
    }

    #[test]
    fn slice_names_count_cores() {
        for name in names() {
            let m = preset(&name).unwrap();
            let cores: usize = name.split('-').nth(1).unwrap().parse().unwrap();
            assert_eq!(m.cores(), cores, "{name}");
            m.validate().unwrap();
            for field in [
                "core.clock_hz",
                "core.mxu.count",
                "core.vmem_bytes",
                "core.hbm.bytes",
                "core.hbm.bytes_per_cycle",
                "core.dma.latency_cycles",
                "chip.ici.bytes_per_second",
                "slice.torus",
            ] {
                assert!(m.sources.contains_key(field), "{name}: {field} has no source");
            }
        }
        assert_eq!(preset("v2-512").unwrap().slice.torus, vec![16, 16]);
        assert_eq!(preset("v3-2048").unwrap().chips(), 1024);
        assert_eq!(preset("v4-8192").unwrap().chips(), 4096);
    }
}
