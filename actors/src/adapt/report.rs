//! What boot adaptation did: every change, every check and everything left
//! alone, with why; as data (serde) and as text for people.

use std::fmt;

use serde::Serialize;

use super::initramfs::KernelCheck;

/// The part of the image an item is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Area {
    /// /etc/fstab.
    Fstab,
    /// Network configuration.
    Network,
    /// Hypervisor guest tools.
    HypervisorTools,
    /// Kernels and their initramfs.
    Initramfs,
    /// Boot loader and kernel command line (checked only).
    Boot,
    /// The report itself.
    Report,
}

impl Area {
    fn title(self) -> &'static str {
        match self {
            Area::Fstab => "fstab",
            Area::Network => "network",
            Area::HypervisorTools => "hypervisor tools",
            Area::Initramfs => "initramfs",
            Area::Boot => "boot loader",
            Area::Report => "report",
        }
    }
}

/// What happened to the thing an item is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// It was changed (a backup is named in the detail where there is one).
    Changed,
    /// It was looked at and needs no change.
    Checked,
    /// It was left as it is, for the reason given.
    LeftAlone,
    /// It may keep the VM from booting or reaching the network; not changed.
    Warning,
    /// A change that was needed could not be made.
    Failed,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Action::Changed => "changed",
            Action::Checked => "checked",
            Action::LeftAlone => "left alone",
            Action::Warning => "WARNING",
            Action::Failed => "FAILED",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// What part of the image.
    pub area: Area,
    /// What happened.
    pub action: Action,
    /// The file inside the image it is about ("/etc/fstab"), if one.
    pub path: Option<String>,
    /// What exactly, and why.
    pub detail: String,
}

/// The outcome of [`super::adapt`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The image root that was adapted (a host path).
    pub root: String,
    /// The VM's NIC name the network was configured for.
    pub vm_nic: String,
    /// Every change, check and thing left alone, in the order done.
    pub items: Vec<Item>,
    /// Each installed kernel and the virtio drivers of its initramfs.
    pub kernels: Vec<KernelCheck>,
    /// Where the text form was written inside the image, if it was.
    pub written_to: Option<String>,
}

impl Report {
    /// Adds an item.
    pub fn push(&mut self, area: Area, action: Action, path: Option<&str>, detail: impl Into<String>) {
        self.items.push(Item { area, action, path: path.map(str::to_string), detail: detail.into() });
    }

    /// The items that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.action == Action::Failed)
    }

    /// The items of one area and action.
    pub fn find(&self, area: Area, action: Action) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(move |i| i.area == area && i.action == action)
    }

    /// The report as text, one line per item, grouped by area.
    pub fn text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "drmesh boot adaptation of {}", self.root)?;
        writeln!(f, "VM network interface: {}", self.vm_nic)?;
        let failed = self.failures().count();
        let changed = self.items.iter().filter(|i| i.action == Action::Changed).count();
        let warned = self.items.iter().filter(|i| i.action == Action::Warning).count();
        writeln!(f, "{changed} changes, {warned} warnings, {failed} failures")?;
        let mut areas: Vec<Area> = self.items.iter().map(|i| i.area).collect();
        areas.sort();
        areas.dedup();
        for area in areas {
            writeln!(f, "\n{}:", area.title())?;
            for item in self.items.iter().filter(|i| i.area == area) {
                match &item.path {
                    Some(p) => writeln!(f, "  {:<10} {p}: {}", item.action.word(), item.detail)?,
                    None => writeln!(f, "  {:<10} {}", item.action.word(), item.detail)?,
                }
            }
        }
        if !self.kernels.is_empty() {
            writeln!(f, "\nkernels:")?;
            for k in &self.kernels {
                writeln!(f, "  {k}")?;
            }
        }
        Ok(())
    }
}
