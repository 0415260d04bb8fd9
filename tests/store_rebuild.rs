//! Story: the target's catalog is damaged or lost; the RP manifests and blobs
//! beside it are not.
//! - Random bytes written over a stopped target's catalog at 20 seeded places:
//!   the node either starts (the damage hit unused pages) or refuses to start
//!   with an error that names `drmesh store check` and `drmesh store rebuild`,
//!   never a panic; `store check` says what it found; after `store rebuild`
//!   every RP verifies and restores bit-identical.
//! - Damage under a running target: it stays up, and whatever fails says the
//!   catalog is damaged; after a stop and a rebuild every RP restores.
//! - The catalog deleted: the manifests alone make a catalog with the same RPs
//!   and Merkle roots, and the node replicates on it.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{output_text, drmesh, drmesh_bin, hash_hex, report_seq, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;

/// A mesh whose target holds 4 RPs of an 8 MiB volume; the image of each RP by seq.
fn mesh_with_rps(seed: u64) -> (TestMesh, std::path::PathBuf, Vec<u8>, BTreeMap<u64, String>) {
    let mut rng = Rng::new(seed);
    let mut image = vec![0u8; 8 * MIB];
    rng.fill(&mut image);
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    write_image_atomic(&image_path, &image);
    let policy = PolicySpec::new("p", "256KiB");
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, &policy.name);
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let mut expected = BTreeMap::new();
    for cycle in 0..4 {
        if cycle > 0 {
            for _ in 0..6 {
                let b = rng.below((image.len() / BLOCK) as u64) as usize;
                rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
            }
            write_image_atomic(&image_path, &image);
        }
        let seq = report_seq(&mesh.sync_ok("src", "vol"));
        expected.insert(seq, hash_hex(&image));
    }
    (mesh, image_path, image, expected)
}


fn store_cmd(state_dir: &Path, cmd: &str) -> std::process::Output {
    drmesh(&["store", cmd, "--state-dir", state_dir.to_str().expect("utf8")])
}

/// Every RP verifies and restores to the image it was taken of (read from the stopped node's store).
fn all_rps_restore(mesh: &TestMesh, expected: &BTreeMap<u64, String>, what: &str) {
    for (seq, hash) in expected {
        let rp = format!("vol@{seq}");
        let out = mesh.verify("dst", &rp, None);
        assert!(out.status.success(), "{what}: verify {rp}: {}", output_text(&out));
        assert_eq!(&mesh.restore_hash("dst", &rp, None), hash, "{what}: restore {rp}");
    }
}

/// Writes 8 runs of 256 random bytes at random places of `file`.
fn damage(file: &Path, rng: &mut Rng) -> Vec<u64> {
    let len = std::fs::metadata(file).expect("catalog").len();
    let f = std::fs::OpenOptions::new().write(true).open(file).expect("open catalog");
    (0..8)
        .map(|_| {
            let off = rng.below(len);
            let mut junk = vec![0u8; 256];
            rng.fill(&mut junk);
            f.write_all_at(&junk, off).expect("write");
            off
        })
        .collect()
}

