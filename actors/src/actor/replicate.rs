//! The source side of one cycle: the driver of a [`SourceSession`] and the
//! three workers it feeds ([`block_reader`](super::block_reader),
//! [`compressor`](super::compressor), [`sender`](super::sender)).
//!
//! The driver opens the source's point-in-time view ([`ChangeSource`]), starts
//! the workers, and moves what they produce into the session and what the
//! session asks for out to them; it stages the baseline entries of changed
//! blocks as they pass. The baseline advances only after the target's
//! `Committed` (promise 2); a failed cycle leaves it where it was, so the next
//! scan finds the same changes, and the view keeps its changes pending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamHeader, StreamKind, MAX_DATA_FRAME_BYTES};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::codec::BlockCodec;
use crate::content::{ContentId, MerkleRoot};
use crate::proto::session::{CycleStats, OfferEntry, SourceEvent, SourceSession, TargetMsg};
use crate::source::baseline::{BaselineMeta, Baselines};
use crate::source::file::{FileSource, ScanStats, ScannedBlock};
use super::block_reader::{self, ReadJob, ReaderItem};
use super::compressor::Compressor;
use crate::source::change::{ChangeSource, Changes, PointInTime};
pub use super::pacing::{LinkPacers, Pacing};
use crate::store::{RpGroup, RpMeta, RpSeq, VolumeName};

/// Baseline entries staged per write.
const STAGE_BATCH: usize = 256;

/// What one cycle needs to know.
#[derive(Debug, Clone)]
pub struct CycleConfig {
    /// Volume name.
    pub volume: VolumeName,
    /// Target node name.
    pub target: String,
    /// This node's name.
    pub source_node: String,
    /// Where the volume's blocks and changes come from (its kind).
    pub source: Arc<dyn ChangeSource>,
    /// Policy block size.
    pub block_bytes: u32,
    /// Policy codec (compression, encryption, id scheme).
    pub codec: BlockCodec,
    /// Bandwidth limits the blob frames keep to.
    pub pacing: Pacing,
    /// How far the cycle's reader is, for status.
    pub progress: Arc<ReadProgress>,
    /// The volume's `free_space` setting.
    pub free_space: drmesh_topology::FreeSpace,
    /// The consistency group the volume's RPs are taken with (set by
    /// [`run_group_cycle`], which also sets `one_instant`).
    pub group: Option<RpGroup>,
}

/// How far a running cycle's reader is through the volume, for `ctl volumes`:
/// written by the reader, read by the scheduler.
#[derive(Debug, Default)]
pub struct ReadProgress {
    /// Blocks the reader has gone past (read, or skipped as unchanged).
    pub blocks_done: std::sync::atomic::AtomicU64,
    /// Blocks of the volume (0 until the view is open).
    pub block_count: std::sync::atomic::AtomicU64,
    /// Block size of the cycle, bytes.
    pub block_bytes: std::sync::atomic::AtomicU64,
}

/// What one cycle did, for logs, status and the demo table.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    /// Volume name.
    pub volume: VolumeName,
    /// Target node name.
    pub target: String,
    /// Sequence number of the committed RP.
    pub seq: RpSeq,
    /// Volume size.
    pub volume_bytes: u64,
    /// Bytes read from the source (volume blocks of wholly free space,
    /// which were not read, are not counted).
    pub scanned_bytes: u64,
    /// What the block-reader read and why: "full scan (file)", "changed
    /// blocks (kmod): N of M", "everything (kmod): REASON".
    pub read_plan: String,
    /// Whether every block was offered (no usable baseline on the target).
    pub full_offer: bool,
    /// Session counters.
    pub stats: CycleStats,
    /// Wall time in seconds.
    pub duration_secs: f64,
    /// The RP's snapshot instant (its time in the catalog), Unix milliseconds.
    pub snapshot_unix_ms: u64,
    /// Merkle root of the RP.
    pub merkle_root: String,
    /// The RP's consistency label (`inconsistent`, `crash`, `fs-frozen`, `app`).
    pub consistency: String,
    /// How the point-in-time view was taken, or why there was none.
    pub view: String,
    /// What the reader did with the free blocks of the volume's filesystem:
    /// "skipped: ext4 on ... (F of S MiB free)" or "read: why".
    pub free_space: String,
    /// Bytes of free filesystem space not read or zeroed (zeros in the RP).
    pub free_skipped_bytes: u64,
    /// Where the wall time went: seconds from the start of the cycle.
    pub timeline: CycleTimeline,
    /// The consistency group the RP was taken with, and how its views were taken.
    pub group: Option<CycleGroup>,
}

