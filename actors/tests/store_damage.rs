//! A damaged catalog never panics the process: random bytes written over the
//! catalog at seeded places, before the store is opened (a stopped node) and
//! under an open handle (a running node). Every operation either works or
//! fails with an error that says what; where the storage engine itself fails
//! on the damage, the error says the catalog is damaged and what to do, and
//! the handle takes no more writes. After each round `store rebuild` makes a
//! catalog from the manifests and blobs in which every RP has the block map
//! it had.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::path::Path;
use std::time::Duration;

use drmesh_actors::content::{ContentId, IdScheme, MerkleBuilder, MerkleRoot};
use drmesh_actors::store::{BlobFlags, EncodedBlob, Retention, RpMeta, RpSeq, Store, StoreError};

fn full(data: &[u8]) -> EncodedBlob {
    let id = IdScheme::plain().content_id(data);
    EncodedBlob { id, content: id, flags: BlobFlags(0), plain_len: data.len() as u32, base: None, depth: 0, payload: data.to_vec() }
}

fn meta(seq: u64) -> RpMeta {
    meta_with_root(seq, MerkleRoot([0; 32]))
}

fn root_of(map: &[ContentId]) -> MerkleRoot {
    let mut merkle = MerkleBuilder::new();
    map.iter().for_each(|c| merkle.push(c));
    merkle.finish()
}

fn meta_with_root(seq: u64, merkle_root: MerkleRoot) -> RpMeta {
    RpMeta {
        volume: drmesh_topology::VolumeName::from_static("vol"),
        seq: RpSeq(seq),
        time_unix_ms: 1_700_000_000_000 + seq,
        source_node: "src".into(),
        volume_bytes: 2000 * 4096,
        block_bytes: 4096,
        block_count: 2000,
        changed_blocks: 0,
        bytes_stored: 0,
        merkle_root,
        encrypted: false,
        consistency: "crash".into(),
        group: None,
    }
}

/// A store with 20 RPs of a 2000-block volume over 300 blobs (with true
/// Merkle roots); returns the blobs and each RP's block map.
fn build(dir: &Path) -> (Vec<EncodedBlob>, Vec<Vec<ContentId>>) {
    let store = Store::open(dir).unwrap();
    let blocks: Vec<EncodedBlob> = (1..=300u32).map(|i| full(&i.to_le_bytes().repeat(64))).collect();
    store.put_blobs(1, &blocks).unwrap();
    let mut map = vec![ContentId::ZERO; 2000];
    let mut maps = Vec::new();
    for seq in 1..=20u64 {
        let changes: Vec<(u64, _)> = (0..150u64).map(|i| ((i * 7 + seq * 13) % 2000, blocks[((i * 3 + seq * 11) % 300) as usize].content)).collect();
        for (i, c) in &changes {
            map[*i as usize] = *c;
        }
        store.stage(1, "vol", &changes).unwrap();
        store.commit_rp(1, &meta_with_root(seq, root_of(&map))).unwrap();
        maps.push(map.clone());
    }
    store.release_session(1);
    // The RP `exercise` commits.
    map[5] = blocks[7].content;
    maps.push(map);
    (blocks, maps)
}

