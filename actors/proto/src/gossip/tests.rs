//! Small in-process harness: a few nodes, virtual time, in-memory queues.

use std::collections::BTreeMap;

use super::catalog::Consistency;
use super::*;

fn id(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

fn info(seq: RpSeq) -> RpInfo {
    RpInfo { snapshot_unix_ms: seq.0, size_bytes: 10, merkle_root: crate::content::MerkleRoot([7; 32]), consistency: Consistency::Crash, drill: None }
}

/// Nodes, pending deliveries and timers; perfect links with 10 ms latency.
struct Mesh {
    nodes: BTreeMap<NodeId, GossipNode>,
    queue: BTreeMap<(Millis, u64), (NodeId, Option<NodeId>, Payload)>,
    seq: u64,
    now: Millis,
    cut: Vec<NodeId>,
}

enum Payload {
    Bytes(Vec<u8>),
    Timer(GossipTimer),
}

impl Mesh {
    fn new(n: u8) -> Self {
        let mut mesh = Mesh { nodes: BTreeMap::new(), queue: BTreeMap::new(), seq: 0, now: Millis(0), cut: Vec::new() };
        for i in 0..n {
            let node = GossipNode::new(Millis(0), id(i), 1, GossipConfig::for_cluster(u32::from(n)), u64::from(i));
            mesh.nodes.insert(id(i), node);
        }
        for i in 1..n {
            mesh.nodes.get_mut(&id(i)).unwrap().handle_join(Millis(0), &[id(0)]).unwrap();
        }
        mesh.drain();
        mesh
    }

    fn drain(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for me in ids {
            let node = self.nodes.get_mut(&me).unwrap();
            let mut out = Vec::new();
            while let Some(t) = node.poll_transmit() {
                assert!(t.bytes.len() <= DATAGRAM_BYTES_MAX);
                out.push((self.now.after(Duration::from_millis(10)), t.to, Some(me), Payload::Bytes(t.bytes)));
            }
            while let Some((at, timer)) = node.poll_timer() {
                out.push((at, me, None, Payload::Timer(timer)));
            }
            while node.poll_event().is_some() {}
            for (at, to, from, p) in out {
                self.seq += 1;
                self.queue.insert((at, self.seq), (to, from, p));
            }
        }
    }

    fn run_until(&mut self, until: Millis) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), (to, from, p)) = entry.remove_entry();
            self.now = at;
            let Some(node) = self.nodes.get_mut(&to) else { continue };
            match p {
                Payload::Bytes(b) => {
                    let from = from.unwrap();
                    if self.cut.contains(&from) != self.cut.contains(&to) {
                        continue;
                    }
                    let _ = node.handle_datagram(at, from, &b);
                }
                Payload::Timer(t) => {
                    let _ = node.handle_timer(at, t);
                }
            }
            self.drain();
        }
        self.now = until;
    }

    fn node(&mut self, n: u8) -> &mut GossipNode {
        self.nodes.get_mut(&id(n)).unwrap()
    }
}

#[test]
fn gossip_rp_reaches_everyone_and_expiry_sticks() {
    let mut mesh = Mesh::new(8);
    mesh.run_until(Millis(10_000));
    for n in 0..8 {
        assert_eq!(mesh.node(n).active_members(), 7, "node {n} membership");
    }
    mesh.node(3).handle_local_rp(Millis(10_000), &VolumeName::from_static("db"), RpSeq(1), info(RpSeq(1))).unwrap();
    mesh.node(3).handle_local_rp(Millis(10_000), &VolumeName::from_static("db"), RpSeq(2), info(RpSeq(2))).unwrap();
    mesh.drain();
    mesh.run_until(Millis(20_000));
    for n in 0..8 {
        assert!(mesh.node(n).has_rp(&id(3), &VolumeName::from_static("db"), RpSeq(1)), "node {n} lacks db@1");
    }
    mesh.node(3).handle_rps_expired_below(Millis(20_000), &VolumeName::from_static("db"), RpSeq(2)).unwrap();
    mesh.node(3).handle_rp_expired(Millis(20_000), &VolumeName::from_static("db"), RpSeq(2), 5).unwrap();
    mesh.drain();
    mesh.run_until(Millis(30_000));
    for n in 0..8 {
        assert!(!mesh.node(n).has_rp(&id(3), &VolumeName::from_static("db"), RpSeq(1)));
        assert!(!mesh.node(n).has_rp(&id(3), &VolumeName::from_static("db"), RpSeq(2)));
    }
}

