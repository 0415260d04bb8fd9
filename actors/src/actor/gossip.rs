//! The gossip actor: runs this node's [`GossipNode`] (membership, node status,
//! the mesh-wide RP catalog) with real time and the mesh's QUIC connections.
//!
//! - **Time**: `now` is [`Millis`] since the actor started (a monotonic
//!   [`Instant`]); each timer the core asks for is armed with `run_later` and
//!   fed back with the time it actually fired.
//! - **Datagrams** ride only the authenticated QUIC connections the mesh actor
//!   keeps ([`DatagramService`] in, [`SendDatagrams`] out): the sender's node id
//!   is the one pinned by mutual TLS, never an address from a packet.
//! - **Inputs from the node**: the applier announces committed and pruned RPs
//!   ([`RpNews`]); the topology in force (site, version, hash) is polled from the
//!   data plane each tick and republished as this node's status when it changes.
//! - **Persistence**: the replica snapshot and the generation live in redb at
//!   `<state-dir>/gossip.redb`, saved every [`SAVE_PERIOD`] when something
//!   changed and on shutdown. A restarted node restores it at once (so `ctl
//!   catalog` answers before any peer is reached) under a higher generation,
//!   then reconciles its own entries with its store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use drmesh_topology::{NodeId, Topology};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;

pub use crate::actor::applier::RpNews;
use crate::actor::applier::DataPlane;
use crate::actor::mesh::{DatagramService, MeshActor, SendDatagrams, SetDatagramService, SOFTWARE_VERSION};
use crate::proto::bandwidth::Demand;
use crate::drill::{verification, DrillReport, Verification};
use crate::proto::gossip::catalog::{Consistency, DrillResult, ItemKey, NodeStatus, RpInfo, ScrubResult, ScrubVerdict};
use crate::proto::gossip::{GossipConfig, GossipEvent, GossipNode, MemberState, Millis};
use crate::store::{RpMeta, RpSeq, VolumeName};

/// File name of the gossip state inside the state directory.
pub const GOSSIP_FILE: &str = "gossip.redb";
/// How often the replica is saved when it changed.
pub const SAVE_PERIOD: Duration = Duration::from_secs(10);
/// Housekeeping period: topology changes, rejoin while alone, saving.
const TICK: Duration = Duration::from_secs(1);
/// Wait between join attempts while no member answers.
const JOIN_RETRY: Duration = Duration::from_secs(2);
/// Topology peers asked to let this node in per join attempt.
const JOIN_PEERS_MAX: usize = 8;

const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("gossip");
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_GENERATION: &str = "generation";
/// JSON map volume → snapshot ms of the oldest RP this node ever saw (the dead-man's clock).
const KEY_FIRST_SEEN: &str = "drill_first_seen";

/// The gossip state file could not be opened, read or written. Opening
/// failures stop the start; a failed save is logged and retried at the next period.
#[derive(Debug, thiserror::Error)]
#[error("gossip state {path}: cannot {op}: {reason}")]
pub struct GossipStoreError {
    path: String,
    op: &'static str,
    reason: String,
}

struct GossipDb {
    db: Database,
    path: PathBuf,
}

impl GossipDb {
    fn err(&self, op: &'static str, e: impl std::fmt::Display) -> GossipStoreError {
        GossipStoreError { path: self.path.display().to_string(), op, reason: e.to_string() }
    }

    fn open(path: &Path) -> Result<GossipDb, GossipStoreError> {
        // The replica is a few values rewritten whole; redb's default page cache
        // (1 GiB) would let it grow with the catalog. 8 MiB holds it.
        let db = redb::Builder::new()
            .set_cache_size(8 << 20)
            .create(path)
            .map_err(|e| GossipStoreError { path: path.display().to_string(), op: "open", reason: e.to_string() })?;
        let this = GossipDb { db, path: path.to_path_buf() };
        let tx = this.db.begin_write().map_err(|e| this.err("begin write", e))?;
        tx.open_table(STATE).map_err(|e| this.err("create table", e))?;
        tx.commit().map_err(|e| this.err("commit", e))?;
        Ok(this)
    }

    /// The stored first-seen times of volumes (empty when none or unreadable).
    fn load_first_seen(&self) -> BTreeMap<String, u64> {
        let read = || -> Option<BTreeMap<String, u64>> {
            let tx = self.db.begin_read().ok()?;
            let table = tx.open_table(STATE).ok()?;
            let v = table.get(KEY_FIRST_SEEN).ok()??;
            serde_json::from_slice(v.value()).ok()
        };
        read().unwrap_or_default()
    }

