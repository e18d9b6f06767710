//! What the command-line tests share: running the binary, and checking that it succeeds or
//! fails with one clear error line (never a panic).

use std::process::{Command, Output};

pub fn systolic(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_systolic")).args(args).output().expect("the binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = systolic(args);
    assert!(out.status.success(), "systolic {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail and returns its one error line.
pub fn fails(args: &[&str]) -> String {
    let out = systolic(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "systolic {args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "systolic {args:?} panicked: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line expected, got: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}
