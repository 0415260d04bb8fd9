//! Story: a PostgreSQL 15 server keeps its cluster in
//! /var/lib/postgresql/15/main on an ext4 filesystem (here a loop-mounted
//! image file, the server's "disk"). pgbench writes to it all the time. The
//! server is protected by a `file` volume whose source is a snapshot of that
//! disk: for each recovery point the filesystem is frozen (`fsfreeze`), the
//! disk copied to the snapshot file (temp name, rename), thawed, and the
//! volume replicated with `ctl sync-now`. A frozen filesystem under a running
//! server is crash-consistent: PostgreSQL must replay its WAL to start from it.
//!
//! Every RP taken under load is drilled on the target with the `postgres`
//! check: PostgreSQL 15 starts on a copy-on-write export of the RP after
//! crash recovery, pg_amcheck passes, and `select count(*) from
//! pgbench_history` answers. Each count lies between the live server's count
//! read just before the freeze and the one read just after the thaw (a
//! committed transaction is durable in the WAL before the freeze, none can
//! commit while frozen), and the counts grow with the RPs.
//!
//! A damaged RP fails: in a copy of a snapshot the WAL segment holding the
//! latest checkpoint record is deleted (and its redo point's segment, when it
//! is another one). Found by hand: PostgreSQL then refuses to start ("PANIC:
//! could not locate a valid checkpoint record"). Deleting only the newest
//! segments is not enough: recovery just ends early and the server starts
//! with the newest commits lost, which only a query with `expect` can notice.
//! That copy replicated as an RP of a second volume fails its drill in the
//! postgres check, and the report shows PostgreSQL's complaint.
//!
//! Needs root (loop mounts, fsfreeze, drills mount RPs) and PostgreSQL 15 in
//! /usr/lib/postgresql/15/bin (scripts/install-deps installs postgresql-15).
//! Prints each drill's duration and the counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use drmesh_tests::{drill_table, free_port, is_root, report_seq, restore_progress, restore_result, run_ok, wait_until, Mount, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The data directory as the server sees it, made at the same place inside the filesystem.
const DATA_PATH: &str = "/var/lib/postgresql/15/main";
const QUERY: &str = "select count(*) from pgbench_history";
const DISK_BYTES: u64 = 256 << 20;
/// RPs taken while pgbench writes.
const RPS_UNDER_LOAD: usize = 10;

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !is_root() {
        return Some("needs root (loop mounts, fsfreeze; drills mount the recovery point)".into());
    }
    for tool in ["initdb", "pg_ctl", "postgres", "psql", "pgbench", "pg_controldata"] {
        if !Path::new(PG_BIN).join(tool).is_file() {
            return Some(format!("PostgreSQL 15 is not installed ({PG_BIN}/{tool} is missing; scripts/install-deps installs postgresql-15)"));
        }
    }
    if !Command::new("id").arg("postgres").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        return Some("there is no `postgres` user to run PostgreSQL as".into());
    }
    if !Command::new("fsfreeze").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        return Some("fsfreeze (util-linux) is not installed".into());
    }
    None
}

/// A PostgreSQL 15 tool run as the `postgres` user (initdb and postgres refuse root).
fn as_postgres(tool: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(Path::new(PG_BIN).join(tool)).env("LANG", "C").current_dir("/");
    cmd
}

/// The production server: its cluster on the mounted disk, a Unix socket in the
/// test's folder. Stopped on drop (fast, then immediate), before the disk is unmounted.
struct LivePostgres {
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
}

