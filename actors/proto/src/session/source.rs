//! The source side of a session: offers changed blocks, encodes what the
//! target wants, commits when every wanted blob is on its way.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::msg::{OfferEntry, SourceMsg, TargetMsg, Want};
use super::{inflight_window, MAX_PENDING_BYTES, MIN_INFLIGHT_BYTES, MIN_PENDING_BLOCKS, OFFER_BATCH};
use crate::blob::{BlobFlags, EncodedBlob, RpMeta, RpSeq, VolumeName};
use crate::codec::MAX_DELTA_DEPTH;
use crate::content::BlobId;

/// What the source driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// Start reading (once the target answered `Opened`, or at once when there
    /// is no base); offer every block when `full_offer`.
    Start {
        /// Offer unchanged blocks too.
        full_offer: bool,
    },
    /// Encode block `index` (full, or as a delta over `base`) and hand it back with `handle_encoded`.
    Encode {
        /// Block index.
        index: u64,
        /// How.
        want: Want,
    },
    /// Block `index`'s data is no longer needed (the target has it, or it is encoded).
    Release {
        /// Block index.
        index: u64,
    },
    /// The RP is committed: advance the baseline.
    Committed {
        /// Its sequence number.
        seq: RpSeq,
    },
    /// The cycle failed; keep the old baseline.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Counters of one cycle, for the demo table and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleStats {
    /// Blocks offered.
    pub offered_blocks: u64,
    /// Blocks the target already had.
    pub present_blocks: u64,
    /// Blocks sent whole.
    pub full_blocks: u64,
    /// Blocks sent as deltas.
    pub delta_blocks: u64,
    /// Plaintext bytes of the blocks offered.
    pub offered_bytes: u64,
    /// Plaintext bytes of what was sent (blocks or delta encodings).
    pub sent_plain_bytes: u64,
    /// Payload bytes sent (after compression and encryption).
    pub sent_payload_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Opening,
    Streaming,
    Committing,
    Done,
    Failed,
}

/// Source half of a session.
#[derive(Debug)]
pub struct SourceSession {
    state: SourceState,
    /// The sequence number `Opened` assigned (`None` until it arrives).
    seq: Option<RpSeq>,
    batch: Vec<OfferEntry>,
    unanswered: VecDeque<Vec<OfferEntry>>,
    /// Blocks held by the driver: read and not yet released or stored.
    held: HashSet<u64>,
    /// Wanted blobs sent and awaiting `Stored`: blob id -> (block index, payload bytes).
    awaiting: HashMap<BlobId, Vec<(u64, u64)>>,
    /// Blocks being encoded.
    encoding: usize,
    /// Window: blocks the driver may hold at once.
    max_pending: usize,
    inflight_bytes: u64,
    /// Window: encoded bytes that may be sent and not yet durable (see [`inflight_window`]).
    inflight_limit: u64,
    /// The smallest round trip measured this session (None: none yet).
    base_rtt: Option<std::time::Duration>,
    reader_done: Option<RpMeta>,
    outbox: VecDeque<SourceMsg>,
    events: VecDeque<SourceEvent>,
    stats: CycleStats,
    /// Whether any message of the target arrived.
    heard: bool,
    /// Whether the session failed on a lost connection before the target said anything.
    lost_unheard: bool,
}

impl SourceSession {
    /// Starts a session for `volume` (blocks of `block_bytes`) whose change set
    /// is relative to `base` (seq, root).
    ///
    /// With no base the cycle offers every block whatever the target
    /// answers, so it starts at once (`Start` is the first event) instead of
    /// after `Opened`'s round trip.
    pub fn new(volume: &VolumeName, base: Option<(RpSeq, crate::content::MerkleRoot)>, encrypted: bool, block_bytes: u32) -> Self {
        let mut outbox = VecDeque::new();
        outbox.push_back(SourceMsg::Open { volume: volume.clone(), base, encrypted });
        let mut events = VecDeque::new();
        let state = if base.is_none() {
            events.push_back(SourceEvent::Start { full_offer: true });
            SourceState::Streaming
        } else {
            SourceState::Opening
        };
        SourceSession {
            state,
            seq: None,
            batch: Vec::new(),
            unanswered: VecDeque::new(),
            held: HashSet::new(),
            awaiting: HashMap::new(),
            encoding: 0,
            max_pending: usize::try_from(MAX_PENDING_BYTES / u64::from(block_bytes.max(1))).unwrap_or(usize::MAX).max(MIN_PENDING_BLOCKS),
            inflight_bytes: 0,
            inflight_limit: MIN_INFLIGHT_BYTES,
            base_rtt: None,
            reader_done: None,
            outbox,
            events,
            stats: CycleStats::default(),
            heard: false,
            lost_unheard: false,
        }
    }