/// Starts `drmesh run` on dst's state dir: Ok(()) once its admin socket answers (then
/// stopped), or Err(log) when it exits first.
fn try_start(mesh: &TestMesh) -> Result<(), (i32, String)> {
    let node = mesh.node("dst");
    let log = mesh.dir.path().join("dst-try.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(drmesh_bin())
        .args(["run", "--state-dir"])
        .arg(&node.state_dir)
        .arg("--topology")
        .arg(mesh.dir.path().join("topology.toml"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Err((status.code().unwrap_or(-1), std::fs::read_to_string(&log).unwrap_or_default()));
        }
        if mesh.ctl_json("dst", "status").is_some() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("term");
            let status = child.wait().expect("wait");
            assert!(status.code() != Some(101), "the node panicked on stop");
            return Ok(());
        }
        assert!(Instant::now() < deadline, "the node neither started nor exited");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_damaged_catalog_is_refused_checked_and_rebuilt() {
    let (mut mesh, _, _, expected) = mesh_with_rps(0x5707_0001);
    assert!(mesh.stop("dst"));
    let state_dir = mesh.node("dst").state_dir.clone();
    let store = state_dir.join("store");
    let good = mesh.dir.path().join("good-store");
    assert!(Command::new("cp").arg("-a").arg(&store).arg(&good).status().expect("cp").success());
    let check = store_cmd(&state_dir, "check");
    assert!(check.status.success(), "check of a sound store: {}", output_text(&check));
    assert!(output_text(&check).contains("no problems"), "{}", output_text(&check));

    let mut rng = Rng::new(0x5707_00aa);
    let (mut refused, mut started) = (0, 0);
    for round in 0..20 {
        std::fs::remove_dir_all(&store).expect("rm store");
        assert!(Command::new("cp").arg("-a").arg(&good).arg(&store).status().expect("cp").success());
        let offsets = damage(&store.join("catalog.redb"), &mut rng);
        match try_start(&mesh) {
            Ok(()) => started += 1,
            Err((code, log)) => {
                assert_eq!(code, 1, "round {round}: the node exited with {code} (a panic is 101):\n{log}");
                assert!(
                    log.contains("drmesh store check --state-dir") && log.contains("drmesh store rebuild --state-dir") && log.contains("is damaged"),
                    "round {round}: the refusal must name both commands:\n{log}"
                );
                refused += 1;
            }
        }
        let check = store_cmd(&state_dir, "check");
        assert!(matches!(check.status.code(), Some(0 | 1)), "round {round}: store check: {}", output_text(&check));
        let rebuild = store_cmd(&state_dir, "rebuild");
        if round == 0 {
            eprintln!("store check:\n{}\nstore rebuild:\n{}", output_text(&check), output_text(&rebuild));
        }
        assert!(rebuild.status.success(), "round {round} (damage at {offsets:?}): rebuild: {}", output_text(&rebuild));
        assert!(output_text(&rebuild).contains(&format!("rebuilt: {} RPs listed, 0 refused", expected.len())), "round {round}: {}", output_text(&rebuild));
        let check = store_cmd(&state_dir, "check");
        assert!(check.status.success(), "round {round}: check after rebuild: {}", output_text(&check));
        if round % 5 == 0 {
            all_rps_restore(&mesh, &expected, &format!("round {round}"));
        } else {
            // Every round: the newest RP, bit-identical.
            let (seq, hash) = expected.iter().next_back().expect("rps");
            assert_eq!(&mesh.restore_hash("dst", &format!("vol@{seq}"), None), hash, "round {round}");
        }
        eprintln!("round {round}: damage at {offsets:?}: rebuilt");
    }
    eprintln!("20 rounds: {refused} refused at start naming both commands, {started} started (damage on unused pages); all rebuilt");
    assert!(refused >= 5, "the seeds must damage the catalog for real in many rounds ({refused} refused)");
}

#[test]
fn a_running_target_survives_damage_and_manifests_alone_rebuild_its_catalog() {
    let (mut mesh, image_path, mut image, mut expected) = mesh_with_rps(0x5707_0002);
    let state_dir = mesh.node("dst").state_dir.clone();
    let catalog = state_dir.join("store").join("catalog.redb");
    let roots = |mesh: &TestMesh| -> Vec<(u64, String)> {
        mesh.rps("dst", "vol")
            .iter()
            .map(|r| {
                let root = r["merkle_root"].as_str().expect("merkle_root in hex, as the rebuild report has it").to_string();
                (r["seq"].as_u64().expect("seq"), root)
            })
            .collect()
    };
    let before = roots(&mesh);
    assert_eq!(before.len(), expected.len());

    // Damage under the running node, then use it: it stays up, errors say what.
    let mut rng = Rng::new(0x5707_00bb);
    for _ in 0..3 {
        damage(&catalog, &mut rng);
    }
    let gc = mesh.ctl("dst", &["gc", "--grace-secs", "0"]);
    let sync = mesh.sync_now("src", "vol");
    let verify = mesh.verify("dst", &format!("vol@{}", expected.keys().next_back().expect("rp")), None);
    assert!(mesh.node_mut("dst").is_running(), "the target died on its damaged catalog:\n{}", mesh.node("dst").log_text());
    for out in [&gc, &verify] {
        let t = output_text(out);
        assert!(!t.contains("Some(") && !t.contains("Err("), "{t}");
    }
    eprintln!("under damage: gc: {}; sync: {}; verify ok: {}", output_text(&gc).trim(), sync.map(|_| "ok".to_string()).unwrap_or_else(|e| e), verify.status.success());
    assert!(mesh.stop("dst"));
    let rebuild = store_cmd(&state_dir, "rebuild");
    assert!(rebuild.status.success(), "rebuild after damage under a running node: {}", output_text(&rebuild));
    // A sync that committed under damage committed a sound RP (its manifest is there): keep it in the expectations.
    let rebuilt: serde_json::Value = {
        std::fs::remove_file(&catalog).expect("rm catalog");
        let out = drmesh(&["store", "rebuild", "--json", "--state-dir", state_dir.to_str().expect("utf8")]);
        assert!(out.status.success(), "rebuild from manifests alone: {}", output_text(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let listed: Vec<(u64, String)> = rebuilt["rps"]
        .as_array()
        .expect("rps")
        .iter()
        .map(|r| {
            let rp = r["rp"].as_str().expect("rp");
            (rp.trim_start_matches("vol@").parse().expect("seq"), r["merkle_root"].as_str().expect("root").to_string())
        })
        .collect();
    assert!(rebuilt["kept_aside"].is_null(), "there was no catalog to keep: {rebuilt}");
    assert_eq!(&listed[..before.len()], &before[..], "manifests alone must list the same RPs with the same Merkle roots");
    assert!(listed.len() <= before.len() + 1, "{listed:?}");
    if listed.len() > before.len() {
        // The sync under damage committed; its image is the unchanged one.
        expected.insert(listed[before.len()].0, hash_hex(&image));
    }
    all_rps_restore(&mesh, &expected, "after rebuild from manifests alone");

    // The node runs on the rebuilt catalog: a new cycle, restored bit-identical.
    mesh.start("dst", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    assert_eq!(roots(&mesh)[..before.len()], before[..]);
    let mut rng = Rng::new(0x5707_00cc);
    rng.fill(&mut image[..BLOCK]);
    write_image_atomic(&image_path, &image);
    let seq = report_seq(&mesh.sync_ok("src", "vol"));
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{seq}"), None), hash_hex(&image));
}
