//! Scrubs: a full scrub reads every blob once and checks every RP's block map;
//! a damaged blob is named and marks exactly the RPs that use it; a sampled
//! scrub reads the share asked for (counted by the kernel's read counter of
//! this process), and successive sampled scrubs cover the store once; where
//! the node holds a policy's key, encrypted blobs' AES-GCM tags are checked
//! and a blob altered together with its checksums is caught and repaired.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::sync::atomic::AtomicBool;

use drmesh_actors::content::{ContentId, IdScheme, MerkleBuilder, MerkleRoot};
use std::collections::HashSet;

use drmesh_actors::codec::BlockCodec;
use drmesh_actors::store::{encode_blob_header, BLOB_HEADER_BYTES, BlobFlags, EncodedBlob, RpMeta, RpSeq, ScrubKeys, ScrubOptions, Store};

fn full(data: &[u8]) -> EncodedBlob {
    let id = IdScheme::plain().content_id(data);
    EncodedBlob { id, content: id, flags: BlobFlags(0), plain_len: data.len() as u32, base: None, depth: 0, payload: data.to_vec() }
}

fn root_of(map: &[ContentId]) -> MerkleRoot {
    let mut merkle = MerkleBuilder::new();
    map.iter().for_each(|c| merkle.push(c));
    merkle.finish()
}

/// Bytes this process has read through read(2) and friends so far.
fn rchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

#[test]
fn scrubs_read_what_they_say_and_find_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // 3000 blobs of 8 KiB; 4 RPs of a 4000-block volume, each changing 1000 blocks.
    let blobs: Vec<EncodedBlob> = (1..=3000u32).map(|i| full(&i.to_le_bytes().repeat(2048))).collect();
    for chunk in blobs.chunks(500) {
        store.put_blobs(1, chunk).unwrap();
    }
    let mut map = vec![ContentId::ZERO; 4000];
    for seq in 1..=4u64 {
        let changes: Vec<(u64, ContentId)> = (0..1000u64).map(|i| ((i * 4 + seq) % 4000, blobs[((i + seq * 500) % 3000) as usize].content)).collect();
        for (i, c) in &changes {
            map[*i as usize] = *c;
        }
        store.stage(1, "vol", &changes).unwrap();
        let meta = RpMeta {
            volume: drmesh_topology::VolumeName::from_static("vol"),
            seq: RpSeq(seq),
            time_unix_ms: 1_700_000_000_000 + seq,
            source_node: "src".into(),
            volume_bytes: 4000 * 8192,
            block_bytes: 8192,
            block_count: 4000,
            changed_blocks: 1000,
            bytes_stored: 0,
            merkle_root: root_of(&map),
            encrypted: false,
            consistency: "crash".into(),
            group: None,
        };
        store.commit_rp(1, &meta).unwrap();
    }
    store.release_session(1);
    let stop = AtomicBool::new(false);
    let total_bytes: u64 = blobs.iter().map(|b| 256 + b.payload.len() as u64).sum();

    // Full: every blob once, every RP sound, verdicts kept.
    let before = rchar();
    let full_report = store.scrub(ScrubOptions::default(), &stop, &|_, _| {}).unwrap();
    let read = rchar() - before;
    eprintln!("full scrub: {} blobs, {} bytes read ({read} bytes by the kernel's count), {} MB/s", full_report.blobs_read, full_report.bytes_read, full_report.bytes_per_sec >> 20);
    assert_eq!((full_report.blobs_total, full_report.blobs_read, full_report.bytes_read), (3000, 3000, total_bytes));
    assert!(read >= total_bytes, "the kernel counted {read} bytes read, fewer than the {total_bytes} of the blobs");
    assert_eq!((full_report.blobs_bad, full_report.rps_checked, full_report.rps_damaged), (0, 4, 0), "{full_report:?}");
    assert!(store.scrubs(Some("vol")).unwrap().iter().all(|v| v.ok && v.share == 1.0));

    // Sampled 10%: about a tenth read, as the kernel counts it; ten of them cover the store once.
    let mut reads = 0;
    for round in 0..10 {
        let before = rchar();
        let r = store.scrub(ScrubOptions { share: 0.1, threads: 2, low_priority: true, ..ScrubOptions::default() }, &stop, &|_, _| {}).unwrap();
        let read = rchar() - before;
        eprintln!("sampled scrub {round}: {} of {} blobs, {} bytes ({read} by the kernel's count)", r.blobs_read, r.blobs_total, r.bytes_read);
        assert!((150..=450).contains(&r.blobs_read), "round {round}: a 10% sample read {} of 3000 blobs", r.blobs_read);
        assert!(read >= r.bytes_read && read < total_bytes / 5, "round {round}: the kernel counted {read} bytes for a 10% sample ({} claimed, {total_bytes} in all)", r.bytes_read);
        reads += r.blobs_read;
    }
    assert!((2998..=3002).contains(&reads), "ten 10% samples read {reads} blobs of 3000: the windows must cover the store once");

    // One damaged blob, used by vol@2 only (block 2 at vol@2 is blob 1000's content... find one used by some RPs).
    let victim = blobs[2999].clone();
    let path = store.blob_path(&victim.id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let users: Vec<RpSeq> = (1..=4).map(RpSeq).filter(|seq| store.block_ids("vol", *seq, 0, 4000).unwrap().contains(&victim.content)).collect();
    assert!(!users.is_empty(), "the victim must be used by some RP");
    let r = store.scrub(ScrubOptions::default(), &stop, &|_, _| {}).unwrap();
    assert_eq!(r.blobs_bad, 1, "{r:?}");
    assert!(r.problems.iter().any(|p| p.object == victim.id.to_hex() && p.problem.contains("payload checksum mismatch")), "{:?}", r.problems);
    for v in store.scrubs(Some("vol")).unwrap() {
        let seq: RpSeq = v.rp.trim_start_matches("vol@").parse().unwrap();
        assert_eq!(!v.ok, users.contains(&seq), "{v:?} (users {users:?})");
        if !v.ok {
            assert_eq!(v.damaged_blocks, 1, "{v:?}");
            assert!(v.problem.as_deref().unwrap_or("").contains("no sound blob"), "{v:?}");
        }
    }
}

