//! simnet: a deterministic discrete-event simulator of the drmesh mesh.
//!
//! It drives the very same sans-IO gossip state machines the real node runs
//! ([`drmesh_actors::proto::gossip::GossipNode`]) with a seeded RNG, a virtual
//! clock and simulated links (latency, jitter, loss, bandwidth, partitions by
//! site), with no threads and no sockets, so a run is reproducible from its seed:
//! every processed event is fed to a blake3 hash ([`Report::trace_hash`]).
//!
//! A run is a [`SimConfig`] (network, gossip tunables, seed) plus a
//! [`Scenario`]: a list of timed [`Op`]s (commit an RP, expire RPs, cut a site
//! off, heal, crash nodes, restart them). Checkers watch from outside and end
//! up in the [`Report`]: convergence of every committed RP to every live node,
//! resurrections of expired RPs, failure-detection times, traffic.
//!
//! [`replication`] is a second world: the replication session cores of one
//! source and one target, cycle after cycle, with an in-memory store under
//! seeded faults (latency, failed and torn writes, crashes, GC racing the
//! cycles) and checkers for promises 1, 2, 3 and 6.
//!
//! Besides the simulator, [`link`] models one direction of a WAN link (delay,
//! jitter, loss, rate, drop-tail queue) as a sans-IO state machine, and
//! [`relay`] puts that model between two real UDP endpoints (the
//! `drmesh-simnet relay` command), since this kernel has no netem.

pub mod link;
pub mod relay;
pub mod replication;
pub mod scenario;
mod sim;

pub use scenario::{Op, Scenario};
pub use sim::{peak_rss_bytes, NetConfig, Report, SimConfig, Simulator};
