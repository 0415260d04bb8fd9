//! Retention (prune) and mark-and-sweep GC. The safety argument is in the module doc of
//! [`super`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use redb::{ReadableTable, ReadableTableMetadata};

use super::catalog::{BlobMeta, BLOBS, BLOCKS, CONTENTS, DRILLS, RPS, RP_CHANGES, SCRUBS, VOLUMES};
use super::error::{io_error, StoreError};
use super::retention::{select_keep, unchanged_predecessors, Retention};
use super::{blob_file, lock, manifest, now_unix_ms, GcReport, RpSeq, Store, VolumeName};
use crate::content::{BlobId, ContentId};

/// Resets the GC flag and its extra pins however the run ends.
struct GcRunning<'a>(&'a Store);

impl Drop for GcRunning<'_> {
    fn drop(&mut self) {
        let mut pins = lock(&self.0.pins);
        pins.gc_running = false;
        pins.gc_extra.clear();
    }
}

/// Adds to `set` the base chains (via catalog rows) of every id in `roots`.
fn close_over_bases(
    blobs: &impl ReadableTable<[u8; 32], &'static [u8]>,
    roots: impl IntoIterator<Item = BlobId>,
    set: &mut HashSet<BlobId>,
) -> Result<(), redb::Error> {
    for root in roots {
        let mut cur = root;
        // `insert` returning false means the rest of the chain is already in the set.
        while set.insert(cur) {
            let Some(row) = blobs.get(cur.0)? else { break };
            match BlobMeta::decode(row.value()).and_then(|m| m.base) {
                Some(base) => cur = base,
                None => break,
            }
        }
    }
    Ok(())
}

/// How often (in items of a phase) a GC reports its progress.
const PROGRESS_EVERY: usize = 4096;

/// How far a garbage collection is ([`Store::gc_with_progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GcProgress {
    /// `marking` (the block maps of kept RPs), `scanning blob files`, `deleting`.
    pub phase: &'static str,
    /// Items of the phase done.
    pub done: u64,
    /// Items of the phase in all (the catalog's count for the blob files).
    pub total: u64,
}

/// The outcome of [`Store::select_retained`].
struct Selection {
    /// Every RP of the volume: (seq, time in Unix ms), ascending.
    all: Vec<(u64, u64)>,
    /// The seqs kept.
    keep: std::collections::BTreeSet<u64>,
    /// The newest verified RP, when only that rule keeps it.
    verified_beyond: Option<u64>,
}

/// What retention would do to one volume now ([`Store::prune_dry_run`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionPlan {
    /// RPs it keeps, ascending.
    pub kept: Vec<RpSeq>,
    /// RPs it would delete, ascending.
    pub would_delete: Vec<RpSeq>,
    /// The newest verified RP, kept beyond the rules as the last known-good.
    pub kept_as_last_known_good: Option<RpSeq>,
}

struct Candidate {
    path: PathBuf,
    file_bytes: Option<u64>,
    age: Option<Duration>,
}