    fn fail(&mut self, reason: String) {
        if !matches!(self.state, SourceState::Done | SourceState::Failed) {
            self.state = SourceState::Failed;
            self.events.push_back(SourceEvent::Failed { reason });
        }
    }

    /// Whether the driver may read and hand over another changed block now.
    pub fn wants_block(&self) -> bool {
        self.state == SourceState::Streaming
            && self.reader_done.is_none()
            && self.held.len() < self.max_pending
            && self.inflight_bytes < self.inflight_limit
    }

    /// The path's round trip as the transport measures it. The smallest one
    /// of the session is taken as the path's delay and sizes the window of
    /// encoded bytes sent and not yet durable ([`inflight_window`]; until the
    /// first call, the window of a path with no delay): a round trip that grows
    /// while the session runs grows by queues (a target whose disk falls
    /// behind, a loaded CPU), which a wider window would only fill. Takes
    /// effect for the next block; bytes already sent stay sent.
    pub fn handle_round_trip(&mut self, rtt: std::time::Duration) {
        let base = self.base_rtt.map_or(rtt, |base| base.min(rtt));
        self.base_rtt = Some(base);
        self.inflight_limit = inflight_window(base);
    }

    /// The window of encoded bytes sent and not yet durable, as last sized.
    pub fn inflight_limit(&self) -> u64 {
        self.inflight_limit
    }

    /// A changed block was read; the driver keeps its data until `Release` or `Stored`.
    pub fn handle_block(&mut self, entry: OfferEntry, plain_bytes: u64) {
        debug_assert!(self.state == SourceState::Streaming, "block handed over before Start");
        self.stats.offered_blocks += 1;
        self.stats.offered_bytes += plain_bytes;
        // Zero blocks are offered too (the target records them) and answered Present.
        // They hold no data, so they take no credit.
        if !entry.content.is_zero() {
            self.held.insert(entry.index);
        }
        self.batch.push(entry);
        // Offer when the batch is full, or when credit ran out and the answers are what frees it.
        if self.batch.len() >= OFFER_BATCH || !self.wants_block() {
            self.flush_batch();
        }
    }

    fn flush_batch(&mut self) {
        if !self.batch.is_empty() {
            let entries = std::mem::take(&mut self.batch);
            self.unanswered.push_back(entries.clone());
            self.outbox.push_back(SourceMsg::Offer { entries });
        }
    }

    /// The reader has finished; `meta` is the RP to commit (its seq is filled
    /// in from `Opened` when the commit goes out).
    pub fn handle_reader_done(&mut self, meta: RpMeta) {
        self.flush_batch();
        self.reader_done = Some(meta);
        self.maybe_commit();
    }

    /// The driver encoded a wanted block.
    pub fn handle_encoded(&mut self, index: u64, blob: EncodedBlob) {
        self.encoding = self.encoding.saturating_sub(1);
        if self.state != SourceState::Streaming {
            return;
        }
        let bytes = blob.payload.len() as u64;
        self.inflight_bytes += bytes;
        self.stats.sent_payload_bytes += bytes;
        self.stats.sent_plain_bytes += u64::from(blob.plain_len);
        if blob.flags.has(BlobFlags::DELTA) {
            self.stats.delta_blocks += 1;
        } else {
            self.stats.full_blocks += 1;
        }
        self.awaiting.entry(blob.id).or_default().push((index, bytes));
        self.outbox.push_back(SourceMsg::Blob(blob.into()));
        // The encoded blob is all that is needed from here on: free the block's data.
        self.held.remove(&index);
        self.events.push_back(SourceEvent::Release { index });
        self.maybe_commit();
    }

    /// Encoding failed (e.g. the block could not be re-read): the cycle fails.
    pub fn handle_encode_failed(&mut self, reason: String) {
        self.encoding = self.encoding.saturating_sub(1);
        self.fail(reason);
    }

