//! The kernel interface of `drmesh_ioctl.h`, mirrored field by field.
//!
//! Every struct is `#[repr(C)]` with the C field order and types; the unit
//! tests check sizes against the `DRMESH_ASSERT_SIZE` lines of the C header
//! and the ioctl numbers against values the C macros produce, so the two
//! cannot drift apart silently.

/// Interface version every parameter struct carries (`DRMESH_IOCTL_VERSION`).
pub const IOCTL_VERSION: u32 = 2;
/// ioctl type byte (`DRMESH_IOC_MAGIC`).
pub const IOC_MAGIC: u8 = 0xDB;
/// Bytes of a path field, including its NUL (`DRMESH_PATH_BYTES`).
pub const PATH_BYTES: usize = 256;
/// Largest tracking granularity (`DRMESH_GRANULARITY_BYTES_MAX`).
pub const GRANULARITY_BYTES_MAX: u32 = 1 << 20;
/// Smallest tracking granularity: one sector.
pub const GRANULARITY_BYTES_MIN: u32 = 512;
/// Smallest granularity a snapshot accepts (its chunk size, one page).
pub const SNAPSHOT_GRANULARITY_BYTES_MIN: u32 = 4096;
/// Control device path.
pub const CTL_PATH: &str = "/dev/drmesh-ctl";
/// Prefix of snapshot device names (`/dev/drmesh-snapN`).
pub const SNAP_NAME: &str = "drmesh-snap";

/// `DRMESH_STATE_ATTACHED`.
pub const STATE_ATTACHED: u32 = 1 << 0;
/// `DRMESH_STATE_DEVICE_GONE`: the device was removed while attached.
pub const STATE_DEVICE_GONE: u32 = 1 << 1;
/// `DRMESH_STATE_SNAPSHOT`: a snapshot exists.
pub const STATE_SNAPSHOT: u32 = 1 << 2;
/// `DRMESH_STATE_SNAP_INVALID`: the snapshot was invalidated.
pub const STATE_SNAP_INVALID: u32 = 1 << 3;

/// `DRMESH_STATE_PERSISTENT`: the tracking state is kept on a state store.
pub const STATE_PERSISTENT: u32 = 1 << 4;
/// `DRMESH_STATE_PERSIST_FAILED`: the state store failed.
pub const STATE_PERSIST_FAILED: u32 = 1 << 5;

/// `DRMESH_RESTORE_NONE`: no state store.
pub const RESTORE_NONE: u32 = 0;
/// `DRMESH_RESTORE_FRESH`: no usable state; the store was initialised.
pub const RESTORE_FRESH: u32 = 1;
/// `DRMESH_RESTORE_CLEAN`: restored after a clean shutdown.
pub const RESTORE_CLEAN: u32 = 2;
/// `DRMESH_RESTORE_CRASH`: restored after a crash, logged extents added.
pub const RESTORE_CRASH: u32 = 3;
/// `DRMESH_RESTORE_WRITTEN`: the device was written before attach.
pub const RESTORE_WRITTEN: u32 = 4;
/// `DRMESH_RESTORE_GEOMETRY`: the state is of another size or granularity.
pub const RESTORE_GEOMETRY: u32 = 5;
/// `DRMESH_RESTORE_DETACHED`: the state was left by a detach.
pub const RESTORE_DETACHED: u32 = 6;
/// `DRMESH_RESTORE_NO_IOSTAT`: the device keeps no I/O counters.
pub const RESTORE_NO_IOSTAT: u32 = 7;

/// `struct drmesh_attach`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Attach {
    pub version: u32,
    pub flags: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub granularity_bytes: u32,
    pub reserved: u32,
    pub path: [u8; PATH_BYTES],
    pub state_path: [u8; PATH_BYTES],
    pub restore: u32,
    pub al_extents: u32,
    pub handovers: u64,
    pub bits_set: u64,
    pub tracking_id: [u8; 16],
}

