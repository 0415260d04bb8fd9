//! GC: deletes what no retained RP references, keeps chains, pins and young blobs,
//! and loses nothing while sessions run concurrently.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drmesh_actors::content::{ContentId, IdScheme};
use drmesh_actors::store::{BLOB_HEADER_BYTES, BlobFlags, EncodedBlob, Retention, RpMeta, RpSeq, Store};

fn full(data: &[u8]) -> EncodedBlob {
    let id = IdScheme::plain().content_id(data);
    EncodedBlob {
        id,
        content: id,
        flags: BlobFlags(0),
        plain_len: data.len() as u32,
        base: None,
        depth: 0,
        payload: data.to_vec(),
    }
}

fn delta(base: &EncodedBlob, produces: &[u8], payload: &[u8]) -> EncodedBlob {
    EncodedBlob {
        id: IdScheme::plain().hash(payload),
        content: IdScheme::plain().content_id(produces),
        flags: BlobFlags(BlobFlags::DELTA),
        plain_len: produces.len() as u32,
        base: Some(base.id),
        depth: base.depth + 1,
        payload: payload.to_vec(),
    }
}

fn meta(volume: &str, seq: u64, block_count: u64) -> RpMeta {
    RpMeta {
        volume: drmesh_actors::store::VolumeName::new(volume).expect("a test volume name"),
        seq: RpSeq(seq),
        time_unix_ms: 1_700_000_000_000 + seq,
        source_node: "src".into(),
        volume_bytes: block_count * 4096,
        block_bytes: 4096,
        block_count,
        changed_blocks: 0,
        bytes_stored: 0,
        merkle_root: drmesh_actors::content::MerkleRoot([0; 32]),
        encrypted: false,
        consistency: "crash".into(),
        group: None,
    }
}

#[test]
fn store_gc_deletes_unreferenced_and_keeps_rps_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = full(b"base block");
    let d1 = delta(&base, b"edited once", b"d1");
    let d2 = delta(&d1, b"edited twice", b"d2");
    let orphan = full(b"never referenced");
    let old = full(b"only in a pruned RP");
    store
        .put_blobs(1, &[base.clone(), d1.clone(), d2.clone(), orphan.clone(), old.clone()])
        .unwrap();
    store.stage(1, "vol", &[(0, old.content)]).unwrap();
    store.commit_rp(1, &meta("vol", 1, 2)).unwrap();
    store.stage(1, "vol", &[(0, d2.content), (1, ContentId::ZERO)]).unwrap();
    store.commit_rp(1, &meta("vol", 2, 2)).unwrap();
    store.release_session(1);
    assert_eq!(store.prune("vol", &Retention::default(), u64::MAX).unwrap(), vec![RpSeq(1)]);

    // A dry run says what would go and changes nothing.
    let dry = store.gc_dry_run(Duration::ZERO).unwrap();
    assert!(dry.dry_run);
    assert_eq!((dry.blobs_scanned, dry.blobs_deleted), (5, 2), "{dry:?}");
    assert_eq!(dry.bytes_freed, (2 * BLOB_HEADER_BYTES + orphan.payload.len() + old.payload.len()) as u64);
    assert!(store.blob_path(&old.id).exists());
    assert!(store.locate(&orphan.content).unwrap().is_some());
    assert_eq!(store.stats().unwrap().blob_count, 5);

    let mut events = Vec::new();
    let report = store.gc_with_progress(Duration::ZERO, false, &mut |p| events.push(p)).unwrap();
    // Each phase reports its start with its size (the catalog's blob count for the files).
    let phases: Vec<(&str, u64, u64)> = events.iter().map(|p| (p.phase, p.done, p.total)).collect();
    assert_eq!(phases, vec![("marking", 0, 2), ("scanning blob files", 0, 5), ("deleting", 0, 2)], "{events:?}");
    assert_eq!(store.gc_totals().runs, 1);
    assert!(!report.dry_run);
    assert_eq!(report.blobs_scanned, 5);
    assert_eq!(report.blobs_deleted, 2, "{report:?}");
    assert_eq!(
        report.bytes_freed,
        (2 * BLOB_HEADER_BYTES + orphan.payload.len() + old.payload.len()) as u64
    );
    assert!(store.locate(&orphan.content).unwrap().is_none());
    assert!(!store.blob_path(&old.id).exists());
    for b in [&base, &d1, &d2] {
        assert_eq!(&store.read_blob(&b.id).unwrap(), b);
    }
    assert_eq!(store.stats().unwrap().blob_count, 3);
    // A second run finds nothing to do.
    assert_eq!(store.gc(Duration::ZERO).unwrap().blobs_deleted, 0);
}

