//! Every `drmesh` command line shown in README.md, docs/ and examples/ names
//! subcommands and options the real binary has: a documented command or
//! option that disappears (or is misspelled in the docs) fails here, with
//! the file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use drmesh_tests::drmesh;

/// The documented files: README.md, docs/*.md, examples/*.
fn documented_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "examples"] {
        let mut listed: Vec<PathBuf> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        listed.sort();
        files.extend(listed);
    }
    files
}

/// Command lines in fenced code blocks (Markdown) or in comments and text
/// (other files) that start with `drmesh ` (after an optional prompt or `sudo`).
/// In a block with `$ ` prompts (a transcript), only the prompted lines
/// are commands; the rest is output.
fn command_lines(path: &Path, text: &str) -> Vec<(usize, String)> {
    let markdown = path.extension().is_some_and(|e| e == "md");
    let lines: Vec<&str> = text.lines().collect();
    let mut in_code = false;
    let mut transcript = false;
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if markdown && trimmed.starts_with("```") {
            in_code = !in_code;
            if in_code {
                transcript = lines[i + 1..].iter().take_while(|l| !l.trim_start().starts_with("```")).any(|l| l.trim_start().starts_with("$ "));
            }
            continue;
        }
        if markdown && (!in_code || (transcript && !trimmed.starts_with("$ "))) {
            continue;
        }
        let mut rest = trimmed.trim_start_matches('#').trim_start().trim_start_matches("$ ").trim_start();
        rest = rest.strip_prefix("sudo ").unwrap_or(rest).trim_start();
        rest = rest.strip_prefix("-u drmesh ").unwrap_or(rest);
        // `drmesh topology: ...` in a comment is prose, not a command.
        if let Some(after) = rest.strip_prefix("drmesh ").filter(|a| !a.split_whitespace().next().unwrap_or(":").ends_with(':')) {
            out.push((i + 1, after.to_string()));
        }
    }
    out
}

/// `drmesh PATH... --help`, cached.
struct Help(HashMap<Vec<String>, Option<String>>);

impl Help {
    fn of(&mut self, path: &[String]) -> Option<&str> {
        self.0
            .entry(path.to_vec())
            .or_insert_with(|| {
                let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
                args.push("--help");
                let out = drmesh(&args);
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .as_deref()
    }

    /// The subcommands the help lists.
    fn subcommands(&mut self, path: &[String]) -> Vec<String> {
        let Some(help) = self.of(path) else { return vec![] };
        help.split("Commands:")
            .nth(1)
            .map(|section| {
                section
                    .lines()
                    .skip(1)
                    .take_while(|l| l.starts_with("  "))
                    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn documented_commands_and_options_exist() {
    let mut help = Help(HashMap::new());
    assert!(help.of(&[]).is_some(), "drmesh --help fails");
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in documented_files() {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for (line_no, line) in command_lines(&file, &text) {
            // The command up to a pipe, redirection, list or continuation.
            let command: Vec<&str> = line
                .split_whitespace()
                .take_while(|w| !matches!(*w, "|" | "||" | "&&" | ";" | ">" | "2>&1" | "\\" | "&") && !w.starts_with('>') && !w.starts_with('#'))
                .collect();
            let mut path: Vec<String> = Vec::new();
            for word in &command {
                if word.starts_with('-') {
                    continue;
                }
                // `status|peers|reload`: alternatives.
                let subcommands = help.subcommands(&path);
                if let Some(sub) = word.trim_matches(['[', ']']).split('|').find(|w| subcommands.iter().any(|s| s == w)) {
                    path.push(sub.to_string());
                }
            }
            let Some(text) = help.of(&path).map(str::to_string) else {
                problems.push(format!("{}:{line_no}: `drmesh {}`: `--help` fails", file.display(), path.join(" ")));
                continue;
            };
            // A command that needs a subcommand got none the binary knows.
            let usage = text.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default();
            if usage.ends_with("<COMMAND>") {
                problems.push(format!("{}:{line_no}: `drmesh {line}`: no subcommand of `drmesh {}` the binary knows", file.display(), path.join(" ")));
                continue;
            }
            for word in &command {
                let flag = word.trim_start_matches('[').trim_end_matches([']', ',', ')']).split('=').next().unwrap_or_default();
                if !flag.starts_with("--") || flag.len() < 3 || flag.contains('.') {
                    continue;
                }
                let listed = text.lines().any(|l| l.split([' ', ',', '=', '[', '<']).any(|t| t == flag));
                if !listed {
                    problems.push(format!("{}:{line_no}: `drmesh {}` has no option {flag} (line: drmesh {line})", file.display(), path.join(" ")));
                }
            }
            checked += 1;
        }
    }
    eprintln!("{checked} documented command lines checked");
    assert!(checked >= 40, "only {checked} command lines found in the docs");
    assert!(problems.is_empty(), "documented commands that the binary does not have:\n{}", problems.join("\n"));
}
