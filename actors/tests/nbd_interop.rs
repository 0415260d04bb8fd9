//! The NBD core behind a real Unix socket, driven by plain threads over an
//! in-memory disk, checked against the real clients: qemu-img and qemu-io
//! (qemu's NBD client), and libnbd's nbdinfo and nbdcopy when installed.
//! A test whose tool is missing says so and passes.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use drmesh_actors::proto::nbd::{Export, Extent, NbdConnection, NbdErrno, NbdEvent};

const DISK_BYTES: usize = 4 << 20;
/// Reads of the "flaky" export that touch this 512-byte sector fail with EIO.
const BAD_OFFSET: u64 = 3 << 20;
/// The driver stops reading a socket while this many requests are unanswered.
const MAX_IN_FLIGHT: usize = 64;
/// No tool run may take longer (a hung server must fail the test, not stall it).
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// A disk with data in a few places and zeroes (holes) elsewhere.
fn sample_disk() -> Vec<u8> {
    let mut disk = vec![0u8; DISK_BYTES];
    let mut fill = |start: usize, len: usize, salt: u8| {
        for (i, b) in disk[start..start + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(salt) | 1;
        }
    };
    fill(0, 64 << 10, 1);
    fill(1 << 20, 8 << 10, 2);
    fill((2 << 20) + 4096, 12 << 10, 3);
    fill(DISK_BYTES - 4096, 4096, 4);
    fill(BAD_OFFSET as usize - 4096, 12 << 10, 5);
    disk
}

/// One in-memory disk per export, shared by every connection.
type Disks = Arc<Vec<Mutex<Vec<u8>>>>;

struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    disks: Disks,
}

impl Server {
    /// Serves "disk" (read-write) and "flaky" (reads near [`BAD_OFFSET`] fail),
    /// both starting as [`sample_disk`].
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let exports = vec![
            Export { name: "disk".into(), size_bytes: DISK_BYTES as u64, read_only: false, description: Some("drmesh test disk".into()) },
            Export { name: "flaky".into(), size_bytes: DISK_BYTES as u64, read_only: false, description: None },
        ];
        let disks: Disks = Arc::new(exports.iter().map(|_| Mutex::new(sample_disk())).collect());
        let shared = disks.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (exports, disks) = (exports.clone(), shared.clone());
                thread::spawn(move || serve(stream, exports, disks));
            }
        });
        Server { dir, socket, disks }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn disk(&self, index: usize) -> Vec<u8> {
        self.disks[index].lock().unwrap().clone()
    }
}

/// The driver: read the socket, feed the core, answer its events (each batch
/// in reverse, so replies go out of order), write what it transmits.
fn serve(mut stream: UnixStream, exports: Vec<Export>, disks: Disks) {
    let mut conn = NbdConnection::new(exports).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut selected = 0;
    loop {
        while let Some(bytes) = conn.poll_transmit() {
            if stream.write_all(&bytes).is_err() {
                return;
            }
        }
        if conn.is_closed() {
            break;
        }
        // Back-pressure: a driver that answers from other tasks stops reading
        // here while `pending_requests()` is at its limit. This one answers
        // every batch before it blocks in `read`, so it never gets there.
        assert!(conn.wants_input() && conn.pending_requests() < MAX_IN_FLIGHT);
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            conn.handle_eof();
        } else {
            conn.handle_input(&buf[..n]);
        }
        let events: Vec<NbdEvent> = std::iter::from_fn(|| conn.poll_event()).collect();
        for event in events.into_iter().rev() {
            if let NbdEvent::Selected { index, .. } = event {
                selected = index;
                continue;
            }
            answer(&mut conn, event, &mut disks[selected].lock().unwrap(), selected == 1);
        }
        if n == 0 && !conn.is_closed() {
            break;
        }
    }
    if let Some(e) = conn.close_error() {
        eprintln!("nbd connection ended: {e}");
    }
}

