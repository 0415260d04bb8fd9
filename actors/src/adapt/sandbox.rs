//! Running one of the image's own programs (update-initramfs, dracut) on its
//! mounted root, contained. See the module doc of [`super`] for the risk and
//! why it is contained.
//!
//! Two stages, both util-linux `unshare`, with a small host shell script each:
//!
//! 1. As host root, in new mount and PID namespaces (`--mount --pid --fork
//!    --kill-child`, mounts private): a fresh proc at ROOT/proc whose
//!    /proc/sys, /proc/bus, /proc/fs, /proc/irq and /proc/sysrq-trigger are
//!    made read-only; a private tmpfs at ROOT/dev holding only null, zero,
//!    random and urandom (mknod); for dracut, the host's /sys bind-mounted
//!    read-only at ROOT/sys. ROOT/proc, ROOT/dev (and ROOT/sys for dracut)
//!    must be real folders of the image, not symlinks.
//! 2. In a new user namespace that maps root to root (`--user
//!    --map-root-user`) with its own mount, network, IPC and UTS namespaces:
//!    the mounts of stage 1 are now locked (a less privileged namespace can
//!    neither unmount them nor make them writable); ROOT is bind-mounted on
//!    itself, made the root with `pivot_root`, and the host's root is
//!    detached; then the program is executed.
//!
//! Every mount lives only in these namespaces: when the program's PID
//! namespace ends (the program exits, or the time limit kills it), they all
//! vanish, and nothing was mounted on the host.

use std::io::{self, Read};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Stage 1, run by the host's /bin/sh as host root in the new mount and PID
/// namespaces. Arguments: ROOT, WITH_SYS (0/1), the stage 2 script, then the
/// program and its arguments.
const STAGE1: &str = r#"set -eu
root=$1; with_sys=$2; stage2=$3; shift 3
die() { echo "drmesh sandbox: $*" >&2; exit 111; }
cd "$root" || die "cannot enter $root"
dirs="proc dev"
if [ "$with_sys" = 1 ]; then dirs="$dirs sys"; fi
for d in $dirs; do
    if [ ! -d "$d" ] || [ -L "$d" ]; then die "/$d of the image is not a folder (a symlink or missing)"; fi
done
mount -t proc -o nosuid,nodev,noexec drmesh-proc proc
for p in sys bus fs irq sysrq-trigger; do
    if [ -e "proc/$p" ]; then
        mount --bind "proc/$p" "proc/$p"
        mount -o remount,bind,ro,nosuid,nodev,noexec "proc/$p"
    fi
done
mount -t tmpfs -o nosuid,noexec,mode=0755,size=64k drmesh-dev dev
mknod -m 0666 dev/null c 1 3
mknod -m 0666 dev/zero c 1 5
mknod -m 0666 dev/random c 1 8
mknod -m 0666 dev/urandom c 1 9
if [ "$with_sys" = 1 ]; then
    mount --bind /sys sys
    mount -o remount,bind,ro,nosuid,nodev,noexec sys
fi
exec unshare --user --map-root-user --mount --net --ipc --uts --propagation private -- /bin/sh -c "$stage2" drmesh-sandbox-2 "$root" "$@"
"#;

/// Stage 2, in the new user namespace: pivot into ROOT, detach the host's
/// root, run the program.
const STAGE2: &str = r#"set -eu
root=$1; shift
mount --rbind "$root" "$root"
cd "$root"
pivot_root . .
umount -l .
cd /
exec "$@"
"#;

/// Bytes of output kept (the end of it).
const OUTPUT_TAIL_BYTES: usize = 16 << 10;

/// How a contained run ended.
#[derive(Debug, Clone)]
pub struct Run {
    /// The exit code, if the program exited.
    pub code: Option<i32>,
    /// Whether the time limit killed it.
    pub timed_out: bool,
    /// The end of its output (stdout, then stderr).
    pub output: String,
    /// How long it ran.
    pub seconds: f64,
}

impl Run {
    /// Whether it exited with 0 in time.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// Reads `pipe` to its end and returns its last `keep` bytes (holding at most
/// twice that meanwhile).
pub(crate) fn tail(mut pipe: impl Read, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * keep {
            kept.drain(..kept.len() - keep);
        }
    }
    if kept.len() > keep {
        kept.drain(..kept.len() - keep);
    }
    kept
}

/// Runs `argv` (a program of the image and its arguments) with `root` as
/// its root, contained as described above, killed after `timeout`.
pub fn run_in_image(root: &Path, argv: &[&str], with_sys: bool, timeout: Duration) -> io::Result<Run> {
    let started = Instant::now();
    let mut child = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--", "/bin/sh", "-c", STAGE1, "drmesh-sandbox"])
        .arg(root)
        .arg(if with_sys { "1" } else { "0" })
        .arg(STAGE2)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("starting util-linux's unshare: {e}")))?;
    let readers: Vec<thread::JoinHandle<Vec<u8>>> = [child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)]
        .into_iter()
        .flatten()
        .map(|p| thread::spawn(move || tail(p, OUTPUT_TAIL_BYTES)))
        .collect();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // The whole process group: unshare and, through --kill-child and
            // the PID namespace, everything the program started.
            if let Ok(pgid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut output = Vec::new();
    for r in readers {
        output.extend(r.join().unwrap_or_default());
    }
    Ok(Run { code: status.code(), timed_out, output: String::from_utf8_lossy(&output).into_owned(), seconds: started.elapsed().as_secs_f64() })
}