impl LivePostgres {
    /// initdb in `data` (on the mounted disk) and start the server.
    fn create(data: &Path, socket_dir: &Path) -> LivePostgres {
        std::fs::create_dir_all(data).unwrap();
        std::fs::create_dir_all(socket_dir).unwrap();
        let top = data.ancestors().find(|a| a.ends_with("var/lib/postgresql")).expect("data dir under var/lib/postgresql");
        run_ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(top).arg(socket_dir));
        run_ok(Command::new("chmod").arg("700").arg(data).arg(socket_dir));
        run_ok(as_postgres("initdb").args(["-A", "trust", "-U", "postgres", "--no-locale", "-E", "UTF8", "--no-sync", "-D"]).arg(data));
        let pg = LivePostgres { data: data.to_path_buf(), socket_dir: socket_dir.to_path_buf(), port: free_port() };
        // Checkpoints every 30 s, so RPs fall before and after online checkpoints.
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c port={} -c checkpoint_timeout=30s -c shared_buffers=32MB",
            pg.socket_dir.display(),
            pg.port
        );
        run_ok(
            as_postgres("pg_ctl")
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&pg.data)
                .arg("-l")
                .arg(pg.socket_dir.join("postgres.log"))
                .arg("-o")
                .arg(options)
                .stdout(Stdio::null()),
        );
        pg
    }

    /// A client tool with the connection options.
    fn client(&self, tool: &str) -> Command {
        let mut cmd = as_postgres(tool);
        cmd.arg("-h").arg(&self.socket_dir).arg("-p").arg(self.port.to_string());
        cmd
    }

    /// Runs `sql` on the live server; its result (unaligned, tuples only).
    fn sql(&self, sql: &str) -> String {
        run_ok(self.client("psql").args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql])).trim().to_string()
    }

    /// `QUERY` on the live server.
    fn count(&self) -> u64 {
        let out = self.sql(QUERY);
        out.parse().unwrap_or_else(|e| panic!("{QUERY} on the live server returned {out:?}: {e}"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.socket_dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for LivePostgres {
    fn drop(&mut self) {
        for mode in ["fast", "immediate"] {
            let ok = as_postgres("pg_ctl")
                .args(["stop", "-w", "-t", "30", "-m", mode, "-D"])
                .arg(&self.data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
    }
}

/// pgbench clients in a background thread (2 clients, 2 s runs, over and over)
/// until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    fn start(pg: &LivePostgres) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicU64::new(0));
        let mut bench = pg.client("pgbench");
        bench.args(["-n", "-c", "2", "-j", "2", "-T", "2", "postgres"]).stdout(Stdio::null()).stderr(Stdio::null());
        let (stop2, runs2) = (stop.clone(), runs.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                if bench.status().is_ok_and(|s| s.success()) {
                    runs2.fetch_add(1, Ordering::SeqCst);
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        Load { stop, runs, thread: Some(thread) }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `fsfreeze -f`; thawed on drop, even when the test fails meanwhile.
struct Frozen<'a>(&'a Path);

impl<'a> Frozen<'a> {
    fn new(mount_point: &'a Path) -> Frozen<'a> {
        run_ok(Command::new("fsfreeze").arg("-f").arg(mount_point));
        Frozen(mount_point)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(self.0).status();
    }
}

/// Copies `from` to `to` sparsely through a temporary name in the same folder and a rename.
fn copy_atomic(from: &Path, to: &Path) {
    let tmp = to.with_extension("img.tmp");
    run_ok(Command::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(from).arg(&tmp));
    std::fs::rename(&tmp, to).unwrap();
}

/// Takes a crash-consistent snapshot of the live disk; returns the live count
/// read before the freeze and after the thaw.
fn take_snapshot(pg: &LivePostgres, mount_point: &Path, disk: &Path, snapshot: &Path) -> (u64, u64) {
    let before = pg.count();
    {
        let _frozen = Frozen::new(mount_point);
        copy_atomic(disk, snapshot);
    }
    (before, pg.count())
}

/// sync-now of `volume`; every RP newly listed on dst gets `bounds` (the
/// snapshot file changes only between syncs). Returns this cycle's seq.
fn replicate(mesh: &TestMesh, volume: &str, bounds: (u64, u64), rps: &mut BTreeMap<u64, (u64, u64)>) -> u64 {
    let seq = report_seq(&mesh.sync_ok("src", volume));
    for s in mesh.rp_seqs("dst", volume) {
        rps.entry(s).or_insert(bounds);
    }
    assert_eq!(rps.get(&seq), Some(&bounds), "the RP of this cycle, {volume}@{seq}, is listed on dst");
    seq
}

/// The `query result: VALUE` line of a postgres check's output.
fn query_result(check: &Value) -> Option<String> {
    check["output"].as_str()?.lines().rev().find_map(|l| l.strip_prefix("query result: ")).map(|v| v.trim().to_string())
}

/// One `Key: value` line of pg_controldata's output.
fn control_field<'a>(control: &'a str, key: &str) -> &'a str {
    control.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim_start_matches(':').trim()).unwrap_or_else(|| panic!("no {key:?} in pg_controldata:\n{control}"))
}

/// The WAL segment files crash recovery cannot do without: the one holding
/// the latest checkpoint record and the one holding its redo point.
fn checkpoint_segments(control: &str) -> Vec<String> {
    let location = control_field(control, "Latest checkpoint location");
    let (hi, lo) = location.split_once('/').unwrap_or_else(|| panic!("checkpoint location {location:?}"));
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let tli: u64 = control_field(control, "Latest checkpoint's TimeLineID").parse().unwrap();
    let seg_bytes: u64 = control_field(control, "Bytes per WAL segment").parse().unwrap();
    let segno = lsn / seg_bytes;
    let per_id = 0x1_0000_0000 / seg_bytes;
    let mut files = vec![format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)];
    let redo = control_field(control, "Latest checkpoint's REDO WAL file").to_string();
    if !files.contains(&redo) {
        files.push(redo);
    }
    files
}

/// A copy of `snapshot` at `to` with the WAL segments that crash recovery needs deleted.
fn damage_wal(snapshot: &Path, to: &Path, mount_point: &Path) -> Vec<String> {
    let tmp = to.with_extension("img.tmp");
    run_ok(Command::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(snapshot).arg(&tmp));
    let removed = {
        let _mounted = Mount::new(&["-o", "loop", tmp.to_str().unwrap()], mount_point);
        let data = mount_point.join(DATA_PATH.trim_start_matches('/'));
        let control = run_ok(as_postgres("pg_controldata").arg(&data));
        assert_eq!(control_field(&control, "Database cluster state"), "in production", "the snapshot was taken under a running server:\n{control}");
        let files = checkpoint_segments(&control);
        for key in ["Latest checkpoint location", "Latest checkpoint's REDO location"] {
            eprintln!("damaged copy: {key}: {}", control_field(&control, key));
        }
        let wal = data.join("pg_wal");
        for f in &files {
            std::fs::remove_file(wal.join(f)).unwrap_or_else(|e| panic!("removing {f} from the copy's pg_wal ({:?}): {e}", drmesh_tests::dir_names(&wal)));
        }
        eprintln!("damaged copy: removed {files:?} from pg_wal; left {:?}", drmesh_tests::dir_names(&wal));
        files
    };
    std::fs::rename(&tmp, to).unwrap();
    removed
}

#[test]
fn every_crash_consistent_rp_of_a_busy_postgres_recovers_and_a_damaged_one_fails() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipped: {why}");
        return;
    }
    let test_started = Instant::now();
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    // The postgres user must reach the live cluster and its socket inside the test's folder.
    run_ok(Command::new("chmod").arg("711").arg(&dir));

    // The database server's disk, its filesystem and its cluster.
    let disk = dir.join("pg-disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "pgdata"]).arg(&disk));
    let live = dir.join("live");
    let mounted = Mount::new(&["-o", "loop", disk.to_str().unwrap()], &live);
    let pg = LivePostgres::create(&live.join(DATA_PATH.trim_start_matches('/')), &dir.join("pgsock"));
    run_ok(pg.client("pgbench").args(["-i", "-q", "-s", "1", "postgres"]).stderr(Stdio::null()));

    // The first snapshot before the nodes start (the volumes' files must exist).
    let snapshot = dir.join("server-snapshot.img");
    let damaged = dir.join("damaged-snapshot.img");
    let first_bounds = take_snapshot(&pg, &live, &disk, &snapshot);
    copy_atomic(&snapshot, &damaged);

    let mut policy = PolicySpec::new("p", "1MiB");
    policy.keep_last = Some(50);
    let volumes = [VolumeSpec::new("server", "src", &["dst"], &snapshot, "p"), VolumeSpec::new("damaged", "src", &["dst"], &damaged, "p")];
    let mut text = mesh.replication_topology(1, &["src", "dst"], &volumes, &[policy]);
    text.push_str(&drill_table(
        "p",
        &format!(
            "schedule = \"weekly wed 03:17\"\nchecks = [\"postgres\"]\ntime_limit = \"5m\"\n\n[policy.p.drill.postgres]\npath = \"{DATA_PATH}\"\ndatabase = \"postgres\"\nquery = \"{QUERY}\""
        ),
    ));
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    let mut rps = BTreeMap::new();
    replicate(&mesh, "server", first_bounds, &mut rps);
    let mut damaged_rps = BTreeMap::new();
    replicate(&mesh, "damaged", first_bounds, &mut damaged_rps);

    // RPs under load.
    let load = Load::start(&pg);
    let taking = Instant::now();
    for i in 0..RPS_UNDER_LOAD {
        std::thread::sleep(Duration::from_millis(1200));
        if i % 3 == 1 {
            // An online checkpoint under load now and then: later RPs recover from it.
            pg.sql("checkpoint");
        }
        let bounds = take_snapshot(&pg, &live, &disk, &snapshot);
        replicate(&mesh, "server", bounds, &mut rps);
    }
    let runs = load.runs.load(Ordering::SeqCst);
    drop(load);
    eprintln!("took {} RPs under load in {:.1} s ({runs} pgbench runs)", RPS_UNDER_LOAD, taking.elapsed().as_secs_f64());
    assert!(runs >= 3, "pgbench ran while the RPs were taken ({runs} runs); live server log:\n{}", pg.log_text());

    // Every RP recovers, with a count within its bounds.
    let mut counts = Vec::new();
    for (&seq, &(before, after)) in &rps {
        let rp = format!("server@{seq}");
        let started = Instant::now();
        let out = mesh.drill("dst", &rp, &["postgres"]);
        let wall = started.elapsed().as_secs_f64();
        let report = restore_result(&out).unwrap_or_else(|e| panic!("drill {rp}: {e}\n--- dst log:\n{}", mesh.node("dst").log_text()));
        let check = &report["checks"][0];
        assert!(out.status.success() && report["passed"] == true, "drill {rp} must pass: {report:#}");
        assert_eq!((check["check"].as_str(), report["verified"].as_bool()), (Some("postgres"), Some(true)), "{report}");
        let summary = check["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("after crash recovery"), "a snapshot of a running server needs crash recovery: {summary}");
        let states: Vec<String> = restore_progress(&out).iter().filter(|p| p["check"] == "postgres").filter_map(|p| p["state"].as_str().map(String::from)).collect();
        assert_eq!(states, ["running", "passed"], "{rp}: progress lines precede the report: {:?}", String::from_utf8_lossy(&out.stdout));
        let value = query_result(check).unwrap_or_else(|| panic!("no `query result:` line in the output of {rp}'s postgres check: {check:#}"));
        let count: u64 = value.parse().unwrap_or_else(|e| panic!("{rp}: query result {value:?}: {e}"));
        eprintln!(
            "{rp}: count {count} (live: {before} before the freeze, {after} after the thaw); drill {:.1} s, postgres check {:.1} s ({summary})",
            wall,
            check["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        assert!(before <= count && count <= after, "{rp} holds {count} pgbench_history rows; the live server had {before} before the freeze and {after} after the thaw");
        counts.push((seq, count));
    }
    assert!(counts.len() > RPS_UNDER_LOAD, "{counts:?}");
    let increases = counts.windows(2).filter(|w| w[1].1 > w[0].1).count();
    assert!(counts.windows(2).all(|w| w[1].1 >= w[0].1), "the counts never go back from one RP to the next: {counts:?}");
    assert!(increases >= RPS_UNDER_LOAD / 2, "the counts grow under load: only {increases} increases in {counts:?}");

    // A damaged RP: the WAL that crash recovery starts from is gone.
    let removed = damage_wal(&snapshot, &damaged, &dir.join("damage"));
    let (before, after) = *rps.values().last().unwrap();
    let seq = replicate(&mesh, "damaged", (before, after), &mut damaged_rps);
    let rp = format!("damaged@{seq}");
    let out = mesh.drill("dst", &rp, &["postgres"]);
    let report = restore_result(&out).unwrap_or_else(|e| panic!("drill {rp}: {e}\n--- dst log:\n{}", mesh.node("dst").log_text()));
    assert!(!out.status.success(), "a failed drill exits non-zero: {report}");
    assert_eq!((report["passed"].as_bool(), report["verified"].as_bool()), (Some(false), Some(false)), "{report:#}");
    let check = &report["checks"][0];
    assert_eq!((check["check"].as_str(), check["passed"].as_bool()), (Some("postgres"), Some(false)), "{report:#}");
    let summary = check["summary"].as_str().unwrap_or_default();
    let output = check["output"].as_str().unwrap_or_default();
    eprintln!("{rp} (without {removed:?}): {summary}");
    assert!(summary.contains("could not locate a valid checkpoint record"), "the summary gives PostgreSQL's reason: {summary}\noutput:\n{output}");
    assert!(output.contains("PANIC"), "the output holds PostgreSQL's log: {output}");
    let listed = mesh.rps("dst", "damaged");
    let row = listed.iter().find(|r| r["seq"] == seq).expect("damaged RP listed");
    assert_eq!((row["drill"]["passed"].as_bool(), row["last_known_good"].as_bool()), (Some(false), Some(false)), "{row}");
    // The catalog says which check failed and that the volume has no verified RP.
    wait_until("dst's catalog shows the failed drill of the damaged volume", Duration::from_secs(20), || {
        mesh.catalog_volume("dst", "damaged").is_some_and(|v| v["verification"]["last_failure"].as_str().is_some_and(|f| f.starts_with(&format!("@{seq}")) && f.contains("postgres")))
    });
    let v = mesh.catalog_volume("dst", "damaged").unwrap();
    assert!(v["verification"]["verified_seq"].is_null(), "{v}");
    let v = mesh.catalog_volume("dst", "server").unwrap();
    assert_eq!(v["verification"]["verified_seq"].as_u64(), rps.keys().last().copied(), "the newest server RP is verified: {v}");

    drop(pg);
    drop(mounted);
    eprintln!("whole test: {:.1} s", test_started.elapsed().as_secs_f64());
}
