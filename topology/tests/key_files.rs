//! A policy's key file is needed only where volumes are encrypted: on their
//! source node. Targets store encrypted blobs without it.

use std::path::Path;

use drmesh_topology::{NodeId, Topology};

fn text() -> (String, NodeId, NodeId) {
    let (a, b) = (NodeId::from_public_key(&[1; 32]), NodeId::from_public_key(&[2; 32]));
    let t = format!(
        "[mesh]\nname = \"m\"\nversion = 1\n\n[[node]]\nname = \"src\"\nid = \"{a}\"\nsite = \"s\"\naddresses = [\"127.0.0.1:1\"]\n\n\
         [[node]]\nname = \"dst\"\nid = \"{b}\"\nsite = \"s\"\naddresses = [\"127.0.0.1:2\"]\n\n\
         [policy.p]\nrpo = \"1h\"\nencryption_key_file = \"missing.key\"\n\n\
         [[volume]]\nname = \"v\"\nsource = \"src\"\nkind = \"file\"\npath = \"/srv/v.img\"\ntargets = [\"dst\"]\npolicy = \"p\"\n"
    );
    (t, a, b)
}

#[test]
fn missing_key_file_is_an_error_for_checks_and_the_source_only() {
    let (t, src, dst) = text();
    let origin = Path::new("/nonexistent-dir/topology.toml");
    let all = Topology::parse(&t, origin).unwrap_err();
    assert_eq!(all.len(), 1);
    let d = all.iter().next().unwrap();
    assert_eq!((d.line, d.column), (19, 23), "{d}");
    assert!(d.message.contains("does not exist"), "{d}");
    assert!(Topology::parse_for(&t, origin, Some(&src)).is_err(), "the source must have the key");
    let on_target = Topology::parse_for(&t, origin, Some(&dst)).expect("a target runs without the key");
    assert!(on_target.policies["p"].encryption_key_file.is_some(), "the policy still says it encrypts");
}

#[test]
fn a_key_file_open_to_others_is_an_error_everywhere() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("missing.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (t, _, dst) = text();
    let err = Topology::parse_for(&t, &dir.path().join("topology.toml"), Some(&dst)).unwrap_err();
    assert!(err.iter().next().unwrap().message.contains("0644"), "{err}");
}
