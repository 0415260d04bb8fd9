//! A platform volume's lease as the code that touches qemu sees it: a
//! proxy changes a VM's qemu state (takes a view, drops or merges its
//! bitmaps, cancels its job) only while it holds the volume's lease, since
//! another proxy may hold it afterwards and the objects it makes in qemu
//! carry the same names. The scheduler keeps each fence up to date from its
//! lease keeper ([`crate::proto::lease::LeaseKeeper`]); a view checks it
//! once it has the qemu monitor (which serves one client at a time, so
//! nobody else changes qemu until it lets go) and before it changes
//! anything, and a view whose lease is gone is left as it is in qemu (its
//! next reader cleans up what it left, as after a crash).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The lease one volume's views work under (cheap to clone; clones share it).
#[derive(Clone, Default)]
pub struct Fence(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    until: Option<Instant>,
    ttl: Duration,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({:?} left)", self.remaining())
    }
}

impl Fence {
    /// A fence holding nothing yet.
    pub fn new() -> Fence {
        Fence::default()
    }

    /// The lease is held until `until` (none: not held); a lease is `ttl` long.
    pub fn set(&self, until: Option<Instant>, ttl: Duration) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Held { until, ttl };
    }

    /// How long the lease is still held.
    pub fn remaining(&self) -> Duration {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.until.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()))
    }

    /// Whether a view may be taken now: at least half the lease left (what
    /// a cycle needs to start), else why not.
    pub fn may_take(&self) -> Result<(), String> {
        let (left, ttl) = (self.remaining(), self.0.lock().unwrap_or_else(PoisonError::into_inner).ttl);
        if left >= ttl / 2 && !left.is_zero() {
            Ok(())
        } else {
            Err(format!("the volume's lease has {} ms left, under half of its {} ms: no view is taken, so that no two proxies change the VM's qemu state at once", left.as_millis(), ttl.as_millis()))
        }
    }

    /// Whether a view may still be released or committed in qemu: an eighth
    /// of the lease left (the few monitor commands it takes). Else the view
    /// is left in qemu for its next reader.
    pub fn holds(&self) -> bool {
        let (left, ttl) = (self.remaining(), self.0.lock().unwrap_or_else(PoisonError::into_inner).ttl);
        !left.is_zero() && left >= ttl / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_is_taken_with_half_the_lease_and_let_go_with_an_eighth() {
        let f = Fence::new();
        assert!(f.may_take().is_err() && !f.holds(), "nothing held");
        let ttl = Duration::from_secs(8);
        f.set(Some(Instant::now() + ttl), ttl);
        assert!(f.may_take().is_ok() && f.holds());
        f.set(Some(Instant::now() + Duration::from_secs(3)), ttl);
        let why = f.may_take().unwrap_err();
        assert!(why.contains("under half of its 8000 ms"), "{why}");
        assert!(f.holds());
        f.set(Some(Instant::now() + Duration::from_millis(900)), ttl);
        assert!(!f.holds(), "less than an eighth left");
        // Clones share the lease.
        let g = f.clone();
        f.set(None, ttl);
        assert_eq!(g.remaining(), Duration::ZERO);
    }
}
