//! The data pass of a restore: a producer that walks the block map and hands
//! out blocks in index order, and one worker per core that reads, decodes,
//! verifies and writes each block.
//!
//! With a local store the workers read blob files themselves, so reading runs
//! on every core too. With a remote holder the producer keeps a window of
//! fetch requests in flight (the link stays busy while the workers decode) and
//! hands each reply's chain to the workers. The channel between them holds two
//! jobs per worker: memory is bounded by a few blocks per worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::dest::{Destination, DIRECT_ALIGN};
use super::{blob_chain, blocking, decode_into, unexpected, Progress, RestoreError, RpSource};
use crate::actor::fetch::{FetchClient, FetchReply, FetchRequest, IDS_PER_REQUEST};
use crate::codec::BlockCodec;
use crate::content::ContentId;
use crate::store::{EncodedBlob, RpMeta, Store};

/// Blob-chain requests a remote restore keeps in flight.
const FETCH_WINDOW: usize = 32;

/// A block buffer whose start is [`DIRECT_ALIGN`]-aligned, for `O_DIRECT` writes.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        // For a byte pointer an aligned offset always exists and is below the alignment.
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { raw, start }
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// One block for a worker.
enum Job {
    /// An all-zero block.
    Zero { index: u64 },
    /// A block whose chain the worker reads from the local store.
    Local { index: u64, content: ContentId },
    /// A block whose chain came from the holder.
    Fetched { index: u64, content: ContentId, chain: Result<Vec<EncodedBlob>, String> },
}

/// What the data pass counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Zero blocks.
    pub zero_blocks: u64,
    /// Blobs read, delta bases included.
    pub blobs_read: u64,
    /// Bytes of blob payload read.
    pub payload_bytes: u64,
}

/// State shared by the workers.
struct Shared {
    meta: RpMeta,
    codec: BlockCodec,
    store: Option<Arc<Store>>,
    destination: Option<Arc<Destination>>,
    progress: Arc<Progress>,
    failed: AtomicBool,
    zero_blocks: AtomicU64,
    blobs_read: AtomicU64,
    payload_bytes: AtomicU64,
}

impl Shared {
    /// Bytes of block `index` (the last block may be short).
    fn block_len(&self, index: u64) -> usize {
        let start = index * u64::from(self.meta.block_bytes);
        (self.meta.volume_bytes.saturating_sub(start)).min(u64::from(self.meta.block_bytes)) as usize
    }

    fn block_error(&self, index: u64, content: ContentId, reason: String) -> RestoreError {
        RestoreError::Block { rp: self.meta.name(), index, content, reason }
    }

    /// Does one job: materializes the block into `buf`, checks it and writes it.
    fn process(&self, job: Job, buf: &mut AlignedBuf) -> Result<(), RestoreError> {
        let block_bytes = u64::from(self.meta.block_bytes);
        let (index, content, chain) = match job {
            Job::Zero { index } => {
                let len = self.block_len(index) as u64;
                if let Some(d) = &self.destination {
                    d.zero(index * block_bytes, len)?;
                }
                self.zero_blocks.fetch_add(1, Ordering::Relaxed);
                self.progress.add(len);
                return Ok(());
            }
            Job::Local { index, content } => {
                let store = self.store.as_ref().ok_or_else(|| self.block_error(index, content, "no local store".into()))?;
                (index, content, blob_chain(store, &content))
            }
            Job::Fetched { index, content, chain } => (index, content, chain),
        };
        let chain = chain.map_err(|reason| self.block_error(index, content, reason))?;
        let len = self.block_len(index);
        self.blobs_read.fetch_add(chain.len() as u64, Ordering::Relaxed);
        self.payload_bytes.fetch_add(chain.iter().map(|b| b.payload.len() as u64).sum(), Ordering::Relaxed);
        let out = buf.slice(len);
        decode_into(&self.codec, content, chain, out).map_err(|reason| self.block_error(index, content, reason))?;
        if let Some(d) = &self.destination {
            d.write_at(out, index * block_bytes)?;
        }
        self.progress.add(len as u64);
        Ok(())
    }
}

