//! The freeze of a filesystem around a view ends whatever the caller does:
//! a guard held past the time limit is thawed by its watchdog (writers go on),
//! and dropping the guard afterwards is quiet. Needs root (loop mount,
//! FIFREEZE); skipped otherwise.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drmesh_actors::mounts::Mount;
use drmesh_actors::source::freeze::{freeze, loop_mounted};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes a file and syncs it in another thread; whether it finished within `wait`.
fn write_finishes(dir: &Path, name: &str, wait: Duration) -> bool {
    let path = dir.join(name);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::fs::write(&path, b"written").unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(wait).is_ok()
}

#[test]
fn the_watchdog_thaws_a_freeze_held_too_long() {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED the_watchdog_thaws_a_freeze_held_too_long: needs root (loop mount, FIFREEZE)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, mnt) = (dir.path().join("fs.img"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    run(Command::new("mount").arg("-o").arg("loop").arg(&image).arg(&mnt));
    let result = std::panic::catch_unwind(|| {
        let mount = loop_mounted(&image).expect("the image's filesystem is found through its loop device");
        assert_eq!((mount.point.as_path(), mount.fs_type.as_str()), (mnt.as_path(), "ext4"));

        // Frozen: a writer waits.
        let started = Instant::now();
        let guard = freeze(&mount, Duration::from_secs(2)).unwrap();
        assert!(!write_finishes(&mnt, "during", Duration::from_millis(500)), "a write went through a frozen filesystem");
        // Past the limit the watchdog thaws it, with the guard still held.
        assert!(write_finishes(&mnt, "after", Duration::from_secs(10)), "the filesystem stayed frozen past the limit");
        assert!(started.elapsed() >= Duration::from_secs(2));
        drop(guard);
        // A second freeze after the first is thawed works, and a dropped guard thaws at once.
        drop(freeze(&mount, Duration::from_secs(30)).unwrap());
        assert!(write_finishes(&mnt, "later", Duration::from_secs(5)));
        // Someone else's freeze is refused with words, and left to its owner.
        let other = freeze(&mount, Duration::from_secs(30)).unwrap();
        let e = freeze(&Mount { point: mnt.clone(), fs_type: "ext4".into() }, Duration::from_secs(30)).err().expect("frozen twice");
        assert!(e.contains("already frozen"), "{e}");
        drop(other);
    });
    let _ = Command::new("umount").arg(&mnt).status();
    result.unwrap();
}
