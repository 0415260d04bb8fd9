//! Story: a small ext4 volume is replicated from "src" to "dst" under a
//! policy that keeps only the 2 newest recovery points and drills them with
//! fsck; "obs" holds nothing and only listens to gossip.
//!
//! 1. RP 1 is drilled on demand and VERIFIED. Three more cycles would prune it
//!    (keep_last = 2), but retention keeps the newest verified RP, the last
//!    known-good point: `ctl rps` on dst lists it (last_known_good) beside
//!    the 2 newest, and obs's gossiped catalog shows it verified.
//! 2. The newest RP is drilled and verified: the next cycle prunes the old
//!    verified one, which is no longer the last known-good point, and the
//!    new one is kept beyond keep_last in its turn.
//! 3. The dead-man's switch: drills stop while RPs keep arriving. Once the
//!    newest verified RP is older than `max_unverified_age`, every node's
//!    catalog shows the volume OVERDUE and every node logs it once (one
//!    warning per transition, however long it lasts). A drill of the newest
//!    RP brings it back.
//! 4. The same when no RP was ever verified: retention prunes the old RPs,
//!    but the volume has been unverified since its first one.
//!
//! Drills only run on demand here (the schedule is weekly, so no scheduled
//! drill changes what is verified behind the test's back). Phases 1 and 2 run
//! under a `max_unverified_age` of 10 minutes, so however slow the machine,
//! they never trip the switch; phase 3 tightens it to 20 s with a topology
//! reload, as an operator would, and waits for it to trip.
//!
//! Needs root (drills mount the RP's filesystem).

use std::process::Command;
use std::time::{Duration, Instant};

use drmesh_tests::{drill_table, is_root, report_seq, restore_result, run_ok, wait_until, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

const VOL: &str = "vol";
const NODES: [&str; 3] = ["src", "dst", "obs"];
const OVERDUE_LINE: &str = "drill verification overdue";
const BACK_LINE: &str = "drill verification back within max_unverified_age";

/// The topology: src protects `vol` (the ext4 image) to dst; obs only gossips.
fn topology(mesh: &TestMesh, version: u64, max_unverified_age: &str) -> String {
    let image = mesh.dir.path().join("vol.img");
    let mut policy = PolicySpec::new("p", "256KiB");
    policy.keep_last = Some(2);
    let vol = VolumeSpec::new(VOL, "src", &["dst"], &image, "p");
    let mut text = mesh.replication_topology(version, &NODES, &[vol], &[policy]);
    text.push_str(&drill_table(
        "p",
        &format!("schedule = \"weekly wed 03:17\"\nchecks = [\"fsck\"]\nmax_unverified_age = \"{max_unverified_age}\"\ntime_limit = \"3m\""),
    ));
    text
}

/// Writes a new small file into the image's filesystem (debugfs, no mount), so
/// the next cycle makes a new RP.
fn change_image(mesh: &TestMesh, n: u32) {
    let content = mesh.dir.path().join("note.txt");
    std::fs::write(&content, format!("change {n}\n").repeat(200)).unwrap();
    let image = mesh.dir.path().join("vol.img");
    run_ok(Command::new("debugfs").arg("-w").arg("-R").arg(format!("write {} note-{n}.txt", content.display())).arg(&image));
}

/// A new RP from a changed image; its seq.
fn new_rp(mesh: &TestMesh, n: &mut u32) -> u64 {
    *n += 1;
    change_image(mesh, *n);
    report_seq(&mesh.sync_ok("src", VOL))
}

/// Drills `vol@seq` on dst with the policy's checks; the report, which must say VERIFIED.
fn drill_verified(mesh: &TestMesh, seq: u64) -> Value {
    let started = Instant::now();
    let out = mesh.drill("dst", &format!("{VOL}@{seq}"), &[]);
    let report = restore_result(&out).unwrap_or_else(|e| panic!("drill {VOL}@{seq}: {e}\n--- dst log:\n{}", mesh.node("dst").log_text()));
    eprintln!("drill of {VOL}@{seq}: {:.1} s ({})", started.elapsed().as_secs_f64(), report["checks"][0]["summary"]);
    assert!(out.status.success(), "drill {VOL}@{seq} exits 0 when it passes: {report}");
    assert_eq!((report["volume"].as_str(), report["seq"].as_u64(), report["node"].as_str()), (Some(VOL), Some(seq), Some("dst")), "{report}");
    assert_eq!(report["trigger"], "request", "{report}");
    assert_eq!((report["passed"].as_bool(), report["verified"].as_bool()), (Some(true), Some(true)), "fsck is every check of the policy: {report}");
    let checks: Vec<&str> = report["checks"].as_array().unwrap().iter().map(|c| c["check"].as_str().unwrap()).collect();
    assert_eq!(checks, ["fsck"], "{report}");
    report
}

/// dst's RPs of vol: (seq, last_known_good, drill verified).
fn dst_rps(mesh: &TestMesh) -> Vec<(u64, bool, bool)> {
    mesh.rps("dst", VOL)
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["last_known_good"] == true, r["drill"]["verified"] == true))
        .collect()
}

