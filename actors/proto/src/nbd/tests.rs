//! A small NBD client (encoder and stream decoder) and an in-memory driver,
//! run against the core with every kind of input split.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

// ---- client side ----

const FIXED_NO_ZEROES: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
const DISK_BYTES: u64 = 1 << 20;
const RO_BYTES: u64 = 64 << 10;

fn exports() -> Vec<Export> {
    vec![
        Export { name: "disk".into(), size_bytes: DISK_BYTES, read_only: false, description: Some("test disk".into()) },
        Export { name: "ro".into(), size_bytes: RO_BYTES, read_only: true, description: None },
    ]
}

fn flags(f: u32) -> Vec<u8> {
    f.to_be_bytes().to_vec()
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(OPTION_MAGIC);
    v.put_u32(option);
    v.put_u32(data.len() as u32);
    v.put_slice(data);
    v
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u16(infos.len() as u16);
    for i in infos {
        v.put_u16(*i);
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u32(queries.len() as u32);
    for q in queries {
        v.put_u32(q.len() as u32);
        v.put_slice(q.as_bytes());
    }
    v
}

fn req(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(REQUEST_MAGIC);
    v.put_u16(flags);
    v.put_u16(kind);
    v.put_u64(cookie);
    v.put_u64(offset);
    v.put_u32(len);
    v
}

fn write_req(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = req(0, CMD_WRITE, cookie, offset, data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// Client flags, structured replies, `base:allocation` and `NBD_OPT_GO` on `name`.
fn structured_handshake(name: &str) -> Vec<u8> {
    let mut v = flags(FIXED_NO_ZEROES);
    v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    v.extend(opt(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION])));
    v.extend(opt(OPT_GO, &go_data(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])));
    v
}

/// Client flags and `NBD_OPT_GO` on `name`: simple replies only.
fn simple_handshake(name: &str) -> Vec<u8> {
    let mut v = flags(FIXED_NO_ZEROES);
    v.extend(opt(OPT_GO, &go_data(name, &[])));
    v
}

/// Reads the server's byte stream as a client would.
struct Stream<'a>(&'a [u8]);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple { cookie: u64, errno: u32, data: Vec<u8> },
    Chunk { cookie: u64, flags: u16, kind: u16, payload: Vec<u8> },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The errno of a simple reply or an error chunk, 0 for success.
    fn errno(&self) -> u32 {
        match self {
            Reply::Simple { errno, .. } => *errno,
            Reply::Chunk { kind: REPLY_TYPE_ERROR, payload, .. } => u32::from_be_bytes(payload[..4].try_into().unwrap()),
            Reply::Chunk { .. } => 0,
        }
    }

    /// The bytes a successful read reply stands for.
    fn read_data(&self) -> Vec<u8> {
        match self {
            Reply::Simple { errno: 0, data, .. } => data.clone(),
            Reply::Chunk { kind: REPLY_TYPE_OFFSET_DATA, payload, .. } => payload[8..].to_vec(),
            Reply::Chunk { kind: REPLY_TYPE_OFFSET_HOLE, payload, .. } => {
                vec![0; u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize]
            }
            other => panic!("not a successful read: {other:?}"),
        }
    }
}