    /// Stored generation and snapshot.
    fn load(&self) -> Result<(Option<u32>, Option<Vec<u8>>), GossipStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err("begin read", e))?;
        let table = tx.open_table(STATE).map_err(|e| self.err("open table", e))?;
        let generation = table
            .get(KEY_GENERATION)
            .map_err(|e| self.err("read generation", e))?
            .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
            .map(u32::from_le_bytes);
        let snapshot = table.get(KEY_SNAPSHOT).map_err(|e| self.err("read snapshot", e))?.map(|v| v.value().to_vec());
        Ok((generation, snapshot))
    }

    fn save(&self, generation: u32, snapshot: Option<&[u8]>, first_seen: &BTreeMap<String, u64>) -> Result<(), GossipStoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err("begin write", e))?;
        {
            let mut table = tx.open_table(STATE).map_err(|e| self.err("open table", e))?;
            let clock = serde_json::to_vec(first_seen).unwrap_or_default();
            table.insert(KEY_FIRST_SEEN, clock.as_slice()).map_err(|e| self.err("write drill clock", e))?;
            table.insert(KEY_GENERATION, generation.to_le_bytes().as_slice()).map_err(|e| self.err("write generation", e))?;
            if let Some(s) = snapshot {
                table.insert(KEY_SNAPSHOT, s).map_err(|e| self.err("write snapshot", e))?;
            }
        }
        tx.commit().map_err(|e| self.err("commit", e))
    }
}

/// The gossip actor.
pub struct GossipActor {
    node: GossipNode,
    me: NodeId,
    started: Instant,
    data: Arc<DataPlane>,
    mesh: Addr<MeshActor>,
    db: Arc<GossipDb>,
    restored: bool,
    dirty: bool,
    saving: bool,
    last_save: Instant,
    last_join: Option<Instant>,
    topology: Arc<Topology>,
    status: (NodeStatus, Millis),
    demand_sink: Option<Recipient<SiteDemands>>,
    /// Volumes whose verification is overdue (dead-man's switch), as last logged.
    overdue: BTreeMap<VolumeName, bool>,
    last_verification: Instant,
    /// Snapshot time of the oldest RP of each volume this node ever saw (persisted).
    first_seen: BTreeMap<String, u64>,
}

/// How often the dead-man's switch of drills is evaluated.
const VERIFICATION_PERIOD: Duration = Duration::from_secs(5);

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn status_of(me: &NodeId, topology: &Topology) -> NodeStatus {
    NodeStatus {
        site: topology.node_by_id(me).map(|n| n.site.clone()).unwrap_or_default(),
        software_version: SOFTWARE_VERSION.to_string(),
        topology_version: topology.mesh.version,
        topology_hash: topology.hash(),
    }
}

/// One volume of the store as reconciliation reads it: name, RPs, newest drill per seq.
type StoreVolume = (VolumeName, Vec<RpMeta>, BTreeMap<RpSeq, DrillReport>);

/// What the gossip catalog says about an RP held here, with its newest drill.
pub fn rp_info(meta: &RpMeta, drill: Option<&DrillReport>) -> RpInfo {
    RpInfo {
        snapshot_unix_ms: meta.time_unix_ms,
        size_bytes: meta.volume_bytes,
        merkle_root: meta.merkle_root,
        // A label this release does not know promises nothing.
        consistency: Consistency::from_label(&meta.consistency).unwrap_or(Consistency::Inconsistent),
        drill: drill.map(DrillResult::of),
    }
}

impl GossipActor {
    /// Opens `<state_dir>/gossip.redb`, restores the replica saved there (if
    /// any) under the next generation, starts the actor and wires it to the mesh
    /// (datagrams) and the data plane (RP news). Must run inside an actix system.
    pub fn start_with(state_dir: &Path, me: NodeId, data: Arc<DataPlane>, mesh: Addr<MeshActor>) -> Result<Addr<GossipActor>, GossipStoreError> {
        let db = GossipDb::open(&state_dir.join(GOSSIP_FILE))?;
        let (stored_generation, snapshot) = db.load()?;
        let first_seen = db.load_first_seen();
        // Grows across restarts even if the file was lost (Unix seconds fit u32 until 2106).
        let unix_secs = u32::try_from(unix_ms() / 1000).unwrap_or(u32::MAX);
        let generation = stored_generation.map_or(0, |g| g.wrapping_add(1)).max(unix_secs);
        db.save(generation, None, &first_seen)?;
        let topology = data.topology();
        let config = GossipConfig::for_cluster(u32::try_from(topology.nodes.len()).unwrap_or(u32::MAX));
        let b = me.as_bytes();
        let seed = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            ^ SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let now = Millis(0);
        let (node, restored) = match snapshot.as_deref().map(|s| GossipNode::restore(now, me, generation, config.clone(), seed, s)) {
            Some(Ok(node)) => {
                let (holders, items) = node.replica_size();
                tracing::info!(generation, holders, items, "gossip replica restored");
                (node, true)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, path = %db.path.display(), "cannot restore the gossip replica; starting empty");
                (GossipNode::new(now, me, generation, config, seed), false)
            }
            None => (GossipNode::new(now, me, generation, config, seed), false),
        };
        let status = (status_of(&me, &topology), now);
        let actor = GossipActor {
            node,
            me,
            started: Instant::now(),
            data: data.clone(),
            mesh: mesh.clone(),
            db: Arc::new(db),
            restored,
            dirty: false,
            saving: false,
            last_save: Instant::now(),
            last_join: None,
            topology,
            status,
            demand_sink: None,
            overdue: BTreeMap::new(),
            last_verification: Instant::now(),
            first_seen,
        };
        let addr = actor.start();
        mesh.do_send(SetDatagramService(Arc::new(GossipInbox(addr.clone()))));
        data.set_gossip(addr.clone().recipient());
        Ok(addr)
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn name_of(&self, id: &NodeId) -> Option<String> {
        self.topology.node_by_id(id).map(|n| n.name.clone())
    }

