//! The checks against real images, filesystems, PostgreSQL and qemu. They need
//! root (loop devices, mounts) and skip otherwise; the PostgreSQL test needs
//! PostgreSQL 15 and the boot test the cached Debian image of
//! scripts/recovery-image (and qemu).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drmesh_topology::{DrillBoot, DrillPostgres, DrillScript};

use super::*;

const MIB: u64 = 1 << 20;

fn skip_unless_root() -> bool {
    if crate::mounts::is_root() {
        return false;
    }
    eprintln!("skipped: needs root (loop devices, mounts)");
    true
}

/// Runs a command that must succeed; its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch folder with a private `work` folder in it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new().prefix("drmesh-checks-").tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("work")).expect("work");
        std::fs::set_permissions(dir.path().join("work"), std::fs::Permissions::from_mode(0o700)).expect("chmod work");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn work(&self) -> PathBuf {
        self.path("work")
    }
}

/// Writes `files` (path, content; a path ending in `/` is a folder, a
/// content starting with `-> ` a symlink) under `dir`.
fn tree(dir: &Path, files: &[(&str, &str)]) {
    for (p, text) in files {
        let path = dir.join(p.trim_end_matches('/'));
        if p.ends_with('/') {
            std::fs::create_dir_all(&path).expect("mkdir");
        } else if let Some(target) = text.strip_prefix("-> ") {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(target, &path).expect("symlink");
        } else {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, text).expect("write");
        }
    }
}

/// An ext4 filesystem of `size_mib` at byte `offset` of `image`, holding `files`.
fn mkfs_ext4(image: &Path, offset: u64, size_mib: u64, uuid: &str, files: &[(&str, &str)]) {
    let src = image.with_extension(format!("src{offset}"));
    std::fs::create_dir_all(&src).expect("src");
    tree(&src, files);
    ok(Command::new("mkfs.ext4").args(["-F", "-q", "-U", uuid, "-E", &format!("offset={offset}"), "-d"]).arg(&src).arg(image).arg(format!("{size_mib}M")));
    std::fs::remove_dir_all(&src).expect("rm src");
}

/// A sparse file of `mib` MiB with an MBR holding `parts` (start MiB, size MiB), type Linux.
fn mbr_image(image: &Path, mib: u64, parts: &[(u64, u64)]) {
    std::fs::File::create(image).expect("create").set_len(mib * MIB).expect("size");
    let script: String = std::iter::once("label: dos\n".to_string()).chain(parts.iter().map(|(s, n)| format!("start={}, size={}, type=83\n", s * 2048, n * 2048))).collect();
    let mut child = Command::new("sfdisk").arg("-q").arg(image).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().expect("sfdisk");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes()).expect("sfdisk input");
    drop(child.stdin.take());
    assert!(child.wait().expect("sfdisk").success());
}

/// Asserts that nothing of a check is left: no mount under `work`, no loop
/// device on `file`, no pid file.
fn assert_released(work: &Path, file: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let work_text = work.to_string_lossy().to_string();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(work_text.as_str())).collect();
    assert!(left.is_empty(), "mounts left under {work_text}: {left:?}");
    let file = std::fs::canonicalize(file).expect("canonical file");
    for l in std::fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        let back = std::fs::read_to_string(l.path().join("loop/backing_file")).unwrap_or_default();
        assert!(Path::new(back.trim_end()) != file, "{} is still attached to {}", file.display(), l.file_name().to_string_lossy());
    }
    let pids: Vec<_> = std::fs::read_dir(work).expect("work").flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pid")).map(|e| e.path()).collect();
    assert!(pids.is_empty(), "pid files left: {pids:?}");
}

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

const UUID1: &str = "11111111-2222-3333-4444-555555555555";
const UUID2: &str = "66666666-7777-8888-9999-000000000000";

