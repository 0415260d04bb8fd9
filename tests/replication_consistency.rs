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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use drmesh_tests::{is_root, report_seq, wait_until, LoopFs, PolicySpec, Rng, TestMesh, VolumeSpec};
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
