use super::pair::{meta, node, topology, Faults, Pair};
use super::*;
use crate::blob::{BlobFlags, BlobLoc, EncodedBlob, RpSeq};
use crate::codec::{page_hashes, BlockCodec};
use crate::content::{BlobId, ContentId, MerkleRoot};
use crate::time::Millis;

#[test]
fn cancel_fails_a_streaming_cycle_but_not_a_committing_one() {
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 4096);
    src.handle_message(TargetMsg::Opened { seq: RpSeq(1), base_ok: false });
    while src.poll_event().is_some() {}
    assert!(src.handle_cancel("paused".into()));
    assert_eq!(src.poll_event(), Some(SourceEvent::Failed { reason: "paused".into() }));

    // Nothing changed: the commit goes out at once; a cancel after that is refused.
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 4096);
    src.handle_message(TargetMsg::Opened { seq: RpSeq(1), base_ok: false });
    src.handle_reader_done(meta("vol"));
    while src.poll_transmit().is_some() {}
    while src.poll_event().is_some() {}
    assert!(!src.handle_cancel("paused".into()));
    assert_eq!(src.poll_event(), None);
    src.handle_message(TargetMsg::Committed { seq: RpSeq(1) });
    assert_eq!(src.poll_event(), Some(SourceEvent::Committed { seq: RpSeq(1) }));
}

/// A target decodes whatever a (listed but buggy or hostile) source sends:
/// mutated and random frames must come out as errors, never panics.
#[test]
fn session_frames_from_peers_decode_or_fail_cleanly() {
    use drmesh_transport::wire::{decode_frame_body, encode_frame, FrameDecoder, MAX_DATA_FRAME_BYTES};
    let codec = BlockCodec::new(Some(1), Some(&[9; 32]));
    let data = vec![7u8; 8192];
    let id = codec.ids().content_id(&data);
    let samples = vec![
        SourceMsg::Open { volume: crate::blob::VolumeName::from_static("v"), base: Some((RpSeq(3), MerkleRoot([1; 32]))), encrypted: true },
        SourceMsg::Offer { entries: vec![OfferEntry { index: 9, content: id, base: Some(ContentId([2; 32])) }; 5] },
        SourceMsg::Blob(codec.encode_full(id, &data).into()),
        SourceMsg::Commit { meta: meta("v") },
    ];
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for msg in &samples {
        let frame = encode_frame(msg, MAX_DATA_FRAME_BYTES);
        assert_eq!(&decode_frame_body::<SourceMsg>(&frame[4..]).unwrap(), msg);
        for _ in 0..3000 {
            let mut f = frame.clone();
            for _ in 0..(next() % 6 + 1) {
                let i = 4 + (next() as usize) % (f.len() - 4);
                f[i] = next() as u8;
            }
            let _ = decode_frame_body::<SourceMsg>(&f[4..]);
            let _ = decode_frame_body::<TargetMsg>(&f[4..]);
            let mut d = FrameDecoder::with_limit(MAX_DATA_FRAME_BYTES);
            d.handle_bytes(&f[..(next() as usize) % f.len()]);
            let _ = d.poll_frame::<SourceMsg>();
        }
    }
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = decode_frame_body::<SourceMsg>(&junk);
        let _ = decode_frame_body::<TargetMsg>(&junk);
    }
}

