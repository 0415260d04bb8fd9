//! `drmesh store check` and `drmesh store rebuild`: the store of a stopped
//! node, looked at and, when its catalog is damaged or lost, made whole again
//! from the RP manifests and blob files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use drmesh_actors::store::{self, CheckReport, RebuildReport};

/// The store subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum StoreCommand {
    /// Check the store of a stopped node, changing nothing: the catalog's
    /// integrity, every RP manifest against it, every blob header.
    Check(StoreArgs),
    /// Make a new catalog from the RP manifests and blob headers of a stopped
    /// node's store; the old catalog is kept aside.
    Rebuild(StoreArgs),
}

/// Where the store is, and how to print.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// State directory of the node (its store is `<state dir>/store`).
    #[arg(long, env = "DRMESH_STATE_DIR")]
    state_dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a store subcommand.
pub fn run(command: StoreCommand) -> anyhow::Result<ExitCode> {
    match command {
        StoreCommand::Check(args) => check(&args),
        StoreCommand::Rebuild(args) => rebuild(&args),
    }
}

/// The store folder of `state_dir`, refused while a node runs there (it holds
/// the catalog; its copy in memory would outlive a rebuild, and a check would
/// race its commits).
fn stopped_store(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(state_dir).with_context(|| format!("state dir {}", state_dir.display()))?;
    if !meta.is_dir() {
        bail!("state dir {} is not a folder", state_dir.display());
    }
    let socket = state_dir.join(crate::admin::SOCKET_FILE);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!(
            "a drmesh node is running with state dir {} (its admin socket answers): stop it first; the store commands work on a stopped node's store",
            state_dir.display()
        );
    }
    let dir = state_dir.join("store");
    if !dir.is_dir() {
        bail!("{} holds no store folder (store/): is it a node's state dir?", state_dir.display());
    }
    Ok(dir)
}

/// Runs `work` on the stopped store of `args`, its progress lines on stderr
/// (not with `--json`), then prints its report: JSON, or with `print`.
fn run_on_store<R: serde::Serialize>(
    args: &StoreArgs,
    work: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<R, drmesh_actors::store::StoreError>,
    print: impl FnOnce(&R),
) -> anyhow::Result<R> {
    let dir = stopped_store(&args.state_dir)?;
    let json = args.json;
    let report = work(&dir, &mut |line| {
        if !json {
            eprintln!("{line}");
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(report)
}

fn check(args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let report = run_on_store(args, store::check, print_check)?;
    Ok(if report.is_sound() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_check(report: &CheckReport) {
    if !report.findings.is_empty() {
        let mut table = Table::new();
        table.load_preset(UTF8_BORDERS_ONLY);
        table.set_header(vec!["OBJECT", "PROBLEM"]);
        for f in &report.findings {
            table.add_row(vec![f.object.as_str(), f.problem.as_str()]);
        }
        println!("{table}");
        if report.more_findings > 0 {
            println!("... and {} more problems (--json lists the first {} too)", report.more_findings, store::CHECK_MAX_FINDINGS);
        }
    }
    let problems = report.findings.len() as u64 + report.more_findings;
    let catalog = if report.catalog_sound { "sound" } else { "DAMAGED" };
    println!(
        "catalog {catalog}: {} RPs, {} manifests, {} blob rows, {} blob files without rows (GC removes them); {}",
        report.rps,
        report.manifests,
        report.blobs,
        report.orphan_blob_files,
        match problems {
            0 => "no problems".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        }
    );
    if !report.catalog_sound {
        println!("next: `drmesh store rebuild` with the same --state-dir makes a new catalog (the damaged one is kept aside)");
    }
}

fn rebuild(args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let work = |dir: &Path, progress: &mut dyn FnMut(&str)| {
        progress(&format!("rebuilding the catalog of {} from its RP manifests and blob headers", dir.display()));
        store::rebuild(dir, progress)
    };
    let report = run_on_store(args, work, print_rebuild)?;
    Ok(if report.refused.is_empty() && report.damaged_blobs.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_rebuild(report: &RebuildReport) {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["RP", "MERKLE ROOT", "BLOCKS WITHOUT BLOB"]);
    for rp in &report.rps {
        table.add_row(vec![rp.rp.clone(), rp.merkle_root[..16].to_string(), rp.missing_blocks.to_string()]);
    }
    println!("{table}");
    for f in report.refused.iter().chain(&report.damaged_blobs) {
        println!("left out {}: {}", f.object, f.problem);
    }
    if let Some(aside) = &report.kept_aside {
        println!("the old catalog is kept as {}", aside.display());
    }
    println!(
        "rebuilt: {} RPs listed, {} refused, {} blobs ({} left out), {} drill reports carried over, in {:.1} s",
        report.rps.len(),
        report.refused.len(),
        report.blobs,
        report.damaged_blobs.len(),
        report.drill_reports,
        report.duration_ms as f64 / 1000.0
    );
    if report.rps.iter().any(|r| r.missing_blocks > 0) {
        println!("RPs with blocks without blob fail to restore those blocks until they are repaired");
    }
}
