//! Blob files: round trip, repair on re-put, tamper and missing detection, input checks.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use drmesh_actors::content::IdScheme;
use drmesh_actors::store::{BlobFlags, EncodedBlob, Store, StoreError, BLOB_HEADER_BYTES};

fn full(data: &[u8]) -> EncodedBlob {
    let id = IdScheme::plain().content_id(data);
    EncodedBlob {
        id,
        content: id,
        flags: BlobFlags(BlobFlags::COMPRESSED),
        plain_len: 1 << 20,
        base: None,
        depth: 0,
        payload: data.to_vec(),
    }
}

fn delta(base: &EncodedBlob, produces: &[u8], payload: &[u8]) -> EncodedBlob {
    EncodedBlob {
        id: IdScheme::plain().hash(payload),
        content: IdScheme::plain().content_id(produces),
        flags: BlobFlags(BlobFlags::DELTA | BlobFlags::COMPRESSED),
        plain_len: 1 << 20,
        base: Some(base.id),
        depth: base.depth + 1,
        payload: payload.to_vec(),
    }
}

#[test]
fn store_put_read_round_trip_and_locate() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"block a");
    let d = delta(&a, b"block a, edited", b"delta bytes");
    let written = store.put_blobs(1, &[a.clone(), d.clone()]).unwrap();
    assert_eq!(
        written,
        (2 * BLOB_HEADER_BYTES + a.payload.len() + d.payload.len()) as u64
    );
    assert_eq!(store.read_blob(&a.id).unwrap(), a);
    assert_eq!(store.read_blob(&d.id).unwrap(), d);
    let loc = store.locate(&d.content).unwrap().unwrap();
    assert_eq!((loc.blob, loc.depth), (d.id, 1));
    assert_eq!(store.locate(&a.content).unwrap().unwrap().blob, a.id);
    // Re-putting intact blobs writes nothing.
    assert_eq!(store.put_blobs(1, std::slice::from_ref(&a)).unwrap(), 0);
    let stats = store.stats().unwrap();
    assert_eq!(stats.blob_count, 2);
    // Survives reopen; no temp files anywhere.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_blob(&d.id).unwrap(), d);
    assert!(store.blob_path(&a.id).starts_with(dir.path().join("blobs")));
    let hex = a.id.to_hex();
    assert!(store
        .blob_path(&a.id)
        .ends_with(format!("{}/{}/{hex}", &hex[..2], &hex[2..4])));
}

#[test]
fn store_tampered_file_fails_naming_the_blob_and_reput_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"some payload worth keeping");
    store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
    let path = store.blob_path(&a.id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[BLOB_HEADER_BYTES + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = store.read_blob(&a.id).unwrap_err();
    assert!(matches!(err, StoreError::BlobCorrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&a.id.to_hex()) && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    // Re-put verifies instead of trusting, and rewrites.
    let written = store.put_blobs(2, std::slice::from_ref(&a)).unwrap();
    assert!(written > 0);
    assert_eq!(store.read_blob(&a.id).unwrap(), a);
    // A short file too.
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert!(store.read_blob(&a.id).unwrap_err().to_string().contains("shorter"));
    store.put_blobs(2, std::slice::from_ref(&a)).unwrap();
    assert_eq!(store.read_blob(&a.id).unwrap(), a);
}

#[test]
fn store_missing_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"to be lost");
    store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
    std::fs::remove_file(store.blob_path(&a.id)).unwrap();
    let err = store.read_blob(&a.id).unwrap_err();
    assert!(matches!(err, StoreError::BlobMissing { .. }));
    assert!(err.to_string().contains(&a.id.to_hex()), "{err}");
    // A lookup does not report it present any more.
    assert_eq!(store.lookup_and_pin(3, &[a.content]).unwrap(), vec![None]);
}

#[test]
fn store_bad_blobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"base");
    let d = delta(&a, b"derived", b"delta");
    // Base neither stored nor in the batch.
    let err = store.put_blobs(1, std::slice::from_ref(&d)).unwrap_err();
    assert!(matches!(err, StoreError::MissingBase { .. }), "{err}");
    assert!(store.locate(&d.content).unwrap().is_none());
    // Wrong depth.
    let mut wrong = d.clone();
    wrong.depth = 3;
    assert!(matches!(
        store.put_blobs(1, &[a.clone(), wrong]).unwrap_err(),
        StoreError::InvalidBlob { .. }
    ));
    // Full block whose id is not its content.
    let mut wrong = a.clone();
    wrong.content = d.content;
    assert!(matches!(
        store.put_blobs(1, &[wrong]).unwrap_err(),
        StoreError::InvalidBlob { .. }
    ));
    // Deltas of deltas chain depth.
    store.put_blobs(1, &[a.clone(), d.clone()]).unwrap();
    let dd = delta(&d, b"derived twice", b"delta 2");
    store.put_blobs(1, std::slice::from_ref(&dd)).unwrap();
    assert_eq!(store.locate(&dd.content).unwrap().unwrap().depth, 2);
}

#[test]
fn store_open_removes_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = full(b"x");
    store.put_blobs(1, std::slice::from_ref(&a)).unwrap();
    let temp = store
        .blob_path(&a.id)
        .with_file_name(format!(".tmp-{}-1-1", a.id.to_hex()));
    std::fs::write(&temp, b"half").unwrap();
    drop(store);
    let _store = Store::open(dir.path()).unwrap();
    assert!(!temp.exists());
}
