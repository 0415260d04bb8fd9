//! Story: the source or the target dies (kill -9) at a random moment of a
//! replication cycle, again and again. After each restart:
//! - every recovery point the target lists restores bit-identical to the image
//!   the source had when that RP was taken: no half RP is ever listed (promise 1);
//! - the next completing cycle commits the current image (promise 2);
//! - it resends no block the target already holds durably (promise 3).
//!
//! The image is replaced atomically (new file + rename) between rounds only, so
//! every cycle, including ones the scheduler starts on its own (the start-up
//! cycle, retries after a failure), reads exactly one version of it.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::Child;
use std::time::{Duration, Instant};

use drmesh_tests::{build_image, hash_hex, parse_ctl_json, report_seq, report_stat, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;
const ROUNDS: usize = 10;

fn start_pair(mesh: &mut TestMesh) {
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    mesh.wait_connected("dst", &["src"]);
}

/// Waits for a background `ctl ... --json` and parses its answer.
fn finish_ctl(mut child: Child, timeout: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "background ctl did not return within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    child.stdout.take().expect("piped").read_to_end(&mut stdout).expect("read ctl stdout");
    let mut stderr = Vec::new();
    child.stderr.take().expect("piped").read_to_end(&mut stderr).expect("read ctl stderr");
    let status = child.wait().expect("wait ctl");
    parse_ctl_json(&std::process::Output { status, stdout, stderr })
}

/// The number of blobs in the target's catalog.
fn blob_count(mesh: &TestMesh) -> u64 {
    mesh.store_stats("dst")["blob_count"].as_u64().expect("blob_count")
}

/// Waits until the target has no replication session open (every "session opened"
/// in its log since `from` has ended, committed or failed) and the source runs no cycle.
fn wait_quiet(mesh: &TestMesh, log_from: usize) {
    wait_until("no replication cycle in flight", Duration::from_secs(30), || {
        let log = mesh.node("dst").log_text();
        let log = &log[log_from.min(log.len())..];
        let opened = log.matches("replication session opened").count();
        let ended = log.matches("recovery point committed").count() + log.matches("replication session failed").count();
        let running = mesh
            .ctl_data("src", &["volumes"])
            .map(|v| v.as_array().into_iter().flatten().any(|p| p["running"] == true))
            .unwrap_or(true);
        opened == ended && !running
    });
}

/// Checks every RP listed on the target that `expected` does not know yet: it must
/// restore to one of `versions`, never older than the RP before it. Records it.
fn check_new_rps(mesh: &TestMesh, versions: &[String], expected: &mut BTreeMap<u64, usize>, round: usize) {
    let listed = mesh.rp_seqs("dst", "vol");
    for seq in expected.keys() {
        assert!(listed.contains(seq), "round {round}: RP vol@{seq} was listed before and is gone now: {listed:?}");
    }
    for seq in listed {
        if expected.contains_key(&seq) {
            continue;
        }
        let hash = mesh.restore_hash("dst", &format!("vol@{seq}"), None);
        let Some(version) = versions.iter().position(|v| *v == hash) else {
            panic!("round {round}: vol@{seq} restores to an image the source never had (a half RP?)");
        };
        if let Some((prev_seq, prev_version)) = expected.range(..seq).next_back() {
            assert!(version >= *prev_version, "round {round}: vol@{seq} holds image version {version}, older than vol@{prev_seq} (version {prev_version})");
        }
        expected.insert(seq, version);
    }
}

/// The next image version: a few blocks rewritten with new random data, a few zeroed,
/// and (every third round) a few zero blocks filled.
fn mutate(rng: &mut Rng, image: &mut [u8], round: usize) {
    let blocks = image.len() / BLOCK;
    for _ in 0..24 {
        let b = rng.below(blocks as u64) as usize;
        rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
    }
    for _ in 0..3 {
        let b = rng.below(blocks as u64) as usize;
        image[b * BLOCK..(b + 1) * BLOCK].fill(0);
    }
    if round.is_multiple_of(3) {
        for b in 0..blocks {
            if image[b * BLOCK..(b + 1) * BLOCK].iter().all(|&x| x == 0) {
                rng.fill(&mut image[b * BLOCK..b * BLOCK + 4096]);
                break;
            }
        }
    }
}

#[test]
fn kill9_during_cycles_never_lists_a_half_rp_and_resends_nothing() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0xc4a5_0001);
    let mut image = build_image(&mut rng, 32 * MIB);
    write_image_atomic(&image_path, &image);
    let mut versions = vec![hash_hex(&image)];
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    start_pair(&mut mesh);

    let mut expected: BTreeMap<u64, usize> = BTreeMap::new();
    mesh.sync_ok("src", "vol");
    check_new_rps(&mesh, &versions, &mut expected, 0);

    // How long an incremental cycle of one round's changes takes: kill delays are drawn in 0..that.
    mutate(&mut rng, &mut image, 1);
    write_image_atomic(&image_path, &image);
    versions.push(hash_hex(&image));
    let started = Instant::now();
    mesh.sync_ok("src", "vol");
    let cycle = started.elapsed().max(Duration::from_millis(50));
    check_new_rps(&mesh, &versions, &mut expected, 0);
    eprintln!("an incremental cycle takes {cycle:?} (sync-now round trip)");

    let mut interrupted = 0;
    // Where the running target's log starts (the log file is appended across restarts).
    let mut dst_log_from = 0;
    for round in 1..=ROUNDS {
        let victim = if round % 2 == 1 { "src" } else { "dst" };
        mutate(&mut rng, &mut image, round);
        write_image_atomic(&image_path, &image);
        versions.push(hash_hex(&image));
        let current = versions.len() - 1;

        let delay = Duration::from_millis(rng.below(cycle.as_millis() as u64 + 1));
        let child = mesh.spawn_ctl("src", &["sync-now", "vol"]);
        std::thread::sleep(delay);
        mesh.kill9(victim);
        if victim == "dst" {
            dst_log_from = mesh.node("dst").log_text().len();
        }
        let t0 = Instant::now();
        mesh.start(victim, "topology.toml");
        mesh.wait_connected("src", &["dst"]);
        mesh.wait_connected("dst", &["src"]);
        let t1 = t0.elapsed();
        let answer = finish_ctl(child, Duration::from_secs(60));
        eprintln!("round {round}: killed {victim} after {delay:?} (reconnected in {t1:?}, ctl done after {:?}); sync-now said {}", t0.elapsed(), match &answer {
            Ok(v) => format!("ok @{}", report_seq(v)),
            Err(e) => format!("error: {e}"),
        });
        match &answer {
            Ok(data) => {
                // The cycle finished before the kill: its RP holds the current image.
                let seq = report_seq(data);
                check_new_rps(&mesh, &versions, &mut expected, round);
                assert_eq!(expected.get(&seq), Some(&current), "round {round}: vol@{seq} reported committed: {data}");
            }
            Err(_) => {
                interrupted += 1;
                check_new_rps(&mesh, &versions, &mut expected, round);
            }
        }

        // The next completing cycle: commits the current image and sends only what the
        // target does not hold durably (every blob it sends adds a catalog row).
        wait_quiet(&mesh, dst_log_from);
        let before = blob_count(&mesh);
        let data = mesh.sync_ok("src", "vol");
        let after = blob_count(&mesh);
        let sent = report_stat(&data, "full_blocks") + report_stat(&data, "delta_blocks");
        assert!(
            sent <= after - before,
            "round {round}: the cycle after the kill sent {sent} blobs but only {} were new to the target (blob count {before} -> {after}): {data}",
            after - before
        );
        check_new_rps(&mesh, &versions, &mut expected, round);
        assert_eq!(expected.get(&report_seq(&data)), Some(&current), "round {round}: {data}");
    }
    eprintln!("{interrupted} of {ROUNDS} cycles were interrupted; RPs: {expected:?}");

    // Finally: a cycle killed once every new block is durably stored; the next cycle
    // of the unchanged image sends nothing at all.
    mutate(&mut rng, &mut image, 0);
    write_image_atomic(&image_path, &image);
    versions.push(hash_hex(&image));
    let current = versions.len() - 1;
    let before = blob_count(&mesh);
    let child = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    // 24 blocks were rewritten with fresh random data: 24 new blobs (minus collisions of
    // rewritten indexes, so wait for most of them and for the count to stop moving).
    let mut last = before;
    let mut stable_since = Instant::now();
    wait_until("the cycle's blobs are stored", Duration::from_secs(60), || {
        let n = blob_count(&mesh);
        if n != last {
            last = n;
            stable_since = Instant::now();
        }
        n >= before + 16 && stable_since.elapsed() > Duration::from_millis(30)
    });
    mesh.kill9("src");
    let _ = finish_ctl(child, Duration::from_secs(60));
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    wait_quiet(&mesh, dst_log_from);
    check_new_rps(&mesh, &versions, &mut expected, ROUNDS + 1);
    let data = mesh.sync_ok("src", "vol");
    assert_eq!(report_stat(&data, "full_blocks") + report_stat(&data, "delta_blocks"), 0, "blocks the target held were sent again: {data}");
    assert_eq!(report_stat(&data, "sent_payload_bytes"), 0, "{data}");
    check_new_rps(&mesh, &versions, &mut expected, ROUNDS + 1);
    assert_eq!(expected.get(&report_seq(&data)), Some(&current));
}

