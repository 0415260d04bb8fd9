//! `drmesh init`: make the node's identity and print what to paste into the topology.

use std::path::PathBuf;
use std::process::ExitCode;

use drmesh_transport::Identity;

/// Arguments of `drmesh init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The node's state directory (created with mode 0700).
    #[arg(long)]
    state_dir: PathBuf,
    /// The node's name in the topology.
    #[arg(long)]
    name: String,
    /// Address other nodes dial to reach this one, host:port (repeatable); omit for a node behind NAT.
    #[arg(long = "address")]
    addresses: Vec<String>,
    /// The node's site, for the printed block.
    #[arg(long, default_value = "main")]
    site: String,
    /// Replace an existing identity. The node id changes: every topology file must be updated.
    #[arg(long)]
    force: bool,
}

/// The `[[node]]` block for a node, ready to paste into a topology file.
pub fn node_block(name: &str, id: &str, addresses: &[String], site: &str) -> String {
    let addresses = if addresses.is_empty() {
        "# no addresses: this node is behind NAT and dials out\n".to_string()
    } else {
        let list: Vec<String> = addresses.iter().map(|a| format!("{a:?}")).collect();
        format!("addresses = [{}]\n", list.join(", "))
    };
    format!("[[node]]\nname = {name:?}\nid = \"{id}\"\n{addresses}site = {site:?}\n")
}

/// Runs `drmesh init`.
pub fn run(args: InitArgs) -> anyhow::Result<ExitCode> {
    let identity = Identity::create(&args.state_dir, &args.name, args.force)?;
    let id = identity.node_id().to_string();
    println!("Created the identity of node \"{}\" in {}", args.name, args.state_dir.display());
    println!("node id: {id}");
    println!();
    println!("Add this block to the topology file of every node:");
    println!();
    print!("{}", node_block(&args.name, &id, &args.addresses, &args.site));
    // What to do next goes to stderr: stdout stays the id and a block to paste.
    let dir = args.state_dir.display();
    eprintln!();
    eprintln!("Next:");
    eprintln!("  1. put the block above in the topology file, the same file on every node");
    eprintln!("     (a first file: examples/two-nodes.toml; every table: docs/topology.md)");
    eprintln!("  2. add a [[volume]] this node reads or keeps, and its [policy.NAME]");
    eprintln!("  3. drmesh topology check FILE");
    eprintln!("  4. drmesh run --state-dir {dir} --topology FILE");
    eprintln!("  5. drmesh ctl --state-dir {dir} status");
    Ok(ExitCode::SUCCESS)
}
