//! The target store: content-addressed blobs on disk plus a redb catalog of
//! volumes, recovery points (RPs) and block maps.
//!
//! # Layout
//!
//! ```text
//! <dir>/catalog.redb          redb catalog (tables: see `catalog`)
//! <dir>/staging.redb          block-map changes of in-flight sessions (scratch, remade at open)
//! <dir>/blobs/ab/cd/<64 hex>  one file per blob: 256-byte header + opaque payload (see `blob_file`)
//! ```
//!
//! The store never decodes payloads (they are compressed/encrypted by the source); it
//! keeps them intact, checksummed, and says where each content can be found.
//!
//! # Durability (promise 1)
//!
//! [`Store::put_blobs`] writes every blob of a batch to a unique temp file, renames it
//! into its fan-out folder, then calls `syncfs` once (file data and folder entries of
//! the whole batch), and only then records the blobs in one durable redb transaction.
//! So a catalog row always names a durable file. [`Store::commit_rp`] checks that every
//! staged content has a catalog row and writes the RP row, its block-map delta and the
//! removal of the staged rows in one durable transaction: a crash leaves the previous
//! catalog or the new one. Staged rows live in a scratch database of their own with
//! non-durable transactions (redb allows those only on a file no other process
//! shares; the catalog is shared with read-only readers, see [`Store::open_read_only`]);
//! a commit reads them, writes the catalog, and drops them afterwards. [`Store::open`]
//! drops whatever staged rows and temp files a crash left behind.
//!
//! # Block maps
//!
//! `blocks[(volume, index, seq)] = content` is written only for blocks that changed at
//! RP `seq`; the block at RP `s` is the entry with the greatest seq ≤ `s` (one reverse
//! range lookup, O(log n)), or ZERO if there is none. A commit costs O(changed blocks).
//! `rp_changes[(volume, seq, index)]` lists each RP's entries, so pruning is O(changed
//! blocks of the deleted RPs).
//!
//! **Prune rule.** Deleted RPs are processed in ascending seq. For each entry `(i, d)`
//! of a deleted RP `d`, let `n` be the next *retained* RP after `d` (the newest RP is
//! always retained, so it exists):
//! - if some entry `(i, s)` with `d < s ≤ n` exists, `n` does not see `d`'s entry: delete it;
//! - else re-key it to `(i, n)` (and add `i` to `n`'s change list): `n` inherited it.
//!
//! So `n`'s entries become the newest change of each block over the deleted RPs
//! and `n` itself, which is also what merging their manifests gives: prune
//! checks the two agree before it commits (a catalog that disagrees is damaged).
//!
//! RPs before `d` never looked at entries ≥ `d`, and RPs ≥ `n` see the same content for
//! every block afterwards, so every retained RP's block map is unchanged. Entries only
//! ever sit at seqs of existing RPs, which keeps the rule sound for later prunes.
//!
//! # Why GC is safe while sessions run (promise 6)
//!
//! GC is mark-and-sweep:
//! 1. **Mark**: under the catalog writer lock, GC raises a `gc_running` flag and opens a
//!    read snapshot; it marks every content of every `blocks` entry (all belong to
//!    retained RPs) and the base chains of their blobs. A commit is serialized with that
//!    moment by the writer lock: a commit before it is in the snapshot; a commit after it
//!    sees the flag and adds the blobs it references to `gc_extra`, which GC treats as pinned.
//! 2. **Sweep**: GC takes the writer lock, then the pin lock, and keeps both until the
//!    deletions are committed and the files unlinked. Under that lock it keeps the
//!    closure (base chains included) of every pinned blob, of `gc_extra`, and of blobs
//!    younger than `grace`, and deletes the rest: catalog rows first (one durable
//!    transaction), then files.
//!
//! A session learns "present" only from [`Store::lookup_and_pin`], which decides and pins
//! under the same pin lock, and [`Store::put_blobs`], which pins before writing. So a
//! blob is either pinned before the sweep looks at it (kept), or pinned after the sweep
//! has finished — in which case lookup sees it gone (and the session sends it again) and
//! put writes it anew. Pins last until [`Store::release_session`]; a commit re-checks
//! every content in its own write transaction, so it can never reference a swept blob.
//! Files without catalog rows (a crash between rename and catalog commit) are swept too.

mod backend;
mod blob_file;
mod chain;
mod catalog;
mod drills;
mod error;
mod gc;
mod group_rps;
pub use self::gc::{GcProgress, RetentionPlan};
pub use self::group_rps::{group_rps, GroupMemberRp, GroupRp};
pub mod manifest;
mod check;
mod rebuild;
mod retention;
mod scrub;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Builder, ConcurrencyMode, Database, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

pub use self::blob_file::{encode_header as encode_blob_header, parse_header as parse_blob_header, Header as BlobHeader, HEADER_BYTES as BLOB_HEADER_BYTES, MAGIC as BLOB_MAGIC};
use self::catalog::{BlobMeta, BLOBS, BLOCKS, CONTENTS, DRILLS, META, NEXT_VOLUME_ID, RPS, RP_CHANGES, SCRUBS, STAGED, VOLUMES};
use self::error::{catalog_error, io_error, open_error};
pub use self::backend::{MemoryStore, ReadStore, SessionStore};
pub use self::chain::{blob_chain, blob_chain_into};
pub use self::error::{is_no_space, StoreError};
pub use self::check::{check, CheckReport, MAX_FINDINGS as CHECK_MAX_FINDINGS};
pub use self::rebuild::{rebuild, Finding, RebuildReport, RebuiltRp};
pub use self::retention::{iso_week_index, select_keep, Retention};
pub use self::scrub::{RepairNeeds, RpScrub, ScrubKeys, ScrubOptions, ScrubReport, MAX_PROBLEMS as SCRUB_MAX_PROBLEMS};
pub use crate::content::{BlobId, ContentId};
pub use drmesh_proto::blob::{BlobFlags, BlobLoc, EncodedBlob, RpGroup, RpMeta, RpSeq, VolumeName};

/// Page cache of each catalog (and staging) database redb keeps in memory.
/// redb's default is 1 GiB, which a big catalog fills (its integrity check at
/// open reads every page): a node's memory would grow with its catalog.
/// 64 MiB holds the hot pages (the newest block maps, the blob index's upper
/// levels); `scripts/bench-store` shows the peaks at several sizes.
pub const CATALOG_CACHE_BYTES: usize = 64 << 20;

