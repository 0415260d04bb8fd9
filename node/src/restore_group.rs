//! `drmesh restore-group`: restores every member of one complete group RP of
//! a consistency group, each to `DIR/VOLUME.img`, through the running node
//! or straight from the state dir's store, as `drmesh restore` does for one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use drmesh_actors::store::{group_rps, GroupRp, Store};
use serde_json::{json, Value};

use crate::admin::{Request, SOCKET_FILE};
use crate::recover::{node_running, restore, RestoreArgs, RpArgs};

/// Arguments of `drmesh restore-group`.
#[derive(clap::Args, Debug)]
pub struct RestoreGroupArgs {
    /// The group RP: GROUP for its newest complete one, or GROUP@INSTANT with
    /// the instant in Unix ms as `drmesh ctl groups --json` shows it.
    group: String,
    /// Folder to write into (made with mode 0700 if missing): one raw image
    /// per member, `DIR/VOLUME.img`, mode 0600.
    #[arg(long)]
    to: PathBuf,
    /// Replace member images already in the folder.
    #[arg(long)]
    force: bool,
    /// State directory of the local node (which holds the group's RPs).
    #[arg(long, env = "DRMESH_STATE_DIR")]
    state_dir: PathBuf,
    /// Read the state dir's store directly even if a node is running there.
    #[arg(long)]
    offline: bool,
    /// Topology file for a restore without a node (policy key files).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Key file of the members' policy, for a restore without a node.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Print each member's result and the group's as JSON lines.
    #[arg(long)]
    json: bool,
}

/// Splits GROUP[@INSTANT|@latest].
fn parse_group(text: &str) -> anyhow::Result<(String, Option<u64>)> {
    let (name, instant) = match text.split_once('@') {
        None => (text, None),
        Some((g, "latest")) => (g, None),
        Some((g, ms)) => (g, Some(ms.parse().with_context(|| format!("{text}: the part after @ must be the group RP's instant in Unix ms (or \"latest\")"))?)),
    };
    drmesh_topology::check_group_name(name).map_err(|e| anyhow::anyhow!("{text}: {e}"))?;
    Ok((name.to_string(), instant))
}

/// The group RPs the state dir's node (or, offline, its store) holds.
fn group_points(args: &RestoreGroupArgs, name: &str) -> anyhow::Result<Vec<GroupRp>> {
    if !args.offline && node_running(&args.state_dir)? {
        let response = crate::ctl::request_with_progress(&args.state_dir.join(SOCKET_FILE), &Request::Groups { group: Some(name.to_string()) }, |_| {})?;
        if !response.ok {
            bail!("{}", response.error.unwrap_or_default());
        }
        return serde_json::from_value(response.data.unwrap_or(Value::Null)).context("reading the node's group RPs");
    }
    let store = Store::open_read_only(&args.state_dir.join("store"))?;
    let mut rps = Vec::new();
    for v in store.volumes()? {
        rps.extend(store.rps(&v)?.into_iter().filter(|r| r.group.as_ref().is_some_and(|g| g.name == name)));
    }
    Ok(group_rps(&rps))
}

/// Picks the group RP to restore: the one at `instant`, or the newest complete one.
fn choose(points: &[GroupRp], name: &str, instant: Option<u64>) -> anyhow::Result<GroupRp> {
    let complete: Vec<&GroupRp> = points.iter().filter(|g| g.complete).collect();
    let chosen = match instant {
        None => complete.first().copied().with_context(|| match points.len() {
            0 => format!("no RP of group \"{name}\" is held here (`drmesh ctl groups` lists the group RPs)"),
            n => format!("none of the {n} RPs of group \"{name}\" held here is complete (each lacks a member's RP; `drmesh ctl groups {name}` says which)"),
        })?,
        Some(ms) => points.iter().find(|g| g.time_unix_ms == ms).with_context(|| format!("group \"{name}\" has no RP at instant {ms} here (`drmesh ctl groups {name} --json` lists the instants)"))?,
    };
    if !chosen.complete {
        let missing: Vec<&str> = chosen.missing.iter().map(|v| v.as_str()).collect();
        bail!("the RP of group \"{name}\" at instant {} is incomplete: this node holds no RP of {} from it; restore its members one by one with `drmesh restore`, or pick a complete group RP", chosen.time_unix_ms, missing.join(", "));
    }
    Ok(chosen.clone())
}

