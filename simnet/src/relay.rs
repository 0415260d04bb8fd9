//! A user-space UDP relay that emulates a WAN link between two real endpoints.
//!
//! This kernel has no netem, so delay cannot be added with `tc`. [`Relay`]
//! listens on a UDP address and forwards every datagram to one forward
//! address through an emulated link, like a NAT: each distinct client source
//! address gets its own upstream socket connected to the forward address, so
//! the server's replies come back to that client, from the relay's listen
//! address.
//!
//! Each direction has its own [`Link`] model (delay, jitter, loss, rate, drop-tail
//! queue): "up" is client → forward address, "down" is forward address →
//! client. A direction's link is shared by all clients, as one physical link
//! would be.
//!
//! Threads (plain std threads, blocking sockets):
//! - one receiver on the listen socket (up) and one per client on its upstream
//!   socket (down): stamp `now`, ask the link for a verdict, queue the datagram
//!   with its delivery instant;
//! - one sender per direction: sleeps on a condition variable until the
//!   earliest delivery instant (a futex with a high-resolution timeout), then
//!   sends every datagram that is due, never one early.
//!
//! Segmentation offload cuts the system calls per datagram, which are most of
//! the relay's cost at 1 Gbit/s (through [`quinn_udp`], where the kernel has
//! it):
//! - every socket receives with GRO: a sender's GSO send (as QUIC stacks do)
//!   arrives as one buffer of equal-size segments, the last one maybe shorter.
//!   The receiver splits it and runs each datagram through the link, all
//!   stamped with the same `now`, as they arrived together;
//! - a sender sends the datagrams that are due together in runs of
//!   consecutive datagrams to the same destination with the same size (the
//!   last of a run may be shorter), one GSO send per run.
//!   Only what is already due is batched: no datagram waits for others, so
//!   the emulated timing is the same as with one send per datagram. A GSO
//!   send the kernel refuses is sent again one datagram at a time.
//!
//! The link still decides per datagram, and every counter of
//! [`DirectionStats`] counts datagrams, except the two that count system
//! calls ([`DirectionStats::received_buffers`], [`DirectionStats::send_calls`]).
//!
//! Memory is bounded by the link's queue plus what is in flight (`rate ×
//! (delay + jitter)`), and in any case by [`RelayConfig::in_flight_bytes_max`].
//! Receivers poll a stop flag every [`POLL_INTERVAL`]; [`Relay::shutdown`] (or
//! dropping the relay) stops and joins every thread.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use crate::link::{Link, LinkError, LinkParams, LinkStats, Verdict};

/// How often blocked threads look at the stop flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Upper bounds (µs) of the buckets of [`DirectionStats::lateness_hist`]; the
/// last bucket holds everything above the last bound.
pub const LATENESS_BUCKETS_US: [u64; 6] = [50, 100, 200, 500, 1_000, 5_000];

/// Most payload bytes one GSO send carries: the largest UDP payload over IPv4
/// (an IP packet of at most 65,535 bytes, less 20 of IPv4 and 8 of UDP
/// header), as the kernel builds one UDP packet before it splits it.
const GSO_BYTES_MAX: usize = 65_507;

/// Most datagrams one GSO send carries (Linux's `UDP_MAX_SEGMENTS`).
const GSO_SEGMENTS_MAX: usize = 64;

/// Size of a receiver's buffer. It holds the largest UDP payload, or a GRO
/// buffer: at most 64 segments (Linux's `UDP_GRO_CNT_MAX`), each of them at
/// most a 1500-byte MTU's payload on the links GRO coalesces, and in practice
/// under 64 KiB in all (one UDP header covers them).
const RECV_BUFFER_BYTES: usize = 64 * 2048;

/// Configuration of a [`Relay`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Address to listen on for clients; port 0 picks a free port (see
    /// [`Relay::local_addr`]).
    pub listen: SocketAddr,
    /// Address every client's datagrams are forwarded to.
    pub forward: SocketAddr,
    /// Link from clients to `forward`.
    pub up: LinkParams,
    /// Link from `forward` back to clients.
    pub down: LinkParams,
    /// Seed of both links' RNGs (each direction derives its own from it).
    pub seed: u64,
    /// Most distinct client addresses served; datagrams from further clients
    /// are dropped and counted in [`RelayStats::refused_packets`].
    pub clients_max: usize,
    /// Hard cap on the payload bytes queued in one direction (queue plus in
    /// flight), which bounds memory even when the rate is unlimited; datagrams
    /// over it are dropped and counted in
    /// [`DirectionStats::dropped_overflow_packets`].
    pub in_flight_bytes_max: u64,
    /// Kernel receive/send buffer size asked for every socket (the kernel caps
    /// it at `net.core.rmem_max` / `wmem_max`).
    pub socket_buffer_bytes: usize,
}

