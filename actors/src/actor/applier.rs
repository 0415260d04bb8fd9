//! The applier: the target side of replication sessions.
//!
//! Each replication stream a peer opens is served by one task that drives a
//! [`TargetSession`] (the core decides who may replicate what, what to ask
//! for, batching, and the order of `Stored`, commit, retention and
//! `Committed`) and does the store work it asks for: lookups that pin what
//! they report present (promise 6), staging block-map changes, durable blob
//! writes in batches (one writer task, so the stream is read on while a batch
//! syncs, with at most two batches queued), the one-transaction commit
//! (promise 1) and retention.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drmesh_topology::{NodeId, Topology};
use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamHeader, StreamKind, MAX_DATA_FRAME_BYTES};
use tokio::sync::mpsc;

use crate::actor::fetch;
use crate::actor::mesh::StreamService;
use crate::actor::pacing::LinkPacers;
use crate::proto::lease::{Grant, LeaseReply, LeaseRequest, LeaseTable};
use crate::proto::session::{Announcement, TargetEvent, TargetMsg, TargetSession};
use crate::proto::time::Millis;
use crate::proto::version;
use crate::store::{EncodedBlob, Retention, RpMeta, RpSeq, SessionStore, Store, StoreError, VolumeName};

/// News from the applier about this node's store.
#[derive(actix::Message, Debug)]
#[rtype(result = "()")]
pub enum RpNews {
    /// An RP was committed here.
    Committed(RpMeta),
    /// Retention deleted these seqs of `volume`.
    Pruned {
        /// Volume.
        volume: VolumeName,
        /// Deleted seqs.
        pruned: Vec<RpSeq>,
    },
}

/// What the node serves to peers: replication sessions into its store and fetches out of it.
pub struct DataPlane {
    store: Arc<Store>,
    topology: RwLock<Arc<Topology>>,
    local: NodeId,
    next_session: AtomicU64,
    /// Replication sessions being served; the last to end gives freed memory back.
    serving: AtomicUsize,
    gossip: OnceLock<actix::Recipient<RpNews>>,
    link_pacers: Arc<LinkPacers>,
    /// The leases of the platform volumes this node is the first target of.
    leases: std::sync::Mutex<LeaseTable>,
    /// The time base of `leases`.
    origin: Instant,
}

impl DataPlane {
    /// A data plane over `store` for the node `local`.
    pub fn new(store: Arc<Store>, topology: Arc<Topology>, local: NodeId) -> Self {
        // Session ids only need to be unique within this process: the store drops
        // every session's leftovers when it opens.
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        let link_pacers = Arc::new(LinkPacers::new(Instant::now()));
        // A restart forgets the leases granted before: none is granted until
        // the longest one could have run out.
        let quiet = topology.platforms.iter().map(|p| p.lease).max().unwrap_or_default();
        let leases = std::sync::Mutex::new(LeaseTable::new(Millis(0), quiet));
        DataPlane {
            store,
            topology: RwLock::new(topology),
            local,
            next_session: AtomicU64::new(seed),
            serving: AtomicUsize::new(0),
            gossip: OnceLock::new(),
            link_pacers,
            leases,
            origin: Instant::now(),
        }
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
    fn serve(&self, header: StreamHeader, peer: NodeId, send: quinn::SendStream, recv: quinn::RecvStream) {
        let plane = self.clone();
        actix_rt::spawn(async move {
            let (stream, ours) = match header.kind {
                StreamKind::Replication => ("replication", version::REPLICATION),
                StreamKind::Fetch => ("fetch", version::FETCH),
                StreamKind::Lease => ("lease", version::LEASE),
                StreamKind::Control => return,
            };
            if let Err(mismatch) = version::check(stream, header.version, ours) {
                let peer_name = plane.topology().node_by_id(&peer).map(|n| n.name.clone()).unwrap_or_default();
                tracing::warn!(peer = %peer_name, error = %mismatch, "refusing a {stream} stream");
                refuse(header.kind, send, mismatch.to_string()).await;
                return;
            }
            match header.kind {
                StreamKind::Replication => serve_replication(plane, peer, send, recv).await,
                StreamKind::Fetch => fetch::serve(plane.store.clone(), plane.topology(), plane.link_pacers.clone(), peer, send, recv).await,
                StreamKind::Lease => serve_lease(&plane, peer, send, recv).await,
                StreamKind::Control => {}
            }
        });
    }
}

/// Answers a data stream this node will not read with the refusal of its
/// message set (whose encoding every version keeps), then ends it.
async fn refuse(kind: StreamKind, mut send: quinn::SendStream, reason: String) {
    let sent = match kind {
        StreamKind::Replication => endpoint::send_frame(&mut send, &TargetMsg::Failed { reason }).await,
        StreamKind::Lease => endpoint::send_frame(&mut send, &LeaseReply::Refused(reason)).await,
        _ => endpoint::send_frame(&mut send, &fetch::FetchReply::Error(reason)).await,
    };
    if sent.is_ok() {
        let _ = send.finish();
        // Let the refusal reach the peer before the stream is dropped (a peer
        // that never reads it does not hold the task for long).
        let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    }
}

/// Answers one lease request of a platform's proxy (see
/// [`crate::proto::lease`]): this node must be the volume's first target
/// and the peer one of its platform's proxies.
async fn serve_lease(plane: &Arc<DataPlane>, peer: NodeId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let mut reader = MessageReader::with_limit(recv, 4096);
    let request = match reader.next_frame::<LeaseRequest>().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(peer = %peer_label(plane, peer), error = %e, "lease stream");
            return;
        }
    };
    let reply = plane.lease_reply(peer, &request);
    if endpoint::send_frame(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    }
}

