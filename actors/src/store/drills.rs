//! Drill reports kept with the RPs they are about (`drills` table).
//!
//! A report row is written by the node that ran the drill; it goes when its RP
//! is pruned. Retention asks [`Store::verified_seq`] which RP to keep as the
//! last known-good one.

use std::collections::BTreeMap;

use redb::ReadableTable as _;

use super::catalog::{DRILLS, RPS, VOLUMES};
use super::{lock, RpSeq, Store, StoreError};
use crate::drill::DrillReport;

/// Row format version (a version byte, then the report as JSON).
const DRILL_ROW_VERSION: u8 = 1;

/// Most reports kept per RP (the oldest go first).
pub const DRILLS_PER_RP_MAX: usize = 20;

fn encode(report: &DrillReport) -> Vec<u8> {
    let mut b = vec![DRILL_ROW_VERSION];
    // Encoding plain strings and numbers cannot fail.
    b.extend(serde_json::to_vec(report).unwrap_or_default());
    b
}

fn decode(bytes: &[u8]) -> Option<DrillReport> {
    match bytes.split_first() {
        Some((&DRILL_ROW_VERSION, json)) => serde_json::from_slice(json).ok(),
        _ => None,
    }
}

/// Whether an encoded report row says its RP was verified (unreadable: no).
pub(super) fn row_verified(bytes: &[u8]) -> bool {
    decode(bytes).is_some_and(|r| r.verified)
}

impl Store {
    /// Keeps `report` with its RP (durable when this returns). Fails with
    /// [`StoreError::RpNotFound`] when the RP is not (or no longer) here.
    pub fn record_drill(&self, report: &DrillReport) -> Result<(), StoreError> {
        self.guard("kept a drill report", || {
            let _w = lock(&self.writer);
            let tx = self.begin_write("begin write")?;
            {
                let vols = tx.open_table(VOLUMES).map_err(|e| self.ce("open table volumes", e))?;
                let vid = vols.get(report.volume.as_str()).map_err(|e| self.ce("read volumes", e))?.map(|g| g.value());
                let rps = tx.open_table(RPS).map_err(|e| self.ce("open table rps", e))?;
                let held = match vid {
                    Some(vid) => rps.get((vid, report.seq.0)).map_err(|e| self.ce("read rps", e))?.is_some(),
                    None => false,
                };
                let (Some(vid), true) = (vid, held) else {
                    return Err(StoreError::RpNotFound { rp: report.rp() });
                };
                let mut drills = tx.open_table(DRILLS).map_err(|e| self.ce("open table drills", e))?;
                let mut key = (vid, report.seq.0, report.finished_unix_ms);
                // Two reports finished in the same millisecond both stay.
                while drills.get(key).map_err(|e| self.ce("read drills", e))?.is_some() {
                    key.2 += 1;
                }
                drills.insert(key, encode(report).as_slice()).map_err(|e| self.ce("write drill report", e))?;
                let mut older = Vec::new();
                for row in drills.range((vid, report.seq.0, 0)..=(vid, report.seq.0, u64::MAX)).map_err(|e| self.ce("read drills", e))? {
                    older.push(row.map_err(|e| self.ce("read drills", e))?.0.value());
                }
                if older.len() > DRILLS_PER_RP_MAX {
                    for k in &older[..older.len() - DRILLS_PER_RP_MAX] {
                        drills.remove(*k).map_err(|e| self.ce("trim drill reports", e))?;
                    }
                }
            }
            tx.commit().map_err(|e| self.ce("commit drill report", e))?;
            Ok(())
        })
    }

    /// Every report kept for `volume` (every volume when None), oldest first.
    /// Rows this version cannot read are skipped with a warning.
    pub fn drills(&self, volume: Option<&str>) -> Result<Vec<DrillReport>, StoreError> {
        self.guard("read drill reports", || {
            let tx = self.db.begin_read().map_err(|e| self.ce("begin read", e))?;
            let drills = match tx.open_table(DRILLS) {
                Ok(t) => t,
                // A store written before drills existed (opened read-only) has no table yet.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(self.ce("open table drills", e)),
            };
            let range = match volume {
                Some(v) => match self.volume_id(&tx, v)? {
                    Some(vid) => (vid, 0, 0)..=(vid, u64::MAX, u64::MAX),
                    None => return Ok(Vec::new()),
                },
                None => (0, 0, 0)..=(u32::MAX, u64::MAX, u64::MAX),
            };
            let mut out = Vec::new();
            for row in drills.range(range).map_err(|e| self.ce("read drills", e))? {
                let (k, v) = row.map_err(|e| self.ce("read drills", e))?;
                match decode(v.value()) {
                    Some(r) => out.push(r),
                    None => {
                        let (vid, seq, at) = k.value();
                        tracing::warn!(volume_id = vid, seq, finished_unix_ms = at, "store: skipping a drill report this version cannot read");
                    }
                }
            }
            out.sort_by_key(|r| r.finished_unix_ms);
            Ok(out)
        })
    }

    /// The newest report of each RP of `volume`, by seq.
    pub fn latest_drills(&self, volume: &str) -> Result<BTreeMap<RpSeq, DrillReport>, StoreError> {
        let mut out = BTreeMap::new();
        for r in self.drills(Some(volume))? {
            out.insert(r.seq, r);
        }
        Ok(out)
    }

    /// The newest RP of `volume` whose newest drill verified it (every check
    /// of its policy passed): the last known-good point retention keeps.
    pub fn verified_seq(&self, volume: &str) -> Result<Option<RpSeq>, StoreError> {
        Ok(self.latest_drills(volume)?.into_iter().rev().find(|(_, r)| r.verified).map(|(seq, _)| seq))
    }
}