/// Page cache of the staging database (the rows of sessions in flight, read
/// once at their commit): small, so a target's memory does not grow with the
/// size of the volumes it receives.
pub const STAGING_CACHE_BYTES: usize = 16 << 20;

/// What one GC run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Blobs (files or catalog rows) looked at.
    pub blobs_scanned: u64,
    /// Blobs deleted.
    pub blobs_deleted: u64,
    /// Bytes of deleted blob files.
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because a session pinned them (or their delta).
    pub blobs_kept_pinned: u64,
    /// Unreferenced blobs kept because they are younger than the grace window.
    pub blobs_kept_grace: u64,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// A dry run: nothing was deleted; `blobs_deleted` and `bytes_freed` say
    /// what a GC would delete now.
    #[serde(default)]
    pub dry_run: bool,
}

/// What the GCs of one store handle did since it was opened (for metrics:
/// monotonic while the process runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcTotals {
    /// GC runs that finished.
    pub runs: u64,
    /// GC runs that failed.
    pub failed_runs: u64,
    /// Blobs they deleted.
    pub blobs_deleted: u64,
    /// Bytes they freed.
    pub bytes_freed: u64,
    /// When the last finished run ended, Unix ms.
    pub last_run_unix_ms: Option<u64>,
    /// How long the last finished run took, ms.
    pub last_duration_ms: u64,
}

impl GcTotals {
    fn add(&mut self, report: &GcReport) {
        self.runs += 1;
        self.blobs_deleted += report.blobs_deleted;
        self.bytes_freed += report.bytes_freed;
        self.last_duration_ms = report.duration_ms;
        self.last_run_unix_ms = Some(now_unix_ms());
    }
}

/// Store figures for `drmesh ctl`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Blobs in the catalog.
    pub blob_count: u64,
    /// Bytes of their files (headers included).
    pub blob_bytes: u64,
    /// Size of the catalog file.
    pub catalog_bytes: u64,
    /// Volumes with RPs.
    pub volume_count: u64,
    /// RPs over all volumes.
    pub rp_count: u64,
}

#[derive(Default)]
struct PinState {
    sessions: HashMap<u64, HashSet<BlobId>>,
    gc_running: bool,
    gc_extra: HashSet<BlobId>,
}

/// The catalog as this process opened it: the node's writer, or a reader beside it.
enum Catalog {
    /// The node's handle: reads and writes.
    Writer(Database),
    /// A read-only handle ([`Store::open_read_only`]); follows the writer's commits.
    /// (A read-only store may also hold a `Writer` over a repaired private copy.)
    Reader(ReadOnlyDatabase),
}

impl Catalog {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Catalog::Writer(db) => db.begin_read(),
            Catalog::Reader(db) => db.begin_read(),
        }
    }
}

/// A target's blob store and catalog. `Send + Sync`; share it as `Arc<Store>`.
pub struct Store {
    blobs_dir: PathBuf,
    /// RP manifests (`manifest`): what the catalog is rebuilt from.
    manifests_dir: PathBuf,
    catalog_path: PathBuf,
    db: Catalog,
    /// Block-map changes of in-flight sessions (`staging.redb`, this process's
    /// scratch: never durable, emptied at every open; None when read-only).
    staging: Option<(PathBuf, Database)>,
    /// Serializes redb write transactions (and orders them against GC's mark and sweep).
    writer: Mutex<()>,
    /// Session pins; GC decides and deletes under this lock.
    pins: Mutex<PinState>,
    /// One GC at a time.
    gc_lock: Mutex<()>,
    /// What the GCs of this handle did.
    gc_totals: Mutex<GcTotals>,
    /// Set when the storage engine failed on the catalog: what failed (writes are refused from then on).
    damaged: Mutex<Option<(String, String)>>,
    /// Where the next sampled scrub's window of the blob id space starts.
    scrub_cursor: std::sync::atomic::AtomicU64,
    /// One scrub at a time.
    scrub_lock: Mutex<()>,
}

/// Test crash points: with `DRMESH_CRASH_AT=<point>` in its environment the
/// process kills itself with SIGKILL when it reaches `<point>` (the crash tests
/// use it to die exactly between two writes; nothing else sets it). Points:
/// `store.before-manifest` (an RP's blobs are stored, its manifest not yet
/// written) and `store.before-commit` (its manifest is durable, the catalog
/// commit not yet made).
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("DRMESH_CRASH_AT").ok()).as_deref() == Some(point) {
        tracing::warn!(point, "DRMESH_CRASH_AT: killing this process here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// The text of a caught panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "no message".into())
}

/// Runs `f`, turning a panic of the storage engine into [`StoreError::Damaged`]
/// for the catalog at `path`.
fn catch_engine<T>(path: &Path, op: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let detail = panic_text(payload.as_ref());
            tracing::error!(catalog = %path.display(), op, detail, "the storage engine failed on the catalog: it is damaged");
            Err(StoreError::Damaged { path: path.to_path_buf(), op: op.to_string(), detail })
        }
    }
}

/// Locks a mutex, carrying on after a panic elsewhere (the guarded state stays consistent:
/// every critical section either finishes its update or changes nothing).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rp_name(volume: &str, seq: RpSeq) -> String {
    format!("{volume}@{seq}")
}