impl DataPlane {
    /// The answer to `peer`'s lease `request`, the table updated.
    fn lease_reply(&self, peer: NodeId, request: &LeaseRequest) -> LeaseReply {
        let topology = self.topology();
        let volume = match request {
            LeaseRequest::Acquire { volume } | LeaseRequest::Release { volume } => volume,
        };
        let me = topology.node_by_id(&self.local).map(|n| n.name.clone()).unwrap_or_default();
        let Some(peer_name) = topology.node_by_id(&peer).map(|n| n.name.clone()) else {
            return LeaseReply::Refused(format!("node {} is not in this node's topology", peer.short()));
        };
        let Some(v) = topology.volume_by_name(volume) else {
            return LeaseReply::Refused(format!("volume \"{volume}\" is not in the topology of node {me}"));
        };
        let Some(platform) = topology.platform_of(v) else {
            return LeaseReply::Refused(format!("volume \"{volume}\" is read by node {}, not by a platform's proxies: it has no lease", v.source));
        };
        if !platform.proxies.contains(&peer_name) {
            return LeaseReply::Refused(format!("node {peer_name} is not a proxy of platform {} (its proxies: {})", platform.name, platform.proxies.join(", ")));
        }
        if v.targets.first() != Some(&me) {
            return LeaseReply::Refused(format!(
                "node {me} does not keep the lease of volume \"{volume}\": its first target, {}, does",
                v.targets.first().map_or("?", String::as_str)
            ));
        }
        let now = Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX));
        let mut table = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        table.handle_timeout(now);
        match request {
            LeaseRequest::Release { .. } => {
                table.handle_release(volume, peer);
                tracing::info!(%volume, proxy = %peer_name, "lease released");
                LeaseReply::Released
            }
            LeaseRequest::Acquire { .. } => {
                let held = table.holder(now, volume);
                match table.handle_acquire(now, volume, peer, platform.lease) {
                    Grant::Granted => {
                        if held != Some(peer) {
                            tracing::info!(%volume, proxy = %peer_name, lease = %humantime::format_duration(platform.lease), "lease granted");
                        }
                        LeaseReply::Granted { ttl_ms: u64::try_from(platform.lease.as_millis()).unwrap_or(u64::MAX) }
                    }
                    Grant::HeldBy { holder, remaining } => LeaseReply::Held {
                        holder: topology.node_by_id(&holder).map_or_else(|| holder.short(), |n| n.name.clone()),
                        remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
                    },
                    Grant::Starting { remaining } => LeaseReply::Held {
                        holder: format!("nobody yet: node {me} started less than a lease ago and may have granted leases it forgot"),
                        remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
                    },
                }
            }
        }
    }
}