#[test]
fn store_grace_keeps_young_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let orphan = full(b"young");
    store.put_blobs(1, std::slice::from_ref(&orphan)).unwrap();
    store.release_session(1);
    let report = store.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!((report.blobs_deleted, report.blobs_kept_grace), (0, 1));
    assert_eq!(store.gc(Duration::ZERO).unwrap().blobs_deleted, 1);
}

#[test]
fn store_pinned_blobs_survive_gc_with_zero_grace() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = full(b"base");
    let d = delta(&base, b"derived", b"delta");
    store.put_blobs(1, &[base.clone(), d.clone()]).unwrap();
    store.release_session(1);
    // Session 2 was told "present" for d's content; it has not committed.
    let found = store
        .lookup_and_pin(2, &[d.content, IdScheme::plain().content_id(b"absent")])
        .unwrap();
    assert_eq!(found[0].map(|l| (l.blob, l.depth)), Some((d.id, 1)));
    assert_eq!(found[1], None);
    let report = store.gc(Duration::ZERO).unwrap();
    assert_eq!((report.blobs_deleted, report.blobs_kept_pinned), (0, 2), "{report:?}");
    // It can commit what it was told is there.
    store.stage(2, "vol", &[(0, d.content)]).unwrap();
    store.commit_rp(2, &meta("vol", 1, 1)).unwrap();
    store.release_session(2);
    assert_eq!(store.gc(Duration::ZERO).unwrap().blobs_deleted, 0);
    assert_eq!(store.read_blob(&base.id).unwrap(), base);
}

#[test]
fn store_orphan_files_without_rows_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"a");
    store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
    store.release_session(1);
    // Copy its file under another id: a file the catalog never recorded.
    let other = IdScheme::plain().content_id(b"other");
    let path = store.blob_path(&other);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(store.blob_path(&a.id), &path).unwrap();
    let report = store.gc(Duration::ZERO).unwrap();
    assert_eq!(report.blobs_deleted, 2);
    assert!(!path.exists());
}

#[test]
fn store_concurrent_gc_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store.gc(Duration::ZERO).unwrap();
                store
                    .prune(
                        "vol",
                        &Retention {
                            keep_last: 3,
                            ..Retention::default()
                        },
                        u64::MAX,
                    )
                    .unwrap();
                runs += 1;
            }
            runs
        })
    };
    let blocks = 6u64;
    let mut prev: Vec<EncodedBlob> = Vec::new();
    for seq in 1..=60u64 {
        let session = seq;
        // Offer the previous round's blocks plus new ones; send only what is lacking.
        let mut wanted: Vec<EncodedBlob> = (0..blocks)
            .map(|i| {
                if i % 2 == 0 && !prev.is_empty() {
                    prev[i as usize].clone()
                } else {
                    full(format!("blk {seq} {i}").as_bytes())
                }
            })
            .collect();
        // Sometimes a delta against a block the target has.
        if let Some(base) = prev.first() {
            wanted[1] = delta(
                base,
                format!("delta {seq}").as_bytes(),
                format!("delta payload {seq}").as_bytes(),
            );
        }
        let contents: Vec<ContentId> = wanted.iter().map(|b| b.content).collect();
        let found = store.lookup_and_pin(session, &contents).unwrap();
        let mut send: Vec<EncodedBlob> = Vec::new();
        for (b, f) in wanted.iter().zip(&found) {
            if f.is_none() {
                if let Some(base) = b.base {
                    // The delta's base must still be there: pin it first, then rely on it.
                    store.pin(session, &[base]);
                    if store.lookup_and_pin(session, &[base]).unwrap()[0].is_none() {
                        send.push(prev[0].clone());
                    }
                }
                send.push(b.clone());
            }
        }
        store.put_blobs(session, &send).unwrap();
        let changes: Vec<(u64, ContentId)> = contents.iter().enumerate().map(|(i, c)| (i as u64, *c)).collect();
        store.stage(session, "vol", &changes).unwrap();
        store.commit_rp(session, &meta("vol", seq, blocks)).unwrap();
        store.release_session(session);
        prev = wanted;
    }
    stop.store(true, Ordering::Relaxed);
    let runs = gc.join().unwrap();
    assert!(runs > 0);
    store.gc(Duration::ZERO).unwrap();
    // Every remaining RP's blocks locate and read fine, delta chains included.
    let rps = store.rps("vol").unwrap();
    assert!(!rps.is_empty());
    for rp in rps {
        for content in store.block_ids("vol", rp.seq, 0, rp.block_count).unwrap() {
            let loc = store
                .locate(&content)
                .unwrap()
                .unwrap_or_else(|| panic!("vol@{} lost {content}", rp.seq));
            let mut blob = store.read_blob(&loc.blob).unwrap();
            while let Some(base) = blob.base {
                blob = store.read_blob(&base).unwrap();
            }
            assert_eq!(blob.depth, 0);
        }
    }
}