/// Makes the destination folder (0700) or checks the one there: a real
/// folder, not a symlink or anything else.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(meta) if meta.file_type().is_symlink() => bail!("{} is a symbolic link; give the folder itself", dir.display()),
        Ok(_) => bail!("{} exists and is not a folder; restore-group writes one image per member into a folder", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Runs `drmesh restore-group`.
pub fn restore_group(args: RestoreGroupArgs) -> anyhow::Result<ExitCode> {
    let (name, instant) = parse_group(&args.group)?;
    let dir = std::path::absolute(&args.to).with_context(|| format!("resolving {}", args.to.display()))?;
    let chosen = choose(&group_points(&args, &name)?, &name, instant)?;
    prepare_dir(&dir)?;
    if !args.json {
        let one = if chosen.one_instant { "one instant" } else { "views taken one after another, not one instant" };
        eprintln!("restoring group {name} at instant {} ({one}): {} members", chosen.time_unix_ms, chosen.rps.len());
    }
    let mut restored = Vec::new();
    for member in &chosen.rps {
        let to = dir.join(format!("{}.img", member.volume));
        let rp = RpArgs {
            rp: format!("{}@{}", member.volume, member.seq),
            state_dir: args.state_dir.clone(),
            from: None,
            offline: args.offline,
            topology: args.topology.clone(),
            key_file: args.key_file.clone(),
            json: args.json,
        };
        let code = restore(RestoreArgs::new(rp, to.clone(), args.force))?;
        if code != ExitCode::SUCCESS {
            let done: Vec<String> = restored.iter().map(|(rp, _): &(String, PathBuf)| rp.clone()).collect();
            bail!(
                "group {name}: restoring {}@{} failed (above); {} restored before it",
                member.volume,
                member.seq,
                if done.is_empty() { "nothing was".to_string() } else { format!("{} were", done.join(", ")) }
            );
        }
        restored.push((format!("{}@{}", member.volume, member.seq), to));
    }
    let summary = json!({
        "group": name,
        "time_unix_ms": chosen.time_unix_ms,
        "one_instant": chosen.one_instant,
        "restored": restored.iter().map(|(rp, to)| json!({ "rp": rp, "to": to })).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{}", crate::admin::Response::data(&summary).line());
    } else {
        println!("group {name} at instant {} restored: {} members into {}", chosen.time_unix_ms, restored.len(), dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_specs_are_parsed_and_bad_ones_named() {
        assert_eq!(parse_group("db-host").unwrap(), ("db-host".into(), None));
        assert_eq!(parse_group("db-host@latest").unwrap(), ("db-host".into(), None));
        assert_eq!(parse_group("db-host@1796673474062").unwrap(), ("db-host".into(), Some(1_796_673_474_062)));
        assert!(parse_group("db-host@yesterday").unwrap_err().to_string().contains("instant in Unix ms"));
        assert!(parse_group("../x").is_err());
    }

    fn point(time: u64, missing: &[&'static str]) -> GroupRp {
        GroupRp {
            group: "db".into(),
            time_unix_ms: time,
            one_instant: true,
            rps: vec![drmesh_actors::store::GroupMemberRp { volume: drmesh_actors::store::VolumeName::from_static("sys"), seq: drmesh_actors::store::RpSeq(time), consistency: "fs-frozen".into() }],
            missing: missing.iter().map(|m| drmesh_actors::store::VolumeName::from_static(m)).collect(),
            complete: missing.is_empty(),
        }
    }

    #[test]
    fn the_newest_complete_group_rp_is_chosen_and_an_incomplete_one_refused() {
        let points = [point(300, &["data"]), point(200, &[]), point(100, &[])];
        assert_eq!(choose(&points, "db", None).unwrap().time_unix_ms, 200);
        assert_eq!(choose(&points, "db", Some(100)).unwrap().time_unix_ms, 100);
        let err = choose(&points, "db", Some(300)).unwrap_err().to_string();
        assert!(err.contains("is incomplete: this node holds no RP of data from it"), "{err}");
        let err = choose(&points, "db", Some(7)).unwrap_err().to_string();
        assert!(err.contains("has no RP at instant 7"), "{err}");
        assert!(choose(&[], "db", None).unwrap_err().to_string().contains("no RP of group \"db\" is held here"));
        assert!(choose(&points[..1], "db", None).unwrap_err().to_string().contains("none of the 1 RPs"));
    }
}
