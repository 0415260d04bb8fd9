//! Booting a recovery point: a qemu virtual machine whose disk is an export
//! (NBD), isolated from the network unless asked, with its serial console on a
//! Unix socket (for a person) and in a log file (for the boot check), and a QMP
//! socket (for live restore).
//!
//! Acceleration: KVM when `/dev/kvm` can be opened and the host's KVM is the
//! hardware-assisted kind (`kvm_intel` or `kvm_amd` loaded); TCG otherwise. A
//! paravirtual KVM such as PVM (`kvm_pvm`) runs only kernels built for it, so a
//! recovered server's stock kernel would hang there: TCG is used, and the
//! choice and its reason are reported.

pub mod qmp;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a VM could not start or did not boot.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// qemu could not be started.
    #[error("cannot start {program}: {cause}")]
    Start {
        /// The qemu binary.
        program: String,
        /// Why, and what to do.
        cause: String,
    },
    /// The guest did not reach the boot marker: it panicked, dropped to an
    /// emergency shell, qemu exited, or time ran out. Carries the console's last lines.
    #[error("the recovered system did not boot: {reason}; last console lines:\n{tail}")]
    NoBoot {
        /// What was seen.
        reason: String,
        /// The end of the serial console.
        tail: String,
    },
    /// A QMP exchange failed.
    #[error("qemu monitor: {0}")]
    Qmp(String),
}

/// The disk controller the recovered disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk: fast; needs virtio drivers in the guest's initramfs.
    Virtio,
    /// IDE (PIIX): works with any x86 Linux initramfs that has ata_piix.
    Ide,
    /// SATA (AHCI).
    Sata,
}

impl DiskBus {
    /// Parses `virtio`, `ide`, `sata`.
    pub fn parse(text: &str) -> Option<DiskBus> {
        match text {
            "virtio" => Some(DiskBus::Virtio),
            "ide" => Some(DiskBus::Ide),
            "sata" => Some(DiskBus::Sata),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Ide => "ide",
            DiskBus::Sata => "sata",
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// No NIC at all (the default: a recovered server must not talk to production).
    None,
    /// qemu's user-mode network with `restrict=on`: a NIC with DHCP, but no route out.
    UserRestricted,
    /// qemu's user-mode network: DHCP and outbound connections through the host.
    User,
}

/// How to run a recovered system.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The qemu `-drive` value of the disk (its `file.*` part, e.g. an NBD export).
    pub drive: String,
    /// The disk controller.
    pub bus: DiskBus,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The guest's network.
    pub network: Network,
    /// Folder for the console socket and log and the QMP socket (private, 0700).
    pub run_dir: PathBuf,
    /// Force an accelerator ("kvm" or "tcg"); None chooses.
    pub accel: Option<String>,
}

/// The accelerator to use and why.
pub fn choose_accel(forced: Option<&str>) -> (String, String) {
    if let Some(a) = forced {
        return (a.to_string(), "as asked".into());
    }
    let hardware = ["kvm_intel", "kvm_amd"].iter().any(|m| Path::new("/sys/module").join(m).exists());
    let usable = OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    match (usable, hardware) {
        (true, true) => ("kvm".into(), "hardware-assisted KVM is available".into()),
        (true, false) => ("tcg".into(), "/dev/kvm is a paravirtual KVM that runs only kernels built for it; emulating (TCG)".into()),
        (false, _) => ("tcg".into(), "no usable /dev/kvm; emulating (TCG)".into()),
    }
}

/// A running recovered system; dropping it stops qemu.
pub struct Vm {
    child: Child,
    /// The serial console's Unix socket (connect with `socat - UNIX-CONNECT:PATH`).
    pub console_socket: PathBuf,
    /// Everything the console printed.
    pub console_log: PathBuf,
    /// The QMP socket.
    pub qmp_socket: PathBuf,
    /// The accelerator in use and why.
    pub accel: (String, String),
    started: Instant,
}

impl Vm {
    /// Starts qemu for `spec` (the qemu binary may be overridden with `DRMESH_QEMU`).
    pub fn start(spec: &VmSpec) -> Result<Vm, VmError> {
        Vm::launch(spec, false)
    }

    /// Like [`Vm::start`], but qemu gets SIGKILL when the calling thread ends
    /// (`PR_SET_PDEATHSIG`), also when this process is killed: for a VM that
    /// must not outlive its caller (a drill). Keep the [`Vm`] on that thread.
    pub fn start_bound_to_thread(spec: &VmSpec) -> Result<Vm, VmError> {
        Vm::launch(spec, true)
    }

