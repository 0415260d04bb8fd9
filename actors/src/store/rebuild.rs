//! `drmesh store rebuild`: a new catalog from the RP manifests and the blob
//! files alone, for a store whose catalog is damaged or lost.
//!
//! 1. Every blob file's header is read and checked (one 256-byte read each);
//!    blobs with a sound header become the `blobs` and `contents` rows
//!    (the shallowest blob per content, delta chains only when whole).
//! 2. Every manifest is read and checked. Per volume, in seq order, an RP is
//!    listed when its base is listed (or it has none) and the block map its
//!    changes make has the manifest's Merkle root; otherwise it is refused and
//!    its manifest renamed `<seq>.rpm.refused` (kept, never read again).
//! 3. Drill reports are copied from the old catalog where it can still be read.
//! 4. The new catalog is written beside the old one, made durable, and renamed
//!    into place; the old one is kept as `catalog.redb.damaged-<unix seconds>`.
//!
//! An interruption before step 4 leaves the old catalog in place and a partial
//! `catalog.redb.rebuild` that the next rebuild replaces.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{Builder, ConcurrencyMode, ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::catalog::{BlobMeta, BLOBS, BLOCKS, CONTENTS, DRILLS, META, NEXT_VOLUME_ID, RPS, RP_CHANGES, VOLUMES};
use super::error::{catalog_error, io_error, open_error};
use super::manifest::{self, Manifest};
use super::{blob_file, catch_engine, now_unix_ms, RpSeq, Store, StoreError, VolumeName};
use crate::content::{BlobId, ContentId, MerkleBuilder};

/// One thing a check or rebuild found wrong, for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What it is about (`vol@3`, a blob id, a file).
    pub object: String,
    /// What is wrong with it, and what follows.
    pub problem: String,
}

/// An RP the rebuilt catalog lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RebuiltRp {
    /// `volume@seq`.
    pub rp: String,
    /// Its Merkle root (hex), as recomputed from the rebuilt block map.
    pub merkle_root: String,
    /// Blocks of its block map whose content has no (whole) blob here:
    /// a restore of this RP fails on them until they are repaired.
    pub missing_blocks: u64,
}

/// What `store rebuild` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    /// RPs listed in the new catalog, by volume and seq.
    pub rps: Vec<RebuiltRp>,
    /// Manifests whose RPs are not listed, and why.
    pub refused: Vec<Finding>,
    /// Blob files with a sound header.
    pub blobs: u64,
    /// Blob files left out (damaged header, wrong name), and why.
    pub damaged_blobs: Vec<Finding>,
    /// Drill reports carried over from the old catalog.
    pub drill_reports: u64,
    /// Where the old catalog was kept (none when there was none).
    pub kept_aside: Option<PathBuf>,
    /// Wall time.
    pub duration_ms: u64,
}

