//! Story: an operator wires `drmesh ctl check` into their monitoring. With no
//! node running it says UNKNOWN (exit 3). With the mesh healthy it says OK
//! (exit 0) and gives each volume's RP age as performance data. The target
//! goes away: the source logs one WARN when the volume's RPO is missed, and
//! `ctl check` turns CRITICAL (exit 2), naming the volume; once the target is
//! back, the next cycle commits, the source logs one INFO that the RPO is met
//! again, and the check is OK again.

use std::process::Output;
use std::time::Duration;

use drmesh_tests::{wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

fn check(mesh: &TestMesh, node: &str) -> (Option<i32>, String) {
    let out: Output = mesh.ctl(node, &["check"]);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn check_follows_the_rpo_and_the_source_logs_each_change_once() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let (code, text) = check(&mesh, "src");
    assert_eq!(code, Some(3), "{text}");
    assert!(text.starts_with("DRMESH UNKNOWN - no drmesh node is running here"), "{text}");

    let image = mesh.dir.path().join("db.img");
    let mut data = vec![0u8; 4 << 20];
    Rng::new(0x0c4e_c001).fill(&mut data);
    write_image_atomic(&image, &data);
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.rpo = "10s".into();
    let text = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("db", "src", &["dst"], &image, "p")], &[policy]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    let mut last = String::new();
    wait_until("ctl check says OK", Duration::from_secs(60), || {
        let (code, text) = check(&mesh, "src");
        last = text;
        code == Some(0)
    });
    eprintln!("{last}");
    assert!(last.starts_with("DRMESH OK - 1 volume within RPO, 2 of 2 nodes alive | db_rp_age="), "{last}");
    assert!(last.trim_end().ends_with(";;10"), "{last}");
    let json = mesh.ctl_data("src", &["check"]);
    // `--json` prints the verdict itself, not the admin envelope.
    assert!(json.is_err(), "{json:?}");
    let out = mesh.ctl("src", &["check", "--json"]);
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verdict JSON");
    assert_eq!((verdict["status"].as_str(), verdict["exit_code"].as_u64()), (Some("ok"), Some(0)), "{verdict}");

    // The target goes away: cycles fail, the newest RP ages past the RPO.
    assert!(mesh.stop("dst"));
    wait_until("ctl check says CRITICAL", Duration::from_secs(90), || {
        let (code, text) = check(&mesh, "src");
        last = text;
        code == Some(2)
    });
    let first = last.lines().next().unwrap_or_default();
    assert!(first.starts_with("DRMESH CRITICAL - 1 of 1 volume misses its RPO: db: RPO missed: the newest RP is "), "{last}");
    // The failed cycle (it waits for the target a while first) and the member down follow.
    wait_until("ctl check names the failed cycle and the node down", Duration::from_secs(90), || {
        let (code, text) = check(&mesh, "src");
        last = text;
        code == Some(2)
            && last.lines().any(|l| l.starts_with("WARNING: db: the last cycle failed: to dst:"))
            && last.lines().any(|l| l == "WARNING: node dst is down (gossip)")
    });
    eprintln!("{last}");
    let log = mesh.node("src").log_text();
    assert_eq!(log.matches("RPO missed: the newest RP on dst is").count(), 1, "{log}");

    // Back: the next cycle commits (a retry within 10 s), the check is OK again.
    mesh.start("dst", "topology.toml");
    wait_until("ctl check says OK again", Duration::from_secs(90), || check(&mesh, "src").0 == Some(0));
    wait_until("the source logs that the RPO is met again", Duration::from_secs(10), || mesh.node("src").log_text().contains("RPO met again: the newest RP on dst is"));
    let log = mesh.node("src").log_text();
    for line in log.lines().filter(|l| l.contains("RPO m")) {
        eprintln!("{line}");
    }
    assert_eq!(log.matches("RPO missed: the newest RP on dst is").count(), 1, "one WARN per miss: {log}");
    assert_eq!(log.matches("RPO met again").count(), 1, "{log}");
}
