//! The node's drill runner: drives [`DrillQueue`] with real time and the
//! topology in force, runs each drill in a `drmesh drill-worker` child at low
//! priority under the policy's time limit, keeps the report in the store and
//! hands its summary to gossip.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::actor::gossip::{GossipActor, PublishDrill};
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::drill::{CheckReport, DrillReport};
use drmesh_actors::proto::drill::{DrillJob, DrillPlan, DrillQueue, Trigger};
use drmesh_topology::{DrillCheck, Topology};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{check_configured, cleanup, settings_of, unix_ms, RUNS_DIR};

/// How often schedules are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Time a worker gets past the policy's limit to stop its checks before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(60);
/// Niceness of drill workers (replication keeps the CPU).
const WORKER_NICE: i32 = 10;

/// Who waits for a requested drill.
struct Waiter {
    progress: mpsc::Sender<Value>,
    done: oneshot::Sender<Result<DrillReport, String>>,
}

/// The node's drill runner actor.
pub struct DrillRunner {
    queue: DrillQueue,
    data: Arc<DataPlane>,
    gossip: Addr<GossipActor>,
    state_dir: PathBuf,
    topology: Option<Arc<Topology>>,
    waiters: HashMap<u64, Waiter>,
}

impl DrillRunner {
    /// A runner for the node whose data plane is `data`.
    pub fn new(data: Arc<DataPlane>, gossip: Addr<GossipActor>, state_dir: PathBuf) -> DrillRunner {
        let tz = jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC);
        DrillRunner { queue: DrillQueue::new(1, tz), data, gossip, state_dir, topology: None, waiters: HashMap::new() }
    }

    fn me(&self, topology: &Topology) -> Option<String> {
        topology.node_by_id(&self.data.local()).map(|n| n.name.clone())
    }

    /// The volumes this node drills: it is a target, the policy drills, and
    /// the policy's drill nodes (if named) include it.
    fn plans(&self, topology: &Topology) -> Vec<DrillPlan> {
        let Some(me) = self.me(topology) else { return Vec::new() };
        topology
            .volumes
            .iter()
            .filter(|v| v.targets.contains(&me))
            .filter_map(|v| {
                let drill = topology.policies.get(&v.policy)?.drill.as_ref()?;
                (drill.nodes.is_empty() || drill.nodes.contains(&me)).then(|| DrillPlan { volume: v.name.clone(), schedule: drill.schedule, checks: drill.checks.clone() })
            })
            .collect()
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let topology = self.data.topology();
        if self.topology.as_ref().is_none_or(|t| !Arc::ptr_eq(t, &topology)) {
            let max = topology.node_by_id(&self.data.local()).map_or(1, |n| n.max_drills as usize);
            self.queue.handle_plans(unix_ms(), self.plans(&topology), max);
            self.topology = Some(topology);
        }
        self.queue.handle_tick(unix_ms());
        while let Some(job) = self.queue.poll_start() {
            self.launch(job, ctx);
        }
    }

    fn launch(&mut self, job: DrillJob, ctx: &mut Context<Self>) {
        let waiter = self.waiters.remove(&job.ticket);
        let progress = waiter.as_ref().map(|w| w.progress.clone());
        let run = run_job(self.data.clone(), self.state_dir.clone(), job.clone(), progress);
        ctx.spawn(run.into_actor(self).map(move |outcome, act, ctx| {
            act.queue.handle_finished(job.ticket);
            if let Ok(Some(report)) = &outcome {
                act.gossip.do_send(PublishDrill(report.clone()));
            }
            if let Some(w) = waiter {
                let answer = match outcome {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => Err("nothing to drill".to_string()),
                    Err(e) => Err(e),
                };
                let _ = w.done.send(answer);
            } else if let Err(e) = outcome {
                tracing::warn!(volume = %job.volume, error = %e, "scheduled drill could not run");
            }
            // A slot is free: the next drill may start at once.
            act.tick(ctx);
        }));
    }
}

impl Actor for DrillRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let runs = self.state_dir.join(RUNS_DIR);
        for dir in cleanup::clean_stale_runs(&runs) {
            tracing::info!(path = %dir.display(), "cleaned up after an interrupted drill");
        }
        self.tick(ctx);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

