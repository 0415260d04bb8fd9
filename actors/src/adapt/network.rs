//! Network configuration: the source server's static addresses on its own
//! NICs become DHCP on the VM's NIC, in each format a Linux server may use.
//!
//! - **ifupdown** (/etc/network/interfaces and interfaces.d/): every
//!   `iface X inet|inet6 static` stanza of an interface other than `lo` is
//!   commented out (with all stanzas of X and X's `auto`/`allow-*` lines), and
//!   a stanza `allow-hotplug NIC` / `iface NIC inet dhcp` is added for the VM's
//!   NIC (also when ifupdown manages a NIC the VM does not have).
//! - **netplan** (/etc/netplan/*.yaml): in `ethernets`, each interface with
//!   `addresses` loses its addresses, gateways, routes and MAC/name binding and
//!   gets `dhcp4: true`; the first one also `match: {name: "e*"}` so that it
//!   applies to whatever the VM's NIC is called. Edited line by line (no YAML
//!   library): block style as netplan's own files use; flow-style mappings are
//!   left alone and reported.
//! - **NetworkManager** keyfiles (system-connections/*.nmconnection): ethernet
//!   connections with `method=manual` get `method=auto`, their address,
//!   gateway and route lines and their `interface-name`/`mac-address` binding
//!   commented out.
//! - **systemd-networkd** (/etc/systemd/network/*.network): files that give a
//!   wired NIC a static `Address=` get `DHCP=yes`, their addresses, gateways
//!   and gateway routes commented out; the first one's `[Match]` becomes
//!   `Name=e*`.
//!
//! Lines are commented out with a `#drmesh: ` prefix rather than deleted, so
//! the original stays readable in place (and in the `.drmesh-orig` backup).

use std::collections::BTreeSet;

use super::report::Action;
use super::Edit;

/// The prefix of lines this module comments out.
pub const COMMENT: &str = "#drmesh: ";

fn comment_out(out: &mut String, line: &str) {
    let body = line.trim_start();
    out.push_str(&line[..line.len() - body.len()]);
    out.push_str(COMMENT);
    out.push_str(body);
    if !line.ends_with('\n') {
        out.push('\n');
    }
}

fn push_line(out: &mut String, line: &str) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
}

// ---- ifupdown ------------------------------------------------------------------

const IFUPDOWN_STANZAS: [&str; 7] = ["iface", "mapping", "auto", "source", "source-directory", "rename", "template"];

fn is_stanza_start(word: &str) -> bool {
    IFUPDOWN_STANZAS.contains(&word) || word.starts_with("allow-") || word.starts_with("no-")
}

/// An `iface` stanza: its interface, family and method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Interface name.
    pub name: String,
    /// `inet` or `inet6`.
    pub family: String,
    /// `static`, `dhcp`, `manual`, ...
    pub method: String,
}

/// The active `iface` stanzas of an interfaces file.
pub fn ifupdown_ifaces(text: &str) -> Vec<Iface> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "iface").then_some(())?;
            Some(Iface { name: w.next()?.to_string(), family: w.next().unwrap_or_default().to_string(), method: w.next().unwrap_or_default().to_string() })
        })
        .collect()
}

/// Whether `nic` is brought up (`auto` or `allow-*`) in the interfaces text.
pub fn ifupdown_brings_up(text: &str, nic: &str) -> bool {
    text.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next().is_some_and(|k| k == "auto" || k.starts_with("allow-")) && w.any(|n| n == nic)
    })
}

