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

/// Starts `node` of `mesh` inside the network namespace `netns` with `topology`
/// and waits until its admin socket answers. The caller owns (and kills) the
/// child: `ip netns exec` execs drmesh in place, so its pid is the node's.
pub fn start_in_netns(mesh: &TestMesh, node: &str, netns: &str, topology: &Path) -> Child {
    let n = mesh.node(node);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).expect("log file");
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(drmesh_bin())
        .args(["--log", "info,drmesh_actors=debug", "run", "--state-dir"])
        .arg(&n.state_dir)
        .arg("--topology")
        .arg(topology)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn drmesh run in a namespace");
    let what = format!("{node}'s admin socket answers");
    wait_until(&what, Duration::from_secs(20), || mesh.ctl_json(node, "status").is_some());
    child
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
        self.start_with_env(name, file, &[]);
    }

    /// [`TestMesh::start`] with extra environment variables for the node.
    pub fn start_with_env(&mut self, name: &str, file: &str, env: &[(&str, &str)]) {
        let topology = self.dir.path().join(file);
        let node = self.node_mut(name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).expect("log file");
        let child = Command::new(drmesh_bin())
            .args(["--log", "info,drmesh_actors=debug", "run", "--state-dir"])
            .arg(&node.state_dir)
            .arg("--topology")
            .arg(&topology)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
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

// ---------------------------------------------------------------------------
// Replication data plane helpers: volumes and policies in the topology,
// deterministic images, hashes, sync-now / rps / restore / verify.
// ---------------------------------------------------------------------------

/// A small seeded PRNG (xorshift64*): the same seed gives the same images and kill delays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point).
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with incompressible bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Fills `buf` with text-like (well compressible, but not constant) bytes.
    pub fn fill_text(&mut self, buf: &mut [u8]) {
        const WORDS: [&str; 16] = [
            "replication ", "block ", "recovery ", "point ", "mesh ", "target ", "source ", "the ",
            "of ", "and ", "volume\n", "snapshot ", "disk ", "drmesh ", "commit ", "store ",
        ];
        let mut i = 0;
        while i < buf.len() {
            let w = WORDS[self.below(WORDS.len() as u64) as usize].as_bytes();
            let n = w.len().min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
    }
}

/// A deterministic test image of `len` bytes: regions (64 KiB to 1 MiB) of random
/// bytes, text-like bytes and zeros.
pub fn build_image(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut image = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let region = ((64 << 10) + rng.below(960 << 10) as usize).min(len - at);
        match rng.below(3) {
            0 => rng.fill(&mut image[at..at + region]),
            1 => rng.fill_text(&mut image[at..at + region]),
            _ => {} // zeros
        }
        at += region;
    }
    image
}

/// Overwrites `pages` random 4 KiB pages of `image` with random bytes; returns their offsets.
pub fn churn_pages(rng: &mut Rng, image: &mut [u8], pages: usize) -> Vec<usize> {
    let page_count = image.len() / 4096;
    let mut offsets = Vec::new();
    for _ in 0..pages {
        let off = rng.below(page_count as u64) as usize * 4096;
        rng.fill(&mut image[off..off + 4096]);
        offsets.push(off);
    }
    offsets
}

/// blake3 of `data`, hex.
pub fn hash_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// blake3 of a file's bytes, hex.
pub fn file_hash(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hash_hex(&data)
}

/// Writes `data` to `path` atomically (temp file + fsync + rename), so a cycle that
/// opens the image sees either the old or the new version, never a mix.
pub fn write_image_atomic(path: &Path, data: &[u8]) {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".writing");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).unwrap_or_else(|e| panic!("creating {}: {e}", tmp.display()));
    f.write_all(data).expect("writing image");
    f.sync_all().expect("fsync image");
    std::fs::rename(&tmp, path).expect("renaming image into place");
}

/// Makes a 32-byte random key file of mode 0600 at `path`.
pub fn write_key_file(path: &Path, rng: &mut Rng) {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    rng.fill(&mut key);
    std::fs::write(path, key).expect("writing key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600 key file");
}

/// One `[policy.NAME]` as a test wants it written.
#[derive(Debug, Clone, Default)]
pub struct PolicySpec {
    pub name: String,
    /// e.g. "1h" (only sync-now then triggers cycles).
    pub rpo: String,
    pub block_size: Option<String>,
    pub compression: Option<String>,
    pub encryption_key_file: Option<PathBuf>,
    pub keep_last: Option<u32>,
}

