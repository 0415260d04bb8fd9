//! A proxy's share of its platforms' volumes: which of them this node reads
//! now, and the leases it keeps on them (the cores are in
//! [`crate::proto::lease`]; the scheduler drives this every tick).
//!
//! A volume whose `source` is a `[[platform]]` is planned on every proxy of
//! the platform; a proxy runs its cycles only while it is the volume's
//! reader by rendezvous hashing over the proxies gossip counts up (alive or
//! suspect) and holds the volume's lease from its first target. A consistency
//! group moves as one: its name is the hashing key of all its members.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drmesh_topology::{NodeId, Topology, Volume};
use serde::Serialize;

use crate::actor::gossip::LiveNodes;
use crate::proto::lease::{owner, LeaseKeeper, LeaseReply, LeaseRequest};
use crate::proto::time::Millis;
use crate::store::VolumeName;

/// For this long after start, proxies gossip has not heard of yet count as
/// up (gossip needs a few seconds to hear from everyone; a proxy that is
/// really down then holds its volumes back no longer than this).
const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// Retry after a lease request that got no answer (the target unreachable).
const RETRY_UNANSWERED: Duration = Duration::from_secs(1);

/// What the scheduler does for the leases, from [`Platforms::upkeep`].
#[derive(Debug)]
pub(crate) enum LeaseAction {
    /// Send `request` to the volume's first target, `target`.
    Send {
        /// The volume.
        volume: VolumeName,
        /// Its first target, which keeps the lease.
        target: String,
        /// Acquire (or renew) or release.
        request: LeaseRequest,
    },
    /// Stop the volume's running cycles with `reason`.
    Stop {
        /// The volume.
        volume: VolumeName,
        /// Why (the cycle fails with it).
        reason: String,
    },
}

/// A platform volume's state on this proxy, for `drmesh ctl volumes`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyRole {
    /// The platform.
    pub platform: String,
    /// The proxy reading the volume in this node's view (its name).
    pub reader: Option<String>,
    /// Whether that is this node.
    pub reads_here: bool,
    /// Seconds of lease left (this node's count; 0 when it holds none).
    pub lease_secs: f64,
    /// Why the last lease request did not get the lease, if it did not.
    pub lease_refusal: Option<String>,
}

/// This node's view of its platforms' volumes.
pub(crate) struct Platforms {
    origin: Instant,
    live: Option<LiveNodes>,
    keepers: BTreeMap<VolumeName, LeaseKeeper>,
}

