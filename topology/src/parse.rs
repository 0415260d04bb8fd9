//! From TOML text to checked sections, with a span for everything that later
//! checks point at.
//!
//! The `toml` crate parses the text into spanned values ([`DeTable`]); this
//! module walks them table by table, checking keys, types and per-field rules
//! and recording every problem in the [`Sink`] before moving on. Checks that
//! relate several sections (unique names, references) are in [`crate::validate`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diagnostic::Sink;
use crate::keyfile::read_key_file;
use crate::node_id::NodeId;
use crate::volume_name::VolumeName;
use crate::schema::*;
use crate::units::{self, DURATION_EXAMPLES, SIZE_EXAMPLES};

/// Byte range in the text.
pub(crate) type Span = Range<usize>;

/// A value and where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Sp<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// A `[[site]]` table as read.
pub(crate) struct SiteDraft {
    pub(crate) name: Option<Sp<String>>,
    pub(crate) site: Option<Site>,
}

/// A `[[link]]` table as read.
pub(crate) struct LinkDraft {
    /// The `nodes` list (its span and entries), when it was a list of strings.
    pub(crate) nodes: Option<StringList>,
    /// The link, when every field of its own table was valid.
    pub(crate) link: Option<Link>,
}

/// A `[[group]]` table as read.
pub(crate) struct GroupDraft {
    /// The `name`, when it was a string.
    pub(crate) name: Option<Sp<String>>,
    /// The `volumes` entries, when it was a list of strings.
    pub(crate) volumes: Vec<Sp<String>>,
    /// The group, when every field of its own table was valid.
    pub(crate) group: Option<Group>,
}

/// A `[[platform]]` table as read.
pub(crate) struct PlatformDraft {
    /// The `name`, when it was a string.
    pub(crate) name: Option<Sp<String>>,
    /// The `proxies` entries, when it was a list of strings.
    pub(crate) proxies: Vec<Sp<String>>,
    /// The platform, when every field of its own table was valid.
    pub(crate) platform: Option<Platform>,
}

/// A `[[node]]` table as read.
pub(crate) struct NodeDraft {
    pub(crate) name: Option<Sp<String>>,
    pub(crate) id: Option<Sp<NodeId>>,
    /// Valid addresses with their normalized form.
    pub(crate) addresses: Vec<(Sp<String>, String)>,
    pub(crate) site: Option<Sp<String>>,
    /// The node, when every field of its own table was valid.
    pub(crate) node: Option<Node>,
}

/// A `[[volume]]` table as read.
pub(crate) struct VolumeDraft {
    pub(crate) name: Option<Sp<String>>,
    pub(crate) source: Option<Sp<String>>,
    pub(crate) targets: Vec<Sp<String>>,
    pub(crate) policy: Option<Sp<String>>,
    /// Kind `kmod`: the device and COW store paths as written, for the check
    /// that no two volumes of a node share one.
    pub(crate) kmod_paths: Vec<Sp<PathBuf>>,
    /// A `qemu` volume's monitor and block node, at the `node` key: one
    /// volume per disk of a node.
    pub(crate) qemu_disk: Option<Sp<(crate::schema::QemuSocket, String)>>,
    /// The volume, when every field of its own table was valid.
    pub(crate) volume: Option<Volume>,
}

/// The whole file as read, before cross-section checks.
#[derive(Default)]
pub(crate) struct Draft {
    pub(crate) mesh: Option<Mesh>,
    pub(crate) sites: Vec<SiteDraft>,
    pub(crate) nodes: Vec<NodeDraft>,
    pub(crate) volumes: Vec<VolumeDraft>,
    pub(crate) links: Vec<LinkDraft>,
    pub(crate) groups: Vec<GroupDraft>,
    pub(crate) platforms: Vec<PlatformDraft>,
    /// Policies by name; `None` when the policy's table had errors.
    pub(crate) policies: BTreeMap<String, Option<Policy>>,
    /// Key files that do not exist here: (policy, span, message). Whether that is
    /// an error depends on the node reading the file (see `Topology::parse_for`).
    pub(crate) missing_keys: Vec<(String, Span, String)>,
}

type Value<'i> = Spanned<DeValue<'i>>;

/// A list of strings: the span of the whole list and each entry.
type StringList = (Span, Vec<Sp<String>>);

/// The keys of one TOML table, with a name for messages and the span of its header.
struct Fields<'t, 'i> {
    what: String,
    header: Span,
    map: &'t DeTable<'i>,
}

impl<'t, 'i> Fields<'t, 'i> {
    fn new(what: impl Into<String>, header: Span, map: &'t DeTable<'i>) -> Self {
        Fields { what: what.into(), header, map }
    }

    /// Reports every key not in `allowed` (or in `also`, keys handled elsewhere).
    fn check_keys(&self, sink: &mut Sink<'_>, allowed: &[&str], also: &[&str]) {
        for (key, _) in self.map.iter() {
            let key_str: &str = key.get_ref();
            if !allowed.contains(&key_str) && !also.contains(&key_str) {
                let list: Vec<&str> = allowed.iter().chain(also).copied().collect();
                sink.error(
                    key.span(),
                    format!("unknown key `{key_str}` in {}; allowed keys: {}", self.what, list.join(", ")),
                );
            }
        }
    }

    fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.map.get(key)
    }

    fn key_span(&self, key: &str) -> Option<Span> {
        self.map.get_key_value(key).map(|(k, _)| k.span())
    }

    fn missing(&self, sink: &mut Sink<'_>, key: &str, expected: &str) {
        sink.error(self.header.clone(), format!("missing required key `{key}` in {}; expected {expected}", self.what));
    }

    fn wrong_type(&self, sink: &mut Sink<'_>, key: &str, value: &Value<'_>, expected: &str) {
        sink.error(
            value.span(),
            format!("`{key}` in {} must be {expected}, found {}", self.what, describe(value.get_ref())),
        );
    }

    fn string(&self, sink: &mut Sink<'_>, key: &str, required: bool) -> Option<Sp<String>> {
        let Some(value) = self.get(key) else {
            if required {
                self.missing(sink, key, "a string");
            }
            return None;
        };
        match value.get_ref().as_str() {
            Some(s) => Some(Sp { value: s.to_string(), span: value.span() }),
            None => {
                self.wrong_type(sink, key, value, "a string");
                None
            }
        }
    }

    /// A string that must not be empty.
    fn text(&self, sink: &mut Sink<'_>, key: &str, required: bool) -> Option<Sp<String>> {
        let s = self.string(sink, key, required)?;
        if s.value.trim().is_empty() {
            sink.error(s.span.clone(), format!("`{key}` in {} is empty; expected a non-empty string", self.what));
            return None;
        }
        Some(s)
    }

    fn integer(&self, sink: &mut Sink<'_>, key: &str, required: bool) -> Option<Sp<i128>> {
        let Some(value) = self.get(key) else {
            if required {
                self.missing(sink, key, "an integer");
            }
            return None;
        };
        match value.get_ref().as_integer().and_then(|i| i128::from_str_radix(i.as_str(), i.radix()).ok()) {
            Some(i) => Some(Sp { value: i, span: value.span() }),
            None => {
                self.wrong_type(sink, key, value, "an integer");
                None
            }
        }
    }

    /// An integer in `min..=max`.
    fn ranged(&self, sink: &mut Sink<'_>, key: &str, required: bool, min: i128, max: i128) -> Option<i128> {
        let i = self.integer(sink, key, required)?;
        if i.value < min || i.value > max {
            let expected = if max == i128::from(u32::MAX) || max == i128::from(u64::MAX) {
                format!("at least {min}")
            } else {
                format!("from {min} to {max}")
            };
            sink.error(i.span, format!("`{key}` in {} must be {expected}, found {}", self.what, i.value));
            return None;
        }
        Some(i.value)
    }

    /// An optional duration in `range` (written `shown`, like "1s to 1h"):
    /// `Some(default)` when absent, `None` when reported as wrong.
    fn duration_in(&self, sink: &mut Sink<'_>, key: &str, range: (std::time::Duration, std::time::Duration), shown: &str, default: std::time::Duration) -> Option<std::time::Duration> {
        let Some(s) = self.string(sink, key, false) else {
            return if self.get(key).is_some() { None } else { Some(default) };
        };
        match units::parse_duration(&s.value) {
            Ok(d) if d < range.0 || d > range.1 => {
                sink.error(s.span, format!("`{key}` in {} must be from {shown}, found {:?}", self.what, s.value));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                sink.error(s.span, format!("`{key}` in {}: {e}", self.what));
                None
            }
        }
    }

    fn table(&self, sink: &mut Sink<'_>, key: &str) -> Option<Fields<'t, 'i>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Table(map) => Some(Fields::new(format!("`{key}` of {}", self.what), value.span(), map)),
            _ => {
                self.wrong_type(sink, key, value, "a table");
                None
            }
        }
    }

    /// A list of strings (`None` when absent). `Err(())` when the value was reported as wrong.
    fn string_list(&self, sink: &mut Sink<'_>, key: &str) -> Option<Result<StringList, ()>> {
        let value = self.get(key)?;
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(sink, key, value, "a list of strings");
            return Some(Err(()));
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items.iter() {
            match item.get_ref().as_str() {
                Some(s) => out.push(Sp { value: s.to_string(), span: item.span() }),
                None => {
                    sink.error(
                        item.span(),
                        format!(
                            "entries of `{key}` in {} must be strings, found {}",
                            self.what,
                            describe(item.get_ref())
                        ),
                    );
                    ok = false;
                }
            }
        }
        Some(if ok { Ok((value.span(), out)) } else { Err(()) })
    }
}