#[test]
fn fsck_passes_a_partitioned_ext4_and_fails_when_its_superblock_is_zeroed() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let img = s.path("disk.img");
    mbr_image(&img, 64, &[(1, 63)]);
    mkfs_ext4(&img, MIB, 63, UUID1, &[("etc/hostname", "drill\n"), ("data/a.txt", "hello\n"), ("data/sub/", "")]);
    let disk = Disk { file: &img, work: &s.work() };
    let out = fsck(&disk, soon(60));
    eprintln!("clean: {}", out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.summary.contains("1 filesystem clean: ext4 on partition 1"), "{}", out.summary);
    assert_released(&s.work(), &img);

    // 1 KiB of zeros over the primary superblock.
    ok(Command::new("dd").arg(format!("of={}", img.display())).args(["if=/dev/zero", "bs=1024", "count=1", "conv=notrunc", "status=none", &format!("seek={}", (MIB + 1024) / 1024)]));
    let out = fsck(&disk, soon(60));
    eprintln!("zeroed: {}", out.summary);
    assert!(!out.passed, "{}", out.summary);
    assert!(out.summary.contains("partition 1") && out.summary.contains("no recognisable filesystem"), "{}", out.summary);
    assert!(out.output.contains("Bad magic number in super-block"), "e2fsck's own words: {}", out.output);
    assert!(out.summary.contains("e2fsck -n: Bad magic number in super-block"), "{}", out.summary);
    assert_released(&s.work(), &img);
}

#[test]
fn fsck_passes_a_bare_ext4_and_fails_an_all_zero_disk() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let img = s.path("bare.img");
    std::fs::File::create(&img).expect("create").set_len(32 * MIB).expect("size");
    mkfs_ext4(&img, 0, 32, UUID1, &[("x", "y")]);
    let out = fsck(&Disk { file: &img, work: &s.work() }, soon(60));
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.summary.contains("ext4 on the whole disk"), "{}", out.summary);

    let zero = s.path("zero.img");
    std::fs::File::create(&zero).expect("create").set_len(16 * MIB).expect("size");
    let out = fsck(&Disk { file: &zero, work: &s.work() }, soon(60));
    eprintln!("zero: {}", out.summary);
    assert!(!out.passed);
    assert!(out.summary.starts_with("no filesystem found on the recovery point"), "{}", out.summary);
    assert_released(&s.work(), &zero);
}

#[test]
fn fsck_replays_a_dirty_journal_on_the_overlay() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let img = s.path("live.img");
    std::fs::File::create(&img).expect("create").set_len(64 * MIB).expect("size");
    mkfs_ext4(&img, 0, 64, UUID1, &[]);
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    ok(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt));
    for i in 0..40 {
        std::fs::write(mnt.join(format!("f{i}")), vec![i as u8; 30_000]).expect("write");
    }
    // An open, unlinked file: an orphan inode that only a replay releases.
    let orphan = std::fs::File::create(mnt.join("orphan")).expect("orphan");
    std::fs::remove_file(mnt.join("orphan")).expect("unlink");
    ok(&mut Command::new("sync"));
    // Copied while mounted: committed to the journal, not checkpointed.
    let copy = s.path("crash.img");
    ok(Command::new("cp").arg("--sparse=always").arg(&img).arg(&copy));
    drop(orphan);
    ok(Command::new("umount").arg(&mnt));
    let features = ok(Command::new("dumpe2fs").arg("-h").arg(&copy));
    assert!(features.contains("needs_recovery"), "the copy should need journal recovery: {features}");
    // Without the replay, a read-only e2fsck calls it damaged.
    let raw = Command::new("e2fsck").args(["-n", "-f"]).arg(&copy).output().expect("e2fsck");
    assert_eq!(raw.status.code(), Some(4), "a read-only e2fsck of the dirty copy: {}", String::from_utf8_lossy(&raw.stdout));
    let out = fsck(&Disk { file: &copy, work: &s.work() }, soon(60));
    eprintln!("dirty journal: {}", out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.output.contains("recovering journal"), "{}", out.output);
    assert_released(&s.work(), &copy);
}

