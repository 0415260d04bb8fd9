//! `drmesh export`: serve a recovery point as a disk over NBD (instant
//! recovery), through the running node or, with no node, straight from the
//! state dir's store; writes go to a copy-on-write overlay.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::export::{open_disk, start, Endpoint, ExportDisk, OverlayChoice};
use drmesh_actors::restore::RpSource;
use drmesh_actors::store::Store;
use serde_json::{json, Value};

use crate::admin::{Request, SOCKET_FILE};
use crate::ctl::bytes;
use crate::recover::{node_running, offline_codec, offline_topology, parse_rp, RpArgs};

/// Folder of export sockets and temporary overlays inside a state dir.
pub const EXPORTS_DIR: &str = "exports";

/// Arguments of `drmesh export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Unix socket to serve on (mode 0600); default STATE_DIR/exports/VOLUME@SEQ.sock.
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Serve on this loopback TCP address instead (e.g. 127.0.0.1:10809).
    #[arg(long)]
    listen: Option<String>,
    /// Keep the writes in this overlay file (reopened if it exists; it must
    /// belong to the same RP); default: a temporary overlay, gone at the end.
    #[arg(long, conflicts_with = "read_only")]
    overlay: Option<PathBuf>,
    /// Refuse writes instead of keeping them in an overlay.
    #[arg(long)]
    read_only: bool,
}

/// What the node is asked to serve (the fields of the admin `export` request).
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Volume name.
    pub volume: VolumeName,
    /// Sequence number; newest when None.
    pub seq: Option<RpSeq>,
    /// Node to read from.
    pub from: Option<String>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// Loopback TCP address.
    pub listen: Option<String>,
    /// Overlay file.
    pub overlay: Option<PathBuf>,
    /// No overlay: refuse writes.
    pub read_only: bool,
}

impl ExportRequest {
    /// Where writes go.
    pub fn overlay_choice(&self, exports_dir: &Path) -> OverlayChoice {
        match (&self.overlay, self.read_only) {
            (_, true) => OverlayChoice::ReadOnly,
            (Some(path), false) => OverlayChoice::File(path.clone()),
            (None, false) => OverlayChoice::Temporary(exports_dir.to_path_buf()),
        }
    }

    /// Where to listen, for the export named `name`.
    pub fn endpoint(&self, exports_dir: &Path, name: &str) -> Result<Endpoint, String> {
        match (&self.listen, &self.socket) {
            (Some(addr), _) => {
                let addr: SocketAddr = addr.parse().map_err(|e| format!("--listen {addr}: {e}; expected an address such as 127.0.0.1:10809"))?;
                Ok(Endpoint::Tcp(addr))
            }
            (None, Some(path)) => Ok(Endpoint::Unix(path.clone())),
            (None, None) => Ok(Endpoint::Unix(exports_dir.join(format!("{name}.sock")))),
        }
    }
}

/// `<state-dir>/exports`, made (mode 0700) if missing.
pub fn exports_dir(state_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = state_dir.join(EXPORTS_DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(e),
    }
}

/// What a client needs to know about a running export.
pub fn describe(disk: &ExportDisk, endpoint: &Endpoint) -> Value {
    let meta = disk.image().meta();
    let uri = endpoint.uri(disk.name());
    json!({
        "rp": meta,
        "name": disk.name(),
        "size_bytes": meta.volume_bytes,
        "uri": uri,
        "socket": match endpoint { Endpoint::Unix(p) => Some(p.clone()), Endpoint::Tcp(_) => None },
        "listen": match endpoint { Endpoint::Tcp(a) => Some(a.to_string()), Endpoint::Unix(_) => None },
        "writable": disk.writable(),
        "overlay": disk.overlay().filter(|o| !o.is_temporary()).map(|o| o.path().display().to_string()),
        "overlay_temporary": disk.overlay().is_some_and(|o| o.is_temporary()),
        "qemu_drive": format!("file.driver=nbd,file.export={},{},format=raw", disk.name(), match endpoint {
            Endpoint::Unix(p) => format!("file.server.type=unix,file.server.path={}", p.display()),
            Endpoint::Tcp(a) => format!("file.server.type=inet,file.server.host={},file.server.port={}", a.ip(), a.port()),
        }),
    })
}

fn print_info(info: &Value, json_out: bool) {
    if json_out {
        println!("{}", json!({ "export": info }));
    } else {
        let writes = match (info["overlay"].as_str(), info["overlay_temporary"] == true) {
            (Some(o), _) => format!("writes go to the overlay {o}; the recovery point is never written"),
            (None, true) => "writes go to a temporary overlay (gone at the end); the recovery point is never written".to_string(),
            (None, false) => "read-only".to_string(),
        };
        println!("exporting {} ({}, {} consistency) over NBD; {writes}", info["name"].as_str().unwrap_or(""), bytes(info["size_bytes"].as_u64().unwrap_or(0)), info["rp"]["consistency"].as_str().unwrap_or("?"));
        println!("  NBD URI:   {}", info["uri"].as_str().unwrap_or(""));
        println!("  qemu:      -drive {},if=virtio", info["qemu_drive"].as_str().unwrap_or(""));
        println!("  copy:      qemu-img convert -p -O qcow2 '{}' IMAGE.qcow2", info["uri"].as_str().unwrap_or(""));
        println!("stop with Ctrl-C");
    }
    let _ = std::io::stdout().flush();
}

/// A running export held open through the node's admin socket: dropping it
/// hangs up, and the node stops the export.
pub struct NodeExport {
    /// What the node said about it.
    pub info: Value,
    stream: UnixStream,
}

