//! The one time type of the protocol cores: milliseconds since an origin the
//! driver picks (process start for a node, zero for simnet and tests). Cores
//! never read a clock; every `handle_*` and `poll_timeout` speaks in these.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since an origin the driver picks
/// (process start for the node, zero for simnet). Only differences matter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Millis {
        Millis(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}
