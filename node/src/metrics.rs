//! The node's Prometheus metrics (OpenMetrics text, served at `/metrics` when
//! `[[node]] metrics` is set): names carry the `drmesh_` prefix and base
//! units (seconds, bytes), counters end in `_total`. docs/operations.md lists
//! every metric; examples/prometheus-alerts.yml uses them.
//!
//! Counters count since the node started (Prometheus' `rate()` and
//! `increase()` handle the reset at a restart). Volume gauges come from the
//! node's own gossip replica, so any node answers for the whole mesh;
//! replication gauges and counters are this node's (as a source).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode as write_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::http::NodeView;

/// The media type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterFamily = Family<Labels, Counter<u64>>;

/// A registry filled once per scrape.
struct Sheet(Registry);

impl Sheet {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> GaugeFamily {
        let family = GaugeFamily::default();
        match unit {
            Some(unit) => self.0.register_with_unit(name, help, unit, family.clone()),
            None => self.0.register(name, help, family.clone()),
        }
        family
    }

    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> CounterFamily {
        let family = CounterFamily::default();
        match unit {
            Some(unit) => self.0.register_with_unit(name, help, unit, family.clone()),
            None => self.0.register(name, help, family.clone()),
        }
        family
    }
}

impl Sheet {
    /// A gauge without labels.
    fn value(&mut self, name: &str, help: &str, unit: Option<Unit>, value: f64) {
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(value);
        match unit {
            Some(unit) => self.0.register_with_unit(name, help, unit, gauge),
            None => self.0.register(name, help, gauge),
        }
    }

    /// A counter without labels.
    fn total(&mut self, name: &str, help: &str, unit: Option<Unit>, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        match unit {
            Some(unit) => self.0.register_with_unit(name, help, unit, counter),
            None => self.0.register(name, help, counter),
        }
    }
}

