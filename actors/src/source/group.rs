//! Consistency groups: the views of several volumes of this node taken
//! together, for one cycle towards one target, so their RPs are of one
//! instant and restore together.
//!
//! Writes are held still across every member while the views are taken:
//! first every filesystem drmesh can hold is frozen (a loop-mounted image's
//! filesystem through `FIFREEZE`, a VM's filesystems through its guest
//! agent), then each member's view is taken as its kind takes it, then all
//! are thawed. A kind asked to freeze what the group holds finds it held and
//! freezes nothing twice ([`held`]). Only when every member's writes were
//! held for the whole time are the views of one instant; otherwise they were
//! taken one after another, and the group RP says so (`one_instant` false,
//! with the reason), never claiming more.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::baseline::Baselines;
use super::change::{ChangeSource, PointInTime};
use super::freeze::{freeze, Frozen, FREEZE_LIMIT};
use super::hooks::{group_member_view, run_logged, HookRun, PostLater};
use drmesh_topology::VolumeHooks;
use super::SourceError;
use crate::mounts::Mount;
use crate::proto::gossip::catalog::Consistency;

/// What a kind's writes can be held through while a group's views are taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldPoint {
    /// A filesystem mounted on this machine (the one inside a loop-attached image).
    Filesystem(Mount),
    /// A VM's filesystems, through its qemu-guest-agent channel.
    Guest(super::qemu::GuestAgent),
}

impl HoldPoint {
    fn key(&self) -> PathBuf {
        match self {
            HoldPoint::Filesystem(m) => m.point.clone(),
            HoldPoint::Guest(agent) => super::qemu_socket::socket_key(&agent.socket),
        }
    }
}

thread_local! {
    /// What the group being opened on this thread tried to hold: mount
    /// points and guest agent sockets, with the number of filesystems frozen
    /// (a guest's agent may freeze several) or why they could not be.
    static HELD: RefCell<Vec<(PathBuf, Result<u64, String>)>> = const { RefCell::new(Vec::new()) };
}

/// Whether the group being opened on this thread tried to hold `point` (a
/// mount point or a guest agent socket): `Ok(n)`, it holds it frozen (`n`
/// filesystems), so a kind's own freeze of it is already done; `Err(why)`,
/// it could not, and a kind does not try again while the group holds the
/// others (a failing agent may take its whole time limit).
pub fn held(point: &Path) -> Option<Result<u64, String>> {
    HELD.with(|h| h.borrow().iter().find(|(p, _)| p == point).map(|(_, n)| n.clone()))
}

/// One member of a group: its volume name and change source.
pub struct Member {
    /// Volume name.
    pub volume: String,
    /// Its change source (hooks are not allowed on members).
    pub source: Arc<dyn ChangeSource>,
}

/// The views of a group's members, taken together.
pub struct GroupViews {
    /// One per member, in member order.
    pub views: Vec<Arc<dyn PointInTime>>,
    /// The views while [`open_together`] still wraps them (empty after).
    boxed: Vec<Box<dyn PointInTime>>,
    /// Whether every member's writes were held while every view was taken.
    pub one_instant: bool,
    /// How the views were taken, or why they are not of one instant.
    pub how: String,
    /// The group's instant, Unix ms: when its writes were held (or, when
    /// they were not, when the first view was taken). The RPs' time.
    pub instant_unix_ms: u64,
}

/// A hold that was taken: thawed when dropped.
enum Taken {
    Filesystem(#[allow(dead_code)] Frozen),
    Guest(super::qemu::GuestAgent, Option<Box<super::qemu::Qmp>>),
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Taken::Guest(socket, agent) = self {
            super::qemu::thaw_guest(socket, agent.take().map(|a| *a));
        }
    }
}

/// Clears this thread's held list when the opening ends, however it ends.
struct Registered;

impl Drop for Registered {
    fn drop(&mut self) {
        HELD.with(|h| h.borrow_mut().clear());
    }
}

