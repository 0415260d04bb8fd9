//! Story: a target scrubs its store on its schedule (`scrub_every`) and when
//! asked (`drmesh ctl scrub`). A blob damaged on its disk is named, the RPs
//! that use it are marked damaged in `ctl scrubs`, and the others stay sound.

use std::time::Duration;

use drmesh_tests::{blob_files, report_seq, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;

fn out_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

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
    let text = out_text(&out);
    assert!(out.status.success(), "ctl scrub: {text}");
    assert!(text.contains(&format!("DAMAGED {victim_id}")) && text.contains("payload checksum mismatch"), "the scrub must name the blob: {text}");
    assert!(text.contains("1 blobs failed"), "{text}");
    let scrubs = mesh.ctl_data("dst", &["scrubs", "vol"]).expect("scrubs");
    let damaged: Vec<&str> = scrubs.as_array().expect("rows").iter().filter(|r| r["ok"] == false).map(|r| r["rp"].as_str().expect("rp")).collect();
    assert!(!damaged.is_empty() && damaged.len() < 3, "one blob's damage marks the RPs using it, not all: {scrubs}");
    let table = out_text(&mesh.ctl("dst", &["scrubs"]));
    assert!(table.contains("DAMAGED") && table.contains("sound"), "{table}");
    for rp in &damaged {
        let out = mesh.verify("dst", rp, None);
        assert!(!out.status.success() && out_text(&out).contains(&victim_id), "verify {rp} must fail on the damaged blob: {}", out_text(&out));
    }
    eprintln!("scrub named {victim_id}; damaged: {damaged:?} (newest {newest})\n$ drmesh ctl scrub\n{text}$ drmesh ctl scrubs\n{table}");

    // A sampled scrub says what share it read; bad shares are refused with the rule.
    let out = mesh.ctl("dst", &["scrub", "--sample", "10%"]);
    assert!(out.status.success() && out_text(&out).contains("a 10% sample"), "{}", out_text(&out));
    for bad in ["0%", "101%", "ten"] {
        let out = mesh.ctl("dst", &["scrub", "--sample", bad]);
        assert!(!out.status.success() && out_text(&out).contains("1% to 100%"), "--sample {bad}: {}", out_text(&out));
    }
    assert!(mesh.node_mut("dst").is_running());
}
