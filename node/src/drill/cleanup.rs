//! Cleaning up after drills and `recover` runs whose process was killed.
//!
//! A run works in `DIR/NAME-PID/`: every mount it makes is under that folder,
//! every loop device it attaches is backed by a file under it, and every
//! long-lived process it starts (qemu, postgres) has a `NAME.pid` file under
//! it. When the run's own process is gone, all of that is released here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether process `pid` is alive and its command line contains `name`.
pub fn alive(pid: &str, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(name))
}

/// `*.pid` files under `dir`, at any depth (mount points are not entered).
fn pid_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() {
            // A dead FUSE mount answers ENOTCONN: skipped by read_dir failing.
            pid_files(&path, out);
        } else if kind.is_file() && path.extension().is_some_and(|x| x == "pid") {
            out.push(path);
        }
    }
}

/// Releases what a killed run left in `dir`: stops the processes of its pid
/// files (only if their command line still names what the file says, so a
/// reused pid is never hit), unmounts every mount under it (deepest first),
/// detaches loop devices backed by files under it, and removes it.
pub fn release(dir: &Path) -> bool {
    let mut pids = Vec::new();
    pid_files(dir, &mut pids);
    for file in &pids {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let Ok(pid) = std::fs::read_to_string(file) else { continue };
        let pid = pid.trim();
        if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && alive(pid, &stem) {
            let _ = Command::new("kill").arg("-KILL").arg(pid).status();
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(p.replace("\\040", " "))).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
    if let Ok(loops) = std::fs::read_dir("/sys/block") {
        for l in loops.flatten() {
            let back = std::fs::read_to_string(l.path().join("loop/backing_file")).unwrap_or_default();
            if !back.is_empty() && Path::new(back.trim_end()).starts_with(dir) {
                let _ = Command::new("losetup").arg("-d").arg(Path::new("/dev").join(l.file_name())).status();
            }
        }
    }
    std::fs::remove_dir_all(dir).is_ok()
}

/// Cleans up the runs in `runs_dir` (folders named `NAME-PID`) whose process
/// (a `drmesh` with that pid) is gone. Returns the folders removed.
pub fn clean_stale_runs(runs_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(runs_dir) else { return removed };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())) else { continue };
        if alive(pid, "drmesh") {
            continue;
        }
        if release(&dir) {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_runs_go_live_ones_stay_and_reused_pids_are_not_killed() {
        let base = tempfile::tempdir().expect("tempdir");
        let me = std::process::id();
        let live = base.path().join(format!("db@3-{me}"));
        // A pid that does not exist (beyond pid_max).
        let dead = base.path().join("db@4-99999999");
        std::fs::create_dir_all(dead.join("fsck/fuse")).expect("mkdir");
        std::fs::create_dir_all(&live).expect("mkdir");
        // A sleeping process whose pid file names it "qemu": its cmdline says sleep, so it is left alone.
        let mut sleeper = Command::new("sleep").arg("30").spawn().expect("sleep");
        std::fs::write(dead.join("fsck/qemu.pid"), sleeper.id().to_string()).expect("write");
        // A pid file that does name it: stopped.
        let mut named = Command::new("sleep").arg("31").spawn().expect("sleep");
        std::fs::write(dead.join("sleep.pid"), named.id().to_string()).expect("write");
        // Until exec is through, /proc shows an empty command line.
        for p in [sleeper.id(), named.id()] {
            while !alive(&p.to_string(), "sleep") {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let removed = clean_stale_runs(base.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(live.exists() && !dead.exists());
        assert!(named.wait().map(|s| !s.success()).unwrap_or(false), "the named process was killed");
        assert!(sleeper.try_wait().expect("try_wait").is_none(), "a pid reused by another program is never killed");
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