    fn launch(spec: &VmSpec, bound: bool) -> Result<Vm, VmError> {
        let program = std::env::var("DRMESH_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        let fail = |cause: String| VmError::Start { program: program.clone(), cause };
        {
            use std::os::unix::fs::DirBuilderExt;
            match fs::DirBuilder::new().mode(0o700).create(&spec.run_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(format!("cannot make {}: {e}", spec.run_dir.display()))),
            }
        }
        let console_socket = spec.run_dir.join("console.sock");
        let console_log = spec.run_dir.join("console.log");
        let qmp_socket = spec.run_dir.join("qmp.sock");
        for stale in [&console_socket, &console_log, &qmp_socket] {
            let _ = fs::remove_file(stale);
        }
        let accel = choose_accel(spec.accel.as_deref());
        // The disk is `disk0` (QMP names it so); PCI slots are pinned so the guest
        // names its NIC ens3 (slot 3) whatever the disk controller.
        let drive = match spec.bus {
            DiskBus::Ide => format!("{},id=disk0,if=ide,cache=writeback", spec.drive),
            DiskBus::Virtio | DiskBus::Sata => format!("{},id=disk0,if=none,cache=writeback", spec.drive),
        };
        let mut cmd = Command::new(&program);
        cmd.args(["-nodefaults", "-display", "none", "-no-user-config", "-accel", &accel.0, "-machine", "pc"])
            .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()])
            .arg("-chardev")
            .arg(format!("socket,id=con0,path={},server=on,wait=off,logfile={},logappend=on", console_socket.display(), console_log.display()))
            .args(["-serial", "chardev:con0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .arg("-pidfile")
            .arg(spec.run_dir.join("qemu.pid"))
            .args(["-drive", &drive]);
        match spec.bus {
            DiskBus::Virtio => {
                cmd.args(["-device", "virtio-blk-pci,drive=disk0,addr=0x4,bootindex=0"]);
            }
            DiskBus::Sata => {
                cmd.args(["-device", "ahci,id=ahci0,addr=0x4", "-device", "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0"]);
            }
            DiskBus::Ide => {}
        }
        match spec.network {
            Network::None => {}
            Network::UserRestricted => {
                cmd.args(["-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0,addr=0x3"]);
            }
            Network::User => {
                cmd.args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,addr=0x3"]);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if bound {
            die_with_thread(&mut cmd);
        }
        let child = cmd.spawn().map_err(|e| fail(if e.kind() == std::io::ErrorKind::NotFound { "not installed (Debian: qemu-system-x86)".into() } else { e.to_string() }))?;
        let mut vm = Vm { child, console_socket, console_log, qmp_socket, accel, started: Instant::now() };
        // qemu makes its sockets right away; an early exit is a bad command line or drive.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(vm.qmp_socket.exists() && vm.console_socket.exists()) {
            if let Ok(Some(status)) = vm.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = vm.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(fail(format!("qemu exited at start ({status}): {}", err.trim())));
            }
            if Instant::now() > deadline {
                return Err(fail("qemu made no sockets within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(vm)
    }

    /// Time since qemu started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether qemu is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `lines` lines the console printed.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.console_log, lines)
    }

    /// Waits until the console shows one of `markers` (boot done), or a kernel
    /// panic, an emergency shell or the end of qemu, or `timeout` passes.
    /// Returns the time from qemu's start to the marker.
    pub fn wait_for_boot(&mut self, markers: &[&str], timeout: Duration) -> Result<Duration, VmError> {
        const FAILURES: [(&str, &str); 5] = [
            ("Kernel panic", "the kernel panicked"),
            ("emergency mode", "systemd entered emergency mode"),
            ("Dropping to a shell", "the initramfs dropped to a shell (root filesystem not found)"),
            ("Give root password for maintenance", "the system stopped for maintenance"),
            ("(initramfs)", "the initramfs dropped to a shell (root filesystem not found)"),
        ];
        let fail: Vec<&str> = FAILURES.iter().map(|(m, _)| *m).collect();
        let (event, after) = self.wait_for_console(markers, &fail, timeout);
        let reason = match event {
            ConsoleEvent::Ok { .. } => return Ok(after),
            ConsoleEvent::Failed { index, .. } => FAILURES.get(index).map_or("the boot failed", |(_, why)| why).to_string(),
            ConsoleEvent::Exited => "qemu exited".into(),
            ConsoleEvent::TimedOut => format!("no boot marker ({}) within {} s", markers.join(" or "), timeout.as_secs()),
        };
        Err(VmError::NoBoot { reason, tail: self.console_tail(40) })
    }

    /// Watches the console until it prints one of `ok` or one of `fail`
    /// (whichever comes first in the console), qemu exits, or `timeout`
    /// passes. Returns what happened and the time since qemu started. After a
    /// `fail` marker it waits up to 2 s for the rest of that console line
    /// (a panic message follows its "Kernel panic" prefix).
    pub fn wait_for_console(&mut self, ok: &[&str], fail: &[&str], timeout: Duration) -> (ConsoleEvent, Duration) {
        let deadline = Instant::now() + timeout;
        let mut seen = String::new();
        let mut offset = 0u64;
        loop {
            self.read_console(&mut offset, &mut seen);
            match (first_of(&seen, ok), first_of(&seen, fail)) {
                (Some((ok_at, index)), fail_at) if fail_at.is_none_or(|(f, _)| ok_at <= f) => {
                    return (ConsoleEvent::Ok { index, line: line_at(&seen, ok_at) }, self.started.elapsed());
                }
                (_, Some((at, index))) => {
                    let after = self.started.elapsed();
                    let line_wait = Instant::now() + Duration::from_secs(2);
                    while !seen[at..].contains('\n') && Instant::now() < line_wait && self.running() {
                        std::thread::sleep(Duration::from_millis(100));
                        self.read_console(&mut offset, &mut seen);
                    }
                    return (ConsoleEvent::Failed { index, line: line_at(&seen, at) }, after);
                }
                _ => {}
            }
            if !self.running() {
                // The console may hold a last word written just before the exit.
                let after = self.started.elapsed();
                self.read_console(&mut offset, &mut seen);
                if let Some((at, index)) = first_of(&seen, fail) {
                    return (ConsoleEvent::Failed { index, line: line_at(&seen, at) }, after);
                }
                return (ConsoleEvent::Exited, after);
            }
            if Instant::now() > deadline {
                return (ConsoleEvent::TimedOut, self.started.elapsed());
            }
            // Keep only what a marker could still be split across.
            if seen.len() > 1 << 16 {
                let cut = seen.len() - 4096;
                let cut = (cut..seen.len()).find(|i| seen.is_char_boundary(*i)).unwrap_or(seen.len());
                seen.drain(..cut);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Appends what the console printed since `offset` to `seen`.
    fn read_console(&self, offset: &mut u64, seen: &mut String) {
        if let Ok(mut f) = fs::File::open(&self.console_log) {
            if f.seek(SeekFrom::Start(*offset)).is_ok() {
                let mut chunk = Vec::new();
                if f.read_to_end(&mut chunk).is_ok() {
                    *offset += chunk.len() as u64;
                    seen.push_str(&String::from_utf8_lossy(&chunk));
                }
            }
        }
    }

    /// Asks the guest to power off (ACPI), then stops qemu after `grace`.
    pub fn stop(mut self, grace: Duration) {
        if let Ok(mut q) = qmp::Qmp::connect(&self.qmp_socket) {
            let _ = q.execute("system_powerdown", serde_json::json!({}));
        }
        let deadline = Instant::now() + grace;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for qemu to exit by itself (the guest powered off).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in [&self.console_socket, &self.qmp_socket] {
            let _ = fs::remove_file(f);
        }
    }
}

/// What [`Vm::wait_for_console`] saw first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The console printed `ok[index]`; `line` is the console line holding it.
    Ok {
        /// Which marker.
        index: usize,
        /// The line it is on, control characters removed.
        line: String,
    },
    /// The console printed `fail[index]`; `line` is the console line holding it.
    Failed {
        /// Which marker.
        index: usize,
        /// The line it is on, control characters removed.
        line: String,
    },
    /// qemu exited before any marker.
    Exited,
    /// The time ran out before any marker.
    TimedOut,
}

/// The earliest of `markers` in `text`: (its position, its index).
fn first_of(text: &str, markers: &[&str]) -> Option<(usize, usize)> {
    markers.iter().enumerate().filter_map(|(i, m)| text.find(m).map(|at| (at, i))).min()
}

/// The line of `text` that holds byte `at`, control characters removed.
fn line_at(text: &str, at: usize) -> String {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text[start..end].chars().filter(|c| *c == '\t' || !c.is_control()).collect::<String>().trim().to_string()
}

/// Makes the child `cmd` starts receive SIGKILL when the calling thread ends.
fn die_with_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the async-signal-safe prctl and getppid system calls; it allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The last `lines` lines of a console log, control characters made visible.
pub fn console_tail(log: &Path, lines: usize) -> String {
    let text = fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let clean: String = text.chars().filter(|c| *c == '\n' || *c == '\t' || !c.is_control()).collect();
    let all: Vec<&str> = clean.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
