//! `drmesh completions SHELL` and `drmesh man --out DIR`: shell completions and
//! manual pages generated from the command line's own definition (clap), so
//! they never drift from what the binary accepts. The package build
//! (scripts/package-deb) runs both with the binary it packages.
//!
//! The pages go into one folder only: it is opened once (refusing a symlink or
//! a non-folder), every page is written to a new temporary file in it
//! (O_EXCL, O_NOFOLLOW) and renamed over its final name, so a planted symlink
//! named like a page is replaced, never followed.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::CommandFactory as _;
use nix::fcntl::{open, openat, renameat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Arguments of `drmesh completions`.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Arguments of `drmesh man`.
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// The folder to write the pages into (made if missing, its parent must
    /// exist); pages of the same names are replaced, nothing else is touched.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `drmesh completions SHELL`: the script on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = without_hidden(&crate::Cli::command()).version(env!("CARGO_PKG_VERSION")).propagate_version(true);
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "drmesh", &mut out);
    out.flush().context("writing the completion script to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// `cmd` with its hidden subcommands left out, at every level: clap_complete
/// offers hidden subcommands (`drill-worker`, `man`) like the others.
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out = out.args(cmd.get_arguments().cloned());
    out.subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(without_hidden))
}

/// Runs `drmesh man --out DIR`: drmesh.1 and one page per visible
/// subcommand at every level (drmesh-ctl.1, drmesh-ctl-status.1, ...).
pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let dir = open_out_dir(&args.out)?;
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    // Gives every subcommand its display name ("drmesh-ctl-status"): the page's name and title.
    cmd.build();
    let mut pages = Vec::new();
    render_all(&cmd, &mut pages)?;
    for (name, text) in &pages {
        write_page(&dir, &args.out, name, text)?;
        println!("{}", args.out.join(name).display());
    }
    eprintln!("wrote {} manual pages to {}", pages.len(), args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Renders `cmd`'s page and those of its visible subcommands, depth first.
fn render_all(cmd: &clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).source(concat!("drmesh ", env!("CARGO_PKG_VERSION"))).manual("drmesh manual");
    let mut text = Vec::new();
    man.render(&mut text).with_context(|| format!("rendering the page of {}", cmd.get_display_name().unwrap_or(cmd.get_name())))?;
    pages.push((man.get_filename(), text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_all(sub, pages)?;
    }
    Ok(())
}

/// Opens the output folder, making it if missing; refuses a symlink or anything but a folder.
fn open_out_dir(path: &Path) -> anyhow::Result<OwnedFd> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!("{} is a symlink; give the real folder to write the manual pages into", path.display()),
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a folder", path.display()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(path).with_context(|| format!("cannot create the folder {}", path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    // O_NOFOLLOW: a symlink swapped in since the check above is refused too.
    open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .with_context(|| format!("cannot open the folder {} (a symlink or not a folder?)", path.display()))
}

/// Writes one page: a new temporary file in the folder, fsynced, renamed over `name`.
fn write_page(dir: &OwnedFd, shown: &Path, name: &str, text: &[u8]) -> anyhow::Result<()> {
    let final_path = shown.join(name);
    let tmp = format!(".{name}.tmp");
    // A leftover of an interrupted run (a file or a symlink: unlinking removes the link itself).
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => bail!("cannot remove the leftover {}: {e}", shown.join(&tmp).display()),
    }
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", shown.join(&tmp).display()))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(text).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", shown.join(&tmp).display()))?;
    renameat(dir, tmp.as_str(), dir, name).map_err(|e| {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        anyhow::anyhow!("cannot put {} in place: {e}", final_path.display())
    })?;
    Ok(())
}
