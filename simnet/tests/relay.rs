//! The UDP relay with real sockets on loopback: client → relay → echo server →
//! relay → client.
//!
//! Only lower bounds on time are asserted (a datagram never arrives before its
//! delay): upper bounds would depend on the machine's load. The loops that wait
//! for datagrams in flight give up after a generous guard, which only turns a
//! hang into a failure.
//!
//! `blast` (ignored) measures throughput, CPU and timing precision:
//! `cargo test --release -p drmesh-simnet --test relay -- --ignored --nocapture blast`.
//!
//! GSO sends (several datagrams per system call, as QUIC stacks send) go
//! through quinn-udp, as in the relay.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use drmesh_simnet::link::{LinkParams, QueueLimit};
use drmesh_simnet::relay::{Relay, RelayConfig, RelayStats, LATENESS_BUCKETS_US};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

/// Longest wait for datagrams in flight before a test gives up.
const GUARD: Duration = Duration::from_secs(30);

fn localhost0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("literal address")
}

/// A UDP echo server on loopback; stops when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = UdpSocket::bind(localhost0()).expect("bind echo");
        sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let addr = sock.local_addr().expect("echo addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 65_535];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Echo { addr, stop, thread: Some(thread) }
    }
}

impl Echo {
    /// An echo server that receives with GRO and sends each buffer back as it
    /// came, with GSO (a batch of datagrams is echoed as one send of the same
    /// segment size), as a QUIC endpoint would send.
    fn start_batched() -> Echo {
        let sock = UdpSocket::bind(localhost0()).expect("bind echo");
        let state = batched(&sock);
        let addr = sock.local_addr().expect("echo addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            let mut meta = [RecvMeta::default()];
            while !s.load(Ordering::Relaxed) {
                if state.recv(UdpSockRef::from(&sock), &mut [IoSliceMut::new(&mut buf)], &mut meta).is_err() {
                    continue;
                }
                let m = meta[0];
                let segment_size = (m.stride < m.len).then_some(m.stride);
                let t = Transmit { destination: m.addr, ecn: None, contents: &buf[..m.len], segment_size, src_ip: None };
                state.try_send(UdpSockRef::from(&sock), &t).expect("echo send");
            }
        });
        Echo { addr, stop, thread: Some(thread) }
    }
}

/// quinn-udp's state for `sock` (GRO on where the kernel has it), with the
/// socket blocking again (quinn-udp makes it non-blocking), a short read
/// timeout and 4 MiB buffers.
fn batched(sock: &UdpSocket) -> UdpSocketState {
    let state = UdpSocketState::new(UdpSockRef::from(sock)).expect("quinn-udp socket state");
    sock.set_nonblocking(false).expect("blocking");
    sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let s = socket2::SockRef::from(sock);
    s.set_recv_buffer_size(4 << 20).expect("receive buffer");
    s.set_send_buffer_size(4 << 20).expect("send buffer");
    state
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Payload of datagram `seq`: its number, then bytes derived from it.
fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.extend((4..len).map(|i| (seq as usize * 31 + i * 7) as u8));
    p
}

/// What a client got back: per sequence number, when it arrived.
struct Received {
    at: HashMap<u32, Instant>,
    corrupt: usize,
    duplicates: usize,
}

/// Receives echoes on `sock` into `out` until `stop`.
fn receive(sock: UdpSocket, lens: Arc<Vec<usize>>, out: Arc<Mutex<Received>>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    thread::spawn(move || {
        let mut buf = [0u8; 65_535];
        while !stop.load(Ordering::Relaxed) {
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let now = Instant::now();
            let mut r = out.lock().expect("not poisoned");
            let seq = buf.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match seq {
                Some(s) if (s as usize) < lens.len() && buf[..n] == payload(s, lens[s as usize])[..] => {
                    if r.at.insert(s, now).is_some() {
                        r.duplicates += 1;
                    }
                }
                _ => r.corrupt += 1,
            }
        }
    })
}

