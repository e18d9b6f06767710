//! Machine presets named like Cloud TPU slices: `v2-8` … `v2-512`, `v3-8` … `v3-2048`,
//! `v4-8` … `v4-8192` (the number counts TensorCores, two per chip).
//!
//! Sources (keys used in [`Machine::sources`] and `docs/machines.md`):
//! - ISCA17: Jouppi et al., "In-Datacenter Performance Analysis of a Tensor Processing Unit", ISCA 2017.
//! - HC20: Norrie & Patil, "Google's Training Chips Revealed: TPUv2 and TPUv3", Hot Chips 2020.
//! - CACM20: Jouppi et al., "A Domain-Specific Supercomputer for Training Deep Neural Networks", CACM 2020.
//! - JAX: jax-ml/jax `jax/_src/pallas/mosaic/tpu_info.py` (per-TensorCore figures).
//! - SB: the JAX "How to Scale Your Model" (scaling book) chapter on TPUs.
//! - GC: Cloud TPU documentation (v2, v3, v4, system architecture, performance guide).
//!
//! A figure marked "assumption" has no public source; the reason for the value is given.

use std::collections::BTreeMap;

use super::*;

/// One TPU generation's per-chip figures and their sources.
struct Generation {
    name: &'static str,
    clock_hz: f64,
    clock_src: &'static str,
    mxus: usize,
    mxus_src: &'static str,
    hbm_bytes_per_chip: u64,
    hbm_bandwidth_per_chip: f64,
    hbm_src: &'static str,
    ici_links: usize,
    ici_link_bytes_per_second: f64,
    ici_src: &'static str,
    /// Slices: (cores, torus dims, wraparound per dim).
    slices: &'static [(usize, &'static [usize], &'static [bool])],
    topology_src: &'static str,
}

const GIB: u64 = 1 << 30;

const V2: Generation = Generation {
    name: "v2",
    clock_hz: 700e6,
    clock_src: "HC20: TPUv2 runs at 700 MHz",
    mxus: 1,
    mxus_src: "HC20: one 128x128 bf16 MXU per TensorCore",
    hbm_bytes_per_chip: 16 * GIB,
    hbm_bandwidth_per_chip: 700e9,
    hbm_src: "HC20: 16 GiB HBM per chip (8 GiB per core) at about 700 GB/s per chip, shared by its two cores",
    ici_links: 4,
    ici_link_bytes_per_second: 62.5e9,
    ici_src: "CACM20 (secondary notes): 4 ICI links per chip at about 500 Gb/s each",
    slices: &[
        (8, &[2, 2], &[false, false]),
        (32, &[4, 4], &[false, false]),
        (128, &[8, 8], &[false, false]),
        (512, &[16, 16], &[true, true]),
    ],
    topology_src: "CACM20, GC: 2-D torus of 16x16 chips per v2 pod (v2-512); smaller slices are meshes without wraparound",
};

const V3: Generation = Generation {
    name: "v3",
    clock_hz: 940e6,
    clock_src: "HC20: TPUv3 runs at 940 MHz",
    mxus: 2,
    mxus_src: "GC v3: two 128x128 MXUs per TensorCore",
    hbm_bytes_per_chip: 32 * GIB,
    hbm_bandwidth_per_chip: 900e9,
    hbm_src: "GC v3: 32 GiB HBM per chip at 900 GB/s, shared by its two cores",
    ici_links: 4,
    ici_link_bytes_per_second: 82e9,
    ici_src: "CACM20 (secondary notes): 4 ICI links per chip at about 656 Gb/s each",
    slices: &[
        (8, &[2, 2], &[false, false]),
        (32, &[4, 4], &[false, false]),
        (128, &[8, 8], &[false, false]),
        (512, &[16, 16], &[false, false]),
        (2048, &[32, 32], &[true, true]),
    ],
    topology_src: "GC v3, SB: 2-D torus of 32x32 chips per v3 pod (v3-2048); smaller slices are meshes without wraparound",
};

const V4: Generation = Generation {
    name: "v4",
    clock_hz: 1050e6,
    clock_src: "secondary notes on GC v4: 1050 MHz (consistent with 275 TFLOP/s per chip)",
    mxus: 4,
    mxus_src: "GC v4: four 128x128 MXUs per TensorCore",
    hbm_bytes_per_chip: 32 * GIB,
    hbm_bandwidth_per_chip: 1200e9,
    hbm_src: "GC v4: 32 GiB HBM per chip at 1200 GB/s, shared by its two cores",
    ici_links: 6,
    ici_link_bytes_per_second: 45e9,
    ici_src: "SB: 6 ICI links per v4 chip, about 45 GB/s one way each",
    slices: &[
        (8, &[2, 2, 1], &[false, false, false]),
        (16, &[2, 2, 2], &[false, false, false]),
        (32, &[2, 2, 4], &[false, false, false]),
        (64, &[2, 4, 4], &[false, false, false]),
        (128, &[4, 4, 4], &[true, true, true]),
        (256, &[4, 4, 8], &[true, true, true]),
        (512, &[4, 8, 8], &[true, true, true]),
        (1024, &[8, 8, 8], &[true, true, true]),
        (2048, &[8, 8, 16], &[true, true, true]),
        (4096, &[8, 16, 16], &[true, true, true]),
        (8192, &[16, 16, 16], &[true, true, true]),
    ],
    topology_src: "GC v4, SB: 3-D torus built from 4x4x4 cubes joined by optical circuit switches (up to 4096 chips); \
                   a slice is a torus when every dimension is a multiple of 4, otherwise a mesh",
};