/// Comments out every stanza of the interfaces in `disable` and removes them
/// from `auto`/`allow-*` lines.
pub fn ifupdown_disable(text: &str, disable: &BTreeSet<String>) -> Edit {
    let mut edit = Edit::default();
    let mut in_disabled = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim();
        let mut words = body.split_whitespace();
        let first = words.next().unwrap_or("");
        if body.is_empty() || first.starts_with('#') {
            edit.text.push_str(line);
            continue;
        }
        if is_stanza_start(first) {
            in_disabled = false;
            if first == "iface" {
                let name = words.next().unwrap_or("");
                if disable.contains(name) {
                    in_disabled = true;
                    comment_out(&mut edit.text, line);
                    edit.changes.push(format!("commented out the stanza '{body}'"));
                    continue;
                }
            } else if first == "auto" || first.starts_with("allow-") {
                let names: Vec<&str> = words.collect();
                let keep: Vec<&str> = names.iter().copied().filter(|n| !disable.contains(*n)).collect();
                if keep.len() < names.len() {
                    comment_out(&mut edit.text, line);
                    if !keep.is_empty() {
                        push_line(&mut edit.text, &format!("{first} {}", keep.join(" ")));
                    }
                    edit.changes.push(format!("commented out '{body}'"));
                    continue;
                }
            }
            edit.text.push_str(line);
            continue;
        }
        if in_disabled {
            comment_out(&mut edit.text, line);
        } else {
            edit.text.push_str(line);
        }
    }
    edit
}

/// The stanza added for the VM's NIC.
pub fn ifupdown_dhcp_stanza(nic: &str) -> String {
    format!("\n# drmesh recovery: DHCP on the VM's network interface (static configuration commented out above)\nallow-hotplug {nic}\niface {nic} inet dhcp\n")
}

// ---- netplan ---------------------------------------------------------------------

struct YamlLine<'a> {
    raw: &'a str,
    indent: usize,
    /// The key of a `key: value` line (without quotes), if it is one.
    key: Option<&'a str>,
    /// What follows the colon, trimmed, comment removed.
    value: &'a str,
    /// Blank or comment only.
    ignorable: bool,
}

fn yaml_lines(text: &str) -> Vec<YamlLine<'_>> {
    text.split_inclusive('\n')
        .map(|raw| {
            let content = raw.trim_end_matches(['\n', '\r']);
            let body = content.trim_start_matches(' ');
            let indent = content.len() - body.len();
            let ignorable = body.trim().is_empty() || body.starts_with('#');
            let (key, value) = match body.split_once(':') {
                Some((k, v)) if !ignorable && !k.starts_with('-') && (v.is_empty() || v.starts_with([' ', '\t'])) => {
                    let v = match v.find(" #") {
                        Some(i) => &v[..i],
                        None => v,
                    };
                    (Some(k.trim().trim_matches(['"', '\''])), v.trim())
                }
                _ => (None, ""),
            };
            YamlLine { raw, indent, key, value, ignorable }
        })
        .collect()
}

