//! `drmesh demo`: the main job of the README, with no external services.
//!
//! In a temporary directory it makes two node identities (a branch node and a
//! DR node), writes a topology for them on loopback, starts both as real
//! `drmesh run` processes, waits until each sees the other connected over
//! mutually authenticated QUIC, prints both nodes' status and stops them with
//! SIGTERM, checking that they shut down cleanly.

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
    let dir = tempfile::Builder::new().prefix("drmesh-demo-").tempdir().context("creating a temporary directory")?;
    let root = dir.path().to_path_buf();
    let result = demo(&root, &args);
    if args.keep || result.is_err() {
        let kept = dir.keep();
        println!("\nfiles kept in {}", kept.display());
    }
    result
}

fn demo(root: &Path, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the drmesh binary")?;
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
    std::fs::write(&topology, format!("# drmesh demo: two nodes on loopback\n[mesh]\nname = \"demo\"\nversion = 1\n{blocks}"))?;
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
    println!("started both nodes; waiting for them to connect over QUIC with mutual TLS ...");

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
    println!("connected after {:.2} s\n", started.elapsed().as_secs_f64());

    for node in &nodes {
        println!("== drmesh ctl --state-dir {} status", node.state_dir.display());
        let status = ctl::request(&node.socket(), &Request::Status)?;
        ctl::print_status(&status.data.unwrap_or_default());
        println!();
    }

    for node in &mut nodes {
        node.stop()?;
        if node.socket().exists() {
            bail!("node {} left its admin socket behind", node.name);
        }
    }
    println!("both nodes stopped cleanly on SIGTERM (connections closed, admin sockets removed)");
    println!("demo OK");
    Ok(ExitCode::SUCCESS)
}