/// A group member's cycle: which group, and how the group's views were taken.
#[derive(Debug, Clone, Serialize)]
pub struct CycleGroup {
    /// The group's name.
    pub name: String,
    /// Whether every member's writes were held at the group's instant.
    pub one_instant: bool,
    /// How the group's views were taken, or why they are not of one instant.
    pub how: String,
}

/// Milestones of one cycle, in seconds since it started: they show where a
/// slow cycle waited (on the source's disk, the compressors, or the target).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleTimeline {
    /// The target answered the session start (baseline agreed).
    pub started_secs: f64,
    /// The first block came out of the reader.
    pub first_block_secs: f64,
    /// The reader finished the scan.
    pub read_done_secs: f64,
    /// The last blob came out of the compressors.
    pub last_encoded_secs: f64,
    /// The target acknowledged the commit.
    pub committed_secs: f64,
}

/// Why a cycle failed. The baseline is unchanged; the next cycle retries.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    /// Reading the source or its baseline failed.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// The session failed (target error, protocol error, lost connection).
    #[error("{0}")]
    Session(String),
    /// The connection to the target was lost before the target said anything
    /// (it closed before the stream opened, or before the first answer). The
    /// target holds no part of the cycle; it can start again at once on a new
    /// connection. Typically the target restarted and this connection was its
    /// old incarnation's.
    #[error("{0}")]
    Unanswered(String),
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs one cycle of `cfg.volume` to the target at the other end of `conn`.
///
/// A reason sent on `cancel` stops the cycle: it fails with that reason (the
/// baseline stays, the target drops the uncommitted session), unless its commit
/// was already sent. Dropping the sender without sending cancels nothing.
///
/// A cycle that fails with [`CycleError::Unanswered`] has not completed
/// `cancel` (a cancel makes it fail with the cancel's reason), so the caller
/// may pass it again to a cycle on a new connection.
pub async fn run_cycle(
    conn: quinn::Connection,
    cfg: CycleConfig,
    baselines: Arc<Baselines>,
    cancel: &mut oneshot::Receiver<String>,
) -> Result<CycleReport, CycleError> {
    // Views that may not overlap (one snapshot per device) take turns, each
    // from open to release. A pause while waiting for the turn ends the wait.
    let _turn = match cfg.source.turn() {
        None => None,
        Some(lock) => Some(tokio::select! {
            turn = lock.clone().lock_owned() => turn,
            reason = &mut *cancel => match reason {
                Ok(reason) => return Err(CycleError::Session(reason)),
                Err(_) => {
                    // Nobody can cancel any more; a receiver whose sender is gone
                    // tells the session loop so once.
                    *cancel = oneshot::channel().1;
                    lock.lock_owned().await
                }
            },
        }),
    };
    // A cancel (a pause; the lease running low) ends the wait for the target too.
    tokio::select! {
        () = adopt_if_qemu(&conn, &cfg, &baselines) => {}
        reason = &mut *cancel => match reason {
            Ok(reason) => return Err(CycleError::Session(reason)),
            Err(_) => *cancel = oneshot::channel().1,
        },
    }
    let (source, b, v, t, bb) = (cfg.source.clone(), baselines.clone(), cfg.volume.clone(), cfg.target.clone(), cfg.block_bytes);
    let view: Arc<dyn PointInTime> = tokio::task::spawn_blocking(move || source.open(&b, &v, &t, bb))
        .await
        .map_err(|e| CycleError::Session(e.to_string()))??
        .into();
    let result = run_cycle_on(conn, cfg, baselines, cancel, view.clone(), (now_ms(), None)).await;
    // Released before the turn ends (the reader thread may still hold a reference).
    match tokio::task::spawn_blocking(move || view.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the snapshot"),
        Err(e) => tracing::warn!(error = %e, "cannot release the snapshot"),
    }
    result
}

