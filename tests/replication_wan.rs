//! Story: a branch node behind NAT replicates a volume to headquarters over a
//! long, lossy WAN (an in-process `drmesh_simnet` relay: 40 ms each way, 1%
//! random loss each way, a rate limit with a drop-tail queue and an Ethernet
//! MTU). Every byte between the nodes crosses the emulated link: the branch
//! has no addresses, so it dials, and headquarters' only address is the
//! relay's. The recovery points must restore bit-identical to the image of
//! their cycle, after an initial and an incremental cycle, whatever was lost
//! on the way, and the branch can pull an RP back over the same link. No
//! timing is asserted.

use std::time::Duration;

use drmesh_simnet::link::{LinkParams, QueueLimit};
use drmesh_simnet::relay::{Relay, RelayConfig};
use drmesh_tests::{build_image, churn_pages, hash_hex, report_seq, report_stat, write_image_atomic, write_key_file, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;

#[test]
fn replication_over_a_lossy_wan_restores_bit_identical() {
    let mut mesh = TestMesh::new(&["branch", "hq"]);
    let hq_addr: std::net::SocketAddr = mesh.node("hq").address().parse().expect("loopback address");
    let link = LinkParams {
        delay: Duration::from_millis(40),
        loss: 0.01,
        rate_bits_per_s: 200_000_000,
        queue: QueueLimit::Delay(Duration::from_millis(20)),
        ..LinkParams::default()
    };
    let mut cfg = RelayConfig::new("127.0.0.1:0".parse().expect("literal address"), hq_addr, link);
    cfg.seed = 11;
    let relay = Relay::start(cfg).expect("start relay");

    let mut rng = Rng::new(0x5eed_0a17);
    let image_path = mesh.dir.path().join("disk.img");
    let mut image = build_image(&mut rng, 24 * MIB);
    write_image_atomic(&image_path, &image);
    let key = mesh.dir.path().join("policy.key");
    write_key_file(&key, &mut rng);
    let policy = PolicySpec { encryption_key_file: Some(key), ..PolicySpec::new("p", "256KiB") };
    let volume = VolumeSpec::new("disk", "branch", &["hq"], &image_path, "p");

    let mut text = format!(
        "[mesh]\nname = \"test\"\nversion = 1\n\n[[node]]\nname = \"branch\"\nid = \"{}\"\nsite = \"branch\"\n\n\
         [[node]]\nname = \"hq\"\nid = \"{}\"\nsite = \"hq\"\naddresses = [\"{}\"]\nlisten = \"{}\"\n",
        mesh.node("branch").id,
        mesh.node("hq").id,
        relay.local_addr(),
        hq_addr
    );
    text.push_str(&volume.text());
    text.push_str(&policy.text());
    mesh.write_file("topology.toml", &text);
    mesh.start("hq", "topology.toml");
    mesh.start("branch", "topology.toml");
    mesh.wait_connected("branch", &["hq"]);

    // Initial full copy, then an incremental one of a few changed pages.
    let first = mesh.sync_ok("branch", "disk");
    let first_seq = report_seq(&first);
    let first_hash = hash_hex(&image);
    assert!(report_stat(&first, "sent_payload_bytes") > 0, "{first}");
    churn_pages(&mut rng, &mut image, 40);
    write_image_atomic(&image_path, &image);
    let second = mesh.sync_ok("branch", "disk");
    let second_seq = report_seq(&second);
    assert!(report_stat(&second, "delta_blocks") > 0, "changed pages travel as deltas: {second}");

    // The link really was in the way, and really lost datagrams both ways.
    let stats = relay.stats();
    assert_eq!(stats.clients, 1, "one connection, from the branch: {stats:#?}");
    assert!(stats.up.link.dropped_loss_packets > 0 && stats.down.link.dropped_loss_packets > 0, "{stats:#?}");
    assert!(stats.up.sent_bytes > (4 * MIB) as u64, "the volume crossed the relay: {stats:#?}");

    assert_eq!(mesh.restore_hash("hq", &format!("disk@{first_seq}"), None), first_hash);
    assert_eq!(mesh.restore_hash("hq", &format!("disk@{second_seq}"), None), hash_hex(&image));
    let out = mesh.verify("hq", &format!("disk@{second_seq}"), None);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stderr));

    // The branch pulls the RP back across the same lossy link (headquarters'
    // only address is the relay's); the blobs come back read unordered.
    let before = relay.stats().down;
    assert_eq!(mesh.restore_hash("branch", &format!("disk@{second_seq}"), Some("hq")), hash_hex(&image));
    let after = relay.stats().down;
    assert!(after.sent_bytes > before.sent_bytes + (4 * MIB) as u64, "the restore crossed the relay: {before:#?} {after:#?}");
    assert!(after.link.dropped_loss_packets > before.link.dropped_loss_packets, "the restore's replies met loss: {after:#?}");
    relay.shutdown();
}
