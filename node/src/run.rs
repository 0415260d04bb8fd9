//! `drmesh run`: start the node and keep it running until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use actix::Actor;
use anyhow::Context as _;
use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::actor::gossip::{GossipActor, Shutdown as GossipShutdown};
use drmesh_actors::actor::mesh::{MeshActor, Shutdown, StreamService};
use drmesh_actors::actor::volumes::{SetGossip, VolumeScheduler};
use drmesh_actors::source::baseline::Baselines;
use drmesh_actors::store::Store;
use drmesh_transport::identity::ensure_private_dir;
use drmesh_transport::Identity;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{self, AdminContext};
use crate::reload::{absolute, load_topology, Reloader};

/// Arguments of `drmesh run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The node's state directory, made by `drmesh init`.
    #[arg(long)]
    state_dir: PathBuf,
    /// The topology file (the same file on every node).
    #[arg(long)]
    topology: PathBuf,
}

/// Runs `drmesh run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let identity = Arc::new(Identity::load(&args.state_dir)?);
    ensure_private_dir(&args.state_dir)?;
    let topology_path = absolute(&args.topology);
    let topology = load_topology(&topology_path, &identity.node_id())?;
    let topology = Arc::new(topology);
    let name = topology.node_by_id(&identity.node_id()).map(|n| n.name.clone());
    tracing::info!(
        node = name.as_deref().unwrap_or("?"),
        id = %identity.node_id(),
        topology = %topology_path.display(),
        version = topology.mesh.version,
        "starting drmesh node"
    );

    // Before opening anything exclusive: a second node on this state dir is told so plainly.
    admin::check_not_running(&args.state_dir)?;
    // `drmesh restore` without a running node finds the topology (policy keys,
    // protected sources) through this note.
    crate::recover::remember_topology_path(&args.state_dir, &topology_path);
    for removed in drmesh_actors::restore::Journal::new(&args.state_dir).clean() {
        tracing::info!(path = %removed.display(), "removed the temporary file of an interrupted restore");
    }
    for removed in crate::boot::clean_stale_runs(&args.state_dir) {
        tracing::info!(path = %removed.display(), "cleaned up after an interrupted recover");
    }
    let store = Arc::new(Store::open(&args.state_dir.join("store")).context("opening the store")?);
    let baselines = Arc::new(Baselines::open(&args.state_dir.join("source.redb")).context("opening the source baselines")?);
    // A node killed between a cycle's `pre` and `post` hooks owes the `post`: run before any cycle.
    drmesh_actors::source::hooks::OwedPosts::of(&baselines).run_all();
    let data = Arc::new(DataPlane::new(store, topology.clone(), identity.node_id()));

    let system = actix::System::new();
    let socket_path = system.block_on(async {
        // The admin socket first: it is how a second node on this state dir is caught.
        let (listener, socket_path) = admin::bind(&args.state_dir)?;
        let service: Arc<dyn StreamService> = Arc::new(data.clone());
        let mesh = match MeshActor::start_with(identity.clone(), topology.clone(), Some(service)) {
            Ok(mesh) => mesh,
            Err(e) => {
                let _ = std::fs::remove_file(&socket_path);
                return Err(e.into());
            }
        };
        let gossip = match GossipActor::start_with(&args.state_dir, identity.node_id(), data.clone(), mesh.clone()) {
            Ok(gossip) => gossip,
            Err(e) => {
                let _ = std::fs::remove_file(&socket_path);
                return Err(e.into());
            }
        };
        let scheduler = VolumeScheduler::new(identity.node_id(), topology.clone(), mesh.clone(), baselines.clone(), data.link_pacers().clone()).start();
        scheduler.do_send(SetGossip(gossip.clone()));
        let reloader =
            Reloader::new(topology_path.clone(), identity.node_id(), topology.clone(), mesh.clone(), scheduler.clone(), data.clone()).start();
        crate::scrub::start(data.clone(), mesh.clone(), gossip.clone());
        crate::gc::start(data.clone());
        let drills = crate::drill::runner::DrillRunner::new(data.clone(), gossip.clone(), args.state_dir.clone()).start();
        let admin_ctx = AdminContext { mesh: mesh.clone(), reloader, scheduler, data: data.clone(), gossip: gossip.clone(), state_dir: args.state_dir.clone(), drills };
        crate::http::start(admin_ctx.clone());
        actix_rt::spawn(admin::serve(listener, admin_ctx));
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        actix_rt::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = which, "stopping");
            crate::readiness::stopping();
            let _ = gossip.send(GossipShutdown).await;
            let _ = mesh.send(Shutdown).await;
            actix::System::current().stop();
        });
        tracing::info!(socket = %socket_path.display(), "admin socket ready");
        crate::readiness::ready(&format!("node {} serving; admin socket {}", name.as_deref().unwrap_or("?"), socket_path.display()));
        anyhow::Ok(socket_path)
    })?;
    let result = system.run();
    if let Err(e) = std::fs::remove_file(&socket_path) {
        tracing::warn!(socket = %socket_path.display(), error = %e, "cannot remove admin socket");
    }
    result.context("actor system failed")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
