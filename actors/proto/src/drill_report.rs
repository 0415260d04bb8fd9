//! What a drill proved about a recovery point: one [`DrillReport`] per drill,
//! one [`CheckReport`] per check it ran. The node that ran it keeps the whole
//! report in its store (with the output tails); gossip carries the
//! [`crate::gossip::DrillResult`] summary to every node's catalog.

use serde::{Deserialize, Serialize};

use crate::blob::{RpSeq, VolumeName};

/// Longest output tail kept per check, in bytes (the end of the output).
pub const OUTPUT_TAIL_BYTES: usize = 8 << 10;

/// The verdict of one check of one drill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The check's name as in topology files (`fsck`, `boot`, `postgres`, `script`).
    pub check: String,
    /// Whether the check passed.
    pub passed: bool,
    /// One line saying what was found or why it failed.
    pub summary: String,
    /// How long the check ran, milliseconds.
    pub duration_ms: u64,
    /// The end of the check's output (tool output, console tail), at most
    /// [`OUTPUT_TAIL_BYTES`].
    pub output: String,
}

/// The outcome of one drill of one recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    /// Volume name.
    pub volume: VolumeName,
    /// The RP's sequence number.
    pub seq: RpSeq,
    /// Name of the node that ran the drill.
    pub node: String,
    /// When the drill started, Unix milliseconds.
    pub started_unix_ms: u64,
    /// When it ended, Unix milliseconds.
    pub finished_unix_ms: u64,
    /// drmesh version that ran it.
    pub software_version: String,
    /// Why it ran: `schedule`, `request`.
    pub trigger: String,
    /// The checks, in the order they ran.
    pub checks: Vec<CheckReport>,
    /// Whether every check that ran passed (and at least one ran).
    pub passed: bool,
    /// Whether the checks that ran cover every check of the volume's policy
    /// and all passed: the RP is *verified* (retention keeps the newest one).
    pub verified: bool,
    /// Why the drill could not run to the end (time limit, export failed), if so.
    pub error: Option<String>,
}

impl DrillReport {
    /// `volume@seq`, for messages.
    pub fn rp(&self) -> String {
        format!("{}@{}", self.volume, self.seq)
    }

    /// The first failed check, if any.
    pub fn failed_check(&self) -> Option<&CheckReport> {
        self.checks.iter().find(|c| !c.passed)
    }

    /// A one-line summary: `passed fsck, boot` or `FAILED boot: why`.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("FAILED: {e}");
        }
        match self.failed_check() {
            Some(c) => format!("FAILED {}: {}", c.check, c.summary),
            None => {
                let names: Vec<&str> = self.checks.iter().map(|c| c.check.as_str()).collect();
                format!("passed {}", names.join(", "))
            }
        }
    }

    /// Sets `passed` from the checks and `verified` against the policy's
    /// `required` check names.
    pub fn settle(&mut self, required: &[&str]) {
        self.passed = self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed);
        self.verified = self.passed && required.iter().all(|r| self.checks.iter().any(|c| c.check == *r));
    }
}

/// Where a volume stands with its drills, from the mesh-wide catalog (the
/// dead-man's switch: verification that silently stopped is flagged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Newest RP whose newest drill (by any holder) verified it.
    pub verified_seq: Option<RpSeq>,
    /// Its snapshot instant, Unix milliseconds.
    pub verified_unix_ms: Option<u64>,
    /// How long the volume has gone unverified: since the newest verified
    /// RP's snapshot, or, never verified, since the oldest RP ever seen. Seconds.
    pub unverified_secs: Option<u64>,
    /// The policy's `max_unverified_age`, seconds.
    pub max_unverified_age_secs: u64,
    /// `unverified_secs` is over the limit.
    pub overdue: bool,
    /// Newest drilled RP and whether that drill failed (which check).
    pub last_failure: Option<String>,
}

/// One RP of a volume as the catalog has it: (seq, snapshot ms, drill verified?, drill failure summary).
pub type CatalogRpDrill<'a> = (RpSeq, u64, Option<(bool, &'a str)>);

