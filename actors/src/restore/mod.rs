//! Restore and verify: rebuilding a volume image from a recovery point.
//!
//! Blocks come from a store (the node's own, or a state dir opened read-only
//! when no node runs) or, over a fetch stream, from the node that holds the RP.
//! A restore runs in two passes:
//!
//! 1. **Block map.** The block ids of the RP are read page by page and hashed
//!    into its Merkle root, which must equal the root recorded at commit; a
//!    damaged block map is found before anything is written.
//! 2. **Data.** Decoders (two per core, plus four) take the next block, read
//!    its blob chain, decrypt (AES-GCM, authenticated), decompress, apply
//!    deltas on the base in place and recompute the content id; one writer
//!    writes the blocks to the destination (zero blocks are holes in a file,
//!    discards or zeros on a device). Memory is a fixed pool of blocks, whatever
//!    the volume size (see `pipeline.rs`).
//!
//! A missing or corrupted blob fails the restore, naming the block and the blob.
//! An image file gets its name only when everything passed and the data is
//! durable; a device is written in place (see [`dest`] for every check made
//! before the first byte is written).

pub mod dest;
pub mod journal;
mod pipeline;
pub mod probe;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::actor::fetch::FetchClient;
use crate::proto::fetch::{FetchReply, FetchRequest, IDS_PER_REQUEST};
use crate::codec::BlockCodec;
use crate::content::{ContentId, MerkleBuilder};
use crate::store::{EncodedBlob, ReadStore, RpMeta, RpSeq, StoreError, VolumeName};

pub use self::dest::{Protected, Rules};
pub use self::journal::Journal;

/// Why a restore or verify failed, and what it left behind: an image file is
/// never left at its name; a device may be partly written ([`RestoreError::Incomplete`]).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The RP is not there.
    #[error("no recovery point {0} here")]
    NoSuchRp(String),
    /// The destination was refused before anything was written.
    #[error("refusing to restore to {path}: {reason}; nothing was written")]
    Refused {
        /// The destination as given.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A block could not be read or decoded.
    #[error("block {index} of {rp} (content {content}): {reason}")]
    Block {
        /// RP name.
        rp: String,
        /// Block index.
        index: u64,
        /// Its content id.
        content: ContentId,
        /// What went wrong.
        reason: String,
    },
    /// The block ids do not hash to the RP's Merkle root.
    #[error("{rp}: Merkle root mismatch (catalog {expected}, blocks {actual}); the block map is damaged")]
    Merkle {
        /// RP name.
        rp: String,
        /// Root recorded at commit.
        expected: String,
        /// Root of what was read.
        actual: String,
    },
    /// Reading the local catalog failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Talking to the peer that holds the RP failed.
    #[error("reading from the holder: {0}")]
    Fetch(String),
    /// Writing the destination failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or device.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A restore to a device failed after writing began: the device holds part
    /// of the image and must not be used as it is.
    #[error("{cause}; {path} was partly overwritten and holds no usable image: restore again before using it")]
    Incomplete {
        /// The device.
        path: PathBuf,
        /// What failed.
        cause: Box<RestoreError>,
    },
}

/// Where the RP's blocks come from.
pub enum RpSource {
    /// A store on this machine: the node's own, or one opened read-only.
    Local(Arc<dyn ReadStore>),
    /// A peer, over a fetch stream.
    Remote(FetchClient),
}

/// Where a restore writes, and under which rules.
#[derive(Debug, Clone)]
pub struct Target {
    /// The image file or block device.
    pub path: PathBuf,
    /// What may be overwritten.
    pub rules: Rules,
    /// Where named temporary files are recorded (the state dir's journal).
    pub journal: Option<Journal>,
}

/// What a restore or verify did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The RP.
    pub rp: RpMeta,
    /// Blocks in the image.
    pub blocks: u64,
    /// Zero blocks (not stored; holes in a file, zeroed on a device).
    pub zero_blocks: u64,
    /// Blobs read (delta bases included).
    pub blobs_read: u64,
    /// Bytes of blob payload read.
    pub payload_bytes: u64,
    /// Wall time.
    pub duration_secs: f64,
    /// Image bytes per second of wall time.
    pub rate_bytes_per_sec: f64,
    /// Where the image was written (None for verify).
    pub output: Option<PathBuf>,
    /// "file" or "device" (None for verify).
    pub output_kind: Option<&'static str>,
}

/// What a running restore is doing, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
}

