//! Story: a server's disk image holds an ext4 filesystem whose free space is
//! full of what deleted files left (here: a pattern written over the whole
//! image before `mkfs.ext4`). The image lives on XFS, so each cycle reads a
//! reflink clone (a point in time), and the filesystem is not mounted, so its
//! bitmaps say exactly what is in use. The same image is replicated twice:
//! `disk` with the default `free_space = "skip"`, `full` with `"read"`.
//!
//! - `disk`'s cycle says what it skipped, and reads and sends far less than
//!   `full`'s (the figures are printed);
//! - `disk`'s RP restores to an image whose used blocks are the source's, bit
//!   for bit, whose free blocks are zero, and which `e2fsck -fn` finds clean
//!   with the files intact; `full`'s RP is the source image bit for bit;
//! - a file deleted after the first RP: the next RP has its blocks zeroed and
//!   is still clean;
//! - a filesystem with a journal to replay (as a crash-consistent snapshot of
//!   a mounted one) is read whole, and the report says why.
//!
//! Needs root (loop-mounted XFS); skipped otherwise.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use drmesh_tests::{is_root, report_seq, run_ok, LoopFs, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// `dumpe2fs`'s free blocks of the ext4 filesystem in `image`.
fn free_blocks(image: &Path) -> BTreeSet<u64> {
    let out = Command::new("dumpe2fs").arg(image).output().expect("dumpe2fs");
    assert!(out.status.success(), "dumpe2fs: {}", String::from_utf8_lossy(&out.stderr));
    let mut free = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_prefix("  Free blocks: ")) {
        for r in line.split(", ").filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            free.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap());
        }
    }
    free
}

/// A 96 MiB image: a nonzero pattern everywhere, then ext4 with ~30 MiB of files.
fn garbage_filesystem(image: &Path, files: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pattern: Vec<u8> = (0..96 * MIB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 1
        })
        .collect();
    std::fs::write(image, &pattern).unwrap();
    std::fs::create_dir_all(files.join("srv")).unwrap();
    for i in 0..6u8 {
        let body: Vec<u8> = pattern[(i as usize) << 22..((i as usize) << 22) + (5 << 20)].iter().map(|b| b.rotate_left(u32::from(i))).collect();
        std::fs::write(files.join("srv").join(format!("data{i}.bin")), body).unwrap();
    }
    std::fs::write(files.join("hostname"), b"branch-web1\n").unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"]).arg(files).arg(image));
}

fn report(sync: &Value) -> Value {
    sync["reports"][0].clone()
}

/// A total of every cycle of `volume` so far (`ctl volumes`): `sent_payload_bytes`, `free_skipped_bytes`.
fn total(mesh: &TestMesh, volume: &str, what: &str) -> u64 {
    let data = mesh.ctl_data("src", &["volumes"]).unwrap();
    let rows = data.as_array().cloned().unwrap_or_default();
    let row = rows.iter().find(|r| r["volume"] == volume).unwrap_or_else(|| panic!("no replication of {volume}: {data}"));
    row["totals"][what].as_u64().unwrap_or_else(|| panic!("no total {what}: {row}"))
}

/// `debugfs -R "cat PATH"` of `image`.
fn cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(image).output().expect("debugfs");
    assert!(out.status.success());
    out.stdout
}

