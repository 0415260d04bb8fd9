//! Scrubs: every blob (or a sample of them) read again and checked, and every
//! RP's block map checked against its Merkle root; the verdict kept per RP.
//!
//! - **Blobs**: each file's header and payload checksum, and that the header
//!   agrees with the catalog row; read by several threads (each blob once).
//!   Where the node holds a policy's key ([`ScrubKeys`]), an encrypted blob's
//!   AES-GCM tag is checked too (which also catches a payload altered together
//!   with its checksum); a blob used by a volume whose key is held and that no
//!   held key authenticates is bad.
//!   A sampled scrub reads the blobs whose id falls in a window of the id
//!   space that is `share` of it wide, starting where the previous sampled
//!   scrub stopped: ids are blake3 hashes, so that is the share of the blobs
//!   (and of their bytes, on average), and successive sampled scrubs cover the
//!   whole store in turn.
//! - **RPs**: per volume in seq order, the block map is rebuilt in memory from
//!   the catalog's changes (32 bytes per block) and hashed; an RP whose root
//!   differs, or whose map holds a content whose blob (or a base of it) failed,
//!   is reported damaged. The RP pass always covers every RP.
//!
//! Results go into the `scrubs` table, one row per RP (the newest scrub),
//! gone with the RP.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::catalog::{BlobMeta, BLOBS, BLOCKS, CONTENTS, RPS, RP_CHANGES, SCRUBS, VOLUMES};
use super::rebuild::Finding;
use super::{blob_file, lock, now_unix_ms, BlobFlags, EncodedBlob, RpSeq, Store, StoreError};
use crate::codec::BlockCodec;
use crate::content::{BlobId, ContentId, MerkleBuilder};

/// Row format version of the `scrubs` table (a version byte, then JSON).
const SCRUB_ROW_VERSION: u8 = 1;
/// Blob ids read from the catalog per batch (each batch in its own read transaction).
const BATCH: usize = 4096;
/// Most problems listed in a report; the rest are counted.
pub const MAX_PROBLEMS: usize = 100;

/// The policy keys a node holds, for checking encrypted blobs' AES-GCM tags
/// in a scrub and blobs fetched to repair one. Holds codecs, never prints a key.
#[derive(Clone, Default)]
pub struct ScrubKeys {
    codecs: Vec<BlockCodec>,
    /// Volume → index in `codecs`.
    volumes: HashMap<String, usize>,
}

impl std::fmt::Debug for ScrubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrubKeys").field("keys", &self.codecs.len()).field("volumes", &self.volumes.len()).finish()
    }
}

impl ScrubKeys {
    /// Adds a policy's codec and the volumes it covers; a codec that does not
    /// encrypt is left out (its blobs have no tag).
    pub fn add_policy(&mut self, codec: BlockCodec, volumes: impl IntoIterator<Item = String>) {
        if !codec.encrypts() {
            return;
        }
        let index = self.codecs.len();
        self.codecs.push(codec);
        for v in volumes {
            self.volumes.insert(v, index);
        }
    }

    /// Whether no key is held (the scrub checks checksums only).
    pub fn is_empty(&self) -> bool {
        self.codecs.is_empty()
    }

    /// The codec of `volume`'s policy, if its key is held.
    pub fn of_volume(&self, volume: &str) -> Option<&BlockCodec> {
        self.volumes.get(volume).and_then(|i| self.codecs.get(*i))
    }

    /// Whether some held key authenticates `blob` (trying `hint` first and
    /// leaving there the one that did).
    fn authenticate(&self, blob: &EncodedBlob, scratch: &mut Vec<u8>, hint: &mut usize) -> bool {
        let n = self.codecs.len();
        for k in 0..n {
            let i = (*hint + k) % n;
            if self.codecs[i].authenticate(blob, scratch).is_ok() {
                *hint = i;
                return true;
            }
        }
        false
    }
}

/// What to scrub.
#[derive(Clone, Debug)]
pub struct ScrubOptions {
    /// Share of the blobs to read, in (0, 1]; 1 reads them all.
    pub share: f64,
    /// Reader threads.
    pub threads: usize,
    /// Whether the reader threads run at idle I/O priority and nice 10 (a
    /// node's scrubs give way to its cycles, restores and drills).
    pub low_priority: bool,
    /// The policy keys the node holds: encrypted blobs' tags are checked with them.
    pub keys: ScrubKeys,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions { share: 1.0, threads: 2, low_priority: false, keys: ScrubKeys::default() }
    }
}

