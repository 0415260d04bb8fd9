//! Scenarios as data: timed operations applied to the simulated mesh.

use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::proto::gossip::Millis;

/// One operation of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Node `node` commits the next RP of `volume` (seq 1, 2, … per node and volume).
    CommitRp {
        /// Index of the committing (holding) node.
        node: usize,
        /// Volume name.
        volume: VolumeName,
    },
    /// Node `node` expires every RP of `volume` with `seq < below` (low-water mark).
    ExpireBelow {
        /// Holder index.
        node: usize,
        /// Volume name.
        volume: VolumeName,
        /// First seq kept.
        below: RpSeq,
    },
    /// Node `node` deletes RP `volume@seq` out of order (tombstone).
    ExpireOne {
        /// Holder index.
        node: usize,
        /// Volume name.
        volume: VolumeName,
        /// Deleted seq.
        seq: RpSeq,
    },
    /// Site `site` loses every link to the other sites.
    PartitionSite {
        /// Site index.
        site: usize,
    },
    /// Every partition ends.
    Heal,
    /// These nodes stop (their replica is kept, as redb would).
    Crash {
        /// Node indices.
        nodes: Vec<usize>,
    },
    /// These nodes start again from their saved replica, one generation up.
    Restart {
        /// Node indices.
        nodes: Vec<usize>,
    },
}

/// A named list of timed operations and how long to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Name printed in reports.
    pub name: String,
    /// Simulated run length.
    pub duration: Millis,
    /// Operations, by time (ties keep list order).
    pub ops: Vec<(Millis, Op)>,
}

/// Time for membership to settle before the measured part starts.
pub const WARMUP_MS: u64 = 30_000;

fn volume_of(node: usize) -> VolumeName {
    // Always within the name rule: "vol-" and digits.
    VolumeName::new(format!("vol-{node}")).unwrap_or_else(|e| unreachable!("{e}"))
}

/// Spreads `count` commits over `[from, to)` on nodes picked by a simple
/// deterministic stride (so the scenario itself needs no RNG).
fn commits(nodes: usize, from: u64, to: u64, every_ms: u64, skip: &dyn Fn(usize) -> bool) -> Vec<(Millis, Op)> {
    let mut ops = Vec::new();
    let mut t = from;
    let mut k = 0usize;
    while t < to {
        let mut node = (k * 7919 + 13) % nodes;
        let mut tries = 0;
        while skip(node) && tries < nodes {
            node = (node + 1) % nodes;
            tries += 1;
        }
        ops.push((Millis(t), Op::CommitRp { node, volume: volume_of(node) }));
        t += every_ms;
        k += 1;
    }
    ops
}

impl Scenario {
    /// Steady state: one RP every `every_ms` on some node, for `duration_s`.
    pub fn steady(nodes: usize, duration_s: u64, every_ms: u64) -> Scenario {
        let end = duration_s * 1000;
        Scenario {
            name: "steady".into(),
            duration: Millis(end),
            ops: commits(nodes, WARMUP_MS, end.saturating_sub(WARMUP_MS).max(WARMUP_MS + 1), every_ms, &|_| false),
        }
    }

    /// Site 1 is cut off from `WARMUP` for `partition_s`, RPs keep being
    /// committed on both sides; then the partition heals and the run goes on
    /// for `after_s`.
    pub fn partition(nodes: usize, sites: usize, partition_s: u64, after_s: u64, every_ms: u64) -> Scenario {
        let heal = WARMUP_MS + partition_s * 1000;
        let end = heal + after_s * 1000;
        let mut ops = vec![(Millis(WARMUP_MS), Op::PartitionSite { site: 1 % sites.max(1) })];
        ops.extend(commits(nodes, WARMUP_MS + 1000, heal, every_ms, &|_| false));
        ops.push((Millis(heal), Op::Heal));
        ops.extend(commits(nodes, heal + 1000, end.saturating_sub(after_s * 500), every_ms, &|_| false));
        Scenario { name: "partition".into(), duration: Millis(end), ops }
    }

    /// 10 % of the nodes crash at `WARMUP`, return after `down_s`; RPs keep
    /// being committed on live nodes.
    pub fn crash(nodes: usize, down_s: u64, after_s: u64, every_ms: u64) -> Scenario {
        let crashed: Vec<usize> = (0..nodes).filter(|i| i % 10 == 5).collect();
        let back = WARMUP_MS + down_s * 1000;
        let end = back + after_s * 1000;
        let set = crashed.clone();
        let mut ops = vec![(Millis(WARMUP_MS), Op::Crash { nodes: crashed.clone() })];
        ops.extend(commits(nodes, WARMUP_MS + 1000, end.saturating_sub(after_s * 500), every_ms, &move |n| set.contains(&n)));
        ops.push((Millis(back), Op::Restart { nodes: crashed }));
        ops.sort_by_key(|(t, _)| *t);
        Scenario { name: "crash".into(), duration: Millis(end), ops }
    }

    /// RPs expire (low-water marks and one tombstone) on both sides of a
    /// partition while it lasts; after the heal no expired RP may come back.
    pub fn expiry_during_partition(nodes: usize, sites: usize, partition_s: u64, after_s: u64) -> Scenario {
        let site1 = 1 % sites.max(1);
        // holder 0 is in site 0; holder `site1` is in site 1 (node i lives in site i % sites).
        let holders = [0usize, site1];
        let mut ops = Vec::new();
        for (k, &h) in holders.iter().enumerate() {
            for s in 0..6u64 {
                ops.push((Millis(WARMUP_MS - 20_000 + s * 1000 + k as u64 * 100), Op::CommitRp { node: h, volume: volume_of(h) }));
            }
        }
        let cut = WARMUP_MS;
        let heal = cut + partition_s * 1000;
        ops.push((Millis(cut), Op::PartitionSite { site: site1 }));
        for &h in &holders {
            ops.push((Millis(cut + 10_000), Op::ExpireBelow { node: h, volume: volume_of(h), below: RpSeq(4) }));
            ops.push((Millis(cut + 20_000), Op::ExpireOne { node: h, volume: volume_of(h), seq: RpSeq(5) }));
            ops.push((Millis(cut + 30_000), Op::CommitRp { node: h, volume: volume_of(h) }));
        }
        // Background commits elsewhere, so gossip has ongoing traffic.
        let busy = move |n: usize| holders.contains(&n);
        ops.extend(commits(nodes, cut + 1000, heal, 5000, &busy));
        ops.push((Millis(heal), Op::Heal));
        ops.sort_by_key(|(t, _)| *t);
        Scenario { name: "expiry-during-partition".into(), duration: Millis(heal + after_s * 1000), ops }
    }
}