    /// Drains the core's outputs: datagrams to the mesh, timers to actix, events to logs.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let mut out = Vec::new();
        while let Some(t) = self.node.poll_transmit() {
            out.push((t.to, t.bytes));
        }
        if !out.is_empty() {
            self.mesh.do_send(SendDatagrams(out));
        }
        let now = self.now();
        while let Some((deadline, timer)) = self.node.poll_timer() {
            ctx.run_later(deadline.since(now), move |act, ctx| {
                let now = act.now();
                if let Err(e) = act.node.handle_timer(now, timer) {
                    tracing::debug!(error = %e, "gossip timer");
                }
                act.flush(ctx);
            });
        }
        while let Some(event) = self.node.poll_event() {
            match event {
                GossipEvent::MemberUp(id) => {
                    tracing::info!(peer = %self.name_of(&id).unwrap_or_else(|| id.short()), "gossip: member up");
                }
                GossipEvent::MemberDown(id) => {
                    tracing::warn!(peer = %self.name_of(&id).unwrap_or_else(|| id.short()), "gossip: member declared down");
                }
                GossipEvent::Rejoined { generation } => {
                    tracing::info!(generation, "gossip: the mesh had declared this node down; rejoined");
                    self.dirty = true;
                }
                GossipEvent::CatalogChanged { key, .. } => {
                    self.dirty = true;
                    if key == ItemKey::Demand {
                        self.push_site_demands();
                    }
                }
            }
        }
    }

    /// Tells the scheduler what the other live nodes of this node's site want
    /// from its uplink.
    fn push_site_demands(&self) {
        let Some(sink) = &self.demand_sink else { return };
        let Some(site) = self.topology.node_by_id(&self.me).map(|n| n.site.clone()) else { return };
        let demands = self
            .node
            .demands()
            .into_iter()
            .filter(|(id, _)| self.topology.node_by_id(id).is_some_and(|n| n.site == site))
            .map(|(_, d)| d)
            .collect();
        sink.do_send(SiteDemands(demands));
    }

    fn join(&mut self, ctx: &mut Context<Self>) {
        self.last_join = Some(Instant::now());
        let mut peers: Vec<NodeId> = self.topology.nodes.iter().map(|n| n.id).filter(|id| *id != self.me).collect();
        if peers.is_empty() {
            return;
        }
        // A few peers, rotating with the attempt, so big meshes do not get n announces.
        let start = (self.started.elapsed().as_secs() as usize) % peers.len();
        peers.rotate_left(start);
        peers.truncate(JOIN_PEERS_MAX);
        let now = self.now();
        if let Err(e) = self.node.handle_join(now, &peers) {
            tracing::debug!(error = %e, "gossip join");
        }
        self.flush(ctx);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let topology = self.data.topology();
        if !Arc::ptr_eq(&topology, &self.topology) {
            self.topology = topology;
            let status = status_of(&self.me, &self.topology);
            if status != self.status.0 {
                let now = self.now();
                self.node.handle_status(now, status.clone());
                self.status = (status, now);
                self.flush(ctx);
            }
        }
        self.push_site_demands();
        if self.last_verification.elapsed() >= VERIFICATION_PERIOD {
            self.last_verification = Instant::now();
            self.check_verification();
        }
        if self.node.active_members() == 0 && self.last_join.is_none_or(|t| t.elapsed() >= JOIN_RETRY) {
            self.join(ctx);
        }
        if self.dirty && !self.saving && self.last_save.elapsed() >= SAVE_PERIOD {
            self.save_in_background(ctx);
        }
    }

    fn save_in_background(&mut self, ctx: &mut Context<Self>) {
        self.dirty = false;
        self.saving = true;
        let snapshot = self.node.snapshot();
        let generation = self.node.generation();
        let db = self.db.clone();
        let first_seen = self.first_seen.clone();
        let saving = async move { tokio::task::spawn_blocking(move || db.save(generation, Some(&snapshot), &first_seen)).await };
        ctx.spawn(saving.into_actor(self).map(|result, act, _ctx| {
            act.saving = false;
            act.last_save = Instant::now();
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot save the gossip replica; retrying later");
                    act.dirty = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gossip save task failed; retrying later");
                    act.dirty = true;
                }
            }
        }));
    }

    /// [`Verification`] of `volume` from its RPs' (seq, snapshot, drill), if its policy drills.
    fn verification_of(&self, volume: &str, rps: &[(RpSeq, u64, Option<&DrillResult>)], now_unix_ms: u64) -> Option<Verification> {
        let vol = self.topology.volume_by_name(volume)?;
        let drill = self.topology.policies.get(&vol.policy)?.drill.as_ref()?;
        let rps: Vec<_> = rps.iter().map(|(seq, t, d)| (*seq, *t, d.map(|d| (d.verified, d.detail.as_str())))).collect();
        Some(verification(&rps, self.first_seen.get(volume).copied(), now_unix_ms, drill.max_unverified_age.as_secs()))
    }

    /// The dead-man's switch: one WARN per volume when its verification becomes
    /// overdue, one INFO when it is back.
    fn check_verification(&mut self) {
        let now_unix = unix_ms();
        let all = self.node.rps();
        let volumes: Vec<VolumeName> = self.topology.volumes.iter().map(|v| v.name.clone()).collect();
        for volume in volumes {
            let rps: Vec<(RpSeq, u64, Option<&DrillResult>)> = all.iter().filter(|r| r.volume == volume).map(|r| (r.seq, r.info.snapshot_unix_ms, r.info.drill.as_ref())).collect();
            if let Some(oldest) = rps.iter().map(|r| r.1).min() {
                if self.first_seen.get(volume.as_str()).is_none_or(|first| oldest < *first) {
                    self.first_seen.insert(volume.to_string(), oldest);
                    self.dirty = true;
                }
            }
            let Some(v) = self.verification_of(&volume, &rps, now_unix) else {
                self.overdue.remove(&volume);
                continue;
            };
            let was = self.overdue.insert(volume.clone(), v.overdue).unwrap_or(false);
            match (was, v.overdue) {
                (false, true) => tracing::warn!(
                    %volume,
                    unverified_secs = v.unverified_secs.unwrap_or(0),
                    max_unverified_age_secs = v.max_unverified_age_secs,
                    newest_verified = v.verified_seq.map(|s| format!("{volume}@{s}")).unwrap_or_else(|| "none".into()),
                    last_failure = v.last_failure.as_deref().unwrap_or("-"),
                    "drill verification overdue: no recovery point of this volume was verified within max_unverified_age (are drills running? see `drmesh ctl drills`)"
                ),
                (true, false) => tracing::info!(%volume, verified = v.verified_seq.map(|s| format!("{volume}@{s}")).unwrap_or_default(), "drill verification back within max_unverified_age"),
                _ => {}
            }
        }
    }

    /// Brings this node's own catalog entries in line with its store (RPs
    /// committed or pruned while the replica was not saved).
    fn reconcile(&mut self, store_rps: Vec<StoreVolume>, ctx: &mut Context<Self>) {
        let now = self.now();
        let mine: Vec<(VolumeName, RpSeq)> = self.node.rps().into_iter().filter(|r| r.holder == self.me).map(|r| (r.volume, r.seq)).collect();
        for (volume, rps, drills) in &store_rps {
            for meta in rps {
                if !self.node.has_rp(&self.me, volume, meta.seq) {
                    if let Err(e) = self.node.handle_local_rp(now, volume, meta.seq, rp_info(meta, drills.get(&meta.seq))) {
                        tracing::warn!(%volume, error = %e, "cannot publish a recovery point");
                    }
                }
            }
        }
        let expired_ms = unix_ms();
        for (volume, seq) in mine {
            let held = store_rps.iter().find(|(v, _, _)| *v == volume).map(|(_, rps, _)| rps.as_slice()).unwrap_or_default();
            if held.iter().any(|m| m.seq == seq) {
                continue;
            }
            let result = match held.first() {
                Some(first) if seq > first.seq => self.node.handle_rp_expired(now, &volume, seq, expired_ms),
                Some(first) => self.node.handle_rps_expired_below(now, &volume, first.seq),
                None => self.node.handle_rps_expired_below(now, &volume, seq.next()),
            };
            if let Err(e) = result {
                tracing::warn!(%volume, %seq, error = %e, "cannot publish an expired recovery point");
            }
        }
        self.flush(ctx);
    }
}