/// "a string (\"x\")", "an integer (3)", "a table", … for messages.
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("a string ({s:?})"),
        DeValue::Integer(i) => format!("an integer ({i})"),
        DeValue::Float(f) => format!("a float ({f})"),
        DeValue::Boolean(b) => format!("a boolean ({b})"),
        DeValue::Datetime(d) => format!("a date-time ({d})"),
        DeValue::Array(_) => "an array".to_string(),
        DeValue::Table(_) => "a table".to_string(),
    }
}

/// Node, volume and policy names: `[a-z0-9][a-z0-9-_.]*`.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(format!(
            "bad {kind} name {name:?}; expected lower-case letters, digits, '-', '_' and '.', starting with a letter or digit"
        ))
    }
}

/// Checks `host:port` and returns its normalized form (lower-case host, canonical IP).
pub(crate) fn parse_host_port(text: &str) -> Result<String, String> {
    let expected = "expected \"host:port\" (IPv4, DNS name, or [IPv6] in brackets, e.g. \"[::1]:7400\")";
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, port) =
            rest.split_once("]:").ok_or_else(|| format!("bad address {text:?}: missing \"]:port\"; {expected}"))?;
        let ip: Ipv6Addr =
            ip.parse().map_err(|_| format!("bad address {text:?}: {ip:?} is not an IPv6 address; {expected}"))?;
        (format!("[{ip}]"), port)
    } else {
        let (host, port) =
            text.rsplit_once(':').ok_or_else(|| format!("bad address {text:?}: missing port; {expected}"))?;
        if host.contains(':') {
            return Err(format!("bad address {text:?}: IPv6 addresses must be in brackets; {expected}"));
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            (ip.to_string(), port)
        } else {
            let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            };
            if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
                return Err(format!(
                    "bad address {text:?}: {host:?} is neither an IP address nor a DNS name; {expected}"
                ));
            }
            (name, port)
        }
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("{host}:{p}")),
        _ => Err(format!("bad address {text:?}: port {port:?} is not a number from 1 to 65535; {expected}")),
    }
}

/// Reads the whole document. `origin` names the file for relative key paths.
pub(crate) fn read_document(root: &DeTable<'_>, origin: &Path, sink: &mut Sink<'_>) -> Draft {
    let top = Fields::new("the top level", 0..0, root);
    top.check_keys(sink, &["mesh", "site", "node", "platform", "volume", "link", "group", "policy"], &[]);
    let base_dir = match origin.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut draft = Draft::default();

    match top.get("mesh") {
        None => sink.error(0..0, "missing [mesh] table; expected `[mesh]` with `name` and `version`"),
        Some(value) => match value.get_ref() {
            DeValue::Table(map) => draft.mesh = read_mesh(&Fields::new("[mesh]", value.span(), map), sink),
            other => sink.error(value.span(), format!("`mesh` must be a table ([mesh]), found {}", describe(other))),
        },
    }
    for (header, map) in array_of_tables(&top, "site", sink) {
        draft.sites.push(read_site(&Fields::new("[[site]]", header, map), sink));
    }
    for (header, map) in array_of_tables(&top, "node", sink) {
        draft.nodes.push(read_node(&Fields::new("[[node]]", header, map), sink));
    }
    if top.get("node").is_none() {
        sink.error(0..0, "no [[node]] tables; expected at least one node");
    }
    for (header, map) in array_of_tables(&top, "volume", sink) {
        draft.volumes.push(read_volume(&Fields::new("[[volume]]", header, map), sink));
    }
    for (header, map) in array_of_tables(&top, "link", sink) {
        draft.links.push(read_link(&Fields::new("[[link]]", header, map), sink));
    }
    for (header, map) in array_of_tables(&top, "group", sink) {
        draft.groups.push(read_group(&Fields::new("[[group]]", header, map), sink));
    }
    for (header, map) in array_of_tables(&top, "platform", sink) {
        draft.platforms.push(read_platform(&Fields::new("[[platform]]", header, map), sink));
    }
    if let Some(value) = top.get("policy") {
        match value.get_ref() {
            DeValue::Table(map) => {
                for (key, entry) in map.iter() {
                    let name: &str = key.get_ref();
                    if let Err(e) = check_name("policy", name) {
                        sink.error(key.span(), e);
                    }
                    let policy = match entry.get_ref() {
                        DeValue::Table(fields) => {
                            let what = format!("[policy.{name}]");
                            let mut missing = None;
                            let policy = read_policy(name, &Fields::new(what, entry.span(), fields), &base_dir, sink, &mut missing);
                            if let Some((span, message)) = missing {
                                draft.missing_keys.push((name.to_string(), span, message));
                            }
                            policy
                        }
                        other => {
                            sink.error(
                                entry.span(),
                                format!("`policy.{name}` must be a table ([policy.{name}]), found {}", describe(other)),
                            );
                            None
                        }
                    };
                    draft.policies.insert(name.to_string(), policy);
                }
            }
            other => sink.error(
                value.span(),
                format!("`policy` must be tables named like [policy.NAME], found {}", describe(other)),
            ),
        }
    }
    draft
}