/// Without a base the source offers before `Opened` arrives, and commits
/// only once it has (the RP's seq comes from it); `Commit` follows the
/// last blob without waiting for `Stored`, and `Committed` before every
/// blob was acknowledged is refused.
#[test]
fn an_initial_sync_saves_the_round_trips_it_can() {
    let codec = BlockCodec::new(Some(1), None);
    let data = vec![7u8; 4096];
    let content = codec.ids().content_id(&data);
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 4096);
    assert_eq!(src.poll_event(), Some(SourceEvent::Start { full_offer: true }), "starts before Opened");
    src.handle_block(OfferEntry { index: 0, content, base: None }, 4096);
    src.handle_reader_done(meta("vol"));
    assert!(matches!(src.poll_transmit(), Some(SourceMsg::Open { base: None, .. })));
    assert!(matches!(src.poll_transmit(), Some(SourceMsg::Offer { entries }) if entries.len() == 1), "the offer follows Open at once");
    src.handle_message(TargetMsg::Answer { wants: vec![Want::Full] });
    assert_eq!(src.poll_event(), Some(SourceEvent::Encode { index: 0, want: Want::Full }));
    let blob = codec.encode_full(content, &data);
    let id = blob.id;
    src.handle_encoded(0, blob);
    assert!(matches!(src.poll_transmit(), Some(SourceMsg::Blob(_))));
    assert_eq!(src.poll_transmit(), None, "no commit before Opened gave the seq");
    src.handle_message(TargetMsg::Opened { seq: RpSeq(9), base_ok: false });
    assert!(matches!(src.poll_transmit(), Some(SourceMsg::Commit { meta }) if meta.seq == RpSeq(9)), "commit before Stored");
    let mut early = SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 4096);
    early.handle_message(TargetMsg::Opened { seq: RpSeq(1), base_ok: false });
    early.handle_block(OfferEntry { index: 0, content, base: None }, 4096);
    early.handle_reader_done(meta("vol"));
    early.handle_message(TargetMsg::Answer { wants: vec![Want::Full] });
    early.handle_encoded(0, codec.encode_full(content, &data));
    early.handle_message(TargetMsg::Committed { seq: RpSeq(1) });
    assert!(early.is_finished());
    assert!(std::iter::from_fn(|| early.poll_event()).any(|e| matches!(e, SourceEvent::Failed { reason } if reason.contains("without acknowledging"))));
    src.handle_message(TargetMsg::Stored { blobs: vec![id] });
    src.handle_message(TargetMsg::Committed { seq: RpSeq(9) });
    assert!(std::iter::from_fn(|| src.poll_event()).any(|e| e == SourceEvent::Committed { seq: RpSeq(9) }));
}

#[test]
fn source_fails_cleanly_on_disconnect_and_bad_answers() {
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), Some((RpSeq(1), MerkleRoot([1; 32]))), false, 1 << 20);
    src.poll_transmit();
    src.handle_message(TargetMsg::Answer { wants: vec![] });
    assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { .. })), "an answer before Opened");
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), None, false, 1 << 20);
    src.handle_message(TargetMsg::Answer { wants: vec![] });
    assert!(matches!(src.poll_event(), Some(SourceEvent::Start { .. })));
    assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { .. })), "an answer to no offer");
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), None, false, 1 << 20);
    src.handle_message(TargetMsg::Opened { seq: RpSeq(1), base_ok: false });
    src.handle_disconnect("reset".into());
    assert!(matches!(src.poll_event(), Some(SourceEvent::Start { .. })));
    assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { reason }) if reason.contains("reset")));
    assert!(src.is_finished());
    assert!(!src.lost_before_answer(), "the target had answered");
}

#[test]
fn a_connection_lost_before_the_target_answered_can_be_retried() {
    // With a base (Opening) and without one (streaming at once, offers out).
    for base in [Some((RpSeq(1), MerkleRoot([1; 32]))), None] {
        let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), base, false, 4096);
        while src.poll_transmit().is_some() {}
        while src.poll_event().is_some() {}
        src.handle_disconnect("stream failed: connection lost: reset by peer".into());
        assert!(matches!(src.poll_event(), Some(SourceEvent::Failed { reason }) if reason.contains("reset by peer")));
        assert!(src.lost_before_answer(), "base {base:?}");
    }
    // A failure for another reason first, then the loss: not a lost connection's failure.
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), Some((RpSeq(1), MerkleRoot([1; 32]))), false, 4096);
    assert!(src.handle_cancel("paused".into()));
    src.handle_disconnect("reset".into());
    assert!(!src.lost_before_answer());
    // The target answered, then the connection went: the cycle is not started over.
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("v"), Some((RpSeq(1), MerkleRoot([1; 32]))), false, 4096);
    src.handle_message(TargetMsg::Opened { seq: RpSeq(2), base_ok: true });
    src.handle_disconnect("reset".into());
    assert!(!src.lost_before_answer());
}

