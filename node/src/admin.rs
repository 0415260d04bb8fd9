//! The admin socket: `<state-dir>/admin.sock`, a Unix socket of mode 0600 that
//! speaks JSON lines. Each request line `{"cmd": "..."}` gets one response line
//! `{"ok": true, "api_version": 1, "data": ...}` or `{"ok": false, "api_version": 1, "error": "...", "details": [...]}`.
//! docs/admin-socket.md documents every command.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use actix::Addr;
use anyhow::{bail, Context as _};
use drmesh_actors::actor::mesh::{GetStatus, MeshActor};
use drmesh_actors::blob::{RpSeq, VolumeName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use std::sync::Arc;

use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::actor::gossip::{GetCatalog, GetMesh, GossipActor};
use drmesh_actors::actor::volumes::VolumeScheduler;
use tokio::sync::mpsc;

use crate::data;
use crate::reload::{GetLastReload, LastReload, Reload, ReloadTrigger, Reloader};

/// File name of the admin socket inside the state directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// Longest request line accepted, in bytes; longer lines close the connection.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Node, topology and peers.
    Status,
    /// Peers only.
    Peers,
    /// Re-read the topology file now.
    Reload,
    /// Run a replication cycle of a volume now (this node must be its source).
    SyncNow {
        /// Volume name.
        volume: VolumeName,
    },
    /// Replication status of the volumes this node is the source of.
    Volumes,
    /// Stop replicating volumes (this node must be their source) until `resume`.
    Pause {
        /// Volume names.
        #[serde(default)]
        volumes: Vec<VolumeName>,
        /// Every volume this node is the source of.
        #[serde(default)]
        all: bool,
    },
    /// Resume paused volumes: a cycle starts at once.
    Resume {
        /// Volume names.
        #[serde(default)]
        volumes: Vec<VolumeName>,
        /// Every volume this node is the source of.
        #[serde(default)]
        all: bool,
    },
    /// Recovery points held by this node's store.
    Rps {
        /// Only this volume.
        #[serde(default)]
        volume: Option<VolumeName>,
    },
    /// The consistency groups' RPs held by this node's store, newest first.
    Groups {
        /// Only this group.
        #[serde(default)]
        group: Option<String>,
    },
    /// Run garbage collection of the store now.
    Gc {
        /// Blobs younger than this are kept (seconds).
        #[serde(default)]
        grace_secs: Option<u64>,
        /// Only say what would be deleted.
        #[serde(default)]
        dry_run: bool,
    },
    /// Restore a recovery point to an image file (progress lines precede the answer).
    Restore {
        /// Volume name.
        volume: VolumeName,
        /// Sequence number; newest when absent.
        #[serde(default)]
        seq: Option<RpSeq>,
        /// Absolute path of the image to write.
        to: PathBuf,
        /// Node to read the RP from; this node's store, then the volume's targets, when absent.
        #[serde(default)]
        from: Option<String>,
        /// Replace an existing file, or overwrite a device that holds a filesystem.
        #[serde(default)]
        force: bool,
    },
    /// Re-read and check every blob of a recovery point (progress lines precede the answer).
    Verify {
        /// Volume name.
        volume: VolumeName,
        /// Sequence number; newest when absent.
        #[serde(default)]
        seq: Option<RpSeq>,
        /// Node to read the RP from, as for restore.
        #[serde(default)]
        from: Option<String>,
    },
    /// What retention keeps and would delete now, per volume held here,
    /// deleting nothing (a dry run).
    Retention {
        /// Only this volume.
        #[serde(default)]
        volume: Option<VolumeName>,
        /// Judge with the policies of this topology file (absolute path)
        /// instead of the one in force: a preview of an edit.
        #[serde(default)]
        topology: Option<PathBuf>,
    },
    /// Store figures: blobs, bytes, RPs.
    Store,
    /// Scrub the store now: read its blobs again (all, or a share) and check
    /// every RP's block map; answers with the report.
    Scrub {
        /// Percent of the blobs to read (1..=100); all when absent.
        #[serde(default)]
        sample_percent: Option<u32>,
    },
    /// The newest scrub verdict of each RP (of one volume, or all).
    Scrubs {
        /// Only this volume.
        #[serde(default)]
        volume: Option<VolumeName>,
    },
    /// Serve a recovery point over NBD until the client of this request hangs up
    /// (a progress line says where, before it waits).
    Export {
        /// Volume name.
        volume: VolumeName,
        /// Sequence number; newest when absent.
        #[serde(default)]
        seq: Option<RpSeq>,
        /// Node to read the RP from, as for restore.
        #[serde(default)]
        from: Option<String>,
        /// Unix socket to listen on; default `<state-dir>/exports/VOLUME@SEQ.sock`.
        #[serde(default)]
        socket: Option<PathBuf>,
        /// Loopback TCP address to listen on instead of a Unix socket.
        #[serde(default)]
        listen: Option<String>,
        /// Overlay file (kept; reopened if it exists); default a temporary one.
        #[serde(default)]
        overlay: Option<PathBuf>,
        /// Refuse writes instead of keeping them in an overlay.
        #[serde(default)]
        read_only: bool,
    },
    /// The kernel module's view of this node's `kmod` volumes: attached
    /// devices, bitmap size, COW store use, changes pending per target.
    AgentStatus,
    /// Drill a recovery point this node holds now (queued behind running
    /// drills; progress lines precede the report).
    Drill {
        /// Volume name.
        volume: VolumeName,
        /// Sequence number; newest held when absent.
        #[serde(default)]
        seq: Option<RpSeq>,
        /// Check names; the policy's when empty.
        #[serde(default)]
        checks: Vec<String>,
    },
    /// Drill reports kept here, running and waiting drills, next scheduled ones.
    Drills {
        /// Only this volume.
        #[serde(default)]
        volume: Option<VolumeName>,
    },
}