impl DataPlane {
    /// Why `peer` may not commit an RP of `volume` here: the volume is a
    /// platform's, this node keeps its lease, and `peer` does not hold it
    /// (its lease ran out while its cycle ran; another proxy may read the VM
    /// now). `None`: it may.
    fn lease_refusal(&self, peer: NodeId, volume: &VolumeName) -> Option<String> {
        let topology = self.topology();
        let v = topology.volume_by_name(volume)?;
        topology.platform_of(v)?;
        let me = topology.node_by_id(&self.local).map(|n| n.name.clone())?;
        if v.targets.first() != Some(&me) {
            return None;
        }
        let now = Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX));
        let holder = self.leases.lock().unwrap_or_else(|p| p.into_inner()).holder(now, volume);
        (holder != Some(peer)).then(|| {
            let by = holder.map_or_else(|| "nobody".to_string(), |h| topology.node_by_id(&h).map_or_else(|| h.short(), |n| n.name.clone()));
            format!("the proxy does not hold the lease on volume \"{volume}\" here (held by {by}): nothing committed, so that no two proxies' cycles of one VM commit")
        })
    }
}

/// Asks `conn`'s node (a volume's first target) for the lease on `volume`,
/// or releases it; the reply as the target sent it, or why none came.
pub async fn request_lease(conn: &quinn::Connection, request: &LeaseRequest) -> Result<LeaseReply, String> {
    let (mut send, recv) = endpoint::open_stream(conn, StreamHeader::data(StreamKind::Lease, version::LEASE)).await.map_err(|e| e.to_string())?;
    endpoint::send_frame(&mut send, request).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut reader = MessageReader::with_limit(recv, 4096);
    match tokio::time::timeout(Duration::from_secs(10), reader.next_frame::<LeaseReply>()).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Ok(Some(reply))) => Ok(reply),
        Ok(Ok(None)) => Err("the target closed the lease stream without an answer (a release of drmesh without leases?)".into()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// The topology's retention of a policy, in the store's terms.
pub fn retention_of(r: &drmesh_topology::Retention) -> Retention {
    Retention { keep_last: r.keep_last, hourly: r.hourly, daily: r.daily, weekly: r.weekly, coalesce_unchanged: r.coalesce_unchanged }
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

/// A store call on the blocking pool, its error put in words.
async fn store_call<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, String> {
    blocking(f).await?.map_err(|e| describe(&e))
}

async fn serve_replication(plane: Arc<DataPlane>, peer: NodeId, send: quinn::SendStream, recv: quinn::RecvStream) {
    let session = plane.next_session.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<TargetMsg>(64);
    let sender = actix_rt::spawn(async move {
        let mut send = send;
        while let Some(msg) = out_rx.recv().await {
            if endpoint::send_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    plane.serving.fetch_add(1, Ordering::Relaxed);
    run_session(&plane, peer, session, recv, &out_tx).await;
    let store = plane.store.clone();
    let _ = blocking(move || store.release_session(session)).await;
    drop(out_tx);
    let _ = sender.await;
    // A target that just received a sync would otherwise idle near its peak.
    if plane.serving.fetch_sub(1, Ordering::Relaxed) == 1 {
        let _ = blocking(crate::memory::give_back_freed).await;
    }
}

/// Drives one session's core until it finished and no batch write is out.
async fn run_session(plane: &Arc<DataPlane>, peer: NodeId, session: u64, recv: quinn::RecvStream, out: &mpsc::Sender<TargetMsg>) {
    // Read unordered: a lossy long path leaves more holes in this stream than
    // quinn keeps per stream (see `MessageReader::unordered`); the stream's
    // header was read before.
    let mut reader = MessageReader::unordered(recv, MAX_DATA_FRAME_BYTES, StreamHeader::DATA_BYTES);
    let mut core = TargetSession::new(plane.topology(), plane.local, peer);
    // The session sees the store through the backend seam only.
    let store: Arc<dyn SessionStore> = plane.store.clone();
    let origin = Instant::now();
    let now = || Millis(u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX));
    // The durable writer: batches in order, at most two queued (the stream
    // waits beyond that), results back to this loop.
    let (batch_tx, mut batch_rx) = mpsc::channel::<(u64, Vec<EncodedBlob>)>(2);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Result<u64, String>)>();
    let writer_store = store.clone();
    let writer = actix_rt::spawn(async move {
        while let Some((batch, blobs)) = batch_rx.recv().await {
            let (s, count, started) = (writer_store.clone(), blobs.len(), Instant::now());
            let result = store_call(move || s.put_blobs(session, &blobs)).await;
            if let Ok(bytes) = &result {
                tracing::debug!(count, bytes, ms = started.elapsed().as_millis() as u64, "blob batch durable");
            }
            if done_tx.send((batch, result)).is_err() {
                break;
            }
        }
    });
    let mut writes_out = 0usize;
    loop {
        while let Some(event) = core.poll_event() {
            match event {
                TargetEvent::Write { batch, blobs } => {
                    writes_out += 1;
                    if batch_tx.send((batch, blobs)).await.is_err() {
                        core.handle_written(batch, Err("the blob writer stopped".into()));
                    }
                }
                event => carry_out(plane, &store, peer, session, &mut core, event).await,
            }
        }
        while let Some(msg) = core.poll_transmit() {
            if out.send(msg).await.is_err() {
                core.handle_disconnect("the stream to the source closed");
            }
        }
        if core.is_finished() && writes_out == 0 {
            break;
        }
        let timeout = core.poll_timeout().map(|due| due.0.saturating_sub(now().0));
        tokio::select! {
            biased;
            Some((batch, result)) = done_rx.recv() => {
                writes_out -= 1;
                core.handle_written(batch, result);
            }
            frame = reader.next_frame::<crate::proto::session::SourceMsg>(), if !core.is_finished() => match frame {
                Ok(Some(msg)) => core.handle_message(now(), msg),
                Ok(None) => core.handle_disconnect("the source closed the stream"),
                Err(e) => core.handle_disconnect(&format!("session stream: {e}")),
            },
            _ = tokio::time::sleep(Duration::from_millis(timeout.unwrap_or(0))), if timeout.is_some() => core.handle_timeout(now()),
        }
    }
    drop(batch_tx);
    let _ = writer.await;
}

/// Does one piece of store work (or news) the core asked for and reports back.
async fn carry_out(plane: &Arc<DataPlane>, store: &Arc<dyn SessionStore>, peer: NodeId, session: u64, core: &mut TargetSession, event: TargetEvent) {
    let store = store.clone();
    match event {
        TargetEvent::Newest { volume } => {
            let newest = store_call(move || store.newest_rp(&volume)).await;
            core.handle_newest(newest.map(|m| m.map(|m| (m.seq, m.merkle_root))));
            if let Some(volume) = core.volume().filter(|_| !core.is_finished()) {
                tracing::info!(%volume, source = %peer_label(plane, peer), session, "replication session opened");
            }
        }
        TargetEvent::Lookup { contents, bases, changes } => {
            let volume = core.volume().unwrap_or_default().to_string();
            let result = store_call(move || {
                let present = store.lookup_and_pin(session, &contents)?;
                let bases = store.lookup_and_pin(session, &bases)?;
                store.stage(session, &volume, &changes)?;
                Ok((present, bases))
            })
            .await;
            core.handle_lookup(result);
        }
        TargetEvent::Commit { meta } => {
            if let Some(refusal) = plane.lease_refusal(peer, &meta.volume) {
                core.handle_committed(Err(refusal));
                return;
            }
            let m = meta.clone();
            let result = store_call(move || store.commit_rp(session, &m)).await;
            if result.is_ok() {
                tracing::info!(rp = %meta.name(), changed = meta.changed_blocks, bytes_stored = meta.bytes_stored, "recovery point committed");
            }
            core.handle_committed(result);
        }
        TargetEvent::Prune { volume, retention } => {
            let retention = retention_of(&retention);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64;
            let v = volume.clone();
            match store_call(move || store.prune(&v, &retention, now)).await {
                Ok(pruned) => core.handle_pruned(pruned),
                Err(error) => {
                    tracing::warn!(%volume, %error, "retention failed");
                    core.handle_pruned(Vec::new());
                }
            }
        }
        TargetEvent::Announce(Announcement::Committed(meta)) => plane.announce(RpNews::Committed(meta)),
        TargetEvent::Announce(Announcement::Pruned { volume, seqs }) => {
            let pruned = seqs.iter().map(RpSeq::to_string).collect::<Vec<_>>().join(", ");
            tracing::info!(%volume, %pruned, "retention expired recovery points");
            plane.announce(RpNews::Pruned { volume, pruned: seqs });
        }
        TargetEvent::Finished { outcome: Err(reason) } => {
            tracing::warn!(peer = %peer_label(plane, peer), %reason, "replication session failed; nothing committed");
        }
        TargetEvent::Finished { outcome: Ok(_) } | TargetEvent::Write { .. } => {}
    }
}

/// The peer's name in the topology, else its short id.
fn peer_label(plane: &DataPlane, peer: NodeId) -> String {
    plane.topology().node_by_id(&peer).map_or_else(|| peer.short(), |n| n.name.clone())
}
