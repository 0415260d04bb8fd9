//! Story: ops edit the topology file on running nodes. A good edit (a node
//! added or removed) is applied live, without a restart; a broken edit is
//! rejected with file:line:column and the last good topology stays in force.

use std::time::Duration;

use drmesh_tests::{wait_until, TestMesh};

#[test]
fn edits_apply_live_and_broken_edits_are_rejected() {
    let mut mesh = TestMesh::new(&["a", "b", "c"]);
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &["a", "b"]));
    mesh.start("a", "topology.toml");
    mesh.start("b", "topology.toml");
    mesh.wait_connected("a", &["b"]);
    let uptime_before = mesh.ctl_json("a", "status").unwrap()["uptime_secs"].as_u64().unwrap();

    // Add c by saving the file (picked up by the file watcher, no ctl needed).
    mesh.write_file("topology.toml", &mesh.standard_topology(2, &["a", "b", "c"]));
    wait_until("a and b run version 2", Duration::from_secs(20), || {
        ["a", "b"].iter().all(|n| mesh.ctl_json(n, "status").is_some_and(|s| s["topology_version"] == 2))
    });
    mesh.start("c", "topology.toml");
    mesh.wait_connected("a", &["b", "c"]);
    mesh.wait_connected("b", &["a", "c"]);
    mesh.wait_connected("c", &["a", "b"]);
    let status = mesh.ctl_json("a", "status").unwrap();
    assert!(status["uptime_secs"].as_u64().unwrap() >= uptime_before, "a restarted?");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    assert!(status["last_reload"]["details"].to_string().contains("node added: c"), "{status}");
    assert_eq!(mesh.peer("a", "b").unwrap()["connect_count"], 1, "the a-b link must survive the reload");

    // A broken edit: syntax error on line 3. Rejected by the watcher and by ctl reload.
    let good = mesh.standard_topology(2, &["a", "b", "c"]);
    let broken = good.replacen("version = 2", "version = = 3", 1);
    mesh.write_file("topology.toml", &broken);
    let out = mesh.ctl("a", &["reload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = mesh.dir.path().join("topology.toml");
    assert!(stderr.contains(&format!("{}:3:", file.display())), "no file:line:column in:\n{stderr}");
    assert!(stderr.contains("keeps running on version 2"), "{stderr}");
    let out = mesh.ctl("b", &["reload", "--json"]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(answer["details"][0].as_str().unwrap().contains(":3:"), "{answer}");

    // A semantically bad edit (a volume naming an unknown policy) is also rejected.
    let bad = format!("{good}\n[[volume]]\nname = \"db\"\nsource = \"a\"\nkind = \"file\"\npath = \"/srv/db.img\"\ntargets = [\"b\"]\npolicy = \"nope\"\n");
    mesh.write_file("topology.toml", &bad.replace("version = 2", "version = 3"));
    wait_until("the watcher rejects the edit", Duration::from_secs(20), || {
        mesh.ctl_json("a", "status").is_some_and(|s| s["last_reload"]["ok"] == false && s["last_reload"]["details"].to_string().contains("nope"))
    });
    assert!(mesh.node("a").log_text().contains("topology edit rejected"));
    let status = mesh.ctl_json("a", "status").unwrap();
    assert_eq!(status["topology_version"], 2, "bad edit applied: {status}");
    for n in ["a", "b", "c"] {
        assert!(mesh.node_mut(n).is_running(), "{n} died on a bad edit");
    }
    mesh.wait_connected("a", &["b", "c"]);

    // Remove c: a and b drop their connections to it live.
    mesh.write_file("topology.toml", &mesh.standard_topology(4, &["a", "b"]));
    let out = mesh.ctl("a", &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("a and b forget c", Duration::from_secs(20), || {
        ["a", "b"].iter().all(|n| mesh.peer(n, "c").is_none() && mesh.ctl_json(n, "status").is_some_and(|s| s["topology_version"] == 4))
    });
    wait_until("c sees its connections closed", Duration::from_secs(20), || {
        ["a", "b"].iter().all(|n| mesh.peer_state("c", n).as_deref() != Some("connected"))
    });
    assert_eq!(mesh.peer_state("a", "b").as_deref(), Some("connected"));

    // A site uplink edit applies live and is named in the summary.
    let with_site = format!("{}\n[[site]]\nname = \"lab\"\nuplink = \"200Mbit\"\n", mesh.standard_topology(5, &["a", "b"]));
    mesh.write_file("topology.toml", &with_site);
    wait_until("a runs version 5", Duration::from_secs(20), || {
        mesh.ctl_json("a", "status").is_some_and(|s| s["topology_version"] == 5)
    });
    let status = mesh.ctl_json("a", "status").unwrap();
    let details = status["last_reload"]["details"].to_string();
    assert!(details.contains("site changed: lab (absent -> uplink 200000000 bit/s)"), "{status}");
}