#[test]
fn fsck_checks_xfs_and_vfat_and_names_what_it_cannot_check() {
    if skip_unless_root() {
        return;
    }
    if which("mkfs.xfs").is_none() || which("mkfs.vfat").is_none() {
        eprintln!("skipped: needs mkfs.xfs and mkfs.vfat (Debian packages xfsprogs, dosfstools)");
        return;
    }
    let s = Scratch::new();
    let img = s.path("multi.img");
    // ext4, xfs (300 MiB at least), FAT32 and NTFS (a real one where
    // mkntfs is installed, as scripts/install-deps does; else only its name).
    mbr_image(&img, 420, &[(1, 40), (41, 310), (351, 40), (391, 20)]);
    ok(Command::new("sfdisk").args(["-q", "--part-type"]).arg(&img).args(["3", "c"]));
    ok(Command::new("sfdisk").args(["-q", "--part-type"]).arg(&img).args(["4", "7"]));
    mkfs_ext4(&img, MIB, 40, UUID1, &[("a", "b")]);
    let attach_part = |start_mib: u64, size_mib: u64| ok(Command::new("losetup").args(["--find", "--show", "--offset", &(start_mib * MIB).to_string(), "--sizelimit", &(size_mib * MIB).to_string()]).arg(&img)).trim().to_string();
    let xfs = attach_part(41, 310);
    let fat = attach_part(351, 40);
    ok(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&xfs));
    ok(Command::new("mkfs.vfat").args(["-F", "32"]).arg(&fat));
    let real_ntfs = which("mkntfs").is_some() && which("ntfsfix").is_some();
    if real_ntfs {
        let ntfs = attach_part(391, 20);
        ok(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&ntfs));
        ok(Command::new("losetup").arg("-d").arg(&ntfs));
    } else {
        let ntfs_at = 391 * MIB + 3;
        std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&img).expect("open"), b"NTFS    ", ntfs_at).expect("ntfs name");
    }
    // Copied while the XFS is mounted and written: its log needs replaying.
    let mx = s.path("mx");
    std::fs::create_dir(&mx).expect("mx");
    ok(Command::new("mount").arg(&xfs).arg(&mx));
    for i in 0..20 {
        std::fs::write(mx.join(format!("x{i}")), vec![7u8; 10_000]).expect("xfs write");
    }
    ok(&mut Command::new("sync"));
    let copy = s.path("copy.img");
    ok(Command::new("cp").arg("--sparse=always").arg(&img).arg(&copy));
    ok(Command::new("umount").arg(&mx));
    ok(Command::new("losetup").arg("-d").arg(&xfs));
    ok(Command::new("losetup").arg("-d").arg(&fat));

    let out = fsck(&Disk { file: &copy, work: &s.work() }, soon(120));
    eprintln!("multi: {}", out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.summary.contains("xfs on partition 2") && out.summary.contains("vfat on partition 3"), "{}", out.summary);
    if real_ntfs {
        assert!(out.summary.starts_with("4 filesystems clean: ext4 on partition 1") && out.summary.contains("ntfs on partition 4"), "{}", out.summary);
    } else {
        assert!(out.summary.starts_with("3 filesystems clean: ext4 on partition 1"), "{}", out.summary);
        assert!(out.summary.contains("; not checked: ntfs on partition 4") && out.summary.contains("(ntfsfix is not installed; Debian package ntfs-3g)"), "{}", out.summary);
    }
    assert_released(&s.work(), &copy);

    // XFS damaged: its first allocation group's AGF and AGI headers zeroed.
    let xfs_start = 41 * MIB;
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&copy).expect("open"), &[0u8; 1024], xfs_start + 512).expect("zero agf/agi");
    let out = fsck(&Disk { file: &copy, work: &s.work() }, soon(120));
    eprintln!("xfs damaged: {}", out.summary);
    assert!(!out.passed, "{}", out.summary);
    assert!(out.summary.contains("xfs on partition 2") && out.summary.contains("xfs_repair -n reports"), "{}", out.summary);
    assert_released(&s.work(), &copy);
}

/// A two-partition disk: a Linux root (fstab mounting partition 2 on /home)
/// with or without /etc/hostname.
fn root_image(path: &Path, with_hostname: bool) {
    mbr_image(path, 64, &[(1, 40), (41, 22)]);
    let fstab = format!("UUID={UUID1} / ext4 errors=remount-ro 0 1\nUUID={UUID2} /home ext4 defaults 0 2\ntmpfs /tmp tmpfs defaults 0 0\n");
    let mut root = vec![("etc/fstab", fstab.as_str()), ("sbin/init", "#!/bin/sh\n"), ("home/", "")];
    if with_hostname {
        root.push(("etc/hostname", "drill-guest\n"));
    }
    mkfs_ext4(path, MIB, 40, UUID1, &root);
    mkfs_ext4(path, 41 * MIB, 22, UUID2, &[("alice/notes.txt", "remember\n")]);
}

