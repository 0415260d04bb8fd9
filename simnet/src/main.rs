//! `drmesh-simnet`: run a gossip scenario on a simulated mesh and print figures,
//! or (`drmesh-simnet relay …`) run a UDP relay that emulates a WAN link.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use drmesh_simnet::link::{LinkParams, QueueLimit};
use drmesh_simnet::relay::{DirectionStats, Relay, RelayConfig, RelayStats, LATENESS_BUCKETS_US};
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
///
/// Without a subcommand, runs a gossip scenario (flags below). `relay` runs a
/// UDP link emulator instead.
#[derive(Debug, Parser)]
#[command(name = "drmesh-simnet", args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay UDP datagrams through an emulated link (delay, jitter, loss,
    /// rate, drop-tail queue), NAT-style: each client gets its own upstream
    /// socket, and replies come back through the reverse link. "up" is client
    /// to --forward, "down" is the way back.
    Relay(Box<RelayArgs>),
    /// Run the replication world (session cores, in-memory store, seeded
    /// faults, promise checkers) over many seeds and print what the checkers found.
    Replication(ReplicationArgs),
}

#[derive(Debug, ClapArgs)]
struct ReplicationArgs {
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of seeds, from --seed on.
    #[arg(long, default_value_t = 100_000)]
    seeds: u64,
    /// Make the target acknowledge blobs before they are durable (the checkers must object).
    #[arg(long)]
    broken_applier: bool,
}

#[derive(Debug, ClapArgs)]
struct RelayArgs {
    /// UDP address to listen on for clients (port 0: any free port, printed).
    #[arg(long)]
    listen: SocketAddr,
    /// UDP address to forward clients' datagrams to.
    #[arg(long)]
    forward: SocketAddr,
    /// One-way delay, ms (RTT = up + down delay).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Extra one-way delay, uniform in 0..=jitter, ms.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Let jitter reorder datagrams (by at most the jitter); by default the link stays FIFO.
    #[arg(long)]
    reorder: bool,
    /// Datagram loss probability, 0.0..=1.0.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Link rate, Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Drop-tail queue before the rate limit, as its longest queueing delay, ms.
    #[arg(long, default_value_t = 50.0)]
    queue_ms: f64,
    /// Largest datagram payload the link carries, bytes; longer ones are
    /// dropped (1472 = a 1500-byte Ethernet MTU minus IPv4 and UDP headers;
    /// 0 = no limit).
    #[arg(long, default_value_t = drmesh_simnet::link::ETHERNET_UDP_PAYLOAD_BYTES)]
    mtu: usize,
    /// Up (client → forward) one-way delay, ms, instead of --delay-ms.
    #[arg(long)]
    up_delay_ms: Option<f64>,
    /// Down (forward → client) one-way delay, ms, instead of --delay-ms.
    #[arg(long)]
    down_delay_ms: Option<f64>,
    /// Up loss probability, instead of --loss.
    #[arg(long)]
    up_loss: Option<f64>,
    /// Down loss probability, instead of --loss.
    #[arg(long)]
    down_loss: Option<f64>,
    /// Up rate, Mbit/s, instead of --rate-mbit.
    #[arg(long)]
    up_rate_mbit: Option<f64>,
    /// Down rate, Mbit/s, instead of --rate-mbit.
    #[arg(long)]
    down_rate_mbit: Option<f64>,
    /// Seed of the loss and jitter decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print counters per direction every N seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    stats_every_s: u64,
}

/// Milliseconds from the command line as a duration.
fn ms_flag(name: &str, ms: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| format!("--{name} {ms}: not a duration in ms"))
}

/// Mbit/s from the command line as bit/s.
fn mbit_flag(name: &str, mbit: f64) -> Result<u64, String> {
    if mbit.is_finite() && mbit >= 0.0 {
        Ok((mbit * 1e6).round() as u64)
    } else {
        Err(format!("--{name} {mbit}: not a rate in Mbit/s"))
    }
}

fn link_params(a: &RelayArgs, up: bool) -> Result<LinkParams, String> {
    let pick = |common: f64, up_v: Option<f64>, down_v: Option<f64>| if up { up_v } else { down_v }.unwrap_or(common);
    let dir = if up { "up" } else { "down" };
    Ok(LinkParams {
        delay: ms_flag(&format!("{dir}-delay-ms"), pick(a.delay_ms, a.up_delay_ms, a.down_delay_ms))?,
        jitter: ms_flag("jitter-ms", a.jitter_ms)?,
        reorder: a.reorder,
        loss: pick(a.loss, a.up_loss, a.down_loss),
        rate_bits_per_s: mbit_flag(&format!("{dir}-rate-mbit"), pick(a.rate_mbit, a.up_rate_mbit, a.down_rate_mbit))?,
        queue: QueueLimit::Delay(ms_flag("queue-ms", a.queue_ms)?),
        mtu_bytes: (a.mtu > 0).then_some(a.mtu),
    })
}