impl Store {
    /// Applies `retention` to `volume`'s RPs at `now_unix_ms` and returns the deleted seqs
    /// (ascending). Always keeps the newest RP (see [`select_keep`] for the selection)
    /// and the newest verified one (its newest drill passed every check of its policy).
    /// One durable transaction; O(changed blocks of the deleted RPs). The block-map rule is
    /// in the module doc of [`super`]. Blobs are freed later by [`Store::gc`].
    pub fn prune(&self, volume: &str, retention: &Retention, now_unix_ms: u64) -> Result<Vec<RpSeq>, StoreError> {
        self.guard("applied retention", || {
            let _w = lock(&self.writer);
            let tx = self.begin_write("begin write")?;
            let mut deleted = Vec::new();
            let verified;
            {
                let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
                let Some(vid) = vols
                    .get(volume)
                    .map_err(|e| self.ce("read volumes", e))?
                    .map(|g| g.value())
                else {
                    return Ok(Vec::new());
                };
                let mut rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
                let mut drills = tx.open_table(DRILLS).map_err(|e| self.ce("open table drills", e))?;
                let mut scrubs = tx.open_table(SCRUBS).map_err(|e| self.ce("open table scrubs", e))?;
                let selection = self.select_retained(volume, vid, &rps, &drills, retention, now_unix_ms)?;
                let (all, keep) = (selection.all, selection.keep);
                verified = selection.verified_beyond;
                let mut blocks = tx.open_table(BLOCKS).map_err(|e| self.ce("open table blocks", e))?;
                let mut changes = tx
                    .open_table(RP_CHANGES)
                    .map_err(|e| self.ce("open table rp_changes", e))?;
                for &(d, _) in all.iter().filter(|(s, _)| !keep.contains(s)) {
                    let next = keep.range(d + 1..).next().copied();
                    let mut indexes = Vec::new();
                    for row in changes
                        .range((vid, d, 0u64)..=(vid, d, u64::MAX))
                        .map_err(|e| self.ce("read rp_changes", e))?
                    {
                        indexes.push(row.map_err(|e| self.ce("read rp_changes", e))?.0.value().2);
                    }
                    for i in indexes {
                        changes
                            .remove((vid, d, i))
                            .map_err(|e| self.ce("prune rp_changes", e))?;
                        let Some(content) = blocks
                            .remove((vid, i, d))
                            .map_err(|e| self.ce("prune block map", e))?
                            .map(|g| g.value())
                        else {
                            continue;
                        };
                        let Some(n) = next else { continue };
                        let shadowed = blocks
                            .range((vid, i, d + 1)..=(vid, i, n))
                            .map_err(|e| self.ce("read block map", e))?
                            .next()
                            .is_some();
                        if shadowed {
                            continue;
                        }
                        blocks
                            .insert((vid, i, n), content)
                            .map_err(|e| self.ce("re-key block map", e))?;
                        changes
                            .insert((vid, n, i), ())
                            .map_err(|e| self.ce("re-key block map", e))?;
                    }
                    rps.remove((vid, d)).map_err(|e| self.ce("delete rp", e))?;
                    scrubs.remove((vid, d)).map_err(|e| self.ce("delete scrub result", e))?;
                    let mut reports = Vec::new();
                    for row in drills.range((vid, d, 0u64)..=(vid, d, u64::MAX)).map_err(|e| self.ce("read drills", e))? {
                        reports.push(row.map_err(|e| self.ce("read drills", e))?.0.value());
                    }
                    for k in reports {
                        drills.remove(k).map_err(|e| self.ce("delete drill report", e))?;
                    }
                    deleted.push(d);
                }
                // Each retained RP right after deleted ones inherited their changes and
                // has a new base: its new manifest is made durable before the commit
                // (until then its old one and the deleted RPs' ones are all in place;
                // after a crash between the two, both describe the same block map).
                let inheritors: std::collections::BTreeSet<u64> =
                    deleted.iter().filter_map(|d| keep.range(d + 1..).next().copied()).collect();
                for n in inheritors {
                    let row = rps.get((vid, n)).map_err(|e| self.ce("read rps", e))?;
                    let Some(row) = row else { continue };
                    let meta = self.decode_rp_row(volume, RpSeq(n), row.value())?;
                    drop(row);
                    let base = keep.range(..n).next_back().copied();
                    let m = self.manifest_from_catalog(&blocks, &changes, vid, &meta, base.map(RpSeq))?;
                    // The same changes made from the manifests alone (the newest change
                    // of each block over the deleted RPs and `n`): a catalog that says
                    // otherwise is damaged, and nothing is pruned.
                    let merged: Vec<u64> = deleted.iter().copied().filter(|d| base.is_none_or(|b| *d > b) && *d < n).chain([n]).collect();
                    if let Some(from_manifests) = self.merged_changes(volume, &merged) {
                        if from_manifests != m.changes {
                            return Err(StoreError::CatalogInconsistent {
                                path: self.catalog_path.clone(),
                                what: format!("its block map of {volume}@{n} disagrees with the RP manifests (found while applying retention)"),
                            });
                        }
                    }
                    manifest::write(&self.manifests_dir, &m)?;
                }
            }
            tx.commit()
                .map_err(|e| self.ce(&format!("commit prune of {volume}"), e))?;
            // Committed: the deleted RPs' manifests go (one left by a crash here is
            // removed at the next open).
            if !deleted.is_empty() && VolumeName::new(volume).is_ok() {
                for d in &deleted {
                    manifest::remove(&self.manifests_dir, volume, RpSeq(*d))?;
                }
                manifest::sync_dir(&manifest::volume_dir(&self.manifests_dir, volume))?;
            }
            if let Some(seq) = verified.filter(|_| !deleted.is_empty()) {
                tracing::info!(volume, seq, "store: kept the newest verified RP (last known-good) beyond retention");
            }
            if !deleted.is_empty() {
                tracing::info!(volume, deleted = ?deleted, "store: pruned RPs");
            }
            Ok(deleted.into_iter().map(RpSeq).collect())
        })
    }

