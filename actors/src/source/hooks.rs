//! Volume hooks (`[volume.hooks]`): the operator's commands run on the source
//! node around each cycle's point-in-time view, to quiesce an application.
//! [`Hooked`] wraps any change-source kind: it runs `pre`, opens the kind's
//! view, then runs `post` as soon as the view no longer needs the application
//! quiet (right after a snapshot or clone is taken; after the read, when the
//! view is a live read). An RP whose `pre` exited 0 is labelled `app`, unless
//! the view is a live read whose application was not kept quiet.
//!
//! A hook never blocks a cycle for ever: each command has a time limit, at
//! which its process group is killed. A `pre` that fails (or cannot run, or
//! times out) does not fail the cycle: the view is taken all the same, the RP
//! keeps the view's own label, and the reason is in the cycle's `view` text
//! and the log. `post` runs whenever `pre` ran (so it can undo a half-done
//! quiesce), and also when opening the view failed.
//!
//! A `post` is owed from before `pre` runs until it ran, on disk
//! ([`OwedPosts`]): a node killed in between (during a live read, that is
//! the whole read) runs it when it starts again, before any cycle, with
//! `DRMESH_PRE_RESULT=interrupted`.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drmesh_topology::VolumeHooks;

use super::baseline::Baselines;
use super::change::{Changes, ChangeSource, PointInTime, ViewQuality};
use super::device::BlockDevice;
use super::SourceError;
use crate::proto::gossip::catalog::Consistency;

/// How much of a hook's output (stdout and stderr together) is kept and logged: its last bytes.
pub const HOOK_OUTPUT_BYTES: usize = 4096;

/// How long the output of a hook that exited is waited for: a process it left
/// running in the background may hold the pipe open.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// How one hook command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEnd {
    /// It exited (or was killed by a signal) on its own.
    Exited(ExitStatus),
    /// It reached its time limit; its process group was killed.
    TimedOut(Duration),
    /// It could not be started.
    CannotRun(String),
}

/// One run of a hook command.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// `pre` or `post`.
    pub phase: &'static str,
    /// The command as configured, joined by spaces.
    pub shown: String,
    /// How it ended.
    pub end: HookEnd,
    /// The last [`HOOK_OUTPUT_BYTES`] of its stdout and stderr.
    pub output: String,
    /// Seconds it ran.
    pub secs: f64,
}

impl HookRun {
    /// Whether it exited with status 0.
    pub fn ok(&self) -> bool {
        matches!(&self.end, HookEnd::Exited(s) if s.success())
    }

    /// One line for people: what ran and how it ended, with the last line of
    /// its output when it failed.
    pub fn summary(&self) -> String {
        let how = match &self.end {
            HookEnd::Exited(s) if s.success() => format!("exited 0 after {:.1} s", self.secs),
            HookEnd::Exited(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
                (Some(code), _) => format!("failed with exit status {code} after {:.1} s", self.secs),
                (None, Some(sig)) => format!("was killed by signal {sig} after {:.1} s", self.secs),
                (None, None) => format!("failed after {:.1} s", self.secs),
            },
            HookEnd::TimedOut(limit) => format!("did not finish within its timeout of {} s and was killed", limit.as_secs()),
            HookEnd::CannotRun(why) => format!("could not be started: {why}"),
        };
        let last = self.output.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim);
        match last {
            Some(line) if !self.ok() => format!("{} hook `{}` {how} ({line})", self.phase, self.shown),
            _ => format!("{} hook `{}` {how}", self.phase, self.shown),
        }
    }
}