fn fsck_clean(image: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().expect("e2fsck");
    assert_eq!(out.status.code(), Some(0), "e2fsck -fn {}: {}{}", image.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Used blocks equal to the source's, free blocks zero.
fn used_equal_free_zero(restored: &[u8], source: &[u8], free: &BTreeSet<u64>) {
    assert_eq!(restored.len(), source.len());
    let (mut used, mut zeroed) = (0, 0);
    for (i, (got, was)) in restored.chunks(BLOCK as usize).zip(source.chunks(BLOCK as usize)).enumerate() {
        if free.contains(&(i as u64)) {
            assert!(got.iter().all(|&b| b == 0), "free block {i} holds bytes in the RP");
            zeroed += 1;
        } else {
            assert!(got == was, "used block {i} differs from the source");
            used += 1;
        }
    }
    eprintln!("restored: {used} used blocks equal to the source, {zeroed} free blocks zero");
}

#[test]
fn free_blocks_are_not_read_sent_or_restored() {
    if !is_root() {
        eprintln!("SKIPPED free_blocks_are_not_read_sent_or_restored: needs root to loop-mount XFS (CI runs it as root)");
        return;
    }
    let xfs = LoopFs::with_mkfs(480, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    let (disk, full, journal) = (xfs.path().join("disk.img"), xfs.path().join("full.img"), xfs.path().join("journal.img"));
    // `full` goes to a target of its own: no dedupe against `disk`'s blocks.
    let mut mesh = TestMesh::new(&["src", "dst", "dst2"]);
    garbage_filesystem(&disk, &mesh.dir.path().join("files"));
    std::fs::copy(&disk, &full).unwrap();
    std::fs::copy(&disk, &journal).unwrap();
    // As a crash-consistent snapshot of a mounted ext4 would be: a journal to replay.
    run_ok(Command::new("debugfs").args(["-w", "-R", "feature needs_recovery"]).arg(&journal));
    let volumes = [
        VolumeSpec::new("disk", "src", &["dst"], &disk, "p"),
        VolumeSpec::new("full", "src", &["dst2"], &full, "p"),
        VolumeSpec::new("journal", "src", &["dst"], &journal, "p"),
    ];
    let text = mesh.replication_topology(1, &["src", "dst", "dst2"], &volumes, &[PolicySpec::new("p", "1MiB")]);
    let text = text.replace("name = \"full\"\n", "name = \"full\"\nfree_space = \"read\"\n");
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("dst2", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst", "dst2"]);

    let source = std::fs::read(&disk).unwrap();
    let free = free_blocks(&disk);
    let free_bytes = free.len() as u64 * BLOCK;
    let skip = report(&mesh.sync_ok("src", "disk"));
    let read = report(&mesh.sync_ok("src", "full"));
    eprintln!("disk: {}\nfull: {}", skip["free_space"], read["free_space"]);
    let said = skip["free_space"].as_str().unwrap();
    assert!(said.starts_with("skipped: ext4 on the whole disk ("), "{said}");
    assert_eq!(skip["free_skipped_bytes"].as_u64().unwrap(), free_bytes, "every free block, and only those, skipped");
    assert_eq!(read["free_space"], "read: the volume has free_space = \"read\"");
    assert_eq!(read["free_skipped_bytes"], 0);
    // Bytes read: every byte when free space is read; with skip, not the
    // volume blocks wholly free (partly used ones are read, then zeroed).
    let (volume, skip_read) = (source.len() as u64, skip["scanned_bytes"].as_u64().unwrap());
    assert_eq!(read["scanned_bytes"].as_u64(), Some(volume));
    assert!(skip_read < volume && skip_read >= volume - free_bytes, "skip read {skip_read} of {volume} bytes, {free_bytes} free");
    // Totals over every cycle of each replication: the node's first scheduled
    // cycle may have run before the asked one, which then sent nothing new.
    let (skip_sent, read_sent) = (total(&mesh, "disk", "sent_payload_bytes"), total(&mesh, "full", "sent_payload_bytes"));
    assert!(total(&mesh, "disk", "free_skipped_bytes") >= free_bytes, "the totals count the skipped free space");
    assert_eq!(total(&mesh, "full", "free_skipped_bytes"), 0);
    eprintln!(
        "bench: 96 MiB image, {:.0}% of it free space holding old data: skip sent {:.1} MiB, read sent {:.1} MiB ({:.2}x); free space skipped {:.1} MiB",
        free_bytes as f64 * 100.0 / (96 * MIB) as f64,
        skip_sent as f64 / MIB as f64,
        read_sent as f64 / MIB as f64,
        skip_sent as f64 / read_sent as f64,
        free_bytes as f64 / MIB as f64
    );
    assert!(free_bytes > 40 * MIB, "the image should be mostly free: {free_bytes}");
    // The old data compresses by less than 2x: skipping it must save at least half its size.
    assert!(skip_sent + free_bytes / 2 < read_sent, "skipping free space must send far less: {skip_sent} vs {read_sent}");

    // The skipped RP: used blocks as the source, free blocks zero, clean, files intact.
    let seq = report_seq(&mesh.sync_ok("src", "disk"));
    let to = mesh.dir.path().join("disk-restored.img");
    let out = mesh.restore("dst", &format!("disk@{seq}"), &to, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    used_equal_free_zero(&std::fs::read(&to).unwrap(), &source, &free);
    fsck_clean(&to);
    assert_eq!(cat(&to, "/hostname"), b"branch-web1\n");
    assert_eq!(cat(&to, "/srv/data3.bin"), cat(&disk, "/srv/data3.bin"));
    std::fs::remove_file(&to).unwrap();
    // The full RP: the source image bit for bit.
    assert_eq!(mesh.restore_hash("dst2", &format!("full@{}", read["seq"]), None), drmesh_tests::file_hash(&full));

    // A file deleted: its blocks are free now, and zero in the next RP.
    run_ok(Command::new("debugfs").args(["-w", "-R", "rm /srv/data2.bin"]).arg(&disk));
    let now_free = free_blocks(&disk);
    assert!(now_free.len() > free.len() + 1000, "the deleted file's blocks are free");
    let after = report(&mesh.sync_ok("src", "disk"));
    assert_eq!(after["free_skipped_bytes"].as_u64().unwrap(), now_free.len() as u64 * BLOCK);
    let out = mesh.restore("dst", &format!("disk@{}", report_seq(&serde_json::json!({ "reports": [after] }))), &to, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    used_equal_free_zero(&std::fs::read(&to).unwrap(), &std::fs::read(&disk).unwrap(), &now_free);
    fsck_clean(&to);
    assert!(cat(&to, "/srv/data2.bin").is_empty(), "the deleted file is gone");

    // A journal to replay: read whole, and said so.
    let j = report(&mesh.sync_ok("src", "journal"));
    let said = j["free_space"].as_str().unwrap();
    assert!(said.starts_with("read: ") && said.contains("journal has not been replayed"), "{said}");
    assert_eq!(j["free_skipped_bytes"], 0);
    // Every block was read: the RP is the image bit for bit, old data and all.
    assert_eq!(mesh.restore_hash("dst", &format!("journal@{}", j["seq"]), None), drmesh_tests::file_hash(&journal));

    // `ctl sync-now` says it in plain text too.
    let out = Command::new(drmesh_tests::drmesh_bin()).args(["ctl", "--state-dir"]).arg(&mesh.node("src").state_dir).args(["sync-now", "disk"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("disk to dst: free space skipped: ext4 on the whole disk"), "{text}");
    drop(mesh);
    drop(xfs);
}
