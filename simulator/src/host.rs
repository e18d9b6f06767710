//! The host's memory budget: engines that compute values (the CPU reference, the functional
//! engine, the bit-exact and PE-level MXU models) estimate what a run needs before they
//! allocate it and refuse with the figure, what drives it and what to lower — instead of an
//! allocation failure that aborts the process or a run the kernel's OOM killer ends.
//!
//! The budget is the memory this host has available now (`MemAvailable` in /proc/meminfo, and
//! the control group's limit less its usage when that is smaller), unless a limit is set: by
//! [`set_limit`] (the CLI's `--memory-limit SIZE`) or the `SYSTOLIC_MEMORY_LIMIT` variable.
//! Needs below [`UNCHECKED_BYTES`] are not checked against the host (no file is read for
//! small runs); a set limit checks every need.

use std::fmt;
use std::sync::Mutex;

/// Needs smaller than this pass without reading the host's memory.
pub const UNCHECKED_BYTES: u64 = 256 << 20;

/// The environment variable that sets the limit (a size, or `none` to check nothing).
pub const LIMIT_VARIABLE: &str = "SYSTOLIC_MEMORY_LIMIT";

/// A limit set for this process: `Some(None)` checks nothing, `Some(Some(b))` checks against b.
static LIMIT: Mutex<Option<Option<u64>>> = Mutex::new(None);

/// How much memory a run may use, and where that figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

/// What a run needs: the total and the parts that drive it, largest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    /// What needs the memory, as the subject of a sentence ("the CPU reference at batch 8").
    pub what: String,
    pub bytes: u64,
    /// The largest contributors (name, bytes), shown in the error.
    pub parts: Vec<(String, u64)>,
    /// What to lower, as an instruction ("lower the batch to at most 4,096").
    pub lower: String,
}

/// A need over the budget: one line with the figure, the drivers and the way out.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct MemoryError {
    pub need: Need,
    pub budget: Budget,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Need { what, bytes, parts, lower } = &self.need;
        write!(f, "{what} needs about {}", format_bytes(*bytes))?;
        if !parts.is_empty() {
            let list: Vec<String> = parts.iter().map(|(name, b)| format!("{name} {}", format_bytes(*b))).collect();
            write!(f, " ({})", list.join(", "))?;
        }
        write!(
            f,
            ", but {} may be used ({}); {lower}, or raise the limit with --memory-limit SIZE (or {LIMIT_VARIABLE})",
            format_bytes(self.budget.bytes),
            self.budget.source
        )
    }
}

/// Sets the limit for this process (`None`: check nothing); replaces the host's reading and
/// the environment variable.
pub fn set_limit(bytes: Option<u64>) {
    *LIMIT.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
}

/// The budget now: the set limit, else `SYSTOLIC_MEMORY_LIMIT`, else the host's available
/// memory. `None` when nothing is to be checked (a limit of `none`, or a host that does not
/// say).
pub fn budget() -> Option<Budget> {
    if let Some(set) = *LIMIT.lock().unwrap_or_else(|e| e.into_inner()) {
        return set.map(|bytes| Budget { bytes, source: "the limit set by --memory-limit".into() });
    }
    if let Ok(text) = std::env::var(LIMIT_VARIABLE) {
        // A malformed variable is not silently ignored: it checks against zero, whose error
        // names the variable's value.
        return match parse_size(&text) {
            Ok(bytes) => bytes.map(|bytes| Budget { bytes, source: format!("{LIMIT_VARIABLE}={text}") }),
            Err(e) => Some(Budget { bytes: 0, source: format!("{LIMIT_VARIABLE}={text} is not a size: {e}") }),
        };
    }
    available()
}

/// Whether a limit is set (then every need is checked, however small).
fn limit_is_set() -> bool {
    LIMIT.lock().unwrap_or_else(|e| e.into_inner()).is_some() || std::env::var_os(LIMIT_VARIABLE).is_some()
}

/// Checks a need against the current budget.
pub fn check(need: Need) -> Result<(), MemoryError> {
    if need.bytes < UNCHECKED_BYTES && !limit_is_set() {
        return Ok(());
    }
    match budget() {
        Some(budget) => check_against(need, budget),
        None => Ok(()),
    }
}

/// Checks a need against a given budget.
pub fn check_against(need: Need, budget: Budget) -> Result<(), MemoryError> {
    if need.bytes <= budget.bytes { Ok(()) } else { Err(MemoryError { need, budget }) }
}

