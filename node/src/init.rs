//! `drmesh init`: make the node's identity and print what to paste into the topology.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
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
    eprintln!("  1. a first topology file with this node in it, every other table commented:");
    let mut hint = format!("drmesh topology init FILE --state-dir {dir} --name {}", args.name);
    for a in &args.addresses {
        hint.push_str(&format!(" --address {a}"));
    }
    hint.push_str(&format!(" --site {}", args.site));
    eprintln!("       {hint}");
    eprintln!("     (or put the block above in your file: the same file on every node; docs/topology.md)");
    eprintln!("  2. add a [[volume]] this node reads or keeps, and its [policy.NAME]");
    eprintln!("  3. drmesh topology check FILE");
    eprintln!("  4. drmesh run --state-dir {dir} --topology FILE");
    eprintln!("  5. drmesh ctl --state-dir {dir} status");
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `drmesh topology init`.
#[derive(clap::Args, Debug)]
pub struct TopologyInitArgs {
    /// The file to write (it must not exist).
    file: PathBuf,
    /// The state directory of this node (`drmesh init` made its identity there).
    #[arg(long)]
    state_dir: PathBuf,
    /// This node's name (as given to `drmesh init`).
    #[arg(long)]
    name: String,
    /// The mesh's name.
    #[arg(long, default_value = "main")]
    mesh: String,
    /// Address other nodes dial to reach this one, host:port (repeatable); omit for a node behind NAT.
    #[arg(long = "address")]
    addresses: Vec<String>,
    /// This node's site.
    #[arg(long, default_value = "main")]
    site: String,
}

/// The text of a first topology: `node` (a `[[node]]` block), one policy,
/// and every other table commented out.
pub fn skeleton(mesh: &str, node: &str, site: &str) -> String {
    format!(
        r#"# drmesh topology: the same file on every node of the mesh. Every key is in
# docs/topology.md; `drmesh topology check FILE` says what is wrong, and where.
# A node applies an edit of this file within seconds (hot reload).

[mesh]
name = {mesh:?}
# Raise it with every edit: nodes show which version each runs.
version = 1

# ---- nodes: one [[node]] per drmesh node (`drmesh init` prints its block) ----
{node}# max_drills = 1          # drills at once on this node
# max_cycles = 50          # replication cycles at once (a proxy's disks read at once)
# scrub_every = "7d"       # re-read every blob of the store, repair from other holders
# gc_every = "1d"          # delete blobs no kept recovery point needs
# metrics = "127.0.0.1:9720"      # Prometheus metrics at http://ADDRESS/metrics (off by default)
# status_page = "127.0.0.1:9721"  # read-only status page (loopback only; off by default)

# [[node]]
# name = "hq"
# id = "..."               # from `drmesh init` on that node
# addresses = ["hq.example.net:7400"]
# site = "hq"

# ---- sites: nodes of one site share its uplink (optional) ----
# [[site]]
# name = {site:?}
# uplink = "100Mbit"
#
# [[site]]
# name = "hq"

# ---- volumes: one per protected disk ----
# [[volume]]
# name = "server1-root"
# source = "NODE"            # the node that reads the disk
# kind = "file"              # or "kmod" (device = ..., cow_store = ...)
# path = "/var/lib/libvirt/images/server1.img"
# targets = ["hq"]           # the nodes that keep its recovery points
# policy = "default"
#
# [volume.hooks]             # optional: quiesce an application around each view
# pre = ["/usr/local/bin/quiesce"]
# post = ["/usr/local/bin/resume"]

# ---- policies: how often and how ----
[policy.default]
rpo = "15m"
# block_size = "1MiB"
# compression = "zstd:3"
# encryption_key_file = "/etc/drmesh/keys/default.key"   # 32 random bytes, mode 0600
# retention = {{ keep_last = 24, daily = 7, weekly = 4, coalesce_unchanged = true }}
# bandwidth = {{ limit = "50Mbit" }}
#
# [policy.default.drill]     # prove the recovery points recover
# schedule = "daily 02:00"
# checks = ["fsck", "boot"]
"#
    )
}

/// Runs `drmesh topology init`: writes the skeleton (never over an existing
/// file or through a symlink), checked by the topology parser first.
pub fn topology_init(args: TopologyInitArgs) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&args.state_dir).with_context(|| format!("the identity of this node (run `drmesh init --state-dir {} --name {}` first)", args.state_dir.display(), args.name))?;
    let block = node_block(&args.name, &identity.node_id().to_string(), &args.addresses, &args.site);
    let text = skeleton(&args.mesh, &block, &args.site);
    if let Err(diagnostics) = drmesh_topology::Topology::parse(&text, &args.file) {
        let first = diagnostics.iter().next().map(|d| d.message.clone()).unwrap_or_default();
        bail!("the topology would not be valid with these settings: {first}");
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&args.file).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!("{} exists; topology init never overwrites a file: choose another name, or edit that one", args.file.display()),
        _ => anyhow::anyhow!("cannot create {}: {e}", args.file.display()),
    })?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", args.file.display()))?;
    println!("wrote {}: mesh {:?}, node {:?}, policy \"default\" (RPO 15m); the other tables are commented out", args.file.display(), args.mesh, args.name);
    eprintln!();
    eprintln!("Next:");
    eprintln!("  1. add the [[node]] block `drmesh init` printed on each other node");
    eprintln!("  2. uncomment a [[volume]] and set its source, path and targets");
    eprintln!("  3. drmesh topology check {}", args.file.display());
    eprintln!("  4. copy the file to every node; drmesh run --state-dir {} --topology {}", args.state_dir.display(), args.file.display());
    Ok(ExitCode::SUCCESS)
}