fn set(family: &GaugeFamily, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

fn count(family: &CounterFamily, labels: Labels, value: u64) {
    family.get_or_create(&labels).inc_by(value);
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

#[allow(clippy::cast_precision_loss)] // byte counts and times as f64 gauges: exact below 2^53
fn float(v: u64) -> f64 {
    v as f64
}

/// The metrics of one look at the node, as OpenMetrics text.
pub fn encode(view: &NodeView) -> String {
    let mut sheet = Sheet(Registry::with_prefix("drmesh"));
    let build = sheet.gauge("build_info", "The drmesh version this node runs (always 1)", None);
    set(&build, vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1.0);

    if let Some(mesh) = &view.mesh {
        sheet.value("uptime", "Seconds since the node started", Some(Unit::Seconds), float(mesh.uptime_secs));
        sheet.value("topology_version", "The [mesh] version of the topology file in force", None, float(mesh.topology_version));
        let connected = sheet.gauge("peer_connected", "1 when the QUIC connection to the peer is up", None);
        let rtt = sheet.gauge("peer_rtt", "Smoothed round-trip time to the peer (connected peers only)", Some(Unit::Seconds));
        let matches = sheet.gauge("peer_topology_matches", "1 when the peer runs the same topology file (0: it differs; absent: not known yet)", None);
        let connects = sheet.counter("peer_connects", "Connections to the peer established", None);
        let sent = sheet.counter("peer_sent", "UDP bytes sent to the peer", Some(Unit::Bytes));
        let received = sheet.counter("peer_received", "UDP bytes received from the peer", Some(Unit::Bytes));
        for p in &mesh.peers {
            let labels = || vec![("peer", p.name.clone())];
            set(&connected, labels(), flag(p.state == "connected"));
            if let Some(ms) = p.rtt_ms {
                set(&rtt, labels(), ms / 1000.0);
            }
            if let Some(m) = p.topology_matches {
                set(&matches, labels(), flag(m));
            }
            count(&connects, labels(), p.connect_count);
            count(&sent, labels(), p.sent_bytes);
            count(&received, labels(), p.received_bytes);
        }
    }

    if let Some(members) = &view.members {
        let states = sheet.gauge("gossip_members", "Members of the mesh by gossip state, as this node sees them (unknown: listed, never heard)", None);
        for state in ["alive", "suspect", "down", "unknown"] {
            let n = members.members.iter().filter(|m| m.state == state).count();
            set(&states, vec![("state", state.to_string())], float(n as u64));
        }
    }

    if let Some(catalog) = &view.catalog {
        let rpo = sheet.gauge("volume_rpo", "The volume's recovery point objective", Some(Unit::Seconds));
        let last = sheet.gauge("volume_last_rp_timestamp", "Snapshot instant of the volume's newest RP (Unix time)", Some(Unit::Seconds));
        let age = sheet.gauge("volume_last_rp_age", "Age of the volume's newest RP", Some(Unit::Seconds));
        let met = sheet.gauge("volume_rpo_met", "1 when the volume's newest RP is younger than its RPO", None);
        let rps = sheet.gauge("volume_recovery_points", "RPs of the volume kept in the mesh", None);
        let verified = sheet.gauge("volume_last_verified_timestamp", "When a drill last proved an RP of the volume recovers (Unix time)", Some(Unit::Seconds));
        let overdue = sheet.gauge("volume_verification_overdue", "1 when the volume's policy asks for drills and none proved an RP within its max_unverified_age", None);
        let drills = sheet.gauge("volume_drilled_recovery_points", "RPs of the volume with a drill result, by result", None);
        // RPs with a drill verdict per volume, (passed, failed), in one pass.
        let mut drilled: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
        for rp in &catalog.rps {
            let entry = drilled.entry(rp.volume.as_str()).or_default();
            match rp.drill_passed {
                Some(true) => entry.0 += 1,
                Some(false) => entry.1 += 1,
                None => {}
            }
        }
        for v in &catalog.volumes {
            let labels = || vec![("volume", v.volume.to_string())];
            if let Some(s) = v.rpo_secs {
                set(&rpo, labels(), float(s));
            }
            if let Some(ms) = v.last_rp_unix_ms {
                set(&last, labels(), float(ms) / 1000.0);
            }
            if let Some(s) = v.last_rp_age_secs {
                set(&age, labels(), float(s));
            }
            if let Some(m) = v.rpo_met {
                set(&met, labels(), flag(m));
            }
            set(&rps, labels(), float(v.rp_count as u64));
            if let Some(ms) = v.verification.as_ref().and_then(|ver| ver.verified_unix_ms) {
                set(&verified, labels(), float(ms) / 1000.0);
            }
            set(&overdue, labels(), flag(v.verification.as_ref().is_some_and(|ver| ver.overdue)));
            let (passed, failed) = drilled.get(v.volume.as_str()).copied().unwrap_or_default();
            set(&drills, vec![("volume", v.volume.to_string()), ("result", "passed".into())], float(passed));
            set(&drills, vec![("volume", v.volume.to_string()), ("result", "failed".into())], float(failed));
        }
    }

    if let Some(replications) = &view.replications {
        let cycles = sheet.counter("replication_cycles", "Replication cycles that ended, by result (ok: an RP was committed)", None);
        let read = sheet.counter("replication_read", "Bytes read from the source by committed cycles", Some(Unit::Bytes));
        let sent = sheet.counter("replication_sent_payload", "Blob payload bytes sent to the target (compressed, before encryption)", Some(Unit::Bytes));
        let free = sheet.counter("replication_free_space_skipped", "Bytes of free filesystem space committed cycles did not read or zeroed", Some(Unit::Bytes));
        let success = sheet.gauge("replication_last_cycle_success", "1 when the last cycle committed an RP, 0 when it failed", None);
        let duration = sheet.gauge("replication_last_cycle_duration", "Wall time of the last committed cycle", Some(Unit::Seconds));
        let last_sent = sheet.gauge("replication_last_cycle_sent_payload", "Payload bytes the last committed cycle sent", Some(Unit::Bytes));
        let last_end = sheet.gauge("replication_last_cycle_end_timestamp", "When the last committed cycle ended (Unix time)", Some(Unit::Seconds));
        let running = sheet.gauge("replication_running", "1 while a cycle runs", None);
        let progress = sheet.gauge("replication_progress_ratio", "How far the running cycle's reader is through the volume (0 to 1)", None);
        let paused = sheet.gauge("replication_paused", "1 while the volume is paused (drmesh ctl pause)", None);
        for r in replications {
            let labels = || vec![("volume", r.volume.to_string()), ("target", r.target.clone())];
            let with_result = |result: &str| vec![("volume", r.volume.to_string()), ("target", r.target.clone()), ("result", result.to_string())];
            count(&cycles, with_result("ok"), r.totals.cycles_ok);
            count(&cycles, with_result("failed"), r.totals.cycles_failed);
            count(&read, labels(), r.totals.read_bytes);
            count(&sent, labels(), r.totals.sent_payload_bytes);
            count(&free, labels(), r.totals.free_skipped_bytes);
            if r.last_error.is_some() {
                set(&success, labels(), 0.0);
            } else if r.last_ok.is_some() {
                set(&success, labels(), 1.0);
            }
            if let Some(last) = &r.last_ok {
                set(&duration, labels(), last.report.duration_secs);
                set(&last_sent, labels(), float(last.report.stats.sent_payload_bytes));
                set(&last_end, labels(), float(last.finished_unix_ms) / 1000.0);
            }
            set(&running, labels(), flag(r.running));
            if let Some(p) = &r.running_progress {
                set(&progress, labels(), p.percent / 100.0);
            }
            set(&paused, labels(), flag(r.paused_since_unix_ms.is_some()));
        }
    }

    if let Some(store) = &view.store {
        sheet.value("store_blobs", "Blobs in this node's store", None, float(store.blob_count));
        sheet.value("store_blob", "Bytes of the store's blob files", Some(Unit::Bytes), float(store.blob_bytes));
        sheet.value("store_catalog", "Bytes of the store's catalog file", Some(Unit::Bytes), float(store.catalog_bytes));
        sheet.value("store_recovery_points", "RPs held by this node's store", None, float(store.rp_count));
    }

    let gc = &view.gc;
    let runs = sheet.counter("gc_runs", "Garbage collections of the store, by result (dry runs not counted)", None);
    count(&runs, vec![("result", "ok".into())], gc.runs);
    count(&runs, vec![("result", "failed".into())], gc.failed_runs);
    sheet.total("gc_deleted_blobs", "Blobs the garbage collections deleted", None, gc.blobs_deleted);
    sheet.total("gc_freed", "Bytes the garbage collections freed", Some(Unit::Bytes), gc.bytes_freed);
    if let Some(ms) = gc.last_run_unix_ms {
        sheet.value("gc_last_run_timestamp", "When the last garbage collection ended (Unix time)", Some(Unit::Seconds), float(ms) / 1000.0);
        sheet.value("gc_last_duration", "Wall time of the last garbage collection", Some(Unit::Seconds), float(gc.last_duration_ms) / 1000.0);
    }

    let mut out = String::new();
    if let Err(e) = write_text(&mut out, &sheet.0) {
        // Writing into a String does not fail; keep what was written.
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}