impl Actor for GossipActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let now = self.now();
        self.node.handle_status(now, self.status.0.clone());
        self.join(ctx);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
        let store = self.data.store().clone();
        let reading = async move {
            tokio::task::spawn_blocking(move || -> Result<Vec<StoreVolume>, String> {
                let mut out = Vec::new();
                for volume in store.volumes().map_err(|e| e.to_string())? {
                    let rps = store.rps(&volume).map_err(|e| e.to_string())?;
                    let drills = store.latest_drills(&volume).map_err(|e| e.to_string())?;
                    out.push((volume, rps, drills));
                }
                Ok(out)
            })
            .await
        };
        ctx.spawn(reading.into_actor(self).map(|result, act, ctx| match result {
            Ok(Ok(rps)) => act.reconcile(rps, ctx),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the store to publish its recovery points"),
            Err(e) => tracing::warn!(error = %e, "store read task failed"),
        }));
    }
}

/// The mesh side of the actor: datagrams in, connection news.
struct GossipInbox(Addr<GossipActor>);

impl DatagramService for GossipInbox {
    fn datagram(&self, peer: NodeId, bytes: bytes::Bytes) {
        self.0.do_send(Datagram { from: peer, bytes });
    }

    fn connected(&self, peer: NodeId) {
        self.0.do_send(PeerConnected(peer));
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Datagram {
    from: NodeId,
    bytes: bytes::Bytes,
}

impl Handler<Datagram> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: Datagram, ctx: &mut Context<Self>) {
        let now = self.now();
        if let Err(e) = self.node.handle_datagram(now, msg.from, &msg.bytes) {
            // A bad datagram is dropped; the connection and the node carry on.
            tracing::debug!(peer = %msg.from.short(), error = %e, "dropped a gossip datagram");
        }
        self.flush(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct PeerConnected(NodeId);

impl Handler<PeerConnected> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: PeerConnected, ctx: &mut Context<Self>) {
        let known_alive = self.node.members().iter().any(|m| m.node == msg.0 && m.state != MemberState::Down);
        if !known_alive {
            let now = self.now();
            if let Err(e) = self.node.handle_join(now, &[msg.0]) {
                tracing::debug!(error = %e, "gossip join");
            }
            self.flush(ctx);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Expired {
    volume: VolumeName,
    pruned: Vec<RpSeq>,
    first_kept: Option<RpSeq>,
}

impl Handler<Expired> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: Expired, ctx: &mut Context<Self>) {
        let now = self.now();
        let below = msg.first_kept.unwrap_or_else(|| msg.pruned.iter().max().map_or(RpSeq(0), |m| m.next()));
        if let Err(e) = self.node.handle_rps_expired_below(now, &msg.volume, below) {
            tracing::warn!(volume = %msg.volume, error = %e, "cannot publish expired recovery points");
        }
        // Retention that keeps an older RP (hourly/daily/weekly) deletes out of order: tombstones.
        let expired_ms = unix_ms();
        for seq in msg.pruned.into_iter().filter(|s| *s >= below) {
            if let Err(e) = self.node.handle_rp_expired(now, &msg.volume, seq, expired_ms) {
                tracing::warn!(volume = %msg.volume, %seq, error = %e, "cannot publish an expired recovery point");
            }
        }
        self.flush(ctx);
    }
}

/// A drill ran here on an RP this node holds: its summary joins the RP's
/// catalog entry (and spreads by gossip). The report is already in the store.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishDrill(pub DrillReport);

/// A scrub here checked the RPs of a volume: its result is published (one
/// item per volume), so every node's catalog shows each RP's scrub verdict.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishScrub {
    /// The volume.
    pub volume: VolumeName,
    /// What the scrub found.
    pub result: ScrubResult,
}

impl Handler<PublishScrub> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: PublishScrub, ctx: &mut Context<Self>) {
        let now = self.now();
        if let Err(e) = self.node.handle_scrub(now, &msg.volume, msg.result) {
            tracing::warn!(volume = %msg.volume, error = %e, "cannot publish a scrub result");
            return;
        }
        self.dirty = true;
        self.flush(ctx);
    }
}

