//! Story: a target scrubs its store on its schedule (`scrub_every`) and when
//! asked (`drmesh ctl scrub`). A blob damaged on its disk is named, the RPs
//! that use it are marked damaged in `ctl scrubs`, and the others stay sound.
//! A blob damaged on one target is repaired from the other; where the target
//! holds the policy's key, a blob altered together with its checksums fails
//! its AES-GCM tag check and is repaired the same way.

use std::time::Duration;

use drmesh_tests::{output_text, blob_files, report_seq, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;


#[test]
fn scheduled_and_asked_scrubs_find_a_damaged_blob() {
    let mut rng = Rng::new(0x5c2b_0001);
    let mut image = vec![0u8; 4 * MIB];
    rng.fill(&mut image);
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    write_image_atomic(&image_path, &image);
    let policy = PolicySpec::new("p", "256KiB");
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, &policy.name);
    let mut text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    let dst_id = mesh.node("dst").id.clone();
    let dst_block = format!("name = \"dst\"\nid = \"{dst_id}\"\nsite = \"lab\"\n");
    assert!(text.contains(&dst_block), "{text}");
    text = text.replace(&dst_block, &format!("{dst_block}scrub_every = \"6s\"\n"));
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let mut seqs = Vec::new();
    for cycle in 0..3 {
        if cycle > 0 {
            // The last block changes each time: older RPs keep their own version of it.
            rng.fill(&mut image[3 * MIB..3 * MIB + BLOCK]);
            write_image_atomic(&image_path, &image);
        }
        seqs.push(report_seq(&mesh.sync_ok("src", "vol")));
    }

    // The schedule: a scrub runs on its own and leaves a sound verdict on every RP.
    wait_until("a scheduled scrub", Duration::from_secs(60), || mesh.node("dst").log_text().contains("scrub done"));
    let scrubs = mesh.ctl_data("dst", &["scrubs"]).expect("scrubs");
    let rows = scrubs.as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{scrubs}");
    assert!(rows.iter().all(|r| r["ok"] == true), "{scrubs}");
    assert!(mesh.node("dst").log_text().contains("why=\"scheduled\"") || mesh.node("dst").log_text().contains("scheduled"), "the log says it was scheduled");
    // The verdicts reach the source by gossip: each of dst's RPs sound, and when.
    let scrub_of = |rp: &str| -> Option<serde_json::Value> {
        let catalog = mesh.ctl_data("src", &["catalog", "vol"]).ok()?;
        catalog["rps"].as_array()?.iter().find(|r| r["holder"] == "dst" && format!("vol@{}", r["seq"]) == rp).map(|r| r["scrub"].clone()).filter(|s| !s.is_null())
    };
    wait_until("the source sees dst's scrub verdicts", Duration::from_secs(30), || seqs.iter().all(|s| scrub_of(&format!("vol@{s}")).is_some_and(|v| v["sound"] == true)));
    let table = output_text(&mesh.ctl("src", &["catalog", "vol"]));
    assert!(table.contains("SCRUB (UTC)") && table.contains("sound 20"), "{table}");

    // Damage the blob of the newest RP's last block (only the newest RP uses it).
    let newest = format!("vol@{}", seqs[2]);
    let files_before = blob_files(&mesh.node("dst").state_dir);
    let newest_only: Vec<_> = files_before
        .iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap_or_default();
            // The plaintext block is 256 KiB of random data: its blob is whole and large.
            bytes.len() > 200_000
        })
        .cloned()
        .collect();
    assert!(!newest_only.is_empty());
    let victim = newest_only.last().expect("a blob").clone();
    let mut bytes = std::fs::read(&victim).expect("blob");
    bytes[1000] ^= 0x10;
    std::fs::write(&victim, &bytes).expect("write blob");
    let victim_id = victim.file_name().expect("name").to_string_lossy().to_string();

    let out = mesh.ctl("dst", &["scrub"]);
    let text = output_text(&out);
    assert!(out.status.success(), "ctl scrub: {text}");
    assert!(text.contains(&format!("DAMAGED {victim_id}")) && text.contains("payload checksum mismatch"), "the scrub must name the blob: {text}");
    assert!(text.contains("1 blobs failed"), "{text}");
    let scrubs = mesh.ctl_data("dst", &["scrubs", "vol"]).expect("scrubs");
    let damaged: Vec<&str> = scrubs.as_array().expect("rows").iter().filter(|r| r["ok"] == false).map(|r| r["rp"].as_str().expect("rp")).collect();
    assert!(!damaged.is_empty() && damaged.len() < 3, "one blob's damage marks the RPs using it, not all: {scrubs}");
    let table = output_text(&mesh.ctl("dst", &["scrubs"]));
    assert!(table.contains("DAMAGED") && table.contains("sound"), "{table}");
    // The source learns which of dst's RPs the scrub found damaged, and that the others are sound.
    wait_until("the source sees the damaged verdicts", Duration::from_secs(30), || {
        seqs.iter().all(|s| {
            let rp = format!("vol@{s}");
            scrub_of(&rp).is_some_and(|v| (v["sound"] == false) == damaged.contains(&rp.as_str()))
        })
    });
    let catalog_table = output_text(&mesh.ctl("src", &["catalog", "vol"]));
    assert!(catalog_table.contains("DAMAGED 20"), "{catalog_table}");
    for rp in &damaged {
        let out = mesh.verify("dst", rp, None);
        assert!(!out.status.success() && output_text(&out).contains(&victim_id), "verify {rp} must fail on the damaged blob: {}", output_text(&out));
    }
    eprintln!("scrub named {victim_id}; damaged: {damaged:?} (newest {newest})\n$ drmesh ctl scrub\n{text}$ drmesh ctl scrubs\n{table}\n$ drmesh ctl catalog vol (src)\n{catalog_table}");

    // A sampled scrub says what share it read; bad shares are refused with the rule.
    let out = mesh.ctl("dst", &["scrub", "--sample", "10%"]);
    assert!(out.status.success() && output_text(&out).contains("a 10% sample"), "{}", output_text(&out));
    for bad in ["0%", "101%", "ten"] {
        let out = mesh.ctl("dst", &["scrub", "--sample", bad]);
        assert!(!out.status.success() && output_text(&out).contains("1% to 100%"), "--sample {bad}: {}", output_text(&out));
    }
    assert!(mesh.node_mut("dst").is_running());
}