/// The memory this host can give a run now: `MemAvailable`, or the control group's limit less
/// its usage where that is smaller (a container's limit is the one the OOM killer enforces).
pub fn available() -> Option<Budget> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(Budget { bytes: kib * 1024, source: "available on this host: MemAvailable in /proc/meminfo".into() })
    });
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    .into_iter()
    .find_map(|(max, current)| {
        let (max_bytes, used) = (read(max)?, read(current)?);
        (max_bytes < 1 << 60).then(|| Budget {
            bytes: max_bytes.saturating_sub(used),
            source: format!("left under this control group's limit: {max} less {current}"),
        })
    });
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.bytes < m.bytes { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// Parses a size: bytes (`1e12`, `4096`), decimal units (`500MB`, `16GB`) or binary ones
/// (`512MiB`, `16GiB`, and `16G` as GiB); `none`, `off` or `unlimited` check nothing.
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if ["none", "off", "unlimited"].contains(&t.to_ascii_lowercase().as_str()) {
        return Ok(None);
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E').unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.trim().parse().map_err(|_| {
        format!("'{text}' is not a size: give bytes or a number with a unit (512MiB, 16GiB, 16GB), or 'none'")
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        other => {
            return Err(format!("unknown unit '{other}' in '{text}': use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{text}' is not a size of memory: give a positive number of bytes"));
    }
    Ok(Some(bytes as u64))
}

/// Bytes as a short figure: `512 B`, `1.5 MiB`, `14.3 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    let units = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, unit) in units {
        if bytes >= scale {
            return format!("{:.1} {unit}", bytes as f64 / scale as f64);
        }
    }
    format!("{bytes} B")
}

/// The largest `x` in `1..=hi` with `fits(x)`, for a `fits` that holds up to some point and
/// not after (a batch, a matrix dimension); `None` when even 1 does not fit.
pub fn largest_fitting(hi: u64, fits: impl Fn(u64) -> bool) -> Option<u64> {
    if hi == 0 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1u64, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) { lo = mid } else { hi = mid - 1 }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("4096"), Ok(Some(4096)));
        assert_eq!(parse_size("1e12"), Ok(Some(1_000_000_000_000)));
        assert_eq!(parse_size("500MB"), Ok(Some(500_000_000)));
        assert_eq!(parse_size("16GiB"), Ok(Some(16 << 30)));
        assert_eq!(parse_size("16G"), Ok(Some(16 << 30)));
        assert_eq!(parse_size("1.5 KiB"), Ok(Some(1536)));
        assert_eq!(parse_size("none"), Ok(None));
        assert!(parse_size("-1GB").unwrap_err().contains("positive"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("3 parsecs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn a_need_over_the_budget_names_the_figures_and_the_way_out() {
        let need = Need {
            what: "the CPU reference at batch 8".into(),
            bytes: 3 << 30,
            parts: vec![("'conv1'".into(), 2 << 30), ("'image'".into(), 1 << 30)],
            lower: "lower the batch to at most 4".into(),
        };
        let budget = Budget { bytes: 2 << 30, source: "test".into() };
        assert!(check_against(need.clone(), Budget { bytes: 3 << 30, source: "test".into() }).is_ok());
        let e = check_against(need, budget).unwrap_err().to_string();
        assert_eq!(
            e,
            "the CPU reference at batch 8 needs about 3.0 GiB ('conv1' 2.0 GiB, 'image' 1.0 GiB), but 2.0 GiB may be \
             used (test); lower the batch to at most 4, or raise the limit with --memory-limit SIZE (or \
             SYSTOLIC_MEMORY_LIMIT)"
        );
    }

    #[test]
    fn the_largest_fitting_value_is_found() {
        assert_eq!(largest_fitting(1000, |x| x * 3 <= 100), Some(33));
        assert_eq!(largest_fitting(1000, |x| x <= 5000), Some(1000));
        assert_eq!(largest_fitting(1000, |_| false), None);
    }

    #[test]
    fn this_host_reports_its_memory() {
        // Linux hosts (CI included) have /proc/meminfo.
        if cfg!(target_os = "linux") {
            let b = available().expect("/proc/meminfo is readable");
            assert!(b.bytes > 0, "{b:?}");
        }
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 19), "1.5 MiB");
    }
}