/// The tables of `[[key]]`, reporting a value of the wrong shape.
fn array_of_tables<'t, 'i>(top: &Fields<'t, 'i>, key: &str, sink: &mut Sink<'_>) -> Vec<(Span, &'t DeTable<'i>)> {
    let Some(value) = top.get(key) else { return Vec::new() };
    let DeValue::Array(items) = value.get_ref() else {
        sink.error(
            value.span(),
            format!("`{key}` must be an array of tables ([[{key}]]), found {}", describe(value.get_ref())),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items.iter() {
        match item.get_ref() {
            DeValue::Table(map) => out.push((item.span(), map)),
            other => sink.error(item.span(), format!("entries of `{key}` must be tables, found {}", describe(other))),
        }
    }
    out
}

fn read_mesh(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<Mesh> {
    f.check_keys(sink, &["name", "version"], &[]);
    let name = f.text(sink, "name", true);
    let version = f.ranged(sink, "version", true, 1, i128::from(u64::MAX));
    Some(Mesh { name: name?.value, version: u64::try_from(version?).ok()? })
}

fn read_rate(
    f: &Fields<'_, '_>,
    sink: &mut Sink<'_>,
    key: &str,
    required: bool,
    unlimited_ok: bool,
) -> Option<Option<u64>> {
    let s = f.string(sink, key, required)?;
    if unlimited_ok && s.value.trim() == "unlimited" {
        return Some(None);
    }
    match units::parse_rate(&s.value) {
        Ok(bps) => Some(Some(bps)),
        Err(e) => {
            sink.error(s.span, format!("`{key}` in {}: {e}", f.what));
            None
        }
    }
}

fn read_site(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> SiteDraft {
    f.check_keys(sink, &["name", "uplink"], &[]);
    let name = f.text(sink, "name", true);
    let uplink_ok = f.get("uplink").is_none();
    let uplink = read_rate(f, sink, "uplink", false, false);
    let site = match (&name, uplink, uplink_ok) {
        (Some(n), Some(bps), _) => Some(Site { name: n.value.clone(), uplink_bps: bps }),
        (Some(n), None, true) => Some(Site { name: n.value.clone(), uplink_bps: None }),
        _ => None,
    };
    SiteDraft { name, site }
}

fn read_node(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> NodeDraft {
    f.check_keys(sink, &["name", "id", "addresses", "listen", "site", "labels", "max_drills", "max_cycles", "scrub_every", "scrub_sample", "gc_every", "metrics", "status_page"], &[]);
    let mut ok = true;
    let name = f.text(sink, "name", true);
    if let Some(n) = &name {
        if let Err(e) = check_name("node", &n.value) {
            sink.error(n.span.clone(), e);
            ok = false;
        }
    }
    let id = f.string(sink, "id", true).and_then(|s| match s.value.parse::<NodeId>() {
        Ok(id) => Some(Sp { value: id, span: s.span }),
        Err(e) => {
            sink.error(s.span, format!("bad node `id`: {e}"));
            None
        }
    });
    let mut addresses = Vec::new();
    match f.string_list(sink, "addresses") {
        None => {}
        Some(Err(())) => ok = false,
        Some(Ok((_, list))) => {
            for a in list {
                let text = a.value.trim().to_string();
                match parse_host_port(&text) {
                    Ok(norm) => addresses.push((Sp { value: text, span: a.span }, norm)),
                    Err(e) => {
                        sink.error(a.span, format!("in `addresses` of [[node]]: {e}"));
                        ok = false;
                    }
                }
            }
        }
    }
    let listen = match f.string(sink, "listen", false) {
        Some(s) => match s.value.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                sink.error(
                    s.span,
                    format!(
                        "bad `listen` {:?}: expected an IP socket address like \"0.0.0.0:7400\" or \"[::]:7400\"",
                        s.value
                    ),
                );
                ok = false;
                None
            }
        },
        None => {
            ok &= f.get("listen").is_none();
            addresses.first().map(|(first, _): &(Sp<String>, String)| default_listen(&first.value))
        }
    };
    let listen = listen.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let site = f.text(sink, "site", true);
    let mut labels = BTreeMap::new();
    if let Some(table) = f.table(sink, "labels") {
        for (key, value) in table.map.iter() {
            match value.get_ref().as_str() {
                Some(s) => {
                    labels.insert(key.get_ref().to_string(), s.to_string());
                }
                None => {
                    sink.error(
                        value.span(),
                        format!("label `{}` must be a string, found {}", key.get_ref(), describe(value.get_ref())),
                    );
                    ok = false;
                }
            }
        }
    } else if f.get("labels").is_some() {
        ok = false;
    }
    let mut max_drills = 1;
    if f.get("max_drills").is_some() {
        match f.ranged(sink, "max_drills", false, 1, 64).and_then(|v| u32::try_from(v).ok()) {
            Some(v) => max_drills = v,
            None => ok = false,
        }
    }
    let mut max_cycles = crate::schema::DEFAULT_MAX_CYCLES;
    if f.get("max_cycles").is_some() {
        match f.ranged(sink, "max_cycles", false, 1, 10_000).and_then(|v| u32::try_from(v).ok()) {
            Some(v) => max_cycles = v,
            None => ok = false,
        }
    }
    let scrub_every = every_or_off(f, sink, "scrub_every", crate::schema::DEFAULT_SCRUB_EVERY);
    let gc_every = every_or_off(f, sink, "gc_every", crate::schema::DEFAULT_GC_EVERY);
    ok &= scrub_every.is_some() && gc_every.is_some();
    let (scrub_every, gc_every) = (scrub_every.flatten(), gc_every.flatten());
    let mut scrub_sample_percent = 100;
    if let Some(s) = f.string(sink, "scrub_sample", false) {
        match units::parse_percent(&s.value) {
            Ok(p) => scrub_sample_percent = p,
            Err(e) => {
                sink.error(s.span, format!("`scrub_sample` in {}: {e}", f.what));
                ok = false;
            }
        }
    } else if f.get("scrub_sample").is_some() {
        ok = false;
    }
    let metrics = http_address(f, sink, "metrics", false);
    let status_page = http_address(f, sink, "status_page", true);
    ok &= metrics.is_some() && status_page.is_some();
    let (metrics, status_page) = (metrics.flatten(), status_page.flatten());
    let node = match (&name, &id, &site, ok) {
        (Some(n), Some(i), Some(s), true) => Some(Node {
            max_drills,
            max_cycles,
            metrics,
            status_page,
            scrub_every,
            scrub_sample_percent,
            gc_every,
            name: n.value.clone(),
            id: i.value,
            addresses: addresses.iter().map(|(a, _)| a.value.clone()).collect(),
            listen,
            site: s.value.clone(),
            labels,
        }),
        _ => None,
    };
    NodeDraft { name, id, addresses, site, node }
}

/// A node's "how often" key: a duration, or `"off"` (`Some(None)`), or
/// `default` when absent; `None` when it was reported as wrong.
fn every_or_off(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str, default: std::time::Duration) -> Option<Option<std::time::Duration>> {
    let Some(s) = f.string(sink, key, false) else {
        return if f.get(key).is_some() { None } else { Some(Some(default)) };
    };
    if s.value == "off" {
        return Some(None);
    }
    match units::parse_duration(&s.value) {
        Ok(d) if d.is_zero() => {
            sink.error(s.span, format!("`{key}` in {} is zero; expected a duration such as \"7d\" or \"12h\", or \"off\"", f.what));
            None
        }
        Ok(d) => Some(Some(d)),
        Err(e) => {
            sink.error(s.span, format!("`{key}` in {}: {e}, or \"off\"", f.what));
            None
        }
    }
}

/// An optional HTTP listen address of a `[[node]]` (`metrics`, `status_page`):
/// `Some(None)` when absent, `None` after reporting an error. A
/// `loopback_only` address must be 127.0.0.0/8 or ::1.
fn http_address(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str, loopback_only: bool) -> Option<Option<SocketAddr>> {
    let Some(s) = f.string(sink, key, false) else {
        return if f.get(key).is_some() { None } else { Some(None) };
    };
    match s.value.trim().parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            sink.error(s.span, format!("`{key}` in {} has port 0; give the port to serve on, like \"127.0.0.1:9720\"", f.what));
            None
        }
        Ok(addr) if loopback_only && !addr.ip().is_loopback() => {
            sink.error(
                s.span,
                format!(
                    "`{key}` in {} must be a loopback address such as \"127.0.0.1:9720\" or \"[::1]:9720\": the page has no login; reach it from elsewhere through an SSH tunnel or a proxy that authenticates",
                    f.what
                ),
            );
            None
        }
        Ok(addr) => Some(Some(addr)),
        Err(_) => {
            sink.error(s.span, format!("bad `{key}` in {}: expected an IP socket address like \"127.0.0.1:9720\" or \"[::1]:9720\"", f.what));
            None
        }
    }
}

/// Default `listen` for a node whose first address is `first` (already checked).
fn default_listen(first: &str) -> SocketAddr {
    if let Ok(addr) = first.parse::<SocketAddr>() {
        return addr;
    }
    let port = first.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

/// Settings of each source kind, in the order documented.
const KIND_SETTINGS: &[(&str, &[&str])] = &[
    ("file", &["path"]),
    ("kmod", &["device", "cow_store", "state_store"]),
    ("qemu", &["monitor", "node", "fleece_dir", "fleece_reserve", "fleece_max", "nbd", "guest_agent", "tls", "tls_object"]),
    ("ebs", &["volume_id", "region", "endpoint"]),
];

fn read_volume(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> VolumeDraft {
    let all_settings: Vec<&str> = KIND_SETTINGS.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    f.check_keys(sink, &["name", "source", "kind", "targets", "policy", "hooks", "free_space"], &all_settings);
    let mut ok = true;
    let name = f.text(sink, "name", true);
    let checked = name.as_ref().and_then(|n| match VolumeName::new(n.value.clone()) {
        Ok(checked) => Some(checked),
        Err(e) => {
            sink.error(n.span.clone(), e.to_string());
            None
        }
    });
    let source = f.text(sink, "source", true);
    let policy = f.text(sink, "policy", true);
    let mut targets = Vec::new();
    match f.string_list(sink, "targets") {
        None => {
            f.missing(sink, "targets", "a non-empty list of node names");
            ok = false;
        }
        Some(Err(())) => ok = false,
        Some(Ok((span, list))) => {
            if list.is_empty() {
                sink.error(span, "`targets` in [[volume]] is empty; expected at least one target node name");
                ok = false;
            }
            targets = list;
        }
    }
    let kind = f.string(sink, "kind", true).and_then(|k| {
        let known = KIND_SETTINGS.iter().find(|(name, _)| *name == k.value);
        if known.is_none() {
            sink.error(
                k.span.clone(),
                format!("unknown volume kind {:?}; expected one of \"file\", \"kmod\", \"qemu\", \"ebs\"", k.value),
            );
        }
        known.map(|(name, _)| *name)
    });
    let mut kmod_paths = Vec::new();
    let mut qemu_disk = None;
    let kind = kind.and_then(|kind| {
        let mut wrong = false;
        for (other, settings) in KIND_SETTINGS.iter().filter(|(k, _)| *k != kind) {
            for setting in settings.iter() {
                if let Some(span) = f.key_span(setting) {
                    sink.error(span, format!("`{setting}` is a setting of kind {other:?}, not {kind:?}"));
                    wrong = true;
                }
            }
        }
        let settings = if kind == "kmod" { read_kmod(f, sink, &mut kmod_paths) } else { read_kind_settings(kind, f, sink) };
        if let (Some(SourceKind::Qemu { monitor, node, .. }), Some(span)) = (&settings, f.key_span("node")) {
            qemu_disk = Some(Sp { span, value: (monitor.clone(), node.clone()) });
        }
        if wrong {
            None
        } else {
            settings
        }
    });
    let hooks = match f.table(sink, "hooks") {
        Some(t) => read_hooks(&t, sink).map(Some),
        None if f.get("hooks").is_some() => None,
        None => Some(None),
    };
    let free_space = match f.string(sink, "free_space", false) {
        None if f.get("free_space").is_some() => None,
        None => Some(FreeSpace::Skip),
        Some(v) => match v.value.as_str() {
            "skip" => Some(FreeSpace::Skip),
            "read" => Some(FreeSpace::Read),
            other => {
                sink.error(v.span, format!("`free_space` is {other:?}; expected \"skip\" (the default: free blocks of the volume's filesystem are not read) or \"read\""));
                None
            }
        },
    };
    let volume = match (checked, &source, &policy, kind, hooks, free_space, ok) {
        (Some(name), Some(s), Some(p), Some(kind), Some(hooks), Some(free_space), true) => Some(Volume {
            name,
            source: s.value.clone(),
            kind,
            targets: targets.iter().map(|t| t.value.clone()).collect(),
            policy: p.value.clone(),
            hooks,
            free_space,
        }),
        _ => None,
    };
    VolumeDraft { name, source, targets, policy, kmod_paths, qemu_disk, volume }
}

/// Longest time limit of a volume hook.
const HOOK_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

/// `[volume.hooks]`: `pre` and `post` commands (at least one) and `timeout`.
fn read_hooks(t: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<VolumeHooks> {
    t.check_keys(sink, &["pre", "post", "timeout"], &[]);
    let mut ok = true;
    let mut command = |key: &str| -> Option<Vec<String>> {
        match t.string_list(sink, key) {
            None => None,
            Some(Err(())) => {
                ok = false;
                None
            }
            Some(Ok((span, list))) => match list.first() {
                None => {
                    sink.error(span, format!("`{key}` in {} is empty; expected the program and its arguments", t.what));
                    ok = false;
                    None
                }
                Some(program) if !Path::new(&program.value).is_absolute() => {
                    sink.error(
                        program.span.clone(),
                        format!("the program of `{key}` in {} must be an absolute path (a node's PATH may be short), found {:?}", t.what, program.value),
                    );
                    ok = false;
                    None
                }
                Some(_) => Some(list.into_iter().map(|c| c.value).collect()),
            },
        }
    };
    let (pre, post) = (command("pre"), command("post"));
    if ok && pre.is_none() && post.is_none() {
        sink.error(t.header.clone(), format!("{} has neither `pre` nor `post`; expected a command in at least one, such as pre = [\"/usr/local/bin/quiesce-db\"]", t.what));
        ok = false;
    }
    let timeout = t.duration_in(sink, "timeout", (std::time::Duration::from_secs(1), HOOK_TIMEOUT_MAX), "1s to 1h", std::time::Duration::from_secs(60));
    let timeout = timeout?;
    ok.then_some(VolumeHooks { pre, post, timeout })
}

/// An absolute `/dev/...` path setting with the span of its value.
fn read_dev_path(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str, required: bool) -> Option<Sp<PathBuf>> {
    let s = f.text(sink, key, required)?;
    let path = PathBuf::from(s.value.trim());
    if !path.is_absolute() || !path.starts_with("/dev") {
        sink.error(s.span, format!("`{key}` in {} must be a /dev/... device path, found {:?}", f.what, s.value));
        return None;
    }
    Some(Sp { value: path, span: s.span })
}

/// Settings of kind `kmod`: the tracked device, the COW store and the optional
/// state store, which must all differ.
fn read_kmod(f: &Fields<'_, '_>, sink: &mut Sink<'_>, paths: &mut Vec<Sp<PathBuf>>) -> Option<SourceKind> {
    let device = read_dev_path(f, sink, "device", true);
    let cow_store = read_dev_path(f, sink, "cow_store", true);
    let state_store = read_dev_path(f, sink, "state_store", false);
    let (device, cow_store) = (device?, cow_store?);
    let mut ok = true;
    for (key, store) in [("cow_store", Some(&cow_store)), ("state_store", state_store.as_ref())] {
        let Some(store) = store else { continue };
        if device.value == store.value {
            sink.error(
                store.span.clone(),
                format!(
                    "`{key}` {:?} is the tracked device itself; expected a block device on another disk (a spare disk, partition or loop device)",
                    store.value
                ),
            );
            ok = false;
        }
    }
    if let Some(state) = state_store.as_ref().filter(|s| s.value == cow_store.value) {
        sink.error(
            state.span.clone(),
            format!(
                "`state_store` {:?} is also the `cow_store`; each snapshot overwrites its COW store, so the tracking state needs a device of its own",
                state.value
            ),
        );
        ok = false;
    }
    if !ok {
        return None;
    }
    let kind = SourceKind::Kmod {
        device: device.value.clone(),
        cow_store: cow_store.value.clone(),
        state_store: state_store.as_ref().map(|s| s.value.clone()),
    };
    paths.push(device);
    paths.push(cow_store);
    paths.extend(state_store);
    Some(kind)
}

/// An absolute path setting.
fn read_abs_path(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str) -> Option<PathBuf> {
    let s = f.text(sink, key, true)?;
    let path = PathBuf::from(s.value.trim());
    if !path.is_absolute() {
        sink.error(s.span, format!("`{key}` in {} must be an absolute path, found {:?}", f.what, s.value));
        return None;
    }
    Some(path)
}

/// The settings of a `qemu` volume.
fn read_qemu(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<SourceKind> {
    use crate::schema::{FleeceGuard, QemuSocket, QemuTls};
    let monitor = read_qemu_socket(f, sink, "monitor");
    let node = f.text(sink, "node", true).and_then(|s| match block_node_name(&s.value) {
        Ok(()) => Some(s.value),
        Err(why) => {
            sink.error(s.span, format!("`node` {:?}: {why}; expected the disk's block node name as qemu's query-named-block-nodes lists it", s.value));
            None
        }
    });
    let fleece_dir = read_abs_path(f, sink, "fleece_dir");
    let monitor = monitor?;
    let tcp = monitor.is_tcp();
    let nbd = match (f.get("nbd"), &monitor) {
        (None, QemuSocket::Unix(_)) => fleece_dir.as_ref().map(|d| QemuSocket::Unix(d.join("nbd.sock"))),
        (None, QemuSocket::Tcp { host, .. }) => Some(QemuSocket::Tcp { host: host.clone(), port: crate::schema::DEFAULT_NBD_PORT }),
        (Some(_), _) => read_qemu_socket(f, sink, "nbd"),
    };
    let guest_agent = match f.get("guest_agent") {
        None => Some(None),
        Some(_) => read_qemu_socket(f, sink, "guest_agent").map(Some),
    };
    let size = |sink: &mut Sink<'_>, key: &str, default: u64| match f.text(sink, key, false) {
        None if f.get(key).is_some() => None,
        None => Some(default),
        Some(s) => match units::parse_size(&s.value) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                sink.error(s.span, format!("`{key}`: {e}"));
                None
            }
        },
    };
    let mut ok = true;
    // A monitor on this machine: the node watches the folder's free space;
    // over TCP it cannot, and bounds the fleece's size instead.
    let (own, other) = if tcp { ("fleece_max", "fleece_reserve") } else { ("fleece_reserve", "fleece_max") };
    if let Some(span) = f.key_span(other) {
        let why = if tcp {
            "a monitor over TCP is on another machine, whose free space this node cannot watch: `fleece_max` bounds each view's fleece instead"
        } else {
            "a monitor on a Unix socket is on this machine: `fleece_reserve` keeps free space in fleece_dir instead"
        };
        sink.error(span, format!("`{other}` is not a setting of this volume: {why}"));
        ok = false;
    }
    let mut guard = if tcp { size(sink, own, crate::schema::DEFAULT_FLEECE_MAX_BYTES).map(FleeceGuard::Max) } else { size(sink, own, crate::schema::DEFAULT_FLEECE_RESERVE_BYTES).map(FleeceGuard::Reserve) };
    if let (Some(FleeceGuard::Max(bytes)), Some(span)) = (guard, f.get("fleece_max").map(|v| v.span())) {
        if bytes < 64 << 20 {
            sink.error(span, format!("`fleece_max` {} is under 64 MiB: a view would be dropped at the VM's first writes; expected room for what the VM writes during one cycle", format_args!("{} MiB", bytes >> 20)));
            guard = None;
        }
    }
    let tls_dir = match f.get("tls") {
        None => Some(None),
        Some(_) => read_abs_path(f, sink, "tls").map(Some),
    };
    let tls_object = match f.text(sink, "tls_object", false) {
        None => Some(None),
        Some(s) => match block_node_name(&s.value) {
            Ok(()) => Some(Some(s.value)),
            Err(_) => {
                sink.error(s.span, format!("`tls_object` {:?}: expected the id of qemu's tls-creds-x509 object (letters, digits, '-', '.', '_'; a letter first)", s.value));
                None
            }
        },
    };
    let (nbd, guest_agent, tls_dir, tls_object) = (nbd?, guest_agent?, tls_dir?, tls_object?);
    // Every socket of a VM is on the monitor's machine: all local or all over TCP.
    for (key, socket) in [("nbd", Some(&nbd)), ("guest_agent", guest_agent.as_ref())] {
        if socket.is_some_and(|s| s.is_tcp() != tcp) {
            if let Some(span) = f.key_span(key) {
                let how = if tcp { "over TCP (tcp:HOST:PORT), like the monitor" } else { "a Unix socket (an absolute path), like the monitor" };
                sink.error(span, format!("`{key}` is on the monitor's machine: expected {how}"));
            }
            ok = false;
        }
    }
    let tls = match (tcp, tls_dir) {
        (true, Some(dir)) => Some(QemuTls { dir, object: tls_object }),
        (true, None) => {
            if let Some(span) = f.key_span("monitor") {
                sink.error(span, "a monitor over TCP is reached with TLS only: expected `tls`, the folder of this node's client credentials (ca-cert.pem, client-cert.pem, client-key.pem)");
            }
            ok = false;
            None
        }
        (false, dir) => {
            for key in ["tls", "tls_object"] {
                if let Some(span) = f.key_span(key) {
                    sink.error(span, format!("`{key}` is for a monitor over TCP (tcp:HOST:PORT); this one is a Unix socket on this machine"));
                    ok = false;
                }
            }
            let _ = dir;
            None
        }
    };
    // qemu's NBD server deletes what is at its path: never the monitor or the agent's socket.
    for (other, socket) in [("monitor", Some(&monitor)), ("guest_agent", guest_agent.as_ref())] {
        if socket == Some(&nbd) {
            let key = if f.get("nbd").is_some() { "nbd" } else { other };
            if let Some(span) = f.key_span(key) {
                let default = if tcp { "port 10809 of the monitor's host" } else { "nbd.sock in fleece_dir" };
                sink.error(span, format!("the NBD socket {} is also the `{other}`; qemu's NBD server would take it over: expected one of its own (default: {default})", quoted(&nbd)));
            }
            ok = false;
        }
    }
    if guest_agent.as_ref() == Some(&monitor) {
        if let Some(span) = f.key_span("guest_agent") {
            sink.error(span, "`guest_agent` is the `monitor` socket; expected the socket of the VM's qemu-guest-agent channel");
        }
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(SourceKind::Qemu { monitor, node: node?, fleece_dir: fleece_dir?, nbd, guest_agent, fleece_guard: guard?, tls })
}

/// `socket` in quotes, for messages.
fn quoted(socket: &crate::schema::QemuSocket) -> String {
    format!("{:?}", socket.to_string())
}

/// One of qemu's sockets at `key`: an absolute path, or `tcp:HOST:PORT`.
fn read_qemu_socket(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str) -> Option<crate::schema::QemuSocket> {
    let s = f.text(sink, key, true)?;
    let text = s.value.trim();
    let Some(address) = text.strip_prefix("tcp:") else {
        return read_abs_path(f, sink, key).map(crate::schema::QemuSocket::Unix);
    };
    let parsed = match address.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").filter(|(h, _)| h.parse::<std::net::Ipv6Addr>().is_ok()),
        None => address.rsplit_once(':').filter(|(h, _)| !h.contains(':')),
    };
    let host_ok = |h: &str| !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    match parsed.map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if port > 0 && host_ok(host) => Some(crate::schema::QemuSocket::Tcp { host: host.to_string(), port }),
        _ => {
            sink.error(s.span, format!("`{key}` {:?}: expected an absolute path of a Unix socket, or tcp:HOST:PORT (an IPv6 address in brackets: tcp:[::1]:4444) with a port from 1 to 65535", s.value));
            None
        }
    }
}

/// Whether `name` is a block node name qemu accepts: a letter, then
/// letters, digits, `-`, `.` or `_`, at most 31 bytes.
fn block_node_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Err("a block node name starts with a letter");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err("a block node name holds only letters, digits, '-', '.' and '_'");
    }
    if name.len() > 31 {
        return Err("a block node name is at most 31 bytes");
    }
    Ok(())
}

