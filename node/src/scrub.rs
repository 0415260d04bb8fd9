//! The node's scheduled scrubs: every `scrub_every` (a `[[node]]` key, default
//! weekly) the store is scrubbed in a thread of its own at idle I/O priority,
//! reading `scrub_sample` of the blobs; `drmesh ctl scrub` runs one at once.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::store::{ScrubOptions, ScrubReport, Store, StoreError};

/// How often the scheduler looks whether a scrub is due.
const TICK: Duration = Duration::from_secs(5);

/// Scrubs `store` with `share` of its blobs at low priority, logging the outcome.
pub fn run_scrub(store: &Store, share: f64, why: &str) -> Result<ScrubReport, StoreError> {
    tracing::info!(share, why, "scrub started");
    let stop = AtomicBool::new(false);
    let options = ScrubOptions { share, threads: 2, low_priority: true };
    let report = store.scrub(options, &stop, &|_, _| {})?;
    if report.blobs_bad > 0 || report.rps_damaged > 0 {
        for p in &report.problems {
            tracing::error!(object = %p.object, problem = %p.problem, "scrub found damage");
        }
        tracing::error!(
            blobs_read = report.blobs_read,
            blobs_bad = report.blobs_bad,
            rps_damaged = report.rps_damaged,
            "scrub done: damage found (`drmesh ctl scrubs` lists the RPs; `drmesh ctl scrub` runs again)"
        );
    } else {
        tracing::info!(blobs_read = report.blobs_read, bytes_read = report.bytes_read, rps = report.rps_checked, ms = report.duration_ms, "scrub done: every blob read and every RP sound");
    }
    Ok(report)
}

/// Starts the scheduled scrubs of this node (a thread that lives as long as the process).
pub fn start(data: Arc<DataPlane>) {
    let spawned = std::thread::Builder::new().name("scrub".into()).spawn(move || {
        // Due one interval after the last scrub (recorded in the store, or run
        // by this process), or after the node started when there was none; never
        // sooner than 10 minutes (or one interval) after a start.
        let started = Instant::now();
        let mut last_run: Option<Instant> = None;
        loop {
            std::thread::sleep(TICK);
            let topology = data.topology();
            let Some(me) = topology.node_by_id(&data.local()) else { continue };
            let Some(every) = me.scrub_every else { continue };
            let share = f64::from(me.scrub_sample_percent) / 100.0;
            let store = data.store();
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let recorded = store
                .scrubs(None)
                .ok()
                .and_then(|v| v.iter().map(|r| r.finished_unix_ms).max())
                .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms)));
            let since = match (last_run.map(|t| t.elapsed()), recorded) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => started.elapsed(),
            };
            let due = since >= every && started.elapsed() >= every.min(Duration::from_secs(600));
            if due {
                if let Err(e) = run_scrub(store, share, "scheduled") {
                    tracing::warn!(error = %e, "scheduled scrub failed; the next one is due one interval later");
                }
                last_run = Some(Instant::now());
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the scrub scheduler: no scheduled scrubs");
    }
}
