//! The store's error type and the mapping of I/O and catalog errors onto it.

use std::io;
use std::path::{Path, PathBuf};

use super::RpSeq;

/// What went wrong in the store, on which object, and why.
///
/// Unless a variant says otherwise, a failed call changed nothing that a later
/// call can observe: blob files written before a failure are either complete
/// and checksummed or temp files that [`super::Store::open`] removes, and catalog
/// changes are all-or-nothing redb transactions.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system holding `path` is full (ENOSPC/EDQUOT). The operation was
    /// abandoned; the catalog still holds its previous state.
    #[error("target disk full while writing {path}")]
    DiskFull {
        /// The file or folder being written.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing ("write blob", "rename", "syncfs", ...).
        op: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The redb catalog failed.
    #[error("catalog {path}: {op}: {source}")]
    Catalog {
        /// What the store was doing.
        op: String,
        /// The catalog file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// A blob file is missing (the catalog is left as it was).
    #[error("blob {blob} missing: {path}")]
    BlobMissing {
        /// Hex id of the blob.
        blob: String,
        /// Where the file should be.
        path: PathBuf,
    },
    /// A blob file exists but is damaged: bad header, short, or checksum mismatch.
    #[error("blob {blob} corrupt ({path}): {cause}")]
    BlobCorrupt {
        /// Hex id of the blob.
        blob: String,
        /// The file.
        path: PathBuf,
        /// What check failed.
        cause: String,
    },
    /// A blob handed to `put_blobs` is inconsistent (ids, flags, base or depth);
    /// nothing of that batch was recorded in the catalog.
    #[error("invalid blob {blob}: {cause}")]
    InvalidBlob {
        /// Hex id of the blob.
        blob: String,
        /// What is wrong.
        cause: String,
    },
    /// A delta's base blob is not in the store nor in the same batch.
    #[error("blob {blob}: base blob {base} is not in the store")]
    MissingBase {
        /// Hex id of the delta.
        blob: String,
        /// Hex id of its missing base.
        base: String,
    },
    /// `commit_rp` refused: a staged block's content is not materializable. Nothing was committed;
    /// the session's staged rows are kept so it can send the missing blob and retry.
    #[error("cannot commit {rp}: block {index} content {content} is not in the store")]
    MissingContent {
        /// `volume@seq`.
        rp: String,
        /// The block index.
        index: u64,
        /// Hex content id.
        content: String,
    },
    /// `commit_rp` refused: `volume@seq` already exists. Nothing changed.
    #[error("cannot commit {rp}: it already exists")]
    RpExists {
        /// `volume@seq`.
        rp: String,
    },
    /// `commit_rp` refused: the volume already has a newer or equal RP. Nothing changed.
    #[error("cannot commit {rp}: seq is not newer than the volume's newest RP {newest}")]
    SeqNotNewer {
        /// `volume@seq`.
        rp: String,
        /// The volume's newest seq.
        newest: RpSeq,
    },
    /// An RP's metadata is inconsistent (e.g. a staged block index beyond `block_count`). Nothing changed.
    #[error("invalid RP {rp}: {cause}")]
    InvalidRp {
        /// `volume@seq`.
        rp: String,
        /// What is wrong.
        cause: String,
    },
    /// No blob here materializes a content an RP references (read side; nothing changed).
    #[error("no blob holds content {content} (missing from the store: run `drmesh store check`)")]
    ContentNotFound {
        /// Hex content id.
        content: String,
    },
    /// A delta chain is longer than any the store writes: its blobs are inconsistent.
    #[error("the delta chain of content {content} does not end after {blobs} blobs (run `drmesh store check`)")]
    ChainTooLong {
        /// Hex content id.
        content: String,
        /// Blobs read before giving up.
        blobs: usize,
    },
    /// No such RP.
    #[error("no RP {rp}")]
    RpNotFound {
        /// `volume@seq`.
        rp: String,
    },
    /// There is no store in `dir` (no catalog), or it is not what a store looks like.
    /// Nothing was created.
    #[error("no drmesh store in {dir}: {cause}")]
    NoStore {
        /// The folder given as the store.
        dir: PathBuf,
        /// What was found instead.
        cause: String,
    },
    /// The store was opened read-only (`drmesh restore` without a node); nothing was written.
    #[error("catalog {path} is open read-only here; writing needs the node that owns it")]
    ReadOnly {
        /// The catalog file.
        path: PathBuf,
    },
    /// The catalog could not be opened because of another process holding it in a
    /// way this one cannot share, or because it needs a repair a reader cannot make.
    /// Nothing was changed.
    #[error("cannot open catalog {path}: {cause}")]
    Unavailable {
        /// The catalog file.
        path: PathBuf,
        /// Why, and what to do.
        cause: String,
    },
    /// The storage engine failed inside the catalog file (it panicked on
    /// damaged data). Nothing more is written to this store in this process
    /// (writes fail with this error); the blob files are not touched.
    #[error("catalog {path} is damaged: the storage engine failed while this node {op} ({detail}); the store takes no more writes until the node restarts on a sound catalog. The blobs and RP manifests are untouched: stop the node, then run `drmesh store check` and `drmesh store rebuild` with its --state-dir")]
    Damaged {
        /// The catalog file.
        path: PathBuf,
        /// What the store was doing ("committed an RP", "read a block map").
        op: String,
        /// The engine's own words.
        detail: String,
    },
    /// An RP manifest is damaged or not a manifest; nothing was changed.
    #[error("manifest {path} is damaged: {cause}")]
    ManifestCorrupt {
        /// The manifest file.
        path: PathBuf,
        /// What check failed.
        cause: String,
    },
    /// The catalog failed its integrity check when the store was opened. Nothing
    /// was written; the blob files and manifests are untouched.
    #[error("catalog {path} is damaged ({detail}). The blobs and RP manifests beside it are untouched: with the node stopped, run `drmesh store check --state-dir {state_dir}` to see what is damaged, then `drmesh store rebuild --state-dir {state_dir}` to make a new catalog from the manifests and blobs (the damaged one is kept aside)")]
    CatalogCorrupt {
        /// The catalog file.
        path: PathBuf,
        /// The node's state dir (for the commands).
        state_dir: PathBuf,
        /// The engine's words.
        detail: String,
    },
    /// The catalog disagrees with what the RP manifests say (found by a check a
    /// write makes first): it is damaged. Nothing was changed, and the store takes
    /// no more writes in this process.
    #[error("catalog {path} is damaged: {what}. Nothing was changed; stop the node, then run `drmesh store check` and `drmesh store rebuild` with its --state-dir")]
    CatalogInconsistent {
        /// The catalog file.
        path: PathBuf,
        /// What disagrees.
        what: String,
    },
    /// The work asked for is running already; nothing was done.
    #[error("{what}")]
    Busy {
        /// What runs, and what to do.
        what: String,
    },
    /// A catalog row could not be decoded (the catalog is damaged or from a newer version).
    #[error("the catalog is damaged: {what} cannot be read. Stop the node, then run `drmesh store check` and `drmesh store rebuild` with its --state-dir")]
    CorruptRow {
        /// Which row.
        what: String,
    },
}

impl StoreError {
    /// Whether this error means the target's disk is full (so the node can say so).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }
}

/// Whether an I/O error means "no space left" (ENOSPC, or EDQUOT which ops see the same way).
pub fn is_no_space(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::StorageFull
        || matches!(err.raw_os_error(), Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT)
}

/// Maps an I/O error on `path` to [`StoreError::DiskFull`] when the disk is full, else [`StoreError::Io`].
pub fn io_error(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    if is_no_space(&source) {
        StoreError::DiskFull {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Whether a redb error was caused by a full disk (an `io::Error` anywhere in its source chain).
fn redb_is_no_space(err: &redb::Error) -> bool {
    if let redb::Error::Io(io) = err {
        return is_no_space(io);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if is_no_space(io) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Maps a redb error on the catalog at `path` to [`StoreError::DiskFull`] or [`StoreError::Catalog`].
pub fn catalog_error(op: impl Into<String>, path: &Path, source: impl Into<redb::Error>) -> StoreError {
    let source = source.into();
    if redb_is_no_space(&source) {
        StoreError::DiskFull {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Catalog {
            op: op.into(),
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }
}

/// Maps a failed open of the catalog at `path` to an error that says what to do.
pub fn open_error(path: &Path, source: redb::DatabaseError) -> StoreError {
    let cause = match &source {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            "another process holds it exclusively (a drmesh node of an older version, or another tool); stop that process, or use its admin socket"
        }
        redb::DatabaseError::LockProtocolMismatch => {
            "a process running another drmesh version holds it; use that version's binary, or stop it first"
        }
        redb::DatabaseError::RepairAborted => {
            "it was not closed cleanly and needs a repair that only a writer can make: start the node on this state dir once (it repairs the catalog at start), or restore from a copy of the state dir"
        }
        redb::DatabaseError::UpgradeRequired(_) => "it was written in an older catalog format that this drmesh cannot read",
        _ => "",
    };
    if cause.is_empty() {
        catalog_error("open", path, source)
    } else {
        StoreError::Unavailable { path: path.to_path_buf(), cause: cause.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_small() {
        // Callers pass StoreError through closures and channels; keep it cheap to move.
        assert!(std::mem::size_of::<StoreError>() <= 96, "{}", std::mem::size_of::<StoreError>());
    }

    #[test]
    fn enospc_maps_to_disk_full() {
        let path = Path::new("/srv/drmesh/blobs/ab/cd/x");
        let err = io_error("write blob", path, io::Error::from_raw_os_error(nix::libc::ENOSPC));
        assert!(err.is_disk_full(), "{err}");
        assert_eq!(
            err.to_string(),
            "target disk full while writing /srv/drmesh/blobs/ab/cd/x"
        );
        let err = io_error("write blob", path, io::Error::from_raw_os_error(nix::libc::EDQUOT));
        assert!(err.is_disk_full());
        let err = io_error("write blob", path, io::Error::from_raw_os_error(nix::libc::EACCES));
        assert!(!err.is_disk_full());
        assert!(
            err.to_string().contains("write blob /srv/drmesh/blobs/ab/cd/x"),
            "{err}"
        );
    }

    #[test]
    fn catalog_enospc_maps_to_disk_full() {
        let path = Path::new("/srv/drmesh/catalog.redb");
        let err = catalog_error(
            "commit",
            path,
            redb::Error::Io(io::Error::from_raw_os_error(nix::libc::ENOSPC)),
        );
        assert!(err.is_disk_full(), "{err}");
        let storage = redb::StorageError::from(redb::BackendError::Io(io::Error::from_raw_os_error(nix::libc::ENOSPC)));
        let err = catalog_error("commit", path, storage);
        assert!(err.is_disk_full(), "{err}");
        let err = catalog_error("commit", path, redb::Error::Corrupted("x".into()));
        assert!(!err.is_disk_full());
        assert!(
            err.to_string().contains("catalog /srv/drmesh/catalog.redb: commit"),
            "{err}"
        );
    }
}
