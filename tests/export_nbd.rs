//! Story: instant recovery. `drmesh export VOLUME@SEQ` serves a recovery point
//! as a disk over NBD before any restore: a reader that reads every block
//! (`qemu-img convert`) gets the bytes a restore gives; writes land in a
//! copy-on-write overlay and never in the RP; an overlay kept in a file comes
//! back with its writes; a tampered blob is an I/O error for that block only;
//! a node that holds no RP exports it from a holder over QUIC and moves to
//! another holder when that one dies; with no node running the state dir's
//! store is served directly. The socket is mode 0600.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drmesh_tests::{blob_files, build_image, drmesh_bin, file_hash, hash_hex, report_seq, write_image_atomic, write_key_file, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// A running `drmesh export`, killed (hanging up) on drop.
struct Export {
    child: Child,
    info: Value,
}

impl Export {
    fn uri(&self) -> String {
        self.info["uri"].as_str().expect("uri").to_string()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `drmesh export RP --state-dir <node> --json EXTRA...` and waits for its info line.
fn export(mesh: &TestMesh, node: &str, rp: &str, extra: &[&str]) -> Result<Export, String> {
    let mut child = Command::new(drmesh_bin())
        .args(["export", rp, "--state-dir"])
        .arg(&mesh.node(node).state_dir)
        .arg("--json")
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drmesh export");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    out.read_line(&mut line).expect("read export info");
    match serde_json::from_str::<Value>(&line).ok().and_then(|v| v.get("export").cloned()) {
        Some(info) => Ok(Export { child, info }),
        None => {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            Err(format!("{line}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }
}

fn qemu_img_convert(uri: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    let o = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", uri]).arg(out).output().expect("qemu-img");
    assert!(o.status.success(), "qemu-img convert {uri}: {}", String::from_utf8_lossy(&o.stderr));
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri).output().expect("qemu-io")
}

struct Fixture {
    mesh: TestMesh,
    image: Vec<u8>,
    rp: String,
}

fn fixture(targets: &[&str]) -> Fixture {
    let mut names = vec!["src"];
    names.extend_from_slice(targets);
    let mut mesh = TestMesh::new(&names);
    let path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0xe4_9047);
    let image = build_image(&mut rng, 24 * MIB);
    write_image_atomic(&path, &image);
    let key = mesh.dir.path().join("k");
    write_key_file(&key, &mut rng);
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.compression = Some("zstd:1".into());
    policy.encryption_key_file = Some(key);
    let vol = VolumeSpec::new("disk", "src", targets, &path, "p");
    let text = mesh.replication_topology(1, &names, &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    for t in targets {
        mesh.start(t, "topology.toml");
    }
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", targets);
    let sync = mesh.sync_ok("src", "disk");
    let seq = sync["reports"][0]["seq"].as_u64().expect("seq");
    assert!(sync["reports"].as_array().unwrap().iter().all(|r| r["seq"] == seq), "every target holds the same seq: {sync}");
    let _ = report_seq;
    Fixture { mesh, image, rp: format!("disk@{seq}") }
}

fn need_qemu_tools() -> bool {
    let ok = Command::new("qemu-img").arg("--version").stdout(Stdio::null()).status().is_ok() && Command::new("qemu-io").arg("--version").stdout(Stdio::null()).status().is_ok();
    if !ok {
        eprintln!("skipped: qemu-img and qemu-io (Debian qemu-utils) are not installed");
    }
    ok
}

#[test]
fn export_serves_the_rp_and_keeps_writes_in_the_overlay() {
    if !need_qemu_tools() {
        return;
    }
    let f = fixture(&["dst"]);
    let work = f.mesh.dir.path().to_path_buf();
    let want = hash_hex(&f.image);

    // Read-only: every block, the RP's bytes; writes refused.
    let ro = export(&f.mesh, "dst", &f.rp, &["--read-only"]).expect("export");
    let socket = PathBuf::from(ro.info["socket"].as_str().expect("socket"));
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "the export socket is private");
    assert_eq!(ro.info["size_bytes"], f.image.len() as u64);
    let copy = work.join("copy.raw");
    qemu_img_convert(&ro.uri(), &copy);
    assert_eq!(file_hash(&copy), want, "qemu-img convert over the export gives the RP's bytes");
    // A read-only export says so: qemu refuses to open it for writing.
    let o = qemu_io(&ro.uri(), &["write -P 0x5a 0 4096"]);
    assert!(!o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"), "a read-only export took a write: {}", String::from_utf8_lossy(&o.stdout));
    assert!(qemu_io_ro(&ro.uri(), &["read 0 4096"]).status.success());
    drop(ro);
    drmesh_tests::wait_until("the socket goes with the export", Duration::from_secs(10), || !socket.exists());

    // Writable, overlay in a file: unaligned writes read back, the RP is unchanged.
    let overlay = work.join("disk.overlay");
    let rw = export(&f.mesh, "dst", &f.rp, &["--overlay", overlay.to_str().unwrap()]).expect("export");
    let o = qemu_io(&rw.uri(), &["write -P 0xab 1000 10000", "read -P 0xab 1000 10000", "write -z 3145728 1048576", "read -P 0 3145728 1048576", "flush"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "qemu-io on the overlay: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let mut expected = f.image.clone();
    expected[1000..11000].fill(0xab);
    expected[3 * MIB..4 * MIB].fill(0);
    qemu_img_convert(&rw.uri(), &copy);
    assert_eq!(file_hash(&copy), hash_hex(&expected), "the export reads the writes over the RP");
    drop(rw);
    assert_eq!(std::fs::metadata(&overlay).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(f.mesh.restore_hash("dst", &f.rp, None), want, "the RP itself is never written");
    // The overlay comes back with its writes.
    let again = export(&f.mesh, "dst", &f.rp, &["--overlay", overlay.to_str().unwrap()]).expect("export with the kept overlay");
    qemu_img_convert(&again.uri(), &copy);
    assert_eq!(file_hash(&copy), hash_hex(&expected));
    drop(again);
    // Some other file as an overlay is refused, and left as it was.
    let not_overlay = work.join("not-an-overlay");
    std::fs::write(&not_overlay, vec![7u8; 8192]).unwrap();
    let err = export(&f.mesh, "dst", &f.rp, &["--overlay", not_overlay.to_str().unwrap()]).err().expect("refused");
    assert!(err.contains("not a drmesh overlay"), "{err}");
    assert_eq!(std::fs::read(&not_overlay).unwrap(), vec![7u8; 8192]);

    // A tampered blob: the block it holds is an I/O error, every other block reads fine.
    let files = blob_files(&f.mesh.node("dst").state_dir);
    let victim = &files[files.len() / 2];
    let mut bad = std::fs::read(victim).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    std::fs::write(victim, &bad).unwrap();
    let ex = export(&f.mesh, "dst", &f.rp, &["--read-only"]).expect("export");
    let blocks = f.image.len() / MIB;
    let reads: Vec<String> = (0..blocks).map(|i| format!("read {} {}", i * MIB, MIB)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    let o = qemu_io_ro(&ex.uri(), &reads);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let failed = out.lines().filter(|l| l.contains("read failed")).count();
    let ok = out.lines().filter(|l| l.starts_with("read ") && l.contains("bytes at offset")).count();
    assert_eq!(failed, 1, "exactly the tampered block fails: {out}");
    let zero_blocks = f.image.chunks(MIB).filter(|c| c.iter().all(|b| *b == 0)).count();
    assert_eq!(ok, blocks - 1, "every other block reads ({zero_blocks} of them zero): {out}");
    drop(ex);
    let log = f.mesh.node("dst").log_text();
    let named = log.lines().find(|l| l.contains("block cannot be served")).unwrap_or_else(|| panic!("the node logs the bad block:\n{log}"));
    assert!(named.contains("block=") && named.contains("content="), "{named}");
}

fn qemu_io_ro(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri).output().expect("qemu-io")
}

#[test]
fn export_from_a_holder_moves_on_when_it_dies_and_runs_without_a_node() {
    if !need_qemu_tools() {
        return;
    }
    let mut f = fixture(&["dst", "dst2"]);
    let work = f.mesh.dir.path().to_path_buf();
    let want = hash_hex(&f.image);
    let copy = work.join("copy.raw");

    // src holds no RP: it reads from dst (the first target) over QUIC.
    let ex = export(&f.mesh, "src", &f.rp, &[]).expect("remote export");
    let o = qemu_io(&ex.uri(), &["read -v 0 512"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // dst dies mid-way: the export moves to dst2 and the whole disk still reads right.
    f.mesh.kill9("dst");
    qemu_img_convert(&ex.uri(), &copy);
    assert_eq!(file_hash(&copy), want, "after the holder died, the export served every block from the other one");
    assert!(f.mesh.node("src").log_text().contains("fetching blocks from this holder"), "src logs the move to dst2");
    drop(ex);

    // No node on dst2: the state dir's store is served by the export process itself.
    assert!(f.mesh.stop("dst2"));
    let offline = export(&f.mesh, "dst2", &f.rp, &[]).expect("export without a node");
    qemu_img_convert(&offline.uri(), &copy);
    assert_eq!(file_hash(&copy), want);
    drop(offline);
}