/// A request line for the gossip replica (`mesh`, `catalog`), parsed before [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum GossipRequest {
    /// Every node of the mesh as gossip sees it: alive/suspect/down, last heard, status, freshness.
    Mesh,
    /// The mesh-wide recovery-point catalog from the local replica, with RPO per volume.
    Catalog {
        /// Only this volume.
        #[serde(default)]
        volume: Option<VolumeName>,
    },
}

/// The version of the JSON shape of the answers (`api_version` of every
/// envelope, docs/admin-socket.md): raised when a field is renamed or removed
/// or changes meaning; new fields may appear within one version.
pub const API_VERSION: u32 = 1;

/// A response line, and the envelope every `--json` output prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// [`API_VERSION`] of the node that answered (0: a node older than the field).
    #[serde(default)]
    pub api_version: u32,
    /// The command's result when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// What went wrong when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Further lines (e.g. every topology error with file:line:column).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Response {
    /// A success with `value` as its data.
    pub fn data(value: impl Serialize) -> Response {
        match serde_json::to_value(value) {
            Ok(v) => Response { ok: true, api_version: API_VERSION, data: Some(v), error: None, details: vec![] },
            Err(e) => Response::error(format!("cannot encode the answer: {e}"), vec![]),
        }
    }

    /// A failure saying what went wrong.
    pub fn error(error: String, details: Vec<String>) -> Response {
        Response { ok: false, api_version: API_VERSION, data: None, error: Some(error), details }
    }

    /// The envelope as one JSON line.
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"ok\":false,\"api_version\":{API_VERSION},\"error\":\"cannot encode the answer: {e}\"}}"))
    }
}

/// Everything the admin server talks to.
#[derive(Clone)]
pub struct AdminContext {
    /// The mesh actor.
    pub mesh: Addr<MeshActor>,
    /// The topology reloader.
    pub reloader: Addr<Reloader>,
    /// The volume scheduler (source side).
    pub scheduler: Addr<VolumeScheduler>,
    /// The data plane (store, topology in force).
    pub data: Arc<DataPlane>,
    /// The gossip actor (membership, RP catalog).
    pub gossip: Addr<GossipActor>,
    /// The node's state directory (journal of interrupted restores).
    pub state_dir: PathBuf,
    /// The drill runner.
    pub drills: Addr<crate::drill::runner::DrillRunner>,
}

/// Fails if a node is already running on `state_dir` (its admin socket answers);
/// removes a stale socket left by a crash.
pub fn check_not_running(state_dir: &Path) -> anyhow::Result<()> {
    let path = state_dir.join(SOCKET_FILE);
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => bail!("another drmesh node is already running with state dir {} (its admin socket {} answers)", state_dir.display(), path.display()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound => {
                tracing::info!(socket = %path.display(), "removing stale admin socket left by an earlier run");
                std::fs::remove_file(&path).with_context(|| format!("removing stale admin socket {}", path.display()))?;
            }
            Err(e) => bail!("cannot check existing admin socket {}: {e}", path.display()),
        }
    }
    Ok(())
}

/// Binds the admin socket in `state_dir` (after [`check_not_running`]), mode 0600.
pub fn bind(state_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    check_not_running(state_dir)?;
    let path = state_dir.join(SOCKET_FILE);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding admin socket {}", path.display()))?;
    // The state dir is 0700 already, so nobody else can reach the socket before this.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok((listener, path))
}

