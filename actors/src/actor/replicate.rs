//! The source side of one cycle: block-reader, compressor and sender.
//!
//! - block-reader: a blocking task that scans the volume ([`Scanner`]) and hands
//!   changed blocks over a short channel; it only gets to read ahead while the
//!   session grants credit, so memory is bounded by the window, not the volume.
//! - compressor: wanted blocks are encoded (zstd, AES-GCM, or a delta) on the
//!   encode pool ([`crate::cpu_pool`]), which spans both cores, off the async threads.
//! - sender: this task, which drives the [`SourceSession`], writes frames to the
//!   QUIC stream and reads the target's answers.
//!
//! The baseline advances only after the target's `Committed` (promise 2); a
//! failed cycle leaves it where it was, so the next scan finds the same changes.
//!
//! A `kmod` volume's cycle first takes a snapshot ([`KmodCycle`]) and reads
//! only the changed blocks from it; the snapshot is released after the commit
//! was acknowledged, or when the cycle failed (its changes stay pending).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamKind, MAX_DATA_FRAME_BYTES};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::codec::BlockCodec;
use crate::content::ContentId;
use crate::proto::bandwidth::Pacer;
use crate::proto::session::{CycleStats, OfferEntry, SourceEvent, SourceMsg, SourceSession, TargetMsg, Want};
use crate::source::baseline::{BaselineMeta, Baselines};
use crate::source::file::{FileSource, ScanStats, ScannedBlock, Scanner};
use crate::source::change::{ChangeSource, Changes, PointInTime};
use crate::store::{EncodedBlob, RpMeta};

/// Baseline entries staged per write.
const STAGE_BATCH: usize = 256;

/// What one cycle needs to know.
#[derive(Debug, Clone)]
pub struct CycleConfig {
    /// Volume name.
    pub volume: String,
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
}

/// Longest single sleep of a paced sender: a rate change (a window opening,
/// a topology reload, a new site share) takes effect within this time.
const PACE_RECHECK: Duration = Duration::from_millis(100);

/// The pacers a cycle's blob frames go through: its policy's (shared by this
/// node's cycles of that policy), the node's share of its site uplink
/// (shared by all its cycles) and the `[[link]]` to its peer. The scheduler
/// changes their rates while cycles run; a sender sees a change within
/// [`PACE_RECHECK`], and a link added or removed by a reload at its next frame.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// Origin of the pacers' time.
    pub origin: Instant,
    /// Every pacer a frame must wait for, besides the link's.
    pub pacers: Vec<Arc<Mutex<Pacer>>>,
    /// The links of this node and the peer the frames go to: the link's
    /// pacer is looked up at every frame.
    pub link: Option<(Arc<LinkPacers>, String)>,
    /// Blob payload bytes let through so far (the cycle's progress, for status).
    pub sent_payload_bytes: Arc<AtomicU64>,
}

impl Pacing {
    /// No limits.
    pub fn unlimited() -> Self {
        Pacing { origin: Instant::now(), pacers: Vec::new(), link: None, sent_payload_bytes: Arc::default() }
    }

    /// Waits until every pacer lets `bytes` go, then charges them.
    pub async fn pace(&self, bytes: u64) {
        let link = self.link.as_ref().and_then(|(links, peer)| links.get(peer));
        let pacers: Vec<&Arc<Mutex<Pacer>>> = self.pacers.iter().chain(link.as_ref()).collect();
        // A poisoned pacer only means a panic elsewhere mid-update; its numbers are still usable.
        loop {
            let now = self.origin.elapsed();
            let wait = pacers
                .iter()
                .map(|p| p.lock().unwrap_or_else(PoisonError::into_inner).delay(now))
                .max()
                .unwrap_or_default();
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait.min(PACE_RECHECK)).await;
        }
        let now = self.origin.elapsed();
        for p in &pacers {
            p.lock().unwrap_or_else(PoisonError::into_inner).handle_sent(now, bytes);
        }
        self.sent_payload_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The pacers of this node's `[[link]]` caps, one per peer it has a link
/// to. The scheduler sets their rates; every transfer this node sends to
/// that peer (replication cycles and fetch replies) waits for the same one,
/// so together they keep to the link's cap.
#[derive(Debug)]
pub struct LinkPacers {
    origin: Instant,
    by_peer: Mutex<BTreeMap<String, Arc<Mutex<Pacer>>>>,
}

impl LinkPacers {
    /// No links yet; `origin` is the time base of every pacer.
    pub fn new(origin: Instant) -> Self {
        LinkPacers { origin, by_peer: Mutex::new(BTreeMap::new()) }
    }