#[test]
fn anti_entropy_heals_a_partition() {
    let mut mesh = Mesh::new(6);
    mesh.run_until(Millis(5_000));
    mesh.cut = vec![id(4), id(5)];
    mesh.node(1).handle_local_rp(Millis(5_000), &VolumeName::from_static("v"), RpSeq(1), info(RpSeq(1))).unwrap();
    mesh.node(4).handle_status(
        Millis(5_000),
        NodeStatus { site: "branch".into(), software_version: "0.1".into(), topology_version: 3, topology_hash: [1; 32] },
    );
    mesh.drain();
    // Long enough for piggybacked broadcasts to be exhausted.
    mesh.run_until(Millis(600_000));
    assert!(!mesh.node(5).has_rp(&id(1), &VolumeName::from_static("v"), RpSeq(1)));
    mesh.cut.clear();
    mesh.run_until(Millis(900_000));
    for n in 0..6 {
        assert!(mesh.node(n).has_rp(&id(1), &VolumeName::from_static("v"), RpSeq(1)), "node {n}");
        let members = mesh.node(n).members();
        if n != 4 {
            let m4 = members.iter().find(|m| m.node == id(4)).expect("member 4 known");
            assert_eq!(m4.status.as_ref().map(|s| s.0.site.as_str()), Some("branch"));
        }
    }
}

#[test]
fn snapshot_round_trips() {
    let mut mesh = Mesh::new(3);
    mesh.node(1).handle_local_rp(Millis(0), &VolumeName::from_static("v"), RpSeq(4), info(RpSeq(4))).unwrap();
    mesh.drain();
    mesh.run_until(Millis(5_000));
    let snap = mesh.node(2).snapshot();
    let restored = GossipNode::restore(Millis(0), id(2), 2, GossipConfig::for_cluster(3), 9, &snap).unwrap();
    assert!(restored.has_rp(&id(1), &VolumeName::from_static("v"), RpSeq(4)));
    assert!(GossipNode::restore(Millis(0), id(1), 2, GossipConfig::for_cluster(3), 9, &snap).is_err());
    assert!(GossipNode::restore(Millis(0), id(2), 2, GossipConfig::for_cluster(3), 9, b"nope").is_err());
}

#[test]
fn garbage_is_rejected_without_panic() {
    let mut node = GossipNode::new(Millis(0), id(0), 1, GossipConfig::for_cluster(2), 1);
    assert!(node.handle_datagram(Millis(1), id(1), &[]).is_err());
    assert!(node.handle_datagram(Millis(1), id(1), &[9, 1, 2]).is_err());
    assert!(node.handle_datagram(Millis(1), id(1), &[TAG_SYNC, 0xff, 0xff]).is_err());
    let _ = node.handle_datagram(Millis(1), id(1), &[TAG_FOCA, 1, 2, 3]);
    assert!(node.handle_datagram(Millis(1), id(1), &vec![TAG_FOCA; 1300]).is_err());
    // A peer's item naming a volume outside the name rule does not decode: dropped, nothing recorded.
    let item = Item { key: ItemKey::Rp(VolumeName::from_static("zzzzzzzz"), RpSeq(1)), version: 1, value: ItemValue::Rp(info(RpSeq(1))) };
    let good = encode_sync(&SyncMsg::Items { holder: id(1), from: 0, upto: 1, items: vec![item] });
    let at = good.windows(8).position(|w| w == b"zzzzzzzz").expect("the name is in the datagram");
    let mut bad = good.clone();
    bad[at..at + 8].copy_from_slice(b"../../..");
    assert!(matches!(node.handle_datagram(Millis(1), id(1), &bad), Err(GossipError::Sync(_))));
    assert!(node.rps().is_empty());
    assert!(node.handle_datagram(Millis(1), id(1), &good).is_ok(), "the same datagram with a good name decodes");
}

#[test]
fn uplink_demands_spread_and_follow_changes() {
    use crate::bandwidth::Demand;
    let mut mesh = Mesh::new(3);
    mesh.run_until(Millis(3_000));
    mesh.node(1).handle_demand(Millis(3_000), Demand::Unlimited);
    mesh.node(2).handle_demand(Millis(3_000), Demand::Bps(20_000_000));
    mesh.drain();
    // The owner's push reaches every member within a few gossip periods.
    mesh.run_until(Millis(4_000));
    assert_eq!(mesh.node(0).demands(), vec![(id(1), Demand::Unlimited), (id(2), Demand::Bps(20_000_000))]);
    assert_eq!(mesh.node(1).demands(), vec![(id(2), Demand::Bps(20_000_000))], "self excluded");
    mesh.node(1).handle_demand(Millis(4_000), Demand::Idle);
    mesh.drain();
    mesh.run_until(Millis(5_000));
    assert_eq!(mesh.node(2).demands(), vec![(id(1), Demand::Idle)]);
    // Saved replicas keep the item.
    let snap = mesh.node(0).snapshot();
    let restored = GossipNode::restore(Millis(0), id(0), 2, GossipConfig::for_cluster(3), 9, &snap).unwrap();
    assert_eq!(lock(&restored.shared).holders.get(&id(1)).and_then(|h| h.items.get(&ItemKey::Demand)).map(|s| s.value.clone()), Some(ItemValue::Demand(Demand::Idle)));
}

