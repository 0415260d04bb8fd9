//! The applier: the target side of replication sessions.
//!
//! Each replication stream a peer opens is served by one task that drives a
//! [`TargetSession`] and does the store work it implies: lookups (which pin
//! what was reported present, promise 6), staging block-map changes, durable
//! blob writes in batches (a separate writer task, so reading the stream goes
//! on while a batch is synced), and the one-transaction commit (promise 1).
//! Only the volume's source node may replicate it, and only to its targets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drmesh_topology::{NodeId, Topology};
use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamKind, MAX_DATA_FRAME_BYTES};
use tokio::sync::{mpsc, oneshot};

use crate::actor::fetch;
use crate::actor::gossip::RpNews;
use crate::actor::mesh::StreamService;
use crate::actor::replicate::LinkPacers;
use crate::proto::session::{SourceMsg, TargetMsg, TargetSession};
use crate::store::{EncodedBlob, Retention, Store, StoreError};

/// Blobs gathered before one durable write (below the source's credit window,
/// so a full window always fills a batch).
const BATCH_BLOBS: usize = 32;
/// A partial batch is written when the stream has been quiet this long.
const BATCH_IDLE: Duration = Duration::from_millis(3);
/// Payload bytes gathered before one durable write.
const BATCH_BYTES: usize = 32 << 20;

/// What the node serves to peers: replication sessions into its store and fetches out of it.
pub struct DataPlane {
    store: Arc<Store>,
    topology: RwLock<Arc<Topology>>,
    local: NodeId,
    next_session: AtomicU64,
    gossip: OnceLock<actix::Recipient<RpNews>>,
    link_pacers: Arc<LinkPacers>,
}

impl DataPlane {
    /// A data plane over `store` for the node `local`.
    pub fn new(store: Arc<Store>, topology: Arc<Topology>, local: NodeId) -> Self {
        // Session ids only need to be unique within this process: the store drops
        // every session's leftovers when it opens.
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        let link_pacers = Arc::new(LinkPacers::new(Instant::now()));
        DataPlane { store, topology: RwLock::new(topology), local, next_session: AtomicU64::new(seed), gossip: OnceLock::new(), link_pacers }
    }

    /// The pacers of this node's `[[link]]` caps: the scheduler sets their
    /// rates, and fetch replies served to a peer keep to its link's.
    pub fn link_pacers(&self) -> &Arc<LinkPacers> {
        &self.link_pacers
    }

    /// Uses a new topology for authorization and policies from now on.
    pub fn set_topology(&self, topology: Arc<Topology>) {
        *self.topology.write().unwrap_or_else(|p| p.into_inner()) = topology;
    }

    /// The topology in force.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's id.
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// The store this node keeps RPs in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Where committed and pruned RPs are announced (the gossip actor); set once.
    pub fn set_gossip(&self, gossip: actix::Recipient<RpNews>) {
        let _ = self.gossip.set(gossip);
    }

    fn announce(&self, news: RpNews) {
        if let Some(g) = self.gossip.get() {
            g.do_send(news);
        }
    }
}

impl StreamService for Arc<DataPlane> {
    fn serve(&self, kind: StreamKind, peer: NodeId, send: quinn::SendStream, recv: quinn::RecvStream) {
        let plane = self.clone();
        actix_rt::spawn(async move {
            match kind {
                StreamKind::Replication => serve_replication(plane, peer, send, recv).await,
                StreamKind::Fetch => fetch::serve(plane.store.clone(), plane.topology(), plane.link_pacers.clone(), peer, send, recv).await,
                StreamKind::Control => {}
            }
        });
    }
}

/// The topology's retention of a policy, in the store's terms.
pub fn retention_of(policy: &drmesh_topology::Policy) -> Retention {
    Retention {
        keep_last: policy.retention.keep_last,
        hourly: policy.retention.hourly,
        daily: policy.retention.daily,
        weekly: policy.retention.weekly,
    }
}

enum WriterCmd {
    Batch(Vec<EncodedBlob>),
    Flush(oneshot::Sender<Result<u64, String>>),
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("store task failed: {e}"))
}

fn describe(e: &StoreError) -> String {
    if e.is_disk_full() {
        format!("target disk full: {e}")
    } else {
        e.to_string()
    }
}

