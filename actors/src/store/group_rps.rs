//! Group RPs: the RPs of a consistency group's members that share the
//! group's name and snapshot instant, as one recovery point of the group.
//! A group RP is complete when the store holds an RP of every member the
//! group had at that instant; only a complete one restores the group.

use serde::{Deserialize, Serialize};

use super::{RpMeta, RpSeq, VolumeName};

/// One member's RP in a group RP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberRp {
    /// The member volume.
    pub volume: VolumeName,
    /// Its RP's seq.
    pub seq: RpSeq,
    /// Its RP's consistency label.
    pub consistency: String,
}

/// A consistency group's RP, as this store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRp {
    /// The group's name.
    pub group: String,
    /// The group's instant (every member RP's time), Unix ms.
    pub time_unix_ms: u64,
    /// Whether the members' views were of one instant (their writes held together).
    pub one_instant: bool,
    /// The members' RPs this store holds, in member name order.
    pub rps: Vec<GroupMemberRp>,
    /// Members the group had at the instant whose RP this store lacks (a
    /// member's cycle failed, or retention pruned it).
    pub missing: Vec<VolumeName>,
    /// Whether every member's RP is here: the group restores from it.
    pub complete: bool,
}

/// A group RP being gathered: the members named, whether all were held, the RPs found.
type Gathering = (Vec<VolumeName>, bool, Vec<GroupMemberRp>);

/// The group RPs among `rps` (any order), newest first; RPs of no group are skipped.
pub fn group_rps<'a>(rps: impl IntoIterator<Item = &'a RpMeta>) -> Vec<GroupRp> {
    let mut by_point: std::collections::BTreeMap<(u64, String), Gathering> = std::collections::BTreeMap::new();
    for rp in rps {
        let Some(group) = &rp.group else { continue };
        let entry = by_point.entry((rp.time_unix_ms, group.name.clone())).or_insert_with(|| (Vec::new(), true, Vec::new()));
        for m in &group.members {
            if !entry.0.contains(m) {
                entry.0.push(m.clone());
            }
        }
        entry.1 &= group.one_instant;
        entry.2.push(GroupMemberRp { volume: rp.volume.clone(), seq: rp.seq, consistency: rp.consistency.clone() });
    }
    let mut out: Vec<GroupRp> = by_point
        .into_iter()
        .map(|((time_unix_ms, group), (mut members, one_instant, mut rps))| {
            members.sort();
            rps.sort_by(|a, b| a.volume.cmp(&b.volume));
            let missing: Vec<VolumeName> = members.iter().filter(|m| !rps.iter().any(|r| r.volume == **m)).cloned().collect();
            GroupRp { group, time_unix_ms, one_instant, complete: missing.is_empty(), rps, missing }
        })
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RpGroup;

    fn rp(volume: &'static str, seq: u64, time: u64, group: Option<(&str, &[&'static str], bool)>) -> RpMeta {
        RpMeta {
            volume: VolumeName::from_static(volume),
            seq: RpSeq(seq),
            time_unix_ms: time,
            source_node: "a".into(),
            volume_bytes: 4096,
            block_bytes: 4096,
            block_count: 1,
            changed_blocks: 1,
            bytes_stored: 0,
            merkle_root: crate::content::MerkleRoot::default(),
            encrypted: false,
            consistency: "fs-frozen".into(),
            group: group.map(|(name, members, one_instant)| RpGroup {
                name: name.into(),
                members: members.iter().map(|m| VolumeName::from_static(m)).collect(),
                one_instant,
            }),
        }
    }

    #[test]
    fn members_of_one_instant_form_a_group_rp_and_a_missing_one_makes_it_incomplete() {
        let both: &[&'static str] = &["sys", "data"];
        let rps = [
            rp("sys", 1, 100, Some(("db", both, true))),
            rp("data", 1, 100, Some(("db", both, true))),
            rp("sys", 2, 200, Some(("db", both, false))),
            rp("other", 1, 200, None),
        ];
        let groups = group_rps(&rps);
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].time_unix_ms, groups[0].complete, groups[0].one_instant), (200, false, false));
        assert_eq!(groups[0].missing, ["data"]);
        assert_eq!((groups[1].time_unix_ms, groups[1].complete, groups[1].one_instant), (100, true, true));
        let names: Vec<String> = groups[1].rps.iter().map(|r| format!("{}@{}", r.volume, r.seq)).collect();
        assert_eq!(names, ["data@1", "sys@1"]);
        assert!(group_rps(&[rp("other", 1, 1, None)]).is_empty());
    }
}