#[test]
fn drill_result_replaces_the_rp_entry_everywhere_and_is_cut_to_size() {
    use super::catalog::{CheckVerdict, DrillResult};
    let mut mesh = Mesh::new(5);
    mesh.run_until(Millis(5_000));
    mesh.node(2).handle_local_rp(Millis(5_000), &VolumeName::from_static("db"), RpSeq(4), info(RpSeq(4))).unwrap();
    mesh.drain();
    mesh.run_until(Millis(10_000));
    let long = "x".repeat(5000);
    let checks = (0..20).map(|i| CheckVerdict { check: format!("check-{i}-{long}"), passed: i != 3, duration_ms: i }).collect();
    let mut drilled = info(RpSeq(4));
    drilled.drill = Some(DrillResult { finished_unix_ms: 9, passed: false, verified: false, checks, software_version: long.clone(), detail: long });
    mesh.node(2).handle_local_rp(Millis(10_000), &VolumeName::from_static("db"), RpSeq(4), drilled).unwrap();
    mesh.drain();
    mesh.run_until(Millis(20_000));
    for n in 0..5 {
        let rps = mesh.node(n).rps();
        let rp = rps.iter().find(|r| r.volume == "db" && r.seq == RpSeq(4)).expect("db@4 known");
        let d = rp.info.drill.as_ref().unwrap_or_else(|| panic!("node {n} lacks the drill result"));
        assert!(!d.passed && d.checks.len() == super::catalog::DRILL_CHECKS_MAX && d.checks[3].check.len() == 32);
        assert!(d.detail.len() <= super::catalog::TEXT_BYTES_MAX && d.software_version.len() <= super::catalog::TEXT_BYTES_MAX);
    }
}

#[test]
fn scrub_results_give_each_rp_of_the_holder_a_verdict_everywhere() {
    use super::catalog::{ScrubResult, SCRUB_DAMAGED_MAX};
    let mut mesh = Mesh::new(4);
    mesh.run_until(Millis(5_000));
    for seq in [3, 4, 5, 9].map(RpSeq) {
        mesh.node(1).handle_local_rp(Millis(5_000), &VolumeName::from_static("db"), seq, info(seq)).unwrap();
    }
    mesh.node(2).handle_local_rp(Millis(5_000), &VolumeName::from_static("db"), RpSeq(4), info(RpSeq(4))).unwrap();
    let result = ScrubResult { finished_unix_ms: 77, sample_percent: 10, first_seq: RpSeq(3), last_seq: RpSeq(5), damaged: vec![RpSeq(4)], damaged_cut: false };
    mesh.node(1).handle_scrub(Millis(5_000), &VolumeName::from_static("db"), result).unwrap();
    mesh.drain();
    mesh.run_until(Millis(10_000));
    for n in 0..4 {
        type Seen = (RpSeq, Option<(bool, u8, u64)>);
        let verdicts: Vec<Seen> = mesh
            .node(n)
            .rps()
            .into_iter()
            .filter(|r| r.holder == id(1))
            .map(|r| (r.seq, r.scrub.map(|v| (v.sound, v.sample_percent, v.finished_unix_ms))))
            .collect();
        // seq 9 came after the scrub: no verdict; the other holder's RP has none either.
        assert_eq!(verdicts, vec![(RpSeq(3), Some((true, 10, 77))), (RpSeq(4), Some((false, 10, 77))), (RpSeq(5), Some((true, 10, 77))), (RpSeq(9), None)], "node {n}");
        assert!(mesh.node(n).rps().iter().filter(|r| r.holder == id(2)).all(|r| r.scrub.is_none()), "node {n}");
    }
    // A newer scrub replaces the older one; a long damaged list is cut and says so.
    let many = ScrubResult { finished_unix_ms: 88, sample_percent: 100, first_seq: RpSeq(1), last_seq: RpSeq(1000), damaged: (1..=200).rev().map(RpSeq).collect(), damaged_cut: false };
    mesh.node(1).handle_scrub(Millis(10_000), &VolumeName::from_static("db"), many).unwrap();
    mesh.drain();
    mesh.run_until(Millis(15_000));
    let rps = mesh.node(3).rps();
    let of = |seq: RpSeq| rps.iter().find(|r| r.holder == id(1) && r.seq == seq).and_then(|r| r.scrub);
    assert_eq!(of(RpSeq(3)).map(|v| (v.sound, v.finished_unix_ms)), Some((false, 88)));
    // Seq 9 is listed damaged (within the first SCRUB_DAMAGED_MAX); beyond the cut nothing is claimed.
    assert_eq!(of(RpSeq(9)).map(|v| v.sound), Some(false));
    let cut = ScrubResult { finished_unix_ms: 1, sample_percent: 100, first_seq: RpSeq(1), last_seq: RpSeq(1000), damaged: (1..=SCRUB_DAMAGED_MAX as u64).map(RpSeq).collect(), damaged_cut: true };
    assert_eq!(cut.verdict(RpSeq(SCRUB_DAMAGED_MAX as u64 + 1)), None);
    assert_eq!(cut.verdict(RpSeq(2)).map(|v| v.sound), Some(false));
    assert_eq!(cut.verdict(RpSeq(1001)), None);
    // Saved replicas keep the item.
    let snap = mesh.node(0).snapshot();
    let restored = GossipNode::restore(Millis(0), id(0), 2, GossipConfig::for_cluster(4), 9, &snap).unwrap();
    assert_eq!(restored.rps().iter().find(|r| r.holder == id(1) && r.seq == RpSeq(5)).and_then(|r| r.scrub).map(|v| v.sound), Some(false));
}