/// Takes the views of `members` towards `target` together (see the module
/// docs). Blocking. A member whose view cannot be taken fails the whole
/// group (the views already taken are released): a group RP has every
/// member or none started.
pub fn open_together(group: &str, hooks: Option<&VolumeHooks>, members: &[Member], baselines: &Baselines, target: &str, block_bytes: u32) -> Result<GroupViews, SourceError> {
    // The group's `pre` hook, before anything is frozen (it may write).
    let label = format!("group {group}");
    let mut env: Vec<(&'static str, String)> = vec![
        ("DRMESH_GROUP", group.to_string()),
        ("DRMESH_VOLUMES", members.iter().map(|m| m.volume.as_str()).collect::<Vec<_>>().join(" ")),
        ("DRMESH_TARGET", target.to_string()),
    ];
    let owed = hooks.and_then(|h| h.post.as_ref().and_then(|post| super::hooks::OwedPosts::of(baselines).owe_for(&label, target, post, &env, h.timeout)));
    let pre = hooks.and_then(|h| h.pre.as_ref().map(|c| run_logged("pre", c, &env, h.timeout, &label)));
    env.push(("DRMESH_PRE_RESULT", pre.as_ref().map_or("none", |p| if p.ok() { "ok" } else { "failed" }).to_string()));
    let run_post = |env: &[(&'static str, String)]| {
        let ran = hooks.and_then(|h| h.post.as_ref().map(|c| run_logged("post", c, env, h.timeout, &label)));
        super::hooks::paid(owed.as_deref());
        ran
    };
    let opened = open_held(members, baselines, target, block_bytes);
    let mut group_views = match opened {
        Ok(g) => g,
        Err(e) => {
            run_post(&env);
            return Err(e);
        }
    };
    let Some(hooks) = hooks else {
        group_views.views = std::mem::take(&mut group_views.boxed).into_iter().map(Into::into).collect();
        return Ok(group_views);
    };
    // After a live read the application stays quiet until the group's views are released.
    let live = group_views.boxed.iter().any(|v| v.quality().consistency == Consistency::Inconsistent);
    let post = if live { None } else { run_post(&env) };
    let last = group_views.boxed.len().saturating_sub(1);
    let boxed = std::mem::take(&mut group_views.boxed);
    for (i, view) in boxed.into_iter().enumerate() {
        let later = match (live && i == last, &hooks.post) {
            (true, Some(command)) => Some(PostLater { command: command.clone(), env: env.clone(), timeout: hooks.timeout, volume: label.clone(), owed: owed.clone() }),
            _ => None,
        };
        group_views.views.push(group_member_view(view, pre.clone(), post.clone(), later).into());
    }
    let said: Vec<String> = pre.iter().chain(post.iter()).map(HookRun::summary).collect();
    if !said.is_empty() {
        group_views.how = format!("{}; {}", group_views.how, said.join("; "));
    }
    if live && hooks.post.is_some() {
        group_views.how.push_str("; post hook runs once the group's reads are done");
    }
    Ok(group_views)
}

/// [`open_together`] without the hooks: holds what it can, takes every
/// view, lets go. The views are left in `boxed` for the caller to wrap when
/// it has hooks, else moved to `views`.
fn open_held(members: &[Member], baselines: &Baselines, target: &str, block_bytes: u32) -> Result<GroupViews, SourceError> {
    let points: Vec<Vec<HoldPoint>> = members.iter().map(|m| m.source.hold_points()).collect();
    let mut taken: Vec<Taken> = Vec::new();
    let mut held_keys: Vec<(PathBuf, u64)> = Vec::new();
    let mut failed: Vec<(PathBuf, String)> = Vec::new();
    let started = Instant::now();
    for point in points.iter().flatten() {
        let key = point.key();
        if held_keys.iter().any(|(k, _)| *k == key) || failed.iter().any(|(k, _)| *k == key) {
            continue;
        }
        match point {
            HoldPoint::Filesystem(mount) => match freeze(mount, FREEZE_LIMIT) {
                Ok(frozen) => {
                    held_keys.push((mount.point.clone(), 1));
                    taken.push(Taken::Filesystem(frozen));
                }
                Err(why) => failed.push((mount.point.clone(), why)),
            },
            HoldPoint::Guest(guest) => match super::qemu::freeze_guest(guest) {
                (agent, super::qemu::GuestFreeze::Frozen(n)) => {
                    held_keys.push((key, n));
                    taken.push(Taken::Guest(guest.clone(), agent.map(Box::new)));
                }
                (agent, super::qemu::GuestFreeze::Failed(why)) => {
                    if agent.is_some() {
                        super::qemu::thaw_guest(guest, agent);
                    }
                    failed.push((key, why));
                }
                (_, super::qemu::GuestFreeze::NotAsked) => {}
            },
        }
    }
    let instant_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    HELD.with(|h| {
        let mut list: Vec<(PathBuf, Result<u64, String>)> = held_keys.iter().map(|(p, n)| (p.clone(), Ok(*n))).collect();
        list.extend(failed.iter().map(|(p, why)| (p.clone(), Err(why.clone()))));
        *h.borrow_mut() = list;
    });
    let registered = Registered;
    // Units of members whose views are taken in one step: the disks of one
    // qemu monitor (one transaction), else each member alone.
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let monitor = m.source.as_qemu().map(|q| &q.monitor);
        match units.iter_mut().find(|u| monitor.is_some() && members[u[0]].source.as_qemu().map(|q| &q.monitor) == monitor) {
            Some(unit) => unit.push(i),
            None => units.push(vec![i]),
        }
    }
    let mut opened: Vec<Option<Box<dyn PointInTime>>> = (0..members.len()).map(|_| None).collect();
    for unit in &units {
        let result = match unit.as_slice() {
            [one] => members[*one].source.open(baselines, &members[*one].volume, target, block_bytes).map(|v| vec![v]),
            many => {
                let disks: Vec<(&super::qemu::QemuKind, &str)> =
                    many.iter().filter_map(|&i| members[i].source.as_qemu().map(|q| (q, members[i].volume.as_str()))).collect();
                super::qemu::open_together(&disks, target, block_bytes)
            }
        };
        match result {
            Ok(views) => {
                for (&i, view) in unit.iter().zip(views) {
                    opened[i] = Some(view);
                }
            }
            Err(e) => {
                drop(registered);
                drop(taken);
                for v in opened.into_iter().flatten() {
                    if let Err(r) = v.release() {
                        tracing::warn!(error = %r, "cannot release a group member's view");
                    }
                }
                return Err(e);
            }
        }
    }
    let spread = started.elapsed();
    drop(registered);
    drop(taken);
    let views: Vec<Box<dyn PointInTime>> = opened.into_iter().flatten().collect();
    // Whether each member's writes were held (its filesystems frozen through
    // every view), and why not.
    let mut not_held: Vec<Option<String>> = Vec::with_capacity(members.len());
    for ((m, pts), view) in members.iter().zip(&points).zip(&views) {
        let quality = view.quality();
        not_held.push(if pts.is_empty() {
            Some(format!(
                "{}: drmesh cannot hold its writes (kind {}; a group holds the filesystem of a loop-mounted image file and a VM's filesystems through its guest agent)",
                m.volume,
                m.source.kind()
            ))
        } else if let Some((point, why)) = pts.iter().find_map(|p| failed.iter().find(|(k, _)| *k == p.key())) {
            Some(format!("{}: {} was not frozen: {why}", m.volume, point.display()))
        } else if !matches!(quality.consistency, Consistency::FileSystem | Consistency::Application) {
            Some(format!("{}: its view is {} ({})", m.volume, quality.consistency.label(), quality.how))
        } else {
            None
        });
    }
    // Members held frozen did not change while any view was taken: the views
    // are of one instant when the members not held were taken in one step
    // (one member's own snapshot, one qemu transaction), and that step was one instant.
    let loose: Vec<&Vec<usize>> = units.iter().filter(|u| u.iter().any(|&i| not_held[i].is_some())).collect();
    let live = loose.iter().flat_map(|u| u.iter()).any(|&i| views[i].quality().consistency == Consistency::Inconsistent);
    let one_instant = loose.len() <= 1 && !live;
    let frozen = held_keys.iter().map(|(_, n)| n).sum::<u64>();
    let held_names: Vec<&str> = members.iter().zip(&not_held).filter(|(_, n)| n.is_none()).map(|(m, _)| m.volume.as_str()).collect();
    let how = match (one_instant, loose.first()) {
        (true, None) => format!("one instant: {frozen} filesystem(s) of {} volumes held frozen together for {}", members.len(), millis(spread)),
        (true, Some(unit)) => {
            let names: Vec<&str> = unit.iter().map(|&i| members[i].volume.as_str()).collect();
            let step = match unit.as_slice() {
                [one] => format!("the view of {} (its own instant)", members[*one].volume),
                _ => format!("the views of {} in one qemu transaction", names.join(", ")),
            };
            if held_names.is_empty() {
                format!("one instant: {step}")
            } else {
                format!("one instant: {step}, taken while {frozen} filesystem(s) of {} were held frozen ({})", held_names.join(", "), millis(spread))
            }
        }
        (false, _) => {
            let why: Vec<&str> = not_held.iter().flatten().map(String::as_str).collect();
            format!("not one instant: the views were taken one after another within {}; {}", millis(spread), why.join("; "))
        }
    };
    Ok(GroupViews { views: Vec::new(), boxed: views, one_instant, how, instant_unix_ms })
}

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::change::FileKind;

    /// Members a and b: two 64 KiB image files in `dir`, nobody mounted.
    fn two_images(dir: &Path) -> Vec<Member> {
        ["a", "b"]
            .iter()
            .map(|name| {
                let path = dir.join(format!("{name}.img"));
                std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
                Member { volume: (*name).into(), source: Arc::new(FileKind { path }) }
            })
            .collect()
    }

    #[test]
    fn members_drmesh_cannot_hold_are_not_one_instant_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let baselines = Baselines::open(&dir.path().join("b.redb")).unwrap();
        let members = two_images(dir.path());
        let group = open_together("g", None, &members, &baselines, "t", 4096).unwrap();
        assert_eq!(group.views.len(), 2);
        assert!(!group.one_instant);
        assert!(group.how.starts_with("not one instant: the views were taken one after another within "), "{}", group.how);
        assert!(group.how.contains("a: drmesh cannot hold its writes (kind file;"), "{}", group.how);
        for v in group.views {
            v.release().unwrap();
        }
        assert!(held(dir.path()).is_none());
    }

    /// The group's hooks run once for all members: `pre` before the views
    /// (every member's RP is then `app`), `post` after; after a live read
    /// `post` waits until the group's views are released.
    #[test]
    fn the_group_hooks_run_once_around_all_views() {
        let dir = tempfile::tempdir().unwrap();
        let baselines = Baselines::open(&dir.path().join("b.redb")).unwrap();
        let log = dir.path().join("hooks.log");
        let members = two_images(dir.path());
        let sh = |script: String| Some(vec!["/bin/sh".to_string(), "-c".to_string(), script]);
        let hooks = VolumeHooks {
            pre: sh(format!("echo \"pre $DRMESH_GROUP $DRMESH_VOLUMES $DRMESH_TARGET\" >> {}", log.display())),
            post: sh(format!("echo \"post $DRMESH_PRE_RESULT\" >> {}", log.display())),
            timeout: Duration::from_secs(10),
        };
        let group = open_together("db", Some(&hooks), &members, &baselines, "dst", 4096).unwrap();
        for v in &group.views {
            assert_eq!(v.quality().consistency, Consistency::Application, "{}", v.quality().how);
        }
        assert!(group.how.contains("pre hook `/bin/sh -c echo") && group.how.ends_with("post hook runs once the group's reads are done"), "{}", group.how);
        // The images were read live (no reflink here): post waits for the reads.
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre db a b dst\n");
        for v in group.views {
            v.release().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre db a b dst\npost ok\n");

        // A failing pre: the RPs keep their views' label and say why; post still runs.
        let failing = VolumeHooks { pre: sh("echo 'database is down' >&2; exit 3".into()), ..hooks };
        let group = open_together("db", Some(&failing), &members, &baselines, "dst", 4096).unwrap();
        for v in &group.views {
            let q = v.quality();
            assert_eq!(q.consistency, Consistency::Inconsistent);
            assert!(q.how.contains("failed with exit status 3") && q.how.contains("database is down"), "{}", q.how);
        }
        for v in group.views {
            v.release().unwrap();
        }
        assert!(std::fs::read_to_string(&log).unwrap().ends_with("post failed\n"));
    }

    #[test]
    fn a_member_that_cannot_be_opened_fails_the_group_and_releases_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let baselines = Baselines::open(&dir.path().join("b.redb")).unwrap();
        let good = dir.path().join("good.img");
        std::fs::write(&good, vec![1u8; 4096]).unwrap();
        let members = vec![
            Member { volume: "good".into(), source: Arc::new(FileKind { path: good }) },
            Member { volume: "gone".into(), source: Arc::new(FileKind { path: dir.path().join("missing.img") }) },
        ];
        let err = open_together("g", None, &members, &baselines, "t", 4096).err().expect("the group fails");
        assert!(err.to_string().contains("missing.img"), "{err}");
    }
}
