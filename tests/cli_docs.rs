//! Story: an operator (or the package build) asks the binary for its shell
//! completions and manual pages. The completion scripts are valid for their
//! shell and know the subcommands; `drmesh man --out DIR` writes a page for
//! the binary and for every visible subcommand, pages groff renders without a
//! warning, and refuses an output path that is a symlink or a file, writing
//! nothing anywhere.

use std::path::Path;
use std::process::Command;

use drmesh_tests::{drmesh, output_text};

/// Whether `program` can be run.
fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

#[test]
fn completion_scripts_are_valid_and_name_the_subcommands() {
    let out = drmesh(&["completions", "bash"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let bash = String::from_utf8(out.stdout).expect("utf8");
    for sub in ["init", "run", "ctl", "topology", "restore", "completions", "status", "sync-now"] {
        assert!(bash.contains(sub), "the bash script knows {sub}");
    }
    assert!(!bash.contains("drill-worker") && !bash.contains(" man "), "hidden commands are not offered");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("drmesh.bash");
    std::fs::write(&file, &bash).expect("write");
    let check = Command::new("bash").arg("-n").arg(&file).output().expect("bash");
    assert!(check.status.success(), "bash -n: {}", output_text(&check));
    // Sourced in a shell, it registers itself for `drmesh`.
    let sourced = Command::new("bash").arg("-c").arg(format!("source {} && complete -p drmesh", file.display())).output().expect("bash");
    assert!(sourced.status.success() && String::from_utf8_lossy(&sourced.stdout).contains("drmesh"), "complete -p drmesh: {}", output_text(&sourced));
    eprintln!("bash completion: {} lines, accepted by bash -n and registered", bash.lines().count());

    for (shell, needle) in [("zsh", "#compdef drmesh"), ("fish", "complete -c drmesh")] {
        let out = drmesh(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", output_text(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{shell} script starts as {shell} expects");
        assert!(text.contains("sync-now"), "{shell} script knows the ctl subcommands");
    }
    if have("zsh") {
        let f = dir.path().join("_drmesh");
        std::fs::write(&f, drmesh(&["completions", "zsh"]).stdout).expect("write");
        let out = Command::new("zsh").arg("-n").arg(&f).output().expect("zsh");
        assert!(out.status.success(), "zsh -n: {}", output_text(&out));
    }

    let bad = drmesh(&["completions", "tcsh"]);
    assert!(!bad.status.success(), "an unknown shell is refused");
    assert!(output_text(&bad).contains("bash"), "the refusal lists the shells: {}", output_text(&bad));
}

/// The visible subcommands at every level as page names, from `--help` of the binary itself.
fn expected_pages() -> Vec<String> {
    fn walk(words: &mut Vec<String>, pages: &mut Vec<String>) {
        pages.push(format!("{}.1", words.join("-")));
        let args: Vec<&str> = words[1..].iter().map(String::as_str).chain(["--help"]).collect();
        let out = drmesh(&args);
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let Some(section) = help.split("Commands:\n").nth(1) else { return };
        for line in section.lines().take_while(|l| l.starts_with("  ")) {
            let Some(name) = line.split_whitespace().next() else { continue };
            if name == "help" || !line.starts_with("  ") || line.starts_with("   ") {
                continue;
            }
            words.push(name.to_string());
            walk(words, pages);
            words.pop();
        }
    }
    let mut pages = Vec::new();
    walk(&mut vec!["drmesh".to_string()], &mut pages);
    pages.sort();
    pages
}

#[test]
fn man_writes_one_page_per_visible_subcommand_that_groff_renders_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("man1");
    let out = drmesh(&["man", "--out", out_dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", output_text(&out));
    let mut written: Vec<String> = std::fs::read_dir(&out_dir).expect("read").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    written.sort();
    let expected = expected_pages();
    assert_eq!(written, expected, "one page per visible subcommand, as --help lists them");
    assert!(written.contains(&"drmesh-ctl-status.1".to_string()) && written.contains(&"drmesh-run.1".to_string()));
    assert!(!written.iter().any(|p| p.contains("drill-worker") || p == "drmesh-man.1"), "hidden commands have no page");
    eprintln!("drmesh man: {} pages", written.len());

    // Running it again replaces the pages (the package build may run twice).
    let again = drmesh(&["man", "--out", out_dir.to_str().expect("utf8")]);
    assert!(again.status.success(), "{}", output_text(&again));

    let run_page = std::fs::read_to_string(out_dir.join("drmesh-run.1")).expect("read");
    assert!(run_page.contains(".TH drmesh-run 1") && run_page.contains(r"\-\-state\-dir"), "the run page documents its options");
    if have("groff") {
        for page in &written {
            let path = out_dir.join(page);
            let out = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&path).output().expect("groff");
            assert!(out.status.success() && out.stderr.is_empty(), "groff warns on {page}: {}", output_text(&out));
        }
        let text = Command::new("groff").args(["-man", "-Tutf8"]).arg(out_dir.join("drmesh.1")).output().expect("groff");
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("SUBCOMMANDS") || text.contains("S\u{8}SU\u{8}UB\u{8}B"), "drmesh.1 lists the subcommands");
        eprintln!("groff -ww rendered {} pages without a warning", written.len());
    } else {
        eprintln!("groff is not installed: pages not rendered (apt-get install groff-base)");
    }
}

/// Every file under `dir`, as paths relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).expect("read").flatten() {
        let p = e.path();
        found.push(p.strip_prefix(dir).expect("under").display().to_string());
        if e.file_type().expect("type").is_dir() {
            found.extend(tree(&p).into_iter().map(|s| format!("{}/{s}", p.strip_prefix(dir).expect("under").display())));
        }
    }
    found.sort();
    found
}

#[test]
fn man_refuses_a_symlink_or_a_file_as_its_folder_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).expect("mkdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").expect("write");
    let before = tree(dir.path());

    let out = drmesh(&["man", "--out", link.to_str().expect("utf8")]);
    let text = output_text(&out);
    assert!(!out.status.success(), "a symlink is refused");
    assert!(text.contains(link.to_str().expect("utf8")) && text.contains("symlink"), "the error names the path and says why: {text}");

    let out = drmesh(&["man", "--out", file.to_str().expect("utf8")]);
    let text = output_text(&out);
    assert!(!out.status.success(), "a file is refused");
    assert!(text.contains(file.to_str().expect("utf8")) && text.contains("not a folder"), "the error names the path and says why: {text}");

    let missing_parent = dir.path().join("no/such/dir");
    let out = drmesh(&["man", "--out", missing_parent.to_str().expect("utf8")]);
    assert!(!out.status.success(), "a folder whose parent is missing is refused: {}", output_text(&out));

    assert_eq!(tree(dir.path()), before, "nothing was written anywhere");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

    // A page name planted as a symlink in the folder is replaced, never followed.
    let out_dir = dir.path().join("pages");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let target = dir.path().join("target.txt");
    std::fs::write(&target, "untouched").expect("write");
    std::os::unix::fs::symlink(&target, out_dir.join("drmesh.1")).expect("plant");
    let out = drmesh(&["man", "--out", out_dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "untouched", "the symlink's target was not written");
    let meta = std::fs::symlink_metadata(out_dir.join("drmesh.1")).expect("stat");
    assert!(meta.is_file(), "drmesh.1 is now a regular file");
}
