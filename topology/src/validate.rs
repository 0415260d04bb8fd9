//! Checks that relate sections to each other: unique names, ids and addresses,
//! and references from volumes to nodes and policies, and from nodes to sites.
//! Every problem is reported; the topology is assembled only when there is none.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::diagnostic::Sink;
use crate::node_id::NodeId;
use crate::parse::{Draft, Span};
use crate::schema::{Group, Link, Mesh, Node, Platform, Policy, Site, Volume};

/// The checked sections of a file.
pub(crate) struct Checked {
    pub(crate) mesh: Mesh,
    pub(crate) sites: Vec<Site>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) volumes: Vec<Volume>,
    pub(crate) links: Vec<Link>,
    pub(crate) groups: Vec<Group>,
    pub(crate) platforms: Vec<Platform>,
    pub(crate) policies: BTreeMap<String, Policy>,
}

/// Remembers the first place each key was seen and reports later ones.
struct Seen<K> {
    first: HashMap<K, Span>,
}

impl<K: std::hash::Hash + Eq> Seen<K> {
    fn new() -> Self {
        Seen { first: HashMap::new() }
    }

    /// Records `key` at `span`; returns the first span if it was seen before.
    fn check(&mut self, key: K, span: &Span) -> Option<Span> {
        match self.first.get(&key) {
            Some(first) => Some(first.clone()),
            None => {
                self.first.insert(key, span.clone());
                None
            }
        }
    }
}

/// Names listed in one message at most; a longer list ends with how many more there are.
const LISTED_NAMES: usize = 20;

/// `"a", "b", "c"`, at most [`LISTED_NAMES`] of them.
fn quoted_list(names: &[&str]) -> String {
    let shown: Vec<String> = names.iter().take(LISTED_NAMES).map(|n| format!("{n:?}")).collect();
    with_rest(shown.join(", "), names.len())
}

/// `a, b, c`, at most [`LISTED_NAMES`] of them.
fn plain_list(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().take(LISTED_NAMES).copied().collect();
    with_rest(shown.join(", "), names.len())
}

fn with_rest(mut shown: String, total: usize) -> String {
    if total > LISTED_NAMES {
        shown.push_str(&format!(" and {} more", total - LISTED_NAMES));
    }
    shown
}