/// `struct drmesh_dev`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Dev {
    pub version: u32,
    pub flags: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
}

/// `struct drmesh_bitmap`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Bitmap {
    pub version: u32,
    pub flags: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub buf: u64,
    pub buf_bytes: u64,
    pub bitmap_bytes: u64,
    pub bits_set: u64,
    pub device_bytes: u64,
    pub granularity_bytes: u32,
    pub reserved: u32,
}

/// `struct drmesh_status`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Status {
    pub version: u32,
    pub flags: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub state: u32,
    pub granularity_bytes: u32,
    pub device_bytes: u64,
    pub bitmap_bytes: u64,
    pub bits_set: u64,
    pub writes_seen: u64,
    pub handovers: u64,
    pub attached_count: u32,
    pub reserved: u32,
    pub snap_index: u32,
    pub snap_error: u32,
    pub cow_chunks_used: u64,
    pub cow_chunks_total: u64,
    pub tracking_id: [u8; 16],
    pub al_used: u32,
    pub al_slots: u32,
    pub persist_error: u32,
    pub al_flushes: u32,
}

/// `struct drmesh_snapshot`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Snapshot {
    pub version: u32,
    pub flags: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub buf: u64,
    pub buf_bytes: u64,
    pub bitmap_bytes: u64,
    pub bits_set: u64,
    pub device_bytes: u64,
    pub cow_bytes: u64,
    pub granularity_bytes: u32,
    pub snap_index: u32,
    pub snap_major: u32,
    pub snap_minor: u32,
    pub cow_path: [u8; PATH_BYTES],
}

// Linux's generic _IOC encoding (x86, arm64, riscv): nr in bits 0-7, type in
// 8-15, size in 16-29, direction in 30-31 (1 = write to the kernel, 2 = read).
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u8, size: usize) -> u32 {
    // The size field has 14 bits; every struct here is far below that.
    assert!(size < (1 << 14));
    (dir << 30) | ((size as u32) << 16) | ((IOC_MAGIC as u32) << 8) | nr as u32
}

