//! RP commits, block maps with inheritance, refusals, crash recovery, prune re-keying.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::collections::HashMap;

use drmesh_actors::content::{ContentId, IdScheme, MerkleBuilder};
use drmesh_actors::store::{BlobFlags, EncodedBlob, Retention, RpMeta, RpSeq, Store, StoreError};
use proptest::prelude::*;

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

fn meta(volume: &str, seq: u64, block_count: u64, time_unix_ms: u64) -> RpMeta {
    RpMeta {
        volume: drmesh_actors::store::VolumeName::new(volume).expect("a test volume name"),
        seq: RpSeq(seq),
        time_unix_ms,
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

fn map(store: &Store, volume: &str, seq: u64) -> Vec<ContentId> {
    let count = store.rp(volume, RpSeq(seq)).unwrap().unwrap().block_count;
    // Page in small chunks to exercise the paging API.
    let mut out = Vec::new();
    let mut start = 0;
    while start < count {
        out.extend(store.block_ids(volume, RpSeq(seq), start, 3).unwrap());
        start += 3;
    }
    out
}

#[test]
fn store_block_maps_inherit_across_rps() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b, c) = (full(b"a"), full(b"b"), full(b"c"));
    store.put_blobs(1, &[a.clone(), b.clone(), c.clone()]).unwrap();
    let z = ContentId::ZERO;

    store.stage(1, "vol", &[(0, a.id), (2, b.id)]).unwrap();
    store.stage(1, "vol", &[(2, c.id)]).unwrap(); // later change of the same index wins
    store.commit_rp(1, &meta("vol", 1, 5, 10)).unwrap();
    store.stage(1, "vol", &[(1, b.id), (0, z)]).unwrap();
    store.commit_rp(1, &meta("vol", 2, 5, 20)).unwrap();
    store.commit_rp(1, &meta("vol", 5, 6, 30)).unwrap(); // nothing changed, one more block
    store.release_session(1);

    assert_eq!(map(&store, "vol", 1), vec![a.id, z, c.id, z, z]);
    assert_eq!(map(&store, "vol", 2), vec![z, b.id, c.id, z, z]);
    assert_eq!(map(&store, "vol", 5), vec![z, b.id, c.id, z, z, z]);
    assert_eq!(store.volumes().unwrap(), vec!["vol".to_string()]);
    assert_eq!(
        store.rps("vol").unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 5].map(RpSeq)
    );
    assert_eq!(store.latest_rp("vol").unwrap().unwrap().seq, RpSeq(5));
    assert_eq!(store.rp("vol", RpSeq(2)).unwrap().unwrap(), meta("vol", 2, 5, 20));
    assert!(store.rp("vol", RpSeq(3)).unwrap().is_none());
    assert!(matches!(
        store.block_ids("vol", RpSeq(3), 0, 1).unwrap_err(),
        StoreError::RpNotFound { .. }
    ));
    assert!(store.latest_rp("other").unwrap().is_none());
}