/// Makes `dir/catalog.redb` anew from `dir/manifests` and `dir/blobs`; see the
/// module doc. No node may run on the store (the caller checks). `progress`
/// gets a line for people at each step.
pub fn rebuild(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<RebuildReport, StoreError> {
    let started = Instant::now();
    let blobs_dir = dir.join("blobs");
    let manifests_dir = dir.join("manifests");
    if !blobs_dir.is_dir() && !manifests_dir.is_dir() {
        return Err(StoreError::NoStore {
            dir: dir.to_path_buf(),
            cause: "it holds neither blobs/ nor manifests/ (is this a target node's store folder, <state dir>/store?)".into(),
        });
    }
    // Blobs but not one manifest: nothing to list RPs from (a store written before
    // manifests existed, or manifests/ removed). Replacing the catalog by an empty
    // one would hide every RP: refuse, changing nothing.
    if manifest::list(&manifests_dir, false)?.is_empty() && any_blob(&blobs_dir)? {
        return Err(StoreError::NoStore {
            dir: dir.to_path_buf(),
            cause: format!(
                "it holds blobs but no RP manifest in {}: a rebuild would list no RP, so nothing was changed. A store written by a drmesh without manifests gets them when its node starts once on a sound catalog; with a damaged one, put back a copy of catalog.redb",
                manifests_dir.display()
            ),
        });
    }
    let catalog_path = dir.join("catalog.redb");
    let new_path = dir.join("catalog.redb.rebuild");
    match fs::remove_file(&new_path) {
        Ok(()) => progress("removed the partial catalog of an interrupted rebuild"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove", &new_path, e)),
    }
    let db = Builder::new()
        .set_concurrency_mode(ConcurrencyMode::SingleWriter)
        .set_cache_size(super::CATALOG_CACHE_BYTES)
        .create(&new_path)
        .map_err(|e| open_error(&new_path, e))?;
    let ce = |op: &str, e: redb::Error| catalog_error(op, &new_path, e);
    let mut report = RebuildReport::default();

    // 1. Blobs.
    let tx = db.begin_write().map_err(|e| ce("begin write", e.into()))?;
    {
        let mut btab = tx.open_table(BLOBS).map_err(|e| ce("open table blobs", e.into()))?;
        let now = now_unix_ms();
        if blobs_dir.is_dir() {
            blob_file::for_each_file(&blobs_dir, &mut |path, name| {
                if name.starts_with(blob_file::TEMP_PREFIX) {
                    return Ok(());
                }
                let Some(id) = ContentId::from_hex(name) else {
                    report.damaged_blobs.push(Finding { object: path.display().to_string(), problem: "not a blob file name (left as it is)".into() });
                    return Ok(());
                };
                match blob_file::read_header(&blobs_dir, &id) {
                    Ok(h) => {
                        let meta = BlobMeta {
                            content: h.content,
                            base: h.base,
                            depth: h.depth,
                            flags: h.flags,
                            stored_bytes: blob_file::HEADER_BYTES as u64 + h.payload_len,
                            stored_unix_ms: now,
                        };
                        btab.insert(id.0, meta.encode().as_slice()).map_err(|e| ce("record blob", e.into()))?;
                        report.blobs += 1;
                        if report.blobs % 100_000 == 0 {
                            progress(&format!("blobs: {} headers read", report.blobs));
                        }
                    }
                    Err(e) => report.damaged_blobs.push(Finding { object: id.to_hex(), problem: e.to_string() }),
                }
                Ok(())
            })?;
        }
        progress(&format!("blobs: {} headers read, {} damaged", report.blobs, report.damaged_blobs.len()));
        // Contents: the shallowest blob whose whole chain is here.
        let mut best: HashMap<ContentId, (u8, BlobId)> = HashMap::new();
        for row in btab.iter().map_err(|e| ce("read blobs", e.into()))? {
            let (k, v) = row.map_err(|e| ce("read blobs", e.into()))?;
            let Some(meta) = BlobMeta::decode(v.value()) else { continue };
            let id = ContentId(k.value());
            if super::chain_of(&btab, &id).map_err(|e| ce("read blobs", e))?.is_none() {
                continue;
            }
            let better = best.get(&meta.content).is_none_or(|(d, b)| (meta.depth, id.0) < (*d, b.0));
            if better {
                best.insert(meta.content, (meta.depth, id));
            }
        }
        let mut ctab = tx.open_table(CONTENTS).map_err(|e| ce("open table contents", e.into()))?;
        for (content, (_, blob)) in best {
            ctab.insert(content.0, blob.0).map_err(|e| ce("record content", e.into()))?;
        }
    }

    // 2. Manifests, per volume in seq order.
    let mut by_volume: BTreeMap<VolumeName, Vec<(RpSeq, PathBuf)>> = BTreeMap::new();
    for (volume, seq, path) in manifest::list(&manifests_dir, true)? {
        by_volume.entry(volume).or_default().push((seq, path));
    }
    let refuse = |report: &mut RebuildReport, path: &Path, object: String, problem: String| {
        let aside = PathBuf::from(format!("{}.refused", path.display()));
        let problem = match fs::rename(path, &aside) {
            Ok(()) => format!("{problem}; its manifest is kept as {}", aside.display()),
            Err(e) => format!("{problem}; its manifest could not be set aside ({e})"),
        };
        report.refused.push(Finding { object, problem });
    };
    let mut accepted: Vec<(VolumeName, RpSeq)> = Vec::new();
    {
        let ctab = tx.open_table(CONTENTS).map_err(|e| ce("open table contents", e.into()))?;
        let mut vols = tx.open_table(VOLUMES).map_err(|e| ce("open table volumes", e.into()))?;
        let mut rps = tx.open_table(RPS).map_err(|e| ce("open table rps", e.into()))?;
        let mut blocks = tx.open_table(BLOCKS).map_err(|e| ce("open table blocks", e.into()))?;
        let mut changes = tx.open_table(RP_CHANGES).map_err(|e| ce("open table rp_changes", e.into()))?;
        let mut next_vid = 1u32;
        for (volume, files) in &by_volume {
            // The volume's block map as the listed RPs so far make it: the catalog's
            // rule (block i at RP n is the entry of the greatest listed seq <= n),
            // never shrunk, of which an RP sees its first block_count blocks.
            let mut map: Vec<ContentId> = Vec::new();
            let mut missing: HashMap<ContentId, bool> = HashMap::new();
            let mut listed: HashSet<RpSeq> = HashSet::new();
            let mut vid = None;
            for (seq, path) in files {
                let object = format!("{volume}@{seq}");
                let m: Manifest = match manifest::read(path) {
                    Ok(m) => m,
                    Err(e) => {
                        refuse(&mut report, path, object, e.to_string());
                        continue;
                    }
                };
                if m.meta.volume != *volume {
                    refuse(&mut report, path, object, format!("it describes {} but sits in the folder of {volume}", m.meta.name()));
                    continue;
                }
                if let Some(base) = m.base_seq.filter(|b| !listed.contains(b)) {
                    refuse(&mut report, path, object, format!("its changes are against {volume}@{base}, which is not listed (no sound manifest)"));
                    continue;
                }
                let Ok(count) = usize::try_from(m.meta.block_count) else {
                    refuse(&mut report, path, object, "its block count does not fit in memory".into());
                    continue;
                };
                if map.len() < count {
                    map.resize(count, ContentId::ZERO);
                }
                // Apply the changes, remembering the old values to undo a refusal.
                let mut undo = Vec::with_capacity(m.changes.len());
                for (index, content) in &m.changes {
                    let slot = &mut map[*index as usize];
                    undo.push((*index, *slot));
                    *slot = *content;
                }
                let mut merkle = MerkleBuilder::new();
                let mut missing_blocks = 0u64;
                for c in &map[..count] {
                    merkle.push(c);
                    if !c.is_zero() {
                        let gone = match missing.get(c) {
                            Some(m) => *m,
                            None => {
                                let m = ctab.get(c.0).map_err(|e| ce("read contents", e.into()))?.is_none();
                                missing.insert(*c, m);
                                m
                            }
                        };
                        missing_blocks += u64::from(gone);
                    }
                }
                let root = merkle.finish();
                if root != m.meta.merkle_root {
                    for (index, old) in undo.into_iter().rev() {
                        map[index as usize] = old;
                    }
                    refuse(&mut report, path, object, "the block map its changes make does not have its Merkle root".into());
                    continue;
                }
                let vid = *vid.get_or_insert_with(|| {
                    next_vid += 1;
                    next_vid - 1
                });
                vols.insert(volume.as_str(), vid).map_err(|e| ce("write volumes", e.into()))?;
                rps.insert((vid, m.meta.seq.0), super::catalog::encode_rp(&m.meta).as_slice())
                    .map_err(|e| ce("write rp", e.into()))?;
                for (index, content) in &m.changes {
                    blocks.insert((vid, *index, m.meta.seq.0), content.0).map_err(|e| ce("write block map", e.into()))?;
                    changes.insert((vid, m.meta.seq.0, *index), ()).map_err(|e| ce("write block map", e.into()))?;
                }
                listed.insert(m.meta.seq);
                accepted.push((volume.clone(), m.meta.seq));
                report.rps.push(RebuiltRp { rp: object, merkle_root: root.to_hex(), missing_blocks });
            }
            progress(&format!("{volume}: {} RPs listed", listed.len()));
        }
        let mut meta = tx.open_table(META).map_err(|e| ce("open table meta", e.into()))?;
        meta.insert(NEXT_VOLUME_ID, u64::from(next_vid)).map_err(|e| ce("write meta", e.into()))?;
    }
    // 3. Drill reports, where the old catalog can still be read.
    {
        let mut drills = tx.open_table(DRILLS).map_err(|e| ce("open table drills", e.into()))?;
        let vols = tx.open_table(VOLUMES).map_err(|e| ce("open table volumes", e.into()))?;
        let mut new_vid: HashMap<String, u32> = HashMap::new();
        for row in vols.iter().map_err(|e| ce("read volumes", e.into()))? {
            let (k, v) = row.map_err(|e| ce("read volumes", e.into()))?;
            new_vid.insert(k.value().to_string(), v.value());
        }
        let wanted: HashSet<(String, RpSeq)> = accepted.into_iter().map(|(v, s)| (v.into_string(), s)).collect();
        match old_drill_reports(&catalog_path) {
            Ok(rows) => {
                for (volume, seq, finished, bytes) in rows {
                    let Some(vid) = new_vid.get(&volume).filter(|_| wanted.contains(&(volume.clone(), RpSeq(seq)))) else { continue };
                    drills.insert((*vid, seq, finished), bytes.as_slice()).map_err(|e| ce("write drill report", e.into()))?;
                    report.drill_reports += 1;
                }
            }
            Err(why) => progress(&format!("drill reports: none carried over, the old catalog cannot be read ({why})")),
        }
    }
    tx.commit().map_err(|e| ce("commit the rebuilt catalog", e.into()))?;
    drop(db);

    // 4. Swap.
    if catalog_path.exists() {
        // Never over an older catalog kept aside (two rebuilds in one second).
        let stamp = now_unix_ms() / 1000;
        let aside = (0..)
            .map(|n| dir.join(if n == 0 { format!("catalog.redb.damaged-{stamp}") } else { format!("catalog.redb.damaged-{stamp}.{n}") }))
            .find(|p| fs::symlink_metadata(p).is_err())
            .expect("an unused name");
        fs::rename(&catalog_path, &aside).map_err(|e| io_error("keep the old catalog aside as", &aside, e))?;
        report.kept_aside = Some(aside);
    }
    fs::rename(&new_path, &catalog_path).map_err(|e| io_error("put the rebuilt catalog in place at", &catalog_path, e))?;
    let staging = dir.join("staging.redb");
    if let Err(e) = fs::remove_file(&staging) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io_error("remove", &staging, e));
        }
    }
    manifest::sync_dir(dir)?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Whether any blob file is under `blobs_dir`.
