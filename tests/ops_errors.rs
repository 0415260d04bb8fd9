//! Story: an operator makes the usual mistakes and gets clear errors that say
//! what and where, and nothing already set up is lost.

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use drmesh_tests::{build_image, drmesh, drmesh_bin, restore_result, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_makes_private_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("node");
    let s = state.to_str().unwrap();
    let out = drmesh(&["init", "--state-dir", s, "--name", "branch-1", "--address", "10.1.2.3:7400", "--site", "branch"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = stdout.lines().find_map(|l| l.strip_prefix("node id: ")).unwrap().to_string();
    // The printed block is valid topology as it stands.
    let block = &stdout[stdout.find("[[node]]").unwrap()..];
    assert!(block.contains(&format!("id = \"{id}\"")) && block.contains("addresses = [\"10.1.2.3:7400\"]"), "{block}");
    let topology = dir.path().join("t.toml");
    std::fs::write(&topology, format!("[mesh]\nname = \"m\"\nversion = 1\n\n{block}")).unwrap();
    let check = drmesh(&["topology", "check", topology.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    // What to do next, on stderr (stdout stays pasteable).
    assert!(stderr(&out).contains(&format!("drmesh run --state-dir {s} --topology FILE")) && stderr(&out).contains("drmesh topology check FILE"), "{}", stderr(&out));
    // The suggested `topology init` runs as printed and writes a file that checks.
    let hint = stderr(&out).lines().find_map(|l| l.trim().strip_prefix("drmesh topology init ")).expect("a topology init hint").to_string();
    let first = dir.path().join("first.toml");
    let args: Vec<String> = ["topology", "init"].iter().map(|a| a.to_string()).chain(hint.split_whitespace().map(|w| if w == "FILE" { first.to_str().unwrap().to_string() } else { w.to_string() })).collect();
    let made = drmesh(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(made.status.success(), "{}", stderr(&made));
    let check = drmesh(&["topology", "check", first.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    assert!(std::fs::read_to_string(&first).unwrap().contains("addresses = [\"10.1.2.3:7400\"]"));

    for f in ["node.key", "node.crt"] {
        assert_eq!(std::fs::metadata(state.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
    let key_before = std::fs::read(state.join("node.key")).unwrap();
    let again = drmesh(&["init", "--state-dir", s, "--name", "branch-1"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists") && stderr(&again).contains(&id), "{}", stderr(&again));
    assert_eq!(std::fs::read(state.join("node.key")).unwrap(), key_before, "refused init changed the key");
    // The key never appears in output.
    let key_text = String::from_utf8_lossy(&key_before).into_owned();
    let body = key_text.lines().nth(1).unwrap();
    assert!(!stdout.contains(body) && !stderr(&again).contains(body));

    let forced = drmesh(&["init", "--state-dir", s, "--name", "branch-1", "--force"]);
    assert!(forced.status.success());
    assert!(!String::from_utf8_lossy(&forced.stdout).contains(&id), "--force must make a new id");
}

#[test]
fn run_refuses_bad_setups_with_clear_errors() {
    let mut mesh = TestMesh::new(&["a", "b", "outsider"]);
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &["a", "b"]));
    let topology = mesh.dir.path().join("topology.toml");
    let t = topology.to_str().unwrap();

    // A node that is not in the topology.
    let outsider = mesh.node("outsider").state_dir.clone();
    let out = drmesh(&["run", "--state-dir", outsider.to_str().unwrap(), "--topology", t]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not in topology") && stderr(&out).contains(&mesh.node("outsider").id), "{}", stderr(&out));

    // A state dir without identity.
    let empty = mesh.dir.path().join("empty");
    let out = drmesh(&["run", "--state-dir", empty.to_str().unwrap(), "--topology", t]);
    assert!(stderr(&out).contains("no node identity") && stderr(&out).contains("drmesh init"), "{}", stderr(&out));

    // A key file others can read.
    let b_dir = mesh.node("b").state_dir.clone();
    std::fs::set_permissions(b_dir.join("node.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = drmesh(&["run", "--state-dir", b_dir.to_str().unwrap(), "--topology", t]);
    assert!(stderr(&out).contains("mode 644") && stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    std::fs::set_permissions(b_dir.join("node.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // A broken topology file: every error with file:line:column, nothing started.
    let broken = mesh.write_file("broken.toml", &mesh.standard_topology(1, &["a", "b"]).replace("site = \"lab\"", "site = 7"));
    let out = drmesh(&["run", "--state-dir", b_dir.to_str().unwrap(), "--topology", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).matches(&format!("{}:", broken.display())).count(), 2, "{}", stderr(&out));

    // A second node on the same state dir.
    mesh.start("a", "topology.toml");
    let a_dir = mesh.node("a").state_dir.clone();
    let out = drmesh(&["run", "--state-dir", a_dir.to_str().unwrap(), "--topology", t]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    assert!(mesh.ctl_json("a", "status").is_some(), "the running node lost its socket");
}

#[test]
fn ctl_says_when_no_node_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = drmesh(&["ctl", "--state-dir", dir.path().to_str().unwrap(), "status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no drmesh node is running"), "{}", stderr(&out));

    // A socket file nobody listens on (left by a crash).
    let socket = dir.path().join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = drmesh(&["ctl", "--socket", socket.to_str().unwrap(), "peers"]);
    assert!(stderr(&out).contains("stale"), "{}", stderr(&out));
    // The node's flags go before or after the command alike.
    let out = drmesh(&["ctl", "peers", "--socket", socket.to_str().unwrap()]);
    assert!(stderr(&out).contains("stale"), "{}", stderr(&out));
    let out = drmesh(&["ctl", "status", "--state-dir", dir.path().to_str().unwrap(), "--json"]);
    assert!(stderr(&out).contains("stale"), "{}", stderr(&out));
    let out = Command::new(drmesh_bin()).args(["ctl", "status"]).env_remove("DRMESH_STATE_DIR").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("which node? give --state-dir DIR (or set DRMESH_STATE_DIR) or --socket PATH"), "{}", stderr(&out));
}

#[test]
fn topology_check_lists_every_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[mesh]\nname = \"m\"\nversion = 0\n\n[[node]]\nname = \"a\"\nid = \"NOT-AN-ID\"\nsite = \"x\"\ncolour = \"red\"\n").unwrap();
    let out = drmesh(&["topology", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let f = file.display().to_string();
    for (pos, what) in [("3:11", "version"), ("7:6", "node id"), ("9:1", "colour")] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{f}:{pos}:"))).unwrap_or_else(|| panic!("no error at {pos}:\n{stdout}"));
        assert!(line.contains(what), "{line}");
    }
    assert!(stderr(&out).contains("3 errors"), "{}", stderr(&out));

    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-nodes.toml");
    let out = drmesh(&["topology", "check", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("NOT BUILT"));
    // A kind that is parsed but has no reader in this build is said to be so.
    let office = dir.path().join("branch-office.toml");
    std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/branch-office.toml"), &office).unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/hq.key"), [0x5a; 32]).unwrap();
    std::fs::set_permissions(dir.path().join("keys/hq.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = drmesh(&["topology", "check", office.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let not_built: Vec<&str> = stdout.lines().filter(|l| l.starts_with("NOT BUILT: ")).collect();
    assert_eq!(not_built, ["NOT BUILT: volume \"web1-root\": source kind ebs is not supported by this build yet; node cloud-web1 will not replicate it (its cycles fail with this reason)"], "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "hooks of app1-disk (run on node branch-app1 around each cycle's view): pre /usr/local/bin/app1-quiesce, post /usr/local/bin/app1-resume, timeout 30s"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l == "agentless pos-vm: node branch-proxy reads block node pos-disk through the qemu monitor /run/drmesh/pos.qmp, fleece in /var/lib/drmesh/fleece (keeping 1024 MiB free), guest agent /run/drmesh/pos.qga (filesystems frozen)"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("consistency group pos: volumes pos-vm, pos-vm-data of node branch-proxy, their views taken together each cycle")),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l == "metrics of hq-gw: http://10.0.0.10:9720/metrics"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "status page of hq-gw: http://127.0.0.1:9721/"), "{stdout}");

    // Drills: the check says what runs where; a drill check without its settings, or
    // drill nodes that hold none of a volume's RPs, are errors with their place.
    let with_drill = dir.path().join("drill.toml");
    let text = std::fs::read_to_string(&example).unwrap() + "\n[policy.default.drill]\nschedule = \"daily 02:00\"\nchecks = [\"fsck\", \"boot\"]\n";
    std::fs::write(&with_drill, &text).unwrap();
    let out = drmesh(&["topology", "check", with_drill.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("daily 02:00 on ") && stdout.contains("checks fsck, boot") && stdout.contains("OVERDUE after 2days"), "{stdout}");
    let bad = text.replace("checks = [\"fsck\", \"boot\"]", "checks = [\"postgres\"]\nnodes = [\"nobody\"]\nmax_unverified_age = \"0s\"");
    std::fs::write(&with_drill, bad).unwrap();
    let out = drmesh(&["topology", "check", with_drill.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(err.contains("drill check \"postgres\" needs a `postgres` table"), "{err}");
    assert!(err.contains("`max_unverified_age` in `drill` of [policy.default] is zero"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut mesh = TestMesh::new(&["a", "b"]);
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &["a", "b"]));
    let node = mesh.node("a");
    let child = Command::new(drmesh_bin())
        .args(["--log-format", "json", "run", "--state-dir"])
        .arg(&node.state_dir)
        .arg("--topology")
        .arg(mesh.dir.path().join("topology.toml"))
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = node.socket();
    wait_until("a is up", Duration::from_secs(20), || socket.exists());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    let _ = mesh.node_mut("a").is_running();
}

#[test]
fn verify_of_an_rp_that_does_not_exist_says_what_this_node_holds() {
    // v2 goes from src to b1 and b2; b2 is asked for an RP nobody has, with
    // b1 up and then with b1 stopped. b2 never names itself as a holder.
    let mut mesh = TestMesh::new(&["src", "b1", "b2"]);
    let image_path = mesh.dir.path().join("disk.img");
    write_image_atomic(&image_path, &build_image(&mut Rng::new(0x0e55_0001), 1 << 20));
    let vol = VolumeSpec::new("v2", "src", &["b1", "b2"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "b1", "b2"], &[vol], &[PolicySpec::new("p", "64KiB")]);
    mesh.write_file("topology.toml", &text);
    for node in ["b1", "b2", "src"] {
        mesh.start(node, "topology.toml");
    }
    mesh.wait_connected("src", &["b1", "b2"]);
    mesh.sync_ok("src", "v2");
    mesh.sync_ok("src", "v2");
    let held = mesh.rp_seqs("b2", "v2");
    let (first, last) = (held[0], held[held.len() - 1]);
    // With the other holder up, it is asked (it might hold more); its answer comes back.
    mesh.wait_connected("b2", &["b1"]);
    let err = restore_result(&mesh.verify("b2", "v2@999", None)).expect_err("verify of an RP that does not exist succeeded");
    eprintln!("verify v2@999 on b2 (b1 up) says: {err}");
    assert!(err.contains(&format!("no such RP here (this node holds v2@{first}..v2@{last};")), "{err}");
    assert!(err.contains("no other holder can serve it: b1 (no such recovery point there)"), "{err}");
    assert!(!err.contains("b2"), "the node names itself: {err}");
    assert!(mesh.stop("b1"));
    wait_until("b2 sees b1 gone", Duration::from_secs(30), || mesh.peer_state("b2", "b1").as_deref() != Some("connected"));

    let err = restore_result(&mesh.verify("b2", "v2@999", None)).expect_err("verify of an RP that does not exist succeeded");
    eprintln!("verify v2@999 on b2 says: {err}");
    assert!(err.starts_with("v2@999: "), "{err}");
    assert!(err.contains(&format!("no such RP here (this node holds v2@{first}..v2@{last}; `drmesh ctl rps v2` lists them)")), "{err}");
    assert!(err.contains("no other holder can serve it: b1 (not connected)"), "the other holder is not named as unreachable: {err}");
    assert!(!err.contains("b2"), "the node names itself as an unreachable holder: {err}");

    // --from naming the node itself: only its own store is looked at.
    let err = restore_result(&mesh.verify("b2", "v2@999", Some("b2"))).expect_err("verify --from b2 of an RP that does not exist succeeded");
    assert!(err.contains("no such RP here") && !err.contains("b2") && !err.contains("b1"), "{err}");

    // A volume name outside the rule is refused where it comes in, saying the rule:
    // by `drmesh ctl` before it asks the node, and by the admin socket itself.
    let out = mesh.ctl("src", &["sync-now", "../v2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad volume name \"../v2\": '.' at character 1; expected lower-case letters"), "{}", stderr(&out));
    let mut socket = std::os::unix::net::UnixStream::connect(mesh.node("src").socket()).expect("connect to the admin socket");
    socket.write_all(b"{\"cmd\":\"sync-now\",\"volume\":\"v2/../../etc\"}\n").expect("send");
    let mut line = String::new();
    std::io::BufReader::new(&socket).read_line(&mut line).expect("answer");
    let answer: serde_json::Value = serde_json::from_str(&line).expect("a JSON answer");
    assert_eq!(answer["ok"], false, "{line}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("bad request: bad volume name \"v2/../../etc\": '/' at character 3"), "{error}");
    assert!(mesh.node_mut("src").is_running());
}

/// `drmesh topology init` writes a file `topology check` accepts, with this
/// node; uncommented, its examples are valid too (they teach real keys). It
/// never writes over a file or through a symlink, and says why.
#[test]
fn topology_init_writes_a_valid_skeleton_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = drmesh(&["init", "--state-dir", state.to_str().unwrap(), "--name", "edge1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("node id: ")).unwrap().to_string();
    let file = dir.path().join("topology.toml");
    let args = ["topology", "init", file.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--name", "edge1", "--mesh", "acme", "--site", "branch", "--address", "10.0.0.5:7400"];
    let out = drmesh(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("wrote {}: mesh \"acme\", node \"edge1\"", file.display())));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&format!("id = \"{id}\"")), "{text}");
    let out = drmesh(&["topology", "check", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (mesh \"acme\" version 1, 1 node, 0 volumes, 1 policy"));

    // Every commented example, uncommented, with its placeholders filled.
    let key = dir.path().join("default.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hq = drmesh_topology::NodeId::from_public_key(&[9; 32]).to_string();
    let full: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            // Keys and tables, not prose: "# name = ...", "# [[site]]".
            Some(rest) if rest.starts_with('[') || rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => rest.to_string(),
            _ => l.to_string(),
        })
        .map(|l| l.replace("id = \"...\"", &format!("id = \"{hq}\"")).replace("\"NODE\"", "\"edge1\"").replace("/etc/drmesh/keys/default.key", key.to_str().unwrap()))
        .collect::<Vec<_>>()
        .join("\n");
    let uncommented = dir.path().join("full.toml");
    std::fs::write(&uncommented, &full).unwrap();
    let out = drmesh(&["topology", "check", uncommented.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{full}");
    assert!(stdout.contains("2 nodes, 1 volume, 1 policy"), "{stdout}");
    assert!(stdout.contains("hooks of server1-root"), "{stdout}");

    // Never over a file, never through a symlink; nothing changed.
    let out = drmesh(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("exists; topology init never overwrites a file"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    let target = dir.path().join("precious");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = drmesh(&["topology", "init", link.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--name", "edge1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // No identity yet: says which command makes one.
    let out = drmesh(&["topology", "init", dir.path().join("x.toml").to_str().unwrap(), "--state-dir", dir.path().join("none").to_str().unwrap(), "--name", "edge1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("run `drmesh init --state-dir"), "{}", stderr(&out));
    assert!(!dir.path().join("x.toml").exists());
}
