//! Which proxy reads a platform's volume, and the lease that makes sure only
//! one does at a time.
//!
//! A `[[platform]]` lists proxy nodes that can all reach a hypervisor's VMs.
//! Each of its volumes is read by one of them: [`owner`] picks it by
//! rendezvous hashing over the proxies gossip reports alive, so volumes
//! spread evenly and a proxy's death moves only its own volumes (when it
//! returns, they move back). Each proxy decides from its own gossip view,
//! and views differ for a while after a death or across a partition, so the
//! choice alone could let two proxies read one VM disk at once (each takes
//! qemu views and swaps its dirty bitmaps: two at once would lose changes).
//!
//! The lease closes that gap. The volume's first target keeps a
//! [`LeaseTable`]: it grants a volume to one proxy at a time for the
//! platform's `lease` time, renewed while the proxy keeps asking. A proxy
//! keeps a [`LeaseKeeper`] per volume it owns: it asks again once a quarter
//! of the lease has passed, starts a cycle only with at least half the
//! lease left, and stops the running cycle (which lets go of qemu) when
//! less than a quarter is left: after failed renewals, while the lease is
//! still its own. The proxy counts its lease from when it *sent* the
//! request, the target from when it *received* it, so the proxy's lease
//! always ends first, whatever the link's delay (clock rates, not clocks,
//! need to agree). A proxy that cannot reach the target loses the lease;
//! another proxy gets it only after it expired at the target.
//!
//! Sans-IO: the driver (the scheduler on the proxy, the data plane on the
//! target) brings the time and carries [`LeaseRequest`]/[`LeaseReply`] on a
//! lease stream.

use std::collections::BTreeMap;
use std::time::Duration;

use drmesh_topology::NodeId;
use serde::{Deserialize, Serialize};

use crate::blob::VolumeName;
use crate::time::Millis;

/// The proxy that reads the volume or group named `key` among `alive` (the
/// platform's proxies gossip reports alive, this node included when it is
/// one): the highest blake3 score of key and node id. The same on every node
/// that sees the same `alive`, whatever its order; `None` when it is empty.
pub fn owner<'a>(key: &str, alive: impl IntoIterator<Item = &'a NodeId>) -> Option<&'a NodeId> {
    alive.into_iter().max_by_key(|node| (score(key, node), node.as_bytes()))
}

fn score(key: &str, node: &NodeId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"drmesh placement v1\0");
    h.update(key.as_bytes());
    h.update(&[0]);
    h.update(node.as_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Proxy → the volume's first target, one per lease stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    /// Grant (or renew) the lease on `volume` to the asking node.
    Acquire {
        /// The platform's volume.
        volume: VolumeName,
    },
    /// The asking node no longer reads `volume`: its lease may go at once.
    Release {
        /// The platform's volume.
        volume: VolumeName,
    },
}

/// Target → proxy: the answer to one [`LeaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseReply {
    /// The request is not one this node answers (it says why). Kept first,
    /// in this shape, in every version (see [`crate::version`]).
    Refused(String),
    /// The lease is the asker's for `ttl_ms` from when the target read the request.
    Granted {
        /// The lease's length, the platform's `lease` in the target's topology.
        ttl_ms: u64,
    },
    /// Another proxy holds the lease.
    Held {
        /// Its node name (or short id).
        holder: String,
        /// How long it still holds it without renewing.
        remaining_ms: u64,
    },
    /// The asker's lease is gone (or was not held).
    Released,
}

/// What a [`LeaseTable`] answers to an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Granted or renewed until `now + ttl`.
    Granted,
    /// The target started less than the longest lease ago and may have
    /// granted leases it forgot: nothing is granted for `remaining` still.
    Starting {
        /// How long still.
        remaining: Duration,
    },
    /// Held by `holder` for `remaining` still.
    HeldBy {
        /// The node that holds it.
        holder: NodeId,
        /// How long it holds it without renewing.
        remaining: Duration,
    },
}

/// The leases a target keeps, one per volume (in memory: a target that
/// restarts grants none until the longest lease it could have granted has
/// passed, see [`LeaseTable::new`]).
#[derive(Debug, Clone)]
pub struct LeaseTable {
    leases: BTreeMap<VolumeName, (NodeId, Millis)>,
    /// No lease is granted before this (a restart forgets who held what).
    quiet_until: Millis,
}

