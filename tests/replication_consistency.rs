//! Story: two disk images are replicated while a program writes to them as
//! fast as it can. One image lives on XFS (reflink): each cycle reads a clone
//! taken when it starts, so every RP is the image at one instant (crash
//! consistent), and the RP says `crash`. The other lives on ext4, which cannot
//! clone files: the cycle reads the live image and the RP says `inconsistent`,
//! with the reason in `ctl volumes`. The labels reach the target's catalog and
//! every node's gossip catalog. No clone is left behind.
//!
//! "One instant" is checked exactly: the writer puts an increasing sequence
//! number into a random 4 KiB page per write and logs which page got which
//! number; an RP is the image at an instant if and only if every page holds
//! the last write to it up to the newest number found in the RP.
//!
//! Needs root (loop-mounted XFS and ext4); skipped otherwise.

use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use drmesh_tests::{file_hash, is_root, report_seq, wait_until, LoopFs, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const PAGE: usize = 4096;
const PAGES: usize = 16 * 1024; // 64 MiB

/// Writes sequence numbers into random pages of `path` until told to stop,
/// going on from the log it is given; returns the page of each number, in
/// order (`log[n - 1]` is the page of `n`), from 1 on.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u32>>,
}

impl Writer {
    fn start(path: &Path, seed: u64, mut log: Vec<u32>) -> Writer {
        let file = std::fs::OpenOptions::new().write(true).open(path).expect("open image for writing");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut page = vec![0u8; PAGE];
            // Bounded, in case a cycle hangs: the test fails on its own timeouts first.
            while !flag.load(Ordering::Relaxed) && log.len() < 20_000_000 {
                let n = log.len() as u64 + 1;
                let p = rng.below(PAGES as u64) as usize;
                page[..8].copy_from_slice(&n.to_le_bytes());
                file.write_all_at(&page, (p * PAGE) as u64).expect("write a page");
                log.push(p as u32);
            }
            log
        });
        Writer { stop, thread }
    }

    fn finish(self) -> Vec<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer thread")
    }
}

/// Whether `image` (the restored RP) is the written image at one instant:
/// `Ok(n)` when it holds exactly the writes 1..=n, or why not.
fn instant_of(image: &[u8], log: &[u32]) -> Result<u64, String> {
    let seqs: Vec<u64> = image.chunks(PAGE).map(|p| u64::from_le_bytes(p[..8].try_into().expect("8 bytes"))).collect();
    let newest = seqs.iter().copied().max().unwrap_or(0);
    if newest as usize > log.len() {
        return Err(format!("the RP holds write {newest}, but only {} were made", log.len()));
    }
    let mut last = vec![0u64; PAGES];
    for (i, &p) in log[..newest as usize].iter().enumerate() {
        last[p as usize] = i as u64 + 1;
    }
    let torn = (0..PAGES).filter(|&p| last[p] != seqs[p]).count();
    match (0..PAGES).find(|&p| last[p] != seqs[p]) {
        None => Ok(newest),
        Some(p) => Err(format!(
            "{torn} pages do not match the instant of write {newest}; page {p} holds write {} where the last write to it up to {newest} was {}",
            seqs[p], last[p]
        )),
    }
}