/// Serves admin connections until the listener is dropped.
pub async fn serve(listener: UnixListener, ctx: AdminContext) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                actix_rt::spawn(async move {
                    if let Err(e) = serve_connection(stream, ctx).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, ctx: AdminContext) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let response = if n > MAX_REQUEST_BYTES {
            let r = Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"), vec![]);
            write.write_all(encode(&r).as_bytes()).await?;
            return Ok(());
        } else if line.trim().is_empty() {
            continue;
        } else {
            if let Ok(request) = serde_json::from_str::<GossipRequest>(&line) {
                let response = handle_gossip(request, &ctx).await;
                write.write_all(encode(&response).as_bytes()).await?;
                continue;
            }
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    // Long commands report progress as lines of their own before the answer.
                    let (progress_tx, mut progress_rx) = mpsc::channel::<serde_json::Value>(16);
                    // An export serves until its client hangs up. Other commands run to
                    // the end even if the client closed its sending side after the
                    // request (`nc -N` does), as they always did.
                    let mut watch_eof = matches!(request, Request::Export { .. });
                    let handling = handle(request, &ctx, progress_tx);
                    tokio::pin!(handling);
                    let response = loop {
                        tokio::select! {
                            response = &mut handling => break response,
                            Some(p) = progress_rx.recv() => {
                                let mut text = serde_json::json!({ "progress": p }).to_string();
                                text.push('\n');
                                write.write_all(text.as_bytes()).await?;
                            }
                            more = reader.fill_buf(), if watch_eof => match more {
                                Ok([]) | Err(_) => return Ok(()),
                                // The next request is already here: it waits for this one's answer.
                                Ok(_) => watch_eof = false,
                            },
                        }
                    };
                    // Progress sent just before the answer still goes out, before it.
                    while let Ok(p) = progress_rx.try_recv() {
                        let mut text = serde_json::json!({ "progress": p }).to_string();
                        text.push('\n');
                        write.write_all(text.as_bytes()).await?;
                    }
                    response
                }
                Err(e) => Response::error(
                    format!(
                        "bad request: {e}; expected a JSON object like {{\"cmd\": \"status\"}} \
                         (commands: status, peers, reload, sync-now, volumes, pause, resume, rps, groups, gc, restore, verify, export, store, agent-status, drill, drills, mesh, catalog)"
                    ),
                    vec![],
                ),
            }
        };
        write.write_all(encode(&response).as_bytes()).await?;
    }
}

fn encode(response: &Response) -> String {
    let mut text = response.line();
    text.push('\n');
    text
}

/// The `status` answer: the mesh status plus the last reload's outcome.
#[derive(Serialize)]
struct Status {
    #[serde(flatten)]
    mesh: drmesh_actors::actor::mesh::MeshStatus,
    last_reload: Option<LastReload>,
}

async fn handle_gossip(request: GossipRequest, ctx: &AdminContext) -> Response {
    let answer = match request {
        GossipRequest::Mesh => ctx.gossip.send(GetMesh).await.map(Response::data),
        GossipRequest::Catalog { volume } => ctx.gossip.send(GetCatalog(volume)).await.map(Response::data),
    };
    answer.unwrap_or_else(|e| Response::error(format!("node is shutting down: {e}"), vec![]))
}

async fn handle(request: Request, ctx: &AdminContext, progress: mpsc::Sender<serde_json::Value>) -> Response {
    let gone = |e: actix::MailboxError| Response::error(format!("node is shutting down: {e}"), vec![]);
    match request {
        Request::Status => {
            let mesh = match ctx.mesh.send(GetStatus).await {
                Ok(s) => s,
                Err(e) => return gone(e),
            };
            let last_reload = ctx.reloader.send(GetLastReload).await.ok().flatten();
            Response::data(Status { mesh, last_reload })
        }
        Request::Peers => match ctx.mesh.send(GetStatus).await {
            Ok(s) => Response::data(s.peers),
            Err(e) => gone(e),
        },
        Request::Reload => match ctx.reloader.send(Reload(ReloadTrigger::Admin)).await {
            Ok(Ok(outcome)) => Response::data(outcome),
            Ok(Err(failure)) => Response::error(failure.error, failure.details),
            Err(e) => gone(e),
        },
        other => match data::handle(other, ctx, progress).await {
            Ok(value) => Response::data(value),
            Err(e) => Response::error(e, vec![]),
        },
    }
}