fn answer(conn: &mut NbdConnection, event: NbdEvent, disk: &mut [u8], flaky: bool) {
    let range = |offset: u64, len: u32| offset as usize..offset as usize + len as usize;
    match event {
        NbdEvent::Read { handle, offset, len_bytes } => {
            let bad = flaky && offset < BAD_OFFSET + 512 && offset + u64::from(len_bytes) > BAD_OFFSET;
            let result = if bad { Err(NbdErrno::Io) } else { Ok(disk[range(offset, len_bytes)].to_vec()) };
            conn.reply_read(handle, result).unwrap();
        }
        NbdEvent::Write { handle, offset, data, .. } => {
            disk[range(offset, data.len() as u32)].copy_from_slice(&data);
            conn.reply(handle, Ok(())).unwrap();
        }
        NbdEvent::Trim { handle, offset, len_bytes, .. } | NbdEvent::WriteZeroes { handle, offset, len_bytes, .. } => {
            disk[range(offset, len_bytes)].fill(0);
            conn.reply(handle, Ok(())).unwrap();
        }
        NbdEvent::Flush { handle } => conn.reply(handle, Ok(())).unwrap(),
        NbdEvent::BlockStatus { handle, offset, len_bytes } => {
            conn.reply_block_status(handle, Ok(extents_of(disk, offset, len_bytes))).unwrap();
        }
        NbdEvent::Selected { .. } | NbdEvent::Disconnect => {}
    }
}

/// 4 KiB blocks; all-zero ones are reported as holes that read as zeroes.
fn extents_of(disk: &[u8], offset: u64, len: u32) -> Vec<Extent> {
    let mut out = Vec::new();
    let end = (offset + u64::from(len)).min(disk.len() as u64);
    let mut at = offset;
    while at < end {
        let block_end = ((at / 4096 + 1) * 4096).min(end);
        let zero = disk[at as usize..block_end as usize].iter().all(|&b| b == 0);
        out.push(Extent { len_bytes: (block_end - at) as u32, zero, hole: zero });
        at = block_end;
    }
    out
}

/// The data (non-zero) ranges of a disk at 4 KiB granularity, merged.
fn data_ranges(disk: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, block) in disk.chunks(4096).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i as u64 * 4096;
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += block.len() as u64,
            _ => out.push((start, block.len() as u64)),
        }
    }
    out
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        eprintln!("skipped: `{tool}` is not installed (Debian: qemu-utils for qemu-img/qemu-io, libnbd-bin for nbdinfo/nbdcopy)");
    }
    found
}

/// Runs a tool to completion, killing it after [`TOOL_TIMEOUT`].
fn run(tool: &str, args: &[&str]) -> Output {
    let mut child = Command::new(tool).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > TOOL_TIMEOUT {
            child.kill().unwrap();
            panic!("{tool} {args:?} did not finish in {TOOL_TIMEOUT:?}: the server hangs?");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!("$ {tool} {}\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `"key":` in a JSON object on one line (enough for qemu's and nbdinfo's output).
fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = line[at..].trim_start();
    let end = rest.find([',', '}', '\n']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

#[test]
fn qemu_img_info_and_convert_copy_the_export_byte_for_byte() {
    if !have("qemu-img") {
        return;
    }
    let server = Server::start();
    let info = run("qemu-img", &["info", "--output=json", &server.uri("disk")]);
    assert!(info.status.success());
    assert_eq!(json_field(&stdout(&info), "virtual-size"), Some(DISK_BYTES.to_string().as_str()));

    let out = server.dir.path().join("out.raw");
    let convert = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &server.uri("disk"), out.to_str().unwrap()]);
    assert!(convert.status.success());
    assert!(std::fs::read(&out).unwrap() == server.disk(0), "qemu-img convert copied other bytes than the export holds");
}

#[test]
fn qemu_io_writes_and_reads_back() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    let io = run(
        "qemu-io",
        &[
            "-f", "raw",
            "-c", "write -P 0xab 4096 8192",
            "-c", "read -P 0xab 4096 8192",
            "-c", "write -z 65536 4096",
            "-c", "read -P 0 65536 4096",
            "-c", "flush",
            "-c", "write -P 0xcd 4194303 1",
            &server.uri("disk"),
        ],
    );
    let text = stdout(&io);
    assert!(io.status.success(), "qemu-io failed");
    assert!(text.contains("wrote 8192/8192 bytes at offset 4096") && text.contains("read 8192/8192 bytes at offset 4096"));
    assert!(!text.contains("Pattern verification failed"));
    let disk = server.disk(0);
    assert!(disk[4096..12288].iter().all(|&b| b == 0xab), "the write reached the disk");
    assert!(disk[65536..69632].iter().all(|&b| b == 0), "write -z zeroed the range");
    assert_eq!(disk[DISK_BYTES - 1], 0xcd, "a one-byte write at the last byte");
    let past = run("qemu-io", &["-f", "raw", "-c", "read 4194304 512", &server.uri("disk")]);
    assert!(!past.status.success(), "a read past the end must fail");
}

#[test]
fn a_failed_read_is_an_io_error_and_other_reads_still_work() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    let bad = BAD_OFFSET.to_string();
    let (before, after) = ((BAD_OFFSET - 4096).to_string(), (BAD_OFFSET + 4096).to_string());
    let io = run(
        "qemu-io",
        &[
            "-f", "raw",
            "-c", &format!("read {before} 4096"),
            "-c", &format!("read {bad} 4096"),
            "-c", &format!("read {after} 4096"),
            "-c", "read -P 0 524288 4096",
            &server.uri("flaky"),
        ],
    );
    let text = format!("{}{}", stdout(&io), String::from_utf8_lossy(&io.stderr));
    assert!(!io.status.success(), "qemu-io reports the failed command in its exit status");
    assert!(text.contains("read failed: Input/output error"), "the bad read is an I/O error");
    assert_eq!(text.matches("read 4096/4096 bytes").count(), 3, "the other reads worked, after the failed one too");
    assert!(!text.contains("Pattern verification failed"), "and returned the right bytes");
}

