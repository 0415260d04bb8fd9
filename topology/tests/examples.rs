//! The shipped examples parse, and mean what their comments say.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drmesh_topology::*;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Copies an example into a fresh directory with a 0600 key file at `keys/hq.key`.
fn staged(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::copy(examples_dir().join(name), &path).unwrap();
    fs::create_dir(dir.path().join("keys")).unwrap();
    let key = dir.path().join("keys/hq.key");
    fs::write(&key, [0x5a; 32]).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    (dir, path)
}

#[test]
fn branch_office_example_loads() {
    let (dir, path) = staged("branch-office.toml");
    let topo = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(topo.mesh, Mesh { name: "acme-branch-lyon".into(), version: 7 });
    assert_eq!(topo.path(), path);
    assert_eq!(topo.sites.len(), 3);
    assert_eq!(topo.sites[0].uplink_bps, Some(50_000_000));
    assert_eq!(topo.nodes.len(), 5);

    let gw = topo.node_by_name("hq-gw").unwrap();
    assert_eq!(topo.node_by_id(&gw.id).unwrap().name, "hq-gw");
    assert_eq!(gw.id, NodeId::from_public_key(&[1; 32]));
    assert_eq!(gw.listen, "0.0.0.0:7400".parse().unwrap());
    assert_eq!(gw.labels["role"], "dr-gateway");
    let proxy = topo.node_by_name("branch-proxy").unwrap();
    assert_eq!(proxy.listen, "10.20.0.5:7400".parse().unwrap());
    let fs1 = topo.node_by_name("branch-fs1").unwrap();
    assert!(fs1.addresses.is_empty());
    assert_eq!(fs1.listen, "0.0.0.0:0".parse().unwrap());
    assert!(topo.node_by_name("nope").is_none());

    let kinds: Vec<&str> = topo.volumes.iter().map(|v| v.kind.name()).collect();
    assert_eq!(kinds, ["kmod", "file", "qemu", "qemu", "ebs"]);
    assert_eq!(topo.group_of("pos-vm-data").map(|g| g.name.as_str()), Some("pos"));
    assert_eq!(topo.group("pos").map(|g| g.volumes.len()), Some(2));
    assert_eq!(
        topo.volumes[2].kind,
        SourceKind::Qemu {
            monitor: QemuSocket::Unix("/run/drmesh/pos.qmp".into()),
            node: "pos-disk".into(),
            fleece_dir: "/var/lib/drmesh/fleece".into(),
            nbd: QemuSocket::Unix("/var/lib/drmesh/fleece/nbd.sock".into()),
            guest_agent: Some(QemuSocket::Unix("/run/drmesh/pos.qga".into())),
            fleece_guard: FleeceGuard::Reserve(1 << 30),
            tls: None,
        }
    );
    assert_eq!(topo.volumes[0].kind, SourceKind::Kmod { device: "/dev/sdb".into(), cow_store: "/dev/sdc".into(), state_store: Some("/dev/sdd1".into()) });
    assert_eq!(topo.volumes[0].targets, ["branch-proxy", "hq-gw"]);

    let office = &topo.policies["office"];
    assert_eq!(office.rpo, Duration::from_secs(15 * 60));
    assert_eq!(office.block_bytes, 1 << 20);
    assert_eq!(office.compression, Compression::Zstd { level: 3 });
    assert_eq!(office.retention, Retention { keep_last: 48, hourly: 24, daily: 14, weekly: 12, coalesce_unchanged: false });
    let key_path = office.encryption_key_file.as_ref().unwrap();
    assert_eq!(key_path, &dir.path().join("keys/hq.key"));
    assert_eq!(read_key_file(key_path).unwrap().as_bytes(), &[0x5a; 32]);
    let bw = office.bandwidth.as_ref().unwrap();
    assert_eq!(bw.limit_bps, Some(40_000_000));
    assert_eq!(bw.windows.len(), 1);
    assert!(bw.windows[0].days.contains(Weekday::Mon) && !bw.windows[0].days.contains(Weekday::Sun));
    assert_eq!(bw.windows[0].from.to_string(), "08:00");
    assert_eq!(bw.windows[0].limit_bps, Some(10_000_000));
    let drill = office.drill.as_ref().unwrap();
    assert_eq!(drill.schedule, DrillSchedule::Weekly { day: Weekday::Sun, at: TimeOfDay { minutes: 3 * 60 } });
    assert_eq!(drill.checks, [DrillCheck::Fsck, DrillCheck::Boot]);

    let cloud = &topo.policies["cloud"];
    assert_eq!(cloud.encryption_key_file, None);
    assert_eq!(cloud.compression, Compression::Zstd { level: 1 });
    assert_eq!(cloud.retention, Retention { keep_last: 24, hourly: 0, daily: 7, weekly: 0, coalesce_unchanged: false });

    let text = fs::read(&path).unwrap();
    assert_eq!(topo.hash(), *blake3::hash(&text).as_bytes());
    assert_eq!(topo.hash_short().len(), 12);
    assert!(topo.hash_short().chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn branch_office_without_key_file_is_rejected_at_the_key_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("branch-office.toml");
    fs::copy(examples_dir().join("branch-office.toml"), &path).unwrap();
    let err = Topology::load(&path).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let first = err.iter().next().unwrap();
    assert!(first.message.contains("does not exist"), "{err}");
    let text = fs::read_to_string(&path).unwrap();
    let line = text.lines().position(|l| l.starts_with("encryption_key_file")).unwrap() + 1;
    assert_eq!((first.line, first.column), (line, 23));
    assert!(err.to_string().starts_with(&format!("{}:{line}:23: ", path.display())));
}

#[test]
fn two_nodes_example_loads() {
    let path = examples_dir().join("two-nodes.toml");
    let topo = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(topo.nodes.len(), 2);
    assert_eq!(topo.nodes[0].listen, "127.0.0.1:7401".parse().unwrap());
    assert_eq!(topo.nodes[1].listen, "127.0.0.1:7402".parse().unwrap());
    assert_eq!(topo.volumes[0].kind, SourceKind::File { path: "/var/tmp/drmesh-demo.img".into() });
    let policy = &topo.policies["default"];
    assert_eq!(policy.retention.keep_last, 24);
    assert_eq!(policy.block_bytes, 1 << 20);
    assert_eq!(policy.compression, Compression::Zstd { level: 1 });
}

#[test]
fn identical_files_hash_equal_and_differ_otherwise() {
    let text = fs::read_to_string(examples_dir().join("two-nodes.toml")).unwrap();
    let a = Topology::parse(&text, Path::new("/etc/drmesh/a.toml")).unwrap();
    let b = Topology::parse(&text, Path::new("/srv/other/b.toml")).unwrap();
    assert_eq!(a.hash(), b.hash());
    let c = Topology::parse(&text.replace("version = 1", "version = 2"), Path::new("a.toml")).unwrap();
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn load_reports_a_missing_file() {
    let err = Topology::load(Path::new("/nonexistent/topology.toml")).unwrap_err();
    let first = err.iter().next().unwrap();
    assert_eq!((first.line, first.column), (1, 1));
    assert!(first.message.contains("cannot read topology file"));
}