impl<'a> Stream<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.0.len() >= n, "server stream ends early: {} bytes left, {n} wanted", self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }

    fn greeting(&mut self) {
        assert_eq!(self.u64(), INIT_MAGIC);
        assert_eq!(self.u64(), OPTION_MAGIC);
        assert_eq!(self.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        let option = self.u32();
        let reply = self.u32();
        let len = self.u32() as usize;
        (option, reply, self.take(len).to_vec())
    }

    /// Option replies up to and including the final one (ACK or an error).
    fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// One transmission reply; `read_lens` tells which cookies are reads
    /// (a simple reply is not self-describing).
    fn reply(&mut self, read_lens: &BTreeMap<u64, u32>) -> Reply {
        match self.u32() {
            SIMPLE_REPLY_MAGIC => {
                let errno = self.u32();
                let cookie = self.u64();
                let data = match (errno, read_lens.get(&cookie)) {
                    (0, Some(&len)) => self.take(len as usize).to_vec(),
                    _ => Vec::new(),
                };
                Reply::Simple { cookie, errno, data }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16();
                let kind = self.u16();
                let cookie = self.u64();
                let len = self.u32() as usize;
                Reply::Chunk { cookie, flags, kind, payload: self.take(len).to_vec() }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every remaining reply, by cookie (replies come in any order).
    fn replies_by_cookie(&mut self, read_lens: &BTreeMap<u64, u32>) -> BTreeMap<u64, Reply> {
        let mut out = BTreeMap::new();
        while !self.is_empty() {
            let r = self.reply(read_lens);
            assert!(out.insert(r.cookie(), r.clone()).is_none(), "two replies for cookie {}", r.cookie());
        }
        out
    }
}

/// Checks that the rest of a structured-replies stream is made of well-formed
/// messages (no simple reply carries data there); returns how many.
fn check_structured_stream(mut bytes: &[u8]) -> Result<usize, String> {
    fn next(n: usize, bytes: &mut &[u8]) -> Result<Vec<u8>, String> {
        if bytes.len() < n {
            return Err(format!("stream cut inside a message ({} of {n} bytes)", bytes.len()));
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head.to_vec())
    }
    let mut count = 0;
    while !bytes.is_empty() {
        let magic = u32::from_be_bytes(next(4, &mut bytes)?.try_into().unwrap());
        match magic {
            SIMPLE_REPLY_MAGIC => {
                next(12, &mut bytes)?;
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = next(16, &mut bytes)?;
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
                let p = next(len, &mut bytes)?;
                if flags != REPLY_FLAG_DONE {
                    return Err(format!("chunk flags {flags:#x}"));
                }
                let ok = match kind {
                    REPLY_TYPE_NONE => len == 0,
                    REPLY_TYPE_OFFSET_DATA => len >= 9,
                    REPLY_TYPE_OFFSET_HOLE => len == 12 && p[8..12] != [0; 4],
                    REPLY_TYPE_BLOCK_STATUS => {
                        len >= 12 && (len - 4).is_multiple_of(8) && p[4..].chunks(8).all(|d| d[..4] != [0; 4])
                    }
                    REPLY_TYPE_ERROR => {
                        len >= 6 && p[..4] != [0; 4] && usize::from(u16::from_be_bytes([p[4], p[5]])) == len - 6
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!("malformed chunk of type {kind} and {len} bytes"));
                }
            }
            other => return Err(format!("bad magic {other:#x}")),
        }
        count += 1;
    }
    Ok(count)
}

// ---- driver side ----

/// Answers events from in-memory disks, like `drmesh export` would.
struct Driver {
    disks: Vec<Vec<u8>>,
    selected: usize,
    /// Reads touching this byte fail with EIO.
    bad_byte: Option<u64>,
    /// Events answered, in order, with what was answered (reads: the data).
    log: Vec<(NbdEvent, Result<Vec<u8>, NbdErrno>)>,
    /// Read data and block status descriptors supplied, in bytes.
    supplied_bytes: usize,
    /// Answer each batch of events in an order drawn from this, if set.
    shuffle: Option<u64>,
    /// Fail some requests with EIO (driven by `shuffle`'s generator).
    random_errors: bool,
}

impl Driver {
    fn new() -> Self {
        let disks = exports().iter().map(|e| vec![0u8; e.size_bytes as usize]).collect();
        Driver { disks, selected: 0, bad_byte: None, log: Vec::new(), supplied_bytes: 0, shuffle: None, random_errors: false }
    }

    fn next_random(&mut self) -> u64 {
        let s = self.shuffle.get_or_insert(0x9E37_79B9_7F4A_7C15);
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    fn serve(&mut self, conn: &mut NbdConnection) {
        let mut events: Vec<NbdEvent> = std::iter::from_fn(|| conn.poll_event()).collect();
        if self.shuffle.is_some() {
            for i in (1..events.len()).rev() {
                let j = (self.next_random() % (i as u64 + 1)) as usize;
                events.swap(i, j);
            }
        }
        for event in events {
            let fail = self.random_errors && self.next_random().is_multiple_of(5);
            self.answer(conn, event, fail);
        }
    }

    fn answer(&mut self, conn: &mut NbdConnection, event: NbdEvent, fail: bool) {
        let disk = &mut self.disks[self.selected];
        let range = |offset: u64, len: u32| offset as usize..offset as usize + len as usize;
        let (result, logged) = match &event {
            NbdEvent::Selected { index, .. } => {
                self.selected = *index;
                return;
            }
            NbdEvent::Disconnect => return,
            NbdEvent::Read { handle, offset, len_bytes } => {
                let r = range(*offset, *len_bytes);
                let bad = self.bad_byte.is_some_and(|b| r.contains(&(b as usize)));
                let result = if bad || fail { Err(NbdErrno::Io) } else { Ok(disk[r].to_vec()) };
                if let Ok(d) = &result {
                    self.supplied_bytes += d.len();
                }
                conn.reply_read(*handle, result.clone()).unwrap();
                (Ok(()), result)
            }
            NbdEvent::Write { handle, offset, data, .. } => {
                let result = if fail { Err(NbdErrno::Io) } else { Ok(()) };
                if !fail {
                    disk[range(*offset, data.len() as u32)].copy_from_slice(data);
                }
                (conn.reply(*handle, result), result.map(|()| Vec::new()))
            }
            NbdEvent::Trim { handle, offset, len_bytes, .. } | NbdEvent::WriteZeroes { handle, offset, len_bytes, .. } => {
                disk[range(*offset, *len_bytes)].fill(0);
                (conn.reply(*handle, Ok(())), Ok(Vec::new()))
            }
            NbdEvent::Flush { handle } => (conn.reply(*handle, Ok(())), Ok(Vec::new())),
            NbdEvent::BlockStatus { handle, offset, len_bytes } => {
                let extents = extents_of(disk, *offset, *len_bytes);
                self.supplied_bytes += 8 * extents.len();
                (conn.reply_block_status(*handle, Ok(extents)), Ok(Vec::new()))
            }
        };
        result.unwrap();
        self.log.push((event, logged));
    }
}

/// `base:allocation` of an in-memory disk: 4 KiB blocks, all-zero ones are holes.
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

/// Runs `input` cut at `cuts` through a fresh connection served by `driver`;
/// returns everything the server wrote.
fn run(input: &[u8], cuts: &[usize], driver: &mut Driver) -> (Vec<u8>, NbdConnection) {
    let mut conn = NbdConnection::new(exports()).unwrap();
    let mut out = Vec::new();
    let drain = |conn: &mut NbdConnection, out: &mut Vec<u8>| {
        while let Some(b) = conn.poll_transmit() {
            out.extend_from_slice(&b);
        }
    };
    drain(&mut conn, &mut out);
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(start, input.len());
        conn.handle_input(&input[start..cut]);
        driver.serve(&mut conn);
        drain(&mut conn, &mut out);
        start = cut;
    }
    (out, conn)
}

/// The server's output as a client sees it: the handshake bytes (the first
/// `handshake_len`), then the replies by cookie, whose order may vary with
/// how the input was split.
fn as_client_sees(out: &[u8], handshake_len: usize, read_lens: &BTreeMap<u64, u32>) -> (Vec<u8>, BTreeMap<u64, Reply>) {
    (out[..handshake_len].to_vec(), Stream(&out[handshake_len..]).replies_by_cookie(read_lens))
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

// ---- sessions ----

/// A qemu-like session: structured replies, block status, every command.
fn structured_session() -> Vec<u8> {
    let mut v = structured_handshake("disk");
    v.extend(write_req(1, 4096, &[0xab; 8192]));
    v.extend(req(0, CMD_READ, 2, 4096, 8192));
    v.extend(req(CMD_FLAG_DF, CMD_READ, 3, 0, 4096));
    v.extend(req(0, CMD_TRIM, 4, 0, 512));
    v.extend(req(CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, CMD_WRITE_ZEROES, 5, 4096, 512));
    v.extend(req(0, CMD_BLOCK_STATUS, 6, 0, 65536));
    v.extend(req(0, CMD_READ, 7, DISK_BYTES - 10, 20));
    v.extend(req(0, CMD_FLUSH, 8, 0, 0));
    v.extend(req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, 4096, 100));
    v.extend(req(0, CMD_DISC, 10, 0, 0));
    v
}

/// An old-style session: `NBD_OPT_EXPORT_NAME` with zeroes, simple replies.
fn simple_session() -> Vec<u8> {
    let mut v = flags(FLAG_C_FIXED_NEWSTYLE);
    v.extend(opt(OPT_EXPORT_NAME, b""));
    v.extend(write_req(1, 0, b"hello, world"));
    v.extend(req(0, CMD_READ, 2, 0, 12));
    v.extend(req(0, CMD_READ, 3, 4096, 4096));
    v.extend(req(0, CMD_READ, 4, 0, 100));
    v.extend(req(CMD_FLAG_DF, CMD_READ, 5, 0, 1));
    v.extend(req(0, CMD_BLOCK_STATUS, 6, 0, 1));
    v.extend(write_req(7, DISK_BYTES - 2, b"abc"));
    v.extend(req(0, CMD_READ, 8, 0, 1));
    v.extend(req(0, CMD_DISC, 9, 0, 0));
    v
}

/// A browsing session that never enters transmission.
fn handshake_session() -> Vec<u8> {
    let mut v = flags(FIXED_NO_ZEROES);
    v.extend(opt(OPT_LIST, &[]));
    v.extend(opt(OPT_STARTTLS, &[]));
    v.extend(opt(42, b"whatever"));
    v.extend(opt(OPT_INFO, &go_data("ro", &[INFO_NAME, INFO_DESCRIPTION])));
    v.extend(opt(OPT_INFO, &go_data("nope", &[])));
    v.extend(opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])));
    v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    v.extend(opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["base:", "x-other:thing"])));
    v.extend(opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"])));
    v.extend(opt(OPT_ABORT, &[]));
    v
}