/// One cycle of a consistency group towards one target: the views of every
/// member in `cfgs` (in that order) taken together
/// ([`crate::source::group::open_together`]), then each member's cycle over
/// its view, one after another, all with the group's instant as their RPs'
/// time. Each member's RP commits on its own; the group RP is complete on the
/// target once every member's has. A view that cannot be taken fails every
/// member. The group's `hooks` run once, around all the views. Member `i`
/// is cancelled through `cancels[i]` (see [`run_cycle`]).
/// Returns one result per member, in order.
pub async fn run_group_cycle(
    conn: quinn::Connection,
    name: &str,
    hooks: Option<drmesh_topology::VolumeHooks>,
    cfgs: Vec<CycleConfig>,
    baselines: Arc<Baselines>,
    cancels: &mut [oneshot::Receiver<String>],
) -> Vec<Result<CycleReport, CycleError>> {
    // Turns in member order (a member's other targets' cycles hold its turn briefly).
    let mut turns = Vec::new();
    for cfg in &cfgs {
        if let Some(lock) = cfg.source.turn() {
            turns.push(lock.lock_owned().await);
        }
    }
    for cfg in &cfgs {
        adopt_if_qemu(&conn, cfg, &baselines).await;
    }
    let members: Vec<crate::source::group::Member> =
        cfgs.iter().map(|c| crate::source::group::Member { volume: c.volume.to_string(), source: c.source.clone() }).collect();
    let (b, target, block_bytes) = (baselines.clone(), cfgs[0].target.clone(), cfgs[0].block_bytes);
    let group = name.to_string();
    let opened = tokio::task::spawn_blocking(move || crate::source::group::open_together(&group, hooks.as_ref(), &members, &b, &target, block_bytes)).await;
    let group = match opened {
        Ok(Ok(group)) => group,
        Ok(Err(e)) => {
            let reason = format!("group {name}: the views could not be taken together: {e}");
            return cfgs.iter().map(|_| Err(CycleError::Session(reason.clone()))).collect();
        }
        Err(e) => return cfgs.iter().map(|_| Err(CycleError::Session(e.to_string()))).collect(),
    };
    if group.one_instant {
        tracing::info!(group = name, how = %group.how, "group views taken");
    } else {
        tracing::warn!(group = name, how = %group.how, "group views taken, not at one instant");
    }
    let mut names: Vec<VolumeName> = cfgs.iter().map(|c| c.volume.clone()).collect();
    names.sort();
    let tag = RpGroup { name: name.to_string(), members: names, one_instant: group.one_instant };
    let report_group = CycleGroup { name: name.to_string(), one_instant: group.one_instant, how: group.how.clone() };
    let mut results = Vec::with_capacity(cfgs.len());
    for ((mut cfg, view), cancel) in cfgs.into_iter().zip(group.views.iter().cloned()).zip(cancels.iter_mut()) {
        cfg.group = Some(tag.clone());
        let result = run_cycle_on(conn.clone(), cfg, baselines.clone(), cancel, view, (group.instant_unix_ms, Some(report_group.clone()))).await;
        results.push(result);
    }
    for view in group.views {
        match tokio::task::spawn_blocking(move || view.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(group = name, error = %e, "cannot release a group member's snapshot"),
            Err(e) => tracing::warn!(group = name, error = %e, "cannot release a group member's snapshot"),
        }
    }
    drop(turns);
    results
}