fn read_kind_settings(kind: &str, f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<SourceKind> {
    match kind {
        "file" => read_abs_path(f, sink, "path").map(|path| SourceKind::File { path }),
        "qemu" => read_qemu(f, sink),
        "ebs" => {
            let volume_id = f.text(sink, "volume_id", true).and_then(|s| {
                let ok = s.value.strip_prefix("vol-").is_some_and(|hex| {
                    !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                });
                if ok {
                    Some(s.value)
                } else {
                    sink.error(
                        s.span,
                        format!(
                            "bad `volume_id` {:?}; expected an EBS volume id like \"vol-0123456789abcdef0\"",
                            s.value
                        ),
                    );
                    None
                }
            });
            let region = f.text(sink, "region", true).and_then(|s| {
                if s.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
                    Some(s.value)
                } else {
                    sink.error(
                        s.span,
                        format!("bad `region` {:?}; expected an AWS region like \"eu-west-1\"", s.value),
                    );
                    None
                }
            });
            let endpoint_ok = f.get("endpoint").is_none();
            let endpoint = f.text(sink, "endpoint", false).and_then(|s| {
                if s.value.starts_with("https://") || s.value.starts_with("http://") {
                    Some(s.value)
                } else {
                    sink.error(s.span, format!("bad `endpoint` {:?}; expected an http:// or https:// URL", s.value));
                    None
                }
            });
            if endpoint.is_none() && !endpoint_ok {
                return None;
            }
            Some(SourceKind::Ebs { volume_id: volume_id?, region: region?, endpoint })
        }
        _ => None,
    }
}