/// 300 blocks of 200 distinct contents, 50 of them stored already: exactly the
/// 150 missing ones travel, in batches, and the RP commits after they are durable.
#[test]
fn only_missing_blocks_travel_and_commit_follows_durable_acks() {
    let blocks: Vec<Vec<u8>> = (0..300u32).map(|i| vec![(i % 200) as u8 + 1; 4096]).collect();
    let stored: Vec<Vec<u8>> = blocks[..50].to_vec();
    let mut pair = Pair::new(1, blocks, &stored, Faults { max_latency_ms: 5, max_write_ms: 4, ..Faults::default() }, topology(24));
    pair.run();
    assert_eq!(pair.check(), Vec::<String>::new());
    assert_eq!(pair.source_end, Some(Ok(RpSeq(1))));
    assert_eq!(pair.blobs_sent, 150);
    assert_eq!(pair.src.stats().offered_blocks, 300);
    assert_eq!(pair.src.stats().full_blocks, 150);
    let (rp, map) = &pair.store.rps[0];
    assert_eq!((rp.volume.as_str(), rp.source_node.as_str(), map.len()), ("vol", "src", 300));
    assert!(rp.bytes_stored > 0, "bytes_stored is what the batches wrote");
    assert!(matches!(&pair.announced[..], [Announcement::Committed(m)] if m.seq == RpSeq(1)));
}

/// Many seeds of latency and write timing, some with a failed batch write or a
/// broken stream at a random message: every run ends on both sides, an RP the
/// source saw committed is in the store with every block durable, and a failed
/// session committed nothing.
#[test]
fn promises_hold_under_seeded_latency_write_failures_and_breaks() {
    let topo = topology(24);
    let mut outcomes = [0usize; 2];
    for seed in 0..300u64 {
        let n = 40 + (seed as usize * 7) % 120;
        let blocks: Vec<Vec<u8>> = (0..n).map(|i| { let mut b = vec![(i % 97) as u8; 4096]; b[..8].copy_from_slice(&(seed * 1000 + i as u64 % 90).to_le_bytes()); b }).collect();
        let faults = Faults {
            max_latency_ms: seed % 20,
            max_write_ms: (seed / 3) % 12,
            fail_write: (seed % 5 == 1).then_some(seed % 3),
            break_after: (seed % 7 == 2).then_some(1 + (seed as usize * 13) % 40),
        };
        let mut pair = Pair::new(seed, blocks, &[], faults.clone(), topo.clone());
        pair.run();
        let violations = pair.check();
        assert!(violations.is_empty(), "seed {seed} ({faults:?}): {violations:?}");
        outcomes[usize::from(pair.source_end.as_ref().is_some_and(Result::is_ok))] += 1;
        if faults.fail_write.is_some() && faults.break_after.is_none() && pair.blobs_sent > (faults.fail_write.unwrap_or(0) as usize + 1) * BATCH_BLOBS {
            assert!(matches!(&pair.source_end, Some(Err(r)) if r.contains("disk full")), "seed {seed}: {:?}", pair.source_end);
        }
    }
    assert!(outcomes[0] > 20 && outcomes[1] > 150, "failed / committed runs: {outcomes:?}");
}

/// Retention runs before `Committed` goes out, and its result is announced.
#[test]
fn retention_runs_before_committed_and_is_announced() {
    let topo = topology(1);
    let block = vec![vec![9u8; 4096]];
    let mut first = Pair::new(3, block.clone(), &[], Faults::default(), topo.clone());
    first.run();
    assert_eq!(first.source_end, Some(Ok(RpSeq(1))), "{:?} {:?}", first.target_end, first.store.rps);
    // A second session on the same store: RP 2 commits, RP 1 expires (keep_last 1).
    let mut second = Pair::new(4, vec![vec![8u8; 4096]], &[], Faults::default(), topo);
    second.store = std::mem::take(&mut first.store);
    second.run();
    assert_eq!(second.source_end, Some(Ok(RpSeq(2))));
    assert_eq!(second.store.rps.iter().map(|(m, _)| m.seq).collect::<Vec<_>>(), vec![RpSeq(2)]);
    assert!(second.announced.contains(&Announcement::Pruned { volume: crate::blob::VolumeName::from_static("vol"), seqs: vec![RpSeq(1)] }), "{:?}", second.announced);
}

fn open(tgt: &mut TargetSession, base: Option<(RpSeq, MerkleRoot)>, newest: Option<(RpSeq, MerkleRoot)>) -> TargetMsg {
    tgt.handle_message(Millis(0), SourceMsg::Open { volume: crate::blob::VolumeName::from_static("vol"), base, encrypted: false });
    assert_eq!(tgt.poll_event(), Some(TargetEvent::Newest { volume: crate::blob::VolumeName::from_static("vol") }));
    tgt.handle_newest(Ok(newest));
    tgt.poll_transmit().expect("Opened")
}