#[test]
fn store_commit_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"a");
    store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
    store.stage(1, "vol", &[(0, a.id)]).unwrap();
    store.commit_rp(1, &meta("vol", 3, 2, 0)).unwrap();

    // Missing content.
    let missing = IdScheme::plain().content_id(b"never sent");
    store.stage(1, "vol", &[(1, missing), (0, ContentId::ZERO)]).unwrap();
    let err = store.commit_rp(1, &meta("vol", 4, 2, 0)).unwrap_err();
    assert!(matches!(err, StoreError::MissingContent { index: 1, .. }), "{err}");
    assert!(
        err.to_string().contains("vol@4") && err.to_string().contains(&missing.to_hex()),
        "{err}"
    );
    assert!(store.rp("vol", RpSeq(4)).unwrap().is_none());
    assert_eq!(map(&store, "vol", 3), vec![a.id, ContentId::ZERO]);

    // Not newer, and exists.
    store.release_session(1);
    let err = store.commit_rp(2, &meta("vol", 2, 2, 0)).unwrap_err();
    assert!(matches!(err, StoreError::SeqNotNewer { newest: RpSeq(3), .. }), "{err}");
    assert!(matches!(
        store.commit_rp(2, &meta("vol", 3, 2, 0)).unwrap_err(),
        StoreError::RpExists { .. }
    ));
    // Index beyond block_count.
    store.stage(2, "vol", &[(7, a.id)]).unwrap();
    assert!(matches!(
        store.commit_rp(2, &meta("vol", 9, 2, 0)).unwrap_err(),
        StoreError::InvalidRp { .. }
    ));
    assert_eq!(store.rps("vol").unwrap().len(), 1);
    // A new volume whose first commit fails does not appear.
    store.stage(3, "new", &[(0, missing)]).unwrap();
    assert!(store.commit_rp(3, &meta("new", 1, 1, 0)).is_err());
    assert_eq!(store.volumes().unwrap(), vec!["vol".to_string()]);
}

#[test]
fn store_released_staged_rows_vanish() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (full(b"a"), full(b"b"));
    store.put_blobs(1, &[a.clone(), b.clone()]).unwrap();
    store.stage(1, "vol", &[(0, a.id)]).unwrap();
    store.stage(2, "vol", &[(1, b.id)]).unwrap();
    store.release_session(1);
    store.commit_rp(1, &meta("vol", 1, 2, 0)).unwrap();
    assert_eq!(map(&store, "vol", 1), vec![ContentId::ZERO, ContentId::ZERO]);
    store.commit_rp(2, &meta("vol", 2, 2, 0)).unwrap();
    assert_eq!(map(&store, "vol", 2), vec![ContentId::ZERO, b.id]);
}

#[test]
fn store_crash_before_commit_leaves_no_half_rp() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (full(b"a"), full(b"b"));
    {
        let store = Store::open(dir.path()).unwrap();
        store.put_blobs(1, &[a.clone(), b.clone()]).unwrap();
        store.stage(1, "vol", &[(0, a.id)]).unwrap();
        store.commit_rp(1, &meta("vol", 1, 2, 0)).unwrap();
        store.stage(1, "vol", &[(0, b.id), (1, b.id)]).unwrap();
        // Dropped without commit: as if the node died here.
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.rps("vol").unwrap().len(), 1);
    assert_eq!(map(&store, "vol", 1), vec![a.id, ContentId::ZERO]);
    // The staged rows of the dead session are gone: committing under its id adds nothing.
    store.commit_rp(1, &meta("vol", 2, 2, 0)).unwrap();
    assert_eq!(map(&store, "vol", 2), vec![a.id, ContentId::ZERO]);
}