/// Runs the cross-section checks and assembles the result when there was no error at all.
pub(crate) fn check(draft: Draft, sink: &mut Sink<'_>) -> Option<Checked> {
    let mut site_names = Seen::new();
    for site in &draft.sites {
        if let Some(name) = &site.name {
            if let Some(first) = site_names.check(name.value.clone(), &name.span) {
                let line = sink.line(first.start);
                sink.error(
                    name.span.clone(),
                    format!("duplicate site name {:?} (first defined on line {line})", name.value),
                );
            }
        }
    }

    let mut node_names: Seen<String> = Seen::new();
    let mut node_ids: Seen<NodeId> = Seen::new();
    let mut addresses: Seen<String> = Seen::new();
    let mut known_sites: Option<String> = None;
    for node in &draft.nodes {
        if let Some(name) = &node.name {
            if let Some(first) = node_names.check(name.value.clone(), &name.span) {
                let line = sink.line(first.start);
                sink.error(
                    name.span.clone(),
                    format!("duplicate node name {:?} (first defined on line {line})", name.value),
                );
            }
        }
        if let Some(id) = &node.id {
            if let Some(first) = node_ids.check(id.value, &id.span) {
                let line = sink.line(first.start);
                sink.error(
                    id.span.clone(),
                    format!(
                        "duplicate node id {} (already used on line {line}); every node needs its own key",
                        id.value.short()
                    ),
                );
            }
        }
        for (address, normalized) in &node.addresses {
            if let Some(first) = addresses.check(normalized.clone(), &address.span) {
                let line = sink.line(first.start);
                sink.error(
                    address.span.clone(),
                    format!(
                        "duplicate address {:?} (already listed on line {line}); each address belongs to one node",
                        address.value
                    ),
                );
            }
        }
        if let Some(site) = &node.site {
            if !site_names.first.is_empty() && !site_names.first.contains_key(&site.value) {
                // Built once: a file may have thousands of nodes and sites.
                let known = known_sites.get_or_insert_with(|| {
                    let mut known: Vec<&str> = site_names.first.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    quoted_list(&known)
                });
                sink.error(
                    site.span.clone(),
                    format!("unknown site {:?}; expected one of the [[site]] names: {known}", site.value),
                );
            }
        }
    }

    // Platforms: unique names that are not node names, proxies that are nodes.
    let mut platforms: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut platform_names: Seen<String> = Seen::new();
    for platform in &draft.platforms {
        let Some(name) = &platform.name else { continue };
        if let Some(first) = platform_names.check(name.value.clone(), &name.span) {
            let line = sink.line(first.start);
            sink.error(name.span.clone(), format!("platform {:?} is already defined on line {line}", name.value));
        }
        if node_names.first.contains_key(&name.value) {
            sink.error(name.span.clone(), format!("platform name {:?} is a [[node]] name too; volumes name either as their `source`, so give the platform a name of its own", name.value));
        }
        for proxy in &platform.proxies {
            if !node_names.first.contains_key(&proxy.value) {
                sink.error(proxy.span.clone(), format!("proxy {:?} of platform {:?} is not a [[node]] name", proxy.value, name.value));
            }
        }
        platforms.insert(name.value.as_str(), platform.proxies.iter().map(|p| p.value.as_str()).collect());
    }

    let mut volume_names: Seen<String> = Seen::new();
    let mut known_policies: Option<String> = None;
    // Per policy with a drill table: its drill nodes, and how messages list them.
    let mut drills: HashMap<&str, (HashSet<&str>, String)> = HashMap::new();
    // A kmod device or COW store of a node belongs to one volume: the module
    // tracks a device once and a store serves one snapshot at a time.
    let mut kmod_paths: Seen<(String, std::path::PathBuf)> = Seen::new();
    // A VM disk is one volume of a node (two would each keep bitmaps and fleeces).
    let mut qemu_disks: Seen<(String, crate::schema::QemuSocket, String)> = Seen::new();
    // qemu runs one NBD server: every volume of a monitor names its socket.
    let mut nbd_of_monitor: HashMap<(String, crate::schema::QemuSocket), (crate::schema::QemuSocket, Span)> = HashMap::new();
    for volume in &draft.volumes {
        if let (Some(source), Some(disk), Some(crate::schema::SourceKind::Qemu { nbd, .. })) = (&volume.source, &volume.qemu_disk, volume.volume.as_ref().map(|v| &v.kind)) {
            let (monitor, _) = &disk.value;
            match nbd_of_monitor.get(&(source.value.clone(), monitor.clone())) {
                Some((first, span)) if first != nbd => {
                    let line = sink.line(span.start);
                    sink.error(
                        disk.span.clone(),
                        format!(
                            "nbd {:?} differs from {:?} of the volume of the same monitor on line {line}; qemu runs one NBD server, expected every volume of monitor {:?} to name its socket",
                            nbd.to_string(),
                            first.to_string(),
                            monitor.to_string()
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    nbd_of_monitor.insert((source.value.clone(), monitor.clone()), (nbd.clone(), disk.span.clone()));
                }
            }
        }
        if let (Some(source), Some(disk)) = (&volume.source, &volume.qemu_disk) {
            let (monitor, node) = &disk.value;
            if let Some(first) = qemu_disks.check((source.value.clone(), monitor.clone(), node.clone()), &disk.span) {
                let line = sink.line(first.start);
                sink.error(
                    disk.span.clone(),
                    format!(
                        "block node {node:?} of monitor {:?} on node {:?} is already a volume on line {line}; expected one volume per VM disk (give the volume more targets instead)",
                        monitor.to_string(),
                        source.value
                    ),
                );
            }
        }
        if let Some(source) = &volume.source {
            for path in &volume.kmod_paths {
                if let Some(first) = kmod_paths.check((source.value.clone(), path.value.clone()), &path.span) {
                    let line = sink.line(first.start);
                    sink.error(
                        path.span.clone(),
                        format!(
                            "{:?} of node {:?} is already a kmod device, COW store or state store on line {line}; expected one volume per device, with stores of its own",
                            path.value, source.value
                        ),
                    );
                }
            }
        }
        if let Some(name) = &volume.name {
            if let Some(first) = volume_names.check(name.value.clone(), &name.span) {
                let line = sink.line(first.start);
                sink.error(
                    name.span.clone(),
                    format!("duplicate volume name {:?} (first defined on line {line})", name.value),
                );
            }
        }
        let proxies = volume.source.as_ref().and_then(|s| platforms.get(s.value.as_str()));
        if let Some(source) = &volume.source {
            if proxies.is_some() {
                let kind = volume.volume.as_ref().map(|v| v.kind.name());
                if kind.is_some_and(|k| k != "qemu") {
                    sink.error(
                        source.span.clone(),
                        format!("volume source {:?} is a [[platform]], whose proxies read VM disks through qemu; expected kind \"qemu\", found {:?} (a {:?} volume is read by one node: name that node)", source.value, kind.unwrap_or("?"), kind.unwrap_or("?")),
                    );
                }
            } else if !node_names.first.contains_key(&source.value) {
                let also = if platforms.is_empty() { "" } else { " or [[platform]]" };
                sink.error(source.span.clone(), format!("volume source {:?} is not a [[node]]{also} name", source.value));
            }
        }
        let mut targets: Seen<String> = Seen::new();
        for target in &volume.targets {
            if !node_names.first.contains_key(&target.value) {
                sink.error(target.span.clone(), format!("target {:?} is not a [[node]] name", target.value));
            } else if proxies.is_some_and(|p| p.contains(&target.value.as_str())) {
                sink.error(
                    target.span.clone(),
                    format!(
                        "target {:?} is a proxy of platform {:?}, which reads the volume; expected other nodes to hold its recovery points",
                        target.value,
                        volume.source.as_ref().map(|s| s.value.as_str()).unwrap_or("?")
                    ),
                );
            } else if volume.source.as_ref().is_some_and(|s| s.value == target.value) {
                sink.error(
                    target.span.clone(),
                    format!(
                        "target {:?} is the volume's source; expected other nodes to hold its recovery points",
                        target.value
                    ),
                );
            }
            if targets.check(target.value.clone(), &target.span).is_some() {
                sink.error(target.span.clone(), format!("target {:?} is listed twice", target.value));
            }
        }
        if let Some(policy) = &volume.policy {
            if !draft.policies.contains_key(&policy.value) {
                // Built once: a file may have thousands of volumes and policies.
                let expected = known_policies.get_or_insert_with(|| {
                    let known: Vec<&str> = draft.policies.keys().map(String::as_str).collect();
                    if known.is_empty() {
                        "no [policy.NAME] table is defined".to_string()
                    } else {
                        format!("expected one of {}", quoted_list(&known))
                    }
                });
                sink.error(policy.span.clone(), format!("undefined policy {:?}; {expected}", policy.value));
            }
            // Drill nodes drill the RPs they hold: at least one must hold this volume's.
            if let Some(Some(drill)) = draft.policies.get(&policy.value).map(|p| p.as_ref().and_then(|p| p.drill.as_ref())) {
                // Per policy, not per volume: many volumes may share a policy with many drill nodes.
                let (drill_nodes, drill_list) = drills.entry(policy.value.as_str()).or_insert_with(|| {
                    for n in &drill.nodes {
                        if !node_names.first.contains_key(n) {
                            sink.error(policy.span.clone(), format!("drill node {n:?} of policy {:?} is not a [[node]] name", policy.value));
                        }
                    }
                    let names: Vec<&str> = drill.nodes.iter().map(String::as_str).collect();
                    (drill.nodes.iter().map(String::as_str).collect(), plain_list(&names))
                });
                if !drill_nodes.is_empty() && !volume.targets.iter().any(|t| drill_nodes.contains(t.value.as_str())) {
                    let name = volume.name.as_ref().map(|n| n.value.as_str()).unwrap_or("?");
                    let targets: Vec<&str> = volume.targets.iter().map(|t| t.value.as_str()).collect();
                    sink.error(
                        policy.span.clone(),
                        format!(
                            "policy {:?} drills on {}, none of which holds the recovery points of volume {name:?} (its targets: {}); expected a drill node among the targets",
                            policy.value,
                            drill_list,
                            plain_list(&targets)
                        ),
                    );
                }
            }
        }
    }

    let mut pairs: Seen<(String, String)> = Seen::new();
    for link in &draft.links {
        let Some((span, names)) = &link.nodes else { continue };
        for name in names {
            if !node_names.first.contains_key(&name.value) {
                sink.error(name.span.clone(), format!("link node {:?} is not a [[node]] name", name.value));
            }
        }
        if let [a, b] = names.as_slice() {
            let key = if a.value <= b.value { (a.value.clone(), b.value.clone()) } else { (b.value.clone(), a.value.clone()) };
            if let Some(first) = pairs.check(key, span) {
                let line = sink.line(first.start);
                sink.error(
                    span.clone(),
                    format!("a [[link]] between {:?} and {:?} is already defined on line {line}; expected one per pair of nodes", a.value, b.value),
                );
            }
        }
    }

    check_groups(&draft, sink);

    if sink.has_errors() {
        return None;
    }
    let mut policies = BTreeMap::new();
    for (name, policy) in draft.policies {
        policies.insert(name, policy?);
    }
    Some(Checked {
        mesh: draft.mesh?,
        sites: draft.sites.into_iter().map(|s| s.site).collect::<Option<_>>()?,
        nodes: draft.nodes.into_iter().map(|n| n.node).collect::<Option<_>>()?,
        volumes: draft.volumes.into_iter().map(|v| v.volume).collect::<Option<_>>()?,
        links: draft.links.into_iter().map(|l| l.link).collect::<Option<_>>()?,
        groups: draft.groups.into_iter().map(|g| g.group).collect::<Option<_>>()?,
        platforms: draft.platforms.into_iter().map(|p| p.platform).collect::<Option<_>>()?,
        policies,
    })
}

/// `[[group]]` tables: unique names; every member a `[[volume]]` of the same
/// source node with the same targets, in one group at most, without hooks
/// (a group's views are taken together; per-volume hooks would run inside
/// the instant).
fn check_groups(draft: &Draft, sink: &mut Sink<'_>) {
    let mut names: Seen<String> = Seen::new();
    let mut member_of: HashMap<&str, (usize, &str)> = HashMap::new();
    let volumes: HashMap<&str, &crate::parse::VolumeDraft> =
        draft.volumes.iter().filter_map(|v| v.name.as_ref().map(|n| (n.value.as_str(), v))).collect();
    for (index, group) in draft.groups.iter().enumerate() {
        let Some(name) = &group.name else { continue };
        if let Some(first) = names.check(name.value.clone(), &name.span) {
            let line = sink.line(first.start);
            sink.error(name.span.clone(), format!("group {:?} is already defined on line {line}", name.value));
        }
        let mut first: Option<(&str, Option<&str>, Vec<&str>)> = None;
        for member in &group.volumes {
            let Some(volume) = volumes.get(member.value.as_str()) else {
                sink.error(member.span.clone(), format!("group {:?} lists volume {:?}, which is not a [[volume]] name", name.value, member.value));
                continue;
            };
            if let Some((other_index, other)) = member_of.insert(member.value.as_str(), (index, name.value.as_str())) {
                if other_index != index {
                    sink.error(member.span.clone(), format!("volume {:?} is in group {other:?} already; a volume is in one group at most", member.value));
                }
            }
            if volume.volume.as_ref().is_some_and(|v| v.hooks.is_some()) {
                sink.error(
                    member.span.clone(),
                    format!(
                        "volume {:?} of group {:?} has [volume.hooks]; the views of a group are taken together, so its hooks run once for the group: move them to [group.hooks] (after the group's `volumes`)",
                        member.value, name.value
                    ),
                );
            }
            let source = volume.source.as_ref().map(|s| s.value.as_str());
            let mut targets: Vec<&str> = volume.targets.iter().map(|t| t.value.as_str()).collect();
            targets.sort_unstable();
            match &first {
                None => first = Some((member.value.as_str(), source, targets)),
                Some((lead, lead_source, lead_targets)) => {
                    if source != *lead_source {
                        sink.error(
                            member.span.clone(),
                            format!(
                                "volume {:?} of group {:?} is read by node {}, volume {lead:?} by node {}; a group's volumes have one source node",
                                member.value,
                                name.value,
                                source.unwrap_or("?"),
                                lead_source.unwrap_or("?")
                            ),
                        );
                    } else if targets != *lead_targets {
                        sink.error(
                            member.span.clone(),
                            format!(
                                "volume {:?} of group {:?} has targets {}, volume {lead:?} has {}; a group's volumes have the same targets (a group RP is complete on a target that holds every member)",
                                member.value,
                                name.value,
                                plain_list(&targets),
                                plain_list(lead_targets)
                            ),
                        );
                    }
                }
            }
        }
    }
}