/// Only the volume's source may replicate it, only to its targets, only volumes the topology has.
#[test]
fn target_admits_only_the_source_to_its_targets() {
    let topo = topology(24);
    let cases = [
        (node(3), node(2), "vol", "node other is not the source of volume \"vol\" (the topology says src)"),
        (node(1), node(3), "vol", "this node (other) is not a target of volume \"vol\""),
        (node(1), node(2), "nope", "volume \"nope\" is not in this node's topology"),
    ];
    for (peer, local, volume, why) in cases {
        let mut tgt = TargetSession::new(topo.clone(), local, peer);
        tgt.handle_message(Millis(0), SourceMsg::Open { volume: crate::blob::VolumeName::from_static(volume), base: None, encrypted: false });
        assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason: why.into() }));
        assert_eq!(tgt.poll_event(), Some(TargetEvent::Finished { outcome: Err(why.into()) }));
        assert!(tgt.is_finished());
    }
    let mut tgt = TargetSession::new(topo, node(2), node(1));
    tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![] });
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("did not start with Open")));
}

/// Offers that arrive while `Newest` is out wait for it (an initial sync sends
/// them right behind `Open`), and are answered in order.
#[test]
fn offers_behind_open_wait_for_the_newest_rp() {
    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    tgt.handle_message(Millis(0), SourceMsg::Open { volume: crate::blob::VolumeName::from_static("vol"), base: None, encrypted: false });
    tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![OfferEntry { index: 0, content: ContentId([1; 32]), base: None }] });
    assert_eq!(tgt.poll_event(), Some(TargetEvent::Newest { volume: crate::blob::VolumeName::from_static("vol") }));
    assert_eq!(tgt.poll_event(), None, "no lookup before Opened");
    tgt.handle_newest(Ok(Some((RpSeq(4), MerkleRoot([2; 32])))));
    assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Opened { seq: RpSeq(5), base_ok: false }));
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Lookup { contents, .. }) if contents == vec![ContentId([1; 32])]));
    tgt.handle_lookup(Ok((vec![None], vec![None])));
    assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Answer { wants: vec![Want::Full] }));
}

#[test]
fn target_asks_for_deltas_and_checks_what_arrives() {
    let codec = BlockCodec::new(None, None);
    let old = vec![1u8; 16384];
    let mut new = old.clone();
    new[5000] = 2;
    let (old_id, new_id) = (codec.ids().content_id(&old), codec.ids().content_id(&new));
    let (mut oh, mut nh) = (Vec::new(), Vec::new());
    page_hashes(&old, &mut oh);
    page_hashes(&new, &mut nh);
    let delta = codec.encode_delta(new_id, &new, &nh, old_id, 0, &oh).expect("a delta");
    let session = || {
        let mut tgt = TargetSession::new(topology(24), node(2), node(1));
        assert_eq!(open(&mut tgt, Some((RpSeq(3), MerkleRoot([1; 32]))), Some((RpSeq(3), MerkleRoot([1; 32])))), TargetMsg::Opened { seq: RpSeq(4), base_ok: true });
        tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![OfferEntry { index: 0, content: new_id, base: Some(old_id) }] });
        assert!(matches!(tgt.poll_event(), Some(TargetEvent::Lookup { bases, .. }) if bases == vec![old_id]));
        tgt.handle_lookup(Ok((vec![None], vec![Some(BlobLoc { blob: old_id, depth: 0 })])));
        assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Answer { wants: vec![Want::Delta { base: old_id, depth: 0 }] }));
        tgt
    };
    // A wrong base is refused.
    let mut tgt = session();
    let mut wrong = delta.clone();
    wrong.base = Some(ContentId([5; 32]));
    tgt.handle_message(Millis(1), SourceMsg::Blob(wrong.into()));
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("not in the form asked for")));
    // The same blob twice is refused.
    let mut tgt = session();
    tgt.handle_message(Millis(1), SourceMsg::Blob(delta.clone().into()));
    tgt.handle_message(Millis(1), SourceMsg::Blob(delta.clone().into()));
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("sent twice")));
    // The delta, then Commit: the partial batch is written, acknowledged, then the commit asked for.
    let mut tgt = session();
    tgt.handle_message(Millis(1), SourceMsg::Blob(delta.clone().into()));
    assert_eq!(tgt.poll_timeout(), Some(Millis(1).after(BATCH_IDLE)));
    let mut m = meta("ignored");
    m.seq = RpSeq(4);
    tgt.handle_message(Millis(2), SourceMsg::Commit { meta: m });
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Write { batch: 0, blobs }) if blobs == vec![delta.clone()]));
    assert_eq!(tgt.poll_event(), None, "no commit before the batch is durable");
    tgt.handle_written(0, Ok(100));
    assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Stored { blobs: vec![delta.id] }));
    let Some(TargetEvent::Commit { meta }) = tgt.poll_event() else { panic!("commit asked for") };
    assert_eq!((meta.volume.as_str(), meta.source_node.as_str(), meta.bytes_stored, meta.seq), ("vol", "src", 100, RpSeq(4)));
    assert_eq!(tgt.poll_transmit(), None, "Committed only after the store committed");
    tgt.handle_committed(Ok(()));
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Prune { .. })));
    assert_eq!(tgt.poll_transmit(), None, "Committed only after retention");
    tgt.handle_pruned(vec![]);
    assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Committed { seq: RpSeq(4) }));
}

