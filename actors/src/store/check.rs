//! `drmesh store check`: what of a store is sound, read-only.
//!
//! - The catalog: every page checksum, on a private copy (the file itself is
//!   not written), then its rows decoded.
//! - Manifests against the catalog: each listed RP has a sound manifest with the
//!   same fields and (when both are against the same base) the same changes;
//!   a manifest of an RP the catalog does not hold is named.
//! - Blobs: every blob row has a file whose header is sound and agrees with the
//!   row; every content of every block map has a blob. Payloads are not read
//!   (that is a scrub's work); files without rows are counted (GC removes them).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::catalog::{decode_rp, BlobMeta, BLOBS, BLOCKS, CONTENTS, RPS, RP_CHANGES, VOLUMES};
use super::error::{catalog_error, io_error};
use super::manifest;
use super::rebuild::Finding;
use super::{blob_file, catch_engine, RpSeq, StoreError};
use crate::content::ContentId;

/// Most findings listed one by one; the rest are counted.
pub const MAX_FINDINGS: usize = 100;

/// What `store check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Whether the catalog passed its integrity check and every row decoded.
    pub catalog_sound: bool,
    /// RPs the catalog lists.
    pub rps: u64,
    /// Manifest files.
    pub manifests: u64,
    /// Blob rows in the catalog.
    pub blobs: u64,
    /// Blob files without a catalog row (GC removes them).
    pub orphan_blob_files: u64,
    /// Problems, the first [`MAX_FINDINGS`] of them.
    pub findings: Vec<Finding>,
    /// Problems beyond those listed.
    pub more_findings: u64,
    /// Wall time.
    pub duration_ms: u64,
}

impl CheckReport {
    /// Whether nothing was found wrong.
    pub fn is_sound(&self) -> bool {
        self.catalog_sound && self.findings.is_empty()
    }

    fn find(&mut self, object: impl Into<String>, problem: impl Into<String>) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(Finding { object: object.into(), problem: problem.into() });
        } else {
            self.more_findings += 1;
        }
    }
}