fn read_policy(
    name: &str,
    f: &Fields<'_, '_>,
    base_dir: &Path,
    sink: &mut Sink<'_>,
    missing_key: &mut Option<(Span, String)>,
) -> Option<Policy> {
    f.check_keys(
        sink,
        &["rpo", "retention", "block_size", "compression", "encryption_key_file", "bandwidth", "drill"],
        &[],
    );
    let mut ok = true;
    let rpo = f.string(sink, "rpo", true).and_then(|s| match units::parse_duration(&s.value) {
        Ok(d) if d.is_zero() => {
            sink.error(s.span, format!("`rpo` in {} is zero; expected {DURATION_EXAMPLES}", f.what));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            sink.error(s.span, format!("`rpo` in {}: {e}", f.what));
            None
        }
    });

    let mut retention = Retention::default();
    if let Some(t) = f.table(sink, "retention") {
        t.check_keys(sink, &["keep_last", "hourly", "daily", "weekly", "coalesce_unchanged"], &[]);
        let max = i128::from(u32::MAX);
        let mut field = |key: &str, min: i128, slot: &mut u32| {
            if t.get(key).is_some() {
                match t.ranged(sink, key, false, min, max).and_then(|v| u32::try_from(v).ok()) {
                    Some(v) => *slot = v,
                    None => ok = false,
                }
            }
        };
        field("keep_last", 1, &mut retention.keep_last);
        field("hourly", 0, &mut retention.hourly);
        field("daily", 0, &mut retention.daily);
        field("weekly", 0, &mut retention.weekly);
        if let Some(v) = t.get("coalesce_unchanged") {
            match v.get_ref().as_bool() {
                Some(b) => retention.coalesce_unchanged = b,
                None => {
                    t.wrong_type(sink, "coalesce_unchanged", v, "true or false");
                    ok = false;
                }
            }
        }
    } else if f.get("retention").is_some() {
        ok = false;
    }

    let mut block_bytes = DEFAULT_BLOCK_BYTES;
    if let Some(value) = f.get("block_size") {
        let parsed = match value.get_ref() {
            DeValue::String(s) => units::parse_size(s),
            DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                .ok()
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| format!("bad size {i}; expected {SIZE_EXAMPLES}")),
            other => Err(format!("expected {SIZE_EXAMPLES}, found {}", describe(other))),
        };
        match parsed {
            Ok(bytes) if bytes.is_power_of_two() && (MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&bytes) => {
                block_bytes = bytes;
            }
            Ok(bytes) => {
                let why = if bytes.is_power_of_two() { "is out of range" } else { "is not a power of two" };
                sink.error(
                    value.span(),
                    format!(
                        "`block_size` in {}: {bytes} bytes {why}; expected a power of two from 64KiB to 16MiB",
                        f.what
                    ),
                );
                ok = false;
            }
            Err(e) => {
                sink.error(value.span(), format!("`block_size` in {}: {e}", f.what));
                ok = false;
            }
        }
    }

    let mut compression = Compression::default();
    if let Some(s) = f.string(sink, "compression", false) {
        match parse_compression(&s.value) {
            Ok(c) => compression = c,
            Err(e) => {
                sink.error(s.span, format!("`compression` in {}: {e}", f.what));
                ok = false;
            }
        }
    } else if f.get("compression").is_some() {
        ok = false;
    }

    let mut encryption_key_file = None;
    if let Some(s) = f.text(sink, "encryption_key_file", false) {
        let path = base_dir.join(s.value.trim());
        match read_key_file(&path) {
            Ok(_) => encryption_key_file = Some(path),
            // Only the nodes that encrypt need the key; the caller decides.
            Err(e) if !path.exists() => {
                *missing_key = Some((s.span, e));
                encryption_key_file = Some(path);
            }
            Err(e) => {
                sink.error(s.span, e);
                ok = false;
            }
        }
    } else if f.get("encryption_key_file").is_some() {
        ok = false;
    }

    let mut bandwidth = None;
    if let Some(t) = f.table(sink, "bandwidth") {
        bandwidth = read_bandwidth(&t, sink);
        ok &= bandwidth.is_some();
    } else if f.get("bandwidth").is_some() {
        ok = false;
    }

    let mut drill = None;
    if let Some(t) = f.table(sink, "drill") {
        drill = read_drill(&t, sink);
        ok &= drill.is_some();
    } else if f.get("drill").is_some() {
        ok = false;
    }

    if !ok {
        return None;
    }
    Some(Policy {
        name: name.to_string(),
        rpo: rpo?,
        retention,
        block_bytes,
        compression,
        encryption_key_file,
        bandwidth,
        drill,
    })
}