#[test]
fn commit_is_refused_until_every_wanted_block_arrived() {
    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    open(&mut tgt, None, Some((RpSeq(9), MerkleRoot([0; 32]))));
    tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![OfferEntry { index: 0, content: ContentId([3; 32]), base: None }] });
    let _lookup = tgt.poll_event();
    tgt.handle_lookup(Ok((vec![None], vec![None])));
    let mut m = meta("vol");
    m.seq = RpSeq(10);
    tgt.handle_message(Millis(0), SourceMsg::Commit { meta: m });
    let _answer = tgt.poll_transmit();
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("1 wanted blocks never arrived")));
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Finished { outcome: Err(_) })));

    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    open(&mut tgt, None, None);
    let unasked = EncodedBlob { id: ContentId([4; 32]), content: ContentId([4; 32]), flags: BlobFlags(0), plain_len: 1, base: None, depth: 0, payload: vec![1] };
    tgt.handle_message(Millis(0), SourceMsg::Blob(unasked.into()));
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("not asked for")));
}

/// A partial batch goes to disk once the stream is quiet for BATCH_IDLE, not before.
#[test]
fn a_partial_batch_is_written_when_the_stream_goes_quiet() {
    let codec = BlockCodec::new(None, None);
    let data = vec![5u8; 4096];
    let id = codec.ids().content_id(&data);
    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    open(&mut tgt, None, None);
    tgt.handle_message(Millis(10), SourceMsg::Offer { entries: vec![OfferEntry { index: 0, content: id, base: None }] });
    let _ = tgt.poll_event();
    tgt.handle_lookup(Ok((vec![None], vec![None])));
    tgt.handle_message(Millis(20), SourceMsg::Blob(codec.encode_full(id, &data).into()));
    let due = tgt.poll_timeout().expect("a partial batch waits for a timeout");
    tgt.handle_timeout(Millis(due.0 - 1));
    assert_eq!(tgt.poll_event(), None);
    tgt.handle_timeout(due);
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Write { batch: 0, .. })));
    assert_eq!(tgt.poll_timeout(), None);
}

/// A message after `Commit` fails the session while its batches are still
/// being written, but not once the store is committing: the RP is whole and
/// is announced.
#[test]
fn a_message_after_commit_does_not_fail_a_commit_in_flight() {
    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    open(&mut tgt, None, None);
    let mut m = meta("vol");
    m.seq = RpSeq(1);
    tgt.handle_message(Millis(0), SourceMsg::Commit { meta: m.clone() });
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Commit { .. })));
    tgt.handle_message(Millis(1), SourceMsg::Offer { entries: vec![] });
    assert_eq!(tgt.poll_transmit(), None, "no failure while the store commits");
    tgt.handle_committed(Ok(()));
    assert!(matches!(tgt.poll_event(), Some(TargetEvent::Prune { .. })));
    tgt.handle_pruned(vec![]);
    assert_eq!(tgt.poll_transmit(), Some(TargetMsg::Committed { seq: RpSeq(1) }));
    assert!(std::iter::from_fn(|| tgt.poll_event()).any(|e| matches!(e, TargetEvent::Announce(Announcement::Committed(_)))));

    // Before the commit is asked for (a batch still being written), it is a protocol error.
    let codec = BlockCodec::new(None, None);
    let data = vec![6u8; 4096];
    let id = codec.ids().content_id(&data);
    let mut tgt = TargetSession::new(topology(24), node(2), node(1));
    open(&mut tgt, None, None);
    tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![OfferEntry { index: 0, content: id, base: None }] });
    let _ = tgt.poll_event();
    tgt.handle_lookup(Ok((vec![None], vec![None])));
    let _answer = tgt.poll_transmit();
    tgt.handle_message(Millis(0), SourceMsg::Blob(codec.encode_full(id, &data).into()));
    tgt.handle_message(Millis(0), SourceMsg::Commit { meta: m });
    tgt.handle_message(Millis(0), SourceMsg::Offer { entries: vec![] });
    assert!(matches!(tgt.poll_transmit(), Some(TargetMsg::Failed { reason }) if reason.contains("Offer after Commit")));
}