/// Runs `command` (program and arguments, no shell) with `env` added to the
/// node's environment, stdin from /dev/null, in a process group of its own
/// that is killed at `timeout`. Processes it leaves running after it exits
/// are left alone (a quiesce may need a session kept open until `post`).
/// Blocking.
pub fn run_hook(phase: &'static str, command: &[String], env: &[(&str, String)], timeout: Duration) -> HookRun {
    let shown = command.join(" ");
    let started = Instant::now();
    let ended = |end: HookEnd, output: String| HookRun { phase, shown: shown.clone(), end, output, secs: started.elapsed().as_secs_f64() };
    let Some((program, args)) = command.split_first() else {
        return ended(HookEnd::CannotRun("no command".into()), String::new());
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return ended(HookEnd::CannotRun(format!("cannot make a pipe: {e}")), String::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir("/").stdin(Stdio::null()).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match writer.try_clone() {
        Ok(w) => cmd.stdout(w).stderr(writer),
        Err(e) => return ended(HookEnd::CannotRun(format!("cannot make a pipe: {e}")), String::new()),
    };
    let spawned = cmd.spawn();
    // The pipe's write ends live in `cmd`: without dropping them, the read never ends.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return ended(HookEnd::CannotRun(format!("{program}: {e}")), String::new()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(crate::adapt::sandbox::tail(reader, HOOK_OUTPUT_BYTES));
    });
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let deadline = started + timeout;
    let mut step = Duration::from_millis(2);
    let end = loop {
        match child.try_wait() {
            Ok(Some(status)) => break HookEnd::Exited(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break HookEnd::TimedOut(timeout);
            }
            Ok(None) => {}
            Err(e) => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break HookEnd::CannotRun(format!("cannot wait for it: {e}"));
            }
        }
        std::thread::sleep(step.min(deadline.saturating_duration_since(Instant::now())));
        step = (step * 2).min(Duration::from_millis(100));
    };
    let tail = rx.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    ended(end, String::from_utf8_lossy(&tail).into_owned())
}

/// The `post` hooks owed on this node: one small JSON file each in the
/// folder `owed-post-hooks` beside the baselines (0700), written durably
/// (exclusive temporary file, fsync, rename) before `pre` runs and removed
/// once `post` ran. Running a `post` twice must be safe (docs/consistency.md).
pub struct OwedPosts {
    dir: PathBuf,
}

/// What an owed `post` hook runs: the command, its environment and limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct OwedPost {
    what: String,
    target: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    timeout_ms: u64,
}

/// Largest owed-post file read back (a command and a few variables).
const MAX_OWED_BYTES: u64 = 256 << 10;

impl OwedPosts {
    /// The folder of the node whose baselines are `baselines`.
    pub fn of(baselines: &Baselines) -> OwedPosts {
        let state = baselines.path().parent().unwrap_or(Path::new("."));
        OwedPosts { dir: state.join("owed-post-hooks") }
    }

    fn file(&self, what: &str, target: &str) -> PathBuf {
        let hash = blake3::hash(format!("{what}\0{target}").as_bytes()).to_hex();
        self.dir.join(format!("{}.json", &hash[..24]))
    }