    /// A message from the target.
    pub fn handle_message(&mut self, msg: TargetMsg) {
        self.heard = true;
        match (self.state, msg) {
            (_, TargetMsg::Failed { reason }) => self.fail(format!("target: {reason}")),
            (SourceState::Opening, TargetMsg::Opened { seq, base_ok }) => {
                self.seq = Some(seq);
                self.state = SourceState::Streaming;
                self.events.push_back(SourceEvent::Start { full_offer: !base_ok });
            }
            // A source without a base started at once: it offers every block
            // whatever `base_ok` says.
            (SourceState::Streaming, TargetMsg::Opened { seq, .. }) if self.seq.is_none() => {
                self.seq = Some(seq);
                self.maybe_commit();
            }
            (SourceState::Streaming, TargetMsg::Answer { wants }) => {
                let Some(entries) = self.unanswered.pop_front() else {
                    return self.fail("target answered an offer that was not made".into());
                };
                if entries.len() != wants.len() {
                    return self.fail(format!("target answered {} of {} offered blocks", wants.len(), entries.len()));
                }
                for (entry, want) in entries.iter().zip(wants) {
                    match want {
                        Want::Present => {
                            self.stats.present_blocks += 1;
                            self.held.remove(&entry.index);
                            self.events.push_back(SourceEvent::Release { index: entry.index });
                        }
                        Want::Full | Want::Delta { .. } if entry.content.is_zero() => {
                            return self.fail("target asked for the data of a zero block".into());
                        }
                        Want::Delta { depth, .. } if depth >= MAX_DELTA_DEPTH => {
                            return self.fail(format!("target offered a delta base of depth {depth}"));
                        }
                        want => {
                            self.encoding += 1;
                            self.events.push_back(SourceEvent::Encode { index: entry.index, want });
                        }
                    }
                }
                self.maybe_commit();
            }
            (SourceState::Streaming | SourceState::Committing, TargetMsg::Stored { blobs }) => {
                for id in blobs {
                    let Some(blocks) = self.awaiting.remove(&id) else {
                        return self.fail(format!("target acknowledged blob {id} that was not sent"));
                    };
                    for (_index, bytes) in blocks {
                        self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes);
                    }
                }
                self.maybe_commit();
            }
            (SourceState::Committing, TargetMsg::Committed { seq }) if Some(seq) == self.seq => {
                if !self.awaiting.is_empty() {
                    return self.fail(format!("target committed without acknowledging {} blobs", self.awaiting.len()));
                }
                self.state = SourceState::Done;
                self.events.push_back(SourceEvent::Committed { seq });
            }
            (state, msg) => {
                let what = match msg {
                    TargetMsg::Opened { .. } => "Opened",
                    TargetMsg::Answer { .. } => "Answer",
                    TargetMsg::Stored { .. } => "Stored",
                    TargetMsg::Committed { .. } => "Committed",
                    TargetMsg::Failed { .. } => "Failed",
                };
                let when = match state {
                    SourceState::Opening => "opening",
                    SourceState::Streaming => "streaming",
                    SourceState::Committing => "committing",
                    SourceState::Done => "done",
                    SourceState::Failed => "failed",
                };
                self.fail(format!("protocol error: the target sent {what} while the session was {when}"))
            }
        }
    }

    /// Commits once every block is answered and every wanted blob is sent:
    /// `Commit` follows the last blob on the stream without waiting for its
    /// `Stored` (the target makes the blobs durable before it commits).
    fn maybe_commit(&mut self) {
        let Some(seq) = self.seq else { return };
        if self.state == SourceState::Streaming && self.unanswered.is_empty() && self.batch.is_empty() && self.encoding == 0 {
            if let Some(mut meta) = self.reader_done.take() {
                meta.seq = seq;
                self.state = SourceState::Committing;
                self.outbox.push_back(SourceMsg::Commit { meta });
            }
        }
    }

    /// The operator stopped the cycle (`drmesh ctl pause`): it fails with `reason`,
    /// unless the commit is already on its way, in which case it is let finish
    /// (returns `false`): failing it then would only hide an RP the target commits.
    pub fn handle_cancel(&mut self, reason: String) -> bool {
        if matches!(self.state, SourceState::Committing | SourceState::Done) {
            return false;
        }
        self.fail(reason);
        true
    }

    /// The connection or stream to the target broke.
    pub fn handle_disconnect(&mut self, reason: String) {
        if !self.heard && !matches!(self.state, SourceState::Done | SourceState::Failed) {
            self.lost_unheard = true;
        }
        self.fail(format!("connection to target lost: {reason}"));
    }

    /// Whether the session failed because the connection was lost before the
    /// target sent anything. The target then holds no part of this cycle (it
    /// stores blobs only after answering their offer, and drops a session
    /// whose connection ends), so the cycle can start over on a new
    /// connection: typically the target restarted and this one was its old
    /// incarnation's.
    pub fn lost_before_answer(&self) -> bool {
        self.lost_unheard
    }

    /// Next message for the target.
    pub fn poll_transmit(&mut self) -> Option<SourceMsg> {
        self.outbox.pop_front()
    }

    /// Next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// Counters so far.
    pub fn stats(&self) -> &CycleStats {
        &self.stats
    }

    /// Whether the session has ended (committed or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, SourceState::Done | SourceState::Failed)
    }

    /// Blocks of data the driver holds for this session now (for memory accounting).
    pub fn held_blocks(&self) -> usize {
        self.held.len()
    }
}
