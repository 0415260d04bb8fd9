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
use crate::source::fence::Fence;
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
        /// When it is sent (this node's lease counts from then).
        sent: Millis,
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
    /// Each keeper's lease as the views of its volume see it.
    fences: BTreeMap<VolumeName, Fence>,
}

impl Platforms {
    /// Nothing held, nobody heard of yet.
    pub(crate) fn new() -> Platforms {
        Platforms::started_at(Instant::now())
    }

    /// As [`Platforms::new`], for a node that started at `origin`.
    fn started_at(origin: Instant) -> Platforms {
        Platforms { origin, live: None, keepers: BTreeMap::new(), fences: BTreeMap::new() }
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

    /// The rendezvous choice for `volume` among `up` (tests).
    #[cfg(test)]
    fn reader_among(&self, topology: &Topology, volume: &Volume, up: &[NodeId]) -> Option<NodeId> {
        let key = topology.group_of(&volume.name).map_or(volume.name.as_str(), |g| g.name.as_str());
        owner(key, up).copied()
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
            let send = |request| LeaseAction::Send { volume: v.name.clone(), target: first.clone(), request, sent: now };
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
        self.fences.retain(|v, _| seen.contains(v));
        self.sync_fences();
        actions
    }

    /// The fence of platform volume `volume`'s views (`None` for a volume
    /// read by one node): held while this node holds its lease.
    pub(crate) fn fence(&mut self, topology: &Topology, volume: &VolumeName) -> Option<Fence> {
        topology.volume_by_name(volume).and_then(|v| topology.platform_of(v))?;
        let fence = self.fences.entry(volume.clone()).or_default().clone();
        self.sync_fences();
        Some(fence)
    }

    /// Each fence set from its keeper.
    fn sync_fences(&self) {
        for (volume, fence) in &self.fences {
            match self.keepers.get(volume) {
                Some(k) => fence.set(k.until().map(|u| self.origin + Duration::from_millis(u.0)), k.ttl()),
                None => fence.set(None, Duration::ZERO),
            }
        }
    }

    /// The answer to a lease request sent for `volume` at `sent`.
    pub(crate) fn handle_reply(&mut self, volume: &VolumeName, request: &LeaseRequest, sent: Millis, reply: Result<LeaseReply, String>) {
        self.apply_reply(volume, request, sent, reply);
        self.sync_fences();
    }

    fn apply_reply(&mut self, volume: &VolumeName, request: &LeaseRequest, sent: Millis, reply: Result<LeaseReply, String>) {
        if matches!(request, LeaseRequest::Release { .. }) {
            return;
        }
        let now = self.now();
        let Some(keeper) = self.keepers.get_mut(volume) else { return };
        match reply {
            Ok(LeaseReply::Granted { ttl_ms }) => keeper.handle_granted(sent, Duration::from_millis(ttl_ms)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn id(n: u8) -> NodeId {
        NodeId::from_public_key(&[n; 32])
    }

    /// Proxies a, b, c of platform hv; target t; volumes vm0..vm9 of the platform and `own` of node a.
    fn topology() -> Topology {
        let mut text = String::from("[mesh]\nname = \"m\"\nversion = 1\n");
        for (i, name) in ["a", "b", "c", "t"].iter().enumerate() {
            text += &format!("[[node]]\nname = \"{name}\"\nid = \"{}\"\naddresses = [\"10.0.0.{}:7400\"]\nsite = \"s\"\n", id(i as u8 + 1), i + 1);
        }
        text += "[[platform]]\nname = \"hv\"\nproxies = [\"a\", \"b\", \"c\"]\nlease = \"8s\"\n";
        for v in 0..10 {
            text += &format!("[[volume]]\nname = \"vm{v}\"\nsource = \"hv\"\nkind = \"qemu\"\nmonitor = \"/run/q.qmp\"\nnode = \"d{v}\"\nfleece_dir = \"/var/tmp/f\"\ntargets = [\"t\"]\npolicy = \"p\"\n");
        }
        text += "[[volume]]\nname = \"own\"\nsource = \"a\"\nkind = \"file\"\npath = \"/img\"\ntargets = [\"t\"]\npolicy = \"p\"\n[policy.p]\nrpo = \"1m\"\n";
        Topology::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn vol(name: &str) -> VolumeName {
        VolumeName::new(name.to_string()).unwrap()
    }

    /// A node that started a minute ago (past the start-up grace).
    fn settled() -> Platforms {
        Platforms::started_at(Instant::now().checked_sub(Duration::from_secs(60)).unwrap())
    }

    #[test]
    fn the_proxies_gossip_counts_up_share_the_volumes_and_agree() {
        let t = topology();
        let (a, b, c) = (id(1), id(2), id(3));
        let views: Vec<Platforms> = [a, b, c]
            .iter()
            .map(|_| {
                let mut p = settled();
                p.set_live(LiveNodes { up: vec![a, b, c], heard: vec![a, b, c] });
                p
            })
            .collect();
        for v in t.volumes.iter().filter(|v| v.name.starts_with("vm")) {
            let readers: Vec<Option<NodeId>> = [a, b, c].iter().zip(&views).map(|(me, p)| p.reader(&t, *me, v)).collect();
            assert!(readers.iter().all(|r| *r == readers[0] && r.is_some()), "{}: {readers:?}", v.name);
        }
        // A volume read by one node has no reader to choose and is never held back.
        let own = t.volume_by_name("own").unwrap();
        assert_eq!(views[0].reader(&t, a, own), None);
        assert_eq!(views[0].held_back(&t, a, &vol("own")), None);
        // c is down: nobody chooses it; a and b agree on the rest.
        let mut pa = settled();
        pa.set_live(LiveNodes { up: vec![a, b], heard: vec![a, b, c] });
        for v in t.volumes.iter().filter(|v| v.name.starts_with("vm")) {
            assert_ne!(pa.reader(&t, a, v), Some(c));
        }
    }

    #[test]
    fn in_the_start_up_grace_proxies_not_heard_of_count_up() {
        let t = topology();
        let (a, b, c) = (id(1), id(2), id(3));
        let v = t.volumes.iter().find(|v| settled().reader_among(&t, v, &[a, b, c]) == Some(c)).expect("a volume c reads");
        let mut fresh = Platforms::new();
        fresh.set_live(LiveNodes { up: vec![a], heard: vec![a] });
        assert_eq!(fresh.reader(&t, a, v), Some(c), "c not heard of yet: it counts");
        let mut later = settled();
        later.set_live(LiveNodes { up: vec![a], heard: vec![a] });
        assert_ne!(later.reader(&t, a, v), Some(c), "after the grace only who gossip counts up");
        // Heard of and down: not even in the grace.
        fresh.set_live(LiveNodes { up: vec![a], heard: vec![a, c] });
        assert_ne!(fresh.reader(&t, a, v), Some(c));
    }

    #[test]
    fn the_reader_asks_for_the_lease_starts_with_it_and_gives_it_back_when_the_volume_moves() {
        let t = topology();
        let (a, b, c) = (id(1), id(2), id(3));
        let mut p = settled();
        p.set_live(LiveNodes { up: vec![a, b], heard: vec![a, b] });
        let mine = t.volumes.iter().find(|v| v.name.starts_with("vm") && p.reader(&t, a, v) == Some(a)).expect("a volume a reads").name.clone();
        assert!(p.held_back(&t, a, &mine).unwrap().contains("waits for its lease from t"));
        let actions = p.upkeep(&t, a, "a", |_| false);
        let asked: Vec<&VolumeName> = actions
            .iter()
            .filter_map(|x| match x {
                LeaseAction::Send { volume, target, request: LeaseRequest::Acquire { .. }, .. } if target == "t" => Some(volume),
                _ => None,
            })
            .collect();
        assert!(asked.contains(&&mine), "{actions:?}");
        // Nothing is asked for a volume another proxy reads, nor for one read by one node.
        assert!(asked.iter().all(|v| p.reader(&t, a, t.volume_by_name(v).unwrap()) == Some(a)));
        let sent = actions.iter().find_map(|x| match x {
            LeaseAction::Send { volume, sent, .. } if *volume == mine => Some(*sent),
            _ => None,
        });
        let fence = p.fence(&t, &mine).expect("a platform volume's fence");
        assert!(fence.may_take().is_err(), "no lease yet");
        p.handle_reply(&mine, &LeaseRequest::Acquire { volume: mine.clone() }, sent.unwrap(), Ok(LeaseReply::Granted { ttl_ms: 8000 }));
        assert!(fence.may_take().is_ok() && fence.holds(), "the fence follows the lease: {fence:?}");
        assert!(p.fence(&t, &vol("own")).is_none(), "a volume read by one node has no fence");
        assert_eq!(p.held_back(&t, a, &mine), None);
        let role = p.role(&t, a, &mine).unwrap();
        assert!(role.reads_here && role.lease_secs > 7.0 && role.platform == "hv", "{role:?}");
        // No renewal yet (a quarter of the lease has not passed).
        assert!(p.upkeep(&t, a, "a", |_| false).iter().all(|x| !matches!(x, LeaseAction::Send { volume, .. } if *volume == mine)));
        // A volume another proxy reads, whose lease a still holds (it read it
        // until gossip changed): stopped while running; then, not running,
        // its lease given back.
        let mut q = settled();
        q.set_live(LiveNodes { up: vec![a, b, c], heard: vec![a, b, c] });
        let vb = t.volumes.iter().find(|v| v.name.starts_with("vm") && q.reader(&t, a, v) != Some(a)).expect("a volume another proxy reads").name.clone();
        let now = q.now();
        let mut held = LeaseKeeper::new(Duration::from_secs(8));
        held.poll_request(now);
        held.handle_granted(now, Duration::from_secs(8));
        q.keepers.insert(vb.clone(), held);
        let actions = q.upkeep(&t, a, "a", |v| *v == vb);
        assert!(actions.iter().any(|x| matches!(x, LeaseAction::Stop { volume, reason } if *volume == vb && reason.contains("moved to proxy"))), "{actions:?}");
        let actions = q.upkeep(&t, a, "a", |_| false);
        assert!(actions.iter().any(|x| matches!(x, LeaseAction::Send { volume, request: LeaseRequest::Release { .. }, .. } if *volume == vb)), "{actions:?}");
        assert!(q.held_back(&t, a, &vb).unwrap().contains("is read by proxy"), "{:?}", q.held_back(&t, a, &vb));
    }

    #[test]
    fn a_lease_held_by_another_or_refused_keeps_the_reader_waiting_and_says_why() {
        let t = topology();
        let a = id(1);
        let mut p = settled();
        p.set_live(LiveNodes { up: vec![a], heard: vec![a, id(2), id(3)] });
        let vm = vol("vm0");
        assert_eq!(p.reader(&t, a, t.volume_by_name(&vm).unwrap()), Some(a), "the only proxy up reads everything");
        p.upkeep(&t, a, "a", |_| false);
        p.handle_reply(&vm, &LeaseRequest::Acquire { volume: vm.clone() }, p.now(), Ok(LeaseReply::Held { holder: "b".into(), remaining_ms: 3000 }));
        assert!(p.held_back(&t, a, &vm).unwrap().contains("held by b for 3000 ms more"), "{:?}", p.held_back(&t, a, &vm));
        p.handle_reply(&vm, &LeaseRequest::Acquire { volume: vm.clone() }, p.now(), Err("target t is not connected".into()));
        assert!(p.held_back(&t, a, &vm).unwrap().contains("no answer: target t is not connected"));
    }
}
