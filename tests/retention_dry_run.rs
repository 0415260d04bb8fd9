//! Story: before lowering `keep_last` from 5 to 2, an operator asks the
//! target what the new rule would delete: `drmesh ctl retention --topology
//! EDITED` names the RPs and deletes nothing; `ctl retention` under the
//! topology in force deletes nothing either. Once the edit is applied, the
//! next commit deletes what the preview named. A broken file is refused
//! with what is wrong with it.

use drmesh_tests::{output_text, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

fn seqs(v: &Value) -> Vec<u64> {
    v.as_array().into_iter().flatten().filter_map(Value::as_u64).collect()
}

#[test]
fn retention_dry_run_previews_an_edit_and_deletes_nothing() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x7e7e_0001);
    let mut image = vec![0u8; 2 << 20];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let topology = |version: u64, keep_last: u32| {
        let mut policy = PolicySpec::new("p", "1MiB");
        policy.keep_last = Some(keep_last);
        mesh.replication_topology(version, &["src", "dst"], &[VolumeSpec::new("vol", "src", &["dst"], &image_path, "p")], &[policy])
    };
    let (in_force, edited) = (topology(1, 5), topology(2, 2));
    mesh.write_file("topology.toml", &in_force);
    let edited_path = mesh.write_file("edited.toml", &edited);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    for _ in 0..4 {
        rng.fill(&mut image[..1 << 20]);
        write_image_atomic(&image_path, &image);
        mesh.sync_ok("src", "vol");
    }
    let before = mesh.rp_seqs("dst", "vol");
    assert_eq!(before.len(), 4, "{before:?}");

    // Under the topology in force (keep_last 5): everything kept.
    let plan = mesh.ctl_data("dst", &["retention"]).expect("retention");
    assert_eq!(plan[0]["volume"], "vol", "{plan}");
    assert_eq!(seqs(&plan[0]["kept"]), before, "{plan}");
    assert!(seqs(&plan[0]["would_delete"]).is_empty(), "{plan}");

    // The edit (keep_last 2), not applied: the two oldest would go.
    let plan = mesh.ctl_data("dst", &["retention", "vol", "--topology", edited_path.to_str().unwrap()]).expect("retention --topology");
    assert_eq!(plan[0]["keep_last"], 2, "{plan}");
    assert_eq!(seqs(&plan[0]["would_delete"]), before[..2].to_vec(), "{plan}");
    assert_eq!(seqs(&plan[0]["kept"]), before[2..].to_vec(), "{plan}");
    let out = mesh.ctl("dst", &["retention", "--topology", edited_path.to_str().unwrap()]);
    let text = output_text(&out);
    eprintln!("{text}");
    assert!(text.contains("vol (policy p: keep_last 2)"), "{text}");
    assert!(text.contains(&format!("would delete  @{} @{}", before[0], before[1])), "{text}");
    assert!(text.contains("dry run: nothing was deleted"), "{text}");
    assert_eq!(mesh.rp_seqs("dst", "vol"), before, "a dry run deleted RPs");

    // A broken or missing file is refused, saying what and where.
    let broken = mesh.write_file("broken.toml", &edited.replacen("[mesh]", "[mesh]\nbogus = 1", 1));
    let out = mesh.ctl("dst", &["retention", "--topology", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = output_text(&out);
    assert!(text.contains("is not a valid topology") && text.contains("unknown key `bogus`"), "{text}");
    let out = mesh.ctl("dst", &["retention", "--topology", "/nonexistent/topology.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));

    // Applied: the next commit deletes what the preview named (and, with the
    // new RP, one more to keep two).
    mesh.write_file("topology.toml", &edited);
    for node in ["src", "dst"] {
        let out = mesh.ctl(node, &["reload"]);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    rng.fill(&mut image[..1 << 20]);
    write_image_atomic(&image_path, &image);
    let newest = mesh.sync_ok("src", "vol")["reports"][0]["seq"].as_u64().unwrap();
    assert_eq!(mesh.rp_seqs("dst", "vol"), vec![before[3], newest]);
}
