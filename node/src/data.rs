//! Admin commands of the data plane: sync-now, volumes, rps, gc, restore, verify, store.

use std::sync::Arc;
use std::time::Duration;

use drmesh_actors::actor::fetch::FetchClient;
use drmesh_actors::actor::mesh::GetConnection;
use drmesh_actors::actor::volumes::{policy_codec, GetAgentStatus, GetReplications, Pause, Resume, SyncNow, VolumeSelection};
use drmesh_actors::codec::BlockCodec;
use drmesh_actors::export::fetcher::Connect;
use drmesh_actors::export::{open_disk, start as start_export};
use drmesh_actors::restore::{restore, Journal, Progress, RpSource, Rules, Target};

use crate::export::ExportRequest;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admin::{AdminContext, Request};

/// Default grace window of `ctl gc`: blobs younger than this are kept.
const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())
}

/// Handles the data-plane requests of the admin socket.
pub async fn handle(request: Request, ctx: &AdminContext, progress: mpsc::Sender<Value>) -> Result<Value, String> {
    let store = ctx.data.store().clone();
    match request {
        Request::SyncNow { volume } => {
            let results = ctx.scheduler.send(SyncNow(volume.clone())).await.map_err(|e| e.to_string())??;
            let mut reports = Vec::new();
            let mut errors = Vec::new();
            for r in results {
                match r {
                    Ok(report) => reports.push(report),
                    Err(e) => errors.push(e),
                }
            }
            if reports.is_empty() {
                return Err(format!("sync of {volume} failed: {}", errors.join("; ")));
            }
            Ok(json!({ "reports": reports, "errors": errors }))
        }
        Request::AgentStatus => {
            let devices = ctx.scheduler.send(GetAgentStatus).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(devices).map_err(|e| e.to_string())?)
        }
        Request::Volumes => Ok(serde_json::to_value(ctx.scheduler.send(GetReplications).await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?),
        Request::Pause { volumes, all } => {
            let outcome = ctx.scheduler.send(Pause(selection(volumes, all)?)).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(outcome).map_err(|e| e.to_string())?)
        }
        Request::Resume { volumes, all } => {
            let outcome = ctx.scheduler.send(Resume(selection(volumes, all)?)).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(outcome).map_err(|e| e.to_string())?)
        }
        Request::Rps { volume } => {
            let rps = blocking(move || -> Result<Vec<_>, String> {
                let volumes = match volume {
                    Some(v) => vec![v],
                    None => store.volumes().map_err(|e| e.to_string())?,
                };
                let mut all = Vec::new();
                for v in volumes {
                    let drills = store.latest_drills(&v).map_err(|e| e.to_string())?;
                    let good = drills.iter().rev().find(|(_, r)| r.verified).map(|(seq, _)| *seq);
                    for meta in store.rps(&v).map_err(|e| e.to_string())? {
                        let mut row = serde_json::to_value(&meta).map_err(|e| e.to_string())?;
                        // The newest report, without its output tails (`ctl drills` has them).
                        let drill = drills.get(&meta.seq).map(|r| {
                            let mut r = r.clone();
                            for c in &mut r.checks {
                                c.output.clear();
                            }
                            r
                        });
                        row["drill"] = serde_json::to_value(drill).map_err(|e| e.to_string())?;
                        row["last_known_good"] = json!(good == Some(meta.seq));
                        all.push(row);
                    }
                }
                Ok(all)
            })
            .await??;
            Ok(serde_json::to_value(rps).map_err(|e| e.to_string())?)
        }
        Request::Gc { grace_secs } => {
            let grace = grace_secs.map_or(DEFAULT_GC_GRACE, Duration::from_secs);
            let report = blocking(move || store.gc(grace)).await?.map_err(|e| e.to_string())?;
            tracing::info!(deleted = report.blobs_deleted, freed = report.bytes_freed, "garbage collection done");
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Store => Ok(serde_json::to_value(blocking(move || store.stats()).await?.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?),
        Request::Restore { volume, seq, to, from, force } => {
            if !to.is_absolute() {
                return Err(format!("restore destination {} must be an absolute path", to.display()));
            }
            let topology = ctx.data.topology();
            let me = topology.node_by_id(&ctx.data.local()).map(|n| n.name.clone()).unwrap_or_default();
            let target = Target { path: to, rules: Rules::for_node(&topology, &me, force), journal: Some(Journal::new(&ctx.state_dir)) };
            let report = read_rp(ctx, &volume, seq, from, Some(&target), progress).await?;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Export { volume, seq, from, socket, listen, overlay, read_only } => {
            let request = ExportRequest { volume, seq, from, socket, listen, overlay, read_only };
            serve_export(ctx, request, progress).await
        }
        Request::Verify { volume, seq, from } => {
            let report = read_rp(ctx, &volume, seq, from, None, progress).await?;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Drill { volume, seq, checks } => {
            let runner = crate::drill::runner::RequestDrill { volume, seq, checks, progress: progress.clone() };
            let (position, done) = ctx.drills.send(runner).await.map_err(|e| e.to_string())??;
            if position > 0 {
                let _ = progress.send(json!({ "queued": position })).await;
            }
            let report = done.await.map_err(|_| "the node stopped before the drill ended".to_string())??;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Drills { volume } => ctx.drills.send(crate::drill::runner::GetDrills(volume)).await.map_err(|e| e.to_string())?,
        Request::Status | Request::Peers | Request::Reload => Err("not a data-plane command".into()),
    }
}

/// The volumes of a pause or resume: named ones, or `all`, not both.
fn selection(volumes: Vec<String>, all: bool) -> Result<VolumeSelection, String> {
    match (all, volumes.is_empty()) {
        (true, true) => Ok(VolumeSelection::All),
        (true, false) => Err("give volume names or `all`, not both".into()),
        (false, true) => Err("name a volume, or give `all`".into()),
        (false, false) => Ok(VolumeSelection::Named(volumes)),
    }
}

/// How often a running restore or verify reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Where an RP's blocks come from on this node: its own store when it holds the
/// RP (and no other node was named), else the first reachable of the named node
/// or the volume's other targets. For a remote source, the holder's name and a
/// connector to the others (for an export that must survive a holder's loss).
async fn rp_source(ctx: &AdminContext, volume: &str, seq: Option<u64>, from: Option<String>) -> Result<(RpSource, Option<(String, Connect)>), String> {
    let topology = ctx.data.topology();
    let vol = topology.volumes.iter().find(|v| v.name == volume).ok_or_else(|| format!("volume {volume} is not in the topology"))?;
    let me = topology.node_by_id(&ctx.data.local()).map(|n| n.name.clone()).unwrap_or_default();
    let store = ctx.data.store().clone();
    let (v, s) = (volume.to_string(), seq);
    let held_here = blocking(move || match s {
        Some(seq) => store.rp(&v, seq).map(|r| r.is_some()),
        None => store.latest_rp(&v).map(|r| r.is_some()),
    })
    .await?
    .map_err(|e| e.to_string())?;
    let rp_name = format!("{volume}@{}", seq.map_or("latest".to_string(), |s| s.to_string()));
    let candidates: Vec<String> = match (&from, held_here) {
        (Some(node), _) if *node == me => vec![],
        (Some(node), _) => vec![node.clone()],
        (None, true) => vec![],
        (None, false) => vol.targets.iter().filter(|t| **t != me).cloned().collect(),
    };
    if candidates.is_empty() {
        if !held_here {
            return Err(format!("no recovery point {rp_name} on this node, and no other node holds {volume}"));
        }
        return Ok((RpSource::Local(ctx.data.store().clone()), None));
    }
    let mesh = ctx.mesh.clone();
    let holders = Arc::new(candidates.clone());
    let connect: Connect = Arc::new(move |i: usize| {
        let (mesh, holders) = (mesh.clone(), holders.clone());
        Box::pin(async move {
            let name = holders.get(i)?.clone();
            let opened = match mesh.send(GetConnection(name.clone())).await {
                Ok(Some((_, conn))) => FetchClient::open(&conn).await,
                Ok(None) => Err("not connected".to_string()),
                Err(e) => Err(e.to_string()),
            };
            Some((name, opened))
        })
    });
    let mut tried = Vec::new();
    for (i, node) in candidates.iter().enumerate() {
        match connect(i).await {
            Some((name, Ok(client))) => return Ok((RpSource::Remote(client), Some((name, connect.clone())))),
            Some((name, Err(e))) => tried.push(format!("{name} ({e})")),
            None => tried.push(node.clone()),
        }
    }
    let here = if held_here { "" } else { "not held by this node, and " };
    Err(format!("{rp_name}: {here}no holder is reachable: {}", tried.join(", ")))
}

/// The codec of `volume`'s policy (its key file when the policy encrypts).
fn volume_codec(ctx: &AdminContext, volume: &str) -> Result<BlockCodec, String> {
    let topology = ctx.data.topology();
    let vol = topology.volumes.iter().find(|v| v.name == volume).ok_or_else(|| format!("volume {volume} is not in the topology"))?;
    let policy = topology.policies.get(&vol.policy).ok_or_else(|| format!("policy {} is not in the topology", vol.policy))?;
    policy_codec(policy).map_err(|e| format!("reading {volume} needs the policy's key file: {e}"))
}

/// Restores or verifies an RP from this node's store or from a peer that holds it.
async fn read_rp(
    ctx: &AdminContext,
    volume: &str,
    seq: Option<u64>,
    from: Option<String>,
    target: Option<&Target>,
    progress: mpsc::Sender<Value>,
) -> Result<drmesh_actors::restore::RestoreReport, String> {
    let codec = volume_codec(ctx, volume)?;
    let (mut source, _) = rp_source(ctx, volume, seq, from).await?;
    let state = Arc::new(Progress::default());
    let work = restore(&mut source, volume, seq, &codec, target, &state);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let report = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = tick.tick() => {
                let _ = progress.try_send(json!(state.snapshot()));
            }
        }
    };
    report.map_err(|e| e.to_string())
}

/// Serves an RP over NBD until the admin client hangs up (this future is then dropped).
async fn serve_export(ctx: &AdminContext, request: ExportRequest, progress: mpsc::Sender<Value>) -> Result<Value, String> {
    let codec = volume_codec(ctx, &request.volume)?;
    let (source, failover) = rp_source(ctx, &request.volume, request.seq, request.from.clone()).await?;
    let exports_dir = crate::export::exports_dir(&ctx.state_dir).map_err(|e| e.to_string())?;
    let overlay = request.overlay_choice(&exports_dir);
    let disk = open_disk(source, &request.volume, request.seq, codec, &overlay, failover).await.map_err(|e| e.to_string())?;
    let endpoint = request.endpoint(&exports_dir, disk.name())?;
    let running = start_export(disk.clone(), endpoint).await.map_err(|e| e.to_string())?;
    let info = crate::export::describe(&disk, running.endpoint());
    tracing::info!(rp = %disk.name(), uri = %running.endpoint().uri(disk.name()), "export started");
    progress.send(json!({ "export": info })).await.map_err(|e| e.to_string())?;
    // Serves until the client hangs up; dropping `running` stops the server.
    std::future::pending::<()>().await;
    Ok(Value::Null)
}