/// Follows base links from `id`; returns the blob ids of the chain (`id` first), or None if
/// a link has no catalog row.
fn chain_of(
    blobs: &impl ReadableTable<[u8; 32], &'static [u8]>,
    id: &BlobId,
) -> Result<Option<Vec<BlobId>>, redb::Error> {
    let mut chain = vec![*id];
    let mut cur = *id;
    loop {
        let Some(row) = blobs.get(cur.0)? else { return Ok(None) };
        let Some(meta) = BlobMeta::decode(row.value()) else {
            return Ok(None);
        };
        match meta.base {
            Some(base) if chain.len() <= usize::from(u8::MAX) + 1 => {
                chain.push(base);
                cur = base;
            }
            Some(_) => return Ok(None),
            None => return Ok(Some(chain)),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: `dir/blobs/` and `dir/catalog.redb`.
    /// Drops leftovers of sessions interrupted by a crash (staged rows, temp files).
    /// The catalog's integrity is checked first (every page checksum): a damaged
    /// catalog is refused with [`StoreError::CatalogCorrupt`], which names the
    /// commands that check and rebuild it; nothing is written then.
    /// Then RP manifests and catalog are brought into step (see `sync_manifests`).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let catalog_path = dir.join("catalog.redb");
        let corrupt = |detail: String| StoreError::CatalogCorrupt {
            path: catalog_path.clone(),
            state_dir: dir.parent().unwrap_or(dir).to_path_buf(),
            detail,
        };
        match catch_engine(&catalog_path, "opened the store", || Store::open_inner(dir)) {
            Err(StoreError::Damaged { detail, .. }) => Err(corrupt(format!("the storage engine failed on it: {detail}"))),
            Err(StoreError::Catalog { source, .. }) if matches!(*source, redb::Error::Corrupted(_)) => Err(corrupt(source.to_string())),
            Err(StoreError::CorruptRow { what }) => Err(corrupt(format!("{what} is undecodable"))),
            other => other,
        }
    }

    fn open_inner(dir: &Path) -> Result<Store, StoreError> {
        let blobs_dir = dir.join("blobs");
        fs::create_dir_all(&blobs_dir).map_err(|e| io_error("create store folder", &blobs_dir, e))?;
        let manifests_dir = dir.join("manifests");
        fs::create_dir_all(&manifests_dir).map_err(|e| io_error("create store folder", &manifests_dir, e))?;
        let catalog_path = dir.join("catalog.redb");
        // SingleWriter: `drmesh restore` with no node running may open the catalog
        // read-only beside this handle (byte-range locks; see `open_read_only`).
        // Every page checksum is verified at open: damage found now is refused
        // before anything relies on it (a plain open may panic on it later).
        let db = Builder::new()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(CATALOG_CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&catalog_path)
            .map_err(|e| open_error(&catalog_path, e))?;
        // Staged rows live apart from the catalog: redb allows non-durable commits only
        // to a file no other process has open, and nothing staged outlives this process.
        let staging_path = dir.join("staging.redb");
        match fs::remove_file(&staging_path) {
            Ok(()) => tracing::info!("store: dropped the staged rows of interrupted sessions"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove staging file", &staging_path, e)),
        }
        let staging = Builder::new().set_cache_size(STAGING_CACHE_BYTES).create(&staging_path).map_err(|e| open_error(&staging_path, e))?;
        {
            let tx = staging.begin_write().map_err(|e| catalog_error("begin staging", &staging_path, e))?;
            tx.open_table(STAGED).map_err(|e| catalog_error("open table staged", &staging_path, e))?;
            tx.commit().map_err(|e| catalog_error("create staging", &staging_path, e))?;
        }
        let store = Store {
            blobs_dir,
            manifests_dir,
            catalog_path,
            db: Catalog::Writer(db),
            staging: Some((staging_path, staging)),
            writer: Mutex::new(()),
            pins: Mutex::new(PinState::default()),
            gc_lock: Mutex::new(()),
            damaged: Mutex::new(None),
            scrub_cursor: std::sync::atomic::AtomicU64::new(0),
            scrub_lock: Mutex::new(()),
            gc_totals: Mutex::new(GcTotals::default()),
        };
        {
            let _w = lock(&store.writer);
            let tx = store.begin_write("begin open transaction")?;
            {
                tx.open_table(META).map_err(|e| store.ce("open table meta", e))?;
                tx.open_table(VOLUMES).map_err(|e| store.ce("open table volumes", e))?;
                tx.open_table(RPS).map_err(|e| store.ce("open table rps", e))?;
                tx.open_table(BLOCKS).map_err(|e| store.ce("open table blocks", e))?;
                tx.open_table(RP_CHANGES)
                    .map_err(|e| store.ce("open table rp_changes", e))?;
                tx.open_table(CONTENTS)
                    .map_err(|e| store.ce("open table contents", e))?;
                tx.open_table(BLOBS).map_err(|e| store.ce("open table blobs", e))?;
                tx.open_table(DRILLS).map_err(|e| store.ce("open table drills", e))?;
                tx.open_table(SCRUBS).map_err(|e| store.ce("open table scrubs", e))?;
                // Staged rows of an older version lived in the catalog; they are dropped as at any open.
                tx.delete_table(STAGED).map_err(|e| store.ce("drop table staged", e))?;
            }
            tx.commit().map_err(|e| store.ce("commit open transaction", e))?;
        }
        let removed = blob_file::remove_temp_files(&store.blobs_dir)?;
        if removed > 0 {
            tracing::info!(files = removed, "store: removed temp files of interrupted writes");
        }
        store.sync_manifests()?;
        Ok(store)
    }

    /// Opens the store in `dir` for reading only, beside a node that may be running on
    /// it (or after one crashed): nothing in `dir` is created, repaired or removed, and
    /// every writing method fails with [`StoreError::ReadOnly`]. Reads see the catalog as
    /// the node last committed it, one snapshot per call. A node's GC may still delete
    /// the blobs of an RP that its retention pruned meanwhile: a read of such a blob then
    /// fails as missing, never with other data.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        catch_engine(&dir.join("catalog.redb"), "opened the store read-only", || Store::open_read_only_inner(dir))
    }

    fn open_read_only_inner(dir: &Path) -> Result<Store, StoreError> {
        let catalog_path = dir.join("catalog.redb");
        match fs::symlink_metadata(&catalog_path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(StoreError::NoStore {
                    dir: dir.to_path_buf(),
                    cause: format!("{} is not a regular file", catalog_path.display()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoStore {
                    dir: dir.to_path_buf(),
                    cause: "it holds no catalog.redb (is this a target node's store?)".into(),
                })
            }
            Err(e) => return Err(io_error("open catalog", &catalog_path, e)),
        }
        let db = match Builder::new().set_concurrency_mode(ConcurrencyMode::SingleWriter).set_cache_size(CATALOG_CACHE_BYTES).open_read_only(&catalog_path) {
            Ok(db) => Catalog::Reader(db),
            // The node crashed or was killed and none runs now: its catalog needs the
            // repair redb makes at a writer's open. Make it on a private copy.
            Err(redb::DatabaseError::RepairAborted) => Catalog::Writer(Self::repaired_copy(&catalog_path)?),
            Err(e) => return Err(open_error(&catalog_path, e)),
        };
        Ok(Store {
            blobs_dir: dir.join("blobs"),
            manifests_dir: dir.join("manifests"),
            catalog_path,
            db,
            staging: None,
            writer: Mutex::new(()),
            pins: Mutex::new(PinState::default()),
            gc_lock: Mutex::new(()),
            damaged: Mutex::new(None),
            scrub_cursor: std::sync::atomic::AtomicU64::new(0),
            scrub_lock: Mutex::new(()),
            gc_totals: Mutex::new(GcTotals::default()),
        })
    }

    /// A repaired copy of a catalog that was not closed cleanly, in an unnamed
    /// temporary file (gone when the handle is dropped); the original is not touched.
    fn repaired_copy(catalog_path: &Path) -> Result<Database, StoreError> {
        tracing::info!(catalog = %catalog_path.display(), "the catalog was not closed cleanly (the node crashed or was killed): reading a repaired copy, the original is left as it is");
        Self::private_copy(catalog_path, false)
    }

    /// The catalog at `catalog_path` copied to an unnamed temporary file (mode
    /// 0600, gone when the handle is dropped) and opened there; with
    /// `check_integrity`, every page checksum is verified at that open. The
    /// original is never written.
    fn private_copy(catalog_path: &Path, check_integrity: bool) -> Result<Database, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let temp_dir = std::env::temp_dir();
        let mut copy = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_TMPFILE)
            .open(&temp_dir)
            .map_err(|e| io_error("create a temporary copy of the catalog in", &temp_dir, e))?;
        let mut original = File::open(catalog_path).map_err(|e| io_error("open catalog", catalog_path, e))?;
        std::io::copy(&mut original, &mut copy).map_err(|e| io_error("copy catalog", catalog_path, e))?;
        let backend = redb::backends::FileBackend::new(copy).map_err(|e| open_error(catalog_path, e))?;
        Builder::new()
            .set_cache_size(CATALOG_CACHE_BYTES)
            .set_check_integrity_on_open(check_integrity)
            .create_with_backend(backend)
            .map_err(|e| open_error(catalog_path, e))
    }

    /// Whether this handle may write (see [`Store::open_read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.staging.is_none()
    }

    /// Runs one public operation: a panic of the storage engine becomes
    /// [`StoreError::Damaged`] and stops every later write of this handle.
    fn guard<T>(&self, op: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = catch_engine(&self.catalog_path, op, f);
        match &result {
            Err(StoreError::Damaged { op, detail, .. }) => {
                lock(&self.damaged).get_or_insert_with(|| (op.clone(), detail.clone()));
            }
            Err(e @ (StoreError::CatalogInconsistent { .. } | StoreError::CorruptRow { .. })) => {
                tracing::error!(catalog = %self.catalog_path.display(), op, error = %e, "the catalog is damaged: this store takes no more writes");
                lock(&self.damaged).get_or_insert_with(|| (op.to_string(), e.to_string()));
            }
            _ => {}
        }
        result
    }

    /// A write transaction, or [`StoreError::ReadOnly`] on a read-only handle,
    /// or [`StoreError::Damaged`] once the engine failed on this catalog.
    fn begin_write(&self, op: &str) -> Result<redb::WriteTransaction, StoreError> {
        if let Some((first, detail)) = lock(&self.damaged).clone() {
            return Err(StoreError::Damaged { path: self.catalog_path.clone(), op: first, detail });
        }
        match &self.db {
            Catalog::Writer(db) if !self.is_read_only() => db.begin_write().map_err(|e| self.ce(op, e)),
            _ => Err(StoreError::ReadOnly { path: self.catalog_path.clone() }),
        }
    }

    fn ce(&self, op: &str, e: impl Into<redb::Error>) -> StoreError {
        catalog_error(op, &self.catalog_path, e)
    }

    /// The staging database and its path, or [`StoreError::ReadOnly`].
    fn staging(&self) -> Result<(&Path, &Database), StoreError> {
        match &self.staging {
            Some((path, db)) => Ok((path, db)),
            None => Err(StoreError::ReadOnly { path: self.catalog_path.clone() }),
        }
    }

    /// A non-durable write transaction on the staging database.
    fn begin_staging(&self) -> Result<(&Path, redb::WriteTransaction), StoreError> {
        let (path, db) = self.staging()?;
        let mut tx = db.begin_write().map_err(|e| catalog_error("begin staging write", path, e))?;
        tx.set_durability(Durability::None).map_err(|e| catalog_error("set durability", path, e))?;
        Ok((path, tx))
    }

    /// Which contents are materializable now; pins the answering blobs for `session` so GC
    /// keeps them (and their base chains) until [`Store::release_session`]. ZERO is never
    /// stored and answers `None` (callers never offer it).
    pub fn lookup_and_pin(&self, session: u64, contents: &[ContentId]) -> Result<Vec<Option<BlobLoc>>, StoreError> {
        self.guard("looked up blobs", || {
            let mut pins = lock(&self.pins);
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
            let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
            let mut out = Vec::with_capacity(contents.len());
            let mut pinned = Vec::new();
            for content in contents {
                if content.is_zero() {
                    out.push(None);
                    continue;
                }
                let Some(blob) = ctab.get(content.0).map_err(|e| self.ce("read contents", e))? else {
                    out.push(None);
                    continue;
                };
                let blob = ContentId(blob.value());
                let meta = btab
                    .get(blob.0)
                    .map_err(|e| self.ce("read blobs", e))?
                    .and_then(|r| BlobMeta::decode(r.value()));
                let whole = chain_of(&btab, &blob).map_err(|e| self.ce("read blobs", e))?.is_some();
                match meta {
                    Some(meta) if whole && blob_file::blob_path(&self.blobs_dir, &blob).exists() => {
                        pinned.push(blob);
                        out.push(Some(BlobLoc {
                            blob,
                            depth: meta.depth,
                        }));
                    }
                    _ => out.push(None),
                }
            }
            pins.sessions.entry(session).or_default().extend(pinned);
            Ok(out)
        })
    }

    /// Pins extra blob ids for `session` (e.g. a delta's base the session relies on).
    /// GC also keeps the base chains of pinned blobs.
    pub fn pin(&self, session: u64, blobs: &[BlobId]) {
        lock(&self.pins)
            .sessions
            .entry(session)
            .or_default()
            .extend(blobs.iter().copied());
    }

    /// Drops the pins and staged rows of an aborted or finished session.
    pub fn release_session(&self, session: u64) {
        lock(&self.pins).sessions.remove(&session);
        if let Err(e) = self.drop_staged(session) {
            // The rows are harmless until the next open, which drops them.
            tracing::warn!(session, error = %e, "store: could not drop staged rows");
        }
    }

    fn drop_staged(&self, session: u64) -> Result<(), StoreError> {
        let _w = lock(&self.writer);
        let (path, tx) = self.begin_staging()?;
        {
            let mut staged = tx.open_table(STAGED).map_err(|e| catalog_error("open table staged", path, e))?;
            let keys: Vec<(String, u64)> = staged
                .range((session, "", 0u64)..)
                .map_err(|e| catalog_error("read staged", path, e))?
                .map_while(|r| r.ok())
                .map(|(k, _)| {
                    let (s, volume, index) = k.value();
                    (s, volume.to_string(), index)
                })
                .take_while(|k| k.0 == session)
                .map(|(_, volume, index)| (volume, index))
                .collect();
            for (volume, index) in keys {
                staged
                    .remove((session, volume.as_str(), index))
                    .map_err(|e| catalog_error("drop staged row", path, e))?;
            }
        }
        tx.commit().map_err(|e| catalog_error("commit staging", path, e))
    }

    fn check_blob(blob: &EncodedBlob) -> Result<(), StoreError> {
        let bad = |cause: &str| {
            Err(StoreError::InvalidBlob {
                blob: blob.id.to_hex(),
                cause: cause.into(),
            })
        };
        if blob.id.is_zero() || blob.content.is_zero() {
            return bad("zero id or content (the zero block is never stored)");
        }
        match blob.base {
            None if blob.flags.has(BlobFlags::DELTA) => bad("DELTA flag without a base"),
            None if blob.id != blob.content => bad("a full block's id must equal its content id"),
            None if blob.depth != 0 => bad("a full block must have depth 0"),
            Some(_) if !blob.flags.has(BlobFlags::DELTA) => bad("base given without the DELTA flag"),
            Some(base) if base == blob.id => bad("a delta cannot be its own base"),
            Some(_) if blob.depth == 0 => bad("a delta must have depth ≥ 1"),
            _ => Ok(()),
        }
    }

    /// Writes `blobs` durably and records them; returns the bytes written to disk (0 for
    /// blobs already present and intact). Files go to a temp name, are renamed into their
    /// fan-out folder, then ONE `syncfs` covers the batch, then ONE durable catalog
    /// transaction records them. An existing file is verified, and rewritten if corrupt.
    /// A delta's base must be in the store or in the batch, and `depth` must be base depth + 1.
    /// Blobs put (and their bases) are pinned for `session`.
    pub fn put_blobs(&self, session: u64, blobs: &[EncodedBlob]) -> Result<u64, StoreError> {
        self.put_blobs_rewriting(session, blobs, &HashSet::new())
    }

    /// [`Store::put_blobs`], rewriting the existing files of the ids in
    /// `rewrite` even where they read back intact (a repair of a blob whose
    /// AES-GCM tag failed).
    pub(crate) fn put_blobs_rewriting(&self, session: u64, blobs: &[EncodedBlob], rewrite: &HashSet<BlobId>) -> Result<u64, StoreError> {
        self.guard("stored blobs", || {
            if blobs.is_empty() {
                return Ok(0);
            }
            if self.is_read_only() {
                return Err(StoreError::ReadOnly { path: self.catalog_path.clone() });
            }
            for blob in blobs {
                Self::check_blob(blob)?;
            }
            self.pin(
                session,
                &blobs
                    .iter()
                    .flat_map(|b| std::iter::once(b.id).chain(b.base))
                    .collect::<Vec<_>>(),
            );
            // Bases and depths (the pins above keep the bases from being swept from here on).
            {
                let batch: HashMap<BlobId, u8> = blobs.iter().map(|b| (b.id, b.depth)).collect();
                let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
                let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                for blob in blobs {
                    let Some(base) = blob.base else { continue };
                    let base_depth = match batch.get(&base) {
                        Some(d) => Some(*d),
                        None => match chain_of(&btab, &base).map_err(|e| self.ce("read blobs", e))? {
                            Some(_) => btab
                                .get(base.0)
                                .map_err(|e| self.ce("read blobs", e))?
                                .and_then(|r| BlobMeta::decode(r.value()))
                                .map(|m| m.depth),
                            None => None,
                        },
                    };
                    let Some(base_depth) = base_depth else {
                        return Err(StoreError::MissingBase {
                            blob: blob.id.to_hex(),
                            base: base.to_hex(),
                        });
                    };
                    if u16::from(blob.depth) != u16::from(base_depth) + 1 {
                        return Err(StoreError::InvalidBlob {
                            blob: blob.id.to_hex(),
                            cause: format!("depth {} but base {} has depth {base_depth}", blob.depth, base.to_hex()),
                        });
                    }
                }
            }
            let mut written = 0u64;
            // (flags, stored bytes) of the file each blob ends up with.
            let mut on_disk = Vec::with_capacity(blobs.len());
            for blob in blobs {
                let path = blob_file::blob_path(&self.blobs_dir, &blob.id);
                if path.exists() {
                    match blob_file::read(&self.blobs_dir, &blob.id) {
                        // Intact and materializing the same thing the same way: keep it (its
                        // payload may differ, e.g. another encryption nonce, and still be valid).
                        Ok(existing)
                            if (existing.content, existing.base, existing.depth)
                                == (blob.content, blob.base, blob.depth)
                                && !rewrite.contains(&blob.id) =>
                        {
                            on_disk.push((
                                existing.flags.0,
                                (blob_file::HEADER_BYTES + existing.payload.len()) as u64,
                            ));
                            continue;
                        }
                        Ok(_) if rewrite.contains(&blob.id) => {
                            tracing::warn!(blob = %blob.id, "store: rewriting a blob file that failed its tag check")
                        }
                        Ok(_) => {
                            tracing::warn!(blob = %blob.id, "store: existing blob file disagrees with the one put; rewriting")
                        }
                        Err(e) => tracing::warn!(error = %e, "store: rewriting damaged blob"),
                    }
                }
                let bytes = blob_file::write(&self.blobs_dir, blob)?;
                written += bytes;
                on_disk.push((blob.flags.0, bytes));
            }
            // One flush for the whole batch: file data and the renames' folder entries.
            let dir = File::open(&self.blobs_dir).map_err(|e| io_error("open blob folder", &self.blobs_dir, e))?;
            nix::unistd::syncfs(&dir).map_err(|e| io_error("syncfs", &self.blobs_dir, std::io::Error::from(e)))?;

            let now = now_unix_ms();
            let _w = lock(&self.writer);
            let tx = self.begin_write("begin write")?;
            {
                let mut btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                let mut ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
                for (blob, (flags, stored_bytes)) in blobs.iter().zip(on_disk) {
                    let meta = BlobMeta {
                        content: blob.content,
                        base: blob.base,
                        depth: blob.depth,
                        flags,
                        stored_bytes,
                        stored_unix_ms: now,
                    };
                    btab.insert(blob.id.0, meta.encode().as_slice())
                        .map_err(|e| self.ce("record blob", e))?;
                    let current = ctab
                        .get(blob.content.0)
                        .map_err(|e| self.ce("read contents", e))?
                        .map(|g| g.value());
                    let current_depth = match current {
                        Some(cur) => btab
                            .get(cur)
                            .map_err(|e| self.ce("read blobs", e))?
                            .and_then(|r| BlobMeta::decode(r.value()))
                            .map(|m| m.depth),
                        None => None,
                    };
                    // Prefer the shallowest way to materialize a content.
                    if current_depth.is_none_or(|d| blob.depth < d) {
                        ctab.insert(blob.content.0, blob.id.0)
                            .map_err(|e| self.ce("record content", e))?;
                    }
                }
            }
            tx.commit().map_err(|e| self.ce("commit blobs", e))?;
            Ok(written)
        })
    }

    /// Stages block-map changes of an in-flight RP of `volume`: (block index, content) pairs,
    /// ZERO meaning the block is zero in this RP. A later change of the same index wins.
    /// Not durable on its own; [`Store::commit_rp`] is.
    pub fn stage(&self, session: u64, volume: &str, changes: &[(u64, ContentId)]) -> Result<(), StoreError> {
        self.guard("staged block-map changes", || {
            let _w = lock(&self.writer);
            let (path, tx) = self.begin_staging()?;
            {
                let mut staged = tx.open_table(STAGED).map_err(|e| catalog_error("open table staged", path, e))?;
                for (index, content) in changes {
                    staged
                        .insert((session, volume, *index), content.0)
                        .map_err(|e| catalog_error("stage block", path, e))?;
                }
            }
            tx.commit().map_err(|e| catalog_error("commit staged", path, e))
        })
    }

    /// Commits `meta.volume@meta.seq` in ONE durable transaction: the RP row, and the
    /// session's staged changes of that volume as the RP's block-map delta. Refused, changing
    /// nothing, if a staged non-zero content is not materializable, if the RP exists, if seq
    /// is not newer than the volume's newest RP, or a staged index is ≥ `block_count`.
    /// O(changed blocks).
    pub fn commit_rp(&self, session: u64, meta: &RpMeta) -> Result<(), StoreError> {
        self.guard("committed an RP", || {
            let name = meta.name();
            let _w = lock(&self.writer);
            let (staging_path, staging_db) = self.staging()?;
            let staging_tx = staging_db.begin_read().map_err(|e| catalog_error("begin staging read", staging_path, e))?;
            let staged = staging_tx.open_table(STAGED).map_err(|e| catalog_error("open table staged", staging_path, e))?;
            let tx = self.begin_write("begin write")?;
            let mut referenced = Vec::new();
            let mut indexes = Vec::new();
            let mut manifest_changes = Vec::new();
            let base_seq;
            let volume = meta.volume.as_str();
            {
                let mut vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
                let existing = vols
                    .get(meta.volume.as_str())
                    .map_err(|e| self.ce("read volumes", e))?
                    .map(|g| g.value());
                let vid = match existing {
                    Some(v) => v,
                    None => {
                        let mut m = tx.open_table(META).map_err(|e| self.ce("open table meta", e))?;
                        let next = m
                            .get(NEXT_VOLUME_ID)
                            .map_err(|e| self.ce("read meta", e))?
                            .map(|g| g.value())
                            .unwrap_or(1);
                        let vid = u32::try_from(next).map_err(|_| StoreError::InvalidRp {
                            rp: name.clone(),
                            cause: "too many volumes".into(),
                        })?;
                        m.insert(NEXT_VOLUME_ID, next + 1)
                            .map_err(|e| self.ce("write meta", e))?;
                        vols.insert(meta.volume.as_str(), vid)
                            .map_err(|e| self.ce("write volumes", e))?;
                        vid
                    }
                };
                let mut rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
                if rps.get((vid, meta.seq.0)).map_err(|e| self.ce("read rps", e))?.is_some() {
                    return Err(StoreError::RpExists { rp: name });
                }
                let newest = match rps
                    .range((vid, 0u64)..=(vid, u64::MAX))
                    .map_err(|e| self.ce("read rps", e))?
                    .next_back()
                {
                    Some(row) => Some(RpSeq(row.map_err(|e| self.ce("read rps", e))?.0.value().1)),
                    None => None,
                };
                if let Some(newest) = newest.filter(|n| *n >= meta.seq) {
                    return Err(StoreError::SeqNotNewer { rp: name, newest });
                }
                base_seq = newest;
                let ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
                let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                let mut blocks = tx.open_table(BLOCKS).map_err(|e| self.ce("open table blocks", e))?;
                let mut changes = tx
                    .open_table(RP_CHANGES)
                    .map_err(|e| self.ce("open table rp_changes", e))?;
                for row in staged
                    .range((session, volume, 0u64)..=(session, volume, u64::MAX))
                    .map_err(|e| catalog_error("read staged", staging_path, e))?
                {
                    let (key, value) = row.map_err(|e| catalog_error("read staged", staging_path, e))?;
                    let index = key.value().2;
                    let content = ContentId(value.value());
                    if index >= meta.block_count {
                        return Err(StoreError::InvalidRp {
                            rp: name,
                            cause: format!("staged block {index} is beyond block_count {}", meta.block_count),
                        });
                    }
                    if !content.is_zero() {
                        let blob = ctab
                            .get(content.0)
                            .map_err(|e| self.ce("read contents", e))?
                            .map(|g| ContentId(g.value()));
                        let chain = match blob {
                            Some(b) => chain_of(&btab, &b).map_err(|e| self.ce("read blobs", e))?,
                            None => None,
                        };
                        let Some(chain) = chain else {
                            return Err(StoreError::MissingContent {
                                rp: name,
                                index,
                                content: content.to_hex(),
                            });
                        };
                        referenced.extend(chain);
                    }
                    blocks
                        .insert((vid, index, meta.seq.0), content.0)
                        .map_err(|e| self.ce("write block map", e))?;
                    changes
                        .insert((vid, meta.seq.0, index), ())
                        .map_err(|e| self.ce("write block map", e))?;
                    indexes.push(index);
                    manifest_changes.push((index, content));
                }
                rps.insert((vid, meta.seq.0), catalog::encode_rp(meta).as_slice())
                    .map_err(|e| self.ce("write rp", e))?;
            }
            {
                // A GC between its mark and its sweep must keep what this commit references
                // (see the module doc); the writer lock orders this against its mark.
                let mut pins = lock(&self.pins);
                if pins.gc_running {
                    pins.gc_extra.extend(referenced);
                }
            }
            // The manifest first, durably: from here the RP can be rebuilt whatever
            // happens to the catalog. A crash before the commit leaves a manifest of an
            // RP that never committed; the next open removes it (see `sync_manifests`).
            crash_point("store.before-manifest");
            manifest::write(
                &self.manifests_dir,
                &manifest::Manifest { meta: meta.clone(), base_seq, changes: manifest_changes },
            )?;
            crash_point("store.before-commit");
            tx.commit().map_err(|e| self.ce(&format!("commit {name}"), e))?;
            // Committed: the staged rows are done with. Failing to drop them is harmless
            // (the session ends, and the next open drops all staged rows).
            drop((staged, staging_tx));
            let dropped = self.begin_staging().and_then(|(path, stx)| {
                {
                    let mut staged = stx.open_table(STAGED).map_err(|e| catalog_error("open table staged", path, e))?;
                    for index in indexes {
                        staged.remove((session, volume, index)).map_err(|e| catalog_error("drop staged row", path, e))?;
                    }
                }
                stx.commit().map_err(|e| catalog_error("commit staging", path, e))
            });
            if let Err(e) = dropped {
                tracing::warn!(rp = %name, error = %e, "store: could not drop the staged rows of a committed RP");
            }
            Ok(())
        })
    }

    /// The manifest of RP `meta` as the catalog holds it: its `blocks` entries
    /// (listed by `rp_changes`) against `base_seq`.
    fn manifest_from_catalog(
        &self,
        blocks: &impl ReadableTable<(u32, u64, u64), [u8; 32]>,
        changes: &impl ReadableTable<(u32, u64, u64), ()>,
        vid: u32,
        meta: &RpMeta,
        base_seq: Option<RpSeq>,
    ) -> Result<manifest::Manifest, StoreError> {
        let mut out = Vec::new();
        for row in changes
            .range((vid, meta.seq.0, 0u64)..=(vid, meta.seq.0, u64::MAX))
            .map_err(|e| self.ce("read rp_changes", e))?
        {
            let index = row.map_err(|e| self.ce("read rp_changes", e))?.0.value().2;
            let content = blocks
                .get((vid, index, meta.seq.0))
                .map_err(|e| self.ce("read block map", e))?
                .ok_or_else(|| StoreError::CorruptRow { what: format!("block {index} of {}'s block map (listed but absent)", meta.name()) })?
                .value();
            out.push((index, ContentId(content)));
        }
        Ok(manifest::Manifest { meta: meta.clone(), base_seq, changes: out })
    }

    /// Brings manifests and catalog into step at open. The catalog commit is an
    /// RP's commit point, so: a committed RP without a manifest (a store written
    /// before manifests existed) gets one from the catalog; a manifest of an RP
    /// the catalog does not hold is removed — newer than the volume's newest RP it
    /// is a commit interrupted after its manifest was written (the source was never
    /// told it committed and sends it again), older it was left by a prune
    /// interrupted after its commit.
    fn sync_manifests(&self) -> Result<(), StoreError> {
        let mut on_disk: HashMap<VolumeName, HashSet<RpSeq>> = HashMap::new();
        for (volume, seq, _) in manifest::list(&self.manifests_dir, true)? {
            on_disk.entry(volume).or_default().insert(seq);
        }
        let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
        let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
        let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
        let blocks = tx.open_table(BLOCKS).map_err(|e| self.ce("open table blocks", e))?;
        let changes = tx.open_table(RP_CHANGES).map_err(|e| self.ce("open table rp_changes", e))?;
        let (mut written, mut removed) = (0u64, 0u64);
        for row in vols.iter().map_err(|e| self.ce("read volumes", e))? {
            let (name, vid) = row.map_err(|e| self.ce("read volumes", e))?;
            let (volume, vid) = (name.value().to_string(), vid.value());
            let mut files = on_disk.remove(volume.as_str()).unwrap_or_default();
            // A name outside the rule (a damaged row) gets no manifest folder.
            let valid = VolumeName::new(volume.as_str()).is_ok();
            let mut base = None;
            for row in rps.range((vid, 0u64)..=(vid, u64::MAX)).map_err(|e| self.ce("read rps", e))? {
                let (k, v) = row.map_err(|e| self.ce("read rps", e))?;
                let seq = RpSeq(k.value().1);
                if !files.remove(&seq) && valid {
                    let meta = self.decode_rp_row(&volume, seq, v.value())?;
                    let m = self.manifest_from_catalog(&blocks, &changes, vid, &meta, base)?;
                    manifest::write(&self.manifests_dir, &m)?;
                    written += 1;
                }
                base = Some(seq);
            }
            for seq in files {
                tracing::info!(rp = %rp_name(&volume, seq), "store: removed the manifest of an RP the catalog does not hold (an interrupted commit or prune)");
                manifest::remove(&self.manifests_dir, &volume, seq)?;
                removed += 1;
            }
        }
        for (volume, files) in on_disk {
            for seq in files {
                tracing::info!(rp = %rp_name(&volume, seq), "store: removed the manifest of an RP the catalog does not hold (an interrupted commit)");
                manifest::remove(&self.manifests_dir, &volume, seq)?;
                removed += 1;
            }
        }
        if removed > 0 {
            manifest::sync_dir(&self.manifests_dir)?;
            for entry in fs::read_dir(&self.manifests_dir).map_err(|e| io_error("list manifests", &self.manifests_dir, e))?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    manifest::sync_dir(&entry.path())?;
                }
            }
        }
        if written > 0 {
            tracing::info!(manifests = written, "store: wrote the manifests of RPs committed before manifests existed");
        }
        Ok(())
    }

    fn volume_id(&self, tx: &redb::ReadTransaction, volume: &str) -> Result<Option<u32>, StoreError> {
        let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
        Ok(vols
            .get(volume)
            .map_err(|e| self.ce("read volumes", e))?
            .map(|g| g.value()))
    }

    fn decode_rp_row(&self, volume: &str, seq: RpSeq, bytes: &[u8]) -> Result<RpMeta, StoreError> {
        catalog::decode_rp(bytes).ok_or_else(|| StoreError::CorruptRow {
            what: format!("RP row {}", rp_name(volume, seq)),
        })
    }

    /// Volumes with RPs, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeName>, StoreError> {
        self.guard("listed volumes", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
            let mut out = Vec::new();
            for row in vols.iter().map_err(|e| self.ce("read volumes", e))? {
                let row = row.map_err(|e| self.ce("read volumes", e))?;
                let name = VolumeName::new(row.0.value()).map_err(|e| StoreError::CorruptRow { what: format!("volume row: {e}") })?;
                out.push(name);
            }
            Ok(out)
        })
    }

    /// The RPs of `volume`, oldest first.
    pub fn rps(&self, volume: &str) -> Result<Vec<RpMeta>, StoreError> {
        self.guard("listed RPs", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let Some(vid) = self.volume_id(&tx, volume)? else {
                return Ok(Vec::new());
            };
            let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
            let mut out = Vec::new();
            for row in rps
                .range((vid, 0u64)..=(vid, u64::MAX))
                .map_err(|e| self.ce("read rps", e))?
            {
                let (k, v) = row.map_err(|e| self.ce("read rps", e))?;
                out.push(self.decode_rp_row(volume, RpSeq(k.value().1), v.value())?);
            }
            Ok(out)
        })
    }

    /// `volume@seq`, if committed and not pruned.
    pub fn rp(&self, volume: &str, seq: RpSeq) -> Result<Option<RpMeta>, StoreError> {
        self.guard("read an RP", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let Some(vid) = self.volume_id(&tx, volume)? else {
                return Ok(None);
            };
            let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
            let row = rps.get((vid, seq.0)).map_err(|e| self.ce("read rps", e))?;
            row.map(|v| self.decode_rp_row(volume, seq, v.value())).transpose()
        })
    }

    /// The newest RP of `volume`.
    pub fn latest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError> {
        self.guard("read the newest RP", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let Some(vid) = self.volume_id(&tx, volume)? else {
                return Ok(None);
            };
            let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
            let newest = rps
                .range((vid, 0u64)..=(vid, u64::MAX))
                .map_err(|e| self.ce("read rps", e))?
                .next_back();
            match newest {
                None => Ok(None),
                Some(row) => {
                    let (k, v) = row.map_err(|e| self.ce("read rps", e))?;
                    self.decode_rp_row(volume, RpSeq(k.value().1), v.value()).map(Some)
                }
            }
        })
    }

    /// Paging API over the block map of `volume@seq`: the content ids of blocks
    /// `start .. start + count` (clamped to the RP's `block_count`) in index order, ZERO for
    /// blocks never written or zero. Memory is O(count) whatever the volume size; each block
    /// is one O(log n) reverse range lookup in one read snapshot. Restore walks a volume by
    /// calling it with successive `start`s (e.g. 4096 blocks a page).
    pub fn block_ids(&self, volume: &str, seq: RpSeq, start: u64, count: u64) -> Result<Vec<ContentId>, StoreError> {
        self.guard("read a block map", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let not_found = || StoreError::RpNotFound {
                rp: rp_name(volume, seq),
            };
            let vid = self.volume_id(&tx, volume)?.ok_or_else(not_found)?;
            let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
            let row = rps
                .get((vid, seq.0))
                .map_err(|e| self.ce("read rps", e))?
                .ok_or_else(not_found)?;
            let meta = self.decode_rp_row(volume, seq, row.value())?;
            let end = start.saturating_add(count).min(meta.block_count);
            let blocks = tx.open_table(BLOCKS).map_err(|e| self.ce("open table blocks", e))?;
            let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
            for index in start..end {
                let entry = blocks
                    .range((vid, index, 0u64)..=(vid, index, seq.0))
                    .map_err(|e| self.ce("read block map", e))?
                    .next_back();
                out.push(match entry {
                    Some(row) => ContentId(row.map_err(|e| self.ce("read block map", e))?.1.value()),
                    None => ContentId::ZERO,
                });
            }
            Ok(out)
        })
    }

    /// Where to find `content` (blob id and delta depth), for restore.
    pub fn locate(&self, content: &ContentId) -> Result<Option<BlobLoc>, StoreError> {
        self.guard("located a blob", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
            let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
            let Some(blob) = ctab
                .get(content.0)
                .map_err(|e| self.ce("read contents", e))?
                .map(|g| ContentId(g.value()))
            else {
                return Ok(None);
            };
            let meta = btab
                .get(blob.0)
                .map_err(|e| self.ce("read blobs", e))?
                .and_then(|r| BlobMeta::decode(r.value()));
            Ok(meta.map(|m| BlobLoc { blob, depth: m.depth }))
        })
    }

    /// Reads blob `id` and checks its header and payload checksum; a missing, short or
    /// tampered file is an error naming the blob and its path.
    pub fn read_blob(&self, id: &BlobId) -> Result<EncodedBlob, StoreError> {
        blob_file::read(&self.blobs_dir, id)
    }

    /// [`Store::read_blob`] into `buffer` (its capacity is reused for the payload).
    pub fn read_blob_into(&self, id: &BlobId, buffer: Vec<u8>) -> Result<EncodedBlob, StoreError> {
        blob_file::read_into(&self.blobs_dir, id, buffer)
    }

    /// The path of blob `id`'s file (for diagnostics and tests).
    pub fn blob_path(&self, id: &BlobId) -> PathBuf {
        blob_file::blob_path(&self.blobs_dir, id)
    }

    /// Figures for `drmesh ctl` (walks the blob table: O(blobs)).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        self.guard("counted the store", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
            let mut stats = StoreStats::default();
            for row in btab.iter().map_err(|e| self.ce("read blobs", e))? {
                let (_, v) = row.map_err(|e| self.ce("read blobs", e))?;
                stats.blob_count += 1;
                stats.blob_bytes += BlobMeta::decode(v.value()).map(|m| m.stored_bytes).unwrap_or(0);
            }
            stats.volume_count = tx
                .open_table(VOLUMES)
                .map_err(|e| self.ce("open table volumes", e))?
                .len()
                .map_err(|e| self.ce("count volumes", e))?;
            stats.rp_count = tx
                .open_table(RPS)
                .map_err(|e| self.ce("open table rps", e))?
                .len()
                .map_err(|e| self.ce("count rps", e))?;
            stats.catalog_bytes = fs::metadata(&self.catalog_path).map(|m| m.len()).unwrap_or(0);
            Ok(stats)
        })
    }
}