/// Checks the store in `dir` without writing to it; see the module doc.
/// `progress` gets a line for people at each step.
pub fn check(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<CheckReport, StoreError> {
    let started = Instant::now();
    let catalog_path = dir.join("catalog.redb");
    let blobs_dir = dir.join("blobs");
    let manifests_dir = dir.join("manifests");
    let mut report = CheckReport::default();
    let manifests = manifest::list(&manifests_dir, false)?;
    report.manifests = manifests.len() as u64;
    let mut manifest_paths: BTreeMap<(String, RpSeq), std::path::PathBuf> =
        manifests.into_iter().map(|(v, s, p)| ((v.into_string(), s), p)).collect();

    let catalog = match std::fs::symlink_metadata(&catalog_path) {
        Ok(m) if m.is_file() => catch_engine(&catalog_path, "checked the catalog", || {
            let db = super::Store::private_copy(&catalog_path, true)?;
            read_catalog(&db, &catalog_path)
        }),
        Ok(_) => Err(StoreError::NoStore { dir: dir.to_path_buf(), cause: format!("{} is not a regular file", catalog_path.display()) }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !blobs_dir.is_dir() && !manifests_dir.is_dir() {
                return Err(StoreError::NoStore { dir: dir.to_path_buf(), cause: "it holds no catalog.redb, blobs/ or manifests/ (is this a target node's store folder, <state dir>/store?)".into() });
            }
            Err(StoreError::NoStore { dir: dir.to_path_buf(), cause: "missing".into() })
        }
        Err(e) => return Err(io_error("open catalog", &catalog_path, e)),
    };
    let catalog = match catalog {
        Ok(c) => {
            report.catalog_sound = true;
            progress(&format!("catalog: sound ({} RPs, {} blob rows)", c.rps.len(), c.blobs.len()));
            Some(c)
        }
        Err(e) => {
            let state = match e {
                StoreError::NoStore { .. } => "missing".to_string(),
                StoreError::Damaged { detail, .. } => format!("damaged: the storage engine failed on it: {detail}"),
                StoreError::Catalog { source, .. } => format!("damaged: {source}"),
                other => format!("damaged: {other}"),
            };
            report.find("catalog.redb", format!("{state}; `drmesh store rebuild` makes a new one from the manifests and blobs"));
            progress("catalog: damaged");
            None
        }
    };

    if let Some(c) = &catalog {
        report.rps = c.rps.len() as u64;
        // Manifests against the catalog.
        let mut previous: HashMap<&str, RpSeq> = HashMap::new();
        for ((volume, seq), (meta, changes)) in &c.rps {
            let name = format!("{volume}@{seq}");
            let base = previous.insert(volume.as_str(), *seq);
            let Some(path) = manifest_paths.remove(&(volume.clone(), *seq)) else {
                report.find(&name, "listed in the catalog but has no manifest (the node writes it at its next start)");
                continue;
            };
            match manifest::read(&path) {
                Err(e) => report.find(&name, e.to_string()),
                Ok(m) if m.meta != *meta => report.find(&name, format!("manifest {} disagrees with the catalog row", path.display())),
                Ok(m) if m.base_seq == base && m.changes != *changes => {
                    report.find(&name, format!("manifest {} lists other block changes than the catalog", path.display()))
                }
                Ok(_) => {}
            }
        }
        for ((volume, seq), path) in &manifest_paths {
            report.find(format!("{volume}@{seq}"), format!("manifest {} is of an RP the catalog does not hold (an interrupted commit or prune: the node removes it at its next start; `drmesh store rebuild` would list it)", path.display()));
        }
        progress(&format!("manifests: {} checked against the catalog", report.manifests));
        // Blob rows against their files.
        report.blobs = c.blobs.len() as u64;
        for (id, meta) in &c.blobs {
            match blob_file::read_header(&blobs_dir, id) {
                Ok(h) if (h.content, h.base, h.depth) != (meta.content, meta.base, meta.depth) => {
                    report.find(id.to_hex(), "blob file header disagrees with its catalog row")
                }
                Ok(_) => {}
                Err(e) => report.find(id.to_hex(), e.to_string()),
            }
        }
        for (volume, seq, index, content) in &c.unmaterializable {
            report.find(format!("{volume}@{seq}"), format!("block {index}: content {} has no blob in the store", content.to_hex()));
        }
        if blobs_dir.is_dir() {
            blob_file::for_each_file(&blobs_dir, &mut |_, name| {
                if let Some(id) = ContentId::from_hex(name) {
                    if !c.blobs.contains_key(&id) {
                        report.orphan_blob_files += 1;
                    }
                }
                Ok(())
            })?;
        }
        progress(&format!("blobs: {} headers checked, {} files without rows", report.blobs, report.orphan_blob_files));
    } else {
        // Without a catalog: every manifest and blob header on its own.
        for ((volume, seq), path) in &manifest_paths {
            if let Err(e) = manifest::read(path) {
                report.find(format!("{volume}@{seq}"), e.to_string());
            }
        }
        if blobs_dir.is_dir() {
            let mut headers = 0u64;
            blob_file::for_each_file(&blobs_dir, &mut |path, name| {
                match ContentId::from_hex(name) {
                    Some(id) => {
                        headers += 1;
                        if let Err(e) = blob_file::read_header(&blobs_dir, &id) {
                            report.find(id.to_hex(), e.to_string());
                        }
                    }
                    None if name.starts_with(blob_file::TEMP_PREFIX) => {}
                    None => report.find(path.display().to_string(), "not a blob file name"),
                }
                Ok(())
            })?;
            report.blobs = headers;
        }
        progress(&format!("manifests and blob headers: {} and {} read", report.manifests, report.blobs));
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// An RP's catalog row and its block changes.
type RpRows = (super::RpMeta, Vec<(u64, ContentId)>);

/// The catalog rows `check` compares.
struct CatalogView {
    /// (volume, seq) → the RP's rows.
    rps: BTreeMap<(String, RpSeq), RpRows>,
    blobs: HashMap<ContentId, BlobMeta>,
    /// Block-map entries whose content has no blob: (volume, seq, index, content).
    unmaterializable: Vec<(String, RpSeq, u64, ContentId)>,
}

fn read_catalog(db: &redb::Database, path: &Path) -> Result<CatalogView, StoreError> {
    let ce = |op: &str, e: redb::Error| catalog_error(op, path, e);
    let corrupt = |what: String| StoreError::CorruptRow { what };
    let tx = db.begin_read().map_err(|e| ce("begin read", e.into()))?;
    let vols = tx.open_table(VOLUMES).map_err(|e| ce("open table volumes", e.into()))?;
    let rps = tx.open_table(RPS).map_err(|e| ce("open table rps", e.into()))?;
    let blocks = tx.open_table(BLOCKS).map_err(|e| ce("open table blocks", e.into()))?;
    let changes = tx.open_table(RP_CHANGES).map_err(|e| ce("open table rp_changes", e.into()))?;
    let ctab = tx.open_table(CONTENTS).map_err(|e| ce("open table contents", e.into()))?;
    let btab = tx.open_table(BLOBS).map_err(|e| ce("open table blobs", e.into()))?;
    let mut view = CatalogView { rps: BTreeMap::new(), blobs: HashMap::new(), unmaterializable: Vec::new() };
    for row in btab.iter().map_err(|e| ce("read blobs", e.into()))? {
        let (k, v) = row.map_err(|e| ce("read blobs", e.into()))?;
        let id = ContentId(k.value());
        let meta = BlobMeta::decode(v.value()).ok_or_else(|| corrupt(format!("blob row {}", id.to_hex())))?;
        view.blobs.insert(id, meta);
    }
    let mut materializable: HashMap<ContentId, bool> = HashMap::new();
    for row in vols.iter().map_err(|e| ce("read volumes", e.into()))? {
        let (name, vid) = row.map_err(|e| ce("read volumes", e.into()))?;
        let (volume, vid) = (name.value().to_string(), vid.value());
        for row in rps.range((vid, 0u64)..=(vid, u64::MAX)).map_err(|e| ce("read rps", e.into()))? {
            let (k, v) = row.map_err(|e| ce("read rps", e.into()))?;
            let seq = k.value().1;
            let meta = decode_rp(v.value()).ok_or_else(|| corrupt(format!("RP row {volume}@{seq}")))?;
            let mut list = Vec::new();
            for c in changes.range((vid, seq, 0u64)..=(vid, seq, u64::MAX)).map_err(|e| ce("read rp_changes", e.into()))? {
                let index = c.map_err(|e| ce("read rp_changes", e.into()))?.0.value().2;
                let content = blocks
                    .get((vid, index, seq))
                    .map_err(|e| ce("read block map", e.into()))?
                    .ok_or_else(|| corrupt(format!("block {index} of {volume}@{seq}'s block map (listed but absent)")))?
                    .value();
                let content = ContentId(content);
                if !content.is_zero() {
                    let ok = match materializable.get(&content) {
                        Some(ok) => *ok,
                        None => {
                            let ok = match ctab.get(content.0).map_err(|e| ce("read contents", e.into()))? {
                                Some(blob) => super::chain_of(&btab, &ContentId(blob.value())).map_err(|e| ce("read blobs", e))?.is_some(),
                                None => false,
                            };
                            materializable.insert(content, ok);
                            ok
                        }
                    };
                    if !ok {
                        view.unmaterializable.push((volume.clone(), RpSeq(seq), index, content));
                    }
                }
                list.push((index, content));
            }
            if meta.volume != volume || meta.seq != RpSeq(seq) {
                return Err(corrupt(format!("RP row {volume}@{seq} (it names {})", meta.name())));
            }
            view.rps.insert((volume.clone(), RpSeq(seq)), (meta, list));
        }
    }
    Ok(view)
}