    /// Records durably that `command` (with `env`) is owed for `what` (a
    /// volume, or `group NAME`) towards `target`. An error is logged: the
    /// cycle goes on without the record.
    pub(crate) fn owe_for(&self, what: &str, target: &str, command: &[String], env: &[(&'static str, String)], timeout: Duration) -> Option<PathBuf> {
        let record = OwedPost {
            what: what.to_string(),
            target: target.to_string(),
            command: command.to_vec(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let file = self.file(what, target);
        match self.write(&file, &record) {
            Ok(()) => Some(file),
            Err(e) => {
                tracing::warn!(volume = what, folder = %self.dir.display(), error = %e, "cannot record the post hook as owed: a node killed before it runs will not run it at its next start");
                None
            }
        }
    }

    fn write(&self, file: &Path, record: &OwedPost) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        out.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
        out.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Runs every owed `post` hook (with `DRMESH_PRE_RESULT=interrupted`),
    /// one after the other, and forgets each once it ran: at a node's start,
    /// before any cycle. Returns what ran. Unreadable records are removed
    /// with a warning.
    pub fn run_all(&self) -> Vec<HookRun> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut ran = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|x| x != "json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let record = read_owed(&path);
            let _ = match record {
                Ok(owed) => {
                    let mut env: Vec<(&str, String)> = owed.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    env.retain(|(k, _)| *k != "DRMESH_PRE_RESULT" && *k != "DRMESH_HOOK");
                    env.push(("DRMESH_PRE_RESULT", "interrupted".into()));
                    env.push(("DRMESH_HOOK", "post".into()));
                    let run = run_hook("post", &owed.command, &env, Duration::from_millis(owed.timeout_ms));
                    let said = format!("{} (owed since the node stopped between pre and post)", run.summary());
                    if run.ok() {
                        tracing::info!(volume = %owed.what, target = %owed.target, output = %run.output.trim_end(), "{said}");
                    } else {
                        tracing::warn!(volume = %owed.what, target = %owed.target, output = %run.output.trim_end(), "{said}");
                    }
                    ran.push(run);
                    std::fs::remove_file(&path)
                }
                Err(why) => {
                    tracing::warn!(file = %path.display(), reason = %why, "an owed post hook's record cannot be read: removed, the hook is not run");
                    std::fs::remove_file(&path)
                }
            };
        }
        ran
    }
}

/// An owed-post record: a regular file of at most [`MAX_OWED_BYTES`] of JSON.
fn read_owed(path: &Path) -> Result<OwedPost, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_OWED_BYTES {
        return Err("not a regular file of at most 256 KiB".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_OWED_BYTES).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not an owed-post record ({e})"))
}

/// Forgets an owed `post` that ran (its record, if one was written).
pub(crate) fn paid(file: Option<&Path>) {
    if let Some(file) = file {
        if let Err(e) = std::fs::remove_file(file) {
            tracing::warn!(file = %file.display(), error = %e, "cannot forget the post hook that ran: it runs again at the node's next start");
        }
    }
}

/// A change source whose views are taken between the volume's hooks.
pub struct Hooked {
    inner: Arc<dyn ChangeSource>,
    hooks: VolumeHooks,
}

impl Hooked {
    /// Wraps `inner` with `hooks`.
    pub fn new(inner: Arc<dyn ChangeSource>, hooks: VolumeHooks) -> Hooked {
        Hooked { inner, hooks }
    }

    fn run(&self, phase: &'static str, command: Option<&Vec<String>>, env: &[(&'static str, String)], volume: &str) -> Option<HookRun> {
        Some(run_logged(phase, command?, env, self.hooks.timeout, volume))
    }
}

/// [`run_hook`] with `DRMESH_HOOK` set to the phase, logged with its output
/// (at `info` when it exited 0, else at `warn`); `volume` names what it ran
/// for in the log (a volume, or a consistency group).
pub(crate) fn run_logged(phase: &'static str, command: &[String], env: &[(&'static str, String)], timeout: Duration, volume: &str) -> HookRun {
    let mut env = env.to_vec();
    env.push(("DRMESH_HOOK", phase.to_string()));
    let run = run_hook(phase, command, &env, timeout);
    if run.ok() {
        tracing::info!(volume, output = %run.output.trim_end(), "{}", run.summary());
    } else {
        tracing::warn!(volume, output = %run.output.trim_end(), "{}", run.summary());
    }
    run
}

impl ChangeSource for Hooked {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn volume_path(&self) -> &Path {
        self.inner.volume_path()
    }
    fn turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.inner.turn()
    }
    fn hold_points(&self) -> Vec<super::group::HoldPoint> {
        self.inner.hold_points()
    }
    fn open(&self, baselines: &Baselines, volume: &str, target: &str, block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError> {
        let mut env = vec![
            ("DRMESH_VOLUME", volume.to_string()),
            ("DRMESH_TARGET", target.to_string()),
            ("DRMESH_VOLUME_PATH", self.inner.volume_path().display().to_string()),
        ];
        let owed = self.hooks.post.as_ref().and_then(|post| OwedPosts::of(baselines).owe_for(volume, target, post, &env, self.hooks.timeout));
        let pre = self.run("pre", self.hooks.pre.as_ref(), &env, volume);
        env.push(("DRMESH_PRE_RESULT", pre.as_ref().map_or("none", |p| if p.ok() { "ok" } else { "failed" }).to_string()));
        let view = match self.inner.open(baselines, volume, target, block_bytes) {
            Ok(v) => v,
            Err(e) => {
                self.run("post", self.hooks.post.as_ref(), &env, volume);
                paid(owed.as_deref());
                return Err(e);
            }
        };
        // A live read needs the application quiet until it has read everything.
        let live = view.quality().consistency == Consistency::Inconsistent;
        let post = if live {
            Deferred::Later(self.hooks.post.clone().map(|command| PostLater { command, env, timeout: self.hooks.timeout, volume: volume.to_string(), owed }))
        } else {
            let ran = self.run("post", self.hooks.post.as_ref(), &env, volume);
            paid(owed.as_deref());
            Deferred::Ran(ran)
        };
        Ok(Box::new(HookedView { inner: view, pre, post: Mutex::new(post) }))
    }
}