/// How long a cycle waits for the target's newest RP to take it as its baseline.
const ADOPT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// For a `qemu` volume: the target's newest RP as the baseline when the
/// baseline is another (see [`super::takeover`]); a failure is logged, and
/// the cycle reads everything as it would have.
async fn adopt_if_qemu(conn: &quinn::Connection, cfg: &CycleConfig, baselines: &Arc<Baselines>) {
    if cfg.source.as_qemu().is_none() {
        return;
    }
    let adopted = tokio::time::timeout(ADOPT_WAIT, super::takeover::adopt_target_baseline(conn, baselines, &cfg.volume, &cfg.target, cfg.block_bytes)).await;
    let error = match adopted {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e,
        Err(_) => format!("no answer from the target within {} s", ADOPT_WAIT.as_secs()),
    };
    tracing::warn!(volume = %cfg.volume, target = %cfg.target, %error, "cannot take the target's newest RP as the baseline; the cycle reads everything");
}

/// What a cycle reads: every block (`None`) or a set, and how to say so.
/// `changes` is what the view of a source of kind `kind` knows.
fn read_set(kind: &str, changes: &Changes, full_offer: bool, base_volume_bytes: Option<u64>, volume_bytes: u64, block_count: u64) -> (Option<Arc<crate::source::BlockMask>>, String) {
    match changes {
        Changes::Unknown => (None, format!("full scan ({kind})")),
        Changes::Everything(reason) => (None, format!("everything ({kind}): {reason}")),
        _ if full_offer => (None, format!("everything ({kind}): the target has no usable baseline")),
        Changes::Blocks(_) if base_volume_bytes != Some(volume_bytes) => (None, format!("everything ({kind}): the volume's size changed")),
        Changes::Blocks(mask) if mask.len() != block_count => (None, format!("everything ({kind}): the change set's geometry changed")),
        Changes::Blocks(mask) => (Some(mask.clone()), format!("changed blocks ({kind}): {} of {block_count}", mask.count())),
    }
}

/// The baseline of `cfg`'s volume towards its target, with what an earlier
/// cycle staged dropped; none (a full offer) when the block size changed.
async fn baseline_for(baselines: &Arc<Baselines>, cfg: &CycleConfig) -> Result<Option<BaselineMeta>, CycleError> {
    let (b, volume, target, block_bytes) = (baselines.clone(), cfg.volume.clone(), cfg.target.clone(), cfg.block_bytes);
    tokio::task::spawn_blocking(move || -> Result<Option<BaselineMeta>, crate::source::SourceError> {
        b.clear_staged(&volume, &target)?;
        Ok(match b.meta(&volume, &target)? {
            Some(m) if m.block_bytes != block_bytes => {
                b.reset(&volume, &target)?;
                None
            }
            other => other,
        })
    })
    .await
    .map_err(|e| CycleError::Session(e.to_string()))?
    .map_err(CycleError::from)
}

/// The RP a finished scan offers to commit (the target fills in seq and what it stored).
fn rp_meta(cfg: &CycleConfig, view: &dyn PointInTime, snapshot_ms: u64, volume_bytes: u64, block_count: u64, changed_blocks: u64, root: MerkleRoot) -> RpMeta {
    RpMeta {
        volume: cfg.volume.clone(),
        seq: RpSeq(0),
        time_unix_ms: snapshot_ms,
        source_node: cfg.source_node.clone(),
        volume_bytes,
        block_bytes: cfg.block_bytes,
        block_count,
        changed_blocks,
        bytes_stored: 0,
        merkle_root: root,
        encrypted: cfg.codec.encrypts(),
        consistency: view.quality().consistency.label().into(),
        group: cfg.group.clone(),
    }
}

/// Baseline entries of changed blocks, staged (not durable) in batches off
/// the driver's loop and in order, so the pipeline never waits on redb.
struct Stager {
    buf: Vec<(u64, ContentId, Vec<u8>)>,
    tx: mpsc::Sender<Vec<(u64, ContentId, Vec<u8>)>>,
    task: actix_rt::task::JoinHandle<Result<(), String>>,
}