impl NodeExport {
    /// Waits until the node ends the export (it stopped, or failed): returns why.
    pub fn wait(self) -> String {
        let mut reader = BufReader::new(&self.stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return "the node closed the export (did it stop?)".into(),
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["ok"] == false {
                            return v["error"].as_str().unwrap_or("the export failed").to_string();
                        }
                    }
                }
            }
        }
    }
}

/// Asks the node on `state_dir` to export, and waits until it serves.
pub fn through_node(state_dir: &Path, request: &ExportRequest) -> anyhow::Result<NodeExport> {
    let socket = state_dir.join(SOCKET_FILE);
    let req = Request::Export {
        volume: request.volume.clone(),
        seq: request.seq,
        from: request.from.clone(),
        socket: request.socket.clone(),
        listen: request.listen.clone(),
        overlay: request.overlay.clone(),
        read_only: request.read_only,
    };
    let stream = crate::ctl::send_request(&socket, &req)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let v = crate::ctl::read_line(&mut reader, &socket)?;
        if let Some(info) = v.get("progress").and_then(|p| p.get("export")) {
            return Ok(NodeExport { info: info.clone(), stream });
        }
        if v["ok"] == false {
            bail!("{}", v["error"].as_str().unwrap_or("the node refused the export"));
        }
    }
}

/// Serves the export in this process from the state dir's store (no node), until
/// `until` resolves.
pub async fn serve_offline(args: &RpArgs, request: &ExportRequest, until: impl std::future::Future<Output = ()>, on_ready: impl FnOnce(&Value)) -> anyhow::Result<()> {
    let store = Arc::new(Store::open_read_only(&args.state_dir.join("store"))?);
    let topology = offline_topology(args)?;
    let encrypted = match request.seq {
        Some(s) => store.rp(&request.volume, s)?,
        None => store.latest_rp(&request.volume)?,
    }
    .map(|m| m.encrypted)
    .unwrap_or(false);
    let codec = offline_codec(args, topology.as_ref(), &request.volume, encrypted)?;
    let dir = exports_dir(&args.state_dir).with_context(|| format!("making {}/{EXPORTS_DIR}", args.state_dir.display()))?;
    let disk = open_disk(RpSource::Local(store), &request.volume, request.seq, codec, &request.overlay_choice(&dir), None).await?;
    let endpoint = request.endpoint(&dir, disk.name()).map_err(anyhow::Error::msg)?;
    let running = start(disk.clone(), endpoint).await?;
    on_ready(&describe(&disk, running.endpoint()));
    until.await;
    drop(running);
    disk.flush().await.map_err(|e| anyhow::anyhow!("flushing the overlay: {e}"))?;
    Ok(())
}

/// The export a recovery runs on: through the node, or served by this process.
pub enum Served {
    /// Through the node's admin socket.
    Node(NodeExport),
    /// Served by a thread of this process.
    Local { info: Value, stop: Option<tokio::sync::oneshot::Sender<()>>, thread: Option<std::thread::JoinHandle<anyhow::Result<()>>> },
}

impl Served {
    /// What the export said about itself.
    pub fn info(&self) -> &Value {
        match self {
            Served::Node(e) => &e.info,
            Served::Local { info, .. } => info,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Served::Local { stop, thread, .. } = self {
            if let Some(s) = stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = thread.take() {
                if let Ok(Err(e)) = t.join() {
                    eprintln!("warning: the export ended with an error: {e}");
                }
            }
        }
    }
}

/// Starts the export of `request`: through the node on the state dir, or, when
/// none runs there (or `--offline`), served by a thread of this process.
pub fn serve(args: &RpArgs, request: &ExportRequest) -> anyhow::Result<Served> {
    if args.offline || !node_running(&args.state_dir)? {
        if args.from.is_some() {
            bail!("--from reads over the mesh and needs a node running on {}", args.state_dir.display());
        }
        let (info_tx, info_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (args2, request2) = (args.clone(), request.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let tx = info_tx.clone();
            let result = runtime.block_on(serve_offline(&args2, &request2, async move { let _ = stop_rx.await; }, move |info| {
                let _ = tx.send(Ok(info.clone()));
            }));
            if let Err(e) = &result {
                let _ = info_tx.send(Err(e.to_string()));
            }
            result
        });
        return match info_rx.recv() {
            Ok(Ok(info)) => Ok(Served::Local { info, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the export stopped before it served"),
        };
    }
    Ok(Served::Node(through_node(&args.state_dir, request)?))
}

/// Runs `drmesh export`.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let (volume, seq) = parse_rp(&args.rp.rp)?;
    let overlay = args.overlay.as_ref().map(std::path::absolute).transpose()?;
    let socket = args.socket.as_ref().map(std::path::absolute).transpose()?;
    let request = ExportRequest { volume, seq, from: args.rp.from.clone(), socket, listen: args.listen.clone(), overlay, read_only: args.read_only };
    if args.rp.offline || !node_running(&args.rp.state_dir)? {
        if args.rp.from.is_some() {
            bail!("--from reads over the mesh and needs a node running on {}", args.rp.state_dir.display());
        }
        if !args.rp.json {
            eprintln!("no node answers on {}: serving its store directly (read-only store, writes to the overlay)", args.rp.state_dir.display());
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
        runtime.block_on(serve_offline(&args.rp, &request, stop_signal(), |info| print_info(info, args.rp.json)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let export = through_node(&args.rp.state_dir, &request)?;
    print_info(&export.info, args.rp.json);
    // Ctrl-C ends this process, which hangs up: the node stops the export.
    let why = export.wait();
    bail!("{why}")
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
