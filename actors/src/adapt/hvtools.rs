//! Hypervisor guest tools (VMware, Hyper-V, Xen) are disabled, not
//! uninstalled: their systemd enablement symlinks under
//! /etc/systemd/system/*.wants/ and *.requires/ are removed. On the VM's
//! hypervisor they would fail, spin or spam the log; `systemctl enable UNIT`
//! brings one back.

use super::report::{Action, Area, Report};
use super::rootdir::{EntryKind, RootDir};

/// Units of hypervisor guest tools, by the names their packages install.
pub const HYPERVISOR_UNITS: &[&str] = &[
    // VMware: open-vm-tools (Debian/Ubuntu, RHEL names) and the legacy VMware Tools.
    "open-vm-tools.service",
    "vmtoolsd.service",
    "vgauth.service",
    "vgauthd.service",
    "VGAuthService.service",
    "run-vmblock\\x2dfuse.mount",
    "vmware-tools.service",
    "vmware-tools-thinprint.service",
    "vmware-vmblock-fuse.service",
    // Hyper-V daemons (Debian hyperv-daemons, RHEL names).
    "hv-kvp-daemon.service",
    "hv-vss-daemon.service",
    "hv-fcopy-daemon.service",
    "hypervkvpd.service",
    "hypervvssd.service",
    "hypervfcopyd.service",
    "hv_kvp_daemon.service",
    "hv_vss_daemon.service",
    "hv_fcopy_daemon.service",
    // Xen / XenServer / XCP-ng guest utilities.
    "xe-linux-distribution.service",
    "xe-daemon.service",
    "xen-guest-agent.service",
];

const SYSTEM: &str = "etc/systemd/system";

/// Removes the enablement symlinks of [`HYPERVISOR_UNITS`] and reports each.
pub(crate) fn disable_hypervisor_tools(root: &RootDir, report: &mut Report) {
    let area = Area::HypervisorTools;
    let dirs = match root.list(SYSTEM) {
        Ok(Some(d)) => d,
        Ok(None) => {
            report.push(area, Action::Checked, Some("/etc/systemd/system"), "not there (no systemd): nothing enabled");
            return;
        }
        Err(e) => {
            report.push(area, Action::Failed, Some("/etc/systemd/system"), format!("cannot list it: {e}"));
            return;
        }
    };
    let mut removed = 0;
    for dir in dirs.iter().filter(|d| d.kind == EntryKind::Dir && (d.name.ends_with(".wants") || d.name.ends_with(".requires"))) {
        let folder = format!("{SYSTEM}/{}", dir.name);
        let entries = match root.list(&folder) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                report.push(area, Action::Failed, Some(&format!("/{folder}")), format!("cannot list it: {e}"));
                continue;
            }
        };
        for entry in entries.iter().filter(|e| HYPERVISOR_UNITS.contains(&e.name.as_str())) {
            let path = format!("{folder}/{}", entry.name);
            let shown = format!("/{path}");
            if entry.kind != EntryKind::Symlink {
                report.push(area, Action::LeftAlone, Some(&shown), "not a symlink, so not an enablement systemctl made");
                continue;
            }
            let target = root.read_link(&path).unwrap_or_else(|_| "?".into());
            match root.unlink(&path) {
                Ok(()) => {
                    removed += 1;
                    let unit = entry.name.as_str();
                    report.push(area, Action::Changed, Some(&shown), format!("removed (it pointed to {target}); the unit stays installed: systemctl enable {unit} turns it back on"));
                }
                Err(e) => report.push(area, Action::Failed, Some(&shown), format!("cannot remove it: {e}")),
            }
        }
    }
    if removed == 0 {
        report.push(area, Action::Checked, None, "no VMware, Hyper-V or Xen guest tools are enabled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn removes_only_hypervisor_links() {
        let dir = tempfile::tempdir().unwrap();
        let wants = dir.path().join("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        symlink("/lib/systemd/system/open-vm-tools.service", wants.join("open-vm-tools.service")).unwrap();
        symlink("/lib/systemd/system/ssh.service", wants.join("ssh.service")).unwrap();
        let req = dir.path().join("etc/systemd/system/sysinit.target.requires");
        std::fs::create_dir_all(&req).unwrap();
        symlink("/lib/systemd/system/hv-kvp-daemon.service", req.join("hv-kvp-daemon.service")).unwrap();
        let root = RootDir::open(dir.path()).unwrap();
        let mut report = Report::default();
        disable_hypervisor_tools(&root, &mut report);
        assert!(!wants.join("open-vm-tools.service").is_symlink());
        assert!(!req.join("hv-kvp-daemon.service").is_symlink());
        assert!(wants.join("ssh.service").is_symlink());
        assert_eq!(report.find(Area::HypervisorTools, Action::Changed).count(), 2);
    }
}
