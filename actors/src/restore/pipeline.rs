//! The data pass of a restore: a producer that walks the block map and hands
//! out blocks in index order, decoders that read, decrypt, decompress, apply
//! deltas and verify each block, and one writer.
//!
//! - With a local store the decoders read blob files themselves; there are two
//!   more decoders than cores, so reads from a cold disk overlap decoding. With
//!   a remote holder the producer keeps a window of fetch requests in flight (the
//!   link stays busy while the decoders work) and hands each reply's chain over.
//! - The writer is alone so that writes never contend for the destination's
//!   inode lock (two writers spin on it in the kernel); it writes with `O_DIRECT`
//!   where it can, so the data does not go through the page cache.
//! - Block buffers (aligned for `O_DIRECT`) come from a fixed pool that the
//!   writer refills: memory is a few blocks per decoder, whatever the volume size.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use tokio::sync::mpsc;

use super::dest::{Destination, DIRECT_ALIGN};
use super::{blob_chain_into, blocking, decode_into, unexpected, Progress, RestoreError, RpSource};
use crate::actor::fetch::FetchClient;
use crate::proto::fetch::{FetchReply, FetchRequest, IDS_PER_REQUEST};
use crate::codec::BlockCodec;
use crate::content::ContentId;
use crate::store::{EncodedBlob, ReadStore, RpMeta};

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

/// One block for a decoder.
enum Job {
    /// An all-zero block.
    Zero { index: u64 },
    /// A block whose chain the decoder reads from the local store.
    Local { index: u64, content: ContentId },
    /// A block whose chain came from the holder.
    Fetched { index: u64, content: ContentId, chain: Result<Vec<EncodedBlob>, String> },
}

/// One block for the writer.
enum Write {
    Data { index: u64, buf: AlignedBuf, len: usize },
    Zero { index: u64, len: u64 },
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

/// State shared by the decoders and the writer.
struct Shared {
    meta: RpMeta,
    codec: BlockCodec,
    store: Option<Arc<dyn ReadStore>>,
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

    /// Materializes the block `index` (content `content`, blob chain from the
    /// holder, or None to read it from the local store reusing `payload`) into
    /// `buf` and checks it. On error the buffer comes back with it.
    fn decode(&self, index: u64, content: ContentId, fetched: Option<Result<Vec<EncodedBlob>, String>>, mut buf: AlignedBuf, payload: &mut Vec<u8>) -> Result<Write, (RestoreError, AlignedBuf)> {
        let chain = match (fetched, &self.store) {
            (Some(chain), _) => chain,
            (None, Some(store)) => blob_chain_into(store.as_ref(), &content, std::mem::take(payload)).map_err(|e| e.to_string()),
            (None, None) => Err("no local store".into()),
        };
        let mut chain = match chain {
            Ok(c) => c,
            Err(reason) => return Err((self.block_error(index, content, reason), buf)),
        };
        let len = self.block_len(index);
        self.blobs_read.fetch_add(chain.len() as u64, Ordering::Relaxed);
        self.payload_bytes.fetch_add(chain.iter().map(|b| b.payload.len() as u64).sum(), Ordering::Relaxed);
        let decoded = decode_into(&self.codec, content, &mut chain, buf.slice(len));
        // The head blob's payload buffer serves the next read.
        if let Some(head) = chain.into_iter().next() {
            *payload = head.payload;
        }
        match decoded {
            Ok(()) => Ok(Write::Data { index, buf, len }),
            Err(reason) => Err((self.block_error(index, content, reason), buf)),
        }
    }

    /// Writes one block to the destination.
    fn write(&self, destination: &Destination, w: &mut Write) -> Result<u64, RestoreError> {
        let block_bytes = u64::from(self.meta.block_bytes);
        match w {
            Write::Zero { index, len } => {
                destination.zero(*index * block_bytes, *len)?;
                Ok(*len)
            }
            Write::Data { index, buf, len } => {
                destination.write_block(buf.slice(*len), *index * block_bytes)?;
                Ok(*len as u64)
            }
        }
    }

    fn fail(&self, e: RestoreError) -> RestoreError {
        self.failed.store(true, Ordering::Relaxed);
        e
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
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let decoders = 2 * cores + 4;
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
    // The buffer pool: filled once; the writer (or a verifying decoder) gives buffers back.
    let (pool_tx, pool_rx) = std_mpsc::channel::<AlignedBuf>();
    for _ in 0..decoders + 4 {
        let _ = pool_tx.send(AlignedBuf::new(meta.block_bytes as usize));
    }
    let pool_rx = Arc::new(Mutex::new(pool_rx));
    let (write_tx, write_rx) = std_mpsc::sync_channel::<Write>(decoders);
    let writer = match shared.destination.clone() {
        Some(destination) => {
            let (shared, pool_tx) = (shared.clone(), pool_tx.clone());
            Some(tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
                for mut w in write_rx {
                    let n = shared.write(&destination, &mut w).map_err(|e| shared.fail(e))?;
                    shared.progress.add(n);
                    if let Write::Data { buf, .. } = w {
                        let _ = pool_tx.send(buf);
                    }
                }
                Ok(())
            }))
        }
        None => {
            drop(write_rx);
            None
        }
    };
    // Verifying: decoders give their buffers straight back.
    let recycle = if writer.is_none() { Some(pool_tx.clone()) } else { None };
    drop(pool_tx);
    let (tx, rx) = mpsc::channel::<Job>(2 * decoders);
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::with_capacity(decoders);
    for _ in 0..decoders {
        let (shared, rx, pool_rx, write_tx, recycle) = (shared.clone(), rx.clone(), pool_rx.clone(), write_tx.clone(), recycle.clone());
        handles.push(tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
            let mut payload = Vec::new();
            loop {
                if shared.failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                // One decoder waits in recv at a time; the others wait for the lock.
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                let (index, content, fetched) = match job {
                    None => return Ok(()),
                    Some(Job::Zero { index }) => (index, ContentId::ZERO, None),
                    Some(Job::Local { index, content }) => (index, content, None),
                    Some(Job::Fetched { index, content, chain }) => (index, content, Some(chain)),
                };
                let w = if content.is_zero() {
                    shared.zero_blocks.fetch_add(1, Ordering::Relaxed);
                    Write::Zero { index, len: shared.block_len(index) as u64 }
                } else {
                    let Ok(buf) = pool_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() else {
                        return Ok(()); // the writer stopped: its error is the one reported
                    };
                    shared.decode(index, content, fetched, buf, &mut payload).map_err(|(e, _)| shared.fail(e))?
                };
                match &recycle {
                    Some(pool) => {
                        let n = match w {
                            Write::Zero { len, .. } => len,
                            Write::Data { buf, len, .. } => {
                                let _ = pool.send(buf);
                                len as u64
                            }
                        };
                        shared.progress.add(n);
                    }
                    None => {
                        if write_tx.send(w).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }));
    }
    drop((rx, write_tx, recycle));
    let produced = match source {
        RpSource::Local(store) => produce_local(store.clone(), meta, &tx).await,
        RpSource::Remote(client) => produce_remote(client, meta, &tx).await,
    };
    drop(tx);
    let mut first_error = None;
    for h in handles.into_iter().chain(writer) {
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

async fn produce_local(store: Arc<dyn ReadStore>, meta: &RpMeta, tx: &mpsc::Sender<Job>) -> Result<(), RestoreError> {
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