#[test]
fn script_sees_the_root_with_its_fstab_mounts_and_leaves_nothing_behind() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let cfg = DrillScript {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            // The root, its fstab mount, read-only, and its pid file (written just after the start).
            "test -f \"$DRMESH_DRILL_ROOT/etc/hostname\" && test -f home/alice/notes.txt && echo found $(cat etc/hostname) && ! touch \"$DRMESH_DRILL_ROOT/x\" 2>/dev/null && for i in 1 2 3 4 5 6 7 8 9 10; do test -s ../sh.pid && break; sleep 0.2; done && test \"$(cat ../sh.pid)\" = $$".into(),
        ],
        writable: false,
    };
    let good = s.path("good.img");
    root_image(&good, true);
    let out = script(&Disk { file: &good, work: &s.work() }, &cfg, soon(60));
    eprintln!("good: {}", out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.output.contains("found drill-guest"), "{}", out.output);
    assert!(out.output.contains("at /home (source mount point /home)"), "{}", out.output);
    assert_released(&s.work(), &good);

    let bad = s.path("bad.img");
    root_image(&bad, false);
    let out = script(&Disk { file: &bad, work: &s.work() }, &cfg, soon(60));
    eprintln!("bad: {}", out.summary);
    assert!(!out.passed, "{}", out.summary);
    assert!(out.summary.contains("failed (exit 1)"), "{}", out.summary);
    assert_released(&s.work(), &bad);

    // Writable: on the overlay (here the scratch file itself).
    let cfg = DrillScript { command: vec!["/bin/sh".into(), "-c".into(), "echo changed > \"$DRMESH_DRILL_ROOT/home/alice/notes.txt\"".into()], writable: true };
    let out = script(&Disk { file: &good, work: &s.work() }, &cfg, soon(60));
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert_released(&s.work(), &good);
    let cfg = DrillScript { command: vec!["grep".into(), "-q".into(), "changed".into(), "home/alice/notes.txt".into()], writable: false };
    let out = script(&Disk { file: &good, work: &s.work() }, &cfg, soon(60));
    assert!(out.passed, "the writable script's change is on the overlay: {}\n{}", out.summary, out.output);

    // A script that runs past the deadline is killed, with its children.
    let cfg = DrillScript { command: vec!["/bin/sh".into(), "-c".into(), "sleep 300 & sleep 300".into()], writable: false };
    let started = Instant::now();
    let out = script(&Disk { file: &good, work: &s.work() }, &cfg, soon(2));
    assert!(!out.passed);
    assert!(out.summary.starts_with("time limit reached during the script"), "{}", out.summary);
    assert!(started.elapsed() < Duration::from_secs(60), "killed at the deadline");
    assert_released(&s.work(), &good);
    // SIGKILL is sent to the whole group before the script's end is reported;
    // a loaded machine may take a moment to run the orphaned sleeper to its
    // death and have it reaped, so look again for a while before failing.
    let mut sleepers = String::new();
    for _ in 0..100 {
        sleepers = ok(Command::new("ps").args(["-eo", "args"]));
        if !sleepers.lines().any(|l| l.trim() == "sleep 300") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sleepers.lines().any(|l| l.trim() == "sleep 300"), "the script's children were killed:\n{sleepers}");
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// psql against the test's own server.
fn psql(sock: &Path, sql: &str) -> String {
    ok(Command::new(format!("{PG_BIN}/psql")).args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-p", "5432", "-d", "postgres", "-h"]).arg(sock).args(["-c", sql]))
}

#[test]
fn postgres_recovers_a_crashed_cluster_and_fails_without_its_wal() {
    if skip_unless_root() {
        return;
    }
    if !Path::new(PG_BIN).join("postgres").is_file() {
        eprintln!("skipped: PostgreSQL 15 is not installed (scripts/install-deps installs it)");
        return;
    }
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod scratch");
    // A server's disk: a root filesystem whose /var/lib/postgresql links to
    // /srv/postgresql, /srv being a second partition (by UUID in fstab).
    let img = s.path("server.img");
    mbr_image(&img, 200, &[(1, 40), (41, 150)]);
    let fstab = format!("UUID={UUID1} / ext4 errors=remount-ro 0 1\nUUID={UUID2} /srv ext4 defaults 0 2\n");
    mkfs_ext4(&img, MIB, 40, UUID1, &[("etc/fstab", fstab.as_str()), ("sbin/init", "#!/bin/sh\n"), ("srv/", ""), ("var/lib/postgresql", "-> /srv/postgresql")]);
    mkfs_ext4(&img, 41 * MIB, 150, UUID2, &[("postgresql/15/main/", "")]);
    let mnt = s.path("mnt");
    let sock = s.path("sock");
    std::fs::create_dir_all(mnt.clone()).expect("mnt");
    std::fs::create_dir_all(&sock).expect("sock");
    let srv = format!("loop,offset={},sizelimit={}", 41 * MIB, 150 * MIB);
    ok(Command::new("mount").args(["-o", &srv]).arg(&img).arg(&mnt));
    let data = mnt.join("postgresql/15/main");
    ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(mnt.join("postgresql")).arg(&sock).arg(s.dir.path()));
    let as_pg = |args: &[&str]| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(args);
        ok(&mut c)
    };
    let data_s = data.to_string_lossy().to_string();
    as_pg(&[&format!("{PG_BIN}/initdb"), "-D", &data_s, "--no-locale", "-E", "UTF8", "-A", "trust", "-U", "postgres"]);
    let opts = format!("-c listen_addresses='' -k {} -p 5432", sock.display());
    let log = s.path("pg.log").to_string_lossy().to_string();
    as_pg(&[&format!("{PG_BIN}/pg_ctl"), "-D", &data_s, "-o", &opts, "-l", &log, "-w", "start"]);
    psql(&sock, "create table t (i int primary key, v text)");
    psql(&sock, "insert into t select g, md5(g::text) from generate_series(1, 1000) g");
    psql(&sock, "checkpoint");
    psql(&sock, "insert into t select g, md5(g::text) from generate_series(1001, 1234) g");
    ok(&mut Command::new("sync"));
    // The copy is taken frozen but with PostgreSQL running: it needs crash recovery.
    let copy = s.path("rp.img");
    ok(Command::new("fsfreeze").arg("-f").arg(&mnt));
    let copied = Command::new("cp").arg("--sparse=always").arg(&img).arg(&copy).status();
    ok(Command::new("fsfreeze").arg("-u").arg(&mnt));
    assert!(copied.expect("cp").success());
    as_pg(&[&format!("{PG_BIN}/pg_ctl"), "-D", &data_s, "-m", "immediate", "stop"]);
    ok(Command::new("umount").arg(&mnt));

    // The /srv filesystem alone (no partition table, no root: found by a
    // suffix of the path), without its WAL segments.
    let broken = s.path("nowal.img");
    ok(Command::new("dd").arg(format!("if={}", copy.display())).arg(format!("of={}", broken.display())).args(["bs=1M", "skip=41", "count=150", "conv=sparse", "status=none"]));
    ok(Command::new("mount").args(["-o", "loop"]).arg(&broken).arg(&mnt));
    let mut removed = 0;
    for e in std::fs::read_dir(mnt.join("postgresql/15/main/pg_wal")).expect("pg_wal").flatten() {
        if e.file_name().to_string_lossy().starts_with("0000") {
            std::fs::remove_file(e.path()).expect("rm wal");
            removed += 1;
        }
    }
    assert!(removed > 0, "no WAL segment to remove");
    ok(Command::new("umount").arg(&mnt));

    let cfg = DrillPostgres { path: "/var/lib/postgresql/15/main".into(), database: "postgres".into(), query: Some("select count(*) from t".into()), expect: Some("1234".into()) };
    let work = s.path("work-ok");
    std::fs::create_dir(&work).expect("work");
    let started = Instant::now();
    let out = postgres(&Disk { file: &copy, work: &work }, &cfg, soon(120));
    eprintln!("crashed copy ({:.1} s): {}", started.elapsed().as_secs_f64(), out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.summary.contains("started after crash recovery"), "{}", out.summary);
    assert!(out.output.contains("data directory: /var/lib/postgresql/15/main on the recovery point's root filesystem"), "{}", out.output);
    assert!(out.summary.contains("pg_amcheck clean") && out.summary.contains("query returned 1234"), "{}", out.summary);
    assert_eq!(out.output.lines().last(), Some("query result: 1234"), "{}", out.output);
    assert_released(&work, &copy);

    // A wrong expectation fails with both values.
    let wrong = DrillPostgres { expect: Some("999".into()), ..cfg.clone() };
    let out = postgres(&Disk { file: &copy, work: &work }, &wrong, soon(120));
    assert!(!out.passed);
    assert!(out.summary.contains("returned 1234, expected 999"), "{}", out.summary);
    assert_released(&work, &copy);

    let work = s.path("work-nowal");
    std::fs::create_dir(&work).expect("work");
    let out = postgres(&Disk { file: &broken, work: &work }, &cfg, soon(120));
    eprintln!("without WAL: {}", out.summary);
    assert!(!out.passed, "{}", out.summary);
    assert!(out.summary.contains("did not start") && out.summary.contains("PANIC"), "{}", out.summary);
    assert!(out.output.contains("could not locate a valid checkpoint record"), "{}", out.output);
    assert!(out.output.contains("data directory: /postgresql/15/main on ext4 on the whole disk"), "{}", out.output);
    assert_released(&work, &broken);
}