/// Lowers the calling thread's CPU and I/O priority (Linux keeps both per thread).
fn lower_thread_priority() {
    #[allow(unsafe_code)]
    // SAFETY: plain system calls on the calling thread only; a failure leaves
    // the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        // IOPRIO_WHO_PROCESS = 1 (a thread id, 0 = this thread), class IDLE = 3 in bits 13..
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

/// The verdict of the newest scrub on one RP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RpScrub {
    /// `volume@seq`.
    pub rp: String,
    /// When the scrub finished.
    pub finished_unix_ms: u64,
    /// Whether the block map has its Merkle root and no block's blob failed.
    pub ok: bool,
    /// Blocks whose blob (or a base of it) failed its check.
    pub damaged_blocks: u64,
    /// Share of the blobs the scrub read (1.0: all of them).
    pub share: f64,
    /// What is wrong, when not ok.
    pub problem: Option<String>,
}

/// What a scrub did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScrubReport {
    /// Share of the blobs asked for.
    pub share: f64,
    /// Blob rows in the catalog.
    pub blobs_total: u64,
    /// Blobs read and checked.
    pub blobs_read: u64,
    /// Bytes of the blob files read (headers included).
    pub bytes_read: u64,
    /// Blobs that failed (damaged, missing, disagreeing with their row, or
    /// failing the AES-GCM tag check under the key of a volume that uses them).
    pub blobs_bad: u64,
    /// Encrypted blobs whose AES-GCM tag a held key checked and found sound.
    pub blobs_authenticated: u64,
    /// Encrypted blobs read whose tag could not be checked: no key held here
    /// authenticates them and no volume whose key is held uses them.
    pub blobs_without_key: u64,
    /// RPs checked, and those found damaged.
    pub rps_checked: u64,
    /// RPs found damaged.
    pub rps_damaged: u64,
    /// The verdict per RP.
    pub rps: Vec<RpScrub>,
    /// The problems, the first [`MAX_PROBLEMS`].
    pub problems: Vec<Finding>,
    /// Wall time.
    pub duration_ms: u64,
    /// Bytes read per second over the blob pass.
    pub bytes_per_sec: u64,
    /// Contents fetched again from another holder and stored (filled in by the node).
    pub repaired: u64,
    /// Contents no other holder could give (filled in by the node).
    pub unrepairable: u64,
    /// What a repair needs: the blobs that failed, and each content a damaged
    /// RP cannot materialize, with one RP that uses it.
    #[serde(skip)]
    pub needs: RepairNeeds,
}

/// The blobs a scrub found bad, and the contents that need repair.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepairNeeds {
    /// Blobs that failed their check.
    pub bad_blobs: HashSet<BlobId>,
    /// (volume, seq of an RP that uses it, content), one row per content.
    pub contents: Vec<(String, u64, ContentId)>,
}

/// Where the previous sampled scrub's window ended (start of the next one).
fn window_start(store: &Store) -> u64 {
    store.scrub_cursor.load(Ordering::Relaxed)
}

/// Whether blob `id` is in the window `[start, start + width)` of the id space (wrapping).
fn in_window(id: &BlobId, start: u64, width: u64, all: bool) -> bool {
    all || u64::from_be_bytes(id.0[0..8].try_into().expect("8 bytes")).wrapping_sub(start) < width
}