fn any_blob(blobs_dir: &Path) -> Result<bool, StoreError> {
    if !blobs_dir.is_dir() {
        return Ok(false);
    }
    let mut found = false;
    blob_file::for_each_file(blobs_dir, &mut |_, name| {
        found |= ContentId::from_hex(name).is_some();
        Ok(())
    })?;
    Ok(found)
}


/// A drill report row: volume, seq, finished unix ms, row bytes.
type DrillRow = (String, u64, u64, Vec<u8>);

/// Every drill report row of the catalog at `path`, read from a private copy
/// with every engine failure caught.
fn old_drill_reports(path: &Path) -> Result<Vec<DrillRow>, StoreError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read = || -> Result<Vec<DrillRow>, StoreError> {
        let db = Store::private_copy(path, false)?;
        let ce = |op: &str, e: redb::Error| catalog_error(op, path, e);
        let tx = db.begin_read().map_err(|e| ce("begin read", e.into()))?;
        let vols = tx.open_table(VOLUMES).map_err(|e| ce("open table volumes", e.into()))?;
        let mut names = HashMap::new();
        for row in vols.iter().map_err(|e| ce("read volumes", e.into()))? {
            let (k, v) = row.map_err(|e| ce("read volumes", e.into()))?;
            names.insert(v.value(), k.value().to_string());
        }
        let drills = tx.open_table(DRILLS).map_err(|e| ce("open table drills", e.into()))?;
        let mut out = Vec::new();
        for row in drills.iter().map_err(|e| ce("read drills", e.into()))? {
            let (k, v) = row.map_err(|e| ce("read drills", e.into()))?;
            let (vid, seq, finished) = k.value();
            if let Some(name) = names.get(&vid) {
                out.push((name.clone(), seq, finished, v.value().to_vec()));
            }
        }
        Ok(out)
    };
    catch_engine(path, "read the old catalog's drill reports", read)
}