impl Handler<PublishDrill> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: PublishDrill, ctx: &mut Context<Self>) {
        let report = msg.0;
        let meta = match self.data.store().rp(&report.volume, report.seq) {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                tracing::info!(rp = %report.rp(), "drill result not published: the RP was pruned meanwhile");
                return;
            }
            Err(e) => {
                tracing::warn!(rp = %report.rp(), error = %e, "drill result not published: cannot read the RP");
                return;
            }
        };
        let now = self.now();
        if let Err(e) = self.node.handle_local_rp(now, &report.volume, report.seq, rp_info(&meta, Some(&report))) {
            tracing::warn!(rp = %report.rp(), error = %e, "cannot publish a drill result");
        }
        self.dirty = true;
        self.flush(ctx);
        self.check_verification();
    }
}

impl Handler<RpNews> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: RpNews, ctx: &mut Context<Self>) {
        match msg {
            RpNews::Committed(meta) => {
                let now = self.now();
                if let Err(e) = self.node.handle_local_rp(now, &meta.volume, meta.seq, rp_info(&meta, None)) {
                    tracing::warn!(rp = %meta.name(), error = %e, "cannot publish a recovery point");
                }
                self.flush(ctx);
            }
            RpNews::Pruned { volume, pruned } => {
                let store = self.data.store().clone();
                let addr = ctx.address();
                actix_rt::spawn(async move {
                    let v = volume.clone();
                    let first_kept = match tokio::task::spawn_blocking(move || store.rps(&v)).await {
                        Ok(Ok(rps)) => rps.first().map(|m| m.seq),
                        _ => None,
                    };
                    addr.do_send(Expired { volume, pruned, first_kept });
                });
            }
        }
    }
}

