//! A congestion window that lets a connection's CONNECTION_CLOSE out.
//!
//! quinn 0.11 gates the packet that carries CONNECTION_CLOSE by the congestion
//! window whenever the connection still has frames queued (stream data,
//! datagrams). Once a connection is closed it no longer processes acks, so the
//! bytes in flight never drain: if the window was full at the instant of the
//! close, the close packet is never sent, the connection is forgotten after
//! its drain period, and the peer learns of it only by a stateless reset (or
//! its idle timeout), without the reason. quinn fixed this upstream (issue
//! 2785, "Send CONNECTION_CLOSE even when congestion blocked"); no 0.11
//! release carries the fix.
//!
//! [`ClosingWindow`] wraps the controller a node runs and shares a flag with
//! every copy quinn hands out (`Connection::congestion_state`). [`close`]
//! closes the connection, then sets the flag, which makes the window
//! unbounded, then calls close again, which only wakes the connection's
//! driver. A closed connection sends nothing but ACK and CONNECTION_CLOSE
//! frames, so the unbounded window lets out the close packet and its
//! repetitions (answers to the peer's packets while closing) and nothing
//! else. A fixed allowance above the window would not do: after a loss the
//! window can sit far below what is in flight.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The window of a closing connection: far above anything in flight, and
/// small enough that quinn's pacer arithmetic (window × burst interval in
/// u128 nanoseconds) stays exact.
pub const CLOSING_WINDOW_BYTES: u64 = 1 << 50;

/// Factory wrapping another factory's controllers in [`ClosingWindow`].
pub struct ClosingWindowConfig {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
}

impl ClosingWindowConfig {
    /// Wraps the controllers `inner` builds.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>) -> Self {
        ClosingWindowConfig { inner }
    }
}

impl ControllerFactory for ClosingWindowConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ClosingWindow { inner: self.inner.clone().build(now, current_mtu), closing: Arc::new(AtomicBool::new(false)) })
    }
}

/// A controller whose window is [`CLOSING_WINDOW_BYTES`] once its connection
/// is closed by [`close`]; until then it is exactly the inner controller.
pub struct ClosingWindow {
    inner: Box<dyn Controller>,
    /// Shared by every clone, so the copy `congestion_state` returns reaches
    /// the controller quinn runs.
    closing: Arc<AtomicBool>,
}

impl Controller for ClosingWindow {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        if self.closing.load(Ordering::Relaxed) {
            CLOSING_WINDOW_BYTES
        } else {
            self.inner.window()
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(ClosingWindow { inner: self.inner.clone_box(), closing: self.closing.clone() })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Closes `connection` with `code` and `reason` so that the peer receives
/// them even when the congestion window is full (see the module docs).
/// Connections whose controller is not a [`ClosingWindow`] are closed as
/// quinn does by itself.
pub fn close(connection: &quinn::Connection, code: u32, reason: &[u8]) {
    // Closed first: from here on the connection sends only ACK and
    // CONNECTION_CLOSE frames, so the unbounded window lets out nothing else.
    connection.close(code.into(), reason);
    if let Ok(window) = connection.congestion_state().into_any().downcast::<ClosingWindow>() {
        window.closing.store(true, Ordering::Relaxed);
        // Already closed, so this changes nothing but wakes the driver, which
        // may have found the close packet blocked meanwhile.
        connection.close(code.into(), reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_closing_flag_and_open_the_window() {
        let now = Instant::now();
        let factory = Arc::new(ClosingWindowConfig::new(Arc::new(quinn::congestion::CubicConfig::default())));
        let controller = factory.build(now, 1200);
        assert!(controller.window() < CLOSING_WINDOW_BYTES);
        let copy = controller.clone_box().into_any().downcast::<ClosingWindow>().ok().unwrap();
        copy.closing.store(true, Ordering::Relaxed);
        assert_eq!(controller.window(), CLOSING_WINDOW_BYTES);
    }
}