/// Waits until nothing is in flight: every datagram the client sent reached
/// the relay, every one delivered up was echoed and reached the relay again,
/// nothing is pending, and the client got every one delivered down.
fn settle(relay: &Relay, sent: u64, received: &Mutex<Received>) -> RelayStats {
    let started = Instant::now();
    loop {
        let s = relay.stats();
        let got = received.lock().expect("not poisoned").at.len() as u64;
        let quiet = s.up.link.in_packets == sent
            && s.up.pending_packets == 0
            && s.down.link.in_packets == s.up.sent_packets
            && s.down.pending_packets == 0
            && got == s.down.sent_packets;
        if quiet {
            return s;
        }
        assert!(started.elapsed() < GUARD, "datagrams still in flight after {GUARD:?}: {s:#?}, client got {got}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `lens.len()` datagrams through `relay` from a fresh client, `gap`
/// apart, and waits for what comes back.
fn run_client(relay: &Relay, lens: &[usize], gap: Duration) -> (Vec<Instant>, Received, RelayStats) {
    let sock = UdpSocket::bind(localhost0()).expect("bind client");
    sock.connect(relay.local_addr()).expect("connect client");
    let received = Arc::new(Mutex::new(Received { at: HashMap::new(), corrupt: 0, duplicates: 0 }));
    let stop = Arc::new(AtomicBool::new(false));
    let lens_arc = Arc::new(lens.to_vec());
    let rx = receive(sock.try_clone().expect("clone"), lens_arc, Arc::clone(&received), Arc::clone(&stop));
    let mut sent_at = Vec::with_capacity(lens.len());
    for (seq, &len) in lens.iter().enumerate() {
        let p = payload(seq as u32, len);
        // Stamped before the send: the relay can only see it later.
        sent_at.push(Instant::now());
        sock.send(&p).expect("send to relay");
        if !gap.is_zero() {
            thread::sleep(gap);
        }
    }
    let stats = settle(relay, lens.len() as u64, &received);
    stop.store(true, Ordering::Relaxed);
    rx.join().expect("receiver thread");
    let r = Arc::try_unwrap(received).ok().expect("receiver gone").into_inner().expect("not poisoned");
    (sent_at, r, stats)
}

#[test]
fn echo_through_lossy_delayed_link() {
    let echo = Echo::start();
    let delay = Duration::from_millis(20);
    let link = LinkParams { delay, jitter: Duration::from_millis(2), loss: 0.05, ..LinkParams::default() };
    let mut cfg = RelayConfig::new(localhost0(), echo.addr, link);
    cfg.seed = 7;
    let relay = Relay::start(cfg).expect("start relay");
    assert_ne!(relay.local_addr().port(), 0, "the bound port is reported");

    let n = 2000;
    let lens: Vec<usize> = (0..n).map(|i| 4 + (i * 37) % 1400).collect();
    let (sent_at, r, s) = run_client(&relay, &lens, Duration::from_micros(200));

    assert_eq!(r.corrupt, 0, "every echoed payload is intact");
    assert_eq!(r.duplicates, 0);
    for (seq, at) in &r.at {
        let rtt = *at - sent_at[*seq as usize];
        assert!(rtt >= 2 * delay, "datagram {seq} came back after {rtt:?}, before 2 × {delay:?}");
    }
    let missing = n as u64 - r.at.len() as u64;
    let lost = s.up.link.dropped_loss_packets + s.down.link.dropped_loss_packets;
    assert_eq!(missing, lost, "what went missing is what the links dropped: {s:#?}");
    // 5 % each way: about 195 of 2000; at least some must have been lost.
    assert!(lost > 0);
    assert_eq!(s.up.link.dropped_queue_packets + s.down.link.dropped_queue_packets, 0);
    assert_eq!(s.up.send_errors + s.down.send_errors, 0);
    assert_eq!(s.clients, 1);

    let fin = relay.shutdown();
    assert_eq!(fin.down.sent_packets, r.at.len() as u64);
}

#[test]
fn burst_over_queue_is_dropped_as_queue_full() {
    let echo = Echo::start();
    let delay = Duration::from_millis(5);
    // 800 kbit/s: a 1000-byte datagram takes 10 ms; the queue holds 5 of them.
    let link = LinkParams { delay, rate_bits_per_s: 800_000, queue: QueueLimit::Bytes(5_000), ..LinkParams::default() };
    let relay = Relay::start(RelayConfig::new(localhost0(), echo.addr, link)).expect("start relay");

    let n = 100;
    let lens = vec![1000; n];
    let (sent_at, r, s) = run_client(&relay, &lens, Duration::ZERO);

    assert_eq!((r.corrupt, r.duplicates), (0, 0));
    for (seq, at) in &r.at {
        assert!(*at - sent_at[*seq as usize] >= 2 * delay);
    }
    let queue_drops = s.up.link.dropped_queue_packets + s.down.link.dropped_queue_packets;
    assert!(s.up.link.dropped_queue_packets > 0, "a 100 kB burst into a 5 kB queue overflows it: {s:#?}");
    assert_eq!(n as u64 - r.at.len() as u64, queue_drops, "what went missing is what the queues dropped");
    assert_eq!(s.up.link.dropped_loss_packets + s.down.link.dropped_loss_packets, 0);
}

#[test]
fn datagrams_over_the_mtu_never_cross() {
    let echo = Echo::start();
    // The default link carries at most a 1500-byte Ethernet frame's UDP payload.
    let relay = Relay::start(RelayConfig::new(localhost0(), echo.addr, LinkParams::default())).expect("start relay");
    let lens = [1200, 1472, 1473, 8952, 100];
    let (_, r, s) = run_client(&relay, &lens, Duration::ZERO);
    assert_eq!((r.corrupt, r.duplicates), (0, 0));
    let mut got: Vec<u32> = r.at.keys().copied().collect();
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 4], "only the datagrams that fit came back");
    assert_eq!(s.up.link.dropped_mtu_packets, 2);
    assert_eq!(s.down.link.dropped_mtu_packets, 0);
}

#[test]
fn each_client_gets_its_own_replies() {
    let echo = Echo::start();
    let relay = Relay::start(RelayConfig::new(localhost0(), echo.addr, LinkParams::default())).expect("start relay");
    let clients: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind(localhost0()).expect("bind client")).collect();
    for (i, c) in clients.iter().enumerate() {
        c.set_read_timeout(Some(GUARD)).expect("timeout");
        c.send_to(format!("hello from {i}").as_bytes(), relay.local_addr()).expect("send");
    }
    for (i, c) in clients.iter().enumerate() {
        let mut buf = [0u8; 64];
        let (n, from) = c.recv_from(&mut buf).expect("echo comes back");
        assert_eq!(from, relay.local_addr(), "replies come from the relay");
        assert_eq!(&buf[..n], format!("hello from {i}").as_bytes());
    }
    assert_eq!(relay.shutdown().clients, 3);
}

