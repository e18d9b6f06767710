//! Machines as data: every preset's figures come from its generation's file with a source each,
//! and a machine written as RON (sources included) reads back as the same machine.

use std::collections::BTreeSet;

use systolic_simulator::Machine;
use systolic_simulator::config::presets::{self, GENERATIONS, Generation};
use systolic_simulator::config::{FIELDS, MxuTiming};

fn all_presets() -> Vec<Machine> {
    presets::names().iter().map(|name| presets::preset(name).unwrap()).collect()
}

/// The dotted path of every leaf (number, boolean, list) of a machine, `name` and `sources` aside.
fn leaves(m: &Machine) -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(fields) => {
                for (key, child) in fields {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    if path != "name" && path != "sources" {
                        walk(&path, child, out);
                    }
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk("", &serde_json::to_value(m).unwrap(), &mut out);
    out
}

#[test]
fn every_preset_round_trips_through_ron_with_its_sources() {
    let dir = tempfile_dir("round-trip");
    for m in all_presets() {
        let text = m.to_ron();
        let back = Machine::from_ron(&text).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        assert_eq!(back, m, "{}", m.name);
        assert_eq!(back.sources, m.sources, "{}", m.name);
        assert_eq!(back.to_ron(), text, "{}", m.name);
        // Bit for bit, floats included.
        assert_eq!(back.core.hbm.bytes_per_cycle.to_bits(), m.core.hbm.bytes_per_cycle.to_bits());
        let path = dir.join(format!("{}.ron", m.name));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(Machine::load(&path).unwrap(), m, "{}", m.name);
        assert_eq!(Machine::resolve(path.to_str().unwrap()).unwrap(), m, "{}", m.name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_figure_of_every_preset_has_a_source() {
    let keys = ["ISCA17", "HC20", "CACM20", "JAX", "SB", "GC"];
    for m in all_presets() {
        let leaves = leaves(&m);
        assert_eq!(leaves.iter().map(String::as_str).collect::<BTreeSet<_>>(), BTreeSet::from(FIELDS), "{}", m.name);
        for field in &leaves {
            let source = m.sources.get(field).unwrap_or_else(|| panic!("{}: {field} has no source", m.name));
            assert!(
                source.starts_with("assumption: ")
                    || source.starts_with("model: ")
                    || keys.iter().any(|k| source.contains(k)),
                "{}: {field}: '{source}' names no source key and is not marked as an assumption or a model choice",
                m.name
            );
        }
        assert_eq!(m.sources.len(), FIELDS.len(), "{}: sources of fields that do not exist", m.name);
        assert_eq!(m.fields().len(), FIELDS.len());
    }
}

#[test]
fn presets_keep_their_figures() {
    // The derived HBM bandwidth per cycle, bit for bit: chip bandwidth / 2 cores / clock.
    let per_cycle = |name: &str| presets::preset(name).unwrap().core.hbm.bytes_per_cycle;
    assert_eq!(per_cycle("v2-8").to_bits(), (700e9f64 / 2.0 / 700e6).to_bits());
    assert_eq!(per_cycle("v3-8").to_bits(), (900e9f64 / 2.0 / 940e6).to_bits());
    assert_eq!(per_cycle("v4-8").to_bits(), (1200e9f64 / 2.0 / 1050e6).to_bits());
    let v3 = presets::preset("v3-8").unwrap();
    assert_eq!(v3.core.hbm.bytes, 16 << 30);
    assert_eq!(v3.core.vmem_bytes, 16 << 20);
    assert_eq!((v3.core.mxu.count, v3.core.mxu.rows, v3.core.mxu.cols), (2, 128, 128));
    assert_eq!((v3.chip.cores, v3.chip.ici.links, v3.host.chips), (2, 4, 4));
    assert_eq!((v3.chip.ici.bytes_per_second, v3.chip.ici.latency_seconds), (82e9, 1e-6));
    assert_eq!(v3.host.pcie_bytes_per_second, 16e9);
    assert_eq!(
        v3.sources["core.hbm.bytes_per_cycle"].split(" (").next(),
        Some("derived: 900 GB/s per chip / 2 cores / 940 MHz")
    );
}

#[test]
fn a_new_generation_is_data() {
    // A made-up generation: v4's file with another name, clock, array and cores per chip.
    let text = GENERATIONS[2]
        .1
        .replace("name: \"v4\"", "name: \"v9\"")
        .replace("clock_hz: (value: 1050e6, source: \"", "clock_hz: (value: 2e9, source: \"assumption: a guess; ")
        .replace("rows: (value: 128,", "rows: (value: 256,")
        .replace("cols: (value: 128,", "cols: (value: 256,")
        .replace("vmem_bytes: (value: 16777216,", "vmem_bytes: (value: 67108864,")
        .replace("cores: (value: 2,", "cores: (value: 1,");
    let generation = Generation::from_ron("v9.ron", &text).unwrap();
    let slice = &generation.slices.value[0];
    let m = generation.machine(slice);
    m.validate().unwrap();
    assert_eq!(m.name, "v9-8");
    assert_eq!((m.core.clock_hz, m.core.mxu.rows, m.core.mxu.cols, m.chip.cores), (2e9, 256, 256, 1));
    assert_eq!(m.core.hbm.bytes, 32 << 30, "one core gets the chip's HBM");
    assert!(m.sources["core.clock_hz"].starts_with("assumption: a guess"));
    assert!(m.sources["core.hbm.bytes_per_cycle"].contains("/ 1 cores / 2000 MHz"));
}

#[test]
fn overrides_are_cited_and_survive_the_round_trip() {
    let mut m = presets::preset("v4-8").unwrap();
    m.set_all(&[("core.mxu.rows", "256"), ("core.vmem_bytes", "33554432"), ("slice.torus", "[2, 2, 2]")]).unwrap();
    assert_eq!(m.sources["core.mxu.rows"], "set by the user to 256");
    assert_eq!(m.sources["slice.torus"], "set by the user to [2, 2, 2]");
    let back = Machine::from_ron(&m.to_ron()).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.sources["core.vmem_bytes"], "set by the user to 33554432");
}

#[test]
fn the_mxu_timing_model_is_a_field_with_a_default() {
    for m in all_presets() {
        assert_eq!(m.core.mxu.timing, MxuTiming::Pipelined, "{}", m.name);
        assert!(m.sources["core.mxu.timing"].starts_with("model: "), "{}", m.name);
    }
    // Set by name (quoted or not), cited, shown as `--set` takes it, and written to RON.
    let mut m = presets::preset("v3-8").unwrap();
    m.set("core.mxu.timing", "scalesim").unwrap();
    assert_eq!(m.core.mxu.timing, MxuTiming::Scalesim);
    assert_eq!(m.sources["core.mxu.timing"], "set by the user to scalesim");
    assert!(m.fields().contains(&("core.mxu.timing", "scalesim".to_string())));
    let text = m.to_ron();
    assert!(text.contains("timing: scalesim,"), "{text}");
    assert_eq!(Machine::from_ron(&text).unwrap(), m);
    m.set("core.mxu.timing", "\"pipelined\"").unwrap();
    assert_eq!(m.core.mxu.timing, MxuTiming::Pipelined);
    // Anything else is refused with the field and the choices.
    let e = m.clone().set("core.mxu.timing", "fast").unwrap_err().to_string();
    assert!(e.contains("core.mxu.timing") && e.contains("pipelined") && e.contains("scalesim"), "{e}");
    let e = m.clone().set("core.mxu.timing", "3").unwrap_err().to_string();
    assert!(e.contains("core.mxu.timing"), "{e}");
    // A machine file from before the field existed loads with the default timing.
    let preset = presets::preset("v2-8").unwrap();
    let old = preset.to_ron().replace("    timing: pipelined,\n", "");
    assert!(!old.contains("timing:"), "{old}");
    assert_eq!(Machine::from_ron(&old).unwrap(), preset);
}

#[test]
fn bad_machine_files_name_the_file_line_and_column() {
    let dir = tempfile_dir("bad");
    let good = presets::preset("v2-8").unwrap().to_ron();
    let line_of = |needle: &str| good.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        // A value the validator refuses is located at its field.
        (
            good.replace("rows: 128", "rows: 0"),
            line_of("rows: 128"),
            "machine field 'core.mxu.rows': must be at least 1",
        ),
        (good.replace("cols: 128", "colls: 128"), line_of("cols: 128"), "Unexpected field named `colls`"),
        (good.replace("alus: 2", "alus: \"two\""), line_of("alus: 2"), "Expected integer"),
        (good.replace("latency_cycles: 500", "latency_cycles: -500"), line_of("latency_cycles"), ""),
        (good.replace("  sources: {", "  sources: {{"), line_of("sources: {"), ""),
    ];
    for (i, (text, line, needle)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("bad{i}.ron"));
        std::fs::write(&path, text).unwrap();
        let e = Machine::load(&path).unwrap_err().to_string();
        let at = format!("bad{i}.ron:{line}:");
        assert!(e.contains(&at) && e.contains(needle), "case {i}: wanted '{at}' and '{needle}' in: {e}");
    }
    // A file without sources is a machine too: they default to none.
    let bare = presets::preset("v2-8").map(|m| Machine { sources: Default::default(), ..m }).unwrap();
    let text = bare.to_ron();
    assert!(text.contains("sources: {}"), "{text}");
    assert_eq!(Machine::from_ron(&text.replace("  sources: {},\n", "")).unwrap(), bare);
    let e = Machine::from_ron("(name: \"x\",\n  core: oops)").unwrap_err().to_string();
    assert!(e.starts_with("<machine RON>:2:"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("systolic-machines-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