/// Story: a volume's hooks quiesce an application, and its view is a live
/// read (a plain image file), so `post` waits for the whole read. The source
/// is killed (kill -9) while it reads, after `pre` and before `post`: at its
/// next start it runs the owed `post` before anything else, once, with
/// `DRMESH_PRE_RESULT=interrupted`, and the application is not left quiesced
/// until the next cycle.
#[test]
fn a_post_hook_owed_when_the_source_is_killed_runs_at_its_next_start() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image = mesh.dir.path().join("db.img");
    let mut bytes = vec![0u8; 256 * MIB];
    Rng::new(5).fill(&mut bytes);
    std::fs::write(&image, &bytes).unwrap();
    let log = mesh.dir.path().join("hooks.log");
    let mut text = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("db", "src", &["dst"], &image, "p")], &[PolicySpec::new("p", "1MiB")]);
    let hooks = format!(
        "[volume.hooks]\npre = [\"/bin/sh\", \"-c\", \"echo pre >> {0}\"]\npost = [\"/bin/sh\", \"-c\", \"echo post $DRMESH_VOLUME $DRMESH_TARGET $DRMESH_PRE_RESULT >> {0}\"]\ntimeout = \"30s\"\n",
        log.display()
    );
    let at = text.find("\n[policy.").expect("policy table");
    text.insert_str(at + 1, &hooks);
    mesh.write_file("topology.toml", &text);
    let hook_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // The source's own first cycle reads the 256 MiB image: killed as soon as `pre` ran.
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    wait_until("the first cycle's pre hook", Duration::from_secs(60), || hook_log().contains("pre"));
    mesh.kill9("src");
    assert_eq!(hook_log(), "pre\n", "post ran before the kill: the read was too quick for this test");
    assert!(mesh.rp_seqs("dst", "db").is_empty());

    mesh.start("src", "topology.toml");
    // Run at start-up, before any cycle: the first line after the kill is the owed post.
    wait_until("the owed post hook", Duration::from_secs(30), || hook_log().lines().count() >= 2);
    assert_eq!(hook_log().lines().nth(1), Some("post db dst interrupted"), "{}", hook_log());
    // Then the cycles go on, their hooks in pairs; the owed post ran once.
    wait_until("an RP", Duration::from_secs(120), || !mesh.rp_seqs("dst", "db").is_empty());
    wait_until("the cycle's post hook", Duration::from_secs(30), || hook_log().ends_with("post db dst ok\n"));
    assert_eq!(hook_log().matches("interrupted").count(), 1, "{}", hook_log());
    let state = mesh.dir.path().join("src");
    let owed: Vec<_> = std::fs::read_dir(state.join("owed-post-hooks")).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(owed.is_empty(), "still owed: {owed:?}");
}