/// One line of counters of one direction; rates over `secs` since `prev`.
fn direction_line(name: &str, now: &DirectionStats, prev: &DirectionStats, secs: f64) -> String {
    let sent = now.sent_packets + now.send_errors;
    let late_over_200us: u64 = now.lateness_hist[3..].iter().sum();
    let mean_late_us = if sent > 0 { now.lateness_total.as_secs_f64() * 1e6 / sent as f64 } else { 0.0 };
    // Datagrams per system call, which GRO and GSO raise above 1.
    let per_call = |pkts: u64, calls: u64| if calls > 0 { pkts as f64 / calls as f64 } else { 0.0 };
    let received = now.link.in_packets + now.dropped_overflow_packets;
    format!(
        "{name}: in {} pkt {} B | sent {} pkt {} B, {:.1} Mbit/s | drop loss {} queue {} mtu {} overflow {} | send errors {} | pending {} | late mean {:.0} us, >{} us {}, max {:.2} ms | pkt per recv {:.1}, per send {:.1}",
        now.link.in_packets,
        now.link.in_bytes,
        now.sent_packets,
        now.sent_bytes,
        (now.sent_bytes - prev.sent_bytes) as f64 * 8.0 / secs / 1e6,
        now.link.dropped_loss_packets,
        now.link.dropped_queue_packets,
        now.link.dropped_mtu_packets,
        now.dropped_overflow_packets,
        now.send_errors,
        now.pending_packets,
        mean_late_us,
        LATENESS_BUCKETS_US[2],
        late_over_200us,
        now.lateness_max.as_secs_f64() * 1e3,
        per_call(received, now.received_buffers),
        per_call(sent, now.send_calls),
    )
}

fn run_relay(a: &RelayArgs) -> ExitCode {
    let params = link_params(a, true).and_then(|up| Ok((up, link_params(a, false)?)));
    let (up, down) = match params {
        Ok(p) => p,
        Err(e) => {
            eprintln!("drmesh-simnet relay: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = RelayConfig::new(a.listen, a.forward, up);
    config.down = down;
    config.seed = a.seed;
    let relay = match Relay::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drmesh-simnet relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("relay listening on {}, forwarding to {}", relay.local_addr(), relay.forward_addr());
    // Runs until a signal ends the process (default SIGINT/SIGTERM handling).
    let period = Duration::from_secs(if a.stats_every_s == 0 { 3600 } else { a.stats_every_s });
    let mut prev = RelayStats::default();
    let mut prev_at = Instant::now();
    loop {
        std::thread::sleep(period);
        if a.stats_every_s == 0 {
            continue;
        }
        let now = relay.stats();
        let secs = prev_at.elapsed().as_secs_f64();
        prev_at = Instant::now();
        println!("{}", direction_line("up", &now.up, &prev.up, secs));
        println!("{}", direction_line("down", &now.down, &prev.down, secs));
        if now.refused_packets > 0 {
            println!("clients {} | refused {} pkt", now.clients, now.refused_packets);
        }
        prev = now;
    }
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
    if let Some(Command::Relay(r)) = &args.command {
        return run_relay(r);
    }
    if let Some(Command::Replication(r)) = &args.command {
        return run_replication(r);
    }
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

fn run_replication(args: &ReplicationArgs) -> ExitCode {
    use drmesh_simnet::replication::{run, ReplConfig};
    let started = Instant::now();
    let (mut committed, mut failed, mut crashes, mut gcs, mut bad_seeds) = (0usize, 0usize, 0usize, 0usize, 0u64);
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let r = run(ReplConfig { broken_applier: args.broken_applier, ..ReplConfig::swarm(seed) });
        committed += r.committed;
        failed += r.failed;
        crashes += r.crashes;
        gcs += r.gc_runs;
        if !r.violations.is_empty() {
            bad_seeds += 1;
            if bad_seeds <= 10 {
                for v in &r.violations {
                    println!("{v}");
                }
            }
        }
    }
    println!(
        "replication: seeds {}..{}: {committed} cycles committed, {failed} failed, {crashes} crashes, {gcs} GC runs; {bad_seeds} seeds with violations; {:.1} s",
        args.seed,
        args.seed.saturating_add(args.seeds),
        started.elapsed().as_secs_f64()
    );
    if bad_seeds == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