// ---- tests ----

#[test]
fn structured_session_reads_the_same_however_it_is_split() {
    let input = structured_session();
    let (whole, conn) = run(&input, &[], &mut Driver::new());
    assert!(conn.is_closed() && conn.close_error().is_none(), "clean close after NBD_CMD_DISC: {conn:?}");

    let mut s = Stream(&whole);
    s.greeting();
    assert_eq!(s.opt_replies(), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
    let mut meta = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
    assert_eq!(s.opt_replies(), vec![(OPT_SET_META_CONTEXT, REP_META_CONTEXT, meta), (OPT_SET_META_CONTEXT, REP_ACK, vec![])]);
    let go = s.opt_replies();
    let mut info_export = vec![0, 0];
    info_export.extend_from_slice(&DISK_BYTES.to_be_bytes());
    let tflags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF;
    info_export.extend_from_slice(&tflags.to_be_bytes());
    let mut block_size = vec![0, 3];
    for v in [1u32, 4096, 32 << 20] {
        block_size.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(
        go,
        vec![
            (OPT_GO, REP_INFO, info_export),
            (OPT_GO, REP_INFO, b"\0\x01disk".to_vec()),
            (OPT_GO, REP_INFO, b"\0\x02test disk".to_vec()),
            (OPT_GO, REP_INFO, block_size),
            (OPT_GO, REP_ACK, vec![]),
        ]
    );
    let replies_len = s.0.len();
    let r = s.replies_by_cookie(&BTreeMap::new());
    assert_eq!(r.len(), 9, "one reply per request but DISC");
    assert_eq!(r[&1], Reply::Simple { cookie: 1, errno: 0, data: vec![] });
    assert!(matches!(&r[&2], Reply::Chunk { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, payload, .. } if payload[..8] == 4096u64.to_be_bytes()));
    assert_eq!(r[&2].read_data(), vec![0xab; 8192]);
    assert!(matches!(r[&3], Reply::Chunk { kind: REPLY_TYPE_OFFSET_HOLE, .. }), "all-zero read as a hole: {:?}", r[&3]);
    assert_eq!(r[&3].read_data(), vec![0; 4096]);
    assert_eq!(r[&4], Reply::Simple { cookie: 4, errno: 0, data: vec![] });
    assert_eq!(r[&5], Reply::Simple { cookie: 5, errno: 0, data: vec![] });
    let mut status = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, flags) in [(4096u32, STATE_HOLE | STATE_ZERO), (8192, 0), (65536 - 12288, STATE_HOLE | STATE_ZERO)] {
        status.extend_from_slice(&len.to_be_bytes());
        status.extend_from_slice(&flags.to_be_bytes());
    }
    assert_eq!(r[&6], Reply::Chunk { cookie: 6, flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_BLOCK_STATUS, payload: status });
    assert!(matches!(r[&7], Reply::Chunk { kind: REPLY_TYPE_ERROR, .. }) && r[&7].errno() == 22, "read past the end: {:?}", r[&7]);
    let Reply::Chunk { payload, .. } = &r[&7] else { unreachable!() };
    assert!(String::from_utf8_lossy(&payload[6..]).contains("beyond the end"), "with a message for people");
    assert_eq!(r[&8], Reply::Simple { cookie: 8, errno: 0, data: vec![] });
    let mut one = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    one.extend_from_slice(&100u32.to_be_bytes());
    one.extend_from_slice(&(STATE_HOLE | STATE_ZERO).to_be_bytes());
    assert_eq!(r[&9], Reply::Chunk { cookie: 9, flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_BLOCK_STATUS, payload: one }, "REQ_ONE");

    // Every two-piece split, byte by byte, and random multi-piece splits.
    let handshake_len = whole.len() - replies_len;
    let want = as_client_sees(&whole, handshake_len, &BTreeMap::new());
    let seen = |cuts: &[usize]| as_client_sees(&run(&input, cuts, &mut Driver::new()).0, handshake_len, &BTreeMap::new());
    for cut in 0..=input.len() {
        assert_eq!(seen(&[cut]), want, "split at {cut}");
    }
    let bytewise: Vec<usize> = (1..input.len()).collect();
    assert_eq!(seen(&bytewise), want);
    let mut seed = 7;
    for _ in 0..300 {
        let mut cuts: Vec<usize> = (0..xorshift(&mut seed) % 12).map(|_| (xorshift(&mut seed) as usize) % input.len()).collect();
        cuts.sort_unstable();
        assert_eq!(seen(&cuts), want, "cuts {cuts:?}");
    }
}

#[test]
fn simple_replies_carry_read_data_only_on_success() {
    let input = simple_session();
    let mut driver = Driver::new();
    driver.bad_byte = Some(4096 + 17);
    let (out, conn) = run(&input, &[], &mut driver);
    assert!(conn.is_closed() && conn.close_error().is_none());
    let mut s = Stream(&out);
    s.greeting();
    assert_eq!(s.u64(), DISK_BYTES, "NBD_OPT_EXPORT_NAME reply");
    assert_eq!(s.u16(), FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES);
    assert_eq!(s.take(124), &[0; 124][..], "zeroes: the client did not ask for NO_ZEROES");
    let reads: BTreeMap<u64, u32> = [(2, 12), (3, 4096), (4, 100), (5, 1), (8, 1)].into();
    let r = s.replies_by_cookie(&reads);
    assert_eq!(r.len(), 8);
    assert_eq!(r[&1], Reply::Simple { cookie: 1, errno: 0, data: vec![] });
    assert_eq!(r[&2], Reply::Simple { cookie: 2, errno: 0, data: b"hello, world".to_vec() });
    assert_eq!(r[&3], Reply::Simple { cookie: 3, errno: 5, data: vec![] }, "a failed read sends no data");
    assert_eq!(r[&4].read_data()[..12], b"hello, world"[..], "the stream stays framed after a failed read");
    assert_eq!(r[&5], Reply::Simple { cookie: 5, errno: 22, data: vec![] }, "DF needs structured replies");
    assert_eq!(r[&6], Reply::Simple { cookie: 6, errno: 22, data: vec![] }, "no block status without a context");
    assert_eq!(r[&7], Reply::Simple { cookie: 7, errno: 28, data: vec![] }, "write past the end");
    assert_eq!(r[&8], Reply::Simple { cookie: 8, errno: 0, data: b"h".to_vec() }, "the refused write's payload was skipped");
    let handshake_len = 16 + 2 + 8 + 2 + 124;
    let want = as_client_sees(&out, handshake_len, &reads);
    for cut in 0..=input.len() {
        let mut driver = Driver::new();
        driver.bad_byte = Some(4096 + 17);
        assert_eq!(as_client_sees(&run(&input, &[cut], &mut driver).0, handshake_len, &reads), want, "split at {cut}");
    }
}

#[test]
fn handshake_options_are_answered_and_unknown_ones_refused() {
    let (out, conn) = run(&handshake_session(), &[], &mut Driver::new());
    assert!(conn.is_closed() && conn.close_error().is_none(), "NBD_OPT_ABORT is a clean end");
    let mut s = Stream(&out);
    s.greeting();
    let list = s.opt_replies();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0], (OPT_LIST, REP_SERVER, b"\0\0\0\x04disktest disk".to_vec()));
    assert_eq!(list[1], (OPT_LIST, REP_SERVER, b"\0\0\0\x02ro".to_vec()));
    assert_eq!(s.opt_replies()[0].1, REP_ERR_UNSUP, "STARTTLS");
    assert_eq!(s.opt_replies()[0].1, REP_ERR_UNSUP, "unknown option");
    let info = s.opt_replies();
    let mut export = vec![0, 0];
    export.extend_from_slice(&RO_BYTES.to_be_bytes());
    export.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_READ_ONLY).to_be_bytes());
    assert_eq!(info[0], (OPT_INFO, REP_INFO, export));
    assert_eq!(info[1], (OPT_INFO, REP_INFO, b"\0\x01ro".to_vec()));
    assert_eq!(info.len(), 4, "no description to give; block size; ACK");
    let unknown = s.opt_replies();
    assert_eq!((unknown.len(), unknown[0].1), (1, REP_ERR_UNKNOWN));
    assert!(String::from_utf8_lossy(&unknown[0].2).contains("\"nope\""));
    assert_eq!(s.opt_replies()[0].1, REP_ERR_INVALID, "metadata contexts need structured replies");
    assert_eq!(s.opt_replies(), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
    let mut listed = 0u32.to_be_bytes().to_vec();
    listed.extend_from_slice(BASE_ALLOCATION.as_bytes());
    assert_eq!(s.opt_replies(), vec![(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, listed), (OPT_LIST_META_CONTEXT, REP_ACK, vec![])]);
    assert_eq!(s.opt_replies().len(), 2, "SET_META_CONTEXT: context and ACK");
    assert_eq!(s.opt_replies(), vec![(OPT_ABORT, REP_ACK, vec![])]);
    assert!(s.is_empty());
}

