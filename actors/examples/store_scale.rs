//! Store operations at scale, one per process so that each one's peak memory
//! (VmHWM) is its own: `scripts/bench-store` runs them at several sizes.
//!
//! ```text
//! store_scale build DIR BLOCKS    a store with one volume of BLOCKS blocks in 2 RPs
//! store_scale open DIR            Store::open (the catalog's integrity check included)
//! store_scale scrub DIR           a full scrub
//! store_scale check DIR           drmesh store check
//! store_scale rebuild DIR         drmesh store rebuild (the catalog kept aside)
//! ```
//!
//! The volume's blocks are 64 bytes each (small files keep the store on disk
//! small) and every 16th block repeats: BLOCKS / 16 distinct contents, so
//! BLOCKS / 16 blob files. RP 2 changes 1% of the blocks. Each command prints
//! one JSON line: what ran, on how many blocks and blobs, its time and VmHWM.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: a failure is the report

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use drmesh_actors::content::{ContentId, IdScheme, MerkleBuilder};
use drmesh_actors::store::{self, BlobFlags, EncodedBlob, RpMeta, RpSeq, ScrubOptions, Store};

const BLOCK: u64 = 64;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn block(i: u64, version: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(BLOCK as usize);
    for k in 0..BLOCK / 16 {
        data.extend_from_slice(&(i ^ (k << 40)).to_le_bytes());
        data.extend_from_slice(&version.to_le_bytes());
    }
    data
}

fn blob(data: &[u8]) -> EncodedBlob {
    let id = IdScheme::plain().content_id(data);
    EncodedBlob { id, content: id, flags: BlobFlags(0), plain_len: data.len() as u32, base: None, depth: 0, payload: data.to_vec() }
}

fn meta(seq: u64, blocks: u64, changed: u64, map: &[ContentId]) -> RpMeta {
    let mut merkle = MerkleBuilder::new();
    map.iter().for_each(|c| merkle.push(c));
    RpMeta {
        volume: drmesh_topology::VolumeName::from_static("vol"),
        seq: RpSeq(seq),
        time_unix_ms: 1_700_000_000_000 + seq,
        source_node: "scale".into(),
        volume_bytes: blocks * BLOCK,
        block_bytes: BLOCK as u32,
        block_count: blocks,
        changed_blocks: changed,
        bytes_stored: 0,
        merkle_root: merkle.finish(),
        encrypted: false,
        consistency: "crash".into(),
        group: None,
    }
}

fn build(dir: &Path, blocks: u64) -> serde_json::Value {
    let store = Store::open(dir).unwrap();
    let distinct = (blocks / 16).max(1);
    let mut map = vec![ContentId::ZERO; blocks as usize];
    // RP 1: every block; contents written in batches, staged in batches.
    let ids: Vec<ContentId> = (0..distinct)
        .collect::<Vec<_>>()
        .chunks(4096)
        .flat_map(|chunk| {
            let blobs: Vec<EncodedBlob> = chunk.iter().map(|i| blob(&block(*i, 1))).collect();
            store.put_blobs(1, &blobs).unwrap();
            blobs.into_iter().map(|b| b.content).collect::<Vec<_>>()
        })
        .collect();
    for start in (0..blocks).step_by(65536) {
        let changes: Vec<(u64, ContentId)> = (start..(start + 65536).min(blocks)).map(|i| (i, ids[(i % distinct) as usize])).collect();
        for (i, c) in &changes {
            map[*i as usize] = *c;
        }
        store.stage(1, "vol", &changes).unwrap();
    }
    store.commit_rp(1, &meta(1, blocks, blocks, &map)).unwrap();
    store.release_session(1);
    // RP 2: 1% of the blocks changed to new contents.
    let changed: Vec<u64> = (0..blocks).step_by(100).collect();
    let blobs: Vec<EncodedBlob> = changed.iter().map(|i| blob(&block(*i, 2))).collect();
    for chunk in blobs.chunks(4096) {
        store.put_blobs(2, chunk).unwrap();
    }
    let changes: Vec<(u64, ContentId)> = changed.iter().zip(&blobs).map(|(i, b)| (*i, b.content)).collect();
    for (i, c) in &changes {
        map[*i as usize] = *c;
    }
    store.stage(2, "vol", &changes).unwrap();
    store.commit_rp(2, &meta(2, blocks, changes.len() as u64, &map)).unwrap();
    store.release_session(2);
    serde_json::json!({ "blobs": distinct + changes.len() as u64 })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: store_scale build DIR BLOCKS | open DIR | scrub DIR | check DIR | rebuild DIR";
    let (Some(what), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let started = Instant::now();
    let detail = match what.as_str() {
        "build" => build(dir, args.get(3).and_then(|b| b.parse().ok()).expect(usage)),
        "open" => {
            let store = Store::open(dir).unwrap();
            let stats = store.stats().unwrap();
            serde_json::json!({ "blobs": stats.blob_count, "rps": stats.rp_count })
        }
        "scrub" => {
            let store = Store::open(dir).unwrap();
            let opened = started.elapsed().as_secs_f64();
            let r = store.scrub(ScrubOptions::default(), &AtomicBool::new(false), &|_, _| {}).unwrap();
            assert_eq!((r.blobs_bad, r.rps_damaged), (0, 0));
            serde_json::json!({ "blobs": r.blobs_read, "rps": r.rps_checked, "open_secs": opened })
        }
        "check" => {
            let r = store::check(dir, &mut |_| {}).unwrap();
            serde_json::json!({ "sound": r.findings.is_empty() })
        }
        "rebuild" => {
            let r = store::rebuild(dir, &mut |_| {}).unwrap();
            serde_json::json!({ "rps": r.rps.len(), "refused": r.refused.len() })
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    println!("{}", serde_json::json!({ "what": what, "secs": started.elapsed().as_secs_f64(), "vm_hwm_kib": vm_hwm_kib(), "detail": detail }));
}