/// The outcome of a cycle of a volume this node is the source of, published
/// so every node can tell when a volume's last cycle failed and why.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct VolumeNews {
    /// Volume.
    pub volume: VolumeName,
    /// Its health now.
    pub health: crate::proto::gossip::catalog::VolumeHealth,
}

impl Handler<VolumeNews> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: VolumeNews, ctx: &mut Context<Self>) {
        let now = self.now();
        if let Err(e) = self.node.handle_volume_health(now, &msg.volume, msg.health) {
            tracing::warn!(volume = %msg.volume, error = %e, "cannot publish volume health");
        }
        self.flush(ctx);
    }
}

/// What this node's running transfers want from its site's uplink, to publish.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DemandNews(pub Demand);

impl Handler<DemandNews> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: DemandNews, ctx: &mut Context<Self>) {
        let now = self.now();
        self.node.handle_demand(now, msg.0);
        self.flush(ctx);
    }
}

/// The uplink demands of the other live nodes of this node's site, as gossip
/// knows them; sent on every change and every second.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SiteDemands(pub Vec<Demand>);

/// Where [`SiteDemands`] go (the volume scheduler).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDemandSink(pub Recipient<SiteDemands>);

impl Handler<SetDemandSink> for GossipActor {
    type Result = ();

    fn handle(&mut self, msg: SetDemandSink, _ctx: &mut Context<Self>) {
        self.demand_sink = Some(msg.0);
        self.push_site_demands();
    }
}

/// Saves the replica and stops the actor (node shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for GossipActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        // A short blocking write on the way out is fine: nothing else runs on this actor any more.
        match self.db.save(self.node.generation(), Some(&self.node.snapshot()), &self.first_seen) {
            Ok(()) => tracing::info!("gossip replica saved"),
            Err(e) => tracing::warn!(error = %e, "cannot save the gossip replica"),
        }
        ctx.stop();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// One row of `drmesh ctl mesh`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberRow {
    /// Name in this node's topology (`None` for a member the topology does not list).
    pub name: Option<String>,
    /// Full node id.
    pub id: String,
    /// Whether this row is this node.
    pub is_self: bool,
    /// `alive`, `suspect`, `down`, or `unknown` (listed in the topology, never heard by gossip).
    pub state: &'static str,
    /// Generation (restart counter) as last seen.
    pub generation: Option<u32>,
    /// Seconds since a datagram last came straight from it.
    pub last_heard_secs: Option<f64>,
    /// Site, from its own status.
    pub site: Option<String>,
    /// drmesh version, from its own status.
    pub software_version: Option<String>,
    /// `[mesh] version` it runs.
    pub topology_version: Option<u64>,
    /// Short hash of its topology file.
    pub topology_hash: Option<String>,
    /// Whether it runs the same topology file as this node.
    pub topology_matches: Option<bool>,
    /// Seconds since this node learned its current status (freshness).
    pub status_age_secs: Option<f64>,
}

/// The answer of `drmesh ctl mesh`.
#[derive(Debug, Clone, Serialize)]
pub struct MeshView {
    /// This node's id.
    pub node_id: String,
    /// This node's generation.
    pub generation: u32,
    /// Seconds since the gossip actor started.
    pub uptime_secs: u64,
    /// Whether the replica was restored from `gossip.redb` at start.
    pub replica_restored: bool,
    /// Members (this node first, then by node id).
    pub members: Vec<MemberRow>,
}

/// Asks for a [`MeshView`].
#[derive(Message)]
#[rtype(result = "MeshView")]
pub struct GetMesh;

impl Handler<GetMesh> for GossipActor {
    type Result = MessageResult<GetMesh>;

