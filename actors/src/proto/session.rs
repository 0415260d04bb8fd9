//! The replication session: one cycle of one volume from a source to one target.
//!
//! ```text
//! source                                   target
//!   Open {volume, base seq + root}  ───▶
//!                                   ◀───   Opened {seq, base_ok}
//!   Offer {index, content, base}*   ───▶   (lookup + pin; stage block map changes)
//!                                   ◀───   Answer {Present | Full | Delta(base blob)}*
//!   Blob (only what was wanted)     ───▶   (written durably in batches)
//!                                   ◀───   Stored {blob ids}
//!   Commit {RP metadata, root}      ───▶   (the last blobs made durable, then
//!                                   ◀───   Stored {blob ids}   one redb transaction)
//!                                   ◀───   Committed {seq}
//! ```
//!
//! Each round trip of a cycle is a round trip the link sits idle (150 ms on a
//! long path), so the source does not wait where it need not: a source with no
//! base (an initial sync, which offers every block whatever the answer) sends
//! its first offers right behind `Open`, and `Commit` follows the last blob at
//! once; the target makes every blob durable before it commits, and
//! acknowledges them (`Stored`) before `Committed`.
//!
//! [`SourceSession`] and [`TargetSession`] are sans-IO: the driver feeds them
//! messages and work results and drains their outputs. The source session also
//! hands out credit: a driver reads a new block only while
//! [`SourceSession::wants_block`] says so, which bounds memory by the window,
//! not by the volume size or the link speed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::codec::MAX_DELTA_DEPTH;
use crate::content::{BlobId, ContentId};
use crate::store::{BlobFlags, BlobLoc, EncodedBlob, RpMeta};

/// Offer entries per message: small, so answers (and compression) start while
/// the reader is still filling the window.
pub const OFFER_BATCH: usize = 16;
/// Bytes of changed blocks a source holds at once (read, offered, or being
/// encoded); the window in blocks is this divided by the block size.
pub const MAX_PENDING_BYTES: u64 = 64 << 20;
/// The window never shrinks below this many blocks, whatever the block size.
pub const MIN_PENDING_BLOCKS: usize = 4;
/// Encoded bytes sent but not yet durably stored by the target.
pub const MAX_INFLIGHT_BYTES: u64 = 160 << 20;

/// A changed block offered to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferEntry {
    /// Block index in the volume.
    pub index: u64,
    /// Content id of the block now.
    pub content: ContentId,
    /// Content id of the block in the source's baseline, a candidate delta base.
    pub base: Option<ContentId>,
}

/// What the target wants for one offered block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// Already stored: send nothing.
    Present,
    /// Send the whole block.
    Full,
    /// Send a delta over this blob (which materializes the offered base).
    Delta {
        /// The base blob.
        base: BlobId,
        /// Its chain depth.
        depth: u8,
    },
}

/// A blob on the wire (same fields as the stored form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBlob {
    /// Blob id.
    pub id: BlobId,
    /// Content it materializes.
    pub content: ContentId,
    /// Flags bits.
    pub flags: u8,
    /// Plaintext length.
    pub plain_len: u32,
    /// Delta base.
    pub base: Option<BlobId>,
    /// Chain depth.
    pub depth: u8,
    /// Payload as stored.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

mod serde_bytes_compat {
    //! Vec<u8> as one byte string (postcard writes it as length + bytes either way).
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        <&[u8]>::deserialize(d).map(<[u8]>::to_vec).map_err(|_| serde::de::Error::custom("expected bytes"))
    }
}

impl From<EncodedBlob> for WireBlob {
    fn from(b: EncodedBlob) -> Self {
        WireBlob { id: b.id, content: b.content, flags: b.flags.0, plain_len: b.plain_len, base: b.base, depth: b.depth, payload: b.payload }
    }
}

impl From<WireBlob> for EncodedBlob {
    fn from(b: WireBlob) -> Self {
        EncodedBlob { id: b.id, content: b.content, flags: BlobFlags(b.flags), plain_len: b.plain_len, base: b.base, depth: b.depth, payload: b.payload }
    }
}

