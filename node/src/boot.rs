//! `drmesh recover VOLUME@SEQ --boot`: instant recovery of a whole server. The
//! RP is exported (writes to an overlay), optionally adapted to the VM
//! (`--adapt`), booted in qemu (isolated network unless asked), and, with
//! `--then-restore-to DEV`, copied to a local device while the VM runs (qemu's
//! mirror job), after which the VM is switched to the device.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use drmesh_actors::restore::dest::Destination;
use drmesh_actors::restore::Rules;
use drmesh_actors::vm::qmp::Qmp;
use drmesh_actors::vm::{DiskBus, Network, Vm, VmSpec};
use serde_json::{json, Value};

use crate::export::{serve, ExportRequest};
use crate::recover::{parse_rp, RpArgs};

/// The name the guest gives its NIC: qemu's PCI slot 3 on the pc machine
/// (the VM pins the NIC there).
const VM_NIC: &str = "ens3";

/// Arguments of `drmesh recover`.
#[derive(clap::Args, Debug)]
pub struct RecoverArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Boot the recovery point in a virtual machine (qemu) before any restore.
    #[arg(long)]
    boot: bool,
    /// Adapt the image to the VM first, on the overlay only (fstab to UUIDs,
    /// network to DHCP, virtio drivers in the initramfs, hypervisor tools off).
    #[arg(long)]
    adapt: bool,
    /// What the source server called the recovered disk (for fstab entries that
    /// name devices, such as /dev/sda1).
    #[arg(long, default_value = "/dev/sda")]
    source_disk: String,
    /// The guest's network: none (no NIC, the default), restricted (a NIC with
    /// DHCP and no route out), user (DHCP and outbound access through the host).
    #[arg(long, default_value = "none")]
    net: String,
    /// Disk controller: virtio (default with --adapt), ide (default without), sata.
    #[arg(long)]
    disk_bus: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Accelerator: kvm or tcg (default: KVM when hardware-assisted KVM is usable).
    #[arg(long)]
    accel: Option<String>,
    /// Keep the VM's writes in this overlay file (default: a temporary one).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Copy the whole RP (and the VM's writes) to this block device while the VM
    /// runs, then switch the VM to it (live restore).
    #[arg(long)]
    then_restore_to: Option<PathBuf>,
    /// Overwrite a --then-restore-to device that holds a filesystem or partition table.
    #[arg(long)]
    force: bool,
    /// Text on the serial console that means "booted" (repeatable; default "login:").
    #[arg(long = "marker")]
    markers: Vec<String>,
    /// Seconds to wait for a marker.
    #[arg(long, default_value_t = 600)]
    boot_timeout: u64,
    /// Stop the VM once it booted (and the live restore, if any, finished): a boot check.
    #[arg(long)]
    until_booted: bool,
}

/// Checks that `device` may take the RP (as a restore would) before qemu writes it.
fn check_live_restore_target(args: &RecoverArgs, device: &Path, volume_bytes: u64) -> anyhow::Result<()> {
    let meta = std::fs::metadata(device).with_context(|| format!("--then-restore-to {}", device.display()))?;
    if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        bail!("--then-restore-to {} must be a block device (use `drmesh restore` for files)", device.display());
    }
    let topology = crate::recover::offline_topology(&args.rp).ok().flatten();
    let me = drmesh_transport::Identity::load(&args.rp.state_dir).ok().and_then(|id| topology.as_ref().and_then(|t| t.node_by_id(&id.node_id()).map(|n| n.name.clone())));
    let rules = match (&topology, me) {
        (Some(t), Some(me)) => Rules::for_node(t, &me, args.force),
        _ => Rules { force: args.force, protected: Vec::new() },
    };
    // Opened exclusively and closed again: every check a restore makes, nothing written.
    drop(Destination::prepare(device, volume_bytes, &rules, None)?);
    Ok(())
}