    fn handle(&mut self, _msg: GetMesh, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let my_hash = self.topology.hash();
        let (status, learned) = &self.status;
        let mut members = vec![MemberRow {
            name: self.name_of(&self.me),
            id: self.me.to_string(),
            is_self: true,
            state: "alive",
            generation: Some(self.node.generation()),
            last_heard_secs: None,
            site: Some(status.site.clone()),
            software_version: Some(status.software_version.clone()),
            topology_version: Some(status.topology_version),
            topology_hash: Some(hex(&status.topology_hash[..6])),
            topology_matches: Some(status.topology_hash == my_hash),
            status_age_secs: Some(secs(now.since(*learned))),
        }];
        let views = self.node.members();
        for m in &views {
            if m.node == self.me {
                continue;
            }
            let st = m.status.as_ref();
            members.push(MemberRow {
                name: self.name_of(&m.node),
                id: m.node.to_string(),
                is_self: false,
                state: match m.state {
                    MemberState::Alive => "alive",
                    MemberState::Suspect => "suspect",
                    MemberState::Down => "down",
                },
                generation: Some(m.generation),
                last_heard_secs: m.last_heard.map(|t| secs(now.since(t))),
                site: st.map(|(s, _)| s.site.clone()),
                software_version: st.map(|(s, _)| s.software_version.clone()),
                topology_version: st.map(|(s, _)| s.topology_version),
                topology_hash: st.map(|(s, _)| hex(&s.topology_hash[..6])),
                topology_matches: st.map(|(s, _)| s.topology_hash == my_hash),
                status_age_secs: st.map(|(_, t)| secs(now.since(*t))),
            });
        }
        // Topology nodes gossip has not heard of (yet).
        for n in &self.topology.nodes {
            if n.id != self.me && !views.iter().any(|m| m.node == n.id) {
                members.push(MemberRow {
                    name: Some(n.name.clone()),
                    id: n.id.to_string(),
                    is_self: false,
                    state: "unknown",
                    generation: None,
                    last_heard_secs: None,
                    site: None,
                    software_version: None,
                    topology_version: None,
                    topology_hash: None,
                    topology_matches: None,
                    status_age_secs: None,
                });
            }
        }
        MessageResult(MeshView {
            node_id: self.me.to_string(),
            generation: self.node.generation(),
            uptime_secs: self.started.elapsed().as_secs(),
            replica_restored: self.restored,
            members,
        })
    }
}

/// Who gossip counts as up, for choosing a platform volume's proxy.
#[derive(Debug, Clone, Default)]
pub struct LiveNodes {
    /// Members alive or suspect (not yet declared down), this node included.
    pub up: Vec<NodeId>,
    /// Every member gossip has heard of, up or down.
    pub heard: Vec<NodeId>,
}

/// Asks for the [`LiveNodes`].
#[derive(Message)]
#[rtype(result = "LiveNodes")]
pub struct GetLiveNodes;

impl Handler<GetLiveNodes> for GossipActor {
    type Result = MessageResult<GetLiveNodes>;

    fn handle(&mut self, _msg: GetLiveNodes, _ctx: &mut Context<Self>) -> Self::Result {
        let mut live = LiveNodes { up: vec![self.me], heard: vec![self.me] };
        for m in self.node.members() {
            if m.node == self.me {
                continue;
            }
            live.heard.push(m.node);
            if matches!(m.state, MemberState::Alive | MemberState::Suspect) {
                live.up.push(m.node);
            }
        }
        MessageResult(live)
    }
}

/// One RP of `drmesh ctl catalog`.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogRp {
    /// Volume.
    pub volume: VolumeName,
    /// Sequence number.
    pub seq: RpSeq,
    /// Holder's name in this node's topology (its short id if not listed).
    pub holder: String,
    /// Holder's full node id.
    pub holder_id: String,
    /// Snapshot instant, Unix milliseconds.
    pub snapshot_unix_ms: u64,
    /// Volume size, bytes.
    pub size_bytes: u64,
    /// Short Merkle root.
    pub merkle_root: String,
    /// `crash`, `fs-frozen` or `app`.
    pub consistency: &'static str,
    /// Last drill: passed?
    pub drill_passed: Option<bool>,
    /// Last drill: when, every check's verdict, verified or not.
    pub drill: Option<DrillResult>,
    /// The holder's newest scrub of it: when, the share of blobs read, sound or not.
    pub scrub: Option<ScrubVerdict>,
    /// Seconds since this node learned the entry (freshness).
    pub learned_secs: f64,
}

/// Per-volume summary of `drmesh ctl catalog`.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogVolume {
    /// Volume.
    pub volume: VolumeName,
    /// Source node (from the topology).
    pub source: Option<String>,
    /// The policy's RPO, seconds (from this node's topology, else the source's health).
    pub rpo_secs: Option<u64>,
    /// Newest RP anywhere in the mesh: seq.
    pub last_seq: Option<RpSeq>,
    /// Holders of that newest RP.
    pub last_holders: Vec<String>,
    /// Its snapshot instant, Unix milliseconds.
    pub last_rp_unix_ms: Option<u64>,
    /// Its age, seconds.
    pub last_rp_age_secs: Option<u64>,
    /// Whether the newest RP is younger than the RPO (`None` without RPO or RP).
    pub rpo_met: Option<bool>,
    /// By how much the RPO is missed, seconds (0 when met).
    pub rpo_missed_by_secs: Option<u64>,
    /// Number of live RPs of the volume in the catalog.
    pub rp_count: usize,
    /// Error of the source's last cycle, from its published health.
    pub last_error: Option<String>,
    /// Drills: newest verified RP, how long unverified, overdue (`None`
    /// when the volume's policy has no drills).
    pub verification: Option<Verification>,
}