/// A view of a consistency group's member taken between the group's hooks:
/// labelled as a hooked view is (`app` after a good `pre`), with the group's
/// `post` as it ran, or (`later`: the command, its environment and time
/// limit) to run when this view is released.
pub(crate) fn group_member_view(
    inner: Box<dyn PointInTime>,
    pre: Option<HookRun>,
    post: Option<HookRun>,
    later: Option<PostLater>,
) -> Box<dyn PointInTime> {
    let post = match later {
        Some(later) => Deferred::Later(Some(later)),
        None => Deferred::Ran(post),
    };
    Box::new(HookedView { inner, pre, post: Mutex::new(post) })
}

/// The `post` hook of a view: ran already, or to run at release.
enum Deferred {
    Ran(Option<HookRun>),
    Later(Option<PostLater>),
}

/// A `post` hook kept for the release of a live read.
pub(crate) struct PostLater {
    /// Program and arguments.
    pub(crate) command: Vec<String>,
    /// Its environment.
    pub(crate) env: Vec<(&'static str, String)>,
    /// Its time limit.
    pub(crate) timeout: Duration,
    /// What it runs for, in the log (a volume, or `group NAME`).
    pub(crate) volume: String,
    /// Its owed-post record, forgotten once it ran.
    pub(crate) owed: Option<PathBuf>,
}

/// A view taken between hooks.
struct HookedView {
    inner: Box<dyn PointInTime>,
    pre: Option<HookRun>,
    post: Mutex<Deferred>,
}

impl PointInTime for HookedView {
    fn quality(&self) -> ViewQuality {
        let base = self.inner.quality();
        let Some(pre) = &self.pre else { return base };
        let post = match &*self.post.lock().unwrap_or_else(|e| e.into_inner()) {
            Deferred::Ran(Some(run)) => format!("; {}", run.summary()),
            Deferred::Ran(None) | Deferred::Later(None) => String::new(),
            Deferred::Later(Some(_)) => "; post hook runs once the read is done".into(),
        };
        if pre.ok() {
            ViewQuality { consistency: Consistency::Application, how: format!("{}; {}, the application was quiet{post}", base.how, pre.summary()) }
        } else {
            ViewQuality { consistency: base.consistency, how: format!("{}; {}, so the RP is labelled {}{post}", base.how, pre.summary(), base.consistency.label()) }
        }
    }
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError> {
        self.inner.device()
    }
    fn changes(&self) -> Changes {
        self.inner.changes()
    }
    fn check(&self) -> Result<(), SourceError> {
        self.inner.check()
    }
    fn committed(&self, baselines: &Baselines) -> Result<(), SourceError> {
        self.inner.committed(baselines)
    }
    fn release(&self) -> Result<(), SourceError> {
        let later = {
            let mut post = self.post.lock().unwrap_or_else(|e| e.into_inner());
            match &mut *post {
                Deferred::Later(later) => later.take(),
                Deferred::Ran(_) => None,
            }
        };
        if let Some(p) = later {
            let run = run_logged("post", &p.command, &p.env, p.timeout, &p.volume);
            paid(p.owed.as_deref());
            *self.post.lock().unwrap_or_else(|e| e.into_inner()) = Deferred::Ran(Some(run));
        }
        self.inner.release()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::change::FileKind;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn a_hook_that_exits_0_is_ok_and_its_environment_is_set() {
        let run = run_hook("pre", &sh("echo \"$DRMESH_VOLUME:$X\"; echo to-stderr >&2"), &[("DRMESH_VOLUME", "db".into()), ("X", "y".into())], Duration::from_secs(10));
        assert!(run.ok(), "{run:?}");
        assert!(run.output.contains("db:y") && run.output.contains("to-stderr"), "{run:?}");
        assert!(run.summary().starts_with("pre hook `/bin/sh -c "), "{}", run.summary());
        assert!(run.summary().contains("exited 0"), "{}", run.summary());
    }

    #[test]
    fn a_failing_hook_says_its_status_and_last_line() {
        let run = run_hook("pre", &sh("echo starting; echo 'database refused: in recovery'; exit 3"), &[], Duration::from_secs(10));
        assert!(!run.ok());
        assert_eq!(run.end, HookEnd::Exited(std::os::unix::process::ExitStatusExt::from_raw(3 << 8)));
        assert!(run.summary().contains("failed with exit status 3") && run.summary().ends_with("(database refused: in recovery)"), "{}", run.summary());
    }

    #[test]
    fn a_missing_program_cannot_run() {
        let run = run_hook("post", &["/nonexistent/quiesce".to_string()], &[], Duration::from_secs(10));
        assert!(matches!(&run.end, HookEnd::CannotRun(why) if why.contains("/nonexistent/quiesce")), "{run:?}");
        assert!(run.summary().contains("could not be started"), "{}", run.summary());
    }

    /// At the time limit the whole process group goes, also what the hook started.
    #[test]
    fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let started = Instant::now();
        let run = run_hook("pre", &sh(&script), &[], Duration::from_secs(1));
        assert_eq!(run.end, HookEnd::TimedOut(Duration::from_secs(1)));
        assert!(started.elapsed() < Duration::from_secs(60), "the limit was not enforced");
        assert!(run.summary().contains("did not finish within its timeout of 1 s"), "{}", run.summary());
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let gone = (0..100).any(|_| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
            if alive {
                std::thread::sleep(Duration::from_millis(100));
            }
            !alive
        });
        assert!(gone, "the hook's child {pid} survived the kill");
    }

