//! Harness for drmesh's end-to-end tests: real `drmesh` processes in a
//! temporary directory, talked to through the real CLI and admin socket.
//!
//! The tests need the `drmesh` binary built in the same target directory
//! (`cargo build -p drmesh-node`; scripts/test does it).

#![allow(missing_docs)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The `drmesh` binary next to the test executable's target directory.
pub fn drmesh_bin() -> PathBuf {
    if let Ok(path) = std::env::var("DRMESH_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/drmesh
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("drmesh");
    assert!(bin.exists(), "{} not found: build it first with `cargo build -p drmesh-node` (same profile as the tests)", bin.display());
    bin
}

/// Runs `drmesh ARGS` to completion.
pub fn drmesh(args: &[&str]) -> Output {
    Command::new(drmesh_bin()).args(args).env_remove("RUST_LOG").output().expect("running drmesh")
}

/// Polls `check` every 100 ms until it is true; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free UDP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port").port()
}

/// One node of a test mesh: identity made by the real `drmesh init`.
pub struct TestNode {
    pub name: String,
    pub id: String,
    pub port: u16,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl TestNode {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Nodes, a topology file and a temporary directory holding all of it.
pub struct TestMesh {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
}

/// One `[[node]]` entry as a test wants it written.
pub struct Entry<'a> {
    pub name: &'a str,
    /// Address written for the node; `None` writes no addresses (node behind NAT).
    pub address: Option<String>,
}

impl TestMesh {
    /// Makes identities for `names` with `drmesh init`.
    pub fn new(names: &[&str]) -> TestMesh {
        let dir = tempfile::Builder::new().prefix("drmesh-test-").tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for name in names {
            let state_dir = dir.path().join(name);
            let out = drmesh(&["init", "--state-dir", state_dir.to_str().expect("utf8 path"), "--name", name]);
            assert!(out.status.success(), "init {name}: {}", String::from_utf8_lossy(&out.stderr));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let id = stdout
                .lines()
                .find_map(|l| l.strip_prefix("node id: "))
                .expect("init prints the node id")
                .to_string();
            nodes.push(TestNode {
                name: name.to_string(),
                id,
                port: free_port(),
                log: dir.path().join(format!("{name}.log")),
                state_dir,
                child: None,
            });
        }
        TestMesh { dir, nodes }
    }

    pub fn node(&self, name: &str) -> &TestNode {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut TestNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Topology text listing `entries`, with `[mesh] version`.
    pub fn topology_text(&self, version: u64, entries: &[Entry<'_>]) -> String {
        let mut text = format!("[mesh]\nname = \"test\"\nversion = {version}\n");
        for e in entries {
            let n = self.node(e.name);
            text.push_str(&format!("\n[[node]]\nname = \"{}\"\nid = \"{}\"\nsite = \"lab\"\n", n.name, n.id));
            if let Some(a) = &e.address {
                text.push_str(&format!("addresses = [\"{a}\"]\n"));
            }
        }
        text
    }

    /// Topology text listing `names` at their own addresses.
    pub fn standard_topology(&self, version: u64, names: &[&str]) -> String {
        let entries: Vec<Entry<'_>> = names.iter().map(|n| Entry { name: n, address: Some(self.node(n).address()) }).collect();
        self.topology_text(version, &entries)
    }

    /// Writes `text` to `file` (in the mesh directory) the way an editor does: new file, rename over.
    pub fn write_file(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write topology");
        std::fs::rename(&tmp, &path).expect("rename topology");
        path
    }

    /// Starts `name` with `drmesh run` on topology file `file`.
    pub fn start(&mut self, name: &str, file: &str) {
        let topology = self.dir.path().join(file);
        let node = self.node_mut(name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).expect("log file");
        let child = Command::new(drmesh_bin())
            .args(["--log", "info,drmesh_actors=debug", "run", "--state-dir"])
            .arg(&node.state_dir)
            .arg("--topology")
            .arg(&topology)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn drmesh run");
        node.child = Some(child);
        let what = format!("{name}'s admin socket answers");
        wait_until(&what, Duration::from_secs(20), || {
            let node = self.node_mut(name);
            assert!(node.is_running(), "{name} exited at start-up:\n{}", node.log_text());
            self.ctl_json(name, "status").is_some()
        });
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status' success.
    pub fn stop(&mut self, name: &str) -> bool {
        let node = self.node_mut(name);
        let mut child = node.child.take().expect("node is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.success();
            }
            assert!(Instant::now() < deadline, "{name} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self, name: &str) {
        let node = self.node_mut(name);
        let mut child = node.child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// `drmesh ctl --state-dir DIR ARGS`.
    pub fn ctl(&self, name: &str, args: &[&str]) -> Output {
        let node = self.node(name);
        let mut all = vec!["ctl", "--state-dir", node.state_dir.to_str().expect("utf8")];
        all.extend_from_slice(args);
        drmesh(&all)
    }

    /// `drmesh ctl ... CMD --json`, the `data` field when `ok`.
    pub fn ctl_json(&self, name: &str, cmd: &str) -> Option<Value> {
        let out = self.ctl(name, &[cmd, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        if v["ok"] == true {
            Some(v["data"].clone())
        } else {
            None
        }
    }

    /// The state of `peer` as seen by `name` ("connected", "waiting", ...), if listed.
    pub fn peer(&self, name: &str, peer: &str) -> Option<Value> {
        let peers = self.ctl_json(name, "peers")?;
        peers.as_array()?.iter().find(|p| p["name"] == peer).cloned()
    }

    pub fn peer_state(&self, name: &str, peer: &str) -> Option<String> {
        self.peer(name, peer).and_then(|p| p["state"].as_str().map(String::from))
    }

    /// Waits until `name` sees every one of `peers` connected.
    pub fn wait_connected(&self, name: &str, peers: &[&str]) {
        let what = format!("{name} sees {peers:?} connected");
        wait_until(&what, Duration::from_secs(30), || peers.iter().all(|p| self.peer_state(name, p).as_deref() == Some("connected")));
    }
}
