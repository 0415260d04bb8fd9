//! The node's scheduled garbage collection: every `gc_every` (a `[[node]]`
//! key, default one day, `"off"` for never) the store deletes the blobs no
//! kept recovery point needs and that are older than one interval (at least
//! the 60 s of `drmesh ctl gc`): what a paused or interrupted initial copy
//! stored survives a pause shorter than the interval, so its resumed cycle
//! does not send it again. Safe while cycles run (the store pins what running
//! sessions use). The first one runs `gc_every` after the start, or 10
//! minutes after it when that is sooner, so a node that restarts often still
//! collects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drmesh_actors::actor::applier::DataPlane;

use crate::data::DEFAULT_GC_GRACE;

/// How often the schedule is looked at.
const TICK: Duration = Duration::from_secs(1);
/// The first collection after a start comes at most this long after it.
const FIRST_AFTER_START_MAX: Duration = Duration::from_secs(600);

/// Starts the scheduled collections of this node.
pub fn start(data: Arc<DataPlane>) {
    actix_rt::spawn(async move {
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        loop {
            tokio::time::sleep(TICK).await;
            let topology = data.topology();
            let Some(every) = topology.node_by_id(&data.local()).and_then(|me| me.gc_every) else { continue };
            let due = match last {
                Some(t) => t.elapsed() >= every,
                None => started.elapsed() >= every.min(FIRST_AFTER_START_MAX),
            };
            if !due {
                continue;
            }
            let store = data.store().clone();
            let grace = every.max(DEFAULT_GC_GRACE);
            match tokio::task::spawn_blocking(move || store.gc(grace)).await {
                Ok(Ok(r)) => tracing::info!(deleted = r.blobs_deleted, freed = r.bytes_freed, scanned = r.blobs_scanned, ms = r.duration_ms, "scheduled garbage collection done"),
                Ok(Err(e)) => tracing::warn!(error = %e, "scheduled garbage collection failed; the next one is due one interval later"),
                Err(e) => tracing::warn!(error = %e, "scheduled garbage collection failed; the next one is due one interval later"),
            }
            last = Some(Instant::now());
        }
    });
}