    /// Time base of the pacers: their `now` is `origin.elapsed()`.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Sets the caps in force at `now` (bits per second, `None`: unlimited):
    /// a peer missing from `caps` has no link any more and loses its pacer.
    pub fn set(&self, now: Duration, caps: &BTreeMap<String, Option<u64>>) {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        by_peer.retain(|peer, _| caps.contains_key(peer));
        for (peer, bps) in caps {
            let pacer = by_peer.entry(peer.clone()).or_insert_with(|| Arc::new(Mutex::new(Pacer::new(now, None))));
            pacer.lock().unwrap_or_else(PoisonError::into_inner).set_rate(now, *bps);
        }
    }

    /// The pacer of the link to `peer`, if there is a link.
    fn get(&self, peer: &str) -> Option<Arc<Mutex<Pacer>>> {
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned()
    }

    /// What a transfer to `peer` keeps to besides its own limits: the link to
    /// `peer` as it is at each frame (nothing while no link is declared).
    pub fn pacing_to(self: &Arc<Self>, peer: &str) -> Pacing {
        Pacing { origin: self.origin, pacers: Vec::new(), link: Some((self.clone(), peer.to_string())), sent_payload_bytes: Arc::default() }
    }
}

/// What one cycle did, for logs, status and the demo table.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    /// Volume name.
    pub volume: String,
    /// Target node name.
    pub target: String,
    /// Sequence number of the committed RP.
    pub seq: u64,
    /// Volume size.
    pub volume_bytes: u64,
    /// Bytes read from the source.
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
    /// Where the wall time went: seconds from the start of the cycle.
    pub timeline: CycleTimeline,
}

/// Milestones of one cycle, in seconds since it started: they show where a
/// slow cycle waited (on the source's disk, the compressors, or the target).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleTimeline {
    /// The target answered the session start (baseline agreed).
    pub started: f64,
    /// The first block came out of the reader.
    pub first_block: f64,
    /// The reader finished the scan.
    pub read_done: f64,
    /// The last blob came out of the compressors.
    pub last_encoded: f64,
    /// The target acknowledged the commit.
    pub committed: f64,
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

/// Blocks handed from the reader to the session loop at once: one wake-up per
/// batch rather than per block (long runs of zero blocks are cheap to read and
/// would otherwise be paced by the hand-over).
const HANDOVER_BLOCKS: usize = 16;