#[test]
fn broken_handshakes_close_the_connection_with_a_reason() {
    // An option header announcing 1 MiB: refused before any of the data arrives.
    let mut too_long = flags(1);
    too_long.put_u64(OPTION_MAGIC);
    too_long.put_u32(OPT_GO);
    too_long.put_u32(1 << 20);
    let cases: Vec<(Vec<u8>, NbdError)> = vec![
        (flags(0), NbdError::ClientFlags { flags: 0 }),
        (flags(FLAG_C_FIXED_NEWSTYLE | 1 << 5), NbdError::ClientFlags { flags: 0x21 }),
        ([flags(1), vec![0; 16]].concat(), NbdError::BadOptionMagic { magic: 0 }),
        (too_long, NbdError::OptionTooLong { option: OPT_GO, len_bytes: 1 << 20 }),
        ([flags(1), opt(OPT_EXPORT_NAME, b"missing")].concat(), NbdError::UnknownExport { name: "missing".into() }),
        ([simple_handshake("disk"), vec![0x25, 0x60, 0x95, 0x14], vec![0; 24]].concat(), NbdError::BadRequestMagic { magic: 0x2560_9514 }),
    ];
    for (input, want) in cases {
        let (_, mut conn) = run(&input, &[], &mut Driver::new());
        assert!(conn.is_closed(), "{want}");
        assert_eq!(conn.close_error(), Some(&want));
        assert!(!want.to_string().contains('{'), "a message for people: {want}");
        conn.handle_input(&structured_session());
        assert!(conn.poll_transmit().is_none() && conn.poll_event().is_none(), "nothing after a close");
    }
    let mut conn = NbdConnection::new(exports()).unwrap();
    conn.handle_input(&flags(3));
    conn.handle_eof();
    assert_eq!(conn.close_error(), Some(&NbdError::HungUpInHandshake));
}

