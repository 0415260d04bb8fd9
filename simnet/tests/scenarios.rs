//! The five gossip scenarios and the determinism property, at test scale.
//!
//! Bounds are generous multiples of what the runs show, so they catch
//! regressions in convergence, not noise. A failing check prints the seed.

use drmesh_simnet::{Report, Scenario, SimConfig, Simulator};

const SEED: u64 = 7;
/// Every committed RP must reach every live node within this (simulated) bound.
const CONVERGENCE_BOUND_MS: u64 = 30_000;

fn run(nodes: usize, loss: f64, seed: u64, scenario: Scenario) -> Report {
    let mut cfg = SimConfig::new(nodes, seed);
    cfg.net.loss = loss;
    let report = Simulator::new(cfg, scenario).run();
    println!("{}", report.summary());
    report
}

fn assert_safe_and_converged(r: &Report, seed: u64) {
    assert_eq!(r.resurrections, 0, "an expired RP came back (seed {seed})");
    assert_eq!(r.expired_alive_at_end, 0, "an expired RP is still live somewhere (seed {seed})");
    assert_eq!(r.unconverged, 0, "some live node never learned a committed RP (seed {seed})");
    assert_eq!(r.convergence_ms.len(), r.rps_committed - r.rps_expired, "seed {seed}");
    let max = r.convergence_quantile(1.0).unwrap_or(0);
    assert!(max <= CONVERGENCE_BOUND_MS, "convergence max {max} ms over bound (seed {seed})");
}

#[test]
fn steady_state() {
    let r = run(200, 0.0, SEED, Scenario::steady(200, 90, 1000));
    assert!(r.rps_committed >= 25);
    assert_safe_and_converged(&r, SEED);
}

#[test]
fn two_percent_loss() {
    let r = run(200, 0.02, SEED, Scenario::steady(200, 90, 1000));
    assert!(r.dropped > 0);
    assert_safe_and_converged(&r, SEED);
}

#[test]
fn branch_partitioned_for_an_hour_then_healed() {
    let r = run(60, 0.0, SEED, Scenario::partition(60, 4, 3600, 300, 20_000));
    assert!(r.rps_committed > 100);
    assert_safe_and_converged(&r, SEED);
    assert_eq!(r.membership_unhealed, 0, "both sides declared each other down; membership must heal too");
}

#[test]
fn short_partition_heals_membership() {
    // Long enough for both sides to declare the other down, shorter than the
    // time foca remembers down members: they must still meet again.
    let r = run(40, 0.0, SEED, Scenario::partition(40, 4, 120, 180, 10_000));
    assert_safe_and_converged(&r, SEED);
    assert_eq!(r.membership_unhealed, 0, "membership did not heal after a 2-minute partition");
}

#[test]
fn ten_percent_crash_and_return() {
    let r = run(200, 0.0, SEED, Scenario::crash(200, 120, 120, 1000));
    assert_safe_and_converged(&r, SEED);
    assert_eq!(r.detect_first_ms.len(), 20, "every crashed node is detected by someone");
    assert!(r.detect_all_ms.len() >= 18, "crashed nodes detected by every live node: {}", r.detect_all_ms.len());
    // Someone notices fast; the last straggler may only learn it by its own
    // probe cycle, so only the median of "everyone knows" is bounded.
    assert!(r.detect_first_ms.iter().all(|&ms| ms < 30_000));
    let mut all = r.detect_all_ms.clone();
    all.sort_unstable();
    assert!(all[all.len() / 2] < 30_000);
}

#[test]
fn rp_expiry_during_partition() {
    let r = run(60, 0.0, SEED, Scenario::expiry_during_partition(60, 4, 1800, 300));
    assert_safe_and_converged(&r, SEED);
}

#[test]
fn same_seed_same_trace_other_seed_other_trace() {
    let a = run(80, 0.02, 11, Scenario::crash(80, 30, 30, 2000));
    let b = run(80, 0.02, 11, Scenario::crash(80, 30, 30, 2000));
    let c = run(80, 0.02, 12, Scenario::crash(80, 30, 30, 2000));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.events, b.events);
    assert_ne!(a.trace_hash, c.trace_hash);
}