#[derive(Clone, Debug)]
enum Op {
    Commit { changes: Vec<(u64, u8)>, hours: u64 },
    Prune { keep_last: u32, hourly: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (proptest::collection::vec((0u64..8, 0u8..4), 0..6), 0u64..3).prop_map(|(changes, hours)| Op::Commit { changes, hours }),
        1 => (0u32..3, 0u32..3).prop_map(|(keep_last, hourly)| Op::Prune { keep_last, hourly }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Random commits (zeros included) and prunes: every remaining RP's full block map
    /// equals a model that keeps a plain map per RP.
    #[test]
    fn store_prune_keeps_block_maps_of_retained_rps(ops in proptest::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Content 0 is ZERO; 1..=3 are real blobs.
        let blobs: Vec<EncodedBlob> = (1u8..=3).map(|i| full(&[i; 7])).collect();
        store.put_blobs(99, &blobs).unwrap();
        let content = |v: u8| if v == 0 { ContentId::ZERO } else { blobs[usize::from(v) - 1].id };
        let mut model: HashMap<u64, Vec<ContentId>> = HashMap::new();
        let mut current = vec![ContentId::ZERO; 8];
        let (mut seq, mut time) = (0u64, 1_700_000_000_000u64);
        for op in ops {
            match op {
                Op::Commit { changes, hours } => {
                    seq += 1 + seq % 2;
                    time += hours * 3_600_000 + 1;
                    let staged: Vec<(u64, ContentId)> = changes.iter().map(|(i, v)| (*i, content(*v))).collect();
                    for (i, c) in &staged {
                        current[*i as usize] = *c;
                    }
                    let mut merkle = MerkleBuilder::new();
                    current.iter().for_each(|c| merkle.push(c));
                    store.stage(7, "v", &staged).unwrap();
                    store.commit_rp(7, &RpMeta { merkle_root: merkle.finish(), ..meta("v", seq, 8, time) }).unwrap();
                    model.insert(seq, current.clone());
                }
                Op::Prune { keep_last, hourly } => {
                    let deleted = store.prune("v", &Retention { keep_last, hourly, ..Default::default() }, time).unwrap();
                    for d in deleted {
                        prop_assert!(model.remove(&d.0).is_some());
                    }
                }
            }
            let rps = store.rps("v").unwrap();
            prop_assert_eq!(rps.len(), model.len());
            for rp in rps {
                prop_assert_eq!(&store.block_ids("v", rp.seq, 0, 8).unwrap(), &model[&rp.seq.0], "seq {}", rp.seq);
            }
        }
        // The manifests agree with the catalog, and alone (catalog deleted) make the same RPs.
        let before = store.rps("v").unwrap();
        drop(store);
        let check = drmesh_actors::store::check(dir.path(), &mut |_| {}).unwrap();
        prop_assert!(check.is_sound(), "{:?}", check);
        std::fs::remove_file(dir.path().join("catalog.redb")).unwrap();
        if before.is_empty() {
            // Blobs and no RP, so no manifest: a rebuild has nothing to list and refuses.
            let err = drmesh_actors::store::rebuild(dir.path(), &mut |_| {}).unwrap_err().to_string();
            prop_assert!(err.contains("no RP manifest"), "{}", err);
            return Ok(());
        }
        let report = drmesh_actors::store::rebuild(dir.path(), &mut |_| {}).unwrap();
        prop_assert!(report.refused.is_empty(), "{:?}", report);
        let store = Store::open(dir.path()).unwrap();
        prop_assert_eq!(&store.rps("v").unwrap(), &before);
        for rp in before {
            prop_assert_eq!(&store.block_ids("v", rp.seq, 0, 8).unwrap(), &model[&rp.seq.0], "rebuilt seq {}", rp.seq);
        }
    }
}

/// A store with blobs and no manifests (written before manifests existed, or
/// manifests/ removed): rebuild refuses and changes nothing; the next open
/// writes the manifests, after which a rebuild lists the RP.
#[test]
fn store_rebuild_without_manifests_refuses_and_open_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = full(b"a");
    let mut merkle = MerkleBuilder::new();
    [a.id, ContentId::ZERO].iter().for_each(|c| merkle.push(c));
    {
        let store = Store::open(dir.path()).unwrap();
        store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
        store.stage(1, "vol", &[(0, a.id)]).unwrap();
        store.commit_rp(1, &RpMeta { merkle_root: merkle.finish(), ..meta("vol", 1, 2, 1) }).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("manifests")).unwrap();
    let err = drmesh_actors::store::rebuild(dir.path(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("no RP manifest") && err.contains("nothing was changed"), "{err}");
    assert!(!dir.path().join("catalog.redb.rebuild").exists());
    // The catalog is as it was; opening it writes the manifest again.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.rps("vol").unwrap().len(), 1);
    drop(store);
    let report = drmesh_actors::store::rebuild(dir.path(), &mut |_| {}).unwrap();
    assert_eq!(report.rps.len(), 1, "{report:?}");
    assert!(report.refused.is_empty(), "{report:?}");
}