/// Source → target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceMsg {
    /// Starts a cycle.
    Open {
        /// Volume name.
        volume: String,
        /// The RP the source's change set is relative to, with its Merkle root.
        base: Option<(u64, [u8; 32])>,
        /// Whether the policy encrypts (recorded on the RP).
        encrypted: bool,
    },
    /// Changed blocks.
    Offer {
        /// In index order.
        entries: Vec<OfferEntry>,
    },
    /// One wanted blob.
    Blob(WireBlob),
    /// Everything is sent; commit the RP.
    Commit {
        /// The RP's metadata (seq as assigned in `Opened`).
        meta: RpMeta,
    },
}

/// Target → source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetMsg {
    /// The cycle may start.
    Opened {
        /// Sequence number of the RP this cycle will commit.
        seq: u64,
        /// Whether the target's newest RP is the source's base; if not, the
        /// source must offer every block, not only the changed ones.
        base_ok: bool,
    },
    /// Answers to one `Offer`, in order.
    Answer {
        /// One per entry.
        wants: Vec<Want>,
    },
    /// These blobs are durable.
    Stored {
        /// Blob ids.
        blobs: Vec<BlobId>,
    },
    /// The RP is committed.
    Committed {
        /// Its sequence number.
        seq: u64,
    },
    /// The cycle failed on the target; nothing was committed.
    Failed {
        /// Why, for the source's log and status.
        reason: String,
    },
}

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
        seq: u64,
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
    seq: Option<u64>,
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
    pub fn new(volume: &str, base: Option<(u64, [u8; 32])>, encrypted: bool, block_bytes: u32) -> Self {
        let mut outbox = VecDeque::new();
        outbox.push_back(SourceMsg::Open { volume: volume.to_string(), base, encrypted });
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
            && self.inflight_bytes < MAX_INFLIGHT_BYTES
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

/// Why a target session refused a source's message. The session fails; nothing is committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A message arrived in a state where it makes no sense.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Target half of a session: decides what to ask for and checks that the source
/// sends exactly that. The driver does the store work it implies.
#[derive(Debug, Default)]
pub struct TargetSession {
    opened: bool,
    /// Blobs asked for: blob id is unknown for deltas until they arrive, so track by content.
    wanted: BTreeMap<ContentId, Want>,
    received: HashSet<ContentId>,
    committed: bool,
}

impl TargetSession {
    /// A new session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides the `Opened` answer from the target's newest RP of the volume.
    pub fn handle_open(&mut self, base: Option<(u64, [u8; 32])>, newest: Option<(u64, [u8; 32])>) -> TargetMsg {
        self.opened = true;
        let seq = newest.map_or(1, |(s, _)| s + 1);
        TargetMsg::Opened { seq, base_ok: base.is_some() && base == newest }
    }

    /// Decides the answer to an offer, given for each entry where its content
    /// is already stored and where its base is stored.
    pub fn handle_offer(
        &mut self,
        entries: &[OfferEntry],
        present: &[Option<BlobLoc>],
        bases: &[Option<BlobLoc>],
    ) -> Result<Vec<Want>, SessionError> {
        if !self.opened || self.committed {
            return Err(SessionError::Protocol("offer outside an open session".into()));
        }
        if present.len() != entries.len() || bases.len() != entries.len() {
            return Err(SessionError::Protocol("lookup results do not match the offer".into()));
        }
        let mut wants = Vec::with_capacity(entries.len());
        for ((entry, here), base) in entries.iter().zip(present).zip(bases) {
            let want = if entry.content.is_zero() || here.is_some() {
                Want::Present
            } else if self.wanted.contains_key(&entry.content) {
                // Same content offered twice in one cycle (e.g. two identical blocks): send once.
                Want::Present
            } else {
                match base {
                    Some(loc) if loc.depth < MAX_DELTA_DEPTH => Want::Delta { base: loc.blob, depth: loc.depth },
                    _ => Want::Full,
                }
            };
            if want != Want::Present {
                self.wanted.insert(entry.content, want);
            }
            wants.push(want);
        }
        Ok(wants)
    }

    /// Checks an arriving blob against what was asked for.
    pub fn handle_blob(&mut self, blob: &EncodedBlob) -> Result<(), SessionError> {
        let Some(want) = self.wanted.get(&blob.content) else {
            return Err(SessionError::Protocol(format!("blob {} for content that was not asked for", blob.id)));
        };
        match (want, blob.flags.has(BlobFlags::DELTA), blob.base) {
            (Want::Full, false, None) if blob.id == blob.content && blob.depth == 0 => {}
            (Want::Delta { base, depth }, true, Some(b)) if b == *base && blob.depth == *depth + 1 => {}
            // A source may always fall back from a delta to a full block.
            (Want::Delta { .. }, false, None) if blob.id == blob.content && blob.depth == 0 => {}
            _ => {
                let asked = match want {
                    Want::Present => "nothing: it is stored already".to_string(),
                    Want::Full => "a full block".to_string(),
                    Want::Delta { base, depth } => format!("a delta of depth {} on {base}", depth + 1),
                };
                return Err(SessionError::Protocol(format!("blob {} is not in the form asked for ({asked})", blob.id)));
            }
        }
        if !self.received.insert(blob.content) {
            return Err(SessionError::Protocol(format!("blob {} sent twice", blob.id)));
        }
        Ok(())
    }

    /// Checks that a commit may proceed: every wanted blob has arrived (the driver
    /// makes them durable before answering `Stored`, and before committing).
    pub fn handle_commit(&mut self) -> Result<(), SessionError> {
        if !self.opened || self.committed {
            return Err(SessionError::Protocol("commit outside an open session".into()));
        }
        let missing = self.wanted.keys().filter(|c| !self.received.contains(c)).count();
        if missing > 0 {
            return Err(SessionError::Protocol(format!("commit while {missing} wanted blocks never arrived")));
        }
        self.committed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{page_hashes, BlockCodec};

    fn meta(volume: &str) -> RpMeta {
        RpMeta {
            volume: volume.into(),
            seq: 0,
            time_unix_ms: 1,
            source_node: "src".into(),
            volume_bytes: 0,
            block_bytes: 4096,
            block_count: 0,
            changed_blocks: 0,
            bytes_stored: 0,
            merkle_root: [0; 32],
            encrypted: false,
            consistency: "crash".into(),
        }
    }

    /// Both halves in one process with an in-memory "store": the target already
    /// holds some contents; the source offers blocks; exactly the missing ones travel.
    #[test]
    fn only_missing_blocks_travel_and_commit_follows_durable_acks() {
        let codec = BlockCodec::new(Some(1), None);
        let blocks: Vec<Vec<u8>> = (0..300u32).map(|i| vec![(i % 200) as u8 + 1; 4096]).collect();
        let mut stored: HashMap<ContentId, BlobLoc> = HashMap::new();
        // The target holds the first 50 contents already.
        for b in &blocks[..50] {
            let id = codec.ids().content_id(b);
            stored.insert(id, BlobLoc { blob: id, depth: 0 });
        }
        let mut src = SourceSession::new("vol", None, false, 4096);
        let mut tgt = TargetSession::new();
        let mut sent_blobs = 0;
        let mut committed = None;
        let mut next_block = 0usize;
        let mut to_target: VecDeque<SourceMsg> = VecDeque::new();
        for _ in 0..10_000 {
            while let Some(m) = src.poll_transmit() {
                to_target.push_back(m);
            }
            while let Some(e) = src.poll_event() {
                match e {
                    SourceEvent::Start { full_offer, .. } => assert!(full_offer),
                    SourceEvent::Encode { index, want } => {
                        assert_eq!(want, Want::Full);
                        let data = &blocks[index as usize];
                        src.handle_encoded(index, codec.encode_full(codec.ids().content_id(data), data));
                    }
                    SourceEvent::Release { .. } => {}
                    SourceEvent::Committed { seq } => committed = Some(seq),
                    SourceEvent::Failed { reason } => panic!("{reason}"),
                }
            }
            while src.wants_block() && next_block < blocks.len() {
                let data = &blocks[next_block];
                src.handle_block(OfferEntry { index: next_block as u64, content: codec.ids().content_id(data), base: None }, 4096);
                next_block += 1;
                if next_block == blocks.len() {
                    src.handle_reader_done(meta("vol"));
                }
            }
            let Some(msg) = to_target.pop_front() else {
                if committed.is_some() {
                    break;
                }
                continue;
            };
            let reply = match msg {
                SourceMsg::Open { base, .. } => Some(tgt.handle_open(base, None)),
                SourceMsg::Offer { entries } => {
                    let present: Vec<_> = entries.iter().map(|e| stored.get(&e.content).copied()).collect();
                    let bases = vec![None; entries.len()];
                    Some(TargetMsg::Answer { wants: tgt.handle_offer(&entries, &present, &bases).unwrap() })
                }
                SourceMsg::Blob(b) => {
                    let blob: EncodedBlob = b.into();
                    tgt.handle_blob(&blob).unwrap();
                    sent_blobs += 1;
                    stored.insert(blob.content, BlobLoc { blob: blob.id, depth: 0 });
                    Some(TargetMsg::Stored { blobs: vec![blob.id] })
                }
                SourceMsg::Commit { meta } => {
                    tgt.handle_commit().unwrap();
                    Some(TargetMsg::Committed { seq: meta.seq })
                }
            };
            if let Some(r) = reply {
                src.handle_message(r);
            }
            assert!(src.held_blocks() <= (MAX_PENDING_BYTES / 4096) as usize);
        }
        assert_eq!(committed, Some(1));
        // 300 blocks, 200 distinct contents, 50 of them already stored: 150 sent.
        assert_eq!(sent_blobs, 150);
        assert_eq!(src.stats().offered_blocks, 300);
        assert_eq!(src.stats().full_blocks, 150);
    }

    #[test]
    fn target_asks_for_deltas_and_checks_what_arrives() {
        let codec = BlockCodec::new(None, None);
        let old = vec![1u8; 16384];
        let mut new = old.clone();
        new[5000] = 2;
        let (old_id, new_id) = (codec.ids().content_id(&old), codec.ids().content_id(&new));
        let mut tgt = TargetSession::new();
        assert_eq!(tgt.handle_open(Some((3, [1; 32])), Some((3, [1; 32]))), TargetMsg::Opened { seq: 4, base_ok: true });
        let entries = vec![OfferEntry { index: 0, content: new_id, base: Some(old_id) }];
        let base_loc = BlobLoc { blob: old_id, depth: 0 };
        let wants = tgt.handle_offer(&entries, &[None], &[Some(base_loc)]).unwrap();
        assert_eq!(wants, vec![Want::Delta { base: old_id, depth: 0 }]);
        let (mut oh, mut nh) = (Vec::new(), Vec::new());
        page_hashes(&old, &mut oh);
        page_hashes(&new, &mut nh);
        let delta = codec.encode_delta(new_id, &new, &nh, old_id, 0, &oh).unwrap();
        // A full block where a delta was asked for is fine; a wrong base is not.
        let mut wrong = delta.clone();
        wrong.base = Some(ContentId([5; 32]));
        assert!(tgt.handle_blob(&wrong).is_err());
        tgt.handle_blob(&delta).unwrap();
        assert!(tgt.handle_blob(&delta).is_err(), "duplicate accepted");
        tgt.handle_commit().unwrap();
    }

    #[test]
    fn cancel_fails_a_streaming_cycle_but_not_a_committing_one() {
        let mut src = SourceSession::new("vol", None, false, 4096);
        src.handle_message(TargetMsg::Opened { seq: 1, base_ok: false });
        while src.poll_event().is_some() {}
        assert!(src.handle_cancel("paused".into()));
        assert_eq!(src.poll_event(), Some(SourceEvent::Failed { reason: "paused".into() }));

        // Nothing changed: the commit goes out at once; a cancel after that is refused.
        let mut src = SourceSession::new("vol", None, false, 4096);
        src.handle_message(TargetMsg::Opened { seq: 1, base_ok: false });
        src.handle_reader_done(meta("vol"));
        while src.poll_transmit().is_some() {}
        while src.poll_event().is_some() {}
        assert!(!src.handle_cancel("paused".into()));
        assert_eq!(src.poll_event(), None);
        src.handle_message(TargetMsg::Committed { seq: 1 });
        assert_eq!(src.poll_event(), Some(SourceEvent::Committed { seq: 1 }));
    }

    #[test]
    fn commit_is_refused_until_every_wanted_block_arrived() {
        let mut tgt = TargetSession::new();
        tgt.handle_open(None, Some((9, [0; 32])));
        let id = ContentId([3; 32]);
        tgt.handle_offer(&[OfferEntry { index: 0, content: id, base: None }], &[None], &[None]).unwrap();
        assert!(tgt.handle_commit().is_err());
        let unasked = EncodedBlob { id: ContentId([4; 32]), content: ContentId([4; 32]), flags: BlobFlags(0), plain_len: 1, base: None, depth: 0, payload: vec![1] };
        assert!(tgt.handle_blob(&unasked).is_err());
    }

    /// A target decodes whatever a (listed but buggy or hostile) source sends:
    /// mutated and random frames must come out as errors, never panics.
    #[test]
    fn session_frames_from_peers_decode_or_fail_cleanly() {
        use drmesh_transport::wire::{decode_frame_body, encode_frame, FrameDecoder, MAX_DATA_FRAME_BYTES};
        let codec = BlockCodec::new(Some(1), Some(&[9; 32]));
        let data = vec![7u8; 8192];
        let id = codec.ids().content_id(&data);
        let samples = vec![
            SourceMsg::Open { volume: "v".into(), base: Some((3, [1; 32])), encrypted: true },
            SourceMsg::Offer { entries: vec![OfferEntry { index: 9, content: id, base: Some(ContentId([2; 32])) }; 5] },
            SourceMsg::Blob(codec.encode_full(id, &data).into()),
            SourceMsg::Commit { meta: meta("v") },
        ];
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for msg in &samples {
            let frame = encode_frame(msg, MAX_DATA_FRAME_BYTES);
            assert_eq!(&decode_frame_body::<SourceMsg>(&frame[4..]).unwrap(), msg);
            for _ in 0..3000 {
                let mut f = frame.clone();
                for _ in 0..(next() % 6 + 1) {
                    let i = 4 + (next() as usize) % (f.len() - 4);
                    f[i] = next() as u8;
                }
                let _ = decode_frame_body::<SourceMsg>(&f[4..]);
                let _ = decode_frame_body::<TargetMsg>(&f[4..]);
                let mut d = FrameDecoder::with_limit(MAX_DATA_FRAME_BYTES);
                d.handle_bytes(&f[..(next() as usize) % f.len()]);
                let _ = d.poll_frame::<SourceMsg>();
            }
        }
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_frame_body::<SourceMsg>(&junk);
            let _ = decode_frame_body::<TargetMsg>(&junk);
        }
    }

    /// Without a base the source offers before `Opened` arrives, and commits
    /// only once it has (the RP's seq comes from it); `Commit` follows the
    /// last blob without waiting for `Stored`, and `Committed` before every
    /// blob was acknowledged is refused.
    #[test]
    fn an_initial_sync_saves_the_round_trips_it_can() {
        let codec = BlockCodec::new(Some(1), None);
        let data = vec![7u8; 4096];
        let content = codec.ids().content_id(&data);
        let mut src = SourceSession::new("vol", None, false, 4096);
        assert_eq!(src.poll_event(), Some(SourceEvent::Start { full_offer: true }), "starts before Opened");
        src.handle_block(OfferEntry { index: 0, content, base: None }, 4096);
        src.handle_reader_done(meta("vol"));
        assert!(matches!(src.poll_transmit(), Some(SourceMsg::Open { base: None, .. })));
        assert!(matches!(src.poll_transmit(), Some(SourceMsg::Offer { entries }) if entries.len() == 1), "the offer follows Open at once");
        src.handle_message(TargetMsg::Answer { wants: vec![Want::Full] });
        assert_eq!(src.poll_event(), Some(SourceEvent::Encode { index: 0, want: Want::Full }));
        let blob = codec.encode_full(content, &data);
        let id = blob.id;
        src.handle_encoded(0, blob);
        assert!(matches!(src.poll_transmit(), Some(SourceMsg::Blob(_))));
        assert_eq!(src.poll_transmit(), None, "no commit before Opened gave the seq");
        src.handle_message(TargetMsg::Opened { seq: 9, base_ok: false });
        assert!(matches!(src.poll_transmit(), Some(SourceMsg::Commit { meta }) if meta.seq == 9), "commit before Stored");
        let mut early = SourceSession::new("vol", None, false, 4096);
        early.handle_message(TargetMsg::Opened { seq: 1, base_ok: false });
        early.handle_block(OfferEntry { index: 0, content, base: None }, 4096);
        early.handle_reader_done(meta("vol"));
        early.handle_message(TargetMsg::Answer { wants: vec![Want::Full] });
        early.handle_encoded(0, codec.encode_full(content, &data));
        early.handle_message(TargetMsg::Committed { seq: 1 });
        assert!(early.is_finished());
        assert!(std::iter::from_fn(|| early.poll_event()).any(|e| matches!(e, SourceEvent::Failed { reason } if reason.contains("without acknowledging"))));
        src.handle_message(TargetMsg::Stored { blobs: vec![id] });
        src.handle_message(TargetMsg::Committed { seq: 9 });
        assert!(std::iter::from_fn(|| src.poll_event()).any(|e| e == SourceEvent::Committed { seq: 9 }));
    }

    #[test]
    fn source_fails_cleanly_on_disconnect_and_bad_answers() {
        let mut src = SourceSession::new("v", Some((1, [1; 32])), false, 1 << 20);
        src.poll_transmit();
        src.handle_message(TargetMsg::Answer { wants: vec![] });
        assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { .. })), "an answer before Opened");
        let mut src = SourceSession::new("v", None, false, 1 << 20);
        src.handle_message(TargetMsg::Answer { wants: vec![] });
        assert!(matches!(src.poll_event(), Some(SourceEvent::Start { .. })));
        assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { .. })), "an answer to no offer");
        let mut src = SourceSession::new("v", None, false, 1 << 20);
        src.handle_message(TargetMsg::Opened { seq: 1, base_ok: false });
        src.handle_disconnect("reset".into());
        assert!(matches!(src.poll_event(), Some(SourceEvent::Start { .. })));
        assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { reason }) if reason.contains("reset")));
        assert!(src.is_finished());
        assert!(!src.lost_before_answer(), "the target had answered");
    }

    #[test]
    fn a_connection_lost_before_the_target_answered_can_be_retried() {
        // With a base (Opening) and without one (streaming at once, offers out).
        for base in [Some((1, [1; 32])), None] {
            let mut src = SourceSession::new("v", base, false, 4096);
            while src.poll_transmit().is_some() {}
            while src.poll_event().is_some() {}
            src.handle_disconnect("stream failed: connection lost: reset by peer".into());
            assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { reason }) if reason.contains("reset by peer")));
            assert!(src.lost_before_answer(), "base {base:?}");
        }
        // A failure for another reason first, then the loss: not a lost connection's failure.
        let mut src = SourceSession::new("v", Some((1, [1; 32])), false, 4096);
        assert!(src.handle_cancel("paused".into()));
        src.handle_disconnect("reset".into());
        assert!(!src.lost_before_answer());
        // The target answered, then the connection went: the cycle is not started over.
        let mut src = SourceSession::new("v", Some((1, [1; 32])), false, 4096);
        src.handle_message(TargetMsg::Opened { seq: 2, base_ok: true });
        src.handle_disconnect("reset".into());
        assert!(!src.lost_before_answer());
    }
}