/// `DRMESH_IOC_ATTACH`.
pub const IOC_ATTACH: u32 = ioc(IOC_READ | IOC_WRITE, 1, size_of::<Attach>());
/// `DRMESH_IOC_DETACH`.
pub const IOC_DETACH: u32 = ioc(IOC_WRITE, 2, size_of::<Dev>());
/// `DRMESH_IOC_GET_BITMAP`.
pub const IOC_GET_BITMAP: u32 = ioc(IOC_READ | IOC_WRITE, 3, size_of::<Bitmap>());
/// `DRMESH_IOC_STATUS`.
pub const IOC_STATUS: u32 = ioc(IOC_READ | IOC_WRITE, 4, size_of::<Status>());
/// `DRMESH_IOC_SNAPSHOT`.
pub const IOC_SNAPSHOT: u32 = ioc(IOC_READ | IOC_WRITE, 5, size_of::<Snapshot>());
/// `DRMESH_IOC_RELEASE`.
pub const IOC_RELEASE: u32 = ioc(IOC_WRITE, 6, size_of::<Dev>());

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// The C header, whose compile-time size checks are the reference.
    const HEADER: &str = include_str!("../drmesh_ioctl.h");

    /// Size the C header asserts for `struct NAME` (PATH_BYTES substituted).
    fn c_size(name: &str) -> usize {
        let key = format!("DRMESH_ASSERT_SIZE(struct {name}, ");
        let line = HEADER
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("no size assertion for {name} in drmesh_ioctl.h"));
        let expr = line[key.len()..].trim_end_matches(");");
        let value = |v: &str| match v.trim() {
            "DRMESH_PATH_BYTES" => PATH_BYTES,
            "DRMESH_COW_HEADER_BYTES" | "DRMESH_TRK_BLOCK_BYTES" => 4096,
            n => n.parse().unwrap_or_else(|_| panic!("term {n:?} of {name}")),
        };
        // Sums of products: "64 + 2 * DRMESH_PATH_BYTES".
        expr.split('+').map(|term| term.split('*').map(value).product::<usize>()).sum()
    }

    #[test]
    fn sizes_match_the_c_header() {
        assert_eq!(size_of::<Attach>(), c_size("drmesh_attach"));
        assert_eq!(size_of::<Dev>(), c_size("drmesh_dev"));
        assert_eq!(size_of::<Bitmap>(), c_size("drmesh_bitmap"));
        assert_eq!(size_of::<Status>(), c_size("drmesh_status"));
        assert_eq!(size_of::<Snapshot>(), c_size("drmesh_snapshot"));
    }

    #[test]
    fn constants_match_the_c_header() {
        assert!(HEADER.contains(&format!("#define DRMESH_IOCTL_VERSION {IOCTL_VERSION}\n")));
        assert!(HEADER.contains("#define DRMESH_IOC_MAGIC 0xDB\n"));
        assert!(HEADER.contains(&format!("#define DRMESH_PATH_BYTES {PATH_BYTES}\n")));
        assert!(HEADER.contains("#define DRMESH_SNAP_NAME \"drmesh-snap\"\n"));
        assert!(HEADER.contains("#define DRMESH_STATE_SNAP_INVALID (1u << 3)"));
        assert!(HEADER.contains("#define DRMESH_STATE_PERSISTENT (1u << 4)"));
        assert!(HEADER.contains("#define DRMESH_STATE_PERSIST_FAILED (1u << 5)"));
        for (name, v) in [
            ("NONE", RESTORE_NONE),
            ("FRESH", RESTORE_FRESH),
            ("CLEAN", RESTORE_CLEAN),
            ("CRASH", RESTORE_CRASH),
            ("WRITTEN", RESTORE_WRITTEN),
            ("GEOMETRY", RESTORE_GEOMETRY),
            ("DETACHED", RESTORE_DETACHED),
            ("NO_IOSTAT", RESTORE_NO_IOSTAT),
        ] {
            assert!(
                HEADER.contains(&format!("#define DRMESH_RESTORE_{name} {v}")),
                "DRMESH_RESTORE_{name} is not {v}"
            );
        }
    }

    #[test]
    fn ioctl_numbers_match_the_c_macros() {
        // Printed by a C program from the _IOW/_IOWR macros of drmesh_ioctl.h.
        assert_eq!(IOC_ATTACH, 0xc240_db01);
        assert_eq!(IOC_DETACH, 0x4010_db02);
        assert_eq!(IOC_GET_BITMAP, 0xc040_db03);
        assert_eq!(IOC_STATUS, 0xc080_db04);
        assert_eq!(IOC_SNAPSHOT, 0xc150_db05);
        assert_eq!(IOC_RELEASE, 0x4010_db06);
    }

    #[test]
    fn field_offsets_match_the_c_layout() {
        // Offsets printed by the same C program (offsetof).
        assert_eq!(offset_of!(Snapshot, snap_index), 68);
        assert_eq!(offset_of!(Snapshot, cow_path), 80);
        assert_eq!(offset_of!(Status, snap_index), 72);
        assert_eq!(offset_of!(Status, cow_chunks_total), 88);
        assert_eq!(offset_of!(Bitmap, granularity_bytes), 56);
        assert_eq!(offset_of!(Attach, path), 24);
        assert_eq!(offset_of!(Attach, state_path), 280);
        assert_eq!(offset_of!(Attach, restore), 536);
        assert_eq!(offset_of!(Attach, handovers), 544);
        assert_eq!(offset_of!(Attach, tracking_id), 560);
        assert_eq!(offset_of!(Status, tracking_id), 96);
        assert_eq!(offset_of!(Status, al_flushes), 124);
    }
}