#[test]
fn the_window_of_bytes_not_yet_durable_follows_the_round_trip() {
    use std::time::Duration;
    assert_eq!(inflight_window(Duration::ZERO), MIN_INFLIGHT_BYTES);
    let (lan, wan, far) = (inflight_window(Duration::from_millis(1)), inflight_window(Duration::from_millis(150)), inflight_window(Duration::from_millis(250)));
    assert!(MIN_INFLIGHT_BYTES < lan && lan < MIN_INFLIGHT_BYTES + (1 << 20), "a LAN's round trip adds under 1 MiB: {lan}");
    assert_eq!(wan, MIN_INFLIGHT_BYTES + 3 * 18_750_000, "three bandwidth-delay products at 1 Gbit/s and 150 ms");
    assert!(wan < far && far < MAX_INFLIGHT_BYTES);
    assert_eq!(inflight_window(Duration::from_secs(3600)), MAX_INFLIGHT_BYTES);

    // A core stops asking for blocks once its window of encoded bytes is sent
    // and not yet durable, and asks again when the round trip widens it or
    // `Stored` frees it. Uncompressed 1 MiB blocks: each blob is 1 MiB.
    let codec = BlockCodec::new(None, None);
    let mut src = SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 1 << 20);
    assert_eq!(src.inflight_limit(), MIN_INFLIGHT_BYTES, "until told, the window of a path with no delay");
    let data_of = |index: u64| vec![(index % 250) as u8 + 1; 1 << 20];
    let mut sent: Vec<BlobId> = Vec::new();
    let mut next = 0u64;
    let mut send_while_wanted = |src: &mut SourceSession, sent: &mut Vec<BlobId>| {
        while src.wants_block() {
            src.handle_block(OfferEntry { index: next, content: codec.ids().content_id(&data_of(next)), base: None }, 1 << 20);
            next += 1;
            while let Some(msg) = src.poll_transmit() {
                if let SourceMsg::Offer { entries } = msg {
                    src.handle_message(TargetMsg::Answer { wants: vec![Want::Full; entries.len()] });
                }
            }
            while let Some(event) = src.poll_event() {
                if let SourceEvent::Encode { index, .. } = event {
                    let data = data_of(index);
                    let blob = codec.encode_full(codec.ids().content_id(&data), &data);
                    sent.push(blob.id);
                    src.handle_encoded(index, blob);
                }
            }
        }
    };
    send_while_wanted(&mut src, &mut sent);
    let blob_bytes = 1u64 << 20;
    let at_min = sent.len() as u64;
    assert!(at_min * blob_bytes >= MIN_INFLIGHT_BYTES && (at_min - 1) * blob_bytes < MIN_INFLIGHT_BYTES, "{at_min} blobs of 1 MiB in a 32 MiB window");
    src.handle_round_trip(Duration::from_millis(5));
    send_while_wanted(&mut src, &mut sent);
    let widened = sent.len() as u64;
    assert!(widened * blob_bytes >= inflight_window(Duration::from_millis(5)) && widened > at_min, "a wider window sends more: {widened}");
    assert!(!src.wants_block());
    // A round trip that grows during the session is queueing, not the path: the window stays.
    src.handle_round_trip(Duration::from_millis(200));
    assert_eq!(src.inflight_limit(), inflight_window(Duration::from_millis(5)));
    assert!(!src.wants_block());
    src.handle_round_trip(Duration::from_millis(2));
    assert_eq!(src.inflight_limit(), inflight_window(Duration::from_millis(2)), "a shorter one is the path's delay");
    src.handle_message(TargetMsg::Stored { blobs: sent[..sent.len() - 30].to_vec() });
    assert!(src.wants_block(), "durable blobs free their bytes (30 MiB left in flight)");
}