async fn serve_replication(plane: Arc<DataPlane>, peer: NodeId, send: quinn::SendStream, recv: quinn::RecvStream) {
    let session = plane.next_session.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<TargetMsg>(64);
    let writer_task = actix_rt::spawn(async move {
        let mut send = send;
        while let Some(msg) = out_rx.recv().await {
            if endpoint::send_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    let result = run_session(&plane, peer, session, recv, &out_tx).await;
    if let Err(reason) = &result {
        tracing::warn!(peer = %peer.short(), %reason, "replication session failed; nothing committed");
        let _ = out_tx.send(TargetMsg::Failed { reason: reason.clone() }).await;
    }
    let store = plane.store.clone();
    let _ = blocking(move || store.release_session(session)).await;
    drop(out_tx);
    let _ = writer_task.await;
}

async fn run_session(
    plane: &Arc<DataPlane>,
    peer: NodeId,
    session: u64,
    recv: quinn::RecvStream,
    out: &mpsc::Sender<TargetMsg>,
) -> Result<(), String> {
    // Read unordered: a lossy long path leaves more holes in this stream than
    // quinn keeps per stream (see `MessageReader::unordered`); 1 byte (the
    // stream kind) was read before.
    let mut reader = MessageReader::unordered(recv, MAX_DATA_FRAME_BYTES, 1);
    let reply = |m: TargetMsg| async move { out.send(m).await.map_err(|_| "stream closed".to_string()) };
    let Some(SourceMsg::Open { volume, base, encrypted }) = reader.next_frame::<SourceMsg>().await.map_err(|e| e.to_string())? else {
        return Err("the session did not start with Open".into());
    };
    let topology = plane.topology();
    let peer_name = topology.node_by_id(&peer).map(|n| n.name.clone()).unwrap_or_else(|| peer.short());
    let local_name = topology.node_by_id(&plane.local).map(|n| n.name.clone()).unwrap_or_default();
    let Some(vol) = topology.volumes.iter().find(|v| v.name == volume) else {
        return Err(format!("volume {volume:?} is not in this node's topology"));
    };
    if vol.source != peer_name {
        return Err(format!("node {peer_name} is not the source of volume {volume:?} (the topology says {})", vol.source));
    }
    if !vol.targets.contains(&local_name) {
        return Err(format!("this node ({local_name}) is not a target of volume {volume:?}"));
    }
    let retention = topology.policies.get(&vol.policy).map(retention_of);
    let mut core = TargetSession::new();
    let store = plane.store.clone();
    let v = volume.clone();
    let newest = blocking(move || store.latest_rp(&v)).await?.map_err(|e| describe(&e))?;
    reply(core.handle_open(base, newest.as_ref().map(|m| (m.seq, m.merkle_root)))).await?;
    tracing::info!(%volume, source = %peer_name, session, "replication session opened");

    // The durable writer: batches arrive over a short channel, so the stream is read while a batch syncs.
    let (batch_tx, mut batch_rx) = mpsc::channel::<WriterCmd>(2);
    let store = plane.store.clone();
    let stored_out = out.clone();
    // Batches queued or being written; a partial batch is only sent to an idle
    // writer, so batches grow while the disk is busy (fewer syncs per byte).
    let writing = Arc::new(AtomicU64::new(0));
    let writing_done = writing.clone();
    let writer = actix_rt::spawn(async move {
        let mut written = 0u64;
        let mut failure: Option<String> = None;
        while let Some(cmd) = batch_rx.recv().await {
            match cmd {
                WriterCmd::Batch(blobs) if failure.is_none() => {
                    let ids: Vec<_> = blobs.iter().map(|b| b.id).collect();
                    let s = store.clone();
                    let count = blobs.len();
                    let started = std::time::Instant::now();
                    match blocking(move || s.put_blobs(session, &blobs)).await {
                        Ok(Ok(bytes)) => {
                            tracing::debug!(count, bytes, ms = started.elapsed().as_millis() as u64, "blob batch durable");
                            written += bytes;
                            let _ = stored_out.send(TargetMsg::Stored { blobs: ids }).await;
                        }
                        Ok(Err(e)) => failure = Some(describe(&e)),
                        Err(e) => failure = Some(e),
                    }
                    // Tell the source at once: it may be waiting for exactly these acks.
                    if let Some(reason) = &failure {
                        tracing::warn!(%reason, "writing blobs failed; ending the session");
                        let _ = stored_out.send(TargetMsg::Failed { reason: reason.clone() }).await;
                    }
                    writing_done.fetch_sub(1, Ordering::SeqCst);
                }
                WriterCmd::Batch(_) => {
                    writing_done.fetch_sub(1, Ordering::SeqCst);
                }
                WriterCmd::Flush(done) => {
                    let _ = done.send(match &failure {
                        Some(f) => Err(f.clone()),
                        None => Ok(written),
                    });
                }
            }
        }
    });
    let flush = |batch_tx: mpsc::Sender<WriterCmd>| async move {
        let (tx, rx) = oneshot::channel();
        batch_tx.send(WriterCmd::Flush(tx)).await.map_err(|_| "writer stopped".to_string())?;
        rx.await.map_err(|_| "writer stopped".to_string())?
    };

    let mut batch: Vec<EncodedBlob> = Vec::new();
    let mut batch_bytes = 0usize;
    let result: Result<(), String> = async {
        loop {
            // A partial batch goes to disk as soon as the source pauses: it may be
            // waiting for exactly these acknowledgements to send more.
            let writer_idle = writing.load(Ordering::SeqCst) == 0;
            let next = tokio::select! {
                biased;
                next = reader.next_frame::<SourceMsg>() => next,
                _ = tokio::time::sleep(BATCH_IDLE), if !batch.is_empty() && writer_idle => {
                    writing.fetch_add(1, Ordering::SeqCst);
                    batch_tx.send(WriterCmd::Batch(std::mem::take(&mut batch))).await.map_err(|_| "writer stopped".to_string())?;
                    batch_bytes = 0;
                    continue;
                }
                // The writer finished: look again (an idle flush may now be due).
                _ = tokio::time::sleep(BATCH_IDLE), if !batch.is_empty() && !writer_idle => continue,
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => return Err("source closed the session before committing".into()),
                Err(e) => return Err(format!("session stream: {e}")),
            };
            match msg {
                SourceMsg::Offer { entries } => {
                    let contents: Vec<_> = entries.iter().map(|e| e.content).collect();
                    let bases: Vec<_> = entries.iter().map(|e| e.base.unwrap_or(crate::content::ContentId::ZERO)).collect();
                    let changes: Vec<_> = entries.iter().map(|e| (e.index, e.content)).collect();
                    let (store, v) = (plane.store.clone(), volume.clone());
                    let (present, base_locs) = blocking(move || -> Result<_, StoreError> {
                        let present = store.lookup_and_pin(session, &contents)?;
                        let bases = store.lookup_and_pin(session, &bases)?;
                        store.stage(session, &v, &changes)?;
                        Ok((present, bases))
                    })
                    .await?
                    .map_err(|e| describe(&e))?;
                    let wants = core.handle_offer(&entries, &present, &base_locs).map_err(|e| e.to_string())?;
                    reply(TargetMsg::Answer { wants }).await?;
                }
                SourceMsg::Blob(wire) => {
                    let blob: EncodedBlob = wire.into();
                    core.handle_blob(&blob).map_err(|e| e.to_string())?;
                    batch_bytes += blob.payload.len();
                    batch.push(blob);
                    if batch.len() >= BATCH_BLOBS || batch_bytes >= BATCH_BYTES {
                        writing.fetch_add(1, Ordering::SeqCst);
                        batch_tx.send(WriterCmd::Batch(std::mem::take(&mut batch))).await.map_err(|_| "writer stopped".to_string())?;
                        batch_bytes = 0;
                    }
                }
                SourceMsg::Commit { mut meta } => {
                    if !batch.is_empty() {
                        writing.fetch_add(1, Ordering::SeqCst);
                        batch_tx.send(WriterCmd::Batch(std::mem::take(&mut batch))).await.map_err(|_| "writer stopped".to_string())?;
                    }
                    let written = flush(batch_tx.clone()).await?;
                    core.handle_commit().map_err(|e| e.to_string())?;
                    meta.volume = volume.clone();
                    meta.source_node = peer_name.clone();
                    meta.bytes_stored = written;
                    meta.encrypted = encrypted;
                    let seq = meta.seq;
                    let store = plane.store.clone();
                    let m = meta.clone();
                    blocking(move || store.commit_rp(session, &m)).await?.map_err(|e| describe(&e))?;
                    tracing::info!(rp = %meta.name(), changed = meta.changed_blocks, bytes_stored = written, "recovery point committed");
                    // Retention runs before the source hears `Committed`, so a finished
                    // cycle leaves the catalog as the policy says, not a moment later.
                    let mut pruned = Vec::new();
                    if let Some(retention) = retention {
                        let store = plane.store.clone();
                        let v = volume.clone();
                        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64;
                        match blocking(move || store.prune(&v, &retention, now)).await? {
                            Ok(p) => pruned = p,
                            Err(e) => tracing::warn!(%volume, error = %e, "retention failed"),
                        }
                    }
                    reply(TargetMsg::Committed { seq }).await?;
                    plane.announce(RpNews::Committed(meta.clone()));
                    if !pruned.is_empty() {
                        tracing::info!(%volume, ?pruned, "retention expired recovery points");
                        plane.announce(RpNews::Pruned { volume: volume.clone(), pruned });
                    }
                    return Ok(());
                }
                SourceMsg::Open { .. } => return Err("a second Open in one session".into()),
            }
        }
    }
    .await;
    drop(batch_tx);
    let _ = writer.await;
    result
}
