//! Story: a proxy node that may read one disk at a time (`max_cycles = 1`)
//! is given three volumes that all fall due at once. It runs their cycles
//! one after another: `ctl volumes` never shows two running, shows the
//! others `queued` meanwhile, and each volume's RP restores to its image
//! byte for byte. The cycles are made slow on purpose (incompressible data
//! under a 40 Mbit/s policy cap) so that the queue can be seen.

use std::time::{Duration, Instant};

use drmesh_tests::{hash_hex, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const IMAGE_MIB: usize = 12;
const VOLUMES: [&str; 3] = ["v1", "v2", "v3"];

#[test]
fn a_node_runs_no_more_cycles_at_once_than_its_max_cycles() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let mut rng = Rng::new(0xca9a_c17e);
    let mut specs = Vec::new();
    let mut hashes = Vec::new();
    for v in VOLUMES {
        let path = mesh.dir.path().join(format!("{v}.img"));
        let mut image = vec![0u8; IMAGE_MIB * MIB];
        rng.fill(&mut image);
        write_image_atomic(&path, &image);
        hashes.push(hash_hex(&image));
        specs.push(VolumeSpec::new(v, "src", &["dst"], &path, "p"));
    }
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.rpo = "1h".into();
    let mut text = mesh.replication_topology(1, &["src", "dst"], &specs, &[policy]);
    text.push_str("bandwidth = { limit = \"40Mbit\" }\n");
    // The source node's capacity: one cycle at a time.
    let at = text.find("name = \"src\"\n").expect("the src node table") + "name = \"src\"\n".len();
    text.insert_str(at, "max_cycles = 1\n");
    mesh.write_file("topology.toml", &text);
    let check = drmesh_tests::drmesh(&["topology", "check", mesh.dir.path().join("topology.toml").to_str().unwrap()]);
    assert!(check.status.success(), "{}", drmesh_tests::output_text(&check));
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // All three fall due shortly after the start; watch them run.
    let (mut most_running, mut seen_queued, mut polls) = (0usize, false, 0u32);
    let started = Instant::now();
    wait_until("every volume's first cycle committed", Duration::from_secs(180), || {
        let Ok(list) = mesh.ctl_data("src", &["volumes"]) else { return false };
        let rows = list.as_array().cloned().unwrap_or_default();
        let running = rows.iter().filter(|r| r["running"] == true).count();
        most_running = most_running.max(running);
        seen_queued |= running == 1 && rows.iter().any(|r| r["queued"] == true);
        polls += 1;
        assert!(running <= 1, "{running} cycles run at once on a node with max_cycles = 1: {list}");
        rows.len() == VOLUMES.len() && rows.iter().all(|r| r["last_ok"].is_object())
    });
    eprintln!("three cycles one after another in {:.1} s ({polls} looks at `ctl volumes`)", started.elapsed().as_secs_f64());
    assert_eq!(most_running, 1, "no cycle was ever seen running");
    assert!(seen_queued, "no volume was seen queued behind the running cycle");
    let table = String::from_utf8_lossy(&mesh.ctl("src", &["volumes"]).stdout).into_owned();
    assert!(!table.contains("queued"), "nothing is queued once all have run: {table}");
    for (v, want) in VOLUMES.iter().zip(&hashes) {
        assert_eq!(&mesh.restore_hash("dst", &format!("{v}@1"), None), want, "{v}@1 is not its image");
    }
}