    /// A hook may leave a process running (a session held open until
    /// `post`); its exit is not waited past, and the process is left alone.
    #[test]
    fn a_background_process_holding_the_output_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("bg.pid");
        let script = format!("echo quiesced; sleep 30 & echo $! > {}", pid_file.display());
        let run = run_hook("pre", &sh(&script), &[], Duration::from_secs(20));
        assert!(run.ok(), "{run:?}");
        assert!(run.secs < 20.0, "{run:?}");
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the background process was killed");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }

    #[test]
    fn only_the_end_of_a_long_output_is_kept() {
        let run = run_hook("pre", &sh("i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done"), &[], Duration::from_secs(30));
        assert!(run.ok());
        assert!(run.output.len() <= HOOK_OUTPUT_BYTES, "{}", run.output.len());
        assert!(run.output.ends_with("line-2999\n"), "{}", &run.output[run.output.len() - 20..]);
    }

    fn hooked(dir: &Path, pre: &str, post: &str) -> (Hooked, Baselines) {
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
        let hooks = VolumeHooks { pre: Some(sh(pre)), post: Some(sh(post)), timeout: Duration::from_secs(10) };
        let baselines = Baselines::open(&dir.join("source.redb")).unwrap();
        (Hooked::new(Arc::new(FileKind { path: image }), hooks), baselines)
    }