#[test]
fn read_only_exports_refuse_writes_and_skip_their_payload() {
    let mut input = structured_handshake("ro");
    input.extend(write_req(1, 0, &[1; 5000]));
    input.extend(req(0, CMD_TRIM, 2, 0, 4096));
    input.extend(req(0, CMD_WRITE_ZEROES, 3, 0, 4096));
    input.extend(req(0, CMD_READ, 4, 0, 10));
    input.extend(req(CMD_FLAG_FUA, CMD_FLUSH, 5, 0, 0));
    let mut driver = Driver::new();
    let (out, conn) = run(&input, &[], &mut driver);
    assert_eq!(conn.export().map(|e| e.name.as_str()), Some("ro"));
    let (handshake, _) = run(&structured_handshake("ro"), &[], &mut Driver::new());
    let r = Stream(&out[handshake.len()..]).replies_by_cookie(&BTreeMap::new());
    for cookie in 1..=3 {
        assert_eq!(r[&cookie].errno(), 1, "EPERM for {cookie}");
    }
    assert_eq!(r[&4].read_data(), vec![0; 10], "the refused write's payload was skipped");
    assert_eq!(r[&5], Reply::Simple { cookie: 5, errno: 0, data: vec![] });
    assert!(driver.log.iter().all(|(e, _)| matches!(e, NbdEvent::Read { .. } | NbdEvent::Flush { .. })), "refused requests never reach the driver");
}

