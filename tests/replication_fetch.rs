//! Story: the source node lost its disk and restores a recovery point it never
//! held itself: `drmesh restore` on the source pulls the RP over QUIC from the
//! target that holds it, bit-identical. A third node of the mesh that is neither
//! the volume's source nor one of its targets is refused.

use drmesh_tests::{churn_pages, hash_hex, report_seq, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;

#[test]
fn source_restores_over_quic_and_a_stranger_is_refused() {
    let mut mesh = TestMesh::new(&["src", "dst", "other"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0xfe7c_0001);
    let mut image = drmesh_tests::build_image(&mut rng, 6 * MIB);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst", "other"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    for n in ["dst", "src", "other"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("src", &["dst", "other"]);
    mesh.wait_connected("other", &["dst"]);

    let first = report_seq(&mesh.sync_ok("src", "vol"));
    let first_hash = hash_hex(&image);
    churn_pages(&mut rng, &mut image, 10);
    write_image_atomic(&image_path, &image);
    let second = report_seq(&mesh.sync_ok("src", "vol"));
    let second_hash = hash_hex(&image);
    assert!(mesh.rps("src", "vol").is_empty(), "the source holds no RPs itself");

    // The source restores from its target, without and with --from; a delta RP too.
    assert_eq!(mesh.restore_hash("src", &format!("vol@{first}"), None), first_hash);
    assert_eq!(mesh.restore_hash("src", &format!("vol@{second}"), Some("dst")), second_hash);
    assert_eq!(mesh.restore_hash("src", "vol", None), second_hash, "VOLUME alone is the newest RP");
    let out = mesh.verify("src", &format!("vol@{second}"), None);
    assert!(out.status.success(), "verify from the source: {}", String::from_utf8_lossy(&out.stderr));

    // A stranger to the volume is refused, and gets no image.
    let to = mesh.dir.path().join("stolen.img");
    let before = drmesh_tests::dir_names(mesh.dir.path());
    let out = mesh.restore("other", &format!("vol@{first}"), &to, Some("dst"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "node other read vol@{first} from dst");
    assert!(err.contains("may not read"), "the refusal must say why: {err}");
    assert_eq!(drmesh_tests::dir_names(mesh.dir.path()), before, "a refused restore left a file behind");
    let out = mesh.verify("other", &format!("vol@{first}"), Some("dst"));
    assert!(!out.status.success(), "node other verified vol@{first} from dst");
    // The target keeps serving the volume's own nodes afterwards.
    assert_eq!(mesh.restore_hash("src", &format!("vol@{first}"), Some("dst")), first_hash);
}
