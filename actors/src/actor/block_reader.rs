//! The block-reader of a cycle: scans the source's point-in-time view
//! ([`Scanner`]: every block, or the view's changed set), hashes every 4 KiB
//! page on the hash pool, compares with the baseline and hands changed blocks
//! to the cycle's driver in batches.
//!
//! A blocking thread (tokio's blocking pool), not an actix actor: it does
//! blocking reads of files and block devices for the life of one cycle. Its
//! mailbox is the hand-over channel of one batch: the driver takes a batch
//! only while the session grants credit, so the reader never reads ahead of
//! the window, and memory is bounded by the window, not the volume.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::content::IdScheme;
use crate::source::baseline::Baselines;
use crate::source::change::PointInTime;
use crate::source::file::{FileSource, ScanStats, ScannedBlock, Scanner};
use crate::source::BlockMask;
use crate::store::VolumeName;

/// Blocks handed from the reader to the driver at once: one wake-up per
/// batch rather than per block (long runs of zero blocks are cheap to read and
/// would otherwise be paced by the hand-over).
pub const HANDOVER_BLOCKS: usize = 16;

/// What the reader hands over.
pub enum ReaderItem {
    /// Changed blocks, in index order.
    Blocks(Vec<ScannedBlock>),
    /// The scan finished: the Merkle root of the whole volume and the figures.
    Done(crate::content::MerkleRoot, ScanStats),
    /// Reading failed (or the view was invalidated while read): the cycle fails.
    Failed(String),
}

/// What one scan reads.
pub struct ReadJob {
    /// The opened view's blocks.
    pub source: FileSource,
    /// The view (checked once the last block was read).
    pub view: Arc<dyn PointInTime>,
    /// The baseline the blocks are compared with.
    pub baselines: Arc<Baselines>,
    /// Volume and target of the baseline.
    pub volume: VolumeName,
    /// Target node name.
    pub target: String,
    /// Content ids of the policy.
    pub ids: IdScheme,
    /// Offer every block, changed or not.
    pub full_offer: bool,
    /// Only these blocks (`None`: all).
    pub only: Option<Arc<BlockMask>>,
    /// Where the reader says how far it is.
    pub progress: Arc<super::replicate::ReadProgress>,
}

/// Starts the reader; its batches arrive on the returned channel (capacity one batch).
pub fn start(job: ReadJob) -> mpsc::Receiver<ReaderItem> {
    let (tx, rx) = mpsc::channel::<ReaderItem>(1);
    tokio::task::spawn_blocking(move || {
        let mut scanner = Scanner::new(&job.source, &job.baselines, &job.volume, &job.target, job.ids, job.full_offer).with_read_set(job.only);
        let mut batch = Vec::with_capacity(HANDOVER_BLOCKS);
        loop {
            let next = scanner.next_changed();
            job.progress.blocks_done.store(scanner.position(), std::sync::atomic::Ordering::Relaxed);
            match next {
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
        // Reads of an invalidated snapshot fail, but one invalidated as the
        // last read finished must fail the cycle too.
        if let Err(e) = job.view.check() {
            let _ = tx.blocking_send(ReaderItem::Failed(e.to_string()));
            return;
        }
        let _ = tx.blocking_send(ReaderItem::Done(root, stats));
    });
    rx
}