impl RelayConfig {
    /// A relay from `listen` to `forward` with the same link in both
    /// directions, seed 0, up to 64 clients, a 64 MiB in-flight cap per
    /// direction and 4 MiB socket buffers.
    pub fn new(listen: SocketAddr, forward: SocketAddr, link: LinkParams) -> Self {
        Self {
            listen,
            forward,
            up: link.clone(),
            down: link,
            seed: 0,
            clients_max: 64,
            in_flight_bytes_max: 64 << 20,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

/// Why a [`Relay`] could not start; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A link's parameters are invalid.
    #[error("invalid {direction} link: {source}")]
    Link {
        /// `"up"` or `"down"`.
        direction: &'static str,
        /// What is wrong.
        #[source]
        source: LinkError,
    },
    /// The listen socket could not be bound or set up.
    #[error("cannot listen on UDP {addr}: {source}")]
    Listen {
        /// The listen address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A relay thread could not be started.
    #[error("cannot start relay thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Counters of one direction of a [`Relay`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// The link model's counters (datagrams in, given a delivery instant,
    /// dropped by loss, dropped by a full queue).
    pub link: LinkStats,
    /// Datagrams dropped before the link because the direction already held
    /// [`RelayConfig::in_flight_bytes_max`] bytes.
    pub dropped_overflow_packets: u64,
    /// Datagrams sent on to their destination.
    pub sent_packets: u64,
    /// Payload bytes sent on to their destination.
    pub sent_bytes: u64,
    /// Sends the OS refused (e.g. nobody listening at the destination).
    pub send_errors: u64,
    /// Datagrams given a delivery instant and not sent yet (queued, being
    /// sent, or discarded at shutdown).
    pub pending_packets: u64,
    /// Receive calls that returned datagrams for this direction. With GRO one
    /// buffer holds a sender's whole GSO send, so `link.in_packets /
    /// received_buffers` is the mean number of datagrams per receive call
    /// (datagrams dropped before the link aside).
    pub received_buffers: u64,
    /// Send calls made for this direction, each for one datagram or one GSO
    /// run: `(sent_packets + send_errors) / send_calls` is the mean number of
    /// datagrams per send call (a refused GSO send is made again one datagram
    /// at a time, and each try counts).
    pub send_calls: u64,
    /// How late datagrams were sent after their delivery instant, as counts
    /// per bucket of [`LATENESS_BUCKETS_US`] (last bucket: above the last
    /// bound). A datagram is never sent early.
    pub lateness_hist: [u64; 7],
    /// Largest lateness seen.
    pub lateness_max: Duration,
    /// Sum of all latenesses (divide by `sent_packets + send_errors` for the mean).
    pub lateness_total: Duration,
}

/// Counters of a [`Relay`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client → forward address.
    pub up: DirectionStats,
    /// Forward address → clients.
    pub down: DirectionStats,
    /// Distinct clients seen (each has an upstream socket).
    pub clients: u64,
    /// Datagrams dropped because [`RelayConfig::clients_max`] was reached.
    pub refused_packets: u64,
}

/// A datagram waiting for its delivery instant.
struct Pending<T> {
    due: Instant,
    seq: u64,
    to: T,
    payload: Vec<u8>,
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<T> Eq for Pending<T> {}
impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Pending<T> {
    /// Reversed, so that `BinaryHeap` pops the earliest (then the oldest) first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Datagrams waiting for their delivery instants, earliest first.
enum DeliveryQueue<T> {
    /// A FIFO link gives non-decreasing delivery instants (the link raises
    /// each arrival to the previous one), so arrival order is delivery
    /// order: a ring buffer, O(1) per datagram. At 1 Gbit/s and 75 ms it
    /// holds ~6,500 datagrams, where the heap's pops were the sender's
    /// largest cost in user space (measured with perf).
    Fifo(VecDeque<Pending<T>>),
    /// A link that may reorder (jitter with `reorder`): ordered by instant.
    Sorted(BinaryHeap<Pending<T>>),
}

impl<T> DeliveryQueue<T> {
    fn new(reorder: bool) -> Self {
        if reorder {
            DeliveryQueue::Sorted(BinaryHeap::new())
        } else {
            DeliveryQueue::Fifo(VecDeque::new())
        }
    }

    fn push(&mut self, p: Pending<T>) {
        match self {
            DeliveryQueue::Fifo(q) => {
                debug_assert!(q.back().is_none_or(|b| b.due <= p.due), "a FIFO link delivers in order");
                q.push_back(p);
            }
            DeliveryQueue::Sorted(q) => q.push(p),
        }
    }

    /// The earliest delivery instant.
    fn next_due(&self) -> Option<Instant> {
        match self {
            DeliveryQueue::Fifo(q) => q.front().map(|p| p.due),
            DeliveryQueue::Sorted(q) => q.peek().map(|p| p.due),
        }
    }

    fn pop(&mut self) -> Option<Pending<T>> {
        match self {
            DeliveryQueue::Fifo(q) => q.pop_front(),
            DeliveryQueue::Sorted(q) => q.pop(),
        }
    }
}

/// What the receivers and the sender of one direction share under one lock.
struct DirState<T> {
    link: Link,
    queue: DeliveryQueue<T>,
    seq: u64,
    queued_bytes: u64,
    dropped_overflow_packets: u64,
    received_buffers: u64,
    /// When the sender is asleep: the instant it will wake by itself. A
    /// receiver that queues an earlier datagram wakes it.
    sender_wakes_at: Option<Instant>,
}

/// Counters only the sender writes.
#[derive(Default)]
struct SenderCounters {
    sent_packets: AtomicU64,
    sent_bytes: AtomicU64,
    send_errors: AtomicU64,
    send_calls: AtomicU64,
    lateness_hist: [AtomicU64; 7],
    lateness_max_ns: AtomicU64,
    lateness_total_ns: AtomicU64,
}

/// One direction: link model, delivery queue, sender wake-up.
struct Direction<T> {
    state: Mutex<DirState<T>>,
    wake: Condvar,
    counters: SenderCounters,
    in_flight_bytes_max: u64,
}

impl<T> Direction<T> {
    fn new(link: Link, reorder: bool, in_flight_bytes_max: u64) -> Self {
        Self {
            state: Mutex::new(DirState {
                link,
                queue: DeliveryQueue::new(reorder),
                seq: 0,
                queued_bytes: 0,
                dropped_overflow_packets: 0,
                received_buffers: 0,
                sender_wakes_at: None,
            }),
            wake: Condvar::new(),
            counters: SenderCounters::default(),
            in_flight_bytes_max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, DirState<T>> {
        // A poisoned lock means a relay thread panicked; the counters and the
        // queue are still consistent (every update is a few plain stores), so
        // go on rather than cascade the panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the datagrams of one received buffer (see [`segments`]) through
    /// the link, in order, and queues those that are to be delivered.
    fn handle_buffer(&self, buffer: &[u8], stride: usize, to: &T)
    where
        T: Clone,
    {
        let mut st = self.lock();
        // `now` is taken under the lock, so the link sees non-decreasing
        // instants even with several receivers. The segments of one buffer
        // share it: they reached the relay together.
        let now = Instant::now();
        st.received_buffers += 1;
        let mut wake = false;
        for payload in segments(buffer, stride) {
            let len = payload.len() as u64;
            if st.queued_bytes + len > self.in_flight_bytes_max {
                st.dropped_overflow_packets += 1;
                continue;
            }
            let Verdict::Deliver { at } = st.link.handle_datagram(payload.len(), now) else {
                continue;
            };
            st.seq += 1;
            let seq = st.seq;
            st.queued_bytes += len;
            st.queue.push(Pending { due: at, seq, to: to.clone(), payload: payload.to_vec() });
            if st.sender_wakes_at.is_some_and(|w| at < w) {
                st.sender_wakes_at = None;
                wake = true;
            }
        }
        if wake {
            self.wake.notify_one();
        }
    }

    fn stats(&self) -> DirectionStats {
        let (link, dropped_overflow_packets, received_buffers) = {
            let st = self.lock();
            (st.link.stats(), st.dropped_overflow_packets, st.received_buffers)
        };
        // Read after the link, so that `pending_packets` never counts a
        // datagram that was in fact sent.
        let c = &self.counters;
        let sent_packets = c.sent_packets.load(Ordering::Relaxed);
        let send_errors = c.send_errors.load(Ordering::Relaxed);
        let mut lateness_hist = [0; 7];
        for (h, a) in lateness_hist.iter_mut().zip(&c.lateness_hist) {
            *h = a.load(Ordering::Relaxed);
        }
        DirectionStats {
            link,
            dropped_overflow_packets,
            sent_packets,
            sent_bytes: c.sent_bytes.load(Ordering::Relaxed),
            send_errors,
            pending_packets: link.delivered_packets.saturating_sub(sent_packets + send_errors),
            received_buffers,
            send_calls: c.send_calls.load(Ordering::Relaxed),
            lateness_hist,
            lateness_max: Duration::from_nanos(c.lateness_max_ns.load(Ordering::Relaxed)),
            lateness_total: Duration::from_nanos(c.lateness_total_ns.load(Ordering::Relaxed)),
        }
    }

    /// The sender loop: waits for the earliest delivery instant, then sends
    /// everything that is due (outside the lock) in GSO runs, until `stop`.
    fn run_sender(&self, stop: &AtomicBool, out: &impl Outlet<T>) {
        let mut batch: Vec<Pending<T>> = Vec::new();
        let mut gso_buf: Vec<u8> = Vec::with_capacity(GSO_BYTES_MAX);
        let mut st = self.lock();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while st.queue.next_due().is_some_and(|due| due <= now) {
                if let Some(p) = st.queue.pop() {
                    st.queued_bytes -= p.payload.len() as u64;
                    batch.push(p);
                }
            }
            if batch.is_empty() {
                let wake_at = st.queue.next_due().unwrap_or(now + POLL_INTERVAL);
                st.sender_wakes_at = Some(wake_at);
                // The futex timeout is a high-resolution timer: the wake-up
                // comes within the timer slack (50 µs by default) plus
                // scheduling latency. A 1 µs slack (prctl) was measured: mean
                // lateness 36 → 15 µs, but 42 → 70 % of a core at 1 Gbit/s,
                // and no better tail on a loaded machine; the default stays.
                st = self.wake.wait_timeout(st, wake_at - now).unwrap_or_else(|e| e.into_inner()).0;
                st.sender_wakes_at = None;
                continue;
            }
            drop(st);
            let mut rest = &batch[..];
            while let Some(first) = rest.first() {
                let n = gso_run_len(rest, |a, b| out.same_destination(a, b), out.segments_max(&first.to));
                let (run, tail) = rest.split_at(n);
                self.send_run(out, run, &mut gso_buf);
                rest = tail;
            }
            batch.clear();
            st = self.lock();
        }
    }

    /// Sends one run (see [`gso_run_len`]): one datagram with a plain send,
    /// several with one GSO send. Counts datagrams, not sends.
    fn send_run(&self, out: &impl Outlet<T>, run: &[Pending<T>], gso_buf: &mut Vec<u8>) {
        let Some(first) = run.first() else { return };
        let now = Instant::now();
        for p in run {
            self.record_lateness(now.saturating_duration_since(p.due));
        }
        let c = &self.counters;
        let to = &first.to;
        if run.len() == 1 {
            self.send_one(out, first);
            return;
        }
        gso_buf.clear();
        for p in run {
            gso_buf.extend_from_slice(&p.payload);
        }
        c.send_calls.fetch_add(1, Ordering::Relaxed);
        match out.send(to, gso_buf, Some(first.payload.len())) {
            Ok(()) => {
                c.sent_packets.fetch_add(run.len() as u64, Ordering::Relaxed);
                c.sent_bytes.fetch_add(gso_buf.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                // Either the kernel refused GSO (quinn-udp then turned it off
                // for the socket: nothing of the run left, send it all again
                // one by one), or the error concerns the destination, e.g. an
                // ICMP "port unreachable" the socket had pending: that error
                // is reported once, by this call, and one datagram at a time
                // it would have failed only the first one, so it counts
                // against the first and the others go one by one.
                let gso_refused = out.segments_max(to) < run.len();
                let skip = if gso_refused {
                    0
                } else {
                    c.send_errors.fetch_add(1, Ordering::Relaxed);
                    1
                };
                for p in &run[skip..] {
                    self.send_one(out, p);
                }
            }
        }
    }

    /// Sends one datagram with a plain send and counts it.
    fn send_one(&self, out: &impl Outlet<T>, p: &Pending<T>) {
        let c = &self.counters;
        c.send_calls.fetch_add(1, Ordering::Relaxed);
        match out.send(&p.to, &p.payload, None) {
            Ok(()) => {
                c.sent_packets.fetch_add(1, Ordering::Relaxed);
                c.sent_bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                c.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn record_lateness(&self, late: Duration) {
        let c = &self.counters;
        let us = late.as_micros();
        let bucket = LATENESS_BUCKETS_US.iter().position(|&b| us < u128::from(b)).unwrap_or(LATENESS_BUCKETS_US.len());
        c.lateness_hist[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
        c.lateness_total_ns.fetch_add(ns, Ordering::Relaxed);
        c.lateness_max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

/// The datagrams of one received buffer: one datagram, or a GRO buffer of
/// `stride`-byte segments of which the last may be shorter. An empty buffer is
/// one empty datagram.
fn segments(buffer: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    // `chunks` of an empty slice yields nothing, hence the empty datagram on
    // its own; a zero stride (never reported with data) means one datagram.
    let stride = if stride == 0 { buffer.len().max(1) } else { stride };
    buffer.chunks(stride).chain(buffer.is_empty().then_some(buffer))
}

/// How many datagrams at the start of `batch` (in sending order) go in one
/// GSO send: consecutive datagrams to the same destination
/// (`same_destination`) and of the first one's size, where the last one may
/// be shorter (it ends the run, as the kernel cuts a GSO send into
/// segment-size pieces); at most `segments_max` of them and
/// [`GSO_BYTES_MAX`] bytes in all. Empty datagrams go alone: an empty segment
/// would vanish. At least 1 when `batch` is not empty.
fn gso_run_len<T>(batch: &[Pending<T>], same_destination: impl Fn(&T, &T) -> bool, segments_max: usize) -> usize {
    let Some(first) = batch.first() else { return 0 };
    let size = first.payload.len();
    if size == 0 {
        return 1;
    }
    let (mut n, mut bytes) = (1, size);
    for p in &batch[1..] {
        let len = p.payload.len();
        if n >= segments_max || len == 0 || len > size || bytes + len > GSO_BYTES_MAX || !same_destination(&first.to, &p.to) {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break;
        }
    }
    n
}

/// A UDP socket that receives with GRO and sends with GSO where the kernel
/// has them (through quinn-udp), blocking, with [`POLL_INTERVAL`] as its read
/// timeout.
struct BatchSocket {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl BatchSocket {
    /// Sets `sock` up: GRO on, blocking with a read timeout, kernel buffers of
    /// `buffer_bytes`. quinn-udp also sets "don't fragment" (the relay never
    /// fragments a datagram; one too big for the outgoing interface fails to
    /// send), and asks for each datagram's TOS byte and destination address,
    /// which the relay ignores.
    fn new(sock: UdpSocket, buffer_bytes: usize) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        // quinn-udp is written for async runtimes and made the socket
        // non-blocking; the relay's threads block, and wake every
        // POLL_INTERVAL to look at the stop flag.
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(POLL_INTERVAL))?;
        set_buffers(&sock, buffer_bytes);
        Ok(Self { sock, state })
    }

    /// Waits (up to the read timeout) for one buffer: a datagram or a GRO
    /// batch of them (see [`segments`]), with its length, stride and source.
    /// An error is the timeout (`WouldBlock`) or what the socket reports.
    fn recv(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        let mut meta = [RecvMeta::default()];
        // A single buffer: on a blocking socket `recvmmsg` waits until all the
        // buffers it is given are filled (or the timeout), so with one it
        // returns with the first buffer, as `recv` does.
        self.state.recv(UdpSockRef::from(&self.sock), &mut [IoSliceMut::new(buf)], &mut meta)?;
        Ok(meta[0])
    }

    /// Most datagrams one send may carry now: 1 without GSO, or once the
    /// kernel refused a GSO send on this socket.
    fn segments_max(&self) -> usize {
        self.state.max_gso_segments().min(GSO_SEGMENTS_MAX)
    }

    /// Sends `contents` to `to`: one datagram, or with `segment_size` several
    /// of that size, the last one maybe shorter.
    fn send(&self, to: SocketAddr, contents: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        let transmit = Transmit { destination: to, ecn: None, contents, segment_size, src_ip: None };
        // `try_send`, not `send`: the latter logs and swallows most errors,
        // and the relay counts them.
        self.state.try_send(UdpSockRef::from(&self.sock), &transmit)
    }
}

/// Where a direction's sender puts the datagrams of destination type `T`.
trait Outlet<T> {
    /// Whether datagrams to `a` and to `b` may share a GSO send.
    fn same_destination(&self, a: &T, b: &T) -> bool;
    /// Most datagrams one send to `to` may carry now.
    fn segments_max(&self, to: &T) -> usize;
    /// Sends `contents` to `to` (see [`BatchSocket::send`]).
    fn send(&self, to: &T, contents: &[u8], segment_size: Option<usize>) -> io::Result<()>;
}

/// Up: out of a client's upstream socket, to the forward address.
struct UpOutlet {
    forward: SocketAddr,
}

impl Outlet<Arc<BatchSocket>> for UpOutlet {
    fn same_destination(&self, a: &Arc<BatchSocket>, b: &Arc<BatchSocket>) -> bool {
        Arc::ptr_eq(a, b)
    }
    fn segments_max(&self, to: &Arc<BatchSocket>) -> usize {
        to.segments_max()
    }
    fn send(&self, to: &Arc<BatchSocket>, contents: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        to.send(self.forward, contents, segment_size)
    }
}

/// Down: out of the listen socket, to a client's address.
struct DownOutlet<'a> {
    listen: &'a BatchSocket,
}

impl Outlet<SocketAddr> for DownOutlet<'_> {
    fn same_destination(&self, a: &SocketAddr, b: &SocketAddr) -> bool {
        a == b
    }
    fn segments_max(&self, _: &SocketAddr) -> usize {
        self.listen.segments_max()
    }
    fn send(&self, to: &SocketAddr, contents: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        self.listen.send(*to, contents, segment_size)
    }
}

/// State shared by the relay's threads.
struct Shared {
    stop: AtomicBool,
    listen: BatchSocket,
    forward: SocketAddr,
    /// Up: to a client's upstream socket.
    up: Direction<Arc<BatchSocket>>,
    /// Down: to a client's address, through `listen`.
    down: Direction<SocketAddr>,
    clients: AtomicU64,
    refused_packets: AtomicU64,
    clients_max: usize,
    socket_buffer_bytes: usize,
    /// Receivers of the clients' upstream sockets, joined at shutdown.
    client_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A running UDP link emulator. See the [module docs](self).
///
/// ```no_run
/// use drmesh_simnet::link::LinkParams;
/// use drmesh_simnet::relay::{Relay, RelayConfig};
/// use std::time::Duration;
///
/// let link = LinkParams { delay: Duration::from_millis(75), loss: 0.01, rate_bits_per_s: 1_000_000_000, ..LinkParams::default() };
/// let server = "127.0.0.1:7001".parse().unwrap();
/// let relay = Relay::start(RelayConfig::new("127.0.0.1:0".parse().unwrap(), server, link)).unwrap();
/// let addr = relay.local_addr(); // point the client here
/// // ...
/// let stats = relay.shutdown();
/// println!("{} datagrams lost", stats.up.link.dropped_loss_packets);
/// ```
pub struct Relay {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("local_addr", &self.local_addr).field("forward", &self.shared.forward).finish()
    }
}

/// Asks for bigger kernel buffers; a refusal only costs headroom.
fn set_buffers(sock: &UdpSocket, bytes: usize) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, RelayError> {
    thread::Builder::new().name(name.clone()).spawn(f).map_err(|source| RelayError::Spawn { name, source })
}

impl Relay {
    /// Binds the listen socket and starts the relay's threads.
    pub fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        let (up_reorder, down_reorder) = (config.up.reorder, config.down.reorder);
        let up = Link::new(config.up, config.seed).map_err(|source| RelayError::Link { direction: "up", source })?;
        // A different stream for the other direction, still fixed by the seed.
        let down_seed = config.seed ^ 0x9e37_79b9_7f4a_7c15;
        let down = Link::new(config.down, down_seed).map_err(|source| RelayError::Link { direction: "down", source })?;
        let listen_err = |source| RelayError::Listen { addr: config.listen, source };
        let listen = UdpSocket::bind(config.listen).map_err(listen_err)?;
        let listen = BatchSocket::new(listen, config.socket_buffer_bytes).map_err(listen_err)?;
        let local_addr = listen.sock.local_addr().map_err(listen_err)?;

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            listen,
            forward: config.forward,
            up: Direction::new(up, up_reorder, config.in_flight_bytes_max),
            down: Direction::new(down, down_reorder, config.in_flight_bytes_max),
            clients: AtomicU64::new(0),
            refused_packets: AtomicU64::new(0),
            clients_max: config.clients_max,
            socket_buffer_bytes: config.socket_buffer_bytes,
            client_threads: Mutex::new(Vec::new()),
        });
        let mut relay = Relay { local_addr, shared, threads: Vec::new() };

        let s = Arc::clone(&relay.shared);
        relay.threads.push(spawn("relay-tx-up".into(), move || s.up.run_sender(&s.stop, &UpOutlet { forward: s.forward }))?);
        let s = Arc::clone(&relay.shared);
        relay.threads.push(spawn("relay-tx-down".into(), move || s.down.run_sender(&s.stop, &DownOutlet { listen: &s.listen }))?);
        let s = Arc::clone(&relay.shared);
        relay.threads.push(spawn("relay-rx-up".into(), move || run_listen_receiver(&s))?);
        // On an early return `relay` is dropped, which stops what started.
        Ok(relay)
    }

    /// The address the relay listens on (with the actual port when the
    /// configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address datagrams are forwarded to.
    pub fn forward_addr(&self) -> SocketAddr {
        self.shared.forward
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        let s = &self.shared;
        RelayStats {
            up: s.up.stats(),
            down: s.down.stats(),
            clients: s.clients.load(Ordering::Relaxed),
            refused_packets: s.refused_packets.load(Ordering::Relaxed),
        }
    }

    /// Stops every thread (within about [`POLL_INTERVAL`]), waits for them and
    /// returns the final counters. Datagrams still queued are discarded (they
    /// stay counted as delivered by the link, and as pending).
    pub fn shutdown(mut self) -> RelayStats {
        self.stop_and_join();
        self.stats()
    }

    fn stop_and_join(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Relaxed);
        // Take each lock so a sender between its stop check and its wait cannot
        // miss the notification.
        drop(s.up.lock());
        s.up.wake.notify_all();
        drop(s.down.lock());
        s.down.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The listen receiver has stopped: no client thread is added any more.
        let clients = std::mem::take(&mut *s.client_threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in clients {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Opens the upstream socket of a new client and starts its receiver.
fn open_upstream(shared: &Arc<Shared>, client: SocketAddr) -> io::Result<Arc<BatchSocket>> {
    let any: SocketAddr = match shared.forward {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(shared.forward)?;
    let sock = Arc::new(BatchSocket::new(sock, shared.socket_buffer_bytes)?);
    let (s, rx) = (Arc::clone(shared), Arc::clone(&sock));
    let handle = thread::Builder::new().name(format!("relay-rx-down-{client}")).spawn(move || run_upstream_receiver(&s, &rx, client))?;
    shared.client_threads.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    Ok(sock)
}

/// Receives clients' datagrams on the listen socket and feeds the up link.
fn run_listen_receiver(shared: &Arc<Shared>) {
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    let mut clients: HashMap<SocketAddr, Arc<BatchSocket>> = HashMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let meta = match shared.listen.recv(&mut buf) {
            Ok(m) => m,
            // Timeouts let us check the stop flag; other errors (e.g. an ICMP
            // error for an earlier send to a client that went away) concern
            // one datagram, not the socket.
            Err(_) => continue,
        };
        let (buffer, from) = (&buf[..meta.len], meta.addr);
        let refuse = || shared.refused_packets.fetch_add(segments(buffer, meta.stride).count() as u64, Ordering::Relaxed);
        let upstream = match clients.get(&from) {
            Some(u) => Arc::clone(u),
            None if clients.len() >= shared.clients_max => {
                refuse();
                continue;
            }
            None => match open_upstream(shared, from) {
                Ok(u) => {
                    shared.clients.fetch_add(1, Ordering::Relaxed);
                    clients.insert(from, Arc::clone(&u));
                    u
                }
                Err(_) => {
                    refuse();
                    continue;
                }
            },
        };
        shared.up.handle_buffer(buffer, meta.stride, &upstream);
    }
}

/// Receives the forward address's replies to one client and feeds the down link.
fn run_upstream_receiver(shared: &Shared, sock: &BatchSocket, client: SocketAddr) {
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    while !shared.stop.load(Ordering::Relaxed) {
        // Errors are timeouts (to check the stop flag) and "connection
        // refused" while nobody listens at the forward address yet.
        if let Ok(meta) = sock.recv(&mut buf) {
            shared.down.handle_buffer(&buf[..meta.len], meta.stride, &client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(t0: Instant, due_ms: u64, seq: u64) -> Pending<()> {
        Pending { due: t0 + Duration::from_millis(due_ms), seq, to: (), payload: vec![0; 8] }
    }

    fn drain(q: &mut DeliveryQueue<()>) -> Vec<u64> {
        let mut order = Vec::new();
        while q.next_due().is_some() {
            order.extend(q.pop().map(|p| p.seq));
        }
        order
    }

    #[test]
    fn both_queues_deliver_earliest_first_and_ties_in_arrival_order() {
        let t0 = Instant::now();
        // A FIFO link only ever queues non-decreasing instants (ties included).
        let mut fifo = DeliveryQueue::new(false);
        for (seq, due) in [(1, 5), (2, 5), (3, 7), (4, 9)] {
            fifo.push(pending(t0, due, seq));
        }
        assert_eq!(fifo.next_due(), Some(t0 + Duration::from_millis(5)));
        assert_eq!(drain(&mut fifo), vec![1, 2, 3, 4]);
        // A reordering link may queue a later datagram with an earlier instant.
        let mut sorted = DeliveryQueue::new(true);
        for (seq, due) in [(1, 9), (2, 5), (3, 7), (4, 5)] {
            sorted.push(pending(t0, due, seq));
        }
        assert_eq!(sorted.next_due(), Some(t0 + Duration::from_millis(5)));
        assert_eq!(drain(&mut sorted), vec![2, 4, 3, 1]);
        assert!(sorted.pop().is_none());
    }

    /// A due batch of (destination, payload length), in sending order.
    fn batch(items: &[(u8, usize)]) -> Vec<Pending<u8>> {
        let t0 = Instant::now();
        items.iter().enumerate().map(|(i, &(to, len))| Pending { due: t0, seq: i as u64, to, payload: vec![to; len] }).collect()
    }

    /// The lengths of the runs `gso_run_len` cuts `items` into, one after the
    /// other, as the sender does.
    fn runs(items: &[(u8, usize)], segments_max: usize) -> Vec<usize> {
        let b = batch(items);
        let mut rest = &b[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let n = gso_run_len(rest, |a, b| a == b, segments_max);
            assert!((1..=rest.len()).contains(&n), "a run takes at least one datagram and no more than are left");
            out.push(n);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn gso_runs_split_by_destination_and_size() {
        // Same destination, same size: one run.
        assert_eq!(runs(&[(1, 1452); 5], 64), vec![5]);
        // A shorter datagram may end a run, and does end it.
        assert_eq!(runs(&[(1, 1452), (1, 1452), (1, 700), (1, 1452)], 64), vec![3, 1]);
        // A longer one starts a new run.
        assert_eq!(runs(&[(1, 700), (1, 700), (1, 1452), (1, 1452)], 64), vec![2, 2]);
        // A change of destination cuts the run, even back to an earlier one.
        assert_eq!(runs(&[(1, 1000), (1, 1000), (2, 1000), (1, 1000), (1, 1000)], 64), vec![2, 1, 2]);
        // Empty datagrams go alone (an empty segment would vanish), and do not end up in a run.
        assert_eq!(runs(&[(1, 0), (1, 0), (1, 100), (1, 0), (1, 100)], 64), vec![1, 1, 1, 1, 1]);
        // Without GSO every datagram is sent alone.
        assert_eq!(runs(&[(1, 1452); 4], 1), vec![1, 1, 1, 1]);
        assert!(runs(&[], 64).is_empty());
    }

    #[test]
    fn gso_runs_respect_the_segment_and_byte_caps() {
        assert_eq!(runs(&[(1, 100); 150], GSO_SEGMENTS_MAX), vec![64, 64, 22]);
        assert_eq!(runs(&[(1, 100); 10], 4), vec![4, 4, 2]);
        // 45 × 1452 = 65,340 bytes fit one send; a 46th would not.
        assert_eq!(runs(&[(1, 1452); 100], GSO_SEGMENTS_MAX), vec![45, 45, 10]);
        // A short last segment still has to fit.
        let mut items = vec![(1, 1452); 45];
        items.push((1, 500));
        assert_eq!(runs(&items, GSO_SEGMENTS_MAX), vec![45, 1]);
        items[44] = (1, 100);
        assert_eq!(runs(&items, GSO_SEGMENTS_MAX), vec![45, 1]);
        // Datagrams bigger than half the cap go one per send.
        assert_eq!(runs(&[(1, 40_000); 3], GSO_SEGMENTS_MAX), vec![1, 1, 1]);
        for (cap, items) in [(64, vec![(1u8, 1452); 200]), (7, vec![(1, 9000); 30])] {
            let b = batch(&items);
            let n = gso_run_len(&b, |a, b| a == b, cap);
            let bytes: usize = b[..n].iter().map(|p| p.payload.len()).sum();
            assert!(n <= cap && bytes <= GSO_BYTES_MAX, "{n} datagrams, {bytes} bytes");
        }
    }

    #[test]
    fn a_batch_socket_blocks_until_its_read_timeout() {
        // quinn-udp makes sockets non-blocking; a receiver on one would spin
        // instead of sleeping between datagrams. Only a lower bound on time:
        // a blocking read cannot time out before its timeout.
        let sock = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").expect("bind"), 1 << 16).expect("set up");
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let started = Instant::now();
        let err = sock.recv(&mut buf).expect_err("nothing was sent");
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        assert!(started.elapsed() >= POLL_INTERVAL / 2, "returned after {:?}", started.elapsed());
        // And it receives what comes.
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        peer.send_to(b"hello", sock.sock.local_addr().expect("addr")).expect("send");
        let meta = sock.recv(&mut buf).expect("a datagram");
        assert_eq!((&buf[..meta.len], meta.addr), (&b"hello"[..], peer.local_addr().expect("addr")));
    }

    #[test]
    fn a_gro_buffer_splits_into_its_datagrams() {
        let lens = |buffer: &[u8], stride| segments(buffer, stride).map(<[u8]>::len).collect::<Vec<_>>();
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(lens(&data[..10], 4), vec![4, 4, 2], "the last segment may be shorter");
        assert_eq!(lens(&data[..12], 4), vec![4, 4, 4]);
        assert_eq!(lens(&data[..10], 10), vec![10], "no GRO: one datagram");
        assert_eq!(lens(&data[..10], 0), vec![10]);
        assert_eq!(lens(&[], 0), vec![0], "an empty datagram is still a datagram");
        let parts: Vec<&[u8]> = segments(&data[..10], 4).collect();
        assert_eq!(parts, vec![&data[0..4], &data[4..8], &data[8..10]], "in order, every byte once");
    }
}