impl Store {
    /// Scrubs the store (see the module doc); `progress(blobs read, bytes read)`
    /// is called now and then. Returns when done, or early with what was done
    /// when `stop` is set. Reads run in this thread's I/O class (the node runs
    /// scrubs at idle priority).
    /// One scrub at a time: a second one meanwhile fails with [`StoreError::Busy`].
    pub fn scrub(&self, options: ScrubOptions, stop: &AtomicBool, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<ScrubReport, StoreError> {
        let Ok(_one) = self.scrub_lock.try_lock() else {
            return Err(StoreError::Busy { what: "a scrub is running already (scheduled or asked for); wait for it, `drmesh ctl scrubs` shows the last results".into() });
        };
        let started = Instant::now();
        let share = if options.share.is_finite() { options.share.clamp(0.0, 1.0) } else { 1.0 };
        let all = share >= 1.0;
        let width = (share * u64::MAX as f64) as u64;
        let start = window_start(self);
        let mut report = ScrubReport { share, ..ScrubReport::default() };
        let problems: Mutex<Vec<Finding>> = Mutex::new(Vec::new());
        let note = |object: String, problem: String| {
            let mut p = lock(&problems);
            if p.len() < MAX_PROBLEMS {
                p.push(Finding { object, problem });
            }
        };

        // Blob pass: batches of ids from the catalog, read by `threads` workers.
        let bad: Mutex<HashSet<BlobId>> = Mutex::new(HashSet::new());
        // Encrypted blobs no held key authenticates (bad if a keyed volume uses them).
        let unauthenticated: Mutex<HashSet<BlobId>> = Mutex::new(HashSet::new());
        let authenticated = AtomicU64::new(0);
        let keys = &options.keys;
        let (blobs_read, bytes_read, blobs_total) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let blob_started = Instant::now();
        let mut after: Option<[u8; 32]> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let batch: Vec<(BlobId, BlobMeta)> = self.guard("scrubbed blobs", || {
                let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
                let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                let range = match after {
                    Some(k) => btab.range::<[u8; 32]>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
                    None => btab.range::<[u8; 32]>(..),
                }
                .map_err(|e| self.ce("read blobs", e))?;
                let mut out = Vec::with_capacity(BATCH);
                for row in range.take(BATCH) {
                    let (k, v) = row.map_err(|e| self.ce("read blobs", e))?;
                    let id = ContentId(k.value());
                    let meta = BlobMeta::decode(v.value()).ok_or_else(|| StoreError::CorruptRow { what: format!("blob row {}", id.to_hex()) })?;
                    out.push((id, meta));
                }
                Ok(out)
            })?;
            let Some(last) = batch.last() else { break };
            after = Some(last.0 .0);
            blobs_total.fetch_add(batch.len() as u64, Ordering::Relaxed);
            let chosen: Vec<&(BlobId, BlobMeta)> = batch.iter().filter(|(id, _)| in_window(id, start, width, all)).collect();
            let next = AtomicU64::new(0);
            std::thread::scope(|s| {
                for _ in 0..options.threads.max(1) {
                    s.spawn(|| {
                        if options.low_priority {
                            lower_thread_priority();
                        }
                        let mut buffer = Vec::new();
                        let (mut scratch, mut hint) = (Vec::new(), 0usize);
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some((id, meta)) = chosen.get(i) else { break };
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            match blob_file::read_into(&self.blobs_dir, id, std::mem::take(&mut buffer)) {
                                Ok(blob) => {
                                    let len = (blob_file::HEADER_BYTES + blob.payload.len()) as u64;
                                    bytes_read.fetch_add(len, Ordering::Relaxed);
                                    if (blob.content, blob.base, blob.depth) != (meta.content, meta.base, meta.depth) {
                                        lock(&bad).insert(*id);
                                        note(id.to_hex(), "the blob file's header disagrees with its catalog row".into());
                                    } else if blob.flags.has(BlobFlags::ENCRYPTED) && !keys.is_empty() {
                                        if keys.authenticate(&blob, &mut scratch, &mut hint) {
                                            authenticated.fetch_add(1, Ordering::Relaxed);
                                        } else {
                                            lock(&unauthenticated).insert(*id);
                                        }
                                    }
                                    buffer = blob.payload;
                                }
                                Err(e) => {
                                    tracing::error!(blob = %id, error = %e, "scrub: blob failed its check");
                                    lock(&bad).insert(*id);
                                    note(id.to_hex(), e.to_string());
                                }
                            }
                            let n = blobs_read.fetch_add(1, Ordering::Relaxed) + 1;
                            if n % 1024 == 0 {
                                progress(n, bytes_read.load(Ordering::Relaxed));
                            }
                        }
                    });
                }
            });
        }
        let blob_secs = blob_started.elapsed().as_secs_f64();
        report.blobs_total = blobs_total.into_inner();
        report.blobs_read = blobs_read.into_inner();
        report.bytes_read = bytes_read.into_inner();
        report.bytes_per_sec = if blob_secs > 0.0 { (report.bytes_read as f64 / blob_secs) as u64 } else { 0 };
        progress(report.blobs_read, report.bytes_read);
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        let unauthenticated = unauthenticated.into_inner().unwrap_or_else(|p| p.into_inner());
        report.blobs_authenticated = authenticated.into_inner();
        if !all && !stop.load(Ordering::Relaxed) {
            self.scrub_cursor.store(start.wrapping_add(width), Ordering::Relaxed);
        }