/// `store rebuild` on `dir`; then every RP listed has the block map it was
/// committed with, and the newest 15 of the good store are all listed.
fn rebuild_and_compare(round: usize, dir: &Path, maps: &[Vec<ContentId>]) {
    let report = drmesh_actors::store::rebuild(dir, &mut |_| {}).unwrap_or_else(|e| panic!("round {round}: rebuild failed: {e}"));
    assert!(report.refused.is_empty() && report.damaged_blobs.is_empty(), "round {round}: {report:?}");
    let store = Store::open(dir).unwrap_or_else(|e| panic!("round {round}: the rebuilt catalog does not open: {e}"));
    let rps = store.rps("vol").unwrap();
    for rp in &rps {
        let map = &maps[rp.seq.0 as usize - 1];
        assert_eq!(&store.block_ids("vol", rp.seq, 0, 2000).unwrap(), map, "round {round}: vol@{} after rebuild", rp.seq);
    }
    // The round's own commit (vol@21) and prune (keep 15) may have worked on a handle that still trusted the catalog.
    let newest = rps.last().map(|r| r.seq).unwrap_or(RpSeq(0));
    assert!(newest >= RpSeq(20), "round {round}: newest RP after rebuild is vol@{newest}");
    for seq in (newest.0 - 14..=newest.0).map(RpSeq) {
        assert!(rps.iter().any(|r| r.seq == seq), "round {round}: vol@{seq} is missing after rebuild");
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes 8 runs of 256 random bytes at random places of `file`; returns the offsets.
fn damage(file: &Path, rng: &mut Rng) -> Vec<u64> {
    use std::os::unix::fs::FileExt as _;
    let len = std::fs::metadata(file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    (0..8)
        .map(|_| {
            let off = rng.next() % len;
            let junk: Vec<u8> = (0..256).map(|_| rng.next() as u8).collect();
            f.write_all_at(&junk, off).unwrap();
            off
        })
        .collect()
}

/// The block map of the RP `exercise` commits.
fn exercise_map(blocks: &[EncodedBlob]) -> Vec<ContentId> {
    let mut map = vec![ContentId::ZERO; 2000];
    for seq in 1..=20u64 {
        for i in 0..150u64 {
            map[((i * 7 + seq * 13) % 2000) as usize] = blocks[((i * 3 + seq * 11) % 300) as usize].content;
        }
    }
    map[5] = blocks[7].content;
    map
}

/// Every operation a node makes, on `store`; the errors, as a person reads them.
fn exercise(store: &Store, blocks: &[EncodedBlob]) -> Vec<StoreError> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), StoreError>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    note(store.volumes().map(drop));
    note(store.rps("vol").map(drop));
    for seq in [1, 10, 20].map(RpSeq) {
        note(store.block_ids("vol", seq, 0, 2000).map(drop));
    }
    note(store.lookup_and_pin(2, &blocks[..200].iter().map(|b| b.content).collect::<Vec<_>>()).map(drop));
    store.release_session(2);
    note(store.stage(3, "vol", &[(5, blocks[7].content)]));
    note(store.commit_rp(3, &meta_with_root(21, root_of(&exercise_map(blocks)))));
    store.release_session(3);
    note(store.prune("vol", &Retention { keep_last: 15, ..Default::default() }, u64::MAX).map(drop));
    note(store.gc(Duration::ZERO).map(drop));
    note(store.stats().map(drop));
    errors
}

/// [`exercise`], then, if the engine failed, one more write: it must be refused as damaged.
fn exercise_then_write(store: &Store, blocks: &[EncodedBlob]) -> Vec<StoreError> {
    let mut errors = exercise(store, blocks);
    if errors.iter().any(|e| matches!(e, StoreError::Damaged { .. } | StoreError::CatalogInconsistent { .. } | StoreError::CorruptRow { .. })) {
        let again = store.stage(9, "vol", &[(1, blocks[1].content)]).and_then(|()| store.commit_rp(9, &meta(99)));
        match again {
            Err(e @ StoreError::Damaged { .. }) => errors.push(e),
            other => panic!("a write after the engine failed was not refused as damaged: {other:?}"),
        }
    }
    errors
}

fn check_errors(round: usize, errors: &[StoreError], damaged: &mut usize) {
    let mut seen_damage = false;
    for e in errors {
        let text = e.to_string();
        assert!(!text.contains("Some(") && !text.contains("Err(") && !text.is_empty(), "round {round}: {text}");
        if matches!(e, StoreError::Damaged { .. } | StoreError::CatalogCorrupt { .. } | StoreError::CatalogInconsistent { .. } | StoreError::CorruptRow { .. }) {
            assert!(text.contains("is damaged") && text.contains("store check") && text.contains("store rebuild"), "round {round}: {text}");
            seen_damage = true;
        }
    }
    if seen_damage {
        *damaged += 1;
    }
}

#[test]
fn a_damaged_catalog_never_panics_and_says_so() {
    let base = tempfile::tempdir().unwrap();
    let good = base.path().join("good");
    let (blocks, maps) = build(&good);
    let mut rng = Rng(0x5eed_0001);
    let (mut stopped_damaged, mut running_damaged, mut clean_errors) = (0, 0, 0);
    let rounds = 24;
    for round in 0..rounds {
        let dir = base.path().join(format!("round{round}"));
        assert!(std::process::Command::new("cp").arg("-a").arg(&good).arg(&dir).status().unwrap().success());
        let cat = dir.join("catalog.redb");
        // Half the rounds: damage, then open (a stopped node starting). Half: damage under an open handle.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if round % 2 == 0 {
                let offsets = damage(&cat, &mut rng);
                match Store::open(&dir) {
                    Ok(store) => (offsets, exercise_then_write(&store, &blocks)),
                    Err(e) => (offsets, vec![e]),
                }
            } else {
                let store = Store::open(&dir).unwrap();
                let offsets = damage(&cat, &mut rng);
                (offsets, exercise_then_write(&store, &blocks))
            }
        }));
        let (offsets, errors) = outcome.unwrap_or_else(|_| panic!("round {round}: a panic escaped the store"));
        let counter = if round % 2 == 0 { &mut stopped_damaged } else { &mut running_damaged };
        check_errors(round, &errors, counter);
        if errors.iter().any(|e| !matches!(e, StoreError::Damaged { .. } | StoreError::CatalogCorrupt { .. } | StoreError::CatalogInconsistent { .. } | StoreError::CorruptRow { .. })) {
            clean_errors += 1;
        }
        eprintln!("round {round}: damage at {offsets:?}: {}", errors.first().map(|e| e.to_string()).unwrap_or_else(|| "every operation worked".into()));
        rebuild_and_compare(round, &dir, &maps);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{rounds} rounds: the engine failed on the damage in {stopped_damaged} opened after it and {running_damaged} open during it; {clean_errors} rounds had other errors; no panic escaped");
    assert!(stopped_damaged + running_damaged >= 1, "the seeds must make the engine fail at least once, or this test proves nothing");
}