enum ReaderItem {
    Blocks(Vec<ScannedBlock>),
    Done([u8; 32], ScanStats),
    Failed(String),
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
    let (source, b, v, t, bb) = (cfg.source.clone(), baselines.clone(), cfg.volume.clone(), cfg.target.clone(), cfg.block_bytes);
    let view: Arc<dyn PointInTime> = tokio::task::spawn_blocking(move || source.open(&b, &v, &t, bb))
        .await
        .map_err(|e| CycleError::Session(e.to_string()))??
        .into();
    let result = run_cycle_on(conn, cfg, baselines, cancel, view.clone()).await;
    // Released before the turn ends (the reader thread may still hold a reference).
    match tokio::task::spawn_blocking(move || view.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the snapshot"),
        Err(e) => tracing::warn!(error = %e, "cannot release the snapshot"),
    }
    result
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

/// [`run_cycle`] reading the source's point-in-time `view`.
async fn run_cycle_on(
    conn: quinn::Connection,
    cfg: CycleConfig,
    baselines: Arc<Baselines>,
    cancel: &mut oneshot::Receiver<String>,
    view: Arc<dyn PointInTime>,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let snapshot_ms = now_ms();
    let session_err = |e: &dyn std::fmt::Display| CycleError::Session(e.to_string());
    let (volume, target) = (cfg.volume.clone(), cfg.target.clone());
    let b = baselines.clone();
    let base_meta = tokio::task::spawn_blocking(move || -> Result<Option<BaselineMeta>, crate::source::SourceError> {
        b.clear_staged(&volume, &target)?;
        let meta = b.meta(&volume, &target)?;
        Ok(match meta {
            Some(m) if m.block_bytes != cfg.block_bytes => {
                b.reset(&volume, &target)?;
                None
            }
            other => other,
        })
    })
    .await
    .map_err(|e| session_err(&e))??;

    // A connection that is already gone never carried anything of this cycle.
    let (mut send, recv) = endpoint::open_stream(&conn, StreamKind::Replication).await.map_err(|e| match conn.close_reason() {
        Some(_) => CycleError::Unanswered(format!("connection to target lost: {e}")),
        None => session_err(&e),
    })?;
    let mut reader = MessageReader::with_limit(recv, MAX_DATA_FRAME_BYTES);
    let (out_tx, mut out_rx) = mpsc::channel::<SourceMsg>(8);
    let pacing = cfg.pacing.clone();
    let sender = actix_rt::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if let SourceMsg::Blob(blob) = &msg {
                pacing.pace(blob.payload.len() as u64).await;
            }
            if let Err(e) = endpoint::send_frame(&mut send, &msg).await {
                return Err(e.to_string());
            }
        }
        let _ = send.finish();
        Ok(())
    });

    let mut session = SourceSession::new(&cfg.volume, base_meta.as_ref().map(|m| (m.seq, m.merkle_root)), cfg.codec.encrypts(), cfg.block_bytes);
    let (block_tx, mut block_rx) = mpsc::channel::<ReaderItem>(1);
    let (enc_tx, mut enc_rx) = mpsc::unbounded_channel::<(u64, Result<EncodedBlob, String>)>();
    let mut held: HashMap<u64, Arc<ScannedBlock>> = HashMap::new();
    let mut stage_buf: Vec<(u64, ContentId, Vec<u8>)> = Vec::new();
    let (stage_tx, mut stage_rx) = mpsc::channel::<Vec<(u64, ContentId, Vec<u8>)>>(4);
    let (b, v, t) = (baselines.clone(), cfg.volume.clone(), cfg.target.clone());
    let stager = actix_rt::spawn(async move {
        while let Some(entries) = stage_rx.recv().await {
            let (b, v, t) = (b.clone(), v.clone(), t.clone());
            match tokio::task::spawn_blocking(move || b.stage(&v, &t, &entries)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    });
    let mut reader_running = false;
    let mut reader_finished = false;
    let mut full_offer = false;
    let mut scan_stats = ScanStats::default();
    let mut merkle_root = [0u8; 32];
    let mut volume_bytes = 0u64;
    let mut block_count = 0u64;
    let mut timeline = CycleTimeline::default();
    let mut read_plan = String::new();
    let since = |t: Instant| t.elapsed().as_secs_f64();
    let mut cancel_seen = false;

    let result: Result<u64, CycleError> = loop {
        while let Some(msg) = session.poll_transmit() {
            if out_tx.send(msg).await.is_err() {
                session.handle_disconnect("stream writer stopped".into());
            }
        }
        let mut finished = None;
        while let Some(event) = session.poll_event() {
            match event {
                SourceEvent::Start { full_offer: full, .. } => {
                    full_offer = full;
                    timeline.started = since(started);
                    let source = FileSource::open(view.path(), cfg.block_bytes)?;
                    volume_bytes = source.volume_bytes();
                    block_count = source.block_count();
                    let only;
                    (only, read_plan) = read_set(cfg.source.kind(), &view.changes(), full, base_meta.as_ref().map(|m| m.volume_bytes), volume_bytes, block_count);
                    let (b, v, t, ids, tx) = (baselines.clone(), cfg.volume.clone(), cfg.target.clone(), cfg.codec.ids().clone(), block_tx.clone());
                    let snapshot = view.clone();
                    reader_running = true;
                    tokio::task::spawn_blocking(move || {
                        let mut scanner = Scanner::new(&source, &b, &v, &t, ids, full).with_read_set(only);
                        let mut batch = Vec::with_capacity(HANDOVER_BLOCKS);
                        loop {
                            match scanner.next_changed() {
                                Ok(Some(block)) => {
                                    batch.push(block);
                                    if batch.len() >= HANDOVER_BLOCKS && tx.blocking_send(ReaderItem::Blocks(std::mem::take(&mut batch))).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {
                                    if !batch.is_empty() && tx.blocking_send(ReaderItem::Blocks(batch)).is_err() {
                                        return;
                                    }
                                    break;
                                }
                                Err(e) => {
                                    let _ = tx.blocking_send(ReaderItem::Failed(e.to_string()));
                                    return;
                                }
                            }
                        }
                        let (root, stats) = scanner.finish();
                        // Reads of an invalidated snapshot fail, but one invalidated
                        // as the last read finished must fail the cycle too.
                        if let Err(e) = snapshot.check() {
                            let _ = tx.blocking_send(ReaderItem::Failed(e.to_string()));
                            return;
                        }
                        let _ = tx.blocking_send(ReaderItem::Done(root, stats));
                    });
                }
                SourceEvent::Encode { index, want } => {
                    let Some(block) = held.get(&index).cloned() else {
                        session.handle_encode_failed(format!("block {index} was asked for but is not held"));
                        continue;
                    };
                    let (codec, tx) = (cfg.codec.clone(), enc_tx.clone());
                    crate::cpu_pool::encode_pool().spawn(move || {
                        let blob = match (want, &block.base) {
                            (Want::Delta { base, depth }, Some(b)) => codec
                                .encode_delta(block.content, &block.data, &block.page_hashes, base, depth, &b.page_hashes)
                                .unwrap_or_else(|| codec.encode_full(block.content, &block.data)),
                            _ => codec.encode_full(block.content, &block.data),
                        };
                        let _ = tx.send((index, Ok(blob)));
                    });
                }
                SourceEvent::Release { index } => {
                    held.remove(&index);
                }
                SourceEvent::Committed { seq } => {
                    timeline.committed = since(started);
                    finished = Some(Ok(seq))
                }
                SourceEvent::Failed { reason } => finished = Some(Err(CycleError::Session(reason))),
            }
        }
        if let Some(done) = finished {
            break done;
        }
        if stage_buf.len() >= STAGE_BATCH {
            // Staged off the session loop, in order, so the pipeline never waits on redb.
            if stage_tx.send(std::mem::take(&mut stage_buf)).await.is_err() {
                session.handle_encode_failed("baseline staging stopped".into());
            }
        }
        let want_blocks = reader_running && !reader_finished && session.wants_block();
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
                Ok(Some(msg)) => session.handle_message(msg),
                Ok(None) => session.handle_disconnect("target closed the session".into()),
                Err(e) => session.handle_disconnect(e.to_string()),
            },
            item = block_rx.recv(), if want_blocks => match item {
                Some(ReaderItem::Blocks(blocks)) => {
                    if timeline.first_block == 0.0 {
                        timeline.first_block = since(started);
                    }
                    // The whole batch is taken: the window may overshoot by less than
                    // one hand-over batch, which the memory bound allows for.
                    for block in blocks {
                        stage_buf.push((block.index, block.content, block.page_hashes.clone()));
                        let base = block.base.as_ref().map(|b| b.content).filter(|c| !c.is_zero());
                        let entry = OfferEntry { index: block.index, content: block.content, base };
                        let len = block.data.len() as u64;
                        // A zero block is never encoded: its buffer goes back to the pool now.
                        if !block.content.is_zero() {
                            held.insert(block.index, Arc::new(block));
                        }
                        session.handle_block(entry, len);
                    }
                }
                Some(ReaderItem::Done(root, stats)) => {
                    reader_finished = true;
                    timeline.read_done = since(started);
                    merkle_root = root;
                    scan_stats = stats;
                    session.handle_reader_done(RpMeta {
                        volume: cfg.volume.clone(),
                        seq: 0,
                        time_unix_ms: snapshot_ms,
                        source_node: cfg.source_node.clone(),
                        volume_bytes,
                        block_bytes: cfg.block_bytes,
                        block_count,
                        changed_blocks: scan_stats.changed_blocks,
                        bytes_stored: 0,
                        merkle_root: root,
                        encrypted: cfg.codec.encrypts(),
                        consistency: "crash".into(),
                    });
                }
                Some(ReaderItem::Failed(reason)) => session.handle_encode_failed(format!("reading the source: {reason}")),
                None => session.handle_encode_failed("block reader stopped".into()),
            },
            Some((index, blob)) = enc_rx.recv() => match blob {
                Ok(blob) => {
                    timeline.last_encoded = since(started);
                    session.handle_encoded(index, blob)
                }
                Err(reason) => session.handle_encode_failed(reason),
            },
        }
    };
    drop(out_tx);
    drop(stage_tx);
    let _ = sender.await;
    let staged = stager.await.map_err(|e| session_err(&e)).and_then(|r| r.map_err(CycleError::Session));
    // Lost with the connection before the target said anything (and not
    // cancelled, so `cancel` is still pending): the caller may start again.
    let result = match result {
        Err(CycleError::Session(reason)) if session.lost_before_answer() && !cancel_seen && conn.close_reason().is_some() => {
            Err(CycleError::Unanswered(reason))
        }
        other => other,
    };
    let seq = result?;
    staged?;

    // Committed on the target: only now does the baseline move (promise 2).
    let meta = BaselineMeta { seq, merkle_root, block_bytes: cfg.block_bytes, block_count, volume_bytes, time_unix_ms: snapshot_ms };
    let (b, v, t) = (baselines.clone(), cfg.volume.clone(), cfg.target.clone());
    tokio::task::spawn_blocking(move || -> Result<u64, crate::source::SourceError> {
        b.stage(&v, &t, &stage_buf)?;
        b.promote(&v, &t, &meta)
    })
    .await
    .map_err(|e| session_err(&e))??;
    // Only now may the source's pending changes go (promise 2).
    let b = baselines.clone();
    match tokio::task::spawn_blocking(move || view.committed(&b)).await {
        Ok(Ok(())) => {}
        // The changes stay pending: the next cycle reads them again, nothing is lost.
        Ok(Err(e)) => tracing::warn!(volume = %cfg.volume, error = %e, "cannot clear the committed changes or release the snapshot"),
        Err(e) => tracing::warn!(volume = %cfg.volume, error = %e, "cannot clear the committed changes or release the snapshot"),
    }
    Ok(CycleReport {
        volume: cfg.volume,
        target: cfg.target,
        seq,
        volume_bytes,
        scanned_bytes: scan_stats.scanned_bytes,
        read_plan,
        full_offer,
        stats: session.stats().clone(),
        duration_secs: started.elapsed().as_secs_f64(),
        snapshot_unix_ms: snapshot_ms,
        merkle_root: merkle_root.iter().map(|b| format!("{b:02x}")).collect(),
        timeline,
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