impl Stager {
    fn start(baselines: Arc<Baselines>, volume: &str, target: &str) -> Stager {
        let (tx, mut rx) = mpsc::channel::<Vec<(u64, ContentId, Vec<u8>)>>(4);
        let (v, t) = (volume.to_string(), target.to_string());
        let task = actix_rt::spawn(async move {
            while let Some(entries) = rx.recv().await {
                let (b, v, t) = (baselines.clone(), v.clone(), t.clone());
                match tokio::task::spawn_blocking(move || b.stage(&v, &t, &entries)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        });
        Stager { buf: Vec::new(), tx, task }
    }

    fn push(&mut self, entry: (u64, ContentId, Vec<u8>)) {
        self.buf.push(entry);
    }

    /// Hands a full batch over; false when staging stopped (a baseline error).
    async fn flush_when_full(&mut self) -> bool {
        self.buf.len() < STAGE_BATCH || self.tx.send(std::mem::take(&mut self.buf)).await.is_ok()
    }

    /// Waits for the staged batches; returns the entries not yet handed over.
    async fn finish(self) -> Result<Vec<(u64, ContentId, Vec<u8>)>, CycleError> {
        drop(self.tx);
        match self.task.await {
            Ok(Ok(())) => Ok(self.buf),
            Ok(Err(reason)) => Err(CycleError::Session(reason)),
            Err(e) => Err(CycleError::Session(e.to_string())),
        }
    }
}

/// The target committed `meta`: stages the last entries and promotes them in
/// one durable transaction, then lets the view consume its changes.
async fn advance_baseline(baselines: &Arc<Baselines>, cfg: &CycleConfig, view: Arc<dyn PointInTime>, meta: BaselineMeta, rest: Vec<(u64, ContentId, Vec<u8>)>) -> Result<(), CycleError> {
    let (b, v, t) = (baselines.clone(), cfg.volume.clone(), cfg.target.clone());
    tokio::task::spawn_blocking(move || -> Result<u64, crate::source::SourceError> {
        b.stage(&v, &t, &rest)?;
        b.promote(&v, &t, &meta)
    })
    .await
    .map_err(|e| CycleError::Session(e.to_string()))??;
    // Only now may the source's pending changes go (promise 2).
    let b = baselines.clone();
    match tokio::task::spawn_blocking(move || view.committed(&b)).await {
        Ok(Ok(())) => {}
        // The changes stay pending: the next cycle reads them again, nothing is lost.
        Ok(Err(e)) => tracing::warn!(volume = %cfg.volume, error = %e, "cannot clear the committed changes or release the snapshot"),
        Err(e) => tracing::warn!(volume = %cfg.volume, error = %e, "cannot clear the committed changes or release the snapshot"),
    }
    Ok(())
}

/// What the driver of one cycle keeps besides the session: the blocks the
/// session holds, the reader's channel, the staged baseline entries and the
/// figures of the report.
struct Cycle<'a> {
    cfg: &'a CycleConfig,
    baselines: &'a Arc<Baselines>,
    view: &'a Arc<dyn PointInTime>,
    base_meta: Option<BaselineMeta>,
    started: Instant,
    snapshot_ms: u64,
    compressor: Compressor,
    held: HashMap<u64, Arc<ScannedBlock>>,
    /// Until the session says Start, a channel that never yields.
    blocks: mpsc::Receiver<ReaderItem>,
    stager: Stager,
    reader_running: bool,
    reader_finished: bool,
    full_offer: bool,
    scan_stats: ScanStats,
    merkle_root: MerkleRoot,
    volume_bytes: u64,
    block_count: u64,
    read_plan: String,
    /// How free space is read, and the reader's source (for its tally).
    free_space: (String, Option<FileSource>),
    timeline: CycleTimeline,
}

impl<'a> Cycle<'a> {
    fn new(
        cfg: &'a CycleConfig,
        baselines: &'a Arc<Baselines>,
        view: &'a Arc<dyn PointInTime>,
        base_meta: Option<BaselineMeta>,
        (started, snapshot_ms): (Instant, u64),
        compressor: Compressor,
    ) -> Self {
        Cycle {
            cfg,
            baselines,
            view,
            base_meta,
            started,
            snapshot_ms,
            compressor,
            held: HashMap::new(),
            blocks: mpsc::channel::<ReaderItem>(1).1,
            stager: Stager::start(baselines.clone(), &cfg.volume, &cfg.target),
            reader_running: false,
            reader_finished: false,
            full_offer: false,
            scan_stats: ScanStats::default(),
            merkle_root: MerkleRoot::default(),
            volume_bytes: 0,
            block_count: 0,
            read_plan: String::new(),
            free_space: (String::new(), None),
            timeline: CycleTimeline::default(),
        }
    }