/// (seq, drill.verified) of each RP of vol in `name`'s catalog, by seq.
fn catalog_rps(mesh: &TestMesh, name: &str) -> Vec<(u64, bool)> {
    let data = mesh.catalog(name);
    let mut rps: Vec<(u64, bool)> = data["rps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["volume"] == VOL)
        .map(|r| {
            assert_eq!(r["holder"], "dst", "only dst holds RPs: {r}");
            (r["seq"].as_u64().unwrap(), r["drill"]["verified"] == true)
        })
        .collect();
    rps.sort();
    rps
}

fn verification(mesh: &TestMesh, name: &str) -> Value {
    let v = mesh.catalog_volume(name, VOL).unwrap_or_else(|| panic!("{name}'s catalog lists no {VOL}"));
    assert!(v["verification"].is_object(), "the policy drills, so {name}'s catalog has a verification for {VOL}: {v}");
    v["verification"].clone()
}

/// Lines of `name`'s log with `what` about vol.
fn log_lines(mesh: &TestMesh, name: &str, what: &str) -> Vec<String> {
    mesh.node(name).log_text().lines().filter(|l| l.contains(what) && l.contains(&format!("volume={VOL}"))).map(String::from).collect()
}

#[test]
fn retention_keeps_the_last_known_good_rp_and_the_dead_mans_switch_fires_once() {
    if !is_root() {
        eprintln!("skipped: needs root (drills mount the recovery point's filesystem)");
        return;
    }
    let test_started = Instant::now();
    let mut mesh = TestMesh::new(&NODES);
    let image = mesh.dir.path().join("vol.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "drill-vol"]).arg(&image));
    mesh.write_file("topology.toml", &topology(&mesh, 1, "10m"));
    for n in ["dst", "obs", "src"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("src", &["dst", "obs"]);
    mesh.wait_connected("obs", &["dst"]);
    let mut changes = 0;

    // 1. RP 1 verified, then three cycles: kept beyond keep_last as the last known-good point.
    let first = report_seq(&mesh.sync_ok("src", VOL));
    drill_verified(&mesh, first);
    let later: Vec<u64> = (0..3).map(|_| new_rp(&mesh, &mut changes)).collect();
    let want = vec![(first, true, true), (later[1], false, false), (later[2], false, false)];
    assert_eq!(dst_rps(&mesh), want, "dst keeps the 2 newest RPs and the verified {VOL}@{first} (seq, last_known_good, verified); {:?} are pruned", later[0]);
    let human = String::from_utf8_lossy(&mesh.ctl("dst", &["rps", VOL]).stdout).into_owned();
    println!("ctl rps on dst after phase 1:\n{human}");
    assert!(human.contains("VERIFIED") && human.contains("last known-good"), "ctl rps says why the old RP is still there:\n{human}");
    let want_catalog = vec![(first, true), (later[1], false), (later[2], false)];
    wait_until("obs's catalog lists the verified RP and the 2 newest, nothing pruned", Duration::from_secs(30), || catalog_rps(&mesh, "obs") == want_catalog);
    let data = mesh.catalog("obs");
    let rp = data["rps"].as_array().unwrap().iter().find(|r| r["seq"] == first).unwrap().clone();
    assert_eq!(rp["drill"]["passed"], true, "{rp}");
    let checks: Vec<(&str, bool)> = rp["drill"]["checks"].as_array().unwrap().iter().map(|c| (c["check"].as_str().unwrap(), c["passed"] == true)).collect();
    assert_eq!(checks, [("fsck", true)], "obs learned each check's verdict: {rp}");
    let v = verification(&mesh, "obs");
    assert_eq!((v["verified_seq"].as_u64(), v["overdue"].as_bool()), (Some(first), Some(false)), "{v}");
    let drills = mesh.ctl_data("dst", &["drills", VOL]).unwrap();
    assert!(drills["reports"].as_array().unwrap().iter().any(|r| r["seq"] == first && r["verified"] == true), "ctl drills on dst keeps the report: {drills}");
    let now_ms = data["now_unix_ms"].as_u64().unwrap();
    let next = drills["schedule"].as_array().unwrap().iter().find(|s| s["volume"] == VOL).unwrap_or_else(|| panic!("ctl drills lists vol's schedule: {drills}"));
    assert!(next["next_unix_ms"].as_u64().unwrap() > now_ms, "the next scheduled drill is ahead: {drills}");
    assert!(rp["drill"]["finished_unix_ms"].as_u64().unwrap() > 0 && rp["drill"]["software_version"].is_string(), "{rp}");

    // 2. The newest RP verified: the old verified one is pruned by the next cycle.
    let newest = later[2];
    drill_verified(&mesh, newest);
    let next = new_rp(&mesh, &mut changes);
    assert_eq!(dst_rps(&mesh), vec![(newest, true, true), (next, false, false)], "{VOL}@{first} is no longer the newest verified RP: pruned");
    let next2 = new_rp(&mesh, &mut changes);
    assert_eq!(
        dst_rps(&mesh),
        vec![(newest, true, true), (next, false, false), (next2, false, false)],
        "now {VOL}@{newest} is kept beyond keep_last as the last known-good point"
    );
    let want_catalog = vec![(newest, true), (next, false), (next2, false)];
    wait_until("obs's catalog follows the pruning", Duration::from_secs(30), || catalog_rps(&mesh, "obs") == want_catalog);
    let v = verification(&mesh, "obs");
    assert_eq!((v["verified_seq"].as_u64(), v["overdue"].as_bool()), (Some(newest), Some(false)), "{v}");
    for n in NODES {
        assert!(log_lines(&mesh, n, OVERDUE_LINE).is_empty(), "with max_unverified_age 10m nothing is overdue yet on {n}: {:?}", log_lines(&mesh, n, OVERDUE_LINE));
    }
    eprintln!("phases 1-2 took {:.1} s", test_started.elapsed().as_secs_f64());

    // 3. Drills stop, RPs keep coming, the limit is tightened to 20 s: overdue everywhere, said once.
    mesh.write_file("topology.toml", &topology(&mesh, 2, "20s"));
    for n in NODES {
        let out = mesh.ctl(n, &["reload"]);
        assert!(out.status.success(), "reload on {n}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    wait_until("every node runs topology version 2", Duration::from_secs(20), || {
        NODES.iter().all(|n| mesh.ctl_json(n, "status").is_some_and(|s| s["topology_version"] == 2))
    });
    let waiting = Instant::now();
    let mut last_sync = Instant::now() - Duration::from_secs(10);
    let mut arrived = Vec::new();
    wait_until("obs's catalog shows vol OVERDUE", Duration::from_secs(120), || {
        if last_sync.elapsed() >= Duration::from_secs(3) {
            arrived.push(new_rp(&mesh, &mut changes));
            last_sync = Instant::now();
        }
        verification(&mesh, "obs")["overdue"] == true
    });
    eprintln!("overdue after {:.1} s; RPs that arrived meanwhile: {arrived:?}", waiting.elapsed().as_secs_f64());
    let v = verification(&mesh, "obs");
    assert_eq!(v["verified_seq"].as_u64(), Some(newest), "the newest verified RP is still {VOL}@{newest}: {v}");
    assert_eq!(v["max_unverified_age_secs"], 20, "{v}");
    assert!(v["unverified_secs"].as_u64().unwrap() > 20, "{v}");
    for n in ["src", "dst"] {
        assert_eq!(verification(&mesh, n)["overdue"], true, "every node's catalog says so, {n}'s too");
    }
    for n in NODES {
        let what = format!("{n} logs that vol's verification is overdue");
        wait_until(&what, Duration::from_secs(20), || !log_lines(&mesh, n, OVERDUE_LINE).is_empty());
    }
    // It stays overdue through more cycles and verification rounds (every 5 s): no more warnings.
    for _ in 0..3 {
        arrived.push(new_rp(&mesh, &mut changes));
        std::thread::sleep(Duration::from_secs(4));
    }
    assert_eq!(verification(&mesh, "obs")["overdue"], true);
    for n in NODES {
        let lines = log_lines(&mesh, n, OVERDUE_LINE);
        assert_eq!(lines.len(), 1, "one warning per transition on {n}: {lines:#?}");
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
    }
    println!("obs: {}", log_lines(&mesh, "obs", OVERDUE_LINE)[0]);
    let human = String::from_utf8_lossy(&mesh.ctl("obs", &["catalog", VOL]).stdout).into_owned();
    println!("ctl catalog vol on obs while overdue:\n{human}");
    assert!(human.contains("OVERDUE"), "{human}");

    // A drill of the newest RP: verified again, everywhere.
    let latest = *arrived.last().unwrap();
    drill_verified(&mesh, latest);
    for n in ["obs", "src", "dst"] {
        let what = format!("{n}'s catalog: vol verified at @{latest}, no longer overdue");
        wait_until(&what, Duration::from_secs(30), || {
            let v = verification(&mesh, n);
            v["verified_seq"].as_u64() == Some(latest) && v["overdue"] == false
        });
    }
    for n in NODES {
        let what = format!("{n} logs that vol's verification is back");
        wait_until(&what, Duration::from_secs(20), || !log_lines(&mesh, n, BACK_LINE).is_empty());
        let lines = log_lines(&mesh, n, OVERDUE_LINE);
        assert_eq!(lines.len(), 1, "still one overdue warning on {n}: {lines:#?}");
    }
    // The old last known-good RP goes with the next cycle.
    let after = new_rp(&mesh, &mut changes);
    let seqs: Vec<u64> = dst_rps(&mesh).iter().map(|r| r.0).collect();
    assert!(!seqs.contains(&newest), "{VOL}@{newest} is no longer the newest verified RP: pruned, dst holds {seqs:?}");
    assert_eq!(dst_rps(&mesh).last(), Some(&(after, false, false)));
    eprintln!("whole test: {:.1} s", test_started.elapsed().as_secs_f64());
}

/// The dead-man's switch must also catch drills that never verified anything
/// (never ran, or always fail). Retention keeps no verified RP then, so
/// counting "unverified since the oldest RP" restarts with every prune: with
/// keep_last = 2 and a cycle every 3 s the oldest RP is never older than
/// about 6 s, and a 20 s limit would never trip. The volume has been unverified
/// since its first RP, and that is what must count.
#[test]
fn a_volume_never_verified_goes_overdue_although_retention_prunes_its_old_rps() {
    if !is_root() {
        eprintln!("skipped: needs root (drills mount the recovery point's filesystem)");
        return;
    }
    let mut mesh = TestMesh::new(&NODES);
    let image = mesh.dir.path().join("vol.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "drill-vol"]).arg(&image));
    mesh.write_file("topology.toml", &topology(&mesh, 1, "20s"));
    for n in ["dst", "obs", "src"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("src", &["dst", "obs"]);
    let mut changes = 0;
    let first = new_rp(&mesh, &mut changes);
    let started = Instant::now();
    // 20 s limit, verification looked at every 5 s: 45 s is plenty.
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(45) {
        std::thread::sleep(Duration::from_secs(3));
        new_rp(&mesh, &mut changes);
        let v = verification(&mesh, "obs");
        seen.push(format!("{:.0} s: dst holds {:?}, unverified_secs {}", started.elapsed().as_secs_f64(), mesh.rp_seqs("dst", VOL), v["unverified_secs"]));
        if v["overdue"] == true {
            break;
        }
    }
    let v = verification(&mesh, "obs");
    assert_eq!(
        v["overdue"], true,
        "no RP of {VOL} was ever verified in the {:.0} s since {VOL}@{first}, more than max_unverified_age (20 s), yet obs's catalog says {v}; along the way:\n{}",
        started.elapsed().as_secs_f64(),
        seen.join("\n")
    );
    wait_until("obs logs that vol's verification is overdue", Duration::from_secs(20), || !log_lines(&mesh, "obs", OVERDUE_LINE).is_empty());
    assert_eq!(log_lines(&mesh, "obs", OVERDUE_LINE).len(), 1);
}