#[test]
fn gso_sends_cross_intact_in_order_and_count_as_datagrams() {
    let echo = Echo::start_batched();
    // FIFO, no loss, unlimited rate: every datagram comes back, in order.
    let link = LinkParams { delay: Duration::from_millis(5), ..LinkParams::default() };
    let relay = Relay::start(RelayConfig::new(localhost0(), echo.addr, link)).expect("start relay");
    // The client sends with GSO through quinn-udp but reads with a plain
    // socket, so that the kernel hands it one datagram per read whatever the
    // relay sent, and each datagram's size is seen. quinn-udp's state holds
    // no socket; made on another one, it leaves GRO off on the client's.
    let client = UdpSocket::bind(localhost0()).expect("bind client");
    socket2::SockRef::from(&client).set_recv_buffer_size(4 << 20).expect("receive buffer");
    client.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let state = batched(&UdpSocket::bind(localhost0()).expect("bind"));
    let gso = state.max_gso_segments() > 1 && state.gro_segments() > 1;

    // 80 sends of 1 to 8 datagrams: sizes vary from send to send, and every
    // other send of several datagrams ends with a shorter one.
    let mut lens: Vec<usize> = Vec::new();
    let mut sends: Vec<(usize, usize, usize)> = Vec::new(); // first seq, count, segment size
    for k in 0..80usize {
        let count = 1 + k % 8;
        let size = 200 + (k * 97) % 1200;
        sends.push((lens.len(), count, size));
        lens.extend(std::iter::repeat_n(size, count));
        if count > 1 && k % 2 == 1 {
            *lens.last_mut().expect("count > 1") = size / 2;
        }
    }
    let n = lens.len();
    let total_bytes: usize = lens.iter().sum();

    let rx = client.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let got: Arc<Mutex<Vec<(u32, usize, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let (g, st, l) = (Arc::clone(&got), Arc::clone(&stop), lens.clone());
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 65_535];
        while !st.load(Ordering::Relaxed) {
            let Ok(k) = rx.recv(&mut buf) else { continue };
            let seq = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let intact = l.get(seq as usize).is_some_and(|&len| buf[..k] == payload(seq, len)[..]);
            g.lock().expect("not poisoned").push((seq, k, intact));
        }
    });

    for &(first, count, size) in &sends {
        let contents: Vec<u8> = (first..first + count).flat_map(|seq| payload(seq as u32, lens[seq])).collect();
        let segment_size = (count > 1 && gso).then_some(size);
        if segment_size.is_some() || count == 1 {
            let t = Transmit { destination: relay.local_addr(), ecn: None, contents: &contents, segment_size, src_ip: None };
            state.try_send(UdpSockRef::from(&client), &t).expect("send to relay");
        } else {
            for (seq, &len) in lens.iter().enumerate().skip(first).take(count) {
                client.send_to(&payload(seq as u32, len), relay.local_addr()).expect("send to relay");
            }
        }
    }

    let started = Instant::now();
    while got.lock().expect("not poisoned").len() < n {
        assert!(started.elapsed() < GUARD, "datagrams still in flight after {GUARD:?}: {:#?}", relay.stats());
        thread::sleep(Duration::from_millis(10));
    }
    // Anything extra (a duplicate) would have arrived by now: the echo answers at once.
    thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    let s = relay.shutdown();

    let got = std::mem::take(&mut *got.lock().expect("not poisoned"));
    let expected: Vec<(u32, usize, bool)> = lens.iter().enumerate().map(|(seq, &len)| (seq as u32, len, true)).collect();
    assert_eq!(got, expected, "every datagram back once, intact, with its size, in order");
    for d in [&s.up, &s.down] {
        assert_eq!(d.link.in_packets, n as u64, "the link counts datagrams: {s:#?}");
        assert_eq!(d.sent_packets, n as u64, "sent_packets counts datagrams: {s:#?}");
        assert_eq!(d.sent_bytes, total_bytes as u64, "sent_bytes counts payload bytes");
        assert_eq!(d.send_errors + d.pending_packets + d.dropped_overflow_packets, 0);
        assert_eq!(d.lateness_hist.iter().sum::<u64>(), n as u64, "lateness is recorded per datagram");
    }
    if gso {
        // GRO at the relay: one buffer per client send. The relay sends each
        // of them as one GSO send at most (equal-size runs due together may
        // share one), and the echo's answers come back as one buffer per send.
        assert_eq!(s.up.received_buffers, sends.len() as u64, "{s:#?}");
        assert!(s.up.send_calls <= sends.len() as u64, "{s:#?}");
        assert_eq!(s.down.received_buffers, s.up.send_calls, "{s:#?}");
        assert!(s.down.send_calls <= s.down.received_buffers, "{s:#?}");
    } else {
        println!("no GSO/GRO on this kernel: only the datagram path was tested");
    }
}