/// Commits one RP `volume@1` whose blocks are `blobs`' contents, in order.
fn commit_volume(store: &Store, volume: &str, blobs: &[EncodedBlob], encrypted: bool) {
    store.put_blobs(7, blobs).unwrap();
    let changes: Vec<(u64, ContentId)> = blobs.iter().enumerate().map(|(i, b)| (i as u64, b.content)).collect();
    let map: Vec<ContentId> = blobs.iter().map(|b| b.content).collect();
    store.stage(7, volume, &changes).unwrap();
    let meta = RpMeta {
        volume: drmesh_actors::store::VolumeName::new(volume).expect("a test volume name"),
        seq: RpSeq(1),
        time_unix_ms: 1_700_000_000_000,
        source_node: "src".into(),
        volume_bytes: blobs.len() as u64 * 65536,
        block_bytes: 65536,
        block_count: blobs.len() as u64,
        changed_blocks: blobs.len() as u64,
        bytes_stored: 0,
        merkle_root: root_of(&map),
        encrypted,
        consistency: "crash".into(),
        group: None,
    };
    store.commit_rp(7, &meta).unwrap();
    store.release_session(7);
}

/// Alters one payload byte of `blob`'s file and writes the header's payload
/// checksum and header check to match: only the AES-GCM tag can tell.
fn alter_with_checksums(store: &Store, blob: &EncodedBlob) {
    let path = store.blob_path(&blob.id);
    let mut altered = blob.clone();
    let last = altered.payload.len() - 1;
    altered.payload[last] ^= 0x10;
    let mut bytes = encode_blob_header(&altered).to_vec();
    bytes.extend_from_slice(&altered.payload);
    assert_eq!(bytes.len(), BLOB_HEADER_BYTES + blob.payload.len());
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn tags_are_checked_where_the_key_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (held, other) = (BlockCodec::new(Some(1), Some(&[1; 32])), BlockCodec::new(Some(1), Some(&[2; 32])));
    let encode = |codec: &BlockCodec, salt: u32| -> Vec<EncodedBlob> {
        (0..40u32)
            .map(|i| {
                let data: Vec<u8> = (0..65536u32).map(|b| ((b / 7) ^ (i * 31 + salt)) as u8).collect();
                codec.encode_full(codec.ids().content_id(&data), &data)
            })
            .collect()
    };
    let (secret_blobs, other_blobs) = (encode(&held, 1), encode(&other, 2));
    let plain_blobs: Vec<EncodedBlob> = (0..10u32).map(|i| full(&(i + 90_000).to_le_bytes().repeat(16384))).collect();
    commit_volume(&store, "secret", &secret_blobs, true);
    commit_volume(&store, "other", &other_blobs, true);
    commit_volume(&store, "plain", &plain_blobs, false);
    let mut keys = ScrubKeys::default();
    keys.add_policy(held.clone(), ["secret".to_string()]);
    keys.add_policy(BlockCodec::new(Some(1), None), ["plain".to_string()]);
    let with_keys = ScrubOptions { keys: keys.clone(), ..ScrubOptions::default() };
    let stop = AtomicBool::new(false);

    let r = store.scrub(with_keys.clone(), &stop, &|_, _| {}).unwrap();
    assert_eq!((r.blobs_read, r.blobs_bad, r.blobs_authenticated, r.blobs_without_key, r.rps_damaged), (90, 0, 40, 40, 0), "{r:?}");

    // A blob of `secret` altered with its checksums: a scrub without keys sees
    // nothing; one with the key names it and marks exactly `secret@1` damaged.
    let victim = secret_blobs[17].clone();
    alter_with_checksums(&store, &victim);
    let blind = store.scrub(ScrubOptions::default(), &stop, &|_, _| {}).unwrap();
    assert_eq!((blind.blobs_bad, blind.rps_damaged, blind.blobs_authenticated), (0, 0, 0), "checksums alone cannot see it: {blind:?}");
    let r = store.scrub(with_keys.clone(), &stop, &|_, _| {}).unwrap();
    assert_eq!((r.blobs_bad, r.blobs_authenticated, r.blobs_without_key, r.rps_damaged), (1, 39, 40, 1), "{r:?}");
    assert!(r.problems.iter().any(|p| p.object == victim.id.to_hex() && p.problem.contains("AES-GCM")), "{:?}", r.problems);
    assert!(r.needs.bad_blobs.contains(&victim.id));
    assert_eq!(r.needs.contents, vec![("secret".to_string(), 1, victim.content)]);
    let damaged: Vec<&str> = r.rps.iter().filter(|v| !v.ok).map(|v| v.rp.as_str()).collect();
    assert_eq!(damaged, vec!["secret@1"]);

    // The same alteration of a blob whose key is not held here: counted as
    // checked by checksum only, never called bad.
    alter_with_checksums(&store, &other_blobs[3]);
    let r = store.scrub(with_keys.clone(), &stop, &|_, _| {}).unwrap();
    assert_eq!((r.blobs_bad, r.blobs_without_key), (1, 40), "{r:?}");

    // Repair: a chain that fails the tag is refused and nothing is stored; the
    // sound blob is stored over the file (which reads back intact) and the RP is sound again.
    let mut forged = victim.clone();
    forged.payload[20] ^= 1;
    let rewrite: HashSet<_> = [victim.id].into_iter().collect();
    let err = store.repair_content("secret", &victim.content, &[forged], &keys, &rewrite).unwrap_err();
    assert!(err.to_string().contains("AES-GCM"), "{err}");
    assert!(store.recheck_rps(&rewrite, &keys, 1.0).unwrap().iter().any(|v| v.rp == "secret@1" && !v.ok));
    store.repair_content("secret", &victim.content, std::slice::from_ref(&victim), &keys, &rewrite).unwrap();
    let verdicts = store.recheck_rps(&rewrite, &keys, 1.0).unwrap();
    assert!(verdicts.iter().all(|v| v.ok), "{verdicts:?}");
    let r = store.scrub(with_keys, &stop, &|_, _| {}).unwrap();
    assert_eq!((r.blobs_bad, r.blobs_authenticated, r.rps_damaged), (0, 40, 0), "{r:?}");
}
