//! Story: an operator points Prometheus at a node (`[[node]] metrics`) and
//! opens its status page (`[[node]] status_page`) in a browser. While the
//! mesh is healthy the metrics say the volume meets its RPO, count committed
//! cycles and bytes, show the peer connected and the store's figures; the
//! page (rendered by a real headless Chromium) shows the volume green. The
//! target goes away: the metrics count failed cycles, the volume's RPO turns
//! missed and the member down; the page shows it red. The exposition passes
//! the Prometheus project's own strict OpenMetrics parser. The status page
//! refuses a foreign Host (DNS rebinding) and anything but GET/HEAD; a
//! reload that moves the metrics address moves the listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use drmesh_tests::{free_port, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

/// One HTTP/1.1 request; (status, head, body). `None` when nothing listens.
fn http(port: u16, method: &str, path: &str, host: &str) -> Option<(u16, String, String)> {
    http_with(port, method, path, host, "")
}

/// [`http`] with more header lines (`extra`, each ending in CRLF).
fn http_with(port: u16, method: &str, path: &str, host: &str, extra: &str) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_string(), body.to_string()))
}

fn get(port: u16, path: &str) -> (u16, String, String) {
    http(port, "GET", path, &format!("127.0.0.1:{port}")).unwrap_or_else(|| panic!("nothing answers on port {port}"))
}

