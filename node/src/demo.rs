//! `drmesh demo`: the main job of the README, with no external services.
//!
//! In a temporary directory it makes two node identities (a branch node and a
//! DR node at headquarters), a 512 MiB ext4 image filled with real files, and a
//! topology that protects the image with zstd and AES-256-GCM. It starts both
//! nodes as real `drmesh run` processes on loopback, runs an initial and three
//! incremental cycles while files in the image change (debugfs writes into the
//! image, no mount needed), restores the latest recovery point on the DR node,
//! checks that it is bit-identical and that e2fsck finds it clean, prints a
//! table per cycle, and stops both nodes with SIGTERM.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drmesh_transport::Identity;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::admin::{Request, SOCKET_FILE};
use crate::ctl;
use serde_json::Value;

/// Arguments of `drmesh demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the temporary directory (identities, topology, logs) for a look afterwards.
    #[arg(long)]
    keep: bool,
    /// Longest wait for the nodes to connect, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

struct DemoNode {
    name: &'static str,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl DemoNode {
    fn socket(&self) -> PathBuf {
        self.state_dir.join(SOCKET_FILE)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).with_context(|| format!("signalling {}", self.name))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status} after SIGTERM; see {}", self.name, self.log.display());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{} did not stop within 10 s of SIGTERM; see {}", self.name, self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `drmesh demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    for tool in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if which(tool).is_none() {
            bail!("the demo needs {tool} (Debian package e2fsprogs): apt-get install e2fsprogs");
        }
    }
    let dir = tempfile::Builder::new().prefix("drmesh-demo-").tempdir().context("creating a temporary directory")?;
    let root = dir.path().to_path_buf();
    let result = demo(&root, &args);
    if args.keep || result.is_err() {
        let kept = dir.keep();
        println!("\nfiles kept in {}", kept.display());
    }
    result
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> Command {
    Command::new(which(name).unwrap_or_else(|| PathBuf::from(name)))
}

fn run_tool(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Real files to write into the image between cycles: shared libraries of a few MiB, in name order.
fn change_files(count: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/bin"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| std::fs::metadata(p).map(|m| m.is_file() && (1 << 20..8 << 20).contains(&m.len())).unwrap_or(false))
        .collect();
    files.sort();
    files.truncate(count);
    files
}

fn build_image(image: &Path) -> anyhow::Result<()> {
    // /usr/bin holds a few hundred MiB of real programs: about half of the image.
    let source = ["/usr/bin", "/usr/share", "/usr/lib"].iter().map(PathBuf::from).find(|p| p.is_dir()).context("no /usr/bin to fill the image from")?;
    run_tool(tool("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-d"]).arg(&source).arg(image).arg("512M"), "mkfs.ext4 -d")?;
    Ok(())
}

/// Changes files in the image without mounting it: new files, a rewrite, a removal.
fn change_image(image: &Path, round: usize, files: &[PathBuf]) -> anyhow::Result<String> {
    let mut script = String::new();
    let mut said = Vec::new();
    if round == 1 {
        script.push_str("mkdir /drmesh-demo\n");
    }
    for (i, f) in files.iter().enumerate().skip((round - 1) * 3).take(3) {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("file{i}"));
        script.push_str(&format!("write {} /drmesh-demo/{name}\n", f.display()));
        said.push(format!("+{name}"));
    }
    if round >= 2 {
        // Remove one of the previous round's files.
        if let Some(f) = files.get((round - 2) * 3) {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            script.push_str(&format!("rm /drmesh-demo/{name}\n"));
            said.push(format!("-{name}"));
        }
    }
    let cmds = image.with_extension(format!("round{round}.debugfs"));
    std::fs::write(&cmds, script)?;
    run_tool(tool("debugfs").arg("-w").arg("-f").arg(&cmds).arg(image), "debugfs -w")?;
    Ok(said.join(" "))
}

fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn demo(root: &Path, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the drmesh binary")?;
    let image = root.join("branch-server.img");
    print!("building a 512 MiB ext4 image filled with real files ... ");
    build_image(&image)?;
    println!("done ({})", image.display());
    let key = root.join("demo.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret)).context("reading /dev/urandom")?;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key)?;
        f.write_all(&secret)?;
    }

    let mut blocks = String::new();
    let mut nodes = Vec::new();
    for (name, site) in [("branch", "branch-office"), ("dr", "headquarters")] {
        let state_dir = root.join(name);
        let identity = Identity::create(&state_dir, name, false)?;
        let port = free_udp_port()?;
        blocks.push('\n');
        blocks.push_str(&crate::init::node_block(name, &identity.node_id().to_string(), &[format!("127.0.0.1:{port}")], site));
        println!("node {name:<7} id {}  on 127.0.0.1:{port}", identity.node_id());
        nodes.push(DemoNode { name, log: root.join(format!("{name}.log")), state_dir, child: None });
    }
    let topology = root.join("topology.toml");
    std::fs::write(
        &topology,
        format!(
            "# drmesh demo: a branch server's disk replicated to the DR site\n[mesh]\nname = \"demo\"\nversion = 1\n{blocks}\n\
             [policy.demo]\nrpo = \"1h\"\nblock_size = \"1MiB\"\ncompression = \"zstd:1\"\nencryption_key_file = \"{}\"\n\n\
             [[volume]]\nname = \"branch-server\"\nsource = \"branch\"\nkind = \"file\"\npath = \"{}\"\ntargets = [\"dr\"]\npolicy = \"demo\"\n\
             # The demo checks the restore bit for bit, deleted files' blocks too, so it reads free space.\n\
             free_space = \"read\"\n",
            key.display(),
            image.display()
        ),
    )?;
    println!("topology written to {}", topology.display());

    for node in &mut nodes {
        let log = std::fs::File::create(&node.log)?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--topology")
            .arg(&topology)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}", node.name))?;
        node.child = Some(child);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    loop {
        let mut all = true;
        for node in &mut nodes {
            if let Some(child) = node.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("node {} exited early ({status}); its log:\n{}", node.name, std::fs::read_to_string(&node.log).unwrap_or_default());
                }
            }
            let connected = ctl::request(&node.socket(), &Request::Peers)
                .ok()
                .and_then(|r| r.data)
                .and_then(|d| d.as_array().cloned())
                .is_some_and(|peers| !peers.is_empty() && peers.iter().all(|p| p["state"] == "connected"));
            all &= connected;
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            bail!("the nodes did not connect within {} s; logs in {}", args.timeout_secs, root.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("nodes connected over QUIC with mutual TLS after {:.2} s\n", started.elapsed().as_secs_f64());

    let files = change_files(9);
    let mut reports: Vec<Value> = Vec::new();
    for round in 0..4 {
        let what = if round == 0 { "initial full sync".to_string() } else { format!("changed files: {}", change_image(&image, round, &files)?) };
        let response = ctl::request(&nodes[0].socket(), &Request::SyncNow { volume: drmesh_actors::blob::VolumeName::from_static("branch-server") })?;
        if !response.ok {
            bail!("cycle {round} failed: {}", response.error.unwrap_or_default());
        }
        let report = response.data.unwrap_or_default()["reports"][0].clone();
        println!("cycle {round}: {what}");
        reports.push(report);
    }
    println!();
    println!("{}", ctl::cycles_table(&reports));

    let restored = root.join("restored.img");
    let response = ctl::request(
        &nodes[1].socket(),
        &Request::Restore { volume: drmesh_actors::blob::VolumeName::from_static("branch-server"), seq: None, to: restored.clone(), from: None, force: false },
    )?;
    if !response.ok {
        bail!("restore failed: {}", response.error.unwrap_or_default());
    }
    let data = response.data.unwrap_or_default();
    println!(
        "\nrestored branch-server@{} on the DR node: {} blocks, Merkle root verified, {:.2} s",
        data["rp"]["seq"], data["blocks"], data["duration_secs"].as_f64().unwrap_or(0.0)
    );
    if !same_bytes(&image, &restored)? {
        bail!("the restored image differs from the source image");
    }
    println!("restored image is bit-identical to the source image");
    let fsck = tool("e2fsck").args(["-f", "-n"]).arg(&restored).output().context("running e2fsck")?;
    if !fsck.status.success() {
        bail!("e2fsck found problems in the restored image:\n{}", String::from_utf8_lossy(&fsck.stdout));
    }
    println!("e2fsck -f -n: clean");

    for node in &mut nodes {
        node.stop()?;
        if node.socket().exists() {
            bail!("node {} left its admin socket behind", node.name);
        }
    }
    println!("both nodes stopped cleanly on SIGTERM");
    println!("demo OK");
    Ok(ExitCode::SUCCESS)
}
