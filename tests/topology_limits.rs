//! Story: someone points drmesh at a huge topology file (an 83 MB file of
//! millions of unknown keys was the report). `drmesh topology check` refuses
//! it at once with the size limit, in little memory and a few lines; a running
//! node whose file is replaced by it keeps running on its last good topology,
//! says why in `ctl status`, logs one line, and its memory does not grow. A
//! file just under the limit full of errors is rejected with its first 100
//! errors and a count. Memory figures are printed; times never asserted.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{drmesh_bin, wait_until, TestMesh};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde_json::Value;

const MIB: usize = 1 << 20;
/// What a process may use while refusing a file it must not read (the file is 80 MB).
const RSS_LIMIT_KB: u64 = 200 * 1024;

/// Unknown top-level keys, about `bytes` bytes of them, then `rest`; and how many keys.
fn unknown_keys(bytes: usize, rest: &str) -> (String, usize) {
    let mut text = String::with_capacity(bytes + rest.len() + 64);
    let mut keys = 0;
    while text.len() < bytes {
        writeln!(text, "unknown_key_{keys:07} = {keys}").unwrap();
        keys += 1;
    }
    text.push_str(rest);
    (text, keys)
}

/// A `kB` field (`VmHWM`, `VmRSS`) of /proc/PID/status.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Output and peak RSS of `drmesh ARGS`. Its stdout is a pipe filled up
/// beforehand, so its first line blocks it, alive, after its work: its VmHWM
/// is then read from /proc (a process that has exited has none).
struct Measured {
    stdout: String,
    stderr: String,
    success: bool,
    peak_rss_kb: u64,
    elapsed: Duration,
}

