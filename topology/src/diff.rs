//! What changed between two topologies, for hot reload.
//!
//! Nodes are matched by id (a renamed node is the same node, changed), volumes
//! and policies by name, links by their pair of node names, sites by name. The lists are
//! sorted, so equal diffs compare equal.

use std::collections::BTreeMap;

use crate::node_id::NodeId;
use crate::schema::{Bandwidth, Node};
use crate::Topology;

/// Keys added, removed or whose value changed from `old` to `new`, sorted.
fn changed_keys<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Vec<String> {
    let mut changed: Vec<String> =
        new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
    changed.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    changed.sort();
    changed
}

/// Differences between an old and a new topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyDiff {
    /// Ids in the new topology only.
    pub added_nodes: Vec<NodeId>,
    /// Ids in the old topology only.
    pub removed_nodes: Vec<NodeId>,
    /// Ids in both whose name, addresses, listen address, site or labels changed.
    pub changed_nodes: Vec<NodeId>,
    /// Volume names in the new topology only.
    pub added_volumes: Vec<String>,
    /// Volume names in the old topology only.
    pub removed_volumes: Vec<String>,
    /// Volume names in both whose source, kind, settings, targets or policy name changed.
    pub changed_volumes: Vec<String>,
    /// Policy names added, removed or changed (any setting). Volumes using a
    /// changed policy are not listed in `changed_volumes` for that reason alone.
    pub changed_policies: Vec<String>,
    /// `[[link]]` tables added, removed or changed (limit or windows), named
    /// `"a-b"` with the two node names in sorted order.
    pub changed_links: Vec<String>,
    /// `[[site]]` names added, removed or whose uplink changed.
    pub changed_sites: Vec<String>,
    /// `[[group]]` names added, removed or whose member list or hooks changed.
    pub changed_groups: Vec<String>,
    /// `[[platform]]` names added, removed or whose proxies or lease changed.
    pub changed_platforms: Vec<String>,
}

impl TopologyDiff {
    /// Computes what changed from `old` to `new`.
    pub fn between(old: &Topology, new: &Topology) -> TopologyDiff {
        let old_nodes: BTreeMap<NodeId, &Node> = old.nodes.iter().map(|n| (n.id, n)).collect();
        let new_nodes: BTreeMap<NodeId, &Node> = new.nodes.iter().map(|n| (n.id, n)).collect();
        let mut diff = TopologyDiff::default();
        for (id, node) in &new_nodes {
            match old_nodes.get(id) {
                None => diff.added_nodes.push(*id),
                Some(before) if before != node => diff.changed_nodes.push(*id),
                Some(_) => {}
            }
        }
        diff.removed_nodes = old_nodes.keys().filter(|id| !new_nodes.contains_key(id)).copied().collect();

        let old_volumes: BTreeMap<&str, _> = old.volumes.iter().map(|v| (v.name.as_str(), v)).collect();
        let new_volumes: BTreeMap<&str, _> = new.volumes.iter().map(|v| (v.name.as_str(), v)).collect();
        for (name, volume) in &new_volumes {
            match old_volumes.get(name) {
                None => diff.added_volumes.push(name.to_string()),
                Some(before) if before != volume => diff.changed_volumes.push(name.to_string()),
                Some(_) => {}
            }
        }
        diff.removed_volumes =
            old_volumes.keys().filter(|name| !new_volumes.contains_key(*name)).map(|n| n.to_string()).collect();

        diff.changed_policies = changed_keys(&old.policies, &new.policies);

        let links = |t: &Topology| -> BTreeMap<String, Bandwidth> {
            t.links
                .iter()
                .map(|l| {
                    let mut pair = l.nodes.clone();
                    pair.sort();
                    (pair.join("-"), l.bandwidth.clone())
                })
                .collect()
        };
        diff.changed_links = changed_keys(&links(old), &links(new));

        let sites = |t: &Topology| -> BTreeMap<String, Option<u64>> {
            t.sites.iter().map(|site| (site.name.clone(), site.uplink_bps)).collect()
        };
        diff.changed_sites = changed_keys(&sites(old), &sites(new));

        type Members = (Vec<crate::VolumeName>, Option<crate::VolumeHooks>);
        let groups = |t: &Topology| -> BTreeMap<String, Members> { t.groups.iter().map(|g| (g.name.clone(), (g.volumes.clone(), g.hooks.clone()))).collect() };
        diff.changed_groups = changed_keys(&groups(old), &groups(new));
        let platforms = |t: &Topology| -> BTreeMap<String, (Vec<String>, std::time::Duration)> {
            t.platforms.iter().map(|p| (p.name.clone(), (p.proxies.clone(), p.lease))).collect()
        };
        diff.changed_platforms = changed_keys(&platforms(old), &platforms(new));
        diff
    }

    /// Whether nothing that nodes act on changed (the `[mesh]` version is
    /// not compared).
    pub fn is_empty(&self) -> bool {
        self.added_nodes.is_empty()
            && self.removed_nodes.is_empty()
            && self.changed_nodes.is_empty()
            && self.added_volumes.is_empty()
            && self.removed_volumes.is_empty()
            && self.changed_volumes.is_empty()
            && self.changed_policies.is_empty()
            && self.changed_links.is_empty()
            && self.changed_sites.is_empty()
            && self.changed_groups.is_empty()
            && self.changed_platforms.is_empty()
    }
}