/// Mirrors the running disk to `device` and switches the VM to it once in sync.
fn live_restore(vm: &Vm, device: &Path, json_out: bool) -> anyhow::Result<Value> {
    let mut qmp = Qmp::connect(&vm.qmp_socket)?;
    qmp.execute("drive-mirror", json!({ "device": "disk0", "job-id": "live-restore", "target": device.display().to_string(), "format": "raw", "mode": "existing", "sync": "full" }))?;
    let started = std::time::Instant::now();
    let mut last_print = std::time::Instant::now();
    loop {
        let jobs = qmp.execute("query-block-jobs", json!({}))?;
        let job = jobs.as_array().and_then(|a| a.iter().find(|j| j["device"] == "live-restore").cloned());
        let Some(job) = job else { bail!("the live restore job ended before it was in sync (qemu's log may say why)") };
        let (done, total) = (job["offset"].as_u64().unwrap_or(0), job["len"].as_u64().unwrap_or(0));
        if job["ready"] == true {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = std::time::Instant::now();
            if json_out {
                println!("{}", json!({ "progress": { "phase": "live restore", "done_bytes": done, "total_bytes": total } }));
            } else {
                eprintln!("live restore to {}: {} of {} ({:.0}%)", device.display(), crate::ctl::bytes(done), crate::ctl::bytes(total), 100.0 * done as f64 / total.max(1) as f64);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let synced_secs = started.elapsed().as_secs_f64();
    qmp.execute("block-job-complete", json!({ "device": "live-restore" }))?;
    // The switch is done when the job is gone and the disk reads the device.
    for _ in 0..100 {
        let jobs = qmp.execute("query-block-jobs", json!({}))?;
        if jobs.as_array().is_none_or(|a| a.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let blocks = qmp.execute("query-block", json!({}))?;
    let file = blocks.as_array().and_then(|a| a.iter().find(|b| b["device"] == "disk0")).map(|b| b["inserted"]["file"].as_str().unwrap_or("").to_string()).unwrap_or_default();
    if !file.contains(&device.display().to_string()) {
        bail!("the VM was not switched to {} (its disk is {file})", device.display());
    }
    Ok(json!({ "device": device, "synced_secs": synced_secs, "switched": true }))
}

/// Removes a folder when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Folder of `recover` runs inside a state dir (`NAME-PID/`: console, sockets, adaptation mounts).
pub const RUNS_DIR: &str = "recover";

/// Cleans up after `recover` runs that were killed: their qemu and nbdfuse
/// are stopped, the mounts and loop devices of an interrupted adaptation are
/// released, and their folders removed (see [`crate::drill::cleanup`]). Runs
/// of live processes are left alone. Returns the folders removed.
pub fn clean_stale_runs(state_dir: &Path) -> Vec<PathBuf> {
    crate::drill::cleanup::clean_stale_runs(&state_dir.join(RUNS_DIR))
}

/// Runs `drmesh recover`.
pub fn run(args: RecoverArgs) -> anyhow::Result<ExitCode> {
    if !args.boot {
        bail!("say what to do: --boot (boot the recovery point in a VM); to copy it, use `drmesh restore`");
    }
    let (volume, seq) = parse_rp(&args.rp.rp)?;
    for dir in clean_stale_runs(&args.rp.state_dir) {
        eprintln!("cleaned up after an interrupted recover in {}", dir.display());
    }
    let network = match args.net.as_str() {
        "none" => Network::None,
        "restricted" => Network::UserRestricted,
        "user" => Network::User,
        other => bail!("--net {other}: expected none, restricted or user"),
    };
    let bus = match &args.disk_bus {
        Some(b) => DiskBus::parse(b).with_context(|| format!("--disk-bus {b}: expected virtio, ide or sata"))?,
        None if args.adapt => DiskBus::Virtio,
        None => DiskBus::Ide,
    };
    let overlay = args.overlay.as_ref().map(std::path::absolute).transpose()?;
    let request = ExportRequest { volume, seq, from: args.rp.from.clone(), socket: None, listen: None, overlay, read_only: false };
    let served = serve(&args.rp, &request)?;
    let info = served.info().clone();
    let name = info["name"].as_str().unwrap_or("rp").to_string();
    let say = |text: String| {
        if !args.rp.json {
            println!("{text}");
        }
    };
    say(format!("exported {name} over NBD ({}); the VM's writes go to an overlay, never to the recovery point", info["uri"].as_str().unwrap_or("")));
    if let Some(device) = &args.then_restore_to {
        check_live_restore_target(&args, device, info["size_bytes"].as_u64().unwrap_or(0))?;
    }
    let run_dir = args.rp.state_dir.join(RUNS_DIR).join(format!("{}-{}", name.replace('/', "_"), std::process::id()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&run_dir).with_context(|| format!("making {}", run_dir.display()))?;
    }
    // Removed last (after the VM and the export are gone), whatever way this returns.
    let _run_dir_guard = RemoveOnDrop(run_dir.clone());
    let adaptation = if args.adapt {
        say(format!("adapting the image for the VM (on the overlay; source disk {}, VM NIC {VM_NIC})...", args.source_disk));
        let started = std::time::Instant::now();
        let (report, text) = crate::adapt::adapt_export(info["uri"].as_str().unwrap_or(""), &run_dir.join("adapt"), &args.source_disk, VM_NIC)?;
        say(format!("adapted in {:.1} s:\n{text}", started.elapsed().as_secs_f64()));
        Some(report)
    } else {
        None
    };
    let drive = info["qemu_drive"].as_str().unwrap_or("").to_string();
    let spec = VmSpec { drive, bus, memory_mib: args.memory, cpus: args.cpus, network, run_dir: run_dir.clone(), accel: args.accel.clone() };
    let mut vm = Vm::start(&spec)?;
    say(format!("booting {name} in qemu ({}: {}), disk on {}, network {}", vm.accel.0, vm.accel.1, bus.name(), args.net));
    say(format!("  console: socat -,raw,echo=0 UNIX-CONNECT:{}   (log: {})", vm.console_socket.display(), vm.console_log.display()));
    say(format!("  monitor: {}", vm.qmp_socket.display()));
    let live = match &args.then_restore_to {
        Some(device) => {
            say(format!("live restore to {} while the VM runs...", device.display()));
            let r = live_restore(&vm, device, args.rp.json)?;
            say(format!("live restore done in {:.1} s: the VM now runs from {} (the export is no longer read)", r["synced_secs"].as_f64().unwrap_or(0.0), device.display()));
            Some(r)
        }
        None => None,
    };
    let markers: Vec<String> = if args.markers.is_empty() { vec!["login:".into()] } else { args.markers.clone() };
    let marker_refs: Vec<&str> = markers.iter().map(String::as_str).collect();
    let boot = vm.wait_for_boot(&marker_refs, Duration::from_secs(args.boot_timeout));
    let result = match boot {
        Ok(took) => {
            say(format!("{name} booted: the console showed the marker {:.1} s after qemu started", took.as_secs_f64()));
            json!({ "rp": info["rp"], "booted": true, "boot_secs": took.as_secs_f64(), "accel": vm.accel.0, "disk_bus": bus.name(), "console_log": vm.console_log, "adaptation": adaptation, "live_restore": live })
        }
        Err(e) => {
            if args.rp.json {
                println!("{}", crate::admin::Response::error(e.to_string(), vec![]).line());
            }
            vm.stop(Duration::from_secs(5));
            drop(served);
            bail!("{e}");
        }
    };
    if args.until_booted {
        vm.stop(Duration::from_secs(10));
        if args.rp.json {
            println!("{}", crate::admin::Response::data(&result).line());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.rp.json {
        println!("{}", crate::admin::Response::data(&result).line());
    }
    say("the VM runs until it powers off or this command is stopped (Ctrl-C)".into());
    let _ = vm.wait();
    say("the VM powered off".into());
    Ok(ExitCode::SUCCESS)
}