#[test]
fn oversized_and_out_of_range_requests_are_refused_without_buffering() {
    let mut conn = NbdConnection::new(exports()).unwrap();
    conn.handle_input(&structured_handshake("disk"));
    assert!(matches!(conn.poll_event(), Some(NbdEvent::Selected { index: 0, .. })));
    let head = |c: &mut NbdConnection| {
        let mut out = Vec::new();
        while let Some(b) = c.poll_transmit() {
            out.extend_from_slice(&b);
        }
        out
    };
    head(&mut conn);
    // A 40 MiB write: refused at once, its payload dropped as it streams in.
    let len = 40u32 << 20;
    conn.handle_input(&req(0, CMD_WRITE, 1, 0, len));
    let r = Stream(&head(&mut conn)).reply(&BTreeMap::new());
    assert_eq!((r.cookie(), r.errno()), (1, 22));
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..40 {
        conn.handle_input(&chunk);
        assert!(conn.inbuf.capacity() <= 4 * REQUEST_HEADER_BYTES, "payload not buffered");
    }
    assert!(conn.poll_event().is_none() && head(&mut conn).is_empty());
    let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
        (0, CMD_READ, 0, 33 << 20, 75),
        (0, CMD_READ, u64::MAX - 1, 4, 22),
        (0, CMD_TRIM, DISK_BYTES, 1, 22),
        (0, CMD_WRITE_ZEROES, DISK_BYTES - 1, 2, 28),
        (0, CMD_BLOCK_STATUS, 0, 0, 22),
        (0, CMD_BLOCK_STATUS, DISK_BYTES, 1, 22),
        (CMD_FLAG_NO_HOLE, CMD_READ, 0, 1, 22),
        (1 << 4, CMD_WRITE_ZEROES, 0, 1, 22),
        (0, 5, 0, 1, 22),
        (0, 99, 0, 1, 22),
    ];
    for (i, (flags, kind, offset, len, errno)) in cases.into_iter().enumerate() {
        conn.handle_input(&req(flags, kind, 100 + i as u64, offset, len));
        let r = Stream(&head(&mut conn)).reply(&BTreeMap::new());
        assert_eq!((r.cookie(), r.errno()), (100 + i as u64, errno), "case {i}");
        assert!(conn.poll_event().is_none(), "case {i} reached the driver");
    }
    // Zero-length requests succeed without the driver.
    conn.handle_input(&req(0, CMD_READ, 200, DISK_BYTES, 0));
    conn.handle_input(&req(0, CMD_WRITE, 201, 0, 0));
    let out = head(&mut conn);
    let mut s = Stream(&out);
    assert_eq!(s.reply(&BTreeMap::new()), Reply::Chunk { cookie: 200, flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_NONE, payload: vec![] });
    assert_eq!(s.reply(&BTreeMap::new()), Reply::Simple { cookie: 201, errno: 0, data: vec![] });
    assert!(conn.poll_event().is_none());
    // The connection still works.
    conn.handle_input(&req(0, CMD_READ, 300, 0, 1));
    assert!(matches!(conn.poll_event(), Some(NbdEvent::Read { len_bytes: 1, .. })));
    assert_eq!(conn.pending_requests(), 1);
}

#[test]
fn replies_in_any_order_stay_whole_and_reach_their_request() {
    for structured in [false, true] {
        let handshake = if structured { structured_handshake("disk") } else { simple_handshake("disk") };
        let mut input = handshake.clone();
        let mut reads = BTreeMap::new();
        for i in 0..40u64 {
            let len = 1 + (i as u32 * 977) % 70_000;
            input.extend(write_req(1000 + i, i * 20_000, &vec![i as u8 + 1; 300]));
            input.extend(req(0, CMD_READ, i, i * 20_000, len));
            reads.insert(i, len);
        }
        let mut driver = Driver::new();
        driver.shuffle = Some(99);
        let (out, conn) = run(&input, &[700, 5000, 20_000], &mut driver);
        assert_eq!(conn.pending_requests(), 0);
        let handshake_len = run(&handshake, &[], &mut Driver::new()).0.len();
        let mut s = Stream(&out[handshake_len..]);
        let answered: BTreeMap<(u64, u32), Vec<u8>> = driver
            .log
            .iter()
            .filter_map(|(e, r)| match (e, r) {
                (NbdEvent::Read { offset, len_bytes, .. }, Ok(d)) => Some(((*offset, *len_bytes), d.clone())),
                _ => None,
            })
            .collect();
        let mut seen = 0;
        while !s.is_empty() {
            let r = s.reply(&reads);
            if r.cookie() < 1000 {
                let want = &answered[&(r.cookie() * 20_000, reads[&r.cookie()])];
                assert_eq!(&r.read_data(), want, "read {} (structured: {structured})", r.cookie());
                seen += 1;
            }
        }
        assert_eq!(seen, 40);
    }
}

#[test]
fn disconnect_waits_for_the_requests_in_flight() {
    let mut conn = NbdConnection::new(exports()).unwrap();
    let mut input = simple_handshake("disk");
    input.extend(req(0, CMD_READ, 1, 0, 4));
    input.extend(req(0, CMD_FLUSH, 2, 0, 0));
    input.extend(req(0, CMD_DISC, 3, 0, 0));
    input.extend(req(0, CMD_READ, 4, 0, 4));
    conn.handle_input(&input);
    let events: Vec<NbdEvent> = std::iter::from_fn(|| conn.poll_event()).collect();
    assert_eq!(events.len(), 4, "selected, read, flush, disconnect; nothing after DISC: {events:?}");
    let (NbdEvent::Read { handle: read, .. }, NbdEvent::Flush { handle: flush }) = (&events[1], &events[2]) else { panic!("{events:?}") };
    assert_eq!(events[3], NbdEvent::Disconnect);
    assert!(!conn.wants_input() && !conn.is_closed());
    assert_eq!(conn.pending_requests(), 2);
    conn.reply(*flush, Ok(())).unwrap();
    conn.handle_eof();
    assert!(!conn.is_closed(), "answers are still due after DISC");
    conn.reply_read(*read, Ok(vec![0; 4])).unwrap();
    assert!(conn.is_closed() && conn.close_error().is_none());
    assert_eq!(conn.reply(*flush, Ok(())), Ok(()), "answers after the close are dropped");
}