fn run_measured(args: &[&str]) -> Measured {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    // Fill the pipe (non-blocking, up to EAGAIN), then make it blocking again for the child.
    fcntl(&write_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut filler_writer = File::from(write_end.try_clone().unwrap());
    let mut filled = 0;
    loop {
        match filler_writer.write(&[b'#'; 4096]) {
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    drop(filler_writer);
    fcntl(&write_end, FcntlArg::F_SETFL(OFlag::empty())).unwrap();

    let start = Instant::now();
    let mut child = Command::new(drmesh_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_rss_kb = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(kb) = proc_status_kb(pid, "VmHWM") {
            peak_rss_kb = peak_rss_kb.max(kb);
        }
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("pipe_write") {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "drmesh {args:?} exited before writing to stdout");
        assert!(Instant::now() < deadline, "drmesh {args:?} did not finish its work in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    let mut stdout = Vec::new();
    File::from(read_end).read_to_end(&mut stdout).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    let stdout = String::from_utf8_lossy(&stdout[filled..]).into_owned();
    Measured { stdout, stderr, success: status.success(), peak_rss_kb, elapsed }
}

#[test]
fn check_refuses_an_80_mb_file_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.toml");
    let (text, keys) = unknown_keys(80_000_000, "");
    std::fs::write(&path, &text).unwrap();
    drop(text);
    let p = path.to_str().unwrap();
    let out = run_measured(&["topology", "check", p]);
    println!(
        "topology check of {p} ({} MB, {keys} unknown keys): {:?}, peak RSS {} MB, {} line(s) of output",
        std::fs::metadata(&path).unwrap().len() / 1_000_000,
        out.elapsed,
        out.peak_rss_kb / 1024,
        out.stdout.lines().count() + out.stderr.lines().count()
    );
    assert!(!out.success);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert!(lines[0].starts_with(&format!("{p}:1:1: the file is ")), "{}", lines[0]);
    assert!(lines[0].contains("over the limit of 16 MiB (16777216 bytes)"), "{}", lines[0]);
    assert_eq!(out.stderr.trim(), format!("{p}: 1 error"));
    assert!(out.peak_rss_kb > 0 && out.peak_rss_kb < RSS_LIMIT_KB, "peak RSS {} kB", out.peak_rss_kb);

    // Under the limit but full of errors: the first 100, then a count.
    let (text, keys) = unknown_keys(10 * MIB, "");
    std::fs::write(&path, &text).unwrap();
    let out = run_measured(&["topology", "check", p]);
    println!(
        "topology check of {} MiB with {keys} unknown keys: {:?}, peak RSS {} MB",
        text.len() / MIB,
        out.elapsed,
        out.peak_rss_kb / 1024
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 101, "{}", out.stdout);
    assert!(lines[0].starts_with(&format!("{p}:1:1: unknown key `unknown_key_0000000` in the top level")), "{}", lines[0]);
    // The file has no [mesh] and no [[node]] either: two more errors.
    assert_eq!(lines[100], format!("... and {} more errors", keys + 2 - 100));
    assert_eq!(out.stderr.trim(), format!("{p}: {} errors", keys + 2));
}

/// Starts node `name` like `TestMesh::start`, but keeps the child to read its /proc.
fn start_node(mesh: &TestMesh, name: &str, topology: &Path) -> Child {
    let node = mesh.node(name);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
    let child = Command::new(drmesh_bin())
        .args(["--log", "info", "run", "--state-dir"])
        .arg(&node.state_dir)
        .arg("--topology")
        .arg(topology)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(&format!("{name}'s admin socket answers"), Duration::from_secs(20), || mesh.ctl_json(name, "status").is_some());
    child
}

/// Writes `text` to `file` in the mesh directory (new file, renamed over the old one, as editors do).
fn replace_file(mesh: &TestMesh, file: &str, text: &str) -> PathBuf {
    mesh.write_file(file, text)
}

/// Waits for a rejected reload newer than `after` and returns `last_reload`.
fn wait_rejected(mesh: &TestMesh, name: &str, after: &str) -> Value {
    let mut last = Value::Null;
    wait_until("the node rejects the new file", Duration::from_secs(60), || {
        last = mesh.ctl_json(name, "status").map(|s| s["last_reload"].clone()).unwrap_or(Value::Null);
        last["ok"] == false && last["message"].as_str().is_some_and(|m| m.contains(after))
    });
    last
}

fn count_rejections(log: &str) -> usize {
    log.lines().filter(|l| l.contains("topology edit rejected")).count()
}

#[test]
fn a_running_node_rejects_a_huge_file_and_stays_small() {
    let mesh = TestMesh::new(&["a"]);
    let good = mesh.standard_topology(1, &["a"]);
    let path = replace_file(&mesh, "topology.toml", &good);
    let mut node = start_node(&mesh, "a", &path);
    let pid = node.id();
    let rss_start = proc_status_kb(pid, "VmRSS").unwrap();
    let log_lines = mesh.node("a").log_text().lines().count();

    // 80 MB of unknown keys, then the good topology: refused by its size, unread.
    let (huge, keys) = unknown_keys(80_000_000, &good.replace("version = 1", "version = 2"));
    let started = Instant::now();
    replace_file(&mesh, "topology.toml", &huge);
    drop(huge);
    let last = wait_rejected(&mesh, "a", "1 error(s)");
    println!("{keys} unknown keys (80 MB) rejected by the node within {:?} of the write", started.elapsed());
    let details: Vec<&str> = last["details"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(details.len(), 1, "{last}");
    assert!(details[0].contains("over the limit of 16 MiB (16777216 bytes)"), "{last}");
    assert!(last["message"].as_str().unwrap().contains("keeps running on version 1"), "{last}");
    let out = mesh.ctl("a", &["reload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over the limit of 16 MiB") && stderr.lines().count() <= 3, "{stderr}");

    let (rss, hwm) = (proc_status_kb(pid, "VmRSS").unwrap(), proc_status_kb(pid, "VmHWM").unwrap());
    println!("node RSS {} MB at start, {} MB after rejecting the 80 MB file (peak {} MB)", rss_start / 1024, rss / 1024, hwm / 1024);
    assert!(hwm < RSS_LIMIT_KB, "node peak RSS {hwm} kB");
    let log = mesh.node("a").log_text();
    assert_eq!(count_rejections(&log), 2, "one log line per rejected reload (file event, ctl reload)");
    assert!(log.lines().count() - log_lines < 10, "the log grew by {} lines", log.lines().count() - log_lines);
    assert!(node.try_wait().unwrap().is_none(), "the node died");
    assert_eq!(mesh.ctl_json("a", "status").unwrap()["topology_version"], 1);

    // Just under the limit and full of errors: parsed, and rejected with the
    // first 100 errors and a count, in one log line.
    let (big, keys) = unknown_keys(15 * MIB, &good.replace("version = 1", "version = 3"));
    assert!(big.len() < 16 * MIB);
    let started = Instant::now();
    replace_file(&mesh, "topology.toml", &big);
    drop(big);
    let last = wait_rejected(&mesh, "a", &format!("has {keys} error(s)"));
    println!("{keys} unknown keys (15 MiB) rejected by the node within {:?} of the write", started.elapsed());
    let details = last["details"].as_array().unwrap();
    assert_eq!(details.len(), 101, "{last}");
    assert!(details[0].as_str().unwrap().contains(":1:1: unknown key `unknown_key_0000000` in the top level"), "{last}");
    assert_eq!(details[100], format!("... and {} more errors", keys - 100));
    let log = mesh.node("a").log_text();
    assert_eq!(count_rejections(&log), 3, "one log line per rejected reload");
    let rejected_line = log.lines().rfind(|l| l.contains("topology edit rejected")).unwrap();
    assert!(rejected_line.len() < 4096 && rejected_line.contains("unknown_key_0000000"), "{rejected_line}");

    // A small good file afterwards: applied, and the memory of the rejected parse is not kept.
    let v4 = good.replace("version = 1", "version = 4");
    replace_file(&mesh, "topology.toml", &v4);
    wait_until("the node runs version 4", Duration::from_secs(30), || {
        mesh.ctl_json("a", "status").is_some_and(|s| s["topology_version"] == 4)
    });
    let (rss, hwm) = (proc_status_kb(pid, "VmRSS").unwrap(), proc_status_kb(pid, "VmHWM").unwrap());
    println!("node RSS {} MB after rejecting the 15 MiB file and applying a small one (peak {} MB)", rss / 1024, hwm / 1024);
    assert!(rss < RSS_LIMIT_KB && rss < rss_start + 64 * 1024, "node RSS {rss} kB after the rejected parse (started at {rss_start} kB)");
    assert!(node.try_wait().unwrap().is_none(), "the node died");

    node.kill().unwrap();
    node.wait().unwrap();
}
