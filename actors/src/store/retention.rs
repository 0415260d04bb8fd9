//! Which RPs a retention policy keeps (pure selection, no I/O).
//!
//! Same rules as restic `forget` / Proxmox Backup Server prune: walk the RPs newest
//! first (by seq); `keep_last` keeps the newest N; each of `hourly`, `daily` and
//! `weekly` keeps the newest RP of each of the newest N distinct UTC hours / days /
//! ISO weeks (Monday to Sunday) that hold RPs. An RP kept by any rule is kept. The
//! newest RP is always kept, and so is any RP stamped after `now` (a clock we
//! cannot place in time is not a reason to delete data).

use std::collections::BTreeSet;

/// How many RPs of a volume to keep (the node maps the topology's policy onto this).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N RPs.
    pub keep_last: u32,
    /// Keep the newest RP of each of the newest N hours that have RPs.
    pub hourly: u32,
    /// Keep the newest RP of each of the newest N days (UTC) that have RPs.
    pub daily: u32,
    /// Keep the newest RP of each of the newest N ISO weeks (UTC) that have RPs.
    pub weekly: u32,
    /// An RP whose next newer RP holds the same volume (same Merkle root) is
    /// not kept, and the rules above count distinct states: history is then
    /// measured in changes, not cycles. The caller leaves such RPs out of
    /// what it hands to [`select_keep`] (see [`unchanged_predecessors`]).
    pub coalesce_unchanged: bool,
}

/// Among `rps` (seq and Merkle root, ascending by seq), the seqs whose next
/// newer RP has the same root: the volume did not change between them.
pub fn unchanged_predecessors<S: Copy + Ord, R: PartialEq>(rps: &[(S, R)]) -> BTreeSet<S> {
    rps.windows(2).filter(|w| w[0].1 == w[1].1).map(|w| w[0].0).collect()
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The ISO week of a UTC instant, as a count of Monday-started weeks since the epoch
/// (1970-01-01 was a Thursday, so day `d` is in week `(d + 3) / 7`). Distinct ISO
/// (year, week) labels are exactly distinct values of this count.
pub fn iso_week_index(time_unix_ms: u64) -> u64 {
    (time_unix_ms / DAY_MS + 3) / 7
}

/// Returns the seqs to keep among `rps` (pairs of seq and time in unix ms, any
/// order; the seq is an [`super::RpSeq`], or any ordered key in tests).
pub fn select_keep<S: Copy + Ord>(rps: &[(S, u64)], retention: &Retention, now_unix_ms: u64) -> BTreeSet<S> {
    let mut newest_first: Vec<(S, u64)> = rps.to_vec();
    newest_first.sort_unstable_by_key(|rp| std::cmp::Reverse(rp.0));
    let mut keep = BTreeSet::new();
    if let Some((seq, _)) = newest_first.first() {
        keep.insert(*seq);
    }
    type Bucket = fn(u64) -> u64;
    let mut rules: [(u32, Bucket, Option<u64>); 3] = [
        (retention.hourly, |t| t / HOUR_MS, None),
        (retention.daily, |t| t / DAY_MS, None),
        (retention.weekly, iso_week_index, None),
    ];
    for (i, &(seq, time)) in newest_first.iter().enumerate() {
        if (i as u64) < u64::from(retention.keep_last) || time > now_unix_ms {
            keep.insert(seq);
        }
        for (left, bucket_of, last) in rules.iter_mut() {
            let bucket = bucket_of(time);
            if *left > 0 && *last != Some(bucket) {
                keep.insert(seq);
                *left -= 1;
                *last = Some(bucket);
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Independent formulation: group by bucket, newest RP per bucket, newest N buckets.
    fn model(rps: &[(u64, u64)], r: &Retention, now: u64) -> BTreeSet<u64> {
        let mut keep = BTreeSet::new();
        let mut seqs: Vec<u64> = rps.iter().map(|x| x.0).collect();
        seqs.sort_unstable();
        keep.extend(seqs.iter().rev().take(r.keep_last as usize));
        keep.extend(seqs.last());
        keep.extend(rps.iter().filter(|x| x.1 > now).map(|x| x.0));
        type Bucket = fn(u64) -> u64;
        let rules: [(u32, Bucket); 3] = [
            (r.hourly, |t| t / HOUR_MS),
            (r.daily, |t| t / DAY_MS),
            (r.weekly, iso_week_index),
        ];
        for (n, bucket_of) in rules {
            let mut newest_in_bucket: BTreeMap<u64, u64> = BTreeMap::new();
            for &(seq, time) in rps {
                let e = newest_in_bucket.entry(bucket_of(time)).or_insert(seq);
                *e = (*e).max(seq);
            }
            keep.extend(newest_in_bucket.values().rev().take(n as usize));
        }
        keep
    }

    #[test]
    fn iso_weeks_start_on_monday() {
        // 2024-01-01 was a Monday; 2023-12-31 a Sunday.
        let monday = 1_704_067_200_000u64;
        assert_eq!(iso_week_index(monday), iso_week_index(monday + 6 * DAY_MS + DAY_MS - 1));
        assert_ne!(iso_week_index(monday), iso_week_index(monday - 1));
    }

    #[test]
    fn keeps_newest_when_all_zero() {
        let rps = [(1, 0), (2, 10), (3, 20)];
        assert_eq!(select_keep(&rps, &Retention::default(), 100), BTreeSet::from([3]));
        assert!(select_keep::<u64>(&[], &Retention::default(), 100).is_empty());
    }

    #[test]
    fn hourly_keeps_newest_per_hour() {
        let h = HOUR_MS;
        let rps = [(1, 0), (2, h / 2), (3, h + 1), (4, h + 2), (5, 3 * h)];
        let r = Retention {
            hourly: 2,
            ..Default::default()
        };
        assert_eq!(select_keep(&rps, &r, 10 * h), BTreeSet::from([4, 5]));
        let r = Retention {
            hourly: 3,
            ..Default::default()
        };
        assert_eq!(select_keep(&rps, &r, 10 * h), BTreeSet::from([2, 4, 5]));
    }

    #[test]
    fn unchanged_predecessors_are_those_followed_by_the_same_root() {
        let rps = [(1, 'a'), (2, 'a'), (3, 'b'), (4, 'b'), (5, 'a'), (6, 'c')];
        assert_eq!(unchanged_predecessors(&rps), BTreeSet::from([1, 3]));
        assert_eq!(unchanged_predecessors::<u64, char>(&[]), BTreeSet::new());
        // The newest is never one: nothing follows it.
        assert_eq!(unchanged_predecessors(&[(1, 'a'), (2, 'a'), (3, 'a')]), BTreeSet::from([1, 2]));
    }

    proptest! {
        #[test]
        fn selection_matches_model(
            gaps in proptest::collection::vec(0u64..3 * DAY_MS, 0..60),
            keep_last in 0u32..5, hourly in 0u32..6, daily in 0u32..6, weekly in 0u32..4,
            now_back in 0u64..2 * DAY_MS,
        ) {
            // Times never decrease with seq (RPs are committed in order).
            let mut t = 1_700_000_000_000u64;
            let rps: Vec<(u64, u64)> = gaps.iter().enumerate().map(|(i, g)| { t += g; (i as u64 * 3 + 1, t) }).collect();
            let now = t.saturating_sub(now_back);
            let r = Retention { keep_last, hourly, daily, weekly, coalesce_unchanged: false };
            prop_assert_eq!(select_keep(&rps, &r, now), model(&rps, &r, now));
        }
    }
}