    fn since(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Carries out one session event; `Some` once the cycle has ended.
    fn on_event(&mut self, session: &mut SourceSession, event: SourceEvent) -> Result<Option<Result<RpSeq, CycleError>>, CycleError> {
        match event {
            SourceEvent::Start { full_offer } => self.start_reader(full_offer)?,
            SourceEvent::Encode { index, want } => match self.held.get(&index) {
                Some(block) => self.compressor.encode(index, block.clone(), want),
                None => session.handle_encode_failed(format!("block {index} was asked for but is not held")),
            },
            SourceEvent::Release { index } => {
                self.held.remove(&index);
            }
            SourceEvent::Committed { seq } => {
                self.timeline.committed_secs = self.since();
                return Ok(Some(Ok(seq)));
            }
            SourceEvent::Failed { reason } => return Ok(Some(Err(CycleError::Session(reason)))),
        }
        Ok(None)
    }

    /// The session may start: opens the view's blocks and starts the reader
    /// on what this cycle reads.
    fn start_reader(&mut self, full_offer: bool) -> Result<(), CycleError> {
        self.full_offer = full_offer;
        self.timeline.started_secs = self.since();
        let device = self.view.device()?;
        let free = crate::source::free_space::plan(self.cfg.free_space, self.view.quality().consistency, &device);
        let mut source = FileSource::on(device, self.cfg.block_bytes);
        if let Some(map) = free.free {
            source = source.with_free_space(map);
        }
        self.free_space = (free.how, Some(source.clone()));
        (self.volume_bytes, self.block_count) = (source.volume_bytes(), source.block_count());
        let progress = &self.cfg.progress;
        progress.block_bytes.store(u64::from(self.cfg.block_bytes), std::sync::atomic::Ordering::Relaxed);
        progress.block_count.store(self.block_count, std::sync::atomic::Ordering::Relaxed);
        let base_bytes = self.base_meta.as_ref().map(|m| m.volume_bytes);
        let only;
        (only, self.read_plan) = read_set(self.cfg.source.kind(), &self.view.changes(), full_offer, base_bytes, self.volume_bytes, self.block_count);
        self.reader_running = true;
        self.blocks = block_reader::start(ReadJob {
            source,
            view: self.view.clone(),
            baselines: self.baselines.clone(),
            volume: self.cfg.volume.clone(),
            target: self.cfg.target.clone(),
            ids: self.cfg.codec.ids().clone(),
            full_offer,
            only,
            progress: self.cfg.progress.clone(),
        });
        Ok(())
    }

    /// Hands what the reader produced to the session.
    fn on_reader(&mut self, session: &mut SourceSession, item: Option<ReaderItem>) {
        match item {
            Some(ReaderItem::Blocks(blocks)) => {
                if self.timeline.first_block_secs == 0.0 {
                    self.timeline.first_block_secs = self.since();
                }
                // The whole batch is taken: the window may overshoot by less than
                // one hand-over batch, which the memory bound allows for.
                for block in blocks {
                    self.stager.push((block.index, block.content, block.page_hashes.clone()));
                    let base = block.base.as_ref().map(|b| b.content).filter(|c| !c.is_zero());
                    let entry = OfferEntry { index: block.index, content: block.content, base };
                    let len = block.data.len() as u64;
                    // A zero block is never encoded: its buffer goes back to the pool now.
                    if !block.content.is_zero() {
                        self.held.insert(block.index, Arc::new(block));
                    }
                    session.handle_block(entry, len);
                }
            }
            Some(ReaderItem::Done(root, stats)) => {
                self.reader_finished = true;
                self.timeline.read_done_secs = self.since();
                self.merkle_root = root;
                self.scan_stats = stats;
                let meta = rp_meta(self.cfg, self.view.as_ref(), self.snapshot_ms, self.volume_bytes, self.block_count, self.scan_stats.changed_blocks, root);
                session.handle_reader_done(meta);
            }
            Some(ReaderItem::Failed(reason)) => session.handle_encode_failed(format!("reading the source: {reason}")),
            None => session.handle_encode_failed("block reader stopped".into()),
        }
    }
}

/// [`run_cycle`] reading the source's point-in-time `view`.
async fn run_cycle_on(
    conn: quinn::Connection,
    cfg: CycleConfig,
    baselines: Arc<Baselines>,
    cancel: &mut oneshot::Receiver<String>,
    view: Arc<dyn PointInTime>,
    (snapshot_ms, group): (u64, Option<CycleGroup>),
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let base_meta = baseline_for(&baselines, &cfg).await?;
    // A connection that is already gone never carried anything of this cycle.
    let header = StreamHeader::data(StreamKind::Replication, crate::proto::version::REPLICATION);
    let (send, recv) = endpoint::open_stream(&conn, header).await.map_err(|e| match conn.close_reason() {
        Some(_) => CycleError::Unanswered(format!("connection to target lost: {e}")),
        None => CycleError::Session(e.to_string()),
    })?;
    let mut reader = MessageReader::with_limit(recv, MAX_DATA_FRAME_BYTES);
    let (out_tx, sender) = super::sender::start(send, cfg.pacing.clone());
    let mut session = SourceSession::new(&cfg.volume, base_meta.as_ref().map(|m| (m.seq, m.merkle_root)), cfg.codec.encrypts(), cfg.block_bytes);
    // The window of bytes not yet durable follows the path's round trip,
    // measured again with every answer of the target.
    session.handle_round_trip(conn.rtt());
    let (compressor, mut enc_rx) = Compressor::new(cfg.codec.clone());
    let mut cycle = Cycle::new(&cfg, &baselines, &view, base_meta, (started, snapshot_ms), compressor);
    let mut cancel_seen = false;
    let result: Result<RpSeq, CycleError> = loop {
        while let Some(msg) = session.poll_transmit() {
            if out_tx.send(msg).await.is_err() {
                session.handle_disconnect("stream writer stopped".into());
            }
        }
        let mut finished = None;
        while let Some(event) = session.poll_event() {
            finished = finished.or(cycle.on_event(&mut session, event)?);
        }
        if let Some(done) = finished {
            break done;
        }
        if !cycle.stager.flush_when_full().await {
            session.handle_encode_failed("baseline staging stopped".into());
        }
        let want_blocks = cycle.reader_running && !cycle.reader_finished && session.wants_block();
        tokio::select! {
            reason = &mut *cancel, if !cancel_seen => {
                cancel_seen = true;
                if let Ok(reason) = reason {
                    if !session.handle_cancel(reason) {
                        tracing::info!(volume = %cfg.volume, target = %cfg.target, "cycle is committing; letting it finish");
                    }
                }
            }
            msg = reader.next_frame::<TargetMsg>() => match msg {
                Ok(Some(msg)) => {
                    session.handle_round_trip(conn.rtt());
                    session.handle_message(msg)
                }
                Ok(None) => session.handle_disconnect("target closed the session".into()),
                Err(e) => session.handle_disconnect(e.to_string()),
            },
            item = cycle.blocks.recv(), if want_blocks => cycle.on_reader(&mut session, item),
            Some((index, blob)) = enc_rx.recv() => match blob {
                Ok(blob) => {
                    cycle.timeline.last_encoded_secs = cycle.since();
                    session.handle_encoded(index, blob)
                }
                Err(reason) => session.handle_encode_failed(reason),
            },
        }
    };
    drop(out_tx);
    let _ = sender.await;
    let Cycle { stager, merkle_root, block_count, volume_bytes, scan_stats, read_plan, full_offer, timeline, free_space, .. } = cycle;
    let staged = stager.finish().await;
    // Lost with the connection before the target said anything (and not
    // cancelled, so `cancel` is still pending): the caller may start again.
    let result = match result {
        Err(CycleError::Session(reason)) if session.lost_before_answer() && !cancel_seen && conn.close_reason().is_some() => {
            Err(CycleError::Unanswered(reason))
        }
        other => other,
    };
    let seq = result?;
    let rest = staged?;
    // Committed on the target: only now does the baseline move (promise 2).
    let meta = BaselineMeta { seq, merkle_root, block_bytes: cfg.block_bytes, block_count, volume_bytes, time_unix_ms: snapshot_ms };
    let quality = view.quality();
    advance_baseline(&baselines, &cfg, view, meta, rest).await?;
    Ok(CycleReport {
        volume: cfg.volume,
        target: cfg.target,
        seq,
        volume_bytes,
        // The scan handled every block of its read set; free blocks it did not read are not "read".
        scanned_bytes: scan_stats.scanned_bytes.saturating_sub(free_space.1.as_ref().map_or(0, FileSource::free_unread)),
        read_plan,
        full_offer,
        stats: session.stats().clone(),
        duration_secs: started.elapsed().as_secs_f64(),
        snapshot_unix_ms: snapshot_ms,
        merkle_root: merkle_root.to_hex(),
        consistency: quality.consistency.label().into(),
        view: quality.how,
        free_skipped_bytes: free_space.1.as_ref().map_or(0, FileSource::free_skipped),
        free_space: free_space.0,
        timeline,
        group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::BlockMask;

    fn changed(len: u64, blocks: &[u64]) -> Changes {
        let mut mask = BlockMask::new(len);
        for &b in blocks {
            mask.insert(b);
        }
        Changes::Blocks(Arc::new(mask))
    }

    #[test]
    fn a_file_volume_reads_every_block() {
        let (only, why) = read_set("file", &Changes::Unknown, false, Some(1 << 20), 1 << 20, 4);
        assert!(only.is_none());
        assert_eq!(why, "full scan (file)");
    }

    #[test]
    fn the_module_change_set_is_read_when_the_baseline_matches() {
        let plan = changed(4, &[1, 3]);
        let (only, why) = read_set("kmod", &plan, false, Some(4 << 20), 4 << 20, 4);
        let only = only.expect("a read set");
        assert!(only.contains(1) && only.contains(3) && !only.contains(0) && !only.contains(2));
        assert_eq!(why, "changed blocks (kmod): 2 of 4");
    }

    #[test]
    fn every_block_is_read_when_the_change_set_cannot_be_trusted() {
        let plan = changed(4, &[1]);
        // Each case falls back to reading everything, and says why.
        let cases = [
            (&plan, true, Some(4 << 20), 4 << 20, 4, "the target has no usable baseline"),
            (&plan, false, None, 4 << 20, 4, "the volume's size changed"),
            (&plan, false, Some(3 << 20), 4 << 20, 4, "the volume's size changed"),
            (&plan, false, Some(5 << 20), 5 << 20, 5, "the change set's geometry changed"),
        ];
        for (plan, full_offer, base, bytes, blocks, reason) in cases {
            let (only, why) = read_set("kmod", plan, full_offer, base, bytes, blocks);
            assert!(only.is_none(), "{reason}: read only a set");
            assert_eq!(why, format!("everything (kmod): {reason}"));
        }
        let everything = Changes::Everything("the module lost track (overflow)".into());
        let (only, why) = read_set("kmod", &everything, false, Some(4 << 20), 4 << 20, 4);
        assert!(only.is_none());
        assert_eq!(why, "everything (kmod): the module lost track (overflow)");
    }
}