/// The end (exclusive) of the block of line `i`: the following lines indented
/// deeper (or sequence items at its own indent, which YAML allows under a key).
fn yaml_block_end(lines: &[YamlLine<'_>], i: usize) -> usize {
    let indent = lines[i].indent;
    let mut end = i + 1;
    let mut j = i + 1;
    while j < lines.len() {
        let l = &lines[j];
        if !l.ignorable {
            let seq_item = l.indent == indent && l.raw.trim_start().starts_with('-') && lines[i].value.is_empty();
            if l.indent <= indent && !seq_item {
                break;
            }
            end = j + 1;
        }
        j += 1;
    }
    end
}

const NETPLAN_STATIC_KEYS: [&str; 7] = ["addresses", "gateway4", "gateway6", "routes", "routing-policy", "dhcp4", "macaddress"];
const NETPLAN_BINDING_KEYS: [&str; 2] = ["match", "set-name"];

/// Rewrites one netplan file; `match_all` gives the first static ethernet
/// `match: {name: "e*"}`. Returns whether `match_all` was used.
pub fn netplan_rewrite(text: &str, match_all: bool) -> (Edit, bool) {
    let mut edit = Edit::default();
    let lines = yaml_lines(text);
    if text.contains('\t') {
        edit.notes.push((Action::LeftAlone, "holds tab characters, which YAML does not allow for indentation; not edited".into()));
        edit.text = text.to_string();
        return (edit, false);
    }
    // Which lines to comment out, and what to insert after which line.
    let mut commented = vec![false; lines.len()];
    let mut inserts: Vec<(usize, String)> = Vec::new();
    let mut used_match_all = false;
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.key != Some("ethernets") {
            i += 1;
            continue;
        }
        if !l.value.is_empty() {
            edit.notes.push((Action::LeftAlone, "its ethernets are written in flow style ({...}); not edited".into()));
            i += 1;
            continue;
        }
        let end = yaml_block_end(&lines, i);
        // Each interface: the lines at the smallest indent inside the block.
        let id_indent = lines[i + 1..end].iter().filter(|l| !l.ignorable).map(|l| l.indent).min();
        let mut j = i + 1;
        while let Some(id_indent) = id_indent {
            if j >= end {
                break;
            }
            let id = &lines[j];
            if id.ignorable || id.indent != id_indent {
                j += 1;
                continue;
            }
            let id_end = yaml_block_end(&lines, j);
            let name = id.key.unwrap_or("?");
            if !id.value.is_empty() {
                if id.value.contains("addresses") {
                    edit.notes.push((Action::LeftAlone, format!("ethernet {name} is written in flow style; not edited")));
                }
                j = id_end;
                continue;
            }
            let keys: Vec<usize> = (j + 1..id_end).filter(|&k| !lines[k].ignorable && lines[k].key.is_some()).collect();
            let key_indent = keys.iter().map(|&k| lines[k].indent).min().unwrap_or(id_indent + 2);
            let is_static = keys.iter().any(|&k| lines[k].indent == key_indent && lines[k].key == Some("addresses"));
            if is_static {
                let bind = match_all && !used_match_all;
                for &k in keys.iter().filter(|&&k| lines[k].indent == key_indent) {
                    let key = lines[k].key.unwrap_or("");
                    if NETPLAN_STATIC_KEYS.contains(&key) || (bind && NETPLAN_BINDING_KEYS.contains(&key)) {
                        for c in commented.iter_mut().take(yaml_block_end(&lines, k)).skip(k) {
                            *c = true;
                        }
                    }
                }
                let pad = " ".repeat(key_indent);
                let mut add = format!("{pad}dhcp4: true\n");
                if bind {
                    add.push_str(&format!("{pad}match: {{name: \"e*\"}}\n"));
                    used_match_all = true;
                    edit.changes.push(format!("ethernet {name}: static addresses commented out, dhcp4: true, and match: {{name: \"e*\"}} so it applies to the VM's NIC"));
                } else {
                    edit.changes.push(format!("ethernet {name}: static addresses commented out, dhcp4: true"));
                }
                inserts.push((j, add));
            }
            j = id_end;
        }
        i = end;
    }
    for (k, l) in lines.iter().enumerate() {
        if commented[k] && !l.ignorable {
            comment_out(&mut edit.text, l.raw);
        } else {
            edit.text.push_str(l.raw);
            if !l.raw.ends_with('\n') && inserts.iter().any(|(at, _)| *at == k) {
                edit.text.push('\n');
            }
        }
        for (_, add) in inserts.iter().filter(|(at, _)| *at == k) {
            edit.text.push_str(add);
        }
    }
    (edit, used_match_all)
}

// ---- INI-style files (NetworkManager, systemd-networkd) ----------------------------

struct IniLine<'a> {
    raw: &'a str,
    section: String,
    /// The index of the section (sections may repeat in networkd files).
    section_no: usize,
    key: Option<&'a str>,
    value: &'a str,
    header: bool,
}

fn ini_lines(text: &str) -> Vec<IniLine<'_>> {
    let mut section = String::new();
    let mut section_no = 0;
    text.split_inclusive('\n')
        .map(|raw| {
            let body = raw.trim();
            if body.starts_with('[') && body.ends_with(']') {
                section = body[1..body.len() - 1].trim().to_string();
                section_no += 1;
                return IniLine { raw, section: section.clone(), section_no, key: None, value: "", header: true };
            }
            let (key, value) = match body.split_once('=') {
                Some((k, v)) if !body.starts_with(['#', ';']) => (Some(k.trim()), v.trim()),
                _ => (None, ""),
            };
            IniLine { raw, section: section.clone(), section_no, key, value, header: false }
        })
        .collect()
}

fn is_address_key(key: &str) -> bool {
    ["address", "addresses", "route", "routes"]
        .iter()
        .any(|p| key.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.chars().all(|c| c.is_ascii_digit()) || rest.ends_with("_options")))
        || key == "gateway"
}

