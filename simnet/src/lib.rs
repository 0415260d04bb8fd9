//! simnet: a deterministic discrete-event simulator of the drmesh mesh.
//!
//! It will drive the very same sans-IO state machines the real node runs (gossip,
//! replication sessions) with a seeded RNG, a virtual clock and simulated links
//! (latency, jitter, loss, bandwidth, partitions), so a run is reproducible from
//! its seed. Nothing lives here yet: the simulator arrives with the gossip work.