/// Runs the data pass of `meta` into `destination` (None: verify only).
pub async fn run(
    source: &mut RpSource,
    meta: &RpMeta,
    codec: &BlockCodec,
    destination: Option<Arc<Destination>>,
    progress: Arc<Progress>,
) -> Result<Counts, RestoreError> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shared = Arc::new(Shared {
        meta: meta.clone(),
        codec: codec.clone(),
        store: match source {
            RpSource::Local(store) => Some(store.clone()),
            RpSource::Remote(_) => None,
        },
        destination,
        progress,
        failed: AtomicBool::new(false),
        zero_blocks: AtomicU64::new(0),
        blobs_read: AtomicU64::new(0),
        payload_bytes: AtomicU64::new(0),
    });
    let (tx, rx) = mpsc::channel::<Job>(2 * workers);
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (shared, rx) = (shared.clone(), rx.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let mut buf = AlignedBuf::new(shared.meta.block_bytes as usize);
            loop {
                if shared.failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                // One worker waits in recv at a time; the others wait for the lock.
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                let Some(job) = job else { return Ok(()) };
                if let Err(e) = shared.process(job, &mut buf) {
                    shared.failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }));
    }
    drop(rx);
    let produced = match source {
        RpSource::Local(store) => produce_local(store.clone(), meta, &tx).await,
        RpSource::Remote(client) => produce_remote(client, meta, &tx).await,
    };
    drop(tx);
    let mut first_error = None;
    for h in handles {
        let result = h.await.map_err(|e| RestoreError::Fetch(format!("restore worker failed: {e}"))).and_then(|r| r);
        if let (Err(e), None) = (result, &first_error) {
            first_error = Some(e);
        }
    }
    // A worker's error explains a closed channel better than the producer's.
    if let Some(e) = first_error {
        return Err(e);
    }
    produced?;
    Ok(Counts {
        zero_blocks: shared.zero_blocks.load(Ordering::Relaxed),
        blobs_read: shared.blobs_read.load(Ordering::Relaxed),
        payload_bytes: shared.payload_bytes.load(Ordering::Relaxed),
    })
}

/// The channel closed: a worker failed and the others stopped (its error is the one reported).
fn stopped() -> RestoreError {
    RestoreError::Fetch("the restore workers stopped".into())
}

async fn produce_local(store: Arc<Store>, meta: &RpMeta, tx: &mpsc::Sender<Job>) -> Result<(), RestoreError> {
    let mut start = 0;
    while start < meta.block_count {
        let count = (meta.block_count - start).min(IDS_PER_REQUEST);
        let (s, v, seq) = (store.clone(), meta.volume.clone(), meta.seq);
        let ids = blocking(move || s.block_ids(&v, seq, start, count)).await??;
        for (i, content) in ids.into_iter().enumerate() {
            let index = start + i as u64;
            let job = if content.is_zero() { Job::Zero { index } } else { Job::Local { index, content } };
            tx.send(job).await.map_err(|_| stopped())?;
        }
        start += count;
    }
    Ok(())
}

/// Asks for block ids and blob chains over one fetch stream, keeping
/// [`FETCH_WINDOW`] chain requests in flight; replies come back in request order.
async fn produce_remote(client: &mut FetchClient, meta: &RpMeta, tx: &mpsc::Sender<Job>) -> Result<(), RestoreError> {
    enum Asked {
        Ids { start: u64, count: u64 },
        Chain { index: u64, content: ContentId },
    }
    let mut in_flight = std::collections::VecDeque::new();
    let mut pending_ids: std::collections::VecDeque<(u64, ContentId)> = std::collections::VecDeque::new();
    let mut next_page = 0;
    let mut ids_asked = false;
    loop {
        // Keep the window full: block ids first when they run low, then chains.
        if !ids_asked && pending_ids.len() < FETCH_WINDOW && next_page < meta.block_count {
            let count = (meta.block_count - next_page).min(IDS_PER_REQUEST);
            client.request(&FetchRequest::Blocks { start: next_page, count }).await.map_err(RestoreError::Fetch)?;
            in_flight.push_back(Asked::Ids { start: next_page, count });
            next_page += count;
            ids_asked = true;
        }
        while in_flight.len() < FETCH_WINDOW {
            let Some((index, content)) = pending_ids.pop_front() else { break };
            if content.is_zero() {
                tx.send(Job::Zero { index }).await.map_err(|_| stopped())?;
                continue;
            }
            client.request(&FetchRequest::Content(content)).await.map_err(RestoreError::Fetch)?;
            in_flight.push_back(Asked::Chain { index, content });
        }
        let Some(asked) = in_flight.pop_front() else { return Ok(()) };
        let reply = client.reply().await.map_err(RestoreError::Fetch)?;
        match (asked, reply) {
            (Asked::Ids { start, count }, FetchReply::Blocks(ids)) => {
                if ids.len() as u64 != count {
                    return Err(RestoreError::Fetch(format!("asked for {count} block ids from {start}, got {}", ids.len())));
                }
                pending_ids.extend(ids.into_iter().enumerate().map(|(i, c)| (start + i as u64, c)));
                ids_asked = false;
            }
            (Asked::Ids { .. }, FetchReply::Error(e)) => return Err(RestoreError::Fetch(e)),
            (Asked::Chain { index, content }, reply @ (FetchReply::Chain(_) | FetchReply::Error(_))) => {
                tx.send(Job::Fetched { index, content, chain: FetchClient::chain(reply) }).await.map_err(|_| stopped())?;
            }
            (_, other) => return Err(unexpected(&other)),
        }
    }
}
