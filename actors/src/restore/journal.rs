//! The journal of named temporary files that restores create, so that the next
//! restore or node start removes what a killed one left behind.
//!
//! Restores write image files through unnamed `O_TMPFILE` files, which a kill
//! cannot leave behind. Only where a name is needed (a filesystem without
//! `O_TMPFILE`, or the staging name of a `--force` replace) is one created, and
//! its path is written to `<state-dir>/restores/` *before* the file exists. An
//! entry names the process (pid and start time, so a reused pid is not taken for
//! the restore) and the temporary path. [`Journal::clean`] removes the path of
//! every entry whose process is gone, but only a regular file or a folder
//! (never through a symlink) whose name carries [`TEMP_MARK`], then the entry.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Part of every temporary name a restore gives a file.
pub const TEMP_MARK: &str = ".drmesh-restore-";

/// Folder of the journal inside a state dir.
pub const JOURNAL_DIR: &str = "restores";

static ENTRY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The journal of one state dir. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// One recorded temporary path; the entry is removed when this is dropped
/// (after the file was linked into place or removed).
#[derive(Debug)]
pub struct JournalEntry {
    file: PathBuf,
}

impl Drop for JournalEntry {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

/// Start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), None when there is no such process.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Journal {
    /// The journal of the state dir `state_dir` (nothing is created until a record).
    pub fn new(state_dir: &Path) -> Journal {
        Journal { dir: state_dir.join(JOURNAL_DIR) }
    }

    /// Records that this process is about to create `temp`. The entry is durable
    /// (fsync'd) when this returns.
    pub fn record(&self, temp: &Path) -> io::Result<JournalEntry> {
        fs::create_dir_all(&self.dir)?;
        let pid = std::process::id();
        let ticks = start_ticks(pid).unwrap_or(0);
        let n = ENTRY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("{pid}-{ticks}-{n}"));
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file)?;
        f.write_all(temp.as_os_str().as_bytes())?;
        f.sync_all()?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(JournalEntry { file })
    }

    /// Removes the temporary files of restores whose process is gone, and their
    /// entries. Returns the paths removed. Errors on single entries are logged
    /// and skipped: cleaning never stops a restore or a node from starting.
    pub fn clean(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return removed };
        for entry in entries.flatten() {
            let file = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('-');
            let (Some(pid), Some(ticks)) = (parts.next().and_then(|p| p.parse::<u32>().ok()), parts.next().and_then(|t| t.parse::<u64>().ok())) else {
                continue;
            };
            if start_ticks(pid).is_some_and(|t| t == ticks) {
                continue; // that restore is still running
            }
            let Ok(bytes) = fs::read(&file) else { continue };
            let temp = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
            let ours = temp.file_name().is_some_and(|n| n.to_string_lossy().contains(TEMP_MARK));
            match fs::symlink_metadata(&temp) {
                Ok(m) if ours && m.is_dir() => match fs::remove_dir_all(&temp) {
                    Ok(()) => removed.push(temp),
                    Err(e) => {
                        tracing::warn!(path = %temp.display(), error = %e, "cannot remove the temporary folder of an interrupted restore");
                        continue;
                    }
                },
                Ok(m) if ours && m.is_file() => match fs::remove_file(&temp) {
                    Ok(()) => removed.push(temp),
                    Err(e) => {
                        tracing::warn!(path = %temp.display(), error = %e, "cannot remove the temporary file of an interrupted restore");
                        continue;
                    }
                },
                Ok(_) => tracing::warn!(path = %temp.display(), "journal of interrupted restores names something that is not a restore's temporary file; left alone"),
                Err(_) => {} // linked, removed or never created
            }
            let _ = fs::remove_file(&file);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_dead_processes_are_cleaned_and_only_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        // A live entry (this process) is kept, with its file.
        let live_temp = dest.join(format!(".a.img{TEMP_MARK}1"));
        let live = journal.record(&live_temp).unwrap();
        fs::write(&live_temp, b"x").unwrap();
        // A dead process's entry: its temp file goes.
        let dead_temp = dest.join(format!(".b.img{TEMP_MARK}2"));
        fs::write(&dead_temp, b"x").unwrap();
        fs::write(journal.dir.join("999999999-1-0"), dead_temp.as_os_str().as_bytes()).unwrap();
        // A dead entry naming a symlink with our mark: the link is left alone.
        let target = dir.path().join("precious");
        fs::write(&target, b"keep").unwrap();
        let planted = dest.join(format!(".c.img{TEMP_MARK}3"));
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        fs::write(journal.dir.join("999999999-1-1"), planted.as_os_str().as_bytes()).unwrap();
        // A dead entry naming a file without our mark: left alone.
        fs::write(journal.dir.join("999999999-1-2"), target.as_os_str().as_bytes()).unwrap();

        let removed = journal.clean();
        assert_eq!(removed, vec![dead_temp.clone()]);
        assert!(!dead_temp.exists());
        assert!(live_temp.exists());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&planted).is_ok());
        drop(live);
        assert_eq!(fs::read_dir(&journal.dir).unwrap().count(), 0, "every entry of a dead process is done with");
    }
}