/// Computes [`Verification`] for one volume from its live RPs on every holder;
/// `first_seen_unix_ms` is the snapshot time of the oldest RP of the volume
/// this node ever saw (retention prunes old RPs, so a volume never verified
/// counts from there, not from its oldest live RP).
pub fn verification(rps: &[CatalogRpDrill<'_>], first_seen_unix_ms: Option<u64>, now_unix_ms: u64, max_unverified_age_secs: u64) -> Verification {
    let verified = rps.iter().filter(|(_, _, d)| d.is_some_and(|(v, _)| v)).max_by_key(|(seq, _, _)| *seq);
    let oldest = rps.iter().map(|(_, t, _)| *t).chain(first_seen_unix_ms).min();
    let since = verified.map(|(_, t, _)| *t).or(oldest.filter(|_| !rps.is_empty()));
    let unverified_secs = since.map(|t| now_unix_ms.saturating_sub(t) / 1000);
    let last_drilled = rps.iter().filter(|(_, _, d)| d.is_some()).max_by_key(|(seq, _, _)| *seq);
    Verification {
        verified_seq: verified.map(|(seq, _, _)| *seq),
        verified_unix_ms: verified.map(|(_, t, _)| *t),
        unverified_secs,
        max_unverified_age_secs,
        overdue: unverified_secs.is_some_and(|s| s > max_unverified_age_secs),
        last_failure: last_drilled.and_then(|(seq, _, d)| d.filter(|(v, _)| !v).map(|(_, why)| format!("@{seq}: {why}"))),
    }
}

/// Keeps the last `max` bytes of `text`, cut at a character boundary, with a
/// marker when something was cut.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {} bytes before]\n{}", start, &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, passed: bool) -> CheckReport {
        CheckReport { check: name.into(), passed, summary: format!("{name} says so"), duration_ms: 5, output: String::new() }
    }

    fn report(checks: Vec<CheckReport>) -> DrillReport {
        DrillReport {
            volume: crate::blob::VolumeName::from_static("db"),
            seq: RpSeq(3),
            node: "dr".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            software_version: "0".into(),
            trigger: "request".into(),
            checks,
            passed: false,
            verified: false,
            error: None,
        }
    }

    #[test]
    fn verified_needs_every_policy_check_passed() {
        let mut r = report(vec![check("fsck", true)]);
        r.settle(&["fsck", "boot"]);
        assert!(r.passed && !r.verified, "a drill with fewer checks than the policy passes but does not verify");
        r.settle(&["fsck"]);
        assert!(r.verified);
        let mut r = report(vec![check("fsck", true), check("boot", false)]);
        r.settle(&["fsck", "boot"]);
        assert!(!r.passed && !r.verified);
        assert_eq!(r.summary(), "FAILED boot: boot says so");
        let mut r = report(vec![]);
        r.settle(&[]);
        assert!(!r.passed, "a drill that ran nothing proves nothing");
        let mut r = report(vec![check("fsck", true)]);
        r.error = Some("time limit".into());
        r.settle(&["fsck"]);
        assert!(!r.verified);
    }

    #[test]
    fn dead_mans_switch_counts_from_the_newest_verified_rp() {
        let min = 60_000;
        // Never drilled: counted from the oldest RP.
        let v = verification(&[(RpSeq(1), 0, None), (RpSeq(2), 10 * min, None)], None, 20 * min, 15 * 60);
        assert_eq!((v.verified_seq, v.unverified_secs, v.overdue), (None, Some(20 * 60), true));
        // RP 2 verified at snapshot 10 min, RP 3 failed: 10 min unverified, within 15.
        let rps = [(RpSeq(1), 0, None), (RpSeq(2), 10 * min, Some((true, ""))), (RpSeq(3), 12 * min, Some((false, "boot: panic")))];
        let v = verification(&rps, None, 20 * min, 15 * 60);
        assert_eq!((v.verified_seq, v.unverified_secs, v.overdue), (Some(RpSeq(2)), Some(10 * 60), false));
        assert_eq!(v.last_failure.as_deref(), Some("@3: boot: panic"));
        let v = verification(&rps, None, 26 * min, 15 * 60);
        assert!(v.overdue, "drills stopped: the switch fires");
        // No RP at all: nothing to verify (the RPO check says so).
        assert!(!verification(&[], Some(0), 26 * min, 1).overdue);
        // Never verified while retention prunes the old RPs: counted from the first RP ever seen.
        let v = verification(&[(RpSeq(15), 24 * min, None), (RpSeq(16), 25 * min, None)], Some(2 * min), 26 * min, 15 * 60);
        assert_eq!((v.unverified_secs, v.overdue), (Some(24 * 60), true));
    }

    #[test]
    fn tail_cuts_at_char_boundary() {
        assert_eq!(tail("abc", 8), "abc");
        let t = tail("ééééé", 3);
        assert!(t.ends_with('é') && t.starts_with("[... "));
    }
}