const GENERATIONS: [&Generation; 3] = [&V2, &V3, &V4];

/// Every preset name, in order.
pub fn names() -> Vec<String> {
    GENERATIONS.iter().flat_map(|g| g.slices.iter().map(move |s| format!("{}-{}", g.name, s.0))).collect()
}

/// The preset called `name` (`v3-32`), or an error that lists the presets.
pub fn preset(name: &str) -> Result<Machine> {
    for generation in GENERATIONS {
        for &(cores, torus, wrap) in generation.slices {
            if name == format!("{}-{cores}", generation.name) {
                return Ok(build(generation, name, torus, wrap));
            }
        }
    }
    Err(Error::UnknownMachine { name: name.to_string(), known: names() })
}

fn build(g: &Generation, name: &str, torus: &[usize], wrap: &[bool]) -> Machine {
    const CORES_PER_CHIP: usize = 2;
    let mut sources = BTreeMap::new();
    let mut cite = |field: &str, source: &str| {
        sources.insert(field.to_string(), source.to_string());
    };
    cite("core.clock_hz", g.clock_src);
    cite("core.mxu.count", g.mxus_src);
    cite("core.mxu.rows", "HC20, GC: 128x128 systolic arrays of bf16 multipliers with f32 accumulation");
    cite("core.mxu.cols", "HC20, GC: 128x128 systolic arrays of bf16 multipliers with f32 accumulation");
    cite(
        "core.mxu.weight_double_buffering",
        "ISCA17: the array holds one weight tile plus a double-buffered one to hide the weight load",
    );
    cite("core.vmem_bytes", "JAX tpu_info, HC20: 16 MiB of vector memory per TensorCore");
    cite("core.vpu.lanes", "HC20: vector registers of 8 sublanes x 128 lanes of 32-bit values");
    cite("core.vpu.sublanes", "HC20: vector registers of 8 sublanes x 128 lanes of 32-bit values");
    cite("core.vpu.alus", "HC20: 2 vector ALUs per lane and sublane in the 322-bit VLIW bundle");
    cite("core.hbm.bytes", g.hbm_src);
    cite(
        "core.hbm.bytes_per_cycle",
        &format!(
            "derived: {} GB/s per chip / 2 cores / {} MHz ({})",
            g.hbm_bandwidth_per_chip / 1e9,
            g.clock_hz / 1e6,
            g.hbm_src
        ),
    );
    cite("core.dma.engines", "assumption: no public figure; 4 engines let transfers overlap their start-up latency");
    cite(
        "core.dma.latency_cycles",
        "assumption: no public figure; 500 cycles (0.5-0.7 us), the order of an HBM round trip",
    );
    cite("chip.cores", "CACM20, JAX, GC: two TensorCores per chip");
    cite("chip.ici.links", g.ici_src);
    cite("chip.ici.bytes_per_second", g.ici_src);
    cite("chip.ici.latency_seconds", "assumption: no public figure; 1 us per hop");
    cite("host.chips", "GC: a host drives one board of 4 chips (v2-8, v3-8 and v4-8 are one host)");
    cite("host.pcie_bytes_per_second", "GC, SB (secondary notes): PCIe Gen3 x16, about 16 GB/s per chip");
    cite("slice.torus", g.topology_src);
    cite("slice.wraparound", g.topology_src);
    let clock = g.clock_hz;
    Machine {
        name: name.to_string(),
        core: Core {
            clock_hz: clock,
            mxu: Mxu { count: g.mxus, rows: 128, cols: 128, weight_double_buffering: true },
            vmem_bytes: 16 << 20,
            vpu: Vpu { lanes: 128, sublanes: 8, alus: 2 },
            hbm: Hbm {
                bytes: g.hbm_bytes_per_chip / CORES_PER_CHIP as u64,
                bytes_per_cycle: g.hbm_bandwidth_per_chip / CORES_PER_CHIP as f64 / clock,
            },
            dma: Dma { engines: 4, latency_cycles: 500 },
        },
        chip: Chip {
            cores: CORES_PER_CHIP,
            ici: Ici { links: g.ici_links, bytes_per_second: g.ici_link_bytes_per_second, latency_seconds: 1e-6 },
        },
        host: Host { chips: 4, pcie_bytes_per_second: 16e9 },
        slice: Slice { torus: torus.to_vec(), wraparound: wrap.to_vec() },
        sources,
    }
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