/// `"zstd"`, `"zstd:N"` or `"off"`.
pub(crate) fn parse_compression(text: &str) -> Result<Compression, String> {
    let expected = "expected \"off\", \"zstd\" or \"zstd:N\" with N from -7 to 19";
    match text.trim() {
        "off" => Ok(Compression::Off),
        "zstd" => Ok(Compression::Zstd { level: ZSTD_LEVEL_DEFAULT }),
        other => {
            let level =
                other.strip_prefix("zstd:").ok_or_else(|| format!("unknown compression {text:?}; {expected}"))?;
            let level: i32 = level.trim().parse().map_err(|_| format!("bad zstd level in {text:?}; {expected}"))?;
            if !(ZSTD_LEVEL_MIN..=ZSTD_LEVEL_MAX).contains(&level) {
                return Err(format!("zstd level {level} is out of range; {expected}"));
            }
            Ok(Compression::Zstd { level })
        }
    }
}

fn read_link(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> LinkDraft {
    f.check_keys(sink, &["nodes", "limit", "windows"], &[]);
    let mut ok = true;
    let mut pair = None;
    let nodes = match f.string_list(sink, "nodes") {
        None => {
            f.missing(sink, "nodes", "a list of the two node names the link joins, like [\"branch-1\", \"hq\"]");
            None
        }
        Some(Err(())) => None,
        Some(Ok((span, list))) => {
            match list.as_slice() {
                [a, b] if a.value == b.value => {
                    sink.error(b.span.clone(), format!("`nodes` in [[link]] names {:?} twice; expected two different nodes", b.value));
                    ok = false;
                }
                [a, b] => pair = Some([a.value.clone(), b.value.clone()]),
                _ => {
                    sink.error(span.clone(), format!("`nodes` in [[link]] lists {} names; expected exactly two", list.len()));
                    ok = false;
                }
            }
            Some((span, list))
        }
    };
    if f.get("limit").is_none() && f.get("windows").is_none() {
        f.missing(sink, "limit", "a rate like \"50Mbit\" (or `windows`)");
        ok = false;
    }
    let bandwidth = read_bandwidth_keys(f, sink);
    let link = match (pair, bandwidth) {
        (Some(nodes), Some(bandwidth)) if ok => Some(Link { nodes, bandwidth }),
        _ => None,
    };
    LinkDraft { nodes, link }
}

fn read_group(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> GroupDraft {
    f.check_keys(sink, &["name", "volumes", "hooks"], &[]);
    let mut ok = true;
    let name = f.text(sink, "name", true);
    if let Some(n) = &name {
        if let Err(e) = check_name("group", &n.value) {
            sink.error(n.span.clone(), e);
            ok = false;
        }
    }
    let mut volumes = Vec::new();
    let mut checked = Vec::new();
    match f.string_list(sink, "volumes") {
        None => {
            f.missing(sink, "volumes", "a list of at least two volume names of one source node, like [\"db-system\", \"db-data\"]");
            ok = false;
        }
        Some(Err(())) => ok = false,
        Some(Ok((span, list))) => {
            if list.len() < 2 {
                sink.error(span, format!("`volumes` in [[group]] lists {} volume(s); a consistency group has at least two", list.len()));
                ok = false;
            }
            for v in &list {
                match VolumeName::new(v.value.clone()) {
                    Ok(name) if checked.contains(&name) => {
                        sink.error(v.span.clone(), format!("volume {:?} is listed twice in the group", v.value));
                        ok = false;
                    }
                    Ok(name) => checked.push(name),
                    Err(e) => {
                        sink.error(v.span.clone(), e.to_string());
                        ok = false;
                    }
                }
            }
            volumes = list;
        }
    }
    let hooks = match f.table(sink, "hooks") {
        Some(t) => read_hooks(&t, sink).map(Some),
        None if f.get("hooks").is_some() => None,
        None => Some(None),
    };
    let group = match (&name, hooks) {
        (Some(n), Some(hooks)) if ok => Some(Group { name: n.value.clone(), volumes: checked, hooks }),
        _ => None,
    };
    GroupDraft { name, volumes, group }
}

/// Shortest and longest `lease` of a `[[platform]]`.
const PLATFORM_LEASE_RANGE: (std::time::Duration, std::time::Duration) = (std::time::Duration::from_secs(2), std::time::Duration::from_secs(600));

fn read_platform(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> PlatformDraft {
    f.check_keys(sink, &["name", "proxies", "lease"], &[]);
    let mut ok = true;
    let name = f.text(sink, "name", true);
    if let Some(n) = &name {
        if let Err(e) = check_name("platform", &n.value) {
            sink.error(n.span.clone(), e);
            ok = false;
        }
    }
    let mut proxies = Vec::new();
    match f.string_list(sink, "proxies") {
        None => {
            f.missing(sink, "proxies", "a list of the node names that may read the platform's VMs, like [\"proxy-1\", \"proxy-2\"]");
            ok = false;
        }
        Some(Err(())) => ok = false,
        Some(Ok((span, list))) => {
            if list.is_empty() {
                sink.error(span, "`proxies` in [[platform]] is empty; expected at least one proxy node name");
                ok = false;
            }
            for (i, p) in list.iter().enumerate() {
                if list[..i].iter().any(|q| q.value == p.value) {
                    sink.error(p.span.clone(), format!("proxy {:?} is listed twice", p.value));
                    ok = false;
                }
            }
            proxies = list;
        }
    }
    let lease = f.duration_in(sink, "lease", PLATFORM_LEASE_RANGE, "2s to 10m", crate::schema::DEFAULT_PLATFORM_LEASE);
    let platform = match (&name, lease) {
        (Some(n), Some(lease)) if ok => Some(Platform { name: n.value.clone(), proxies: proxies.iter().map(|p| p.value.clone()).collect(), lease }),
        _ => None,
    };
    PlatformDraft { name, proxies, platform }
}

fn read_bandwidth(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<Bandwidth> {
    f.check_keys(sink, &["limit", "windows"], &[]);
    read_bandwidth_keys(f, sink)
}

/// The `limit` and `windows` keys of a bandwidth table (policy or link); the
/// caller checks which other keys are allowed.
fn read_bandwidth_keys(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<Bandwidth> {
    let mut ok = true;
    let limit_bps = match read_rate(f, sink, "limit", false, true) {
        Some(limit) => limit,
        None => {
            ok &= f.get("limit").is_none();
            None
        }
    };
    let mut windows = Vec::new();
    if let Some(value) = f.get("windows") {
        match value.get_ref() {
            DeValue::Array(items) => {
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::Table(map) => {
                            let w = Fields::new("a bandwidth window", item.span(), map);
                            match read_window(&w, sink) {
                                Some(window) => windows.push(window),
                                None => ok = false,
                            }
                        }
                        other => {
                            sink.error(
                                item.span(),
                                format!(
                                    "entries of `windows` must be tables like {{ days = \"mon-fri\", from = \"08:00\", to = \"18:00\", limit = \"50Mbit\" }}, found {}",
                                    describe(other)
                                ),
                            );
                            ok = false;
                        }
                    }
                }
            }
            _ => {
                f.wrong_type(sink, "windows", value, "an array of tables");
                ok = false;
            }
        }
    }
    ok.then_some(Bandwidth { limit_bps, windows })
}

fn read_time(f: &Fields<'_, '_>, sink: &mut Sink<'_>, key: &str, allow_24: bool) -> Option<TimeOfDay> {
    let s = f.string(sink, key, true)?;
    match units::parse_time_of_day(&s.value, allow_24) {
        Ok(t) => Some(t),
        Err(e) => {
            sink.error(s.span, format!("`{key}` in {}: {e}", f.what));
            None
        }
    }
}

fn read_window(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<BandwidthWindow> {
    f.check_keys(sink, &["days", "from", "to", "limit"], &[]);
    let days = match f.string(sink, "days", false) {
        Some(s) => match units::parse_days(&s.value) {
            Ok(d) => Some(d),
            Err(e) => {
                sink.error(s.span, format!("`days` in {}: {e}", f.what));
                None
            }
        },
        None if f.get("days").is_some() => None,
        None => units::parse_days("daily").ok(),
    };
    let from = read_time(f, sink, "from", false);
    let to = read_time(f, sink, "to", true);
    if let (Some(a), Some(b)) = (from, to) {
        if a == b {
            if let Some(span) = f.get("to").map(|v| v.span()) {
                sink.error(span, format!("window from {a} to {b} is empty; expected `to` different from `from`"));
            }
            return None;
        }
    }
    let limit = read_rate(f, sink, "limit", true, true);
    Some(BandwidthWindow { days: days?, from: from?, to: to?, limit_bps: limit? })
}

fn read_drill(f: &Fields<'_, '_>, sink: &mut Sink<'_>) -> Option<Drill> {
    f.check_keys(
        sink,
        &["schedule", "checks", "nodes", "max_unverified_age", "time_limit", "boot", "postgres", "script"],
        &[],
    );
    let names = "\"fsck\", \"boot\", \"postgres\", \"script\"";
    let schedule = f.string(sink, "schedule", true).and_then(|s| match parse_schedule(&s.value) {
        Ok(schedule) => Some(schedule),
        Err(e) => {
            sink.error(s.span, format!("`schedule` in {}: {e}", f.what));
            None
        }
    });
    let mut checks = vec![DrillCheck::Fsck];
    let mut ok = true;
    let mut check_spans = Vec::new();
    match f.string_list(sink, "checks") {
        None => {}
        Some(Err(())) => ok = false,
        Some(Ok((span, list))) => {
            checks.clear();
            if list.is_empty() {
                sink.error(span, format!("`checks` in the drill table is empty; expected some of {names}"));
                ok = false;
            }
            for item in list {
                let Some(check) = DrillCheck::parse(&item.value) else {
                    sink.error(item.span, format!("unknown drill check {:?}; expected one of {names}", item.value));
                    ok = false;
                    continue;
                };
                // A repeat is reported and left out, so a long list of repeats costs no more.
                if checks.contains(&check) {
                    sink.error(item.span.clone(), format!("drill check {:?} is listed twice", check.name()));
                    ok = false;
                    continue;
                }
                checks.push(check);
                check_spans.push((check, item.span));
            }
        }
    }
    let mut nodes = Vec::new();
    match f.string_list(sink, "nodes") {
        None => {}
        Some(Err(())) => ok = false,
        Some(Ok((span, list))) => {
            if list.is_empty() {
                sink.error(span, "`nodes` in the drill table is empty; leave it out to drill on every target".to_string());
                ok = false;
            }
            // A set, not `nodes.contains`: the list may be long.
            let mut seen = std::collections::HashSet::new();
            for item in list {
                if !seen.insert(item.value.clone()) {
                    sink.error(item.span, format!("drill node {:?} is listed twice", item.value));
                    ok = false;
                    continue;
                }
                nodes.push(item.value);
            }
        }
    }
    let mut duration = |key: &str| -> Option<Option<std::time::Duration>> {
        let Some(s) = f.string(sink, key, false) else {
            return if f.get(key).is_some() { None } else { Some(None) };
        };
        match units::parse_duration(&s.value) {
            Ok(d) if d.is_zero() => {
                sink.error(s.span, format!("`{key}` in {} is zero; expected {DURATION_EXAMPLES}", f.what));
                None
            }
            Ok(d) => Some(Some(d)),
            Err(e) => {
                sink.error(s.span, format!("`{key}` in {}: {e}", f.what));
                None
            }
        }
    };
    let max_unverified_age = duration("max_unverified_age");
    let time_limit = duration("time_limit");
    ok &= max_unverified_age.is_some() && time_limit.is_some();

    let mut boot = DrillBoot::default();
    if let Some(t) = f.table(sink, "boot") {
        t.check_keys(sink, &["adapt", "markers", "timeout", "memory_mib", "source_disk"], &[]);
        if let Some(v) = t.get("adapt") {
            match v.get_ref().as_bool() {
                Some(b) => boot.adapt = b,
                None => {
                    t.wrong_type(sink, "adapt", v, "true or false");
                    ok = false;
                }
            }
        }
        match t.string_list(sink, "markers") {
            None => {}
            Some(Err(())) => ok = false,
            Some(Ok((span, list))) => {
                if list.is_empty() || list.iter().any(|m| m.value.trim().is_empty()) {
                    sink.error(span, format!("`markers` in {} must list non-empty console texts, such as \"login:\"", t.what));
                    ok = false;
                }
                boot.markers = list.into_iter().map(|m| m.value).collect();
            }
        }
        if let Some(s) = t.string(sink, "timeout", false) {
            match units::parse_duration(&s.value) {
                Ok(d) if !d.is_zero() => boot.timeout = d,
                Ok(_) => {
                    sink.error(s.span, format!("`timeout` in {} is zero; expected {DURATION_EXAMPLES}", t.what));
                    ok = false;
                }
                Err(e) => {
                    sink.error(s.span, format!("`timeout` in {}: {e}", t.what));
                    ok = false;
                }
            }
        } else if t.get("timeout").is_some() {
            ok = false;
        }
        if t.get("memory_mib").is_some() {
            match t.ranged(sink, "memory_mib", false, 128, 1 << 20).and_then(|v| u32::try_from(v).ok()) {
                Some(v) => boot.memory_mib = v,
                None => ok = false,
            }
        }
        if let Some(s) = t.text(sink, "source_disk", false) {
            if s.value.starts_with("/dev/") {
                boot.source_disk = s.value;
            } else {
                sink.error(s.span, format!("`source_disk` in {} must be a device path such as \"/dev/sda\"", t.what));
                ok = false;
            }
        } else if t.get("source_disk").is_some() {
            ok = false;
        }
    } else if f.get("boot").is_some() {
        ok = false;
    }

    let mut postgres = None;
    if let Some(t) = f.table(sink, "postgres") {
        t.check_keys(sink, &["path", "database", "query", "expect"], &[]);
        let path = t.text(sink, "path", true).and_then(|s| {
            if s.value.starts_with('/') && !s.value.split('/').any(|c| c == "..") {
                Some(s.value)
            } else {
                sink.error(s.span, format!("`path` in {} must be the data directory's absolute path on the source server, such as \"/var/lib/postgresql/15/main\"", t.what));
                None
            }
        });
        let database = t.text(sink, "database", false).map(|s| s.value).unwrap_or_else(|| "postgres".to_string());
        let query = t.text(sink, "query", false).map(|s| s.value);
        let expect = t.string(sink, "expect", false);
        if let (Some(e), None) = (&expect, &query) {
            sink.error(e.span.clone(), format!("`expect` in {} needs a `query` to compare with", t.what));
            ok = false;
        }
        ok &= path.is_some();
        postgres = path.map(|path| DrillPostgres { path, database, query, expect: expect.map(|e| e.value) });
    } else if f.get("postgres").is_some() {
        ok = false;
    }

    let mut script = None;
    if let Some(t) = f.table(sink, "script") {
        t.check_keys(sink, &["command", "writable"], &[]);
        let mut writable = false;
        if let Some(v) = t.get("writable") {
            match v.get_ref().as_bool() {
                Some(b) => writable = b,
                None => {
                    t.wrong_type(sink, "writable", v, "true or false");
                    ok = false;
                }
            }
        }
        match t.string_list(sink, "command") {
            None => {
                t.missing(sink, "command", "a list such as [\"/usr/local/bin/check-app\", \"--quick\"]");
                ok = false;
            }
            Some(Err(())) => ok = false,
            Some(Ok((span, list))) => {
                if list.first().is_none_or(|c| c.value.trim().is_empty()) {
                    sink.error(span, format!("`command` in {} is empty; expected the program and its arguments", t.what));
                    ok = false;
                } else {
                    script = Some(DrillScript { command: list.into_iter().map(|c| c.value).collect(), writable });
                }
            }
        }
    } else if f.get("script").is_some() {
        ok = false;
    }

    for (check, span) in check_spans {
        let missing = match check {
            DrillCheck::Postgres if postgres.is_none() && f.get("postgres").is_none() => Some("postgres"),
            DrillCheck::Script if script.is_none() && f.get("script").is_none() => Some("script"),
            _ => None,
        };
        if let Some(table) = missing {
            sink.error(span, format!("drill check \"{table}\" needs a `{table}` table in {} saying what to check", f.what));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let schedule = schedule?;
    Some(Drill {
        schedule,
        checks,
        nodes,
        max_unverified_age: max_unverified_age.flatten().unwrap_or(schedule.interval() * 2),
        time_limit: time_limit.flatten().unwrap_or(std::time::Duration::from_secs(3600)),
        boot,
        postgres,
        script,
    })
}

/// `"daily HH:MM"`, `"weekly DAY HH:MM"` or `"every DURATION"`.
pub(crate) fn parse_schedule(text: &str) -> Result<DrillSchedule, String> {
    let expected = "expected \"daily HH:MM\", \"weekly DAY HH:MM\" or \"every DURATION\"";
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["daily", at] => {
            let at = units::parse_time_of_day(at, false).map_err(|e| format!("{e} in schedule {text:?}"))?;
            Ok(DrillSchedule::Daily { at })
        }
        ["weekly", day, at] => {
            let day = units::parse_weekday(day).map_err(|e| format!("{e} in schedule {text:?}"))?;
            let at = units::parse_time_of_day(at, false).map_err(|e| format!("{e} in schedule {text:?}"))?;
            Ok(DrillSchedule::Weekly { day, at })
        }
        ["every", rest @ ..] if !rest.is_empty() => {
            let d = units::parse_duration(&rest.join(" ")).map_err(|e| format!("{e} in schedule {text:?}"))?;
            if d < std::time::Duration::from_secs(60) {
                return Err(format!("drills every {} are too frequent; expected at least 1m", rest.join(" ")));
            }
            Ok(DrillSchedule::Every(d))
        }
        _ => Err(format!("bad schedule {text:?}; {expected}")),
    }
}