/// The cached Debian image of scripts/recovery-image, or None (reason printed).
fn debian_image() -> Option<PathBuf> {
    if skip_unless_root() {
        return None;
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/recovery-image installs it)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("scripts/recovery-image");
    let out = Command::new(&script).arg("--print-path").output().expect("run scripts/recovery-image");
    assert!(out.status.success(), "scripts/recovery-image failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().expect("image path")))
}

#[test]
fn boot_reaches_login_and_fails_fast_on_a_kernel_panic() {
    let Some(image) = debian_image() else { return };
    let s = Scratch::new();
    let cfg = DrillBoot::default();
    let drive = format!("file={},format=raw,snapshot=on", image.display());
    let out = boot(&drive, &s.work(), &cfg, soon(900));
    eprintln!("boot: {}", out.summary);
    assert!(out.passed, "{}\n{}", out.summary, out.output);
    assert!(out.summary.starts_with("booted to \"login:\""), "{}", out.summary);
    assert!(!s.work().join("qemu.pid").exists());

    // A copy whose /sbin/init cannot be executed: the kernel panics.
    let copy = s.path("noinit.img");
    ok(Command::new("cp").arg("--sparse=always").arg(&image).arg(&copy));
    let table: serde_json::Value = serde_json::from_str(&ok(Command::new("sfdisk").arg("-J").arg(&copy))).expect("sfdisk json");
    let start = table["partitiontable"]["partitions"][0]["start"].as_u64().expect("start") * 512;
    let dev = ok(Command::new("losetup").args(["--find", "--show", "--offset", &start.to_string()]).arg(&copy)).trim().to_string();
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    ok(Command::new("mount").arg(&dev).arg(&mnt));
    let init = mnt.join("sbin/init");
    let _ = std::fs::remove_file(&init);
    std::fs::write(&init, "this is not a program\n").expect("write init");
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod init");
    ok(Command::new("umount").arg(&mnt));
    ok(Command::new("losetup").arg("-d").arg(&dev));
    let drive = format!("file={},format=raw,snapshot=on", copy.display());
    let started = Instant::now();
    let out = boot(&drive, &s.work(), &cfg, soon(900));
    eprintln!("broken init ({:.1} s): {}", started.elapsed().as_secs_f64(), out.summary);
    assert!(!out.passed, "{}", out.summary);
    assert!(out.summary.starts_with("kernel panic") && out.summary.contains("Kernel panic - not syncing"), "{}", out.summary);
    assert!(out.output.contains("Kernel panic"), "{}", out.output);
    assert!(started.elapsed() < cfg.timeout / 2, "it failed as soon as the console showed the panic");
}