    /// A live read (the temporary folder cannot clone): `post` waits for the
    /// release, and a good `pre` makes the RP `app`.
    #[test]
    fn a_quiet_application_during_a_live_read_gives_an_app_rp() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (src, baselines) = hooked(dir.path(), &format!("echo \"$DRMESH_HOOK $DRMESH_VOLUME $DRMESH_TARGET\" >> {}", log.display()), &format!("echo \"$DRMESH_HOOK $DRMESH_PRE_RESULT\" >> {}", log.display()));
        let view = src.open(&baselines, "db", "hq", 1 << 20).unwrap();
        let quality = view.quality();
        if quality.how.starts_with("reflink clone") {
            // A temporary folder on XFS or btrfs: post ran at once.
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre db hq\npost ok\n");
        } else {
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre db hq\n", "post ran before the read was done");
            assert!(quality.how.contains("post hook runs once the read is done"), "{}", quality.how);
            view.release().unwrap();
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre db hq\npost ok\n");
        }
        assert_eq!(quality.consistency, Consistency::Application, "{}", quality.how);
        assert!(quality.how.contains("the application was quiet"), "{}", quality.how);
    }

    #[test]
    fn a_failed_pre_keeps_the_views_label_and_still_runs_post() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (src, baselines) = hooked(dir.path(), "echo 'cannot reach the database'; exit 1", &format!("echo \"$DRMESH_HOOK $DRMESH_PRE_RESULT\" >> {}", log.display()));
        let view = src.open(&baselines, "db", "hq", 1 << 20).unwrap();
        view.release().unwrap();
        let quality = view.quality();
        assert_ne!(quality.consistency, Consistency::Application);
        assert!(quality.how.contains("pre hook `/bin/sh -c echo 'cannot reach the database'; exit 1` failed with exit status 1"), "{}", quality.how);
        assert!(quality.how.contains("(cannot reach the database), so the RP is labelled"), "{}", quality.how);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "post failed\n");
    }

    #[test]
    fn post_runs_when_the_view_cannot_be_opened() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (_, baselines) = hooked(dir.path(), "true", "true");
        let hooks = VolumeHooks { pre: Some(sh("true")), post: Some(sh(&format!("echo post >> {}", log.display()))), timeout: Duration::from_secs(10) };
        let src = Hooked::new(Arc::new(FileKind { path: dir.path().join("missing.img") }), hooks);
        assert!(src.open(&baselines, "db", "hq", 1 << 20).is_err());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "post\n");
    }

    /// The records owed now.
    fn owed_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir.join("owed-post-hooks")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    /// A node killed between `pre` and `post` (here: the view dropped
    /// without its release, as a killed process leaves it) runs `post` at
    /// its next start, once, with `DRMESH_PRE_RESULT=interrupted`; a cycle
    /// that ended leaves nothing owed.
    #[test]
    fn a_post_owed_when_the_node_stopped_runs_at_its_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (src, baselines) = hooked(dir.path(), &format!("echo pre >> {}", log.display()), &format!("echo \"$DRMESH_HOOK $DRMESH_VOLUME $DRMESH_TARGET $DRMESH_PRE_RESULT\" >> {}", log.display()));
        // A cycle that ends: post ran, nothing owed.
        let view = src.open(&baselines, "db", "hq", 1 << 20).unwrap();
        view.release().unwrap();
        assert!(owed_files(dir.path()).is_empty(), "{:?}", owed_files(dir.path()));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost db hq ok\n");
        std::fs::remove_file(&log).unwrap();

        let view = src.open(&baselines, "db", "hq", 1 << 20).unwrap();
        let live = !view.quality().how.starts_with("reflink clone");
        std::mem::forget(view);
        if !live {
            // A folder that clones: post ran at once, before anything could stop the node.
            assert!(owed_files(dir.path()).is_empty());
            return;
        }
        let owed = owed_files(dir.path());
        assert_eq!(owed.len(), 1, "the post hook is owed while the read runs");
        assert_eq!(std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&owed[0]).unwrap()) & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\n");
        // The next start.
        let ran = OwedPosts::of(&baselines).run_all();
        assert_eq!(ran.len(), 1);
        assert!(ran[0].ok(), "{:?}", ran[0]);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost db hq interrupted\n");
        assert!(owed_files(dir.path()).is_empty());
        assert!(OwedPosts::of(&baselines).run_all().is_empty(), "a post runs once");

        // A record that is not one (cut short, planted) is removed and runs nothing.
        let folder = dir.path().join("owed-post-hooks");
        std::fs::write(folder.join("0123.json"), b"{\"what\": \"db\", \"comm").unwrap();
        std::os::unix::fs::symlink("/dev/zero", folder.join("4567.json")).unwrap();
        assert!(OwedPosts::of(&baselines).run_all().is_empty());
        assert!(owed_files(dir.path()).is_empty());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost db hq interrupted\n");
    }
}