/// A source and two targets of volume `vol` (a random image of `mib` MiB at
/// the returned path) under `policy`, started and connected.
fn two_targets(rng: &mut Rng, mib: usize, policy: PolicySpec) -> (TestMesh, Vec<u8>, std::path::PathBuf) {
    let mut image = vec![0u8; mib * MIB];
    rng.fill(&mut image);
    let mut mesh = TestMesh::new(&["src", "t1", "t2"]);
    let image_path = mesh.dir.path().join("disk.img");
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("vol", "src", &["t1", "t2"], &image_path, &policy.name);
    let text = mesh.replication_topology(1, &["src", "t1", "t2"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    for n in ["t1", "t2", "src"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("src", &["t1", "t2"]);
    mesh.wait_connected("t1", &["t2"]);
    (mesh, image, image_path)
}

#[test]
fn a_blob_damaged_on_one_target_is_repaired_from_the_other() {
    let mut rng = Rng::new(0x5c2b_0002);
    let (mesh, mut image, image_path) = two_targets(&mut rng, 4, PolicySpec::new("p", "256KiB"));
    let mut hashes = Vec::new();
    for cycle in 0..2 {
        if cycle > 0 {
            rng.fill(&mut image[MIB..MIB + BLOCK]);
            write_image_atomic(&image_path, &image);
        }
        let data = mesh.sync_ok("src", "vol");
        hashes.push((data["reports"][0]["seq"].as_u64().expect("seq"), drmesh_tests::hash_hex(&image)));
    }

    // A blob both targets hold (same name): damaged on t1 only.
    let name = |p: &std::path::PathBuf| p.file_name().expect("name").to_string_lossy().to_string();
    let on_t2: std::collections::HashSet<String> = blob_files(&mesh.node("t2").state_dir).iter().map(name).collect();
    let shared: Vec<_> = blob_files(&mesh.node("t1").state_dir).into_iter().filter(|p| on_t2.contains(&name(p)) && std::fs::metadata(p).map(|m| m.len() > 200_000).unwrap_or(false)).collect();
    assert!(shared.len() >= 2, "the targets must hold blobs of the same ids");
    let victim = shared[0].clone();
    let mut bytes = std::fs::read(&victim).expect("blob");
    bytes[700] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("write");
    let out = mesh.ctl("t1", &["scrub"]);
    let text = output_text(&out);
    eprintln!("$ drmesh ctl scrub (t1, one blob damaged)\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("repair: 1 blocks fetched again from another holder and stored; 0 no other holder could give"), "{text}");
    assert!(!text.contains("damaged recovery points now"), "{text}");
    let scrubs = mesh.ctl_data("t1", &["scrubs"]).expect("scrubs");
    assert!(scrubs.as_array().expect("rows").iter().all(|r| r["ok"] == true), "after the repair: {scrubs}");
    for (seq, hash) in &hashes {
        assert_eq!(&mesh.restore_hash("t1", &format!("vol@{seq}"), None), hash, "vol@{seq} on t1 after the repair");
    }

    // A blob lost on every holder: nobody can repair it; both mark the RPs that use it.
    let lost = shared[1].clone();
    let lost_name = name(&lost);
    let lost_bytes = std::fs::read(&lost).expect("blob");
    std::fs::remove_file(&lost).expect("rm on t1");
    let on_t2_path = blob_files(&mesh.node("t2").state_dir).into_iter().find(|p| name(p) == lost_name).expect("on t2");
    std::fs::remove_file(on_t2_path).expect("rm on t2");
    for node in ["t1", "t2"] {
        let out = mesh.ctl(node, &["scrub"]);
        let text = output_text(&out);
        eprintln!("$ drmesh ctl scrub ({node}, one blob lost on both)\n{text}");
        assert!(text.contains(&format!("DAMAGED {lost_name}")) && text.contains("missing"), "{node}: {text}");
        assert!(text.contains("0 blocks fetched again from another holder and stored; 1 no other holder could give"), "{node}: {text}");
        assert!(text.contains("damaged recovery points now: vol@"), "{node}: {text}");
        let scrubs = mesh.ctl_data(node, &["scrubs"]).expect("scrubs");
        assert!(scrubs.as_array().expect("rows").iter().any(|r| r["ok"] == false), "{node}: {scrubs}");
    }
    // Every node learns it by gossip: the source, which holds nothing, sees the RP
    // failed by a scrub on both holders.
    let damaged_on = |holder: &str| -> bool {
        let Ok(catalog) = mesh.ctl_data("src", &["catalog", "vol"]) else { return false };
        catalog["rps"].as_array().into_iter().flatten().any(|r| {
            r["holder"] == holder && r["drill_passed"] == false && r["drill"]["checks"].as_array().into_iter().flatten().any(|c| c["check"] == "scrub" && c["passed"] == false)
        })
    };
    drmesh_tests::wait_until("the source's catalog shows the damage on both holders", Duration::from_secs(30), || damaged_on("t1") && damaged_on("t2"));
    let table = output_text(&mesh.ctl("src", &["catalog"]));
    eprintln!("$ drmesh ctl catalog (src)\n{table}");
    assert!(table.contains("FAILED (scrub)"), "{table}");

    // The blob comes back on t1 (say, a disk put back): its next scrub finds the RP
    // sound and says so to the mesh.
    std::fs::write(&lost, &lost_bytes).expect("put the blob back");
    let out = mesh.ctl("t1", &["scrub"]);
    assert!(out.status.success() && output_text(&out).contains("0 blobs failed, 0 RPs damaged"), "{}", output_text(&out));
    let sound_on_t1 = || -> bool {
        let Ok(catalog) = mesh.ctl_data("src", &["catalog", "vol"]) else { return false };
        catalog["rps"].as_array().into_iter().flatten().any(|r| {
            r["holder"] == "t1" && r["drill_passed"] == true && r["drill"]["checks"].as_array().into_iter().flatten().any(|c| c["check"] == "scrub" && c["passed"] == true)
        })
    };
    drmesh_tests::wait_until("the source's catalog shows t1's RP sound again", Duration::from_secs(30), sound_on_t1);
    assert!(damaged_on("t2"), "t2 still lacks the blob");
}

#[test]
fn a_blob_altered_with_its_checksums_fails_its_tag_and_is_repaired() {
    let mut rng = Rng::new(0x5c2b_0003);
    let keys = tempfile::tempdir().expect("key folder");
    let key = keys.path().join("policy.key");
    drmesh_tests::write_key_file(&key, &mut rng);
    let policy = PolicySpec { encryption_key_file: Some(key), ..PolicySpec::new("p", "256KiB") };
    let (mesh, image, _) = two_targets(&mut rng, 3, policy);
    let seq = mesh.sync_ok("src", "vol")["reports"][0]["seq"].as_u64().expect("seq");
    let hash = drmesh_tests::hash_hex(&image);

    // One payload byte of a blob both targets hold changes on t1, and its
    // header's payload checksum and header check are written to match.
    let name = |p: &std::path::PathBuf| p.file_name().expect("name").to_string_lossy().to_string();
    let on_t2: std::collections::HashSet<String> = blob_files(&mesh.node("t2").state_dir).iter().map(name).collect();
    let victim = blob_files(&mesh.node("t1").state_dir)
        .into_iter()
        .find(|p| on_t2.contains(&name(p)) && std::fs::metadata(p).map(|m| m.len() > 200_000).unwrap_or(false))
        .expect("a blob both targets hold");
    let mut bytes = std::fs::read(&victim).expect("blob");
    bytes[256 + 5000] ^= 0x04;
    let payload_sum = *blake3::hash(&bytes[256..]).as_bytes();
    bytes[120..152].copy_from_slice(&payload_sum);
    let header_check = *blake3::hash(&bytes[0..152]).as_bytes();
    bytes[152..168].copy_from_slice(&header_check[0..16]);
    std::fs::write(&victim, &bytes).expect("write");
    let victim_id = name(&victim);

    let out = mesh.ctl("t1", &["scrub"]);
    let text = output_text(&out);
    eprintln!("$ drmesh ctl scrub (t1, one blob altered with its checksums)\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("DAMAGED {victim_id}")) && text.contains("AES-GCM tag check"), "the scrub must name the blob and why: {text}");
    assert!(text.contains("repair: 1 blocks fetched again from another holder and stored; 0 no other holder could give"), "{text}");
    assert!(text.contains("passed their AES-GCM tag check"), "{text}");
    assert_eq!(mesh.restore_hash("t1", &format!("vol@{seq}"), None), hash, "vol@{seq} on t1 after the repair");
    let again = mesh.ctl_data("t1", &["scrub"]).expect("scrub");
    assert_eq!((again["blobs_bad"].as_u64(), again["rps_damaged"].as_u64(), again["blobs_without_key"].as_u64()), (Some(0), Some(0), Some(0)), "{again}");
    assert_eq!(again["blobs_authenticated"], again["blobs_read"], "every blob read was authenticated: {again}");
}
