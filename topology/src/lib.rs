//! Topology files: the one TOML file every drmesh node reads to learn the mesh.
//!
//! This crate owns the schema (`[mesh]`, `[[site]]`, `[[node]]`, `[[volume]]`,
//! `[policy.NAME]`), parsing with source spans, validation that reports every
//! error with `file:line:column`, and diffing two topologies for hot reload. It
//! also owns [`NodeId`], the form in which node ids are written in topology files,
//! and [`VolumeName`], the one rule for volume names.
//!
//! ```no_run
//! use drmesh_topology::{Topology, TopologyDiff};
//! # fn run(old: &Topology) -> Result<(), drmesh_topology::Diagnostics> {
//! let new = Topology::load(std::path::Path::new("/etc/drmesh/topology.toml"))?;
//! let diff = TopologyDiff::between(old, &new);
//! println!("topology {} v{}: {} nodes added", new.hash_short(), new.mesh.version, diff.added_nodes.len());
//! # Ok(()) }
//! ```
//!
//! Modules: [`schema`] (the typed result), [`units`] (durations, sizes, rates),
//! `parse` (TOML to sections, per-field checks), `validate` (cross-section
//! checks), [`diagnostic`] (error positions), [`keyfile`], [`diff`].
//!
//! Inputs have limits, so that a wrong or hostile file costs little: a file of
//! more than [`MAX_TOPOLOGY_BYTES`] is refused unread, and only the first
//! [`MAX_DIAGNOSTICS`] errors of a file are kept (the rest are counted).

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod diagnostic;
pub mod diff;
pub mod keyfile;
pub mod node_id;
mod parse;
mod read;
pub mod schema;
mod syntax;
pub mod units;
mod validate;
pub mod volume_name;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostic, Diagnostics, MAX_DIAGNOSTICS};
pub use diff::TopologyDiff;
pub use keyfile::{read_key_file, EncryptionKey};
pub use node_id::{NodeId, NodeIdError};
pub use volume_name::{VolumeName, VolumeNameError, VOLUME_NAME_BYTES_MAX};
pub use schema::{
    Bandwidth, BandwidthWindow, Compression, DaySet, Drill, DrillBoot, DrillCheck, DrillPostgres, DrillSchedule, DrillScript, FleeceGuard, FreeSpace, Group, Link, Mesh, Node, Platform,
    Policy, QemuSocket, QemuTls, Retention, Site, SourceKind, TimeOfDay, Volume, VolumeHooks, Weekday, DEFAULT_FLEECE_MAX_BYTES, DEFAULT_MAX_CYCLES, DEFAULT_NBD_PORT, DEFAULT_PLATFORM_LEASE,
};

use diagnostic::Sink;

/// Checks a consistency group's name as `[[group]]` takes it; the error
/// states the rule.
pub fn check_group_name(name: &str) -> Result<(), String> {
    parse::check_name("group", name)
}
use read::ReadError;

/// The largest topology file (or text) accepted, in bytes: 16 MiB. A bigger one
/// is refused before it is parsed, and never read past this size plus one byte
/// (so a pipe, or a file that grows while read, costs no more). A `[[node]]` block
/// takes about 150 bytes, so 16,000 nodes take about 2.5 MB: far below it.
pub const MAX_TOPOLOGY_BYTES: u64 = 16 * 1024 * 1024;

/// A checked topology file. Only [`Topology::load`] and [`Topology::parse`] make
/// one, so every value in it has passed validation.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The `[mesh]` table.
    pub mesh: Mesh,
    /// The `[[site]]` tables, in file order.
    pub sites: Vec<Site>,
    /// The `[[node]]` tables, in file order.
    pub nodes: Vec<Node>,
    /// The `[[volume]]` tables, in file order.
    pub volumes: Vec<Volume>,
    /// The `[[link]]` tables, in file order.
    pub links: Vec<Link>,
    /// The `[[group]]` tables (consistency groups), in file order.
    pub groups: Vec<Group>,
    /// The `[[platform]]` tables, in file order.
    pub platforms: Vec<Platform>,
    /// The `[policy.NAME]` tables by name.
    pub policies: BTreeMap<String, Policy>,
    path: PathBuf,
    hash: [u8; 32],
}

impl Topology {
    /// Reads and validates the file; relative key paths resolve against its directory.
    /// Every policy's key file must exist (as `drmesh topology check` wants).
    /// A file of more than [`MAX_TOPOLOGY_BYTES`], a directory or a device is
    /// refused with one diagnostic, without reading past the limit.
    pub fn load(path: &Path) -> Result<Topology, Diagnostics> {
        Topology::load_for(path, None)
    }

    /// Like [`Topology::load`] for the node `local`: a missing key file is an
    /// error only for policies of volumes this node is the source of (targets
    /// store encrypted blobs without the key). A key file that exists must still
    /// be valid and private on every node.
    pub fn load_for(path: &Path, local: Option<&NodeId>) -> Result<Topology, Diagnostics> {
        let bytes = read::read_capped(path).map_err(|e| single(path, e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            let at = e.utf8_error().valid_up_to();
            let mut sink = Sink::new(&text, path);
            sink.error(at..at, "the file is not valid UTF-8 here; expected UTF-8 text");
            sink.finish()
        })?;
        Topology::parse_for(&text, path, local)
    }