/// One cycle of `volume` while the writer runs (going on from `log`); the
/// report, the whole log, and the RP restored.
fn cycle_under_writes(mesh: &TestMesh, volume: &str, image: &Path, seed: u64, log: Vec<u32>) -> (Value, Vec<u32>, Vec<u8>) {
    let before = log.len();
    let writer = Writer::start(image, seed, log);
    // Let the writer get going before the view is taken.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sync = mesh.sync_ok("src", volume);
    let log = writer.finish();
    let seq = report_seq(&sync);
    let report = sync["reports"][0].clone();
    let to = mesh.dir.path().join(format!("{volume}-{seq}.img"));
    let out = mesh.restore("dst", &format!("{volume}@{seq}"), &to, None);
    assert!(out.status.success(), "restore {volume}@{seq}: {}", String::from_utf8_lossy(&out.stderr));
    let restored = std::fs::read(&to).expect("read restored image");
    std::fs::remove_file(&to).expect("remove restored image");
    eprintln!("{volume}@{seq}: {} writes during the cycle; view: {}", log.len() - before, report["view"]);
    (report, log, restored)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn zeros(path: &PathBuf) {
    let f = std::fs::File::create(path).expect("create image");
    // Written, not sparse: a disk image as a hypervisor keeps it.
    f.write_all_at(&vec![0u8; PAGES * PAGE], 0).expect("write image");
    f.sync_all().expect("sync image");
}

#[test]
fn a_clone_gives_one_instant_and_a_live_read_says_inconsistent() {
    if !is_root() {
        eprintln!("SKIPPED a_clone_gives_one_instant_and_a_live_read_says_inconsistent: needs root to loop-mount XFS and ext4 (CI runs it as root)");
        return;
    }
    // Declared before the mesh so they are unmounted after the nodes are gone.
    let xfs = LoopFs::with_mkfs(320, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    let ext4 = LoopFs::new(160);
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let (cloned, live) = (xfs.path().join("vm.img"), ext4.path().join("vm.img"));
    zeros(&cloned);
    zeros(&live);
    let volumes = [VolumeSpec::new("vm", "src", &["dst"], &cloned, "p"), VolumeSpec::new("live", "src", &["dst"], &live, "p")];
    let text = mesh.replication_topology(1, &["src", "dst"], &volumes, &[PolicySpec::new("p", "1MiB")]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // The clone: every RP is one instant, the first (full) and an incremental one.
    let mut log = Vec::new();
    for (round, seed) in [(1, 0xc10e_0001u64), (2, 0xc10e_0002)] {
        let before = log.len();
        let (report, all, restored) = cycle_under_writes(&mesh, "vm", &cloned, seed, log);
        log = all;
        assert_eq!(report["consistency"], "crash", "{report}");
        assert!(report["view"].as_str().is_some_and(|v| v.contains("reflink clone of") && v.contains("vm.img")), "{report}");
        match instant_of(&restored, &log) {
            Ok(n) => eprintln!("vm round {round}: the RP is the image right after write {n} of {}", log.len()),
            Err(e) => panic!("vm round {round}: the RP read from a clone is not one instant: {e}"),
        }
        assert!(log.len() > before, "the writer made no write during the cycle");
        // The clone had no name and is gone: only the image is in its folder.
        assert_eq!(names_in(xfs.path()), vec!["vm.img".to_string()]);
    }

    // The live read: labelled inconsistent, and says why.
    let (report, log, restored) = cycle_under_writes(&mesh, "live", &live, 0x11fe_0001, Vec::new());
    assert_eq!(report["consistency"], "inconsistent", "{report}");
    let view = report["view"].as_str().unwrap_or_default();
    assert!(view.starts_with("live read") && view.contains("cannot clone files (reflink)") && view.contains(&ext4.path().display().to_string()), "{report}");
    match instant_of(&restored, &log) {
        Ok(n) => eprintln!("live: this time the live read happened to match one instant (write {n} of {})", log.len()),
        Err(e) => eprintln!("live: the live read is torn, as its label says: {e}"),
    }

    // What operators see: ctl volumes (JSON and table), the target's RPs, the gossip catalog.
    let volumes = mesh.ctl_data("src", &["volumes"]).expect("volumes");
    for (name, label) in [("vm", "crash"), ("live", "inconsistent")] {
        let v = volumes.as_array().expect("list").iter().find(|v| v["volume"] == name).unwrap_or_else(|| panic!("{name} listed: {volumes}"));
        assert_eq!(v["last_ok"]["report"]["consistency"], label, "{v}");
        let rps = mesh.rps("dst", name);
        assert!(!rps.is_empty() && rps.iter().all(|r| r["consistency"] == label), "{name}: {rps:?}");
        wait_until(&format!("the gossip catalog of src shows {name}'s RPs as {label}"), std::time::Duration::from_secs(30), || {
            mesh.ctl_data("src", &["catalog"]).ok().is_some_and(|c| {
                let rows: Vec<&Value> = c["rps"].as_array().into_iter().flatten().filter(|r| r["volume"] == name).collect();
                !rows.is_empty() && rows.iter().all(|r| r["consistency"] == label)
            })
        });
    }
    let table = String::from_utf8_lossy(&mesh.ctl("src", &["volumes"]).stdout).into_owned();
    eprintln!("{table}");
    assert!(table.contains("crash)") && table.contains("inconsistent)"), "{table}");
    // The seq of the live read's RP: 1 or 2, as the node's first scheduled
    // cycle ran before the asked one or was folded into it.
    let live_seq = report["seq"].as_u64().expect("seq of the live read");
    assert!(table.contains(&format!("live@{live_seq} to dst is inconsistent: live read, no point-in-time view: the filesystem of")), "{table}");
}

/// Story: a database volume has hooks that quiesce it around each view. With
/// a `pre` that succeeds, the RP is `app` and both hooks ran once, in order,
/// with the volume and target in their environment. An operator's edit breaks
/// `pre` (it now fails and prints why); after `ctl reload` the next cycle
/// still commits, labelled with the view's own level and the hook's reason,
/// and `post` still ran to undo whatever `pre` did.
#[test]
fn hooks_make_app_rps_and_a_failing_pre_says_why() {
    if !is_root() {
        eprintln!("SKIPPED hooks_make_app_rps_and_a_failing_pre_says_why: needs root to loop-mount XFS (CI runs it as root)");
        return;
    }
    let xfs = LoopFs::with_mkfs(320, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image = xfs.path().join("db.img");
    zeros(&image);
    let log = mesh.dir.path().join("hooks.log");
    let base = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("db", "src", &["dst"], &image, "p")], &[PolicySpec::new("p", "1MiB")]);
    let topology = |pre: &str, version: u64| {
        let mut text = base.replacen("version = 1", &format!("version = {version}"), 1);
        // Appended after the policy table, `[volume.hooks]` would land in the policy: insert it after the volume.
        let hooks = format!(
            "[volume.hooks]\npre = [\"/bin/sh\", \"-c\", {pre:?}]\npost = [\"/bin/sh\", \"-c\", \"echo post $DRMESH_PRE_RESULT >> {}\"]\ntimeout = \"30s\"\n",
            log.display()
        );
        let at = text.find("\n[policy.").expect("policy table");
        text.insert_str(at + 1, &hooks);
        text
    };
    let good = format!("echo \"pre $DRMESH_VOLUME $DRMESH_TARGET $DRMESH_VOLUME_PATH\" >> {}", log.display());
    mesh.write_file("topology.toml", &topology(&good, 1));
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    // The scheduler's own first cycle may run the hooks too: count from here.
    wait_until("the first cycle is committed", std::time::Duration::from_secs(60), || !mesh.rp_seqs("dst", "db").is_empty());
    std::fs::write(&log, "").expect("truncate hook log");

    let report = mesh.sync_ok("src", "db")["reports"][0].clone();
    assert_eq!(report["consistency"], "app", "{report}");
    let view = report["view"].as_str().unwrap_or_default();
    eprintln!("app: {view}");
    assert!(view.starts_with("reflink clone of") && view.contains("pre hook `/bin/sh -c echo") && view.contains("exited 0") && view.contains("the application was quiet"), "{view}");
    assert!(view.contains("post hook `/bin/sh -c echo post"), "{view}");
    assert_eq!(std::fs::read_to_string(&log).expect("hook log"), format!("pre db dst {}\npost ok\n", image.display()));

    // The operator breaks `pre`; the cycle goes on without it.
    std::fs::write(&log, "").expect("truncate hook log");
    mesh.write_file("topology.toml", &topology("echo 'pg_ctl: server is not running' >&2; exit 4", 2));
    let out = mesh.ctl("src", &["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let report = mesh.sync_ok("src", "db")["reports"][0].clone();
    assert_eq!(report["consistency"], "crash", "{report}");
    let view = report["view"].as_str().unwrap_or_default();
    eprintln!("crash: {view}");
    assert!(view.contains("failed with exit status 4") && view.contains("(pg_ctl: server is not running), so the RP is labelled crash"), "{view}");
    assert_eq!(std::fs::read_to_string(&log).expect("hook log"), "post failed\n");
    let rps = mesh.rps("dst", "db");
    assert_eq!(rps.last().map(|r| r["consistency"].clone()), Some(Value::from("crash")), "{rps:?}");
    assert!(rps.iter().any(|r| r["consistency"] == "app"), "{rps:?}");
    assert!(mesh.node("src").log_text().contains("pg_ctl: server is not running"), "the hook's output is not in the log");
}

/// Story: a VM host keeps a disk image on XFS and has its ext4 filesystem
/// loop-mounted (a file server's data disk as an image). While a writer
/// creates and renames files in it, each cycle freezes that filesystem for
/// the instant of the reflink clone: the RPs are labelled `fs-frozen`, say
/// where the filesystem was mounted, its free space skipped (freezing
/// flushed the journal, so the bitmaps are trusted), and each restores to an
/// ext4 that `e2fsck -fn` finds clean (no journal to replay, no error), with
/// the files the writer had synced before the cycle. The freeze ends with
/// the clone: the writer goes on.
#[test]
fn a_loop_mounted_filesystem_is_frozen_for_the_clone() {
    frozen_clone_of(Inner::Ext4);
}

/// The same story with XFS in the image: freezing covers its log (records
/// that log only the superblock), so its free-space trees are trusted and
/// its free space skipped; each RP restores to an XFS that mounts (replaying
/// the superblock), holds every file the writer had synced, and that
/// `xfs_repair -n` finds clean.
#[test]
fn a_loop_mounted_xfs_is_frozen_for_the_clone_and_its_free_space_skipped() {
    frozen_clone_of(Inner::Xfs);
}

/// The filesystem in the image of [`frozen_clone_of`].
#[derive(Clone, Copy)]
enum Inner {
    Ext4,
    Xfs,
}

fn frozen_clone_of(fs: Inner) {
    if !is_root() {
        eprintln!("SKIPPED the frozen clone test: needs root to loop-mount XFS and ext4 (CI runs it as root)");
        return;
    }
    let xfs = LoopFs::with_mkfs(640, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    let image = xfs.path().join("data.img");
    match fs {
        Inner::Ext4 => {
            std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
            drmesh_tests::run_ok(std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        }
        Inner::Xfs => {
            std::fs::File::create(&image).unwrap().set_len(320 << 20).unwrap();
            drmesh_tests::run_ok(std::process::Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&image));
        }
    }
    let (fs_name, free_prefix) = match fs {
        Inner::Ext4 => ("ext4", "skipped: ext4 on the whole disk"),
        Inner::Xfs => ("xfs", "skipped: XFS on the whole disk"),
    };
    let inner_dir = tempfile::tempdir().unwrap();
    let inner = drmesh_tests::LoopMount::new(&image, inner_dir.path());
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let text = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("data", "src", &["dst"], &image, "p")], &[PolicySpec::new("p", "1MiB")]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // The writer: files written, some synced, renamed into place, old ones deleted.
    let stop = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let (root, stop_writer, synced_by_writer) = (inner.path().to_path_buf(), stop.clone(), synced.clone());
    let writer: JoinHandle<u64> = std::thread::spawn(move || {
        let mut rng = Rng::new(0xf5ee_0001);
        let mut n = 0u64;
        while !stop_writer.load(Ordering::Relaxed) {
            let mut data = vec![0u8; 4096 * (1 + rng.below(16) as usize)];
            rng.fill(&mut data);
            let tmp = root.join(format!("f{n}.tmp"));
            std::fs::write(&tmp, &data).unwrap();
            if n < 1000 && n.is_multiple_of(8) {
                // Kept under its own name, never renamed over: in every later RP.
                std::fs::File::open(&tmp).unwrap().sync_all().unwrap();
                let name = format!("kept{n}");
                std::fs::rename(&tmp, root.join(&name)).unwrap();
                std::fs::File::open(&root).unwrap().sync_all().unwrap();
                synced_by_writer.lock().unwrap().push((name, data));
            } else {
                std::fs::rename(&tmp, root.join(format!("f{}", n % 200))).unwrap();
            }
            n += 1;
        }
        n
    });
    let mut seqs = Vec::new();
    for round in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let kept = synced.lock().unwrap().len();
        let sync = mesh.sync_ok("src", "data");
        let report = &sync["reports"][0];
        eprintln!("round {round}: {} ({}); {}", report["consistency"], report["view"], report["free_space"]);
        assert_eq!(report["consistency"], "fs-frozen", "{report}");
        let view = report["view"].as_str().unwrap_or_default();
        assert!(view.contains("reflink clone of") && view.contains(&format!("{fs_name} filesystem (loop-mounted at {})", inner.path().display())) && view.contains("frozen at the instant"), "{view}");
        // Freezing flushed the journal (ext4) or covered the log (XFS): the
        // clone's allocation maps are trusted, its free space skipped.
        let free = report["free_space"].as_str().unwrap_or_default();
        assert!(free.starts_with(free_prefix), "{free}");
        assert!(report["free_skipped_bytes"].as_u64().unwrap_or(0) > 16 << 20, "{report}");
        seqs.push((report_seq(&sync), kept));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("the writer went on after each freeze");
    assert!(writes > 100, "the writer made only {writes} writes: was the filesystem left frozen?");
    drop(inner);

    let synced = synced.lock().unwrap().clone();
    for (seq, kept) in seqs {
        let to = mesh.dir.path().join(format!("data-{seq}.img"));
        let out = mesh.restore("dst", &format!("data@{seq}"), &to, None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // ext4 is checked before mounting (e2fsck -n wants no journal to
        // replay); XFS after (mounting replays its log: the superblock only).
        let check = |what: &str| match fs {
            Inner::Ext4 if what == "before" => Some(std::process::Command::new("e2fsck").args(["-fn"]).arg(&to).output().expect("e2fsck")),
            Inner::Xfs if what == "after" => Some(std::process::Command::new("xfs_repair").args(["-n"]).arg(&to).output().expect("xfs_repair")),
            _ => None,
        };
        let before = check("before");
        {
            // The files synced before the cycle began are there, whole.
            let dir = tempfile::tempdir().unwrap();
            let mounted = drmesh_tests::LoopMount::new(&to, dir.path());
            for (name, data) in &synced[..kept] {
                assert!(std::fs::read(mounted.path().join(name)).ok().as_ref() == Some(data), "data@{seq}: {name} differs or is missing");
            }
        }
        let check = before.or_else(|| check("after")).expect("one check");
        let said = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        eprintln!("data@{seq}: check exit {:?}, {kept} synced files\n{said}", check.status.code());
        assert_eq!(check.status.code(), Some(0), "a frozen clone must be a clean filesystem: {said}");
        std::fs::remove_file(&to).unwrap();
    }
    drop(mesh);
}

/// Story: a host's system and data disks are two image files on XFS, each
/// holding an ext4 that is loop-mounted and written to, and they form one
/// consistency group. A program counts: it writes each number first to the
/// system disk, then to the data disk. Each group cycle freezes both
/// filesystems, clones both images, thaws both: the two RPs share one
/// instant, so the restored data disk holds the system disk's number or the
/// one before it, never an older one (two views taken apart would let the
/// program run on between them). Both RPs carry the group; `ctl groups` on
/// the target lists each group RP complete and of one instant. A second
/// group of two images nobody mounted is taken together too, but drmesh
/// cannot hold their writes: its RPs say "not one instant" and why.
#[test]
fn a_group_takes_its_members_views_at_one_instant() {
    if !is_root() {
        eprintln!("SKIPPED a_group_takes_its_members_views_at_one_instant: needs root to loop-mount XFS and ext4 (CI runs it as root)");
        return;
    }
    let xfs = LoopFs::with_mkfs(640, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    let images: Vec<PathBuf> = ["sys.img", "data.img"].iter().map(|n| xfs.path().join(n)).collect();
    let mut inner = Vec::new();
    let mut inner_dirs = Vec::new();
    for image in &images {
        std::fs::File::create(image).unwrap().set_len(64 << 20).unwrap();
        drmesh_tests::run_ok(std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image));
        let dir = tempfile::tempdir().unwrap();
        inner.push(drmesh_tests::LoopMount::new(image, dir.path()));
        inner_dirs.push(dir);
    }
    let loose: Vec<PathBuf> = ["l1.img", "l2.img"].iter().map(|n| xfs.path().join(n)).collect();
    for image in &loose {
        std::fs::File::create(image).unwrap().set_len(8 << 20).unwrap();
    }
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let volumes = [
        VolumeSpec::new("sys", "src", &["dst"], &images[0], "p"),
        VolumeSpec::new("data", "src", &["dst"], &images[1], "p"),
        VolumeSpec::new("l1", "src", &["dst"], &loose[0], "p"),
        VolumeSpec::new("l2", "src", &["dst"], &loose[1], "p"),
    ];
    let mut text = mesh.replication_topology(1, &["src", "dst"], &volumes, &[PolicySpec::new("p", "1MiB")]);
    text.push_str("\n[[group]]\nname = \"host\"\nvolumes = [\"sys\", \"data\"]\n\n[[group]]\nname = \"loose\"\nvolumes = [\"l1\", \"l2\"]\n");
    // The loose group's hooks: once per group cycle, around all its views.
    let hook_log = mesh.dir.path().join("hooks.log");
    text.push_str(&format!(
        "[group.hooks]\npre = [\"/bin/sh\", \"-c\", \"echo pre $DRMESH_GROUP $DRMESH_VOLUMES $DRMESH_TARGET >> {log}\"]\npost = [\"/bin/sh\", \"-c\", \"echo post $DRMESH_PRE_RESULT >> {log}\"]\n",
        log = hook_log.display()
    ));
    let file = mesh.write_file("topology.toml", &text);
    let check = drmesh_tests::drmesh(&["topology", "check", file.to_str().unwrap()]);
    let said = drmesh_tests::output_text(&check);
    assert!(check.status.success() && said.contains("consistency group host: volumes sys, data of node src, their views taken together each cycle"), "{said}");
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // The counter: n to the system disk, then n to the data disk.
    let counters: Vec<std::fs::File> = inner
        .iter()
        .map(|m| {
            let path = m.path().join("counter");
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            std::fs::OpenOptions::new().write(true).open(path).unwrap()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let writer: JoinHandle<u64> = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            n += 1;
            for f in &counters {
                f.write_all_at(&n.to_le_bytes(), 0).expect("write the counter");
            }
        }
        n
    });
    let mut points = Vec::new();
    for round in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Asked of one member, the cycle is the group's: both report.
        let sync = mesh.sync_ok("src", if round % 2 == 0 { "sys" } else { "data" });
        let reports = sync["reports"].as_array().cloned().unwrap_or_default();
        assert_eq!(reports.len(), 2, "{sync}");
        let of = |name: &str| reports.iter().find(|r| r["volume"] == name).cloned().unwrap_or_else(|| panic!("{name} reported: {sync}"));
        let (sys, data) = (of("sys"), of("data"));
        for r in [&sys, &data] {
            assert_eq!(r["group"]["name"], "host", "{r}");
            assert_eq!(r["group"]["one_instant"], true, "{r}");
            assert_eq!(r["consistency"], "fs-frozen", "{r}");
        }
        assert!(sys["group"]["how"].as_str().unwrap_or_default().starts_with("one instant: 2 filesystem(s) of 2 volumes held frozen together"), "{sys}");
        assert_eq!(sys["snapshot_unix_ms"], data["snapshot_unix_ms"], "one instant, one time");
        eprintln!("round {round}: {}", sys["group"]["how"]);
        points.push((sys["seq"].as_u64().unwrap(), data["seq"].as_u64().unwrap(), sys["snapshot_unix_ms"].as_u64().unwrap()));
    }
    stop.store(true, Ordering::Relaxed);
    let counted = writer.join().expect("the writer went on after each group freeze");
    assert!(counted > 1000, "the writer counted only to {counted}: was a filesystem left frozen?");
    drop(inner);

    // Each group RP restores together: `restore-group host@INSTANT`, one image per member.
    let state_dir = mesh.node("dst").state_dir.to_str().unwrap().to_string();
    for (sys_seq, data_seq, time) in &points {
        let dir = mesh.dir.path().join(format!("host-{time}"));
        let out = drmesh_tests::drmesh(&["restore-group", &format!("host@{time}"), "--to", dir.to_str().unwrap(), "--state-dir", &state_dir, "--json"]);
        assert!(out.status.success(), "restore-group host@{time}: {}", drmesh_tests::output_text(&out));
        let last: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default()).expect("a JSON summary");
        let restored: Vec<&str> = last["data"]["restored"].as_array().unwrap().iter().map(|r| r["rp"].as_str().unwrap()).collect();
        assert_eq!(restored, [format!("data@{data_seq}"), format!("sys@{sys_seq}")], "{last}");
        let mut read = Vec::new();
        for volume in ["sys", "data"] {
            let image = dir.join(format!("{volume}.img"));
            assert_eq!(std::fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600, "{volume}.img is private");
            let mnt = tempfile::tempdir().unwrap();
            let mounted = drmesh_tests::LoopMount::new(&image, mnt.path());
            let bytes = std::fs::read(mounted.path().join("counter")).expect("the counter is in the restored disk");
            read.push(u64::from_le_bytes(bytes[..8].try_into().unwrap()));
        }
        let (sys_n, data_n) = (read[0], read[1]);
        eprintln!("group RP sys@{sys_seq} + data@{data_seq}: the system disk counted {sys_n}, the data disk {data_n}");
        assert!(sys_n > 0, "the counter was written before the cycle");
        assert!(data_n == sys_n || data_n + 1 == sys_n, "not one instant: the system disk holds {sys_n}, the data disk {data_n}");
        if *time != points[0].2 {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    // As an operator reads it: the newest complete group RP.
    let newest = mesh.dir.path().join("host-newest");
    let out = drmesh_tests::drmesh(&["restore-group", "host", "--to", newest.to_str().unwrap(), "--state-dir", &state_dir]);
    let said = drmesh_tests::output_text(&out);
    eprintln!("$ drmesh restore-group host --to ...\n{said}");
    assert!(out.status.success() && said.contains(&format!("group host at instant {} restored: 2 members into", points[2].2)), "{said}");
    // Careless use: the same folder again, a symlink for a folder, an instant that is no group RP.
    let first = mesh.dir.path().join(format!("host-{}", points[0].2));
    let before = std::fs::read(first.join("sys.img")).unwrap();
    let again = drmesh_tests::drmesh(&["restore-group", "host", "--to", first.to_str().unwrap(), "--state-dir", &state_dir]);
    let said = drmesh_tests::output_text(&again);
    assert!(!again.status.success() && said.contains("--force"), "{said}");
    assert_eq!(std::fs::read(first.join("sys.img")).unwrap(), before, "an image already there is left alone");
    let link = mesh.dir.path().join("host-link");
    std::os::unix::fs::symlink(&first, &link).unwrap();
    let out = drmesh_tests::drmesh(&["restore-group", "host", "--to", link.to_str().unwrap(), "--state-dir", &state_dir]);
    assert!(!out.status.success() && drmesh_tests::output_text(&out).contains("is a symbolic link"), "{}", drmesh_tests::output_text(&out));
    let out = drmesh_tests::drmesh(&["restore-group", "host@12345", "--to", mesh.dir.path().join("nowhere").to_str().unwrap(), "--state-dir", &state_dir]);
    assert!(!out.status.success() && drmesh_tests::output_text(&out).contains("group \"host\" has no RP at instant 12345"), "{}", drmesh_tests::output_text(&out));
    assert!(!mesh.dir.path().join("nowhere").exists(), "nothing is made for a group RP that is not there");

    // What the target lists: every group RP complete and of one instant.
    let groups = mesh.ctl_data("dst", &["groups", "host"]).expect("ctl groups");
    let listed = groups.as_array().cloned().unwrap_or_default();
    for (sys_seq, data_seq, time) in &points {
        let g = listed.iter().find(|g| g["time_unix_ms"] == *time).unwrap_or_else(|| panic!("group RP at {time} listed: {groups}"));
        assert_eq!((g["complete"].as_bool(), g["one_instant"].as_bool()), (Some(true), Some(true)), "{g}");
        let members: Vec<String> = g["rps"].as_array().unwrap().iter().map(|r| format!("{}@{}", r["volume"].as_str().unwrap(), r["seq"])).collect();
        assert_eq!(members, [format!("data@{data_seq}"), format!("sys@{sys_seq}")], "{g}");
    }
    let table = String::from_utf8_lossy(&mesh.ctl("dst", &["groups"]).stdout).into_owned();
    eprintln!("{table}");
    assert!(table.contains("complete, one instant") && table.contains("sys@"), "{table}");
    let rps = String::from_utf8_lossy(&mesh.ctl("dst", &["rps", "sys"]).stdout).into_owned();
    assert!(rps.contains("GROUP") && rps.contains("host"), "{rps}");

    // The loose group: taken together, but nothing held their writes; its
    // hooks ran once per group cycle, and a good `pre` makes its RPs `app`.
    let sync = mesh.sync_ok("src", "l1");
    let reports = sync["reports"].as_array().cloned().unwrap_or_default();
    assert_eq!(reports.len(), 2, "{sync}");
    for r in &reports {
        assert_eq!(r["group"]["one_instant"], false, "{r}");
        assert_eq!(r["consistency"], "app", "{r}");
        let how = r["group"]["how"].as_str().unwrap_or_default();
        assert!(how.starts_with("not one instant: the views were taken one after another within ") && how.contains("l1: drmesh cannot hold its writes (kind file;"), "{how}");
        assert!(how.contains("; pre hook `/bin/sh -c echo pre") && how.contains("exited 0"), "{how}");
    }
    let said = std::fs::read_to_string(&hook_log).unwrap();
    let lines: Vec<&str> = said.lines().collect();
    assert!(!lines.is_empty() && lines.len().is_multiple_of(2), "{said}");
    for pair in lines.chunks(2) {
        assert_eq!(pair, ["pre loose l1 l2 dst", "post ok"], "{said}");
    }
    let loose_rps = mesh.ctl_data("dst", &["groups", "loose"]).expect("ctl groups loose");
    assert_eq!(loose_rps[0]["one_instant"], false, "{loose_rps}");
    let table = String::from_utf8_lossy(&mesh.ctl("dst", &["groups", "loose"]).stdout).into_owned();
    assert!(table.contains("complete, views taken one after another"), "{table}");

    // With no node running on the target's state dir, its store is read directly.
    assert!(mesh.stop("dst"));
    let offline = mesh.dir.path().join("host-offline");
    let out = drmesh_tests::drmesh(&["restore-group", "host", "--to", offline.to_str().unwrap(), "--state-dir", &state_dir]);
    let said = drmesh_tests::output_text(&out);
    assert!(out.status.success() && said.contains("reading its store directly"), "{said}");
    assert_eq!(file_hash(&offline.join("sys.img")), file_hash(&newest.join("sys.img")), "the newest complete group RP, as through the node");
    drop(mesh);
}
