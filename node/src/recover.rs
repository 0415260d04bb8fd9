//! `drmesh restore` and `drmesh verify`: ask the running node to rebuild or
//! check a recovery point, with a progress bar.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};

use crate::admin::{Request, SOCKET_FILE};
use crate::ctl::{bytes, request_with_progress};

/// Arguments shared by restore and verify.
#[derive(clap::Args, Debug)]
pub struct RpArgs {
    /// The recovery point: VOLUME@SEQ, or VOLUME for the newest.
    rp: String,
    /// State directory of the local node (its admin socket does the work).
    #[arg(long, env = "DRMESH_STATE_DIR")]
    state_dir: PathBuf,
    /// Read the RP from this node instead of the local store (or the volume's targets).
    #[arg(long)]
    from: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `drmesh restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Image file to write (raw); written as PATH.partial and renamed when verified.
    #[arg(long)]
    to: PathBuf,
}

/// Splits VOLUME@SEQ.
pub fn parse_rp(text: &str) -> anyhow::Result<(String, Option<u64>)> {
    match text.split_once('@') {
        None => Ok((text.to_string(), None)),
        Some((v, "latest")) => Ok((v.to_string(), None)),
        Some((v, seq)) => {
            let seq = seq.parse().with_context(|| format!("{text:?}: the part after @ must be a sequence number (or \"latest\")"))?;
            Ok((v.to_string(), Some(seq)))
        }
    }
}

fn run_with_progress(args: &RpArgs, request: Request, verb: &str) -> anyhow::Result<ExitCode> {
    let socket = args.state_dir.join(SOCKET_FILE);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} blocks {percent}% ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{verb} {}", args.rp));
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let response = request_with_progress(&socket, &request, |p| {
        bar.set_length(p["total"].as_u64().unwrap_or(0));
        bar.set_position(p["done"].as_u64().unwrap_or(0));
    })?;
    bar.finish_and_clear();
    if !response.ok {
        bail!("{verb} {} failed: {}", args.rp, response.error.unwrap_or_default());
    }
    let data = response.data.unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        let rp = &data["rp"];
        println!(
            "{verb} {}@{} OK: {} blocks ({} zero), {} read in {:.1}s, Merkle root verified",
            rp["volume"].as_str().unwrap_or_default(),
            rp["seq"],
            data["blocks"],
            data["zero_blocks"],
            bytes(data["payload_bytes"].as_u64().unwrap_or(0)),
            data["duration_secs"].as_f64().unwrap_or(0.0)
        );
        if let Some(out) = data["output"].as_str() {
            println!("image written to {out} ({})", bytes(rp["volume_bytes"].as_u64().unwrap_or(0)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drmesh restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let (volume, seq) = parse_rp(&args.rp.rp)?;
    let to = std::path::absolute(&args.to).with_context(|| format!("resolving {}", args.to.display()))?;
    let request = Request::Restore { volume, seq, to, from: args.rp.from.clone() };
    run_with_progress(&args.rp, request, "restore")
}

/// Runs `drmesh verify`.
pub fn verify(args: RpArgs) -> anyhow::Result<ExitCode> {
    let (volume, seq) = parse_rp(&args.rp)?;
    let request = Request::Verify { volume, seq, from: args.from.clone() };
    run_with_progress(&args, request, "verify")
}
