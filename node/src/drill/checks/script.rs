//! The `script` check: the user's command runs against the recovery point's
//! filesystems, mounted as a tree (see [`super::MountTree`]): a Linux root
//! found on the disk is at the drill root and its other filesystems at their
//! fstab mount points; without a root, each filesystem is at
//! `<drill root>/<volume>` (`part1`, `lv-vg0-root`, `disk`).

use std::process::Command;
use std::time::Instant;

use drmesh_topology::DrillScript;

use super::{isolate_network, netns_available, run_tool, Disk, Outcome, SpawnError};

/// Runs `cfg.command` (program and arguments, no shell) with the disk's
/// filesystems mounted read-only (no journal replay: ext3/4 `noload`, XFS
/// `norecovery`) or, with `cfg.writable`, writable on the throwaway overlay.
///
/// The drill root (where the filesystems are mounted) is passed ONLY as the
/// environment variable `DRMESH_DRILL_ROOT` and as the command's working
/// directory; no argument is added. The command inherits drmesh's
/// environment, runs as root in a network namespace of its own (no network)
/// when the host allows one, in a process group of its own that is killed
/// when it ends (daemons it leaves behind go too), with `work/PROGRAM.pid`
/// while it runs (named after the program, so that the clean-up after a
/// crash finds that name in its command line), and is killed at
/// `deadline`. Exit status 0 passes; the output is the end of its stdout
/// and stderr. Everything is unmounted before this returns.
pub fn script(disk: &Disk, cfg: &DrillScript, deadline: Instant) -> Outcome {
    let Some((program, args)) = cfg.command.split_first() else {
        return Outcome::fail("no script command is configured", "");
    };
    let shown = cfg.command.join(" ");
    let logs = disk.work.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        return Outcome::fail(format!("cannot make {}: {e}", logs.display()), "");
    }
    let tree = match super::mount_tree(disk, cfg.writable, deadline) {
        Ok(t) => t,
        Err(e) => return Outcome::fail(format!("cannot mount the recovery point's filesystems for `{shown}`: {e}"), ""),
    };
    let mut output = tree.describe(!cfg.writable);
    let isolated = netns_available();
    if !isolated {
        output.push_str("note: this host cannot make a network namespace; the script ran with the host's network\n");
    }
    let mut cmd = Command::new(program);
    cmd.args(args).env("DRMESH_DRILL_ROOT", &tree.root).current_dir(&tree.root);
    if isolated {
        isolate_network(&mut cmd);
    }
    let started = Instant::now();
    let ran = run_tool(&mut cmd, &logs.join("script.log"), false, Some(&disk.work.join(format!("{}.pid", pid_name(program)))), deadline);
    let took = started.elapsed().as_secs_f64();
    drop(tree);
    let ran = match ran {
        Ok(r) => r,
        Err(SpawnError::NotFound) => return Outcome::fail(format!("cannot run `{shown}`: {program} not found"), &output),
        Err(SpawnError::Other(e)) => return Outcome::fail(format!("cannot run `{shown}`: {e}"), &output),
    };
    output.push_str(&format!("$ {shown}\n{}", ran.output));
    let mode = if cfg.writable { "writable" } else { "read-only" };
    match ran.status {
        Some(s) if s.success() => Outcome::pass(format!("`{shown}` exited 0 after {took:.1} s with the recovery point's filesystems mounted {mode}"), &output),
        None => Outcome::fail(format!("time limit reached during the script `{shown}`"), &output),
        Some(_) => Outcome::fail(format!("`{shown}` failed ({}) after {took:.1} s", ran.how()), &output),
    }
}

/// The pid file's name for `program`: its file name, made safe.
fn pid_name(program: &str) -> String {
    let base = program.rsplit('/').next().unwrap_or_default();
    let name: String = base.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        "script".into()
    } else {
        name
    }
}