/// Lowers the calling process's CPU and I/O priority and makes it die with
/// its parent thread (run in the child before exec).
fn lower_priority() {
    #[allow(unsafe_code)]
    // SAFETY: async-signal-safe system calls on the calling process only;
    // failures leave the priority as it was.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, WORKER_NICE);
        // IOPRIO_WHO_PROCESS = 1, class IDLE = 3 in bits 13..
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
    }
}

/// Runs one drill: picks the RP, runs the worker, records the report. `Ok(None)`:
/// a scheduled drill had nothing new to prove (its newest RP was drilled already).
async fn run_job(data: Arc<DataPlane>, state_dir: PathBuf, job: DrillJob, progress: Option<mpsc::Sender<Value>>) -> Result<Option<DrillReport>, String> {
    let topology = data.topology();
    let me = topology.node_by_id(&data.local()).map(|n| n.name.clone()).unwrap_or_default();
    let drill = settings_of(Some(&topology), &job.volume);
    let store = data.store().clone();
    let (volume, wanted) = (job.volume.clone(), job.seq);
    let picked = tokio::task::spawn_blocking(move || -> Result<Option<(RpSeq, bool)>, String> {
        let seq = match wanted {
            Some(s) => s,
            None => match store.latest_rp(&volume).map_err(|e| e.to_string())? {
                Some(m) => m.seq,
                None => return Ok(None),
            },
        };
        if store.rp(&volume, seq).map_err(|e| e.to_string())?.is_none() {
            return Err(format!("this node does not hold {volume}@{seq}"));
        }
        let drilled = store.latest_drills(&volume).map_err(|e| e.to_string())?.contains_key(&seq);
        Ok(Some((seq, drilled)))
    })
    .await
    .map_err(|e| e.to_string())??;
    let Some((seq, drilled)) = picked else {
        if job.trigger == Trigger::Schedule {
            // Before the first replication: nothing to drill yet, nothing to warn about.
            tracing::debug!(volume = %job.volume, "scheduled drill skipped: no recovery point held here yet");
            return Ok(None);
        }
        return Err(format!("this node holds no recovery point of {}", job.volume));
    };
    if job.trigger == Trigger::Schedule && drilled {
        tracing::debug!(rp = %format!("{}@{seq}", job.volume), "scheduled drill skipped: the newest RP was drilled already");
        return Ok(None);
    }
    let names: Vec<&str> = job.checks.iter().map(|c| c.name()).collect();
    tracing::info!(rp = %format!("{}@{seq}", job.volume), checks = %names.join(","), trigger = job.trigger.name(), "drill started");
    let started_unix_ms = unix_ms();
    // The running binary itself, even if an upgrade replaced the file since
    // (the worker must speak this node's version).
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg("drill-worker")
        .arg(format!("{}@{seq}", job.volume))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--checks")
        .arg(names.join(","))
        .arg("--time-limit-secs")
        .arg(drill.time_limit.as_secs().to_string())
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    #[allow(unsafe_code)]
    // SAFETY: lower_priority only makes async-signal-safe system calls; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            lower_priority();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the drill worker: {e}"))?;
    let stdout = child.stdout.take().ok_or("the drill worker has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut checks: Option<Vec<CheckReport>> = None;
    let reading = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if let Some(p) = v.get("progress") {
                if let Some(tx) = &progress {
                    let _ = tx.send(p.clone()).await;
                }
            } else if v["ok"] == true {
                checks = serde_json::from_value(v["data"]["checks"].clone()).ok();
            }
        }
    };
    let limit = drill.time_limit + KILL_GRACE;
    let mut error = None;
    if tokio::time::timeout(limit, reading).await.is_err() {
        let _ = child.kill().await;
        error = Some(format!("time limit of {} reached; the drill was stopped", humantime::format_duration(drill.time_limit)));
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    // Whatever the worker left (it was killed?) is released now.
    for dir in cleanup::clean_stale_runs(&state_dir.join(RUNS_DIR)) {
        tracing::info!(path = %dir.display(), "cleaned up after a drill worker that did not finish");
    }
    if checks.is_none() && error.is_none() {
        error = Some(format!("the drill worker ended without a result ({status}); see the node's log"));
    }
    let mut report = DrillReport {
        volume: job.volume.clone(),
        seq,
        node: me,
        started_unix_ms,
        finished_unix_ms: unix_ms(),
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        trigger: job.trigger.name().to_string(),
        checks: checks.unwrap_or_default(),
        passed: false,
        verified: false,
        error,
    };
    let required: Vec<&str> = drill.checks.iter().map(|c| c.name()).collect();
    report.settle(&required);
    let store = data.store().clone();
    let to_record = report.clone();
    tokio::task::spawn_blocking(move || store.record_drill(&to_record)).await.map_err(|e| e.to_string())?.map_err(|e| format!("drill ran but its report was not kept: {e}"))?;
    if report.passed {
        tracing::info!(rp = %report.rp(), verified = report.verified, summary = %report.summary(), "drill passed");
    } else {
        tracing::warn!(rp = %report.rp(), summary = %report.summary(), "drill FAILED");
    }
    Ok(Some(report))
}