fn drill(volume: &str, seq: u64, at: u64, verified: bool) -> drmesh_actors::drill::DrillReport {
    use drmesh_actors::drill::{CheckReport, DrillReport};
    let mut r = DrillReport {
        volume: drmesh_actors::store::VolumeName::new(volume).expect("a test volume name"),
        seq: RpSeq(seq),
        node: "dst".into(),
        started_unix_ms: at - 1,
        finished_unix_ms: at,
        software_version: "test".into(),
        trigger: "request".into(),
        checks: vec![CheckReport { check: "fsck".into(), passed: verified, summary: "s".into(), duration_ms: 1, output: String::new() }],
        passed: false,
        verified: false,
        error: None,
    };
    r.settle(&["fsck"]);
    r
}

#[test]
fn store_retention_keeps_the_newest_verified_rp_and_drops_reports_with_their_rp() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let block = full(b"one block");
    store.put_blobs(1, std::slice::from_ref(&block)).unwrap();
    for seq in 1..=6 {
        store.stage(1, "vol", &[(0, block.content)]).unwrap();
        store.commit_rp(1, &meta("vol", seq, 1)).unwrap();
    }
    store.release_session(1);
    // RP 2 verified, then failed later? No: its newest report decides. RP 3 verified, then a
    // newer drill of RP 3 failed: RP 3 is no longer known-good. RP 5 failed.
    store.record_drill(&drill("vol", 2, 100, true)).unwrap();
    store.record_drill(&drill("vol", 3, 200, true)).unwrap();
    store.record_drill(&drill("vol", 3, 300, false)).unwrap();
    store.record_drill(&drill("vol", 5, 400, false)).unwrap();
    assert_eq!(store.verified_seq("vol").unwrap(), Some(RpSeq(2)));
    assert_eq!(store.drills(Some("vol")).unwrap().len(), 4);
    // A report for an RP that is not here is refused, nothing stored.
    assert!(store.record_drill(&drill("vol", 9, 500, true)).is_err());
    assert!(store.record_drill(&drill("other", 1, 500, true)).is_err());

    let keep_two = Retention { keep_last: 2, ..Default::default() };
    assert_eq!(store.prune("vol", &keep_two, u64::MAX).unwrap(), vec![RpSeq(1), RpSeq(3), RpSeq(4)]);
    let left: Vec<u64> = store.rps("vol").unwrap().iter().map(|m| m.seq.0).collect();
    assert_eq!(left, vec![2, 5, 6], "the verified RP 2 stays beside the newest two");
    let reports: Vec<(u64, u64)> = store.drills(Some("vol")).unwrap().iter().map(|r| (r.seq.0, r.finished_unix_ms)).collect();
    assert_eq!(reports, vec![(2, 100), (5, 400)], "reports of pruned RPs went with them");
    // The RP kept for its drill still restores: its block map is whole.
    assert_eq!(store.block_ids("vol", RpSeq(2), 0, 1).unwrap(), vec![block.content]);

    // Once a newer RP is verified, the old one is pruned like any other.
    store.record_drill(&drill("vol", 6, 600, true)).unwrap();
    assert_eq!(store.prune("vol", &keep_two, u64::MAX).unwrap(), vec![RpSeq(2)]);
    assert_eq!(store.verified_seq("vol").unwrap(), Some(RpSeq(6)));
    // Reports survive a reopen; a read-only handle reads them.
    drop(store);
    let ro = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.drills(None).unwrap().len(), 2);
}