#[test]
fn qemu_img_map_reports_zero_and_data_extents() {
    if !have("qemu-img") {
        return;
    }
    let server = Server::start();
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &server.uri("disk")]);
    assert!(map.status.success());
    let mut data = Vec::new();
    let mut covered = 0u64;
    for line in stdout(&map).lines().filter(|l| l.contains("\"start\"")) {
        let start: u64 = json_field(line, "start").unwrap().parse().unwrap();
        let length: u64 = json_field(line, "length").unwrap().parse().unwrap();
        assert_eq!(start, covered, "extents are consecutive");
        covered += length;
        match (json_field(line, "data"), json_field(line, "zero")) {
            (Some("true"), Some("false")) => data.push((start, length)),
            (Some("false"), Some("true")) => {}
            other => panic!("unexpected extent flags {other:?} in {line}"),
        }
    }
    assert_eq!(covered, DISK_BYTES as u64);
    assert_eq!(data, data_ranges(&server.disk(0)), "qemu-img map sees exactly the data blocks");
}

#[test]
fn nbdinfo_lists_describes_and_maps_the_exports() {
    if !have("nbdinfo") {
        return;
    }
    let server = Server::start();
    let list = run("nbdinfo", &["--list", &format!("nbd+unix:///?socket={}", server.socket.display())]);
    assert!(list.status.success());
    let text = stdout(&list);
    assert!(text.contains("export=\"disk\"") && text.contains("export=\"flaky\"") && text.contains("drmesh test disk"), "{text}");

    let json = run("nbdinfo", &["--json", &server.uri("disk")]);
    assert!(json.status.success());
    let text = stdout(&json);
    let field = |key: &str| text.lines().find_map(|l| json_field(l, key)).map(str::to_string);
    assert_eq!(field("export-size").as_deref(), Some(DISK_BYTES.to_string().as_str()));
    assert_eq!(field("is_read_only").as_deref(), Some("false"));
    assert_eq!(field("can_zero").as_deref(), Some("true"));
    assert_eq!(field("block_size_preferred").as_deref(), Some("4096"));

    // `nbdinfo --map` prints "offset length type description" per extent.
    let map = run("nbdinfo", &["--map", &server.uri("disk")]);
    assert!(map.status.success());
    let mut data = Vec::new();
    for line in stdout(&map).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (start, length, kind): (u64, u64, u32) = (fields[0].parse().unwrap(), fields[1].parse().unwrap(), fields[2].parse().unwrap());
        match kind {
            0 => data.push((start, length)),
            3 => {}
            other => panic!("unexpected base:allocation type {other} in {line}"),
        }
    }
    assert_eq!(data, data_ranges(&server.disk(0)));
}

#[test]
fn nbdcopy_copies_the_export_with_many_requests_in_flight() {
    if !have("nbdcopy") {
        return;
    }
    let server = Server::start();
    let out: &Path = &server.dir.path().join("copy.raw");
    std::fs::File::create(out).unwrap();
    let copy = run("nbdcopy", &["--requests=32", "--request-size=65536", &server.uri("disk"), out.to_str().unwrap()]);
    assert!(copy.status.success());
    assert!(std::fs::read(out).unwrap() == server.disk(0), "nbdcopy copied other bytes than the export holds");
}
