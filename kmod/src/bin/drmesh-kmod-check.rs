//! Drives the safe wrapper ([`drmesh_kmod::Control`]) against the loaded module:
//! `drmesh-kmod-check DEVICE COW_STORE`. The guest test `kmod/tests/guest-wrapper.sh`
//! runs it in qemu; it overwrites blocks of DEVICE and all of COW_STORE. Exits
//! non-zero (a panic) at the first check that fails.

use drmesh_kmod::{Control, KmodError};
use std::fs::{File, OpenOptions};
use std::io::Result as IoResult;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: usize = 4096;
const OFFSET: u64 = 1 << 20;

fn write_block(dev: &Path, offset: u64, byte: u8) -> IoResult<()> {
    let f = OpenOptions::new().write(true).open(dev)?;
    f.write_all_at(&[byte; BLOCK], offset)?;
    // Buffered: fsync sends the page to the device (one tracked 4 KiB write).
    f.sync_all()
}

fn read_block(dev: &Path, offset: u64) -> IoResult<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK];
    File::open(dev)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dev_path, cow_path] = args.as_slice() else {
        return Err("usage: drmesh-kmod-check DEVICE COW_STORE".into());
    };
    let (dev_path, cow_path) = (Path::new(dev_path), Path::new(cow_path));
    let ctl = Control::open()?;

    assert!(matches!(
        ctl.attach(dev_path, Some(3000), None),
        Err(KmodError::InvalidArgument { .. })
    ));
    let att = ctl.attach(dev_path, None, None)?;
    assert_eq!(att.granularity_bytes, 4096);
    assert_eq!(att.restore, drmesh_kmod::Restore::None);
    assert_eq!(att.handovers, 0);
    assert!(matches!(
        ctl.attach(dev_path, None, None),
        Err(KmodError::Busy { .. })
    ));
    let st = ctl.status(att.dev)?;
    assert!(st.attached && !st.snapshot, "{st:?}");

    ctl.take_bitmap(att.dev)?;
    write_block(dev_path, OFFSET, 0xab)?;
    let bm = ctl.take_bitmap(att.dev)?;
    assert_eq!(
        bm.ranges(),
        vec![(OFFSET, BLOCK as u64)],
        "one block written"
    );
    println!("wrapper: bitmap after one write: {:?}", bm.ranges());

    let snap = ctl.snapshot(att.dev, cow_path)?;
    assert_eq!(
        snap.bitmap.count_set(),
        0,
        "nothing written since the hand-over"
    );
    assert!(matches!(
        ctl.snapshot(att.dev, cow_path),
        Err(KmodError::Busy { .. })
    ));
    assert!(matches!(ctl.detach(att.dev), Err(KmodError::Busy { .. })));
    let st = ctl.status(att.dev)?;
    assert!(st.snapshot && st.snapshot_error.is_none(), "{st:?}");
    println!(
        "wrapper: snapshot {} ({} bytes of COW store)",
        snap.device_path.display(),
        snap.cow_bytes
    );

    write_block(dev_path, OFFSET, 0xcd)?;
    assert_eq!(
        read_block(dev_path, OFFSET)?,
        vec![0xcd; BLOCK],
        "origin has the new data"
    );
    assert_eq!(
        read_block(&snap.device_path, OFFSET)?,
        vec![0xab; BLOCK],
        "snapshot kept the old data"
    );
    let st = ctl.status(att.dev)?;
    assert_eq!(st.cow_chunks_used, 1, "{st:?}");

    ctl.release(att.dev)?;
    assert!(matches!(
        ctl.release(att.dev),
        Err(KmodError::NotAttached { .. })
    ));
    let bm = ctl.take_bitmap(att.dev)?;
    assert_eq!(
        bm.ranges(),
        vec![(OFFSET, BLOCK as u64)],
        "the write under the snapshot"
    );
    ctl.detach(att.dev)?;
    assert!(matches!(
        ctl.detach(att.dev),
        Err(KmodError::NotAttached { .. })
    ));
    assert!(!ctl.status(att.dev)?.attached);
    println!("wrapper: all checks passed");
    Ok(())
}