impl PolicySpec {
    /// rpo 1h, the given block size, everything else default.
    pub fn new(name: &str, block_size: &str) -> PolicySpec {
        PolicySpec { name: name.into(), rpo: "1h".into(), block_size: Some(block_size.into()), ..PolicySpec::default() }
    }

    pub fn text(&self) -> String {
        let mut t = format!("\n[policy.{}]\nrpo = \"{}\"\n", self.name, self.rpo);
        if let Some(b) = &self.block_size {
            t.push_str(&format!("block_size = \"{b}\"\n"));
        }
        if let Some(c) = &self.compression {
            t.push_str(&format!("compression = \"{c}\"\n"));
        }
        if let Some(k) = &self.encryption_key_file {
            t.push_str(&format!("encryption_key_file = \"{}\"\n", k.display()));
        }
        if let Some(n) = self.keep_last {
            t.push_str(&format!("retention = {{ keep_last = {n} }}\n"));
        }
        t
    }
}

/// One `[[volume]]` of kind "file".
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: String,
    pub source: String,
    pub targets: Vec<String>,
    pub path: PathBuf,
    pub policy: String,
}

impl VolumeSpec {
    pub fn new(name: &str, source: &str, targets: &[&str], path: &Path, policy: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            source: source.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            path: path.to_path_buf(),
            policy: policy.into(),
        }
    }

    pub fn text(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(|t| format!("\"{t}\"")).collect();
        format!(
            "\n[[volume]]\nname = \"{}\"\nsource = \"{}\"\nkind = \"file\"\npath = \"{}\"\ntargets = [{}]\npolicy = \"{}\"\n",
            self.name,
            self.source,
            self.path.display(),
            targets.join(", "),
            self.policy
        )
    }
}

/// Parses `drmesh ctl ... --json` output: `Ok(data)` when ok, `Err(error text)` otherwise.
pub fn parse_ctl_json(out: &Output) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "no JSON answer ({e}); status {:?}, stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if v["ok"] == true {
        Ok(v["data"].clone())
    } else {
        Err(v["error"].as_str().map(String::from).unwrap_or_else(|| v.to_string()))
    }
}

/// The result of `drmesh restore|verify --json`: the last line of its output is
/// `{"ok": true, "data": REPORT}` (progress lines come before it); `Err` carries
/// the error text when it failed.
pub fn restore_result(out: &Output) -> Result<Value, String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: Value = serde_json::from_str(last).map_err(|e| format!("no JSON result ({e}); stdout {text:?}, stderr {:?}", String::from_utf8_lossy(&out.stderr)))?;
    if v["ok"] == true {
        Ok(v["data"].clone())
    } else {
        Err(v["error"].as_str().map(String::from).unwrap_or_else(|| v.to_string()))
    }
}

/// The names in folder `dir`, sorted (to show that a failed restore left nothing there).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The progress events (`{"progress": {...}}` lines) of `drmesh restore|verify --json`.
pub fn restore_progress(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("progress").cloned())
        .collect()
}

/// A command's stdout then stderr, as one text (for assertions and messages).
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Sum of a stats counter over the reports of a sync-now answer.
pub fn report_stat(sync: &Value, key: &str) -> u64 {
    sync["reports"].as_array().into_iter().flatten().map(|r| r["stats"][key].as_u64().unwrap_or(0)).sum()
}