#[test]
fn driver_mistakes_are_reported_and_the_client_is_not_left_hanging() {
    let mut conn = NbdConnection::new(exports()).unwrap();
    let mut input = structured_handshake("disk");
    input.extend(req(0, CMD_READ, 1, 0, 8));
    input.extend(req(0, CMD_BLOCK_STATUS, 2, 0, 8));
    input.extend(req(0, CMD_FLUSH, 3, 0, 0));
    conn.handle_input(&input);
    while conn.poll_transmit().is_some() {}
    let handles: Vec<RequestHandle> = std::iter::from_fn(|| conn.poll_event())
        .filter_map(|e| match e {
            NbdEvent::Read { handle, .. } | NbdEvent::BlockStatus { handle, .. } | NbdEvent::Flush { handle } => Some(handle),
            _ => None,
        })
        .collect();
    let [read, status, flush] = handles[..] else { panic!("{handles:?}") };
    assert!(matches!(conn.reply(read, Ok(())), Err(NbdError::WrongReply { request: "read", .. })));
    assert!(matches!(conn.reply_read(flush, Ok(vec![])), Err(NbdError::WrongReply { request: "flush", .. })));
    assert!(conn.poll_transmit().is_none(), "a wrong reply sends nothing");
    assert_eq!(conn.reply_read(read, Ok(vec![1; 3])), Err(NbdError::ReadLength { handle: read, expected: 8, got: 3 }));
    let empty = vec![Extent { len_bytes: 0, zero: true, hole: true }];
    assert_eq!(conn.reply_block_status(status, Ok(empty)), Err(NbdError::NoExtents { handle: status }));
    conn.reply(flush, Err(NbdErrno::Io)).unwrap();
    assert_eq!(conn.reply(flush, Ok(())), Err(NbdError::UnknownHandle { handle: flush }));
    let out: Vec<u8> = std::iter::from_fn(|| conn.poll_transmit()).flat_map(|b| b.to_vec()).collect();
    let mut s = Stream(&out);
    let errnos: Vec<(u64, u32)> = (0..3).map(|_| s.reply(&BTreeMap::new())).map(|r| (r.cookie(), r.errno())).collect();
    assert_eq!(errnos, vec![(1, 5), (2, 5), (3, 5)]);
    let r = NbdConnection::new(vec![Export { name: "a\0b".into(), size_bytes: 1, read_only: true, description: None }]);
    assert!(matches!(r, Err(NbdError::BadExport { .. })));
    let twice = vec![exports()[0].clone(), exports()[0].clone()];
    assert!(NbdConnection::new(twice).is_err());
}

#[test]
fn block_status_extents_are_normalized() {
    let e = |len_bytes, zero, hole| Extent { len_bytes, zero, hole };
    // Empty extents dropped, equal neighbours merged, stop once covered.
    let got = normalize_extents(&[e(0, true, true), e(512, true, true), e(512, true, true), e(100, false, false), e(9, true, false), e(4, false, false)], 1100, false, 1 << 20);
    assert_eq!(got, vec![(1024, STATE_HOLE | STATE_ZERO), (100, 0)]);
    let got = normalize_extents(&[e(512, true, true), e(700, false, false)], 1000, false, 1 << 20);
    assert_eq!(got, vec![(512, STATE_HOLE | STATE_ZERO), (700, 0)], "the last may reach past the request");
    assert_eq!(normalize_extents(&[e(4096, false, false)], 100, true, 1 << 20), vec![(100, 0)], "REQ_ONE");
    assert_eq!(normalize_extents(&[e(4096, false, true)], 8192, false, 1000), vec![(1000, STATE_HOLE)], "clipped at the end");
    assert!(normalize_extents(&[], 10, false, 10).is_empty());
}

#[test]
fn errno_numbers_match_the_spec() {
    for e in [NbdErrno::Perm, NbdErrno::Io, NbdErrno::NoMem, NbdErrno::Inval, NbdErrno::NoSpc, NbdErrno::Overflow, NbdErrno::NotSup, NbdErrno::Shutdown] {
        assert_eq!(NbdErrno::from_code(e.code()), Some(e));
    }
    assert_eq!(NbdErrno::from_io_error(&std::io::Error::from_raw_os_error(libc::EROFS)), NbdErrno::Perm);
    assert_eq!(NbdErrno::from_io_error(&std::io::Error::from_raw_os_error(libc::EDQUOT)), NbdErrno::NoSpc);
    assert_eq!(NbdErrno::from_io_error(&std::io::Error::other("x")), NbdErrno::Io);
    assert_eq!(NbdErrno::Io.to_string(), "input/output error (NBD error 5)");
}

/// Output never exceeds this for `input_bytes` of input when the driver
/// supplied `supplied_bytes` of read data and extents: the worst reply per
/// input byte is an option listing or a refusal with its message.
fn output_bound(input_bytes: usize, supplied_bytes: usize) -> usize {
    1024 + 16 * input_bytes + supplied_bytes
}

/// Feeds `input` cut at `cuts`, answers everything (some with errors, in
/// shuffled order), ends with EOF; checks the output bound and that a closed
/// connection stays silent.
fn survive(input: &[u8], cuts: &[usize], seed: u64) -> (Vec<u8>, NbdConnection) {
    let mut driver = Driver::new();
    driver.shuffle = Some(seed | 1);
    driver.random_errors = true;
    let (out, mut conn) = run(input, cuts, &mut driver);
    conn.handle_eof();
    driver.serve(&mut conn);
    let mut out = out;
    while let Some(b) = conn.poll_transmit() {
        out.extend_from_slice(&b);
    }
    assert!(out.len() <= output_bound(input.len(), driver.supplied_bytes), "{} bytes out for {} in", out.len(), input.len());
    assert!(conn.is_closed(), "EOF with nothing in flight ends the connection: {conn:?}");
    conn.handle_input(input);
    assert!(conn.poll_transmit().is_none() && conn.poll_event().is_none());
    (out, conn)
}