impl LeaseTable {
    /// A table that grants nothing before `now + quiet`: a target that
    /// restarted may have granted leases it no longer remembers, so it waits
    /// for the longest of them to run out (pass the longest platform lease).
    pub fn new(now: Millis, quiet: Duration) -> LeaseTable {
        LeaseTable { leases: BTreeMap::new(), quiet_until: now.after(quiet) }
    }

    /// `who` asks for `volume` for `ttl`: granted when free, expired or
    /// already its own.
    pub fn handle_acquire(&mut self, now: Millis, volume: &VolumeName, who: NodeId, ttl: Duration) -> Grant {
        if now < self.quiet_until {
            return Grant::Starting { remaining: self.quiet_until.since(now) };
        }
        match self.leases.get(volume) {
            Some((holder, until)) if *holder != who && *until > now => Grant::HeldBy { holder: *holder, remaining: until.since(now) },
            _ => {
                self.leases.insert(volume.clone(), (who, now.after(ttl)));
                Grant::Granted
            }
        }
    }

    /// `who` lets go of `volume`; another's lease stays.
    pub fn handle_release(&mut self, volume: &VolumeName, who: NodeId) {
        if self.leases.get(volume).is_some_and(|(holder, _)| *holder == who) {
            self.leases.remove(volume);
        }
    }

    /// The node holding `volume` at `now`, if any.
    pub fn holder(&self, now: Millis, volume: &VolumeName) -> Option<NodeId> {
        self.leases.get(volume).filter(|(_, until)| *until > now).map(|(holder, _)| *holder)
    }

    /// When the quiet time after a start ends (nothing is granted before).
    pub fn quiet_until(&self) -> Millis {
        self.quiet_until
    }

    /// Forgets leases that ran out (bounded memory over a long run).
    pub fn handle_timeout(&mut self, now: Millis) {
        self.leases.retain(|_, (_, until)| *until > now);
    }
}

/// A proxy's side of one volume's lease: when to ask, whether a cycle may
/// start, when a running one must stop.
#[derive(Debug, Clone)]
pub struct LeaseKeeper {
    /// The lease is ours until then (counted from when we asked).
    until: Option<Millis>,
    /// The length of the last grant.
    ttl: Duration,
    /// The request in flight, sent then.
    asking_since: Option<Millis>,
    /// No request before this (after a failed one).
    next_ask: Millis,
    /// Why the last request did not get the lease.
    last_refusal: Option<String>,
}

impl LeaseKeeper {
    /// A keeper holding nothing yet, for a platform whose lease is `ttl`.
    pub fn new(ttl: Duration) -> LeaseKeeper {
        LeaseKeeper { until: None, ttl, asking_since: None, next_ask: Millis(0), last_refusal: None }
    }

    /// Whether to send an acquire now: no request in flight (one out longer
    /// than the lease counts as lost) and the lease missing or a quarter
    /// used. Returning `true` records the request as sent at `now`.
    pub fn poll_request(&mut self, now: Millis) -> bool {
        if let Some(since) = self.asking_since {
            if now.since(since) < self.ttl {
                return false;
            }
            self.asking_since = None;
        }
        if now < self.next_ask {
            return false;
        }
        let due = match self.until {
            None => true,
            Some(until) => until.since(now) <= self.ttl - self.ttl / 4,
        };
        if due {
            self.asking_since = Some(now);
        }
        due
    }

    /// The target granted the request sent at `sent` for `ttl`: the lease is
    /// ours until `sent + ttl` (the target read the request after `sent`, so
    /// its lease ends later, whatever the order answers come back in).
    pub fn handle_granted(&mut self, sent: Millis, ttl: Duration) {
        if self.asking_since.is_some_and(|a| a <= sent) {
            self.asking_since = None;
        }
        self.ttl = ttl;
        let until = sent.after(ttl);
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        self.last_refusal = None;
    }

    /// When the lease ends (counted here), if it is held.
    pub fn until(&self) -> Option<Millis> {
        self.until
    }

    /// The length of the last grant (or the platform's lease before any).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Another proxy holds the lease (or the target refused): ours is gone;
    /// ask again after `retry`.
    pub fn handle_refused(&mut self, now: Millis, why: String, retry: Duration) {
        self.asking_since = None;
        self.until = None;
        self.next_ask = now.after(retry);
        self.last_refusal = Some(why);
    }