    /// The newest change of each block over the manifests of `volume@seqs`
    /// (ascending), or None when one of them cannot be read (logged).
    fn merged_changes(&self, volume: &str, seqs: &[u64]) -> Option<Vec<(u64, ContentId)>> {
        let mut merged = BTreeMap::new();
        for seq in seqs {
            match manifest::read(&manifest::path(&self.manifests_dir, volume, RpSeq(*seq))) {
                Ok(m) => merged.extend(m.changes),
                Err(e) => {
                    tracing::warn!(error = %e, "store: a manifest could not be read to cross-check a prune; the catalog's block map is taken as it is");
                    return None;
                }
            }
        }
        Some(merged.into_iter().collect())
    }

    /// What [`Self::prune`] would delete from `volume` now under `retention`,
    /// deleting nothing: the seqs it keeps and those it would delete
    /// (ascending), and the newest verified RP if it is kept beyond the rules.
    pub fn prune_dry_run(&self, volume: &str, retention: &Retention, now_unix_ms: u64) -> Result<RetentionPlan, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
        let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
        let Some(vid) = vols.get(volume).map_err(|e| self.ce("read volumes", e))?.map(|g| g.value()) else {
            return Ok(RetentionPlan::default());
        };
        let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
        let drills = tx.open_table(DRILLS).map_err(|e| self.ce("open table drills", e))?;
        let selection = self.select_retained(volume, vid, &rps, &drills, retention, now_unix_ms)?;
        let (kept, would_delete) = selection.all.iter().map(|(s, _)| RpSeq(*s)).partition(|s| selection.keep.contains(&s.0));
        Ok(RetentionPlan { kept, would_delete, kept_as_last_known_good: selection.verified_beyond.map(RpSeq) })
    }

    /// The retention selection of `volume` (id `vid`), shared by [`Self::prune`]
    /// and [`Self::prune_dry_run`]: every RP (seq, time) and the seqs kept
    /// (the rules on distinct states, plus the newest verified RP).
    fn select_retained(
        &self,
        volume: &str,
        vid: u32,
        rps: &impl ReadableTable<(u32, u64), &'static [u8]>,
        drills: &impl ReadableTable<(u32, u64, u64), &'static [u8]>,
        retention: &Retention,
        now_unix_ms: u64,
    ) -> Result<Selection, StoreError> {
        let mut all = Vec::new();
        let mut roots = Vec::new();
        for row in rps.range((vid, 0u64)..=(vid, u64::MAX)).map_err(|e| self.ce("read rps", e))? {
            let (k, v) = row.map_err(|e| self.ce("read rps", e))?;
            let seq = k.value().1;
            let meta = self.decode_rp_row(volume, RpSeq(seq), v.value())?;
            all.push((seq, meta.time_unix_ms));
            roots.push((seq, meta.merkle_root));
        }
        // Unchanged predecessors are not candidates: the rules count distinct states.
        let unchanged = if retention.coalesce_unchanged { unchanged_predecessors(&roots) } else { Default::default() };
        let distinct: Vec<(u64, u64)> = all.iter().copied().filter(|(s, _)| !unchanged.contains(s)).collect();
        let mut keep = select_keep(&distinct, retention, now_unix_ms);
        // The newest verified RP is the last known-good point: never pruned.
        let mut latest: BTreeMap<u64, bool> = BTreeMap::new();
        for row in drills.range((vid, 0u64, 0u64)..=(vid, u64::MAX, u64::MAX)).map_err(|e| self.ce("read drills", e))? {
            let (k, v) = row.map_err(|e| self.ce("read drills", e))?;
            let (_, seq, _) = k.value();
            // Rows are in finish order per seq: the last one is the newest report.
            latest.insert(seq, super::drills::row_verified(v.value()));
        }
        let mut verified_beyond = None;
        if let Some((&seq, _)) = latest.iter().rev().find(|(_, v)| **v) {
            if all.iter().any(|(s, _)| *s == seq) && keep.insert(seq) {
                verified_beyond = Some(seq);
            }
        }
        Ok(Selection { all, keep, verified_beyond })
    }

    /// Mark-and-sweep GC: deletes blobs not reachable from any retained RP's block map
    /// (base chains of deltas included), keeping blobs pinned by sessions (and their base
    /// chains) and blobs younger than `grace`. Safe while sessions run; see the module doc.
    /// The mark set is held in memory (32 bytes per live blob).
    pub fn gc(&self, grace: Duration) -> Result<GcReport, StoreError> {
        self.gc_with_progress(grace, false, &mut |_| {})
    }

    /// [`Self::gc`] (or, with `dry_run`, [`Self::gc_dry_run`]) telling
    /// `progress` how far it is, at most every 4096 items of a phase.
    pub fn gc_with_progress(&self, grace: Duration, dry_run: bool, progress: &mut dyn FnMut(GcProgress)) -> Result<GcReport, StoreError> {
        if dry_run {
            return self.collect(grace, true, progress);
        }
        let result = self.collect(grace, false, progress);
        let mut totals = lock(&self.gc_totals);
        match &result {
            Ok(report) => totals.add(report),
            Err(_) => totals.failed_runs += 1,
        }
        result
    }

    /// What the GCs of this process did so far (dry runs not counted).
    pub fn gc_totals(&self) -> super::GcTotals {
        *lock(&self.gc_totals)
    }

    /// What [`Self::gc`] would delete now, deleting nothing (`dry_run` set in
    /// the report; `blobs_deleted` and `bytes_freed` are what it would free).
    pub fn gc_dry_run(&self, grace: Duration) -> Result<GcReport, StoreError> {
        self.collect(grace, true, &mut |_| {})
    }

    fn collect(&self, grace: Duration, dry_run: bool, progress: &mut dyn FnMut(GcProgress)) -> Result<GcReport, StoreError> {
        self.guard("collected garbage", || {
            let started = Instant::now();
            let _one = lock(&self.gc_lock);
            let mut report = GcReport { dry_run, ..GcReport::default() };

            // Mark, from a snapshot taken under the writer lock together with raising the flag.
            let (_running, snapshot) = {
                let _w = lock(&self.writer);
                {
                    let mut pins = lock(&self.pins);
                    pins.gc_running = true;
                    pins.gc_extra.clear();
                }
                let running = GcRunning(self);
                (running, self.db.begin_read().map_err(|e| self.ce("begin read", e))?)
            };
            let mut marked: HashSet<BlobId> = HashSet::new();
            {
                let blocks = snapshot
                    .open_table(BLOCKS)
                    .map_err(|e| self.ce("open table blocks", e))?;
                let ctab = snapshot
                    .open_table(CONTENTS)
                    .map_err(|e| self.ce("open table contents", e))?;
                let btab = snapshot.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                let mut contents: HashSet<ContentId> = HashSet::new();
                let total = blocks.len().map_err(|e| self.ce("read block map", e))?;
                for (n, row) in blocks.iter().map_err(|e| self.ce("read block map", e))?.enumerate() {
                    if n.is_multiple_of(PROGRESS_EVERY) {
                        progress(GcProgress { phase: "marking", done: n as u64, total });
                    }
                    let content = ContentId(row.map_err(|e| self.ce("read block map", e))?.1.value());
                    if !content.is_zero() {
                        contents.insert(content);
                    }
                }
                for content in contents {
                    if let Some(blob) = ctab.get(content.0).map_err(|e| self.ce("read contents", e))? {
                        close_over_bases(&btab, [ContentId(blob.value())], &mut marked)
                            .map_err(|e| self.ce("read blobs", e))?;
                    }
                }
            }
            drop(snapshot);

            // Candidates: every blob file and every blob row that is not marked.
            let now = SystemTime::now();
            let mut candidates: HashMap<BlobId, Candidate> = HashMap::new();
            let mut scanned: HashSet<BlobId> = HashSet::new();
            let blob_rows = {
                let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
                tx.open_table(BLOBS).and_then(|t| Ok(t.len()?)).map_err(|e| self.ce("read blobs", e))?
            };
            blob_file::for_each_file(&self.blobs_dir, &mut |path, name| {
                let Some(id) = ContentId::from_hex(name) else {
                    return Ok(());
                };
                if scanned.len().is_multiple_of(PROGRESS_EVERY) {
                    progress(GcProgress { phase: "scanning blob files", done: scanned.len() as u64, total: blob_rows.max(scanned.len() as u64) });
                }
                scanned.insert(id);
                if marked.contains(&id) {
                    return Ok(());
                }
                let meta = fs::metadata(path).map_err(|e| io_error("stat blob", path, e))?;
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .unwrap_or(Duration::ZERO);
                candidates.insert(
                    id,
                    Candidate {
                        path: path.to_path_buf(),
                        file_bytes: Some(meta.len()),
                        age: Some(age),
                    },
                );
                Ok(())
            })?;
            {
                let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
                let btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                for row in btab.iter().map_err(|e| self.ce("read blobs", e))? {
                    let id = ContentId(row.map_err(|e| self.ce("read blobs", e))?.0.value());
                    scanned.insert(id);
                    if !marked.contains(&id) {
                        candidates.entry(id).or_insert_with(|| Candidate {
                            path: blob_file::blob_path(&self.blobs_dir, &id),
                            file_bytes: None,
                            age: None,
                        });
                    }
                }
            }
            report.blobs_scanned = scanned.len() as u64;
            drop(scanned);

            // Sweep under the writer lock and the pin lock, held until files are gone.
            let _w = lock(&self.writer);
            let pins = lock(&self.pins);
            let tx = self.begin_write("begin write")?;
            let mut doomed = Vec::new();
            {
                let mut btab = tx.open_table(BLOBS).map_err(|e| self.ce("open table blobs", e))?;
                let mut ctab = tx.open_table(CONTENTS).map_err(|e| self.ce("open table contents", e))?;
                let roots = pins.gc_extra.iter().chain(pins.sessions.values().flatten()).copied();
                let mut pinned = HashSet::new();
                close_over_bases(&btab, roots, &mut pinned).map_err(|e| self.ce("read blobs", e))?;
                let now_ms = now_unix_ms();
                let mut young = Vec::new();
                for (id, c) in &candidates {
                    if pinned.contains(id) {
                        continue;
                    }
                    let row_age = btab
                        .get(id.0)
                        .map_err(|e| self.ce("read blobs", e))?
                        .and_then(|r| BlobMeta::decode(r.value()))
                        .map(|m| Duration::from_millis(now_ms.saturating_sub(m.stored_unix_ms)));
                    let age = match (c.age, row_age) {
                        (Some(a), Some(b)) => a.min(b),
                        (a, b) => a.or(b).unwrap_or(Duration::ZERO),
                    };
                    if age < grace {
                        young.push(*id);
                    }
                }
                let mut graced = HashSet::new();
                close_over_bases(&btab, young, &mut graced).map_err(|e| self.ce("read blobs", e))?;
                for (id, c) in candidates {
                    if pinned.contains(&id) {
                        report.blobs_kept_pinned += 1;
                        continue;
                    }
                    if graced.contains(&id) {
                        report.blobs_kept_grace += 1;
                        continue;
                    }
                    if dry_run {
                        report.blobs_deleted += 1;
                        report.bytes_freed += c.file_bytes.unwrap_or(0);
                        continue;
                    }
                    let meta = btab
                        .remove(id.0)
                        .map_err(|e| self.ce("delete blob row", e))?
                        .and_then(|r| BlobMeta::decode(r.value()));
                    if let Some(meta) = meta {
                        let points_here = ctab
                            .get(meta.content.0)
                            .map_err(|e| self.ce("read contents", e))?
                            .is_some_and(|g| g.value() == id.0);
                        if points_here {
                            ctab.remove(meta.content.0)
                                .map_err(|e| self.ce("delete content row", e))?;
                        }
                    }
                    doomed.push(c);
                }
            }
            if dry_run {
                // Nothing was changed: the transaction is dropped, not committed.
                drop(tx);
            } else {
                tx.commit().map_err(|e| self.ce("commit gc", e))?;
            }
            let doomed_total = doomed.len() as u64;
            for (n, c) in doomed.into_iter().enumerate() {
                if n.is_multiple_of(PROGRESS_EVERY) {
                    progress(GcProgress { phase: "deleting", done: n as u64, total: doomed_total });
                }
                match fs::remove_file(&c.path) {
                    Ok(()) => {
                        report.blobs_deleted += 1;
                        report.bytes_freed += c.file_bytes.unwrap_or(0);
                    }
                    // A row whose file was already gone: the row is deleted, nothing freed.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.blobs_deleted += 1,
                    // The row is gone; the orphan file is retried by the next GC.
                    Err(e) => tracing::warn!(error = %io_error("delete blob", &c.path, e), "store: gc"),
                }
            }
            drop(pins);
            report.duration_ms = started.elapsed().as_millis() as u64;
            tracing::info!(?report, "store: gc done");
            Ok(report)
        })
    }
}