/// One reading of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    /// "starting", "checking block map", "restoring" / "verifying", "syncing", "done".
    pub phase: &'static str,
    /// Image bytes handled in this phase.
    pub done_bytes: u64,
    /// Image bytes of the whole phase.
    pub total_bytes: u64,
}

const PHASE_START: u8 = 0;
const PHASE_MAP: u8 = 1;
const PHASE_DATA: u8 = 2;
const PHASE_SYNC: u8 = 3;
const PHASE_DONE: u8 = 4;

impl Progress {
    /// The current phase and counts.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let phase = match self.phase.load(Ordering::Relaxed) {
            PHASE_START => "starting",
            PHASE_MAP => "checking block map",
            PHASE_DATA => "restoring",
            PHASE_SYNC => "syncing",
            _ => "done",
        };
        ProgressSnapshot { phase, done_bytes: self.done_bytes.load(Ordering::Relaxed), total_bytes: self.total_bytes.load(Ordering::Relaxed) }
    }

    fn enter(&self, phase: u8, total_bytes: u64) {
        self.done_bytes.store(0, Ordering::Relaxed);
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn add(&self, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, RestoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| RestoreError::Fetch(format!("worker thread failed: {e}")))
}

fn unexpected(reply: &FetchReply) -> RestoreError {
    let kind = match reply {
        FetchReply::Rp(_) => "recovery point",
        FetchReply::Blocks(_) => "block ids",
        FetchReply::Chain(_) => "blob chain",
        FetchReply::Error(_) => "error",
    };
    RestoreError::Fetch(format!("the holder answered with {kind} out of turn"))
}