/// The seq of the (only) report of a sync-now answer.
pub fn report_seq(sync: &Value) -> u64 {
    let reports = sync["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 1, "expected one target's report: {sync}");
    reports[0]["seq"].as_u64().expect("seq")
}

impl TestMesh {
    /// `standard_topology` plus volumes and policies.
    pub fn replication_topology(&self, version: u64, names: &[&str], volumes: &[VolumeSpec], policies: &[PolicySpec]) -> String {
        let mut text = self.standard_topology(version, names);
        for v in volumes {
            text.push_str(&v.text());
        }
        for p in policies {
            text.push_str(&p.text());
        }
        text
    }

    /// `drmesh ctl --state-dir DIR ARGS --json`, parsed.
    pub fn ctl_data(&self, name: &str, args: &[&str]) -> Result<Value, String> {
        let mut all = args.to_vec();
        all.push("--json");
        parse_ctl_json(&self.ctl(name, &all))
    }

    /// `ctl sync-now VOLUME --json` on `name`: the answer's data, or its error text.
    pub fn sync_now(&self, name: &str, volume: &str) -> Result<Value, String> {
        self.ctl_data(name, &["sync-now", volume])
    }

    /// `sync-now` that must succeed for every target.
    pub fn sync_ok(&self, name: &str, volume: &str) -> Value {
        let data = self.sync_now(name, volume).unwrap_or_else(|e| panic!("sync-now {volume} on {name} failed: {e}\n--- {name} log:\n{}", self.node(name).log_text()));
        assert!(data["errors"].as_array().is_none_or(|e| e.is_empty()), "sync-now {volume}: {data}");
        data
    }

    /// The RPs of `volume` that `name` holds, oldest first.
    pub fn rps(&self, name: &str, volume: &str) -> Vec<Value> {
        let data = self.ctl_data(name, &["rps", volume]).unwrap_or_else(|e| panic!("rps on {name}: {e}"));
        data.as_array().cloned().unwrap_or_default()
    }

    /// Seqs of the RPs of `volume` that `name` holds.
    pub fn rp_seqs(&self, name: &str, volume: &str) -> Vec<u64> {
        self.rps(name, volume).iter().map(|r| r["seq"].as_u64().expect("seq")).collect()
    }

    /// `drmesh restore RP --to PATH --state-dir DIR [--from NODE] --json`.
    pub fn restore(&self, name: &str, rp: &str, to: &Path, from: Option<&str>) -> Output {
        let dir = self.node(name).state_dir.to_str().expect("utf8").to_string();
        let to = to.to_str().expect("utf8").to_string();
        let mut args = vec!["restore", rp, "--to", to.as_str(), "--state-dir", dir.as_str(), "--json"];
        if let Some(f) = from {
            args.extend(["--from", f]);
        }
        drmesh(&args)
    }

    /// Restores `rp` on `name` to a fresh file in the mesh directory and returns the file's hash.
    pub fn restore_hash(&self, name: &str, rp: &str, from: Option<&str>) -> String {
        let to = self.dir.path().join(format!("restored-{}-{}.img", name, rp.replace('@', "-")));
        let _ = std::fs::remove_file(&to);
        let out = self.restore(name, rp, &to, from);
        assert!(
            out.status.success(),
            "restore {rp} on {name} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let hash = file_hash(&to);
        std::fs::remove_file(&to).expect("removing restored image");
        hash
    }

    /// `drmesh verify RP --state-dir DIR [--from NODE] --json`.
    pub fn verify(&self, name: &str, rp: &str, from: Option<&str>) -> Output {
        let dir = self.node(name).state_dir.to_str().expect("utf8").to_string();
        let mut args = vec!["verify", rp, "--state-dir", dir.as_str(), "--json"];
        if let Some(f) = from {
            args.extend(["--from", f]);
        }
        drmesh(&args)
    }

    /// Starts `drmesh ctl --state-dir DIR ARGS --json` in the background (stdout piped).
    pub fn spawn_ctl(&self, name: &str, args: &[&str]) -> Child {
        Command::new(drmesh_bin())
            .arg("ctl")
            .arg("--state-dir")
            .arg(&self.node(name).state_dir)
            .args(args)
            .arg("--json")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn drmesh ctl")
    }

    /// `ctl store --json` of `name`.
    pub fn store_stats(&self, name: &str) -> Value {
        self.ctl_data(name, &["store"]).unwrap_or_else(|e| panic!("store on {name}: {e}"))
    }
}

/// Every blob file under `<state_dir>/store/blobs`.
pub fn blob_files(state_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&state_dir.join("store").join("blobs"), &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// Real block devices for recovery tests (root only).
// ---------------------------------------------------------------------------

/// Whether the tests run as root (loop devices, mounts); tests that need it skip otherwise.
pub fn is_root() -> bool {
    // The owner of /proc/self is the process' effective user.
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over a file (`losetup --find`), detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` (an existing file) to a free loop device.
    pub fn attach(backing: &Path) -> LoopDevice {
        let out = run_ok(Command::new("losetup").arg("--find").arg("--show").arg(backing));
        LoopDevice { path: PathBuf::from(out.trim()), backing: backing.to_path_buf() }
    }

    /// A new file of `bytes` (sparse, zeros) attached to a loop device.
    pub fn new_file(backing: &Path, bytes: u64) -> LoopDevice {
        std::fs::File::create(backing).expect("create backing file").set_len(bytes).expect("size backing file");
        LoopDevice::attach(backing)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A mount, unmounted (lazily if busy) on drop.
pub struct Mount {
    pub point: PathBuf,
}

impl Mount {
    /// `mount ARGS... POINT` (POINT is created).
    pub fn new(args: &[&str], point: &Path) -> Mount {
        std::fs::create_dir_all(point).expect("mount point");
        run_ok(Command::new("mount").args(args).arg(point));
        Mount { point: point.to_path_buf() }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.point).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

// ---------------------------------------------------------------------------
// Drills: `drmesh drill`, a policy's drill table, the gossiped catalog.
// ---------------------------------------------------------------------------

/// A `[policy.POLICY.drill]` table with `keys` (TOML lines, sub-tables after
/// them written in full, e.g. `[policy.p.drill.postgres]`), to append to a
/// topology text after the policy's own table.
pub fn drill_table(policy: &str, keys: &str) -> String {
    format!("\n[policy.{policy}.drill]\n{}\n", keys.trim())
}

impl TestMesh {
    /// `drmesh drill RP --state-dir DIR [--checks A,B] --json` asked of node
    /// `name`; read the report with [`restore_result`] (its last line).
    pub fn drill(&self, name: &str, rp: &str, checks: &[&str]) -> Output {
        let dir = self.node(name).state_dir.to_str().expect("utf8").to_string();
        let joined = checks.join(",");
        let mut args = vec!["drill", rp, "--state-dir", dir.as_str(), "--json"];
        if !checks.is_empty() {
            args.extend(["--checks", joined.as_str()]);
        }
        drmesh(&args)
    }

    /// `ctl catalog --json` of `name` (the gossiped mesh-wide view).
    pub fn catalog(&self, name: &str) -> Value {
        self.ctl_data(name, &["catalog"]).unwrap_or_else(|e| panic!("ctl catalog on {name}: {e}"))
    }

    /// The `volumes[]` entry of `volume` in `name`'s catalog, if listed.
    pub fn catalog_volume(&self, name: &str, volume: &str) -> Option<Value> {
        self.catalog(name)["volumes"].as_array()?.iter().find(|v| v["volume"] == volume).cloned()
    }
}

/// The bootable Debian disk image of the recovery tests (built once by
/// scripts/recovery-image and cached outside the repository) and its
/// manifest's key=value pairs; None, with the reason printed, without root
/// (loop devices, mounts) or qemu.
pub fn debian_image() -> Option<(PathBuf, Vec<(String, String)>)> {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mounts)");
        return None;
    }
    if Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/kmod-env or scripts/recovery-image installs it)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("scripts/recovery-image");
    let out = Command::new(&script).arg("--print-path").output().expect("run scripts/recovery-image");
    assert!(out.status.success(), "scripts/recovery-image failed: {}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().expect("image path"));
    let manifest = std::fs::read_to_string(path.with_extension("manifest")).expect("manifest");
    let kv = manifest.lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    Some((path, kv))
}

/// The value of `key` in a manifest read by [`debian_image`] ("" if absent).
pub fn manifest_get<'a>(m: &'a [(String, String)], key: &str) -> &'a str {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_default()
}

/// A file system image mounted through a loop device (`mount -o loop`);
/// unmounted on drop (lazily if something still holds it). Needs root.
pub struct LoopMount {
    mountpoint: PathBuf,
}

impl LoopMount {
    /// Mounts the file system in `image` at `mountpoint` (an existing directory).
    pub fn new(image: &Path, mountpoint: &Path) -> LoopMount {
        run_ok(Command::new("mount").arg("-o").arg("loop").arg(image).arg(mountpoint));
        LoopMount { mountpoint: mountpoint.to_path_buf() }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mountpoint).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            // Something still holds it open: detach lazily so the loop device goes away later.
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// A small file system in an image file, loop-mounted; unmounted (and its
/// image removed) on drop. Needs root.
pub struct LoopFs {
    // Unmounted before the folder holding its image goes.
    mount: LoopMount,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// An ext4 file system of `mib` MiB.
    pub fn new(mib: u64) -> LoopFs {
        LoopFs::with_mkfs(mib, &["mkfs.ext4", "-q", "-F"])
    }

    /// A file system of `mib` MiB made by `mkfs` (program and options; the
    /// image's path is added last), e.g. `["mkfs.xfs", "-q", "-m", "reflink=1"]`.
    pub fn with_mkfs(mib: u64, mkfs: &[&str]) -> LoopFs {
        let dir = tempfile::Builder::new().prefix("drmesh-loopfs-").tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        run_ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image));
        LoopFs { mount: LoopMount::new(&image, &mountpoint), _dir: dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}

/// Starts qemu (TCG, 1 GiB, 2 CPUs, no display) on a raw disk as IDE, its
/// serial console written to `serial_log`; `snapshot`: the VM's writes go
/// to a temporary overlay, never to `disk`.
pub fn spawn_qemu_ide(disk: &Path, snapshot: bool, serial_log: &Path) -> Child {
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none", "-no-user-config"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide{}", disk.display(), if snapshot { ",snapshot=on" } else { "" }))
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64")
}