/// The value of the sample `name{labels}` (labels as exposed, in order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Parses the exposition with the Prometheus Python client's strict
/// OpenMetrics parser; returns the number of metric families.
fn openmetrics_families(text: &str, dir: &Path) -> usize {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nprint(len(list(p(open(sys.argv[1]).read()))))",
        ])
        .arg(&file)
        .output()
        .expect("python3 (scripts/install-deps installs prometheus-client)");
    assert!(out.status.success(), "the OpenMetrics parser refused the exposition: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Headless Chromium loads `url`: its DOM as rendered, and a screenshot's
/// pixels (RGBA) with the width.
fn chromium(url: &str, dir: &Path, shot: &str) -> (String, Vec<u8>, u32) {
    let profile = tempfile::tempdir_in(dir).unwrap();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1280,1000",
    ];
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let dom = Command::new("chromium").args(common).arg(&profile_arg).arg("--dump-dom").arg(url).output().expect("chromium (scripts/install-deps installs it)");
    assert!(dom.status.success(), "chromium --dump-dom: {}", String::from_utf8_lossy(&dom.stderr));
    let png = dir.join(shot);
    let out = Command::new("chromium").args(common).arg(&profile_arg).arg(format!("--screenshot={}", png.display())).arg(url).output().unwrap();
    assert!(out.status.success(), "chromium --screenshot: {}", String::from_utf8_lossy(&out.stderr));
    // Kept for people to look at when asked (CI can keep them as artifacts).
    if let Some(keep) = std::env::var_os("DRMESH_SCREENSHOT_DIR") {
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&png, Path::new(&keep).join(shot)).unwrap();
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(info.buffer_size());
    let rgba = match info.color_type {
        png::ColorType::Rgba => pixels,
        png::ColorType::Rgb => pixels.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect(),
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    (String::from_utf8_lossy(&dom.stdout).into_owned(), rgba, info.width)
}

/// Pixels of exactly this colour.
fn pixels_of(rgba: &[u8], rgb: [u8; 3]) -> usize {
    rgba.chunks(4).filter(|p| p[..3] == rgb).count()
}

const GREEN: [u8; 3] = [0x1a, 0x7f, 0x37];
const RED: [u8; 3] = [0xcf, 0x22, 0x2e];

#[test]
fn metrics_and_status_page_follow_the_mesh() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image = mesh.dir.path().join("db.img");
    let mut data = vec![0u8; 4 << 20];
    Rng::new(0x3e7c_0001).fill(&mut data);
    write_image_atomic(&image, &data);
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.rpo = "10s".into();
    let base = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("db", "src", &["dst"], &image, "p")], &[policy]);
    let src_id = mesh.node("src").id.clone();
    let (metrics_port, page_port, moved_port) = (free_port(), free_port(), free_port());
    let topology = |version: u64, metrics_port: u16| {
        base.replacen("version = 1", &format!("version = {version}"), 1).replacen(
            &format!("id = \"{src_id}\"\n"),
            &format!("id = \"{src_id}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\nstatus_page = \"127.0.0.1:{page_port}\"\n"),
            1,
        )
    };
    mesh.write_file("topology.toml", &topology(1, metrics_port));
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // Healthy: one cycle committed, the RPO met, the peer connected.
    let mut text = String::new();
    wait_until("the metrics say the RPO is met", Duration::from_secs(60), || {
        text = http(metrics_port, "GET", "/metrics", "127.0.0.1").map(|r| r.2).unwrap_or_default();
        sample(&text, "drmesh_volume_rpo_met{volume=\"db\"}") == Some(1.0)
            && sample(&text, "drmesh_replication_cycles_total{volume=\"db\",target=\"dst\",result=\"ok\"}").unwrap_or(0.0) >= 1.0
    });
    eprintln!("{text}");
    let healthy = text.clone();
    let (status, head, _) = get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"), "{head}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(openmetrics_families(&text, mesh.dir.path()) >= 30, "{text}");
    assert_eq!(sample(&text, "drmesh_volume_rpo_seconds{volume=\"db\"}"), Some(10.0), "{text}");
    assert!(sample(&text, "drmesh_volume_last_rp_age_seconds{volume=\"db\"}").is_some_and(|age| age < 10.0), "{text}");
    assert!(sample(&text, "drmesh_volume_recovery_points{volume=\"db\"}").is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(sample(&text, "drmesh_replication_last_cycle_success{volume=\"db\",target=\"dst\"}"), Some(1.0), "{text}");
    // The first cycle read and sent the whole 4 MiB of incompressible data.
    assert!(sample(&text, "drmesh_replication_read_bytes_total{volume=\"db\",target=\"dst\"}").is_some_and(|b| b >= 4.0 * 1048576.0), "{text}");
    assert!(sample(&text, "drmesh_replication_sent_payload_bytes_total{volume=\"db\",target=\"dst\"}").is_some_and(|b| b >= 4.0 * 1048576.0), "{text}");
    // Random bytes, no filesystem: nothing skipped, and the counter says so.
    assert_eq!(sample(&text, "drmesh_replication_free_space_skipped_bytes_total{volume=\"db\",target=\"dst\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "drmesh_peer_connected{peer=\"dst\"}"), Some(1.0), "{text}");
    assert!(sample(&text, "drmesh_peer_sent_bytes_total{peer=\"dst\"}").is_some_and(|b| b >= 4.0 * 1048576.0), "{text}");
    assert!(sample(&text, "drmesh_peer_rtt_seconds{peer=\"dst\"}").is_some_and(|s| s > 0.0 && s < 1.0), "{text}");
    assert_eq!(sample(&text, "drmesh_gossip_members{state=\"alive\"}"), Some(2.0), "{text}");
    let build = format!("drmesh_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&text, &build), Some(1.0), "{text}");
    assert_eq!(sample(&text, "drmesh_store_recovery_points"), Some(0.0), "the source keeps no RPs: {text}");

    // A collection counts (the source's store is empty, the run is real).
    let out = mesh.ctl("src", &["gc", "--grace-secs", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after_gc = get(metrics_port, "/metrics").2;
    assert_eq!(sample(&after_gc, "drmesh_gc_runs_total{result=\"ok\"}"), Some(1.0), "{after_gc}");
    assert!(sample(&after_gc, "drmesh_gc_last_run_timestamp_seconds").is_some(), "{after_gc}");

    // The status page: only on its own address, only to GET/HEAD, only to a local Host.
    assert_eq!(get(metrics_port, "/").0, 404, "the metrics address serves no page");
    assert_eq!(get(page_port, "/metrics").0, 404, "the page address serves no metrics");
    let (status, head, page) = get(page_port, "/");
    assert_eq!(status, 200);
    let head_lower = head.to_ascii_lowercase();
    assert!(head_lower.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(!page.contains("<script"), "no JavaScript on the page");
    let (status, head, _) = http(page_port, "GET", "/", "attacker.example:80").unwrap();
    assert_eq!(status, 403, "a foreign Host header");
    assert!(head.to_ascii_lowercase().contains("cache-control: no-store"), "a refusal is not cached either: {head}");
    // Metrics: a scraper may name the node as it likes; a browser (it sends
    // Sec-Fetch-* headers) under a foreign name is a DNS rebinding attempt.
    let browser = "Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n";
    assert_eq!(http(metrics_port, "GET", "/metrics", "node1.example:9100").map(|r| r.0), Some(200), "a scrape by DNS name");
    let (status, head, body) = http_with(metrics_port, "GET", "/metrics", "attacker.example:80", browser).unwrap();
    assert_eq!(status, 403, "a browser under a foreign name: {body}");
    assert!(body.starts_with("a browser gets the metrics only under localhost or an IP address"), "{body}");
    assert!(head.to_ascii_lowercase().contains("cache-control: no-store"), "{head}");
    assert_eq!(http_with(metrics_port, "GET", "/metrics", &format!("127.0.0.1:{metrics_port}"), browser).map(|r| r.0), Some(200), "a browser on the node's address");
    assert_eq!(http(page_port, "GET", "/", &format!("localhost:{page_port}")).map(|r| r.0), Some(200));
    assert_eq!(http(page_port, "POST", "/", "127.0.0.1").map(|r| r.0), Some(405));
    assert_eq!(http(page_port, "HEAD", "/", "127.0.0.1").map(|r| (r.0, r.2.is_empty())), Some((200, true)));

    let url = format!("http://127.0.0.1:{page_port}/");
    let (dom, shot, width) = chromium(&url, mesh.dir.path(), "healthy.png");
    assert!(dom.contains("RPO met"), "{dom}");
    assert!(dom.contains("db@"), "the newest RP is listed: {dom}");
    assert_eq!(width, 1280);
    let (green, red) = (pixels_of(&shot, GREEN), pixels_of(&shot, RED));
    eprintln!("healthy screenshot: {green} green pixels, {red} red pixels");
    assert!(green > 300, "the met RPO and alive members show green: {green}");
    assert_eq!(red, 0, "nothing is red while healthy");

    // The target goes away: failed cycles, the RPO missed, the member down.
    assert!(mesh.stop("dst"));
    wait_until("the metrics say the RPO is missed and the target down", Duration::from_secs(120), || {
        text = http(metrics_port, "GET", "/metrics", "127.0.0.1").map(|r| r.2).unwrap_or_default();
        sample(&text, "drmesh_volume_rpo_met{volume=\"db\"}") == Some(0.0)
            && sample(&text, "drmesh_replication_cycles_total{volume=\"db\",target=\"dst\",result=\"failed\"}").unwrap_or(0.0) >= 1.0
            && sample(&text, "drmesh_gossip_members{state=\"down\"}") == Some(1.0)
    });
    eprintln!("{text}");
    assert_eq!(sample(&text, "drmesh_peer_connected{peer=\"dst\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "drmesh_replication_last_cycle_success{volume=\"db\",target=\"dst\"}"), Some(0.0), "{text}");
    openmetrics_families(&text, mesh.dir.path());
    // The example alert rules use only metrics that exist (healthy or not).
    let both = format!("{healthy}{text}");
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus-alerts.yml")).unwrap();
    let mut used: Vec<&str> = rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("drmesh_")).collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 6, "{used:?}");
    for name in used {
        assert!(both.lines().any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])), "examples/prometheus-alerts.yml uses {name}, which the node does not expose:\n{both}");
    }
    let (dom, shot, _) = chromium(&url, mesh.dir.path(), "missed.png");
    assert!(dom.contains("RPO missed by"), "{dom}");
    let red = pixels_of(&shot, RED);
    eprintln!("RPO missed screenshot: {red} red pixels");
    assert!(red > 300, "the missed RPO and the down member show red: {red}");

    // A reload moves the metrics listener.
    mesh.write_file("topology.toml", &topology(2, moved_port));
    let out = mesh.ctl("src", &["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("metrics on the new address", Duration::from_secs(20), || http(moved_port, "GET", "/metrics", "127.0.0.1").is_some_and(|r| r.0 == 200));
    wait_until("nothing on the old address", Duration::from_secs(20), || http(metrics_port, "GET", "/metrics", "127.0.0.1").is_none());
    let log = mesh.node("src").log_text();
    assert!(log.contains(&format!("http://127.0.0.1:{moved_port}/metrics")), "{log}");
}

/// A metrics address another program holds: the node says so in one WARN
/// line, keeps running without it, and serves it once the address is free.
#[test]
fn a_taken_metrics_address_is_reported_and_the_node_runs_on() {
    let mut mesh = TestMesh::new(&["a"]);
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let id = mesh.node("a").id.clone();
    let text = mesh.standard_topology(1, &["a"]).replacen(&format!("id = \"{id}\"\n"), &format!("id = \"{id}\"\nmetrics = \"127.0.0.1:{port}\"\n"), 1);
    mesh.write_file("topology.toml", &text);
    mesh.start("a", "topology.toml");
    wait_until("the node reports the taken address", Duration::from_secs(20), || mesh.node("a").log_text().contains("cannot serve HTTP on this address"));
    let log = mesh.node("a").log_text();
    assert!(log.contains(&format!("address=127.0.0.1:{port}")) && log.contains("trying again in 60 s"), "{log}");
    assert!(mesh.ctl("a", &["status"]).status.success(), "the node runs on");
    assert_eq!(log.matches("cannot serve HTTP on this address").count(), 1, "one line, not one a second: {log}");
    drop(holder);
    wait_until("metrics once the address is free", Duration::from_secs(90), || http(port, "GET", "/metrics", "127.0.0.1").is_some_and(|r| r.0 == 200));
}
