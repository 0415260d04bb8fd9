//! The replication swarm: the real session cores under seeded faults, checked
//! from outside for promises 1, 2, 3 and 6 (see `drmesh_simnet::replication`).
//! A failing seed is printed; replay it with `drmesh-simnet replication --seed N --seeds 1`.

use drmesh_simnet::replication::{run, ReplConfig};

/// The seeds every test run checks.
const SWARM_SEEDS: u64 = 1000;

#[test]
fn promises_hold_across_a_thousand_seeds_of_faults() {
    let (mut committed, mut failed, mut crashes, mut gcs, mut sent) = (0, 0, 0, 0, 0);
    let mut violations = Vec::new();
    for seed in 0..SWARM_SEEDS {
        let r = run(ReplConfig::swarm(seed));
        committed += r.committed;
        failed += r.failed;
        crashes += r.crashes;
        gcs += r.gc_runs;
        sent += r.blobs_sent;
        violations.extend(r.violations);
    }
    println!("{SWARM_SEEDS} seeds: {committed} cycles committed, {failed} failed, {crashes} crashes, {gcs} GC runs, {sent} blobs sent");
    assert!(violations.is_empty(), "{} violations, first: {}", violations.len(), violations.iter().take(5).cloned().collect::<Vec<_>>().join("\n"));
    // The faults really happened (a swarm where nothing fails proves little).
    assert!(failed > 100 && crashes > 50 && gcs > 500, "too few faults: {failed} failed cycles, {crashes} crashes, {gcs} GC runs");
    assert!(committed > 2 * SWARM_SEEDS as usize, "too few commits: {committed}");
}

/// An applier that acknowledges blobs before they are durable breaks promise 1;
/// the checkers catch it within the swarm's seeds.
#[test]
fn a_broken_applier_is_caught() {
    let caught: Vec<u64> = (0..SWARM_SEEDS)
        .filter(|&seed| !run(ReplConfig { broken_applier: true, ..ReplConfig::swarm(seed) }).violations.is_empty())
        .collect();
    println!("broken applier caught by {} of {SWARM_SEEDS} seeds, first {:?}", caught.len(), caught.first());
    assert!(!caught.is_empty(), "no seed caught an applier that commits before its blobs are durable");
    let first = run(ReplConfig { broken_applier: true, ..ReplConfig::swarm(caught[0]) });
    assert!(first.violations.iter().any(|v| v.contains("promise 1")), "{:?}", first.violations);
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [1, 77, 901] {
        let (a, b) = (run(ReplConfig::swarm(seed)), run(ReplConfig::swarm(seed)));
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_eq!((a.committed, a.failed, a.blobs_sent), (b.committed, b.failed, b.blobs_sent));
    }
    assert_ne!(run(ReplConfig::swarm(1)).trace_hash, run(ReplConfig::swarm(2)).trace_hash);
}