impl Platforms {
    /// Nothing held, nobody heard of yet.
    pub(crate) fn new() -> Platforms {
        Platforms { origin: Instant::now(), live: None, keepers: BTreeMap::new() }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Who gossip counts up now.
    pub(crate) fn set_live(&mut self, live: LiveNodes) {
        self.live = Some(live);
    }

    /// The proxy that reads `volume` in this node's view (`me` always counts
    /// up); `None` for a volume read by one node.
    pub(crate) fn reader(&self, topology: &Topology, me: NodeId, volume: &Volume) -> Option<NodeId> {
        let platform = topology.platform_of(volume)?;
        let grace = self.origin.elapsed() < STARTUP_GRACE;
        let up: Vec<NodeId> = platform
            .proxies
            .iter()
            .filter_map(|name| topology.node_by_name(name).map(|n| n.id))
            .filter(|id| {
                *id == me
                    || match &self.live {
                        Some(live) => live.up.contains(id) || (grace && !live.heard.contains(id)),
                        None => grace,
                    }
            })
            .collect();
        let key = topology.group_of(&volume.name).map_or(volume.name.as_str(), |g| g.name.as_str());
        owner(key, &up).copied()
    }

    /// Why this node (`me`) may not start a cycle of `volume` now; `None`
    /// when it may (always, for a volume read by one node).
    pub(crate) fn held_back(&self, topology: &Topology, me: NodeId, volume: &VolumeName) -> Option<String> {
        let v = topology.volume_by_name(volume)?;
        let platform = topology.platform_of(v)?;
        let now = self.now();
        match self.reader(topology, me, v) {
            Some(reader) if reader != me => Some(format!(
                "volume \"{volume}\" of platform {} is read by proxy {} now, not by this node",
                platform.name,
                name_of(topology, reader)
            )),
            _ => match self.keepers.get(volume) {
                Some(k) if k.may_start(now) => None,
                keeper => Some(format!(
                    "this node reads volume \"{volume}\" of platform {} but waits for its lease from {}{}",
                    platform.name,
                    v.targets.first().map_or("?", String::as_str),
                    keeper.and_then(LeaseKeeper::last_refusal).map_or(String::new(), |why| format!(" ({why})"))
                )),
            },
        }
    }

    /// Whether this node reads `volume` now (always, for a volume read by one node).
    pub(crate) fn reads_here(&self, topology: &Topology, me: NodeId, volume: &VolumeName) -> bool {
        topology.volume_by_name(volume).and_then(|v| self.reader(topology, me, v)).is_none_or(|r| r == me)
    }

    /// One look at every platform volume this node (`me`, named `me_name`)
    /// is a proxy of: leases to ask for or renew, leases to give back (a
    /// volume that moved, once its cycle ended), cycles to stop (the volume
    /// moved, or the lease ran low). `running` says whether a volume has a
    /// cycle running.
    pub(crate) fn upkeep(&mut self, topology: &Topology, me: NodeId, me_name: &str, running: impl Fn(&VolumeName) -> bool) -> Vec<LeaseAction> {
        let now = self.now();
        let mut actions = Vec::new();
        let mut seen = Vec::new();
        for v in topology.readable_by(me_name) {
            let Some(platform) = topology.platform_of(v) else { continue };
            let Some(first) = v.targets.first() else { continue };
            seen.push(v.name.clone());
            let reader = self.reader(topology, me, v);
            let keeper = self.keepers.entry(v.name.clone()).or_insert_with(|| LeaseKeeper::new(platform.lease));
            let send = |request| LeaseAction::Send { volume: v.name.clone(), target: first.clone(), request };
            if reader == Some(me) {
                if keeper.poll_request(now) {
                    actions.push(send(LeaseRequest::Acquire { volume: v.name.clone() }));
                }
                if running(&v.name) && keeper.must_stop(now) {
                    actions.push(LeaseAction::Stop {
                        volume: v.name.clone(),
                        reason: format!(
                            "the lease on the volume from {first} runs out in {} ms and was not renewed ({}): stopped so that another proxy may read the VM, never two at once",
                            keeper.remaining(now).as_millis(),
                            keeper.last_refusal().unwrap_or("no answer")
                        ),
                    });
                }
            } else if running(&v.name) {
                let to = reader.map_or_else(|| "another proxy".to_string(), |r| format!("proxy {}", name_of(topology, r)));
                actions.push(LeaseAction::Stop { volume: v.name.clone(), reason: format!("the volume moved to {to} (gossip changed who is up)") });
            } else if keeper.held(now) {
                keeper.handle_released();
                actions.push(send(LeaseRequest::Release { volume: v.name.clone() }));
            }
        }
        self.keepers.retain(|v, _| seen.contains(v));
        actions
    }

    /// The answer to a lease request sent for `volume`.
    pub(crate) fn handle_reply(&mut self, volume: &VolumeName, request: &LeaseRequest, reply: Result<LeaseReply, String>) {
        if matches!(request, LeaseRequest::Release { .. }) {
            return;
        }
        let now = self.now();
        let Some(keeper) = self.keepers.get_mut(volume) else { return };
        match reply {
            Ok(LeaseReply::Granted { ttl_ms }) => keeper.handle_granted(Duration::from_millis(ttl_ms)),
            Ok(LeaseReply::Held { holder, remaining_ms }) => {
                let retry = Duration::from_millis(remaining_ms).clamp(Duration::from_millis(250), Duration::from_secs(5));
                keeper.handle_refused(now, format!("held by {holder} for {} ms more", remaining_ms), retry);
            }
            Ok(LeaseReply::Refused(why)) => {
                tracing::warn!(%volume, reason = %why, "the lease was refused");
                keeper.handle_refused(now, why, Duration::from_secs(10));
            }
            Ok(LeaseReply::Released) => keeper.handle_refused(now, "released".into(), Duration::ZERO),
            Err(e) => keeper.handle_failed(now, format!("no answer: {e}"), RETRY_UNANSWERED),
        }
    }

    /// `volume`'s role on this node, if it is a platform's.
    pub(crate) fn role(&self, topology: &Topology, me: NodeId, volume: &VolumeName) -> Option<ProxyRole> {
        let v = topology.volume_by_name(volume)?;
        let platform = topology.platform_of(v)?;
        let reader = self.reader(topology, me, v);
        let keeper = self.keepers.get(volume);
        Some(ProxyRole {
            platform: platform.name.clone(),
            reader: reader.map(|r| name_of(topology, r)),
            reads_here: reader == Some(me),
            lease_secs: keeper.map_or(0.0, |k| k.remaining(self.now()).as_secs_f64()),
            lease_refusal: keeper.and_then(LeaseKeeper::last_refusal).map(str::to_string),
        })
    }
}

fn name_of(topology: &Topology, id: NodeId) -> String {
    topology.node_by_id(&id).map_or_else(|| id.short(), |n| n.name.clone())
}