/// Asks for a drill of `volume@seq` (newest held when None) with `checks`
/// (the policy's when empty). Answers with the ticket's place in the queue
/// and a receiver of the report.
#[derive(Message)]
#[rtype(result = "Result<(usize, oneshot::Receiver<Result<DrillReport, String>>), String>")]
pub struct RequestDrill {
    /// Volume name.
    pub volume: VolumeName,
    /// Sequence number.
    pub seq: Option<RpSeq>,
    /// Check names.
    pub checks: Vec<String>,
    /// Where progress goes.
    pub progress: mpsc::Sender<Value>,
}

impl Handler<RequestDrill> for DrillRunner {
    type Result = Result<(usize, oneshot::Receiver<Result<DrillReport, String>>), String>;

    fn handle(&mut self, msg: RequestDrill, ctx: &mut Context<Self>) -> Self::Result {
        let topology = self.data.topology();
        let Some(volume) = topology.volume_by_name(&msg.volume) else {
            return Err(format!("no volume \"{}\" in the topology", msg.volume));
        };
        let me = self.me(&topology).unwrap_or_default();
        if !volume.targets.contains(&me) {
            return Err(format!("this node ({me}) does not hold recovery points of {}; its targets are {}", volume.name, volume.targets.join(", ")));
        }
        let drill = settings_of(Some(&topology), &volume.name);
        let checks: Vec<DrillCheck> = super::parse_checks(&msg.checks, &drill.checks).map_err(|e| e.to_string())?;
        for c in &checks {
            check_configured(*c, &drill, &volume.policy).map_err(|e| e.to_string())?;
        }
        let ticket = self.queue.handle_request(unix_ms(), &volume.name, msg.seq, checks);
        let (done, rx) = oneshot::channel();
        self.waiters.insert(ticket, Waiter { progress: msg.progress, done });
        let position = self.queue.position(ticket).unwrap_or(0);
        self.tick(ctx);
        Ok((position, rx))
    }
}

/// Drill history and queue of this node, for `ctl drills`.
#[derive(Message)]
#[rtype(result = "Result<Value, String>")]
pub struct GetDrills(pub Option<VolumeName>);

impl Handler<GetDrills> for DrillRunner {
    type Result = ResponseFuture<Result<Value, String>>;

    fn handle(&mut self, msg: GetDrills, _ctx: &mut Context<Self>) -> Self::Result {
        let job = |j: &DrillJob| json!({ "volume": j.volume, "seq": j.seq, "checks": j.checks.iter().map(|c| c.name()).collect::<Vec<_>>(), "trigger": j.trigger.name(), "queued_unix_ms": j.queued_unix_ms });
        let (running, waiting) = self.queue.jobs();
        let wanted = |v: &str| msg.0.as_deref().is_none_or(|w| w == v);
        let running: Vec<Value> = running.into_iter().filter(|j| wanted(&j.volume)).map(job).collect();
        let waiting: Vec<Value> = waiting.into_iter().filter(|j| wanted(&j.volume)).map(job).collect();
        let next: Vec<Value> = self.queue.next_due_times().into_iter().filter(|(v, _)| wanted(v)).map(|(v, at)| json!({ "volume": v, "next_unix_ms": at })).collect();
        let store = self.data.store().clone();
        Box::pin(async move {
            let volume = msg.0.clone();
            let reports = tokio::task::spawn_blocking(move || store.drills(volume.as_deref())).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            Ok(json!({ "running": running, "waiting": waiting, "schedule": next, "reports": reports }))
        })
    }
}