/// Rewrites one NetworkManager keyfile: a wired connection with a static
/// (manual) IPv4 or IPv6 setup gets DHCP / autoconfiguration, unbound from
/// the old NIC's name and MAC. Files that are not such connections come back
/// unchanged.
pub fn nm_rewrite(text: &str) -> Edit {
    let mut edit = Edit::default();
    let lines = ini_lines(text);
    let get = |section: &str, key: &str| lines.iter().find(|l| l.section == section && l.key == Some(key)).map(|l| l.value);
    let wired = matches!(get("connection", "type"), Some("ethernet" | "802-3-ethernet"));
    let manual: Vec<&str> = ["ipv4", "ipv6"].into_iter().filter(|s| get(s, "method") == Some("manual")).collect();
    if !wired || manual.is_empty() {
        edit.text = text.to_string();
        if !manual.is_empty() {
            edit.notes.push((Action::LeftAlone, format!("a static {} connection, not a wired one", get("connection", "type").unwrap_or("unknown"))));
        }
        return edit;
    }
    for l in &lines {
        let key = l.key.unwrap_or("");
        let family = manual.contains(&l.section.as_str());
        if family && key == "method" {
            let indent = &l.raw[..l.raw.len() - l.raw.trim_start().len()];
            edit.text.push_str(&format!("{indent}method=auto\n"));
            edit.changes.push(format!("[{}] method=manual -> method=auto", l.section));
        } else if family && is_address_key(key) {
            comment_out(&mut edit.text, l.raw);
            edit.changes.push(format!("[{}] {key}={} commented out", l.section, l.value));
        } else if (l.section == "connection" && key == "interface-name") || (matches!(l.section.as_str(), "ethernet" | "802-3-ethernet") && key == "mac-address") {
            comment_out(&mut edit.text, l.raw);
            edit.changes.push(format!("[{}] {key}={} commented out (the VM's NIC has another)", l.section, l.value));
        } else {
            edit.text.push_str(l.raw);
        }
    }
    edit
}

/// Whether a networkd `[Match]` `Name=` list names wired NICs (en*, eth*, em*…).
fn wired_names(names: &str) -> bool {
    names.split_whitespace().any(|n| n.trim_start_matches('!').starts_with('e') || n == "*")
}

