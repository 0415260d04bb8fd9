//! `drmesh-simnet`: run a gossip scenario on a simulated mesh and print figures.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use drmesh_simnet::{peak_rss_bytes, Report, Scenario, SimConfig, Simulator};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// RPs committed at a steady rate.
    Steady,
    /// Site 1 cut off, then healed.
    Partition,
    /// 10 % of nodes crash and come back.
    Crash,
    /// RPs expire on both sides of a partition.
    Expiry,
}

/// Deterministic simulation of drmesh gossip (membership + RP catalog).
#[derive(Debug, Parser)]
#[command(name = "drmesh-simnet")]
struct Args {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Number of sites (node i lives in site i % sites).
    #[arg(long, default_value_t = 4)]
    sites: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Datagram loss probability.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way latency inside a site, ms.
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// One-way latency between sites, ms.
    #[arg(long, default_value_t = 40)]
    wan_latency_ms: u64,
    /// Uniform extra delay 0..=jitter, ms.
    #[arg(long, default_value_t = 10)]
    jitter_ms: u64,
    /// Egress bandwidth per node, Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 100)]
    bandwidth_mbit: u64,
    /// Scenario.
    #[arg(long, value_enum, default_value_t = Kind::Steady)]
    scenario: Kind,
    /// Simulated length of the steady scenario, seconds.
    #[arg(long, default_value_t = 120)]
    duration_s: u64,
    /// Partition / crash length, seconds.
    #[arg(long, default_value_t = 3600)]
    outage_s: u64,
    /// Time after the heal / restart, seconds.
    #[arg(long, default_value_t = 300)]
    after_s: u64,
    /// One RP committed every this many ms (somewhere in the mesh).
    #[arg(long, default_value_t = 1000)]
    rp_every_ms: u64,
    /// SWIM probe period, ms.
    #[arg(long)]
    probe_ms: Option<u64>,
    /// Anti-entropy period, ms.
    #[arg(long)]
    anti_entropy_ms: Option<u64>,
    /// Run the scale benchmark instead: steady scenario at 1,000 and 10,000 nodes
    /// for 10 simulated minutes each (other flags apply).
    #[arg(long)]
    bench: bool,
}

fn config(args: &Args, nodes: usize) -> SimConfig {
    let mut c = SimConfig::new(nodes, args.seed);
    c.sites = args.sites.max(1);
    c.net.loss = args.loss;
    c.net.latency_ms = args.latency_ms;
    c.net.wan_latency_ms = args.wan_latency_ms;
    c.net.jitter_ms = args.jitter_ms;
    c.net.bandwidth_bytes_per_s = args.bandwidth_mbit * 125_000;
    if let Some(ms) = args.probe_ms {
        c.gossip.probe_period = Duration::from_millis(ms);
        c.gossip.probe_rtt = Duration::from_millis(ms * 2 / 5);
    }
    if let Some(ms) = args.anti_entropy_ms {
        c.gossip.anti_entropy_period = Duration::from_millis(ms);
    }
    c
}

fn scenario(args: &Args, nodes: usize) -> Scenario {
    match args.scenario {
        Kind::Steady => Scenario::steady(nodes, args.duration_s, args.rp_every_ms),
        Kind::Partition => Scenario::partition(nodes, args.sites, args.outage_s, args.after_s, args.rp_every_ms),
        Kind::Crash => Scenario::crash(nodes, args.outage_s, args.after_s, args.rp_every_ms),
        Kind::Expiry => Scenario::expiry_during_partition(nodes, args.sites, args.outage_s, args.after_s),
    }
}

fn run(cfg: SimConfig, sc: Scenario) -> Report {
    let started = Instant::now();
    let report = Simulator::new(cfg, sc).run();
    println!("{}", report.summary());
    println!(
        "wall {:.1} s | peak RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_bytes() as f64 / (1024.0 * 1024.0)
    );
    report
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.bench {
        for nodes in [1_000, 10_000] {
            println!("== {nodes} nodes, steady, 600 s simulated, seed {}, loss {}", args.seed, args.loss);
            run(config(&args, nodes), Scenario::steady(nodes, 600, args.rp_every_ms));
        }
        return ExitCode::SUCCESS;
    }
    let report = run(config(&args, args.nodes), scenario(&args, args.nodes));
    if report.resurrections > 0 || report.expired_alive_at_end > 0 {
        eprintln!("safety violated (seed {})", args.seed);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