    /// Validates text as if read from `origin` (used for messages and relative paths).
    pub fn parse(text: &str, origin: &Path) -> Result<Topology, Diagnostics> {
        Topology::parse_for(text, origin, None)
    }

    /// Like [`Topology::parse`], with the key-file rule of [`Topology::load_for`].
    /// A text of more than [`MAX_TOPOLOGY_BYTES`] is refused unparsed.
    pub fn parse_for(text: &str, origin: &Path, local: Option<&NodeId>) -> Result<Topology, Diagnostics> {
        if text.len() as u64 > MAX_TOPOLOGY_BYTES {
            return Err(single(origin, ReadError::TooBig { bytes: text.len() as u64 }.to_string()));
        }
        let mut sink = Sink::new(text, origin);
        let root = match toml::de::DeTable::parse(text) {
            Ok(root) => root,
            Err(first) => {
                // Not `parse_recoverable`: it keeps every error, and there may be millions.
                if syntax::report_syntax_errors(text, &mut sink) == 0 {
                    // A duplicate key or table, or a bad value: only the first one is known.
                    sink.error(first.span().unwrap_or(0..0), syntax::syntax_message(first.message()));
                }
                return Err(sink.finish());
            }
        };
        let mut draft = parse::read_document(root.get_ref(), origin, &mut sink);
        let missing_keys = std::mem::take(&mut draft.missing_keys);
        let checked = validate::check(draft, &mut sink);
        if let Some(c) = &checked {
            let local_name = local.and_then(|id| c.nodes.iter().find(|n| n.id == *id)).map(|n| n.name.as_str());
            // The policies of the volumes this node is the source of, gathered once.
            let reads = |v: &Volume| match c.platforms.iter().find(|p| p.name == v.source) {
                Some(p) => local_name.is_some_and(|me| p.proxies.iter().any(|x| x == me)),
                None => Some(v.source.as_str()) == local_name,
            };
            let local_policies: std::collections::HashSet<&str> = c.volumes.iter().filter(|v| reads(v)).map(|v| v.policy.as_str()).collect();
            for (policy, span, message) in missing_keys {
                let needed = local.is_none() || local_policies.contains(policy.as_str());
                if needed {
                    sink.error(span, message);
                }
            }
        } else {
            for (_, span, message) in missing_keys {
                sink.error(span, message);
            }
        }
        match checked {
            Some(c) if !sink.has_errors() => Ok(Topology {
                mesh: c.mesh,
                sites: c.sites,
                nodes: c.nodes,
                volumes: c.volumes,
                links: c.links,
                groups: c.groups,
                platforms: c.platforms,
                policies: c.policies,
                path: origin.to_path_buf(),
                hash: *blake3::hash(text.as_bytes()).as_bytes(),
            }),
            _ => {
                if !sink.has_errors() {
                    // Every path that drops a section reports why; this is a guard, not a case.
                    sink.error(0..0, "internal error: the file was rejected without a reason (please report)");
                }
                Err(sink.finish())
            }
        }
    }

    /// The consistency group named `name`.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The consistency group `volume` is a member of, if any.
    pub fn group_of(&self, volume: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.volumes.iter().any(|v| v == volume))
    }

    /// The `[[platform]]` named `name`.
    pub fn platform(&self, name: &str) -> Option<&Platform> {
        self.platforms.iter().find(|p| p.name == name)
    }

    /// The platform whose proxies read `volume`, if its source is one.
    pub fn platform_of(&self, volume: &Volume) -> Option<&Platform> {
        self.platform(&volume.source)
    }

    /// Whether node `node` may read `volume`: it is the volume's source, or
    /// one of the proxies of the platform that is.
    pub fn may_read(&self, volume: &Volume, node: &str) -> bool {
        match self.platform_of(volume) {
            Some(p) => p.proxies.iter().any(|x| x == node),
            None => volume.source == node,
        }
    }

    /// The volumes node `node` may read (see [`Topology::may_read`]), in file order.
    pub fn readable_by<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Volume> + 'a {
        self.volumes.iter().filter(move |v| self.may_read(v, node))
    }

    /// The node with id `id`.
    pub fn node_by_id(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == *id)
    }

    /// The node named `name`.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The volume named `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// blake3 of the file bytes, so identical files on different nodes compare equal.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Short hex form of the hash (first 12 hex chars) for status output.
    pub fn hash_short(&self) -> String {
        self.hash[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The path the topology was read from (or the `origin` given to [`Topology::parse`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn single(path: &Path, message: String) -> Diagnostics {
    Diagnostics::new(vec![Diagnostic { file: path.to_path_buf(), line: 1, column: 1, message }])
}