/// Rewrites one systemd-networkd `.network` file; `match_all` makes its
/// `[Match]` `Name=e*`. Files without a static address on a wired NIC come
/// back unchanged. Returns whether `match_all` was used.
pub fn networkd_rewrite(text: &str, match_all: bool) -> (Edit, bool) {
    let mut edit = Edit::default();
    let lines = ini_lines(text);
    let is_static = lines.iter().any(|l| (l.section == "Network" && l.key == Some("Address")) || (l.section == "Address" && l.key == Some("Address")));
    let names: Vec<&str> = lines.iter().filter(|l| l.section == "Match" && l.key == Some("Name")).map(|l| l.value).collect();
    if !is_static {
        edit.text = text.to_string();
        return (edit, false);
    }
    if !names.is_empty() && !names.iter().any(|n| wired_names(n)) {
        edit.text = text.to_string();
        edit.notes.push((Action::LeftAlone, format!("static addresses on {}, which does not look like a wired NIC", names.join(" "))));
        return (edit, false);
    }
    // [Route] sections with a Gateway= are static routes of the old network.
    let gateway_routes: BTreeSet<usize> = lines.iter().filter(|l| l.section == "Route" && l.key == Some("Gateway")).map(|l| l.section_no).collect();
    let has_network = lines.iter().any(|l| l.header && l.section == "Network");
    let mut dhcp_done = false;
    let mut match_done = false;
    for (i, l) in lines.iter().enumerate() {
        let key = l.key.unwrap_or("");
        let drop_section = l.section == "Address" || (l.section == "Route" && gateway_routes.contains(&l.section_no));
        if drop_section && (l.header || l.key.is_some()) {
            comment_out(&mut edit.text, l.raw);
            if l.header {
                edit.changes.push(format!("[{}] section {} commented out", l.section, l.section_no));
            }
            continue;
        }
        if l.section == "Network" && (key == "Address" || key == "Gateway") {
            comment_out(&mut edit.text, l.raw);
            edit.changes.push(format!("[Network] {key}={} commented out", l.value));
            continue;
        }
        if l.section == "Network" && key == "DHCP" {
            if !dhcp_done {
                edit.text.push_str("DHCP=yes\n");
                edit.changes.push(format!("[Network] DHCP={} -> DHCP=yes", l.value));
                dhcp_done = true;
            } else {
                comment_out(&mut edit.text, l.raw);
            }
            continue;
        }
        if match_all && l.section == "Match" && l.key.is_some() {
            comment_out(&mut edit.text, l.raw);
            edit.changes.push(format!("[Match] {key}={} commented out", l.value));
            continue;
        }
        edit.text.push_str(l.raw);
        if l.header && !l.raw.ends_with('\n') {
            edit.text.push('\n');
        }
        if l.header && l.section == "Match" && match_all && !match_done {
            edit.text.push_str("Name=e*\n");
            edit.changes.push("[Match] Name=e* (whatever the VM's NIC is called)".into());
            match_done = true;
        }
        // DHCP=yes right after the first [Network] header unless a DHCP= line follows.
        if l.header && l.section == "Network" && !dhcp_done {
            let has_dhcp = lines[i + 1..].iter().take_while(|n| !n.header).any(|n| n.key == Some("DHCP"));
            if !has_dhcp {
                edit.text.push_str("DHCP=yes\n");
                edit.changes.push("[Network] DHCP=yes".into());
                dhcp_done = true;
            }
        }
    }
    if !has_network {
        push_line(&mut edit.text, "\n[Network]");
        edit.text.push_str("DHCP=yes\n");
        edit.changes.push("[Network] DHCP=yes".into());
    }
    (edit, match_all && match_done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
    }

    #[test]
    fn ifupdown_static_stanzas_are_commented_out() {
        let text = "# The loopback network interface\nauto lo eno1\niface lo inet loopback\n\n# The primary network interface\nallow-hotplug eno1\niface eno1 inet static\n\taddress 192.168.50.10/24\n\tgateway 192.168.50.1\n\n# v6\niface eno1 inet6 static\n address 2001:db8::10/64\nsource /etc/network/interfaces.d/*\n";
        let statics: BTreeSet<String> = ifupdown_ifaces(text).into_iter().filter(|i| i.method == "static" && i.name != "lo").map(|i| i.name).collect();
        assert_eq!(statics.iter().collect::<Vec<_>>(), ["eno1"]);
        let e = ifupdown_disable(text, &statics);
        assert_eq!(active(&e.text), ["auto lo", "iface lo inet loopback", "source /etc/network/interfaces.d/*"]);
        assert!(e.text.contains("#drmesh: address 192.168.50.10/24"));
        assert!(e.text.contains("# The primary network interface"), "comments stay");
        assert_eq!(e.changes.len(), 4, "{:?}", e.changes);
        let mut added = e.text.clone();
        added.push_str(&ifupdown_dhcp_stanza("ens3"));
        assert!(ifupdown_ifaces(&added).iter().any(|i| i.name == "ens3" && i.method == "dhcp"));
        assert!(ifupdown_brings_up(&added, "ens3"));
        assert!(!ifupdown_brings_up(&added, "eno1"));
    }

    #[test]
    fn netplan_static_to_dhcp() {
        let text = "# server network\nnetwork:\n  version: 2\n  renderer: networkd\n  ethernets:\n    eno1:\n      match:\n        macaddress: 00:11:22:33:44:55\n      set-name: eno1\n      addresses:\n        - 192.168.1.10/24\n      gateway4: 192.168.1.1 # old router\n      nameservers:\n        addresses: [192.168.1.1]\n      routes:\n      - to: 10.0.0.0/8\n        via: 192.168.1.254\n    eno2:\n      addresses: [10.1.1.1/24]\n    eno3:\n      dhcp4: true\n  bridges:\n    br0:\n      addresses: [172.16.0.1/24]\n";
        let (e, used) = netplan_rewrite(text, true);
        assert!(used);
        let want = "# server network\nnetwork:\n  version: 2\n  renderer: networkd\n  ethernets:\n    eno1:\n      dhcp4: true\n      match: {name: \"e*\"}\n      #drmesh: match:\n        #drmesh: macaddress: 00:11:22:33:44:55\n      #drmesh: set-name: eno1\n      #drmesh: addresses:\n        #drmesh: - 192.168.1.10/24\n      #drmesh: gateway4: 192.168.1.1 # old router\n      nameservers:\n        addresses: [192.168.1.1]\n      #drmesh: routes:\n      #drmesh: - to: 10.0.0.0/8\n        #drmesh: via: 192.168.1.254\n    eno2:\n      dhcp4: true\n      #drmesh: addresses: [10.1.1.1/24]\n    eno3:\n      dhcp4: true\n  bridges:\n    br0:\n      addresses: [172.16.0.1/24]\n";
        assert_eq!(e.text, want);
        assert_eq!(e.changes.len(), 2);
        // Already DHCP: nothing to do.
        let (again, _) = netplan_rewrite(&e.text, true);
        assert!(again.changes.is_empty(), "{:?}", again.changes);
        let (flow, _) = netplan_rewrite("network:\n  ethernets: {eth0: {addresses: [1.2.3.4/24]}}\n", true);
        assert!(flow.changes.is_empty() && !flow.notes.is_empty());
    }

    #[test]
    fn networkmanager_manual_to_auto() {
        let text = "[connection]\nid=Wired\nuuid=1234\ntype=ethernet\ninterface-name=eno1\n\n[ethernet]\nmac-address=00:11:22:33:44:55\n\n[ipv4]\naddress1=192.168.1.10/24,192.168.1.1\ndns=192.168.1.1;\nmethod=manual\nroute1=10.0.0.0/8,192.168.1.254\n\n[ipv6]\naddr-gen-mode=stable-privacy\nmethod=auto\n";
        let e = nm_rewrite(text);
        assert_eq!(
            active(&e.text),
            ["[connection]", "id=Wired", "uuid=1234", "type=ethernet", "[ethernet]", "[ipv4]", "dns=192.168.1.1;", "method=auto", "[ipv6]", "addr-gen-mode=stable-privacy", "method=auto"]
        );
        assert_eq!(e.changes.len(), 5, "{:?}", e.changes);
        assert!(nm_rewrite(&e.text).changes.is_empty());
        let wifi = "[connection]\ntype=wifi\n[ipv4]\nmethod=manual\naddress1=1.2.3.4/24\n";
        let w = nm_rewrite(wifi);
        assert_eq!(w.text, wifi);
        assert!(w.changes.is_empty() && !w.notes.is_empty());
    }

    #[test]
    fn networkd_static_to_dhcp() {
        let text = "[Match]\nName=eno1\nMACAddress=00:11:22:33:44:55\n\n[Network]\nAddress=192.168.1.10/24\nGateway=192.168.1.1\nDNS=192.168.1.1\n\n[Address]\nAddress=10.0.0.5/24\n\n[Route]\nDestination=10.9.0.0/16\nGateway=192.168.1.254\n";
        let (e, used) = networkd_rewrite(text, true);
        assert!(used);
        assert_eq!(active(&e.text), ["[Match]", "Name=e*", "[Network]", "DHCP=yes", "DNS=192.168.1.1"]);
        let (again, _) = networkd_rewrite(&e.text, true);
        assert!(again.changes.is_empty());
        let (second, used) = networkd_rewrite("[Match]\nName=eno2\n[Network]\nDHCP=no\nAddress=1.2.3.4/24\n", false);
        assert!(!used);
        assert_eq!(active(&second.text), ["[Match]", "Name=eno2", "[Network]", "DHCP=yes"]);
        let (wifi, _) = networkd_rewrite("[Match]\nName=wlan0\n[Network]\nAddress=1.2.3.4/24\n", true);
        assert!(wifi.changes.is_empty() && !wifi.notes.is_empty());
    }
}