impl RpSource {
    /// The metadata of `volume@seq` (the newest when `seq` is None).
    pub(crate) async fn rp(&mut self, volume: &VolumeName, seq: Option<RpSeq>) -> Result<RpMeta, RestoreError> {
        let name = format!("{volume}@{}", seq.map_or("latest".to_string(), |s| s.to_string()));
        match self {
            RpSource::Local(store) => {
                let (store, v) = (store.clone(), volume.to_string());
                let found = blocking(move || match seq {
                    Some(s) => store.rp(&v, s),
                    None => store.latest_rp(&v),
                })
                .await??;
                found.ok_or(RestoreError::NoSuchRp(name))
            }
            RpSource::Remote(client) => {
                client.request(&FetchRequest::Rp { volume: volume.clone(), seq }).await.map_err(RestoreError::Fetch)?;
                match client.reply().await.map_err(RestoreError::Fetch)? {
                    FetchReply::Rp(meta) => Ok(meta),
                    FetchReply::Error(e) => Err(RestoreError::Fetch(format!("{name}: {e}"))),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    /// The block ids `start .. start + count` of `meta`'s RP.
    pub(crate) async fn block_ids(&mut self, meta: &RpMeta, start: u64, count: u64) -> Result<Vec<ContentId>, RestoreError> {
        let ids = match self {
            RpSource::Local(store) => {
                let (store, v, seq) = (store.clone(), meta.volume.clone(), meta.seq);
                blocking(move || store.block_ids(&v, seq, start, count)).await??
            }
            RpSource::Remote(client) => {
                client.request(&FetchRequest::Blocks { start, count }).await.map_err(RestoreError::Fetch)?;
                match client.reply().await.map_err(RestoreError::Fetch)? {
                    FetchReply::Blocks(ids) => ids,
                    FetchReply::Error(e) => return Err(RestoreError::Fetch(e)),
                    other => return Err(unexpected(&other)),
                }
            }
        };
        if ids.len() as u64 != count {
            return Err(RestoreError::Fetch(format!("asked for {count} block ids from {start}, got {}", ids.len())));
        }
        Ok(ids)
    }
}

pub use crate::store::{blob_chain, blob_chain_into};

thread_local! {
    /// Plaintext of delta blobs being applied (restore's delta path), reused per thread.
    static DELTA_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Materializes `content` from its blob chain (head first) into `out`, which must
/// be exactly the block's length, and checks its content id: the full base is
/// decoded into `out`, each delta applied in place, oldest first, and only the
/// result is hashed (a chain that does not give `content` fails, naming its
/// blobs). Blobs are spent: their payload buffers may be reused afterwards.
pub fn decode_into(codec: &BlockCodec, content: ContentId, chain: &mut [EncodedBlob], out: &mut [u8]) -> Result<(), String> {
    let head = chain.first().map(|b| b.id).ok_or("empty blob chain")?;
    let Some((base, deltas)) = chain.split_last_mut() else { return Err("empty blob chain".into()) };
    if base.base.is_some() {
        return Err(format!("delta blob {} has no base in its chain", base.id));
    }
    if deltas.is_empty() && base.content != content {
        return Err(format!("blob {} holds content {}, not this block", base.id, base.content));
    }
    codec.open_into(base, out).map_err(|e| e.to_string())?;
    for delta in deltas.iter_mut().rev() {
        DELTA_SCRATCH.with(|cell| -> Result<(), String> {
            let mut scratch = cell.borrow_mut();
            scratch.clear();
            scratch.resize(delta.plain_len as usize, 0);
            codec.open_into(delta, &mut scratch).map_err(|e| e.to_string())?;
            codec.apply_delta_in_place(delta, &scratch, out).map_err(|e| e.to_string())
        })?;
    }
    codec.check(head, content, out).map_err(|e| match chain {
        [_] => e.to_string(),
        _ => format!("{e} (delta chain {})", chain.iter().map(|b| b.id.to_string()).collect::<Vec<_>>().join(" <- ")),
    })
}

/// Checks the block map of `meta` against its Merkle root, reading ids page by page.
async fn check_block_map(source: &mut RpSource, meta: &RpMeta, progress: &Progress) -> Result<(), RestoreError> {
    progress.enter(PHASE_MAP, meta.volume_bytes);
    let mut merkle = MerkleBuilder::new();
    let mut start = 0;
    while start < meta.block_count {
        let count = (meta.block_count - start).min(IDS_PER_REQUEST);
        for id in source.block_ids(meta, start, count).await? {
            merkle.push(&id);
        }
        start += count;
        progress.add((count * u64::from(meta.block_bytes)).min(meta.volume_bytes));
    }
    let root = merkle.finish();
    if root != meta.merkle_root {
        return Err(RestoreError::Merkle { rp: meta.name(), expected: meta.merkle_root.to_hex(), actual: root.to_hex() });
    }
    Ok(())
}

/// Restores `volume@seq` (the newest when `seq` is None) to `target`, or verifies
/// it when `target` is None, reporting to `progress` as it goes.
pub async fn restore(
    source: &mut RpSource,
    volume: &VolumeName,
    seq: Option<RpSeq>,
    codec: &BlockCodec,
    target: Option<&Target>,
    progress: &Arc<Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let meta = source.rp(volume, seq).await?;
    let destination = match target {
        Some(t) => {
            let (path, rules, journal, bytes) = (t.path.clone(), t.rules.clone(), t.journal.clone(), meta.volume_bytes);
            if let Some(j) = &journal {
                let j = j.clone();
                for removed in blocking(move || j.clean()).await? {
                    tracing::info!(path = %removed.display(), "removed the temporary file of an interrupted restore");
                }
            }
            Some(Arc::new(blocking(move || dest::Destination::prepare(&path, bytes, &rules, journal.as_ref())).await??))
        }
        None => None,
    };
    check_block_map(source, &meta, progress).await?;
    progress.enter(PHASE_DATA, meta.volume_bytes);
    let counts = match pipeline::run(source, &meta, codec, destination.clone(), progress.clone()).await {
        Ok(c) => c,
        Err(cause) => return Err(incomplete(destination.as_deref(), cause)),
    };
    let (output, output_kind) = match destination {
        Some(d) => {
            progress.enter(PHASE_SYNC, 0);
            let kind = if d.is_device() { "device" } else { "file" };
            let d = Arc::try_unwrap(d).map_err(|_| RestoreError::Fetch("a worker still holds the destination".into()))?;
            let (device, shown) = (d.is_device(), d.path().to_path_buf());
            let path = blocking(move || d.finish())
                .await?
                .map_err(|cause| if device { RestoreError::Incomplete { path: shown, cause: Box::new(cause) } } else { cause })?;
            (Some(path), Some(kind))
        }
        None => (None, None),
    };
    progress.enter(PHASE_DONE, 0);
    let duration_secs = started.elapsed().as_secs_f64();
    Ok(RestoreReport {
        blocks: meta.block_count,
        zero_blocks: counts.zero_blocks,
        blobs_read: counts.blobs_read,
        payload_bytes: counts.payload_bytes,
        duration_secs,
        rate_bytes_per_sec: meta.volume_bytes as f64 / duration_secs.max(1e-9),
        rp: meta,
        output,
        output_kind,
    })
}

/// A device restore that failed after writing began says so; anything else is unchanged.
fn incomplete(destination: Option<&dest::Destination>, cause: RestoreError) -> RestoreError {
    match destination {
        Some(d) if d.is_device() => RestoreError::Incomplete { path: d.path().to_path_buf(), cause: Box::new(cause) },
        _ => cause,
    }
}

#[cfg(test)]
mod tests {
    //! Restore reads through the store seam: an RP held by the in-memory store
    //! restores and verifies like one held by the local store.

    use super::*;
    use crate::content::page_hashes;
    use crate::store::{MemoryStore, SessionStore};

    const BLOCK: usize = 16384;

    fn meta(block_count: u64, merkle_root: crate::content::MerkleRoot) -> RpMeta {
        RpMeta {
            volume: crate::store::VolumeName::from_static("vol"),
            seq: RpSeq(1),
            time_unix_ms: 1,
            source_node: "src".into(),
            volume_bytes: block_count * BLOCK as u64,
            block_bytes: BLOCK as u32,
            block_count,
            changed_blocks: block_count,
            bytes_stored: 0,
            merkle_root,
            encrypted: false,
            consistency: "crash".into(),
            group: None,
        }
    }

    /// A memory store holding `vol@1`: a full block, a zero block, and a delta
    /// over the first. Returns the store and the image the RP is.
    fn memory_rp(codec: &BlockCodec, merkle_root: Option<crate::content::MerkleRoot>) -> (MemoryStore, Vec<u8>) {
        let first: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
        let mut third = first.clone();
        third[5000..5100].fill(7);
        let (c1, c3) = (codec.ids().content_id(&first), codec.ids().content_id(&third));
        let full = codec.encode_full(c1, &first);
        let (mut pages1, mut pages3) = (Vec::new(), Vec::new());
        page_hashes(&first, &mut pages1);
        page_hashes(&third, &mut pages3);
        let delta = codec.encode_delta(c3, &third, &pages3, full.id, full.depth, &pages1).expect("one changed page makes a delta");
        let store = MemoryStore::new();
        store.put_blobs(1, &[full, delta]).expect("put");
        store.stage(1, "vol", &[(0, c1), (1, ContentId::ZERO), (2, c3)]).expect("stage");
        let mut merkle = MerkleBuilder::new();
        for c in [c1, ContentId::ZERO, c3] {
            merkle.push(&c);
        }
        store.commit_rp(1, &meta(3, merkle_root.unwrap_or_else(|| merkle.finish()))).expect("commit");
        store.release_session(1);
        (store, [first, vec![0; BLOCK], third].concat())
    }

    #[tokio::test]
    async fn an_rp_in_the_memory_store_restores_and_verifies() {
        let codec = BlockCodec::new(Some(1), None);
        let (store, image) = memory_rp(&codec, None);
        let mut source = RpSource::Local(Arc::new(store));
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Target { path: dir.path().join("vol.img"), rules: Rules::default(), journal: None };
        let progress = Arc::new(Progress::default());
        let report = restore(&mut source, &crate::store::VolumeName::from_static("vol"), None, &codec, Some(&target), &progress).await.expect("restore");
        assert_eq!(std::fs::read(&target.path).expect("read the image"), image);
        assert_eq!((report.blocks, report.zero_blocks, report.blobs_read), (3, 1, 3), "the delta's chain is read with its base");
        assert_eq!(progress.snapshot().phase, "done");
        let verified = restore(&mut source, &crate::store::VolumeName::from_static("vol"), Some(RpSeq(1)), &codec, None, &progress).await.expect("verify");
        assert_eq!(verified.output, None);
        let missing = restore(&mut source, &crate::store::VolumeName::from_static("vol"), Some(RpSeq(2)), &codec, None, &progress).await.expect_err("no RP 2");
        assert!(matches!(missing, RestoreError::NoSuchRp(_)), "{missing}");
    }

    #[tokio::test]
    async fn a_block_map_that_does_not_match_its_root_is_refused_before_any_write() {
        let codec = BlockCodec::new(Some(1), None);
        let (store, _) = memory_rp(&codec, Some(crate::content::MerkleRoot([9; 32])));
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Target { path: dir.path().join("vol.img"), rules: Rules::default(), journal: None };
        let refused = restore(&mut RpSource::Local(Arc::new(store)), &crate::store::VolumeName::from_static("vol"), None, &codec, Some(&target), &Arc::new(Progress::default())).await.expect_err("wrong root");
        assert!(matches!(refused, RestoreError::Merkle { .. }), "{refused}");
        assert!(!target.path.exists(), "nothing is left at the destination");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "no temporary file is left either");
    }
}
