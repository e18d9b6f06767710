//! The documentation as tests, so it cannot go stale:
//!
//! - every ```` ```console ```` block in README.md and docs/*.md is run: each `$ systolic ...`
//!   line (shell words, an optional `> FILE` for stdout, a trailing `# comment` ignored) runs
//!   in a fresh folder shared by the block, and each output line shown under it must appear
//!   in what the command printed, in order (lines may be left out between them; `[..]` in a
//!   shown line stands for any text, e.g. wall-clock times);
//! - docs/commands.md is every command's `--help`, regenerated with `SYSTOLIC_BLESS=1`, and
//!   the README's command table has a row for every command.

#[allow(dead_code)] // this file needs only `ok` of the shared helpers
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// One command of a console block and the output lines shown under it.
struct Example {
    file: PathBuf,
    line: usize,
    command: String,
    shown: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The console blocks of a markdown file, each as its examples.
fn console_blocks(file: &Path) -> Vec<Vec<Example>> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Example>> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match &mut current {
            None if fence && line.trim() == "```console" => current = Some(Vec::new()),
            None => {}
            Some(_) if fence => blocks.push(current.take().unwrap()),
            Some(block) => {
                if let Some(command) = line.strip_prefix("$ ") {
                    block.push(Example {
                        file: file.to_path_buf(),
                        line: i + 1,
                        command: command.to_string(),
                        shown: Vec::new(),
                    });
                } else if let Some(example) = block.last_mut() {
                    example.shown.push(line.to_string());
                } else {
                    panic!("{}:{}: a console block starts with a `$ ` command", file.display(), i + 1);
                }
            }
        }
    }
    assert!(current.is_none(), "{}: a console block is not closed", file.display());
    blocks
}

/// Shell words: whitespace-separated, with single or double quotes; `#` starts a comment.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quote = None;
    for c in command.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, '#') if word.is_none() => break,
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    out.extend(word);
    out
}

/// Whether `line` matches the shown `pattern`, where `[..]` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Runs one example in `dir`; the mismatch, if any, as a message naming the file and line.
fn check(example: &Example, dir: &Path) -> Result<(), String> {
    let mut args = words(&example.command);
    let place = format!("{}:{}: `$ {}`", example.file.display(), example.line, example.command);
    if args.first().map(String::as_str) != Some("systolic") {
        return Err(format!("{place}: console blocks run `systolic` commands only"));
    }
    args.remove(0);
    let redirect = match args.iter().position(|a| a == ">") {
        Some(at) => {
            let file = args.get(at + 1).cloned().ok_or_else(|| format!("{place}: `>` without a file"))?;
            args.truncate(at);
            Some(file)
        }
        None => None,
    };
    let out = Command::new(env!("CARGO_BIN_EXE_systolic"))
        .args(&args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("{place}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{place} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    if let Some(file) = redirect {
        std::fs::write(dir.join(file), &stdout).map_err(|e| format!("{place}: {e}"))?;
    }
    let printed: Vec<&str> = stdout.lines().map(str::trim_end).collect();
    let mut from = 0;
    for shown in example.shown.iter().map(|s| s.trim_end()) {
        match printed[from..].iter().position(|line| matches(shown, line)) {
            Some(at) => from += at + 1,
            None => {
                return Err(format!(
                    "{place}: the line\n    {shown}\nis not printed (after the lines matched before it); the command printed:\n{stdout}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn console_examples_in_the_docs_print_what_they_show() {
    let mut failures = Vec::new();
    let mut count = 0;
    for file in documents() {
        for block in console_blocks(&file) {
            let dir = tempfile::tempdir().unwrap();
            for example in &block {
                count += 1;
                if let Err(e) = check(example, dir.path()) {
                    failures.push(e);
                    break;
                }
            }
        }
    }
    assert!(count >= 10, "only {count} console examples found");
    assert!(failures.is_empty(), "{} of {count} examples differ:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn the_matcher_and_the_word_splitter() {
    assert!(matches("CPU reference     [..] ms wall time", "CPU reference     127.252 ms wall time"));
    assert!(!matches("CPU reference     [..] ms wall time", "CPU reference     127.252 s wall time"));
    assert!(matches("a[..]b[..]c", "a-x-b-y-c") && !matches("a[..]b[..]c", "a-x-c"));
    assert!(matches("exact", "exact") && !matches("exact", "exact "));
    assert_eq!(
        words("systolic machines v3-8 --ron > my.ron  # a file"),
        ["systolic", "machines", "v3-8", "--ron", ">", "my.ron"]
    );
    assert_eq!(
        words(r#"systolic x --augment 'flip, crop' "a b""#),
        ["systolic", "x", "--augment", "flip, crop", "a b"]
    );
}

/// The subcommands `systolic --help` lists.
fn subcommands() -> Vec<String> {
    let help = common::ok(&["--help"]);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// docs/commands.md as the CLI's help makes it.
fn command_reference() -> String {
    let mut text = String::from(
        "# Commands\n\nEvery command with every option, as `systolic COMMAND --help` prints it. Generated: \
         `tests/docs.rs` checks this file against the CLI, and `SYSTOLIC_BLESS=1 cargo test --test docs` \
         rewrites it.\n\n",
    );
    text += &format!("## systolic\n\n```text\n{}```\n", common::ok(&["--help"]));
    for command in subcommands() {
        text += &format!("\n## systolic {command}\n\n```text\n{}```\n", common::ok(&[&command, "--help"]));
    }
    text
}

#[test]
fn the_command_reference_is_the_clis_help() {
    let path = root().join("docs/commands.md");
    let generated = command_reference();
    if std::env::var_os("SYSTOLIC_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == generated,
        "docs/commands.md differs from the CLI's help: run `SYSTOLIC_BLESS=1 cargo test --test docs` and commit it"
    );
}

#[test]
fn the_command_table_has_a_row_for_every_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let commands = subcommands();
    assert!(commands.len() >= 15, "{commands:?}");
    let missing: Vec<String> = commands
        .iter()
        .filter(|c| !readme.lines().any(|l| l.starts_with(&format!("| `systolic {c}"))))
        .map(|c| format!("no row for `systolic {c}`"))
        .collect();
    assert!(missing.is_empty(), "README.md's command table:\n{}", missing.join("\n"));
}