    /// The request failed on the way (target unreachable): the lease, if
    /// any, runs on until it ends; ask again after `retry`.
    pub fn handle_failed(&mut self, now: Millis, why: String, retry: Duration) {
        self.asking_since = None;
        self.next_ask = now.after(retry);
        self.last_refusal = Some(why);
    }

    /// The lease was released (or is to be forgotten).
    pub fn handle_released(&mut self) {
        self.until = None;
        self.asking_since = None;
    }

    /// How long the lease is still ours (zero when it is not).
    pub fn remaining(&self, now: Millis) -> Duration {
        self.until.map_or(Duration::ZERO, |u| u.since(now))
    }

    /// Whether the lease is ours at `now`.
    pub fn held(&self, now: Millis) -> bool {
        !self.remaining(now).is_zero()
    }

    /// Whether a cycle may start: at least half the lease left.
    pub fn may_start(&self, now: Millis) -> bool {
        self.remaining(now) >= self.ttl / 2
    }

    /// Whether a running cycle must stop now: less than a quarter left (the
    /// renewals failed), so it lets go of qemu while the lease is still ours.
    pub fn must_stop(&self, now: Millis) -> bool {
        self.remaining(now) < self.ttl / 4
    }

    /// Why the last request did not get the lease, if it did not.
    pub fn last_refusal(&self) -> Option<&str> {
        self.last_refusal.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| NodeId::from_public_key(format!("proxy key {i}").as_bytes())).collect()
    }

    fn vol(name: &str) -> VolumeName {
        VolumeName::new(name.to_string()).unwrap()
    }

    #[test]
    fn volumes_spread_over_the_proxies_and_only_a_dead_ones_move() {
        let proxies = ids(3);
        let keys: Vec<String> = (0..3000).map(|i| format!("vm{i:04}")).collect();
        let before: Vec<NodeId> = keys.iter().map(|k| *owner(k, &proxies).unwrap()).collect();
        for p in &proxies {
            let n = before.iter().filter(|o| *o == p).count();
            // Even: a third each, within 10%.
            assert!((900..=1100).contains(&n), "{n} of 3000 on one proxy");
        }
        // The order the proxies are listed in does not matter.
        let reversed: Vec<NodeId> = proxies.iter().rev().copied().collect();
        assert!(keys.iter().zip(&before).all(|(k, o)| owner(k, &reversed) == Some(o)));
        // proxy 1 dies: its volumes go to the others, no other volume moves.
        let alive = [proxies[0], proxies[2]];
        for (k, o) in keys.iter().zip(&before) {
            let now = *owner(k, &alive).unwrap();
            if *o == proxies[1] {
                assert_ne!(now, proxies[1]);
            } else {
                assert_eq!(now, *o, "{k} moved though its proxy lives");
            }
        }
        assert_eq!(owner("vm0001", &[]), None);
    }

    #[test]
    fn a_lease_is_one_proxys_until_it_runs_out_or_is_released() {
        let [a, b] = ids(2)[..] else { unreachable!() };
        let v = vol("vm01");
        let ttl = Duration::from_secs(10);
        let mut table = LeaseTable::new(Millis(0), Duration::ZERO);
        assert_eq!(table.handle_acquire(Millis(1_000), &v, a, ttl), Grant::Granted);
        assert_eq!(table.handle_acquire(Millis(5_000), &v, b, ttl), Grant::HeldBy { holder: a, remaining: Duration::from_secs(6) });
        // a renews: b waits longer.
        assert_eq!(table.handle_acquire(Millis(6_000), &v, a, ttl), Grant::Granted);
        assert_eq!(table.handle_acquire(Millis(15_000), &v, b, ttl), Grant::HeldBy { holder: a, remaining: Duration::from_secs(1) });
        // a stops renewing: b gets it once it ran out, and a no longer has it.
        assert_eq!(table.handle_acquire(Millis(16_000), &v, b, ttl), Grant::Granted);
        assert_eq!(table.holder(Millis(16_001), &v), Some(b));
        assert!(matches!(table.handle_acquire(Millis(17_000), &v, a, ttl), Grant::HeldBy { holder, .. } if holder == b));
        // Releasing someone else's lease does nothing; one's own frees it.
        table.handle_release(&v, a);
        assert_eq!(table.holder(Millis(17_000), &v), Some(b));
        table.handle_release(&v, b);
        assert_eq!(table.holder(Millis(17_000), &v), None);
        assert_eq!(table.handle_acquire(Millis(17_001), &v, a, ttl), Grant::Granted);
        // Expired leases are forgotten.
        table.handle_timeout(Millis(40_000));
        assert_eq!(table.holder(Millis(40_000), &v), None);
    }

    #[test]
    fn a_restarted_target_grants_nothing_until_leases_it_forgot_ran_out() {
        let [a] = ids(1)[..] else { unreachable!() };
        let v = vol("vm01");
        let mut table = LeaseTable::new(Millis(100), Duration::from_secs(30));
        assert_eq!(table.handle_acquire(Millis(29_000), &v, a, Duration::from_secs(30)), Grant::Starting { remaining: Duration::from_millis(1_100) });
        assert_eq!(table.handle_acquire(Millis(30_100), &v, a, Duration::from_secs(30)), Grant::Granted);
    }

    #[test]
    fn a_keeper_renews_at_a_quarter_starts_at_half_and_stops_below_a_quarter() {
        let ttl = Duration::from_secs(20);
        let mut k = LeaseKeeper::new(ttl);
        assert!(!k.may_start(Millis(0)));
        assert!(k.poll_request(Millis(0)));
        // One request at a time.
        assert!(!k.poll_request(Millis(100)));
        // Granted: counted from when it was sent, not from the answer.
        k.handle_granted(Millis(0), ttl);
        assert_eq!(k.remaining(Millis(1_000)), Duration::from_secs(19));
        assert!(k.may_start(Millis(1_000)));
        // No renewal before a quarter is used, then one.
        assert!(!k.poll_request(Millis(4_000)));
        assert!(k.poll_request(Millis(5_000)));
        // The target is unreachable: the lease runs on, renewals are retried.
        k.handle_failed(Millis(6_000), "unreachable".into(), Duration::from_secs(1));
        assert!(!k.poll_request(Millis(6_500)));
        assert!(k.poll_request(Millis(7_000)));
        k.handle_failed(Millis(7_500), "unreachable".into(), Duration::from_secs(1));
        assert!(!k.may_start(Millis(10_001)), "less than half left");
        assert!(!k.must_stop(Millis(14_999)));
        assert!(k.must_stop(Millis(15_001)), "less than a quarter left");
        assert!(!k.held(Millis(20_000)));
        assert_eq!(k.last_refusal(), Some("unreachable"));
        // Held by another: gone at once.
        assert!(k.poll_request(Millis(21_000)));
        k.handle_granted(Millis(21_000), ttl);
        assert!(k.poll_request(Millis(26_000)));
        k.handle_refused(Millis(26_100), "held by p2".into(), Duration::from_secs(2));
        assert!(!k.held(Millis(26_100)));
        assert!(!k.poll_request(Millis(27_000)));
        assert!(k.poll_request(Millis(28_100)));
    }

    #[test]
    fn a_request_with_no_answer_for_a_whole_lease_counts_as_lost() {
        let ttl = Duration::from_secs(10);
        let mut k = LeaseKeeper::new(ttl);
        assert!(k.poll_request(Millis(0)));
        assert!(!k.poll_request(Millis(9_999)));
        assert!(k.poll_request(Millis(10_000)));
        // A late grant of the first request counts from when the first was
        // sent (the target may have read it at once), not from the second.
        k.handle_granted(Millis(0), ttl);
        assert_eq!(k.remaining(Millis(10_000)), Duration::ZERO);
        assert!(!k.poll_request(Millis(10_500)), "the second request is still out");
        k.handle_granted(Millis(10_000), ttl);
        assert_eq!(k.remaining(Millis(10_000)), ttl);
        // An answer to an older request never shortens a newer grant.
        k.handle_granted(Millis(5_000), ttl);
        assert_eq!(k.remaining(Millis(10_000)), ttl);
    }

    #[test]
    fn replies_keep_their_refusal_first() {
        let refused = postcard::to_allocvec(&LeaseReply::Refused("no".into())).unwrap();
        assert_eq!(refused, [0, 2, b'n', b'o']);
    }
}