/// Seeded mutations of recorded client sessions, as the fuzz target would
/// try them: flipped bytes, cuts, repeats; fed in random pieces.
#[test]
fn mutated_sessions_never_panic_and_stay_bounded() {
    let sessions = [structured_session(), simple_session(), handshake_session()];
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    for session in &sessions {
        for _ in 0..2000 {
            let mut s = session.clone();
            match xorshift(&mut seed) % 4 {
                0 => s.truncate((xorshift(&mut seed) as usize) % s.len()),
                1 => {
                    let at = (xorshift(&mut seed) as usize) % s.len();
                    s = [&s[..at], &s[at..(at + 40).min(s.len())], &s[at..]].concat();
                }
                _ => {}
            }
            for _ in 0..(xorshift(&mut seed) % 6 + 1) {
                if s.is_empty() {
                    break;
                }
                let i = (xorshift(&mut seed) as usize) % s.len();
                s[i] = xorshift(&mut seed) as u8;
            }
            let cuts: Vec<usize> = {
                let mut c: Vec<usize> = (0..xorshift(&mut seed) % 8).map(|_| (xorshift(&mut seed) as usize) % (s.len() + 1)).collect();
                c.sort_unstable();
                c
            };
            survive(&s, &cuts, xorshift(&mut seed));
        }
    }
}

/// A request shaped well enough to reach the request checks, with random fields.
fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    (any::<u16>(), 0u16..10, 0u64..(DISK_BYTES + 8192), prop_oneof![0u32..70_000, any::<u32>()], any::<u64>(), 0usize..3000).prop_map(
        |(flags, kind, offset, len, cookie, payload)| {
            let mut v = req(flags & 0x1f, kind, cookie, offset, len);
            if kind == CMD_WRITE {
                v.extend(std::iter::repeat_n(0x5a, payload.min(len as usize)));
            }
            v
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_input_never_panics_and_output_is_bounded(
        prefix in 0u8..3,
        body in prop::collection::vec(prop_oneof![prop::collection::vec(any::<u8>(), 0..64), arb_request()], 0..40),
        cuts in prop::collection::vec(0usize..4096, 0..12),
        seed in any::<u64>(),
    ) {
        let mut input = match prefix {
            0 => Vec::new(),
            1 => simple_handshake("disk"),
            _ => structured_handshake("disk"),
        };
        let handshake_len = input.len();
        input.extend(body.concat());
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (out, _) = survive(&input, &cuts, seed);
        if prefix == 2 {
            // Under structured replies the stream is self-describing: every
            // reply must be whole and well-formed, whatever the order.
            let (handshake, _) = run(&input[..handshake_len], &[], &mut Driver::new());
            prop_assert!(out.starts_with(&handshake));
            let checked = check_structured_stream(&out[handshake.len()..]);
            prop_assert!(checked.is_ok(), "{:?}", checked);
        }
    }

    #[test]
    fn valid_requests_read_back_what_the_driver_answered(
        structured in any::<bool>(),
        ops in prop::collection::vec((0u8..5, 0u64..60_000, 1u32..6000, any::<u8>()), 1..30),
        cuts in prop::collection::vec(0usize..200_000, 0..10),
        seed in any::<u64>(),
    ) {
        let handshake = if structured { structured_handshake("disk") } else { simple_handshake("disk") };
        let mut input = handshake.clone();
        let mut reads = BTreeMap::new();
        for (i, (kind, offset, len, byte)) in ops.iter().enumerate() {
            let cookie = i as u64;
            input.extend(match kind {
                0 => {
                    reads.insert(cookie, *len);
                    req(0, CMD_READ, cookie, *offset, *len)
                }
                1 => write_req(cookie, *offset, &vec![*byte; *len as usize]),
                2 => req(0, CMD_TRIM, cookie, *offset, *len),
                3 => req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, cookie, *offset, *len),
                _ => req(CMD_FLAG_FUA, CMD_FLUSH, cookie, 0, 0),
            });
        }
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut driver = Driver::new();
        driver.shuffle = Some(seed | 1);
        let (out, conn) = run(&input, &cuts, &mut driver);
        prop_assert_eq!(conn.pending_requests(), 0);
        let handshake_out = run(&handshake, &[], &mut Driver::new()).0;
        // Events come in request order (every request here is valid), so the
        // n-th logged read answers the n-th read request.
        let mut answers: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let handle_order: Vec<RequestHandle> = {
            let mut c = NbdConnection::new(exports()).unwrap();
            c.handle_input(&input);
            std::iter::from_fn(|| c.poll_event()).filter_map(|e| match e {
                NbdEvent::Read { handle, .. } | NbdEvent::Write { handle, .. } | NbdEvent::Trim { handle, .. }
                | NbdEvent::WriteZeroes { handle, .. } | NbdEvent::Flush { handle } => Some(handle),
                _ => None,
            }).collect()
        };
        prop_assert_eq!(handle_order.len(), ops.len());
        for (event, result) in &driver.log {
            if let (NbdEvent::Read { handle, .. }, Ok(data)) = (event, result) {
                let cookie = handle_order.iter().position(|h| h == handle).unwrap() as u64;
                answers.insert(cookie, data.clone());
            }
        }
        let mut s = Stream(&out[handshake_out.len()..]);
        let mut replies = 0;
        while !s.is_empty() {
            let r = s.reply(&reads);
            prop_assert_eq!(r.errno(), 0);
            if let Some(want) = answers.get(&r.cookie()) {
                prop_assert_eq!(&r.read_data(), want);
            }
            replies += 1;
        }
        prop_assert_eq!(replies, ops.len());
    }
}
