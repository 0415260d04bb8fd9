//! Readiness for systemd (`Type=notify`, sd_notify(3)): `READY=1` once the
//! node serves (admin socket bound, mesh and gossip started), `STOPPING=1`
//! when a graceful stop begins. Without `NOTIFY_SOCKET` (not started by
//! systemd) both are no-ops.

use sd_notify::NotifyState;

/// Tells the service manager the node is ready, with a one-line status.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager a graceful stop has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState<'_>]) {
    // NOTIFY_SOCKET stays set (unset_env false): STOPPING=1 needs it later, and
    // changing the environment of a running multi-threaded process is unsound.
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