#[test]
fn every_datagram_to_a_closed_port_is_counted_once() {
    // Nobody listens at the forward address: the relay's sends draw ICMP
    // "port unreachable", which fail later sends on its connected upstream
    // socket (GSO runs or single datagrams).
    let closed = UdpSocket::bind(localhost0()).expect("bind").local_addr().expect("addr");
    let relay = Relay::start(RelayConfig::new(localhost0(), closed, LinkParams::default())).expect("start relay");
    let client = UdpSocket::bind(localhost0()).expect("bind client");
    let state = batched(&UdpSocket::bind(localhost0()).expect("bind"));
    let (sends, count, size) = (200u64, 4usize, 1000usize);
    let contents = vec![7u8; count * size];
    let segment_size = (state.max_gso_segments() > 1).then_some(size);
    for _ in 0..sends {
        if segment_size.is_some() {
            let t = Transmit { destination: relay.local_addr(), ecn: None, contents: &contents, segment_size, src_ip: None };
            state.try_send(UdpSockRef::from(&client), &t).expect("send to relay");
        } else {
            for chunk in contents.chunks(size) {
                client.send_to(chunk, relay.local_addr()).expect("send to relay");
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    let n = sends * count as u64;
    let started = Instant::now();
    let s = loop {
        let s = relay.stats();
        if s.up.link.in_packets == n && s.up.pending_packets == 0 {
            break s;
        }
        assert!(started.elapsed() < GUARD, "datagrams still in flight after {GUARD:?}: {s:#?}");
        thread::sleep(Duration::from_millis(10));
    };
    let u = &s.up;
    assert_eq!(u.sent_packets + u.send_errors, n, "each datagram is sent or failed, once: {s:#?}");
    assert_eq!(u.sent_bytes, u.sent_packets * size as u64, "bytes of the datagrams sent only");
    assert_eq!(u.lateness_hist.iter().sum::<u64>(), n);
    println!("{} sent, {} send errors, {} send calls", u.sent_packets, u.send_errors, u.send_calls);
}

/// CPU time (user + system) of this process's threads whose name starts with
/// `prefix`, from /proc.
fn threads_cpu(prefix: &str) -> Duration {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" closing the name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_secs_f64(ticks as f64 / ticks_per_s)
}

/// Measurement, not a test: one direction at about 1 Gbit/s of 1200-byte
/// datagrams through a 1 Gbit/s, 75 ms link into a sink. Prints the achieved
/// rate, the relay's CPU use and how late datagrams left. `BLAST_GSO=N` sends
/// N datagrams per GSO send (as a QUIC stack does) instead of one per send.
#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn blast() {
    let secs: f64 = std::env::var("BLAST_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3.0);
    let offered_mbit: f64 = std::env::var("BLAST_MBIT").ok().and_then(|v| v.parse().ok()).unwrap_or(950.0);
    let len = 1200usize;
    let gso: usize = std::env::var("BLAST_GSO").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);

    let sink = UdpSocket::bind(localhost0()).expect("bind sink");
    socket2::SockRef::from(&sink).set_recv_buffer_size(4 << 20).expect("sink buffer");
    sink.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let sink_addr = sink.local_addr().expect("sink addr");
    let stop = Arc::new(AtomicBool::new(false));
    let sunk = Arc::new(AtomicU64::new(0));
    let (s2, k2) = (Arc::clone(&stop), Arc::clone(&sunk));
    let sink_thread = thread::spawn(move || {
        let mut buf = [0u8; 65_535];
        while !s2.load(Ordering::Relaxed) {
            if let Ok(n) = sink.recv(&mut buf) {
                k2.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });

    let link = LinkParams { delay: Duration::from_millis(75), rate_bits_per_s: 1_000_000_000, ..LinkParams::default() };
    let relay = Relay::start(RelayConfig::new(localhost0(), sink_addr, link)).expect("start relay");
    let client = UdpSocket::bind(localhost0()).expect("bind client");
    let client_state = batched(&client);
    let gso = gso.min(client_state.max_gso_segments());
    let to = relay.local_addr();

    let p = vec![0x5a; len * gso];
    let transmit = Transmit { destination: to, ecn: None, contents: &p, segment_size: (gso > 1).then_some(len), src_ip: None };
    let pps = offered_mbit * 1e6 / (len as f64 * 8.0);
    let cpu0 = threads_cpu("relay-");
    let t0 = Instant::now();
    let mut sent = 0u64;
    // Paced in 1 ms slices.
    while t0.elapsed().as_secs_f64() < secs {
        let due = (t0.elapsed().as_secs_f64() * pps) as u64;
        while sent < due {
            if client_state.try_send(UdpSockRef::from(&client), &transmit).is_ok() {
                sent += gso as u64;
            }
        }
        thread::sleep(Duration::from_micros(1000));
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Let the 75 ms in flight drain.
    thread::sleep(Duration::from_millis(300));
    let wall = t0.elapsed().as_secs_f64();
    let cpu = threads_cpu("relay-").as_secs_f64() - cpu0.as_secs_f64();
    let s = relay.shutdown();
    stop.store(true, Ordering::Relaxed);
    sink_thread.join().expect("sink");

    let u = &s.up;
    let sent_total = u.sent_packets + u.send_errors;
    println!("offered {:.0} Mbit/s: {} datagrams of {len} B in {send_secs:.2} s", sent as f64 * len as f64 * 8.0 / send_secs / 1e6, sent);
    println!(
        "relay: in {} (kernel drops before the relay {}), sent {} = {:.0} Mbit/s over the send window, queue drops {}, overflow {}, send errors {}",
        u.link.in_packets,
        sent - u.link.in_packets,
        u.sent_packets,
        u.sent_bytes as f64 * 8.0 / send_secs / 1e6,
        u.link.dropped_queue_packets,
        u.dropped_overflow_packets,
        u.send_errors,
    );
    println!(
        "sink got {:.0} MB ({} datagrams' worth)",
        sunk.load(Ordering::Relaxed) as f64 / 1e6,
        sunk.load(Ordering::Relaxed) / len as u64
    );
    println!("relay CPU {cpu:.2} s over {wall:.2} s wall = {:.0} % of one core", cpu / wall * 100.0);
    println!(
        "datagrams per call: client send {gso}, relay receive {:.1}, relay send {:.1}",
        u.link.in_packets as f64 / u.received_buffers.max(1) as f64,
        sent_total as f64 / u.send_calls.max(1) as f64
    );
    let mut lo = 0;
    let hist: Vec<String> = u
        .lateness_hist
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let label = match LATENESS_BUCKETS_US.get(i) {
                Some(hi) => format!("{lo}-{hi} us"),
                None => format!(">{lo} us"),
            };
            lo = LATENESS_BUCKETS_US.get(i).copied().unwrap_or(lo);
            format!("{label}: {:.2} %", *c as f64 * 100.0 / sent_total.max(1) as f64)
        })
        .collect();
    println!(
        "lateness mean {:.1} us, max {:.2} ms | {}",
        u.lateness_total.as_secs_f64() * 1e6 / sent_total.max(1) as f64,
        u.lateness_max.as_secs_f64() * 1e3,
        hist.join(", ")
    );
}