/// The answer of `drmesh ctl catalog`.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogView {
    /// This node's id.
    pub node_id: String,
    /// Whether the replica was restored from `gossip.redb` at start.
    pub replica_restored: bool,
    /// Seconds since the gossip actor started.
    pub uptime_secs: u64,
    /// Now, Unix milliseconds (ages are computed against it).
    pub now_unix_ms: u64,
    /// Per volume.
    pub volumes: Vec<CatalogVolume>,
    /// Every live RP, by (volume, seq, holder).
    pub rps: Vec<CatalogRp>,
}

/// Asks for a [`CatalogView`], optionally of one volume.
#[derive(Message)]
#[rtype(result = "CatalogView")]
pub struct GetCatalog(pub Option<VolumeName>);

impl Handler<GetCatalog> for GossipActor {
    type Result = MessageResult<GetCatalog>;

    fn handle(&mut self, msg: GetCatalog, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let now_unix = unix_ms();
        let wanted = |v: &str| msg.0.as_deref().is_none_or(|w| w == v);
        let mut rps: Vec<CatalogRp> = self
            .node
            .rps()
            .into_iter()
            .filter(|r| wanted(&r.volume))
            .map(|r| CatalogRp {
                holder: self.name_of(&r.holder).unwrap_or_else(|| r.holder.short()),
                holder_id: r.holder.to_string(),
                volume: r.volume,
                seq: r.seq,
                snapshot_unix_ms: r.info.snapshot_unix_ms,
                size_bytes: r.info.size_bytes,
                merkle_root: hex(&r.info.merkle_root.0[..6]),
                consistency: r.info.consistency.label(),
                drill_passed: r.info.drill.as_ref().map(|d| d.passed),
                drill: r.info.drill.clone(),
                scrub: r.scrub,
                learned_secs: secs(now.since(r.learned_at)),
            })
            .collect();
        rps.sort_by(|a, b| (&a.volume, a.seq, &a.holder).cmp(&(&b.volume, b.seq, &b.holder)));
        let health = self.node.volume_health();
        let mut names: Vec<VolumeName> = self.topology.volumes.iter().map(|v| v.name.clone()).chain(rps.iter().map(|r| r.volume.clone())).filter(|v| wanted(v)).collect();
        names.sort();
        names.dedup();
        let volumes = names
            .into_iter()
            .map(|name| {
                let vol = self.topology.volume_by_name(&name);
                // The newest word on it: a platform's volume has its health
                // published by each proxy that read it (the dead one's last word too).
                let h = health.iter().filter(|h| h.volume == name).max_by_key(|h| h.health.last_cycle_unix_ms);
                let rpo_secs = vol
                    .and_then(|v| self.topology.policies.get(&v.policy))
                    .map(|p| p.rpo.as_secs())
                    .or_else(|| h.map(|h| h.health.rpo_ms / 1000));
                let of_volume: Vec<&CatalogRp> = rps.iter().filter(|r| r.volume == name).collect();
                let last_seq = of_volume.iter().map(|r| r.seq).max();
                let newest: Vec<&&CatalogRp> = of_volume.iter().filter(|r| Some(r.seq) == last_seq).collect();
                let last_rp_unix_ms = newest.iter().map(|r| r.snapshot_unix_ms).max();
                let last_rp_age_secs = last_rp_unix_ms.map(|t| now_unix.saturating_sub(t) / 1000);
                let (rpo_met, rpo_missed_by_secs) = match (rpo_secs, last_rp_age_secs) {
                    (Some(rpo), Some(age)) => (Some(age <= rpo), Some(age.saturating_sub(rpo))),
                    _ => (None, None),
                };
                CatalogVolume {
                    source: vol.map(|v| v.source.clone()),
                    rpo_secs,
                    last_seq,
                    last_holders: newest.iter().map(|r| r.holder.clone()).collect(),
                    last_rp_unix_ms,
                    last_rp_age_secs,
                    rpo_met,
                    rpo_missed_by_secs,
                    rp_count: of_volume.len(),
                    last_error: h.and_then(|h| h.health.last_error.clone()),
                    verification: self.verification_of(&name, &of_volume.iter().map(|r| (r.seq, r.snapshot_unix_ms, r.drill.as_ref())).collect::<Vec<_>>(), now_unix),
                    volume: name,
                }
            })
            .collect();
        MessageResult(CatalogView {
            node_id: self.me.to_string(),
            replica_restored: self.restored,
            uptime_secs: self.started.elapsed().as_secs(),
            now_unix_ms: now_unix,
            volumes,
            rps,
        })
    }
}
