//! TopologyDiff: what hot reload acts on.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::path::Path;

use drmesh_topology::{NodeId, Topology, TopologyDiff};

fn id(n: u8) -> String {
    NodeId::from_public_key(&[n; 32]).to_string()
}

fn topo(nodes: &[(&str, u8, &str)], volumes: &str, policies: &str) -> Topology {
    let mut text = String::from("[mesh]\nname = \"m\"\nversion = 1\n");
    for (name, n, address) in nodes {
        text +=
            &format!("[[node]]\nname = \"{name}\"\nid = \"{}\"\naddresses = [\"{address}\"]\nsite = \"s\"\n", id(*n));
    }
    text += volumes;
    text += policies;
    Topology::parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

const AB: &[(&str, u8, &str)] = &[("a", 1, "10.0.0.1:7400"), ("b", 2, "10.0.0.2:7400")];
const VOL: &str =
    "[[volume]]\nname = \"v\"\nsource = \"a\"\nkind = \"file\"\npath = \"/img\"\ntargets = [\"b\"]\npolicy = \"p\"\n";
const POL: &str = "[policy.p]\nrpo = \"15m\"\n";

#[test]
fn identical_topologies_have_an_empty_diff() {
    let a = topo(AB, VOL, POL);
    let b = topo(AB, VOL, POL);
    let diff = TopologyDiff::between(&a, &b);
    assert!(diff.is_empty(), "{diff:?}");
    assert_eq!(diff, TopologyDiff::default());
}

#[test]
fn added_removed_and_changed_nodes_by_id() {
    let old = topo(AB, VOL, POL);
    let new = topo(&[("a", 1, "10.0.0.9:7400"), ("b", 2, "10.0.0.2:7400"), ("c", 3, "10.0.0.3:7400")], VOL, POL);
    let diff = TopologyDiff::between(&old, &new);
    assert_eq!(diff.added_nodes, [NodeId::from_public_key(&[3; 32])]);
    assert_eq!(diff.changed_nodes, [NodeId::from_public_key(&[1; 32])]);
    assert!(diff.removed_nodes.is_empty());
    assert!(!diff.is_empty());

    let back = TopologyDiff::between(&new, &old);
    assert_eq!(back.removed_nodes, [NodeId::from_public_key(&[3; 32])]);
    assert!(back.added_nodes.is_empty());
}

#[test]
fn a_new_key_is_a_new_node() {
    let old = topo(AB, VOL, POL);
    let new = topo(&[("a", 1, "10.0.0.1:7400"), ("b", 4, "10.0.0.2:7400")], VOL, POL);
    let diff = TopologyDiff::between(&old, &new);
    assert_eq!(diff.added_nodes, [NodeId::from_public_key(&[4; 32])]);
    assert_eq!(diff.removed_nodes, [NodeId::from_public_key(&[2; 32])]);
    assert!(diff.changed_nodes.is_empty() && diff.changed_volumes.is_empty());
}

#[test]
fn volume_and_policy_changes() {
    let old = topo(AB, VOL, POL);
    let vol2 = VOL.replace("/img", "/img2") + &VOL.replace("name = \"v\"", "name = \"w\"");
    let pol2 = "[policy.p]\nrpo = \"5m\"\n[policy.q]\nrpo = \"1h\"\n";
    let new = topo(AB, &vol2, pol2);
    let diff = TopologyDiff::between(&old, &new);
    assert_eq!(diff.changed_volumes, ["v"]);
    assert_eq!(diff.added_volumes, ["w"]);
    assert!(diff.removed_volumes.is_empty());
    assert_eq!(diff.changed_policies, ["p", "q"]);
    assert!(diff.added_nodes.is_empty() && diff.changed_nodes.is_empty());

    let back = TopologyDiff::between(&new, &old);
    assert_eq!(back.removed_volumes, ["w"]);
    assert_eq!(back.changed_policies, ["p", "q"]);
}

#[test]
fn labels_and_site_changes_mark_the_node_changed() {
    let old = topo(AB, VOL, POL);
    let text = format!(
        "[mesh]\nname = \"m\"\nversion = 2\n[[node]]\nname = \"a\"\nid = \"{}\"\naddresses = [\"10.0.0.1:7400\"]\nsite = \"s\"\nlabels = {{ rack = \"r1\" }}\n[[node]]\nname = \"b\"\nid = \"{}\"\naddresses = [\"10.0.0.2:7400\"]\nsite = \"t\"\n{VOL}{POL}",
        id(1),
        id(2)
    );
    let new = Topology::parse(&text, Path::new("t.toml")).unwrap();
    let diff = TopologyDiff::between(&old, &new);
    let mut expected = vec![NodeId::from_public_key(&[1; 32]), NodeId::from_public_key(&[2; 32])];
    expected.sort();
    assert_eq!(diff.changed_nodes, expected);
}

#[test]
fn link_changes_are_listed_by_their_pair() {
    let old = topo(AB, VOL, POL);
    let link = |limit: &str| format!("{POL}[[link]]\nnodes = [\"b\", \"a\"]\nlimit = \"{limit}\"\n");
    let with = topo(AB, VOL, &link("20Mbit"));
    let diff = TopologyDiff::between(&old, &with);
    assert_eq!(diff.changed_links, ["a-b"]);
    assert!(!diff.is_empty());
    assert!(diff.changed_policies.is_empty(), "{diff:?}");
    assert_eq!(TopologyDiff::between(&with, &old).changed_links, ["a-b"], "a removed link is listed");
    assert_eq!(TopologyDiff::between(&with, &topo(AB, VOL, &link("30Mbit"))).changed_links, ["a-b"]);
    assert!(TopologyDiff::between(&with, &topo(AB, VOL, &link("20Mbit"))).is_empty());
}

#[test]
fn site_uplink_changes_are_listed_by_site_name() {
    let site = |uplink: &str| format!("{POL}[[site]]\nname = \"s\"\n{uplink}");
    let none = topo(AB, VOL, &site(""));
    let with = topo(AB, VOL, &site("uplink = \"200Mbit\"\n"));
    let diff = TopologyDiff::between(&none, &with);
    assert_eq!(diff.changed_sites, ["s"]);
    assert!(!diff.is_empty());
    assert_eq!(TopologyDiff::between(&with, &topo(AB, VOL, &site("uplink = \"100Mbit\"\n"))).changed_sites, ["s"]);
    assert_eq!(TopologyDiff::between(&with, &topo(AB, VOL, POL)).changed_sites, ["s"], "a removed site is listed");
    assert!(TopologyDiff::between(&with, &topo(AB, VOL, &site("uplink = \"200Mbit\"\n"))).is_empty());
}

#[test]
fn consistency_group_changes_are_listed_by_group_name() {
    let two = format!("{VOL}[[volume]]\nname = \"w\"\nsource = \"a\"\nkind = \"file\"\npath = \"/img2\"\ntargets = [\"b\"]\npolicy = \"p\"\n");
    let group = |members: &str| format!("{POL}[[group]]\nname = \"g\"\nvolumes = [{members}]\n");
    let none = topo(AB, &two, POL);
    let with = topo(AB, &two, &group("\"v\", \"w\""));
    let diff = TopologyDiff::between(&none, &with);
    assert_eq!(diff.changed_groups, ["g"]);
    assert!(!diff.is_empty() && diff.changed_volumes.is_empty(), "{diff:?}");
    assert_eq!(TopologyDiff::between(&with, &none).changed_groups, ["g"], "a removed group is listed");
    assert_eq!(TopologyDiff::between(&with, &topo(AB, &two, &group("\"w\", \"v\""))).changed_groups, ["g"], "the member order is the order views are taken");
    assert!(TopologyDiff::between(&with, &topo(AB, &two, &group("\"v\", \"w\""))).is_empty());
}

#[test]
fn platform_changes_are_listed_by_platform_name() {
    let platform = |proxies: &str, lease: &str| format!("{POL}[[platform]]\nname = \"hv\"\nproxies = [{proxies}]\n{lease}");
    let none = topo(AB, VOL, POL);
    let with = topo(AB, VOL, &platform("\"a\"", ""));
    let diff = TopologyDiff::between(&none, &with);
    assert_eq!(diff.changed_platforms, ["hv"]);
    assert!(!diff.is_empty(), "{diff:?}");
    assert_eq!(TopologyDiff::between(&with, &none).changed_platforms, ["hv"], "a removed platform is listed");
    assert_eq!(TopologyDiff::between(&with, &topo(AB, VOL, &platform("\"a\", \"b\"", ""))).changed_platforms, ["hv"], "a proxy added");
    assert_eq!(TopologyDiff::between(&with, &topo(AB, VOL, &platform("\"a\"", "lease = \"9s\"\n"))).changed_platforms, ["hv"], "the lease changed");
    assert!(TopologyDiff::between(&with, &topo(AB, VOL, &platform("\"a\"", "lease = \"30s\"\n"))).is_empty(), "the default lease written out is no change");
}