        // RP pass: every block map against its Merkle root; blocks whose blob failed.
        let finished = now_unix_ms();
        let (verdicts, unsound, failed_tags) = self.guard("scrubbed RPs", || self.scrub_rps(&bad, &unauthenticated, keys, share, finished))?;
        for id in &failed_tags {
            tracing::error!(blob = %id, "scrub: blob failed its AES-GCM tag check under the policy key of a volume that uses it");
            note(id.to_hex(), "fails the AES-GCM tag check under the policy key of a volume that uses it (altered with its checksum, or written with another key)".into());
            bad.insert(*id);
        }
        report.blobs_bad = bad.len() as u64;
        report.blobs_without_key = (unauthenticated.len() - failed_tags.len()) as u64;
        for v in &verdicts {
            if !v.ok {
                note(v.rp.clone(), v.problem.clone().unwrap_or_default());
            }
        }
        report.rps_checked = verdicts.len() as u64;
        report.rps_damaged = verdicts.iter().filter(|v| !v.ok).count() as u64;
        if !stop.load(Ordering::Relaxed) {
            self.record_scrubs(&verdicts)?;
        }
        report.rps = verdicts;
        report.needs = RepairNeeds { bad_blobs: bad, contents: unsound };
        report.problems = problems.into_inner().unwrap_or_else(|p| p.into_inner());
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// The RP pass of [`Store::scrub`]: one read snapshot, each volume in seq
    /// order. A volume whose key is held in `keys` also counts the blobs of
    /// `unauthenticated` as bad. Returns the verdicts, each content a damaged
    /// RP cannot materialize, and the blobs of `unauthenticated` some such
    /// volume uses (their tag failed under its key).
    #[allow(clippy::type_complexity)]
    fn scrub_rps(
        &self,
        bad_blobs: &HashSet<BlobId>,
        unauthenticated: &HashSet<BlobId>,
        keys: &ScrubKeys,
        share: f64,
        finished: u64,
    ) -> Result<(Vec<RpScrub>, Vec<(String, u64, ContentId)>, HashSet<BlobId>), StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
        let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
        let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
        let blocks = tx.open_table(BLOCKS).map_err(|e| self.ce("open table blocks", e))?;
        let changes = tx.open_table(RP_CHANGES).map_err(|e| self.ce("open table rp_changes", e))?;
        let ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
        let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
        // Whether a content's blob chain is whole and none of it failed, for a
        // volume whose key is held (`keyed`) or not (cached per kind).
        let mut sound: HashMap<(ContentId, bool), bool> = HashMap::new();
        let mut failed_tags: HashSet<BlobId> = HashSet::new();
        let mut is_sound = |c: &ContentId, keyed: bool| -> Result<bool, StoreError> {
            if c.is_zero() {
                return Ok(true);
            }
            if let Some(s) = sound.get(&(*c, keyed)) {
                return Ok(*s);
            }
            let s = match ctab.get(c.0).map_err(|e| self.ce("read contents", e))? {
                Some(blob) => match super::chain_of(&btab, &ContentId(blob.value())).map_err(|e| self.ce("read blobs", e))? {
                    Some(chain) => {
                        let untagged: Vec<&BlobId> = if keyed { chain.iter().filter(|b| unauthenticated.contains(b)).collect() } else { Vec::new() };
                        failed_tags.extend(untagged.iter().copied());
                        untagged.is_empty() && !chain.iter().any(|b| bad_blobs.contains(b))
                    }
                    None => false,
                },
                None => false,
            };
            sound.insert((*c, keyed), s);
            Ok(s)
        };
        let mut out = Vec::new();
        let mut unsound: Vec<(String, u64, ContentId)> = Vec::new();
        let mut listed: HashSet<ContentId> = HashSet::new();
        for row in vols.iter().map_err(|e| self.ce("read volumes", e))? {
            let (name, vid) = row.map_err(|e| self.ce("read volumes", e))?;
            let (volume, vid) = (name.value().to_string(), vid.value());
            let keyed = keys.of_volume(&volume).is_some();
            let mut map: Vec<ContentId> = Vec::new();
            for row in rps.range((vid, 0u64)..=(vid, u64::MAX)).map_err(|e| self.ce("read rps", e))? {
                let (k, v) = row.map_err(|e| self.ce("read rps", e))?;
                let seq = k.value().1;
                let meta = self.decode_rp_row(&volume, RpSeq(seq), v.value())?;
                let count = usize::try_from(meta.block_count).unwrap_or(usize::MAX).min(1 << 36);
                if map.len() < count {
                    map.resize(count, ContentId::ZERO);
                }
                for c in changes.range((vid, seq, 0u64)..=(vid, seq, u64::MAX)).map_err(|e| self.ce("read rp_changes", e))? {
                    let index = c.map_err(|e| self.ce("read rp_changes", e))?.0.value().2;
                    let content = blocks
                        .get((vid, index, seq))
                        .map_err(|e| self.ce("read block map", e))?
                        .ok_or_else(|| StoreError::CorruptRow { what: format!("block {index} of {}'s block map (listed but absent)", meta.name()) })?
                        .value();
                    if let Some(slot) = map.get_mut(index as usize) {
                        *slot = ContentId(content);
                    }
                }
                let mut merkle = MerkleBuilder::new();
                let mut damaged_blocks = 0u64;
                let mut first_bad = None;
                for (index, c) in map[..count].iter().enumerate() {
                    merkle.push(c);
                    if !is_sound(c, keyed)? {
                        damaged_blocks += 1;
                        first_bad.get_or_insert(index);
                        if listed.insert(*c) {
                            unsound.push((volume.clone(), seq, *c));
                        }
                    }
                }
                let root_ok = merkle.finish() == meta.merkle_root;
                let problem = match (root_ok, first_bad) {
                    (false, _) => Some("its block map does not have its Merkle root (the catalog is damaged: `drmesh store check`, then `drmesh store rebuild`)".to_string()),
                    (true, Some(index)) => Some(format!("{damaged_blocks} blocks have no sound blob here (first: block {index}); a restore of this RP fails on them")),
                    (true, None) => None,
                };
                out.push(RpScrub { rp: meta.name(), finished_unix_ms: finished, ok: problem.is_none(), damaged_blocks, share, problem });
            }
        }
        Ok((out, unsound, failed_tags))
    }

    /// Stores `chain` (head first, as another holder sent it for `volume`) as
    /// the way to materialize `content`: the blobs are written (a file of the
    /// same id that is damaged, or listed in `rewrite`, is rewritten) and
    /// `content` points at the head from then on. Where `keys` holds the
    /// volume's key, every encrypted blob of the chain must pass its AES-GCM
    /// tag check first; nothing is stored otherwise.
    pub fn repair_content(&self, volume: &str, content: &ContentId, chain: &[EncodedBlob], keys: &ScrubKeys, rewrite: &HashSet<BlobId>) -> Result<(), StoreError> {
        let Some(head) = chain.first() else {
            return Err(StoreError::InvalidBlob { blob: content.to_hex(), cause: "the holder sent no blob".into() });
        };
        if head.content != *content {
            return Err(StoreError::InvalidBlob { blob: head.id.to_hex(), cause: format!("sent for content {} but it makes {}", content.to_hex(), head.content.to_hex()) });
        }
        if let Some(codec) = keys.of_volume(volume) {
            let mut scratch = Vec::new();
            for blob in chain {
                if codec.authenticate(blob, &mut scratch).is_err() {
                    return Err(StoreError::InvalidBlob {
                        blob: blob.id.to_hex(),
                        cause: format!("the holder sent a blob that fails the AES-GCM tag check under {volume}'s policy key; nothing stored"),
                    });
                }
            }
        }
        // Bases first is not needed: put_blobs takes a chain's blobs in one batch.
        const REPAIR_SESSION: u64 = u64::MAX - 1;
        let result = self.put_blobs_rewriting(REPAIR_SESSION, chain, rewrite).and_then(|_| {
            self.guard("repaired a content", || {
                let _w = lock(&self.writer);
                let tx = self.begin_write("begin write")?;
                {
                    let mut ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
                    ctab.insert(content.0, head.id.0).map_err(|e| self.ce("record content", e))?;
                }
                tx.commit().map_err(|e| self.ce("commit repair", e))
            })
        });
        self.release_session(REPAIR_SESSION);
        result
    }

    /// After repairs: the blobs of `bad` are read again (a rewritten one is sound
    /// now; an encrypted one must pass its tag check under a held key, when
    /// `keys` holds any), every RP is checked again and the verdicts kept. Returns them.
    pub fn recheck_rps(&self, bad: &HashSet<BlobId>, keys: &ScrubKeys, share: f64) -> Result<Vec<RpScrub>, StoreError> {
        let (mut scratch, mut hint) = (Vec::new(), 0usize);
        let still_bad: HashSet<BlobId> = bad
            .iter()
            .filter(|id| match blob_file::read(&self.blobs_dir, id) {
                Ok(blob) => blob.flags.has(BlobFlags::ENCRYPTED) && !keys.is_empty() && !keys.authenticate(&blob, &mut scratch, &mut hint),
                Err(_) => true,
            })
            .copied()
            .collect();
        let (verdicts, _, _) = self.guard("scrubbed RPs", || self.scrub_rps(&still_bad, &HashSet::new(), keys, share, now_unix_ms()))?;
        self.record_scrubs(&verdicts)?;
        Ok(verdicts)
    }

    /// Keeps each RP's newest scrub verdict.
    fn record_scrubs(&self, verdicts: &[RpScrub]) -> Result<(), StoreError> {
        self.guard("kept scrub results", || {
            let _w = lock(&self.writer);
            let tx = self.begin_write("begin write")?;
            {
                let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
                let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
                let mut scrubs = tx.open_table(SCRUBS).map_err(|e| self.ce("open table scrubs", e))?;
                for v in verdicts {
                    let Some((volume, seq)) = v.rp.rsplit_once('@') else { continue };
                    let Ok(seq) = seq.parse::<u64>() else { continue };
                    let Some(vid) = vols.get(volume).map_err(|e| self.ce("read volumes", e))?.map(|g| g.value()) else { continue };
                    // An RP pruned since the pass read it gets no row.
                    if rps.get((vid, seq)).map_err(|e| self.ce("read rps", e))?.is_none() {
                        continue;
                    }
                    let mut row = vec![SCRUB_ROW_VERSION];
                    row.extend(serde_json::to_vec(v).unwrap_or_default());
                    scrubs.insert((vid, seq), row.as_slice()).map_err(|e| self.ce("write scrub result", e))?;
                }
            }
            tx.commit().map_err(|e| self.ce("commit scrub results", e))
        })
    }

    /// The newest scrub verdict of each RP of `volume` (every volume when None), by RP.
    pub fn scrubs(&self, volume: Option<&str>) -> Result<Vec<RpScrub>, StoreError> {
        self.guard("read scrub results", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let scrubs = match tx.open_table(SCRUBS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(self.ce("open table scrubs", e)),
            };
            let range = match volume {
                Some(v) => match self.volume_id(&tx, v)? {
                    Some(vid) => (vid, 0)..=(vid, u64::MAX),
                    None => return Ok(Vec::new()),
                },
                None => (0, 0)..=(u32::MAX, u64::MAX),
            };
            let mut out = Vec::new();
            for row in scrubs.range(range).map_err(|e| self.ce("read scrubs", e))? {
                let (_, v) = row.map_err(|e| self.ce("read scrubs", e))?;
                if let Some((&SCRUB_ROW_VERSION, json)) = v.value().split_first() {
                    if let Ok(r) = serde_json::from_slice(json) {
                        out.push(r);
                    }
                }
            }
            Ok(out)
        })
    }
}
