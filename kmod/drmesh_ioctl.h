/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * drmesh kernel module: the control interface shared with userspace.
 *
 * One character device, /dev/drmesh-ctl (mode 0600, every ioctl needs
 * CAP_SYS_ADMIN). Every parameter struct starts with `version` (must be
 * DRMESH_IOCTL_VERSION, else -EPROTO) and `flags` (must be 0 until a flag is
 * defined, else -EINVAL); reserved fields must be 0. Devices are named by
 * major:minor in every call after attach. Sizes are fixed and checked at
 * compile time below, so the ioctl numbers (which encode the size) change
 * whenever a layout does.
 */
#ifndef DRMESH_IOCTL_H
#define DRMESH_IOCTL_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
#else
#include <linux/types.h>
#include <sys/ioctl.h>
#endif

#define DRMESH_CTL_NAME "drmesh-ctl"
#define DRMESH_IOCTL_VERSION 2
#define DRMESH_IOC_MAGIC 0xDB

/* Largest tracking granularity, and the path length including its NUL. */
#define DRMESH_GRANULARITY_BYTES_MAX (1u << 20)
#define DRMESH_PATH_BYTES 256

/* Snapshot block devices are /dev/drmesh-snapN. */
#define DRMESH_SNAP_NAME "drmesh-snap"

/**
 * struct drmesh_attach - start change tracking on a block device.
 * @version: DRMESH_IOCTL_VERSION.
 * @flags: 0.
 * @dev_major: device major; used when @path is empty.
 * @dev_minor: device minor; used when @path is empty.
 * @granularity_bytes: bytes per bitmap bit; 0 picks the default (4096, or the
 *	device's logical block size when larger). Else a power of two, at least
 *	512 and the logical block size, at most DRMESH_GRANULARITY_BYTES_MAX.
 * @reserved: 0.
 * @path: NUL-terminated path of a block device node, or "" to use major:minor.
 * @state_path: NUL-terminated path of a block device that keeps the tracking
 *	state across reboots and crashes (opened exclusively; see README.md,
 *	"Tracking that survives reboot", for its layout), or "" to keep it in
 *	memory only. Not on the same disk as any attached device.
 * @restore: out: DRMESH_RESTORE_*: what became of the state found there.
 * @al_extents: out: activity-log extents a crash left, marked changed whole.
 * @handovers: out: the hand-over count the bitmap continues from: 0 for a
 *	fresh start, else the count when the restored bitmap was last written.
 * @bits_set: out: bits set in the restored bitmap (0 for a fresh start).
 * @tracking_id: out: names this line of tracking: kept by a restore, new
 *	(random) on a fresh start. Bitmaps with the same id and consecutive
 *	hand-over counts miss no write between them.
 *
 * On success the kernel fills in @dev_major, @dev_minor, @granularity_bytes
 * and the fields marked out.
 */
struct drmesh_attach {
	__u32 version;
	__u32 flags;
	__u32 dev_major;
	__u32 dev_minor;
	__u32 granularity_bytes;
	__u32 reserved;
	char path[DRMESH_PATH_BYTES];
	char state_path[DRMESH_PATH_BYTES];
	__u32 restore;
	__u32 al_extents;
	__u64 handovers;
	__u64 bits_set;
	__u8 tracking_id[16];
};

/* What attach did with the state store (struct drmesh_attach.restore). */
#define DRMESH_RESTORE_NONE 0		/* no state store: memory only */
#define DRMESH_RESTORE_FRESH 1		/* no usable state: store initialised */
#define DRMESH_RESTORE_CLEAN 2		/* restored after a clean shutdown */
#define DRMESH_RESTORE_CRASH 3		/* restored; activity-log extents added */
#define DRMESH_RESTORE_WRITTEN 4	/* state found, but the device was
					 * written since boot before attach:
					 * fresh start */
#define DRMESH_RESTORE_GEOMETRY 5	/* state of another size or
					 * granularity: fresh start */
#define DRMESH_RESTORE_DETACHED 6	/* state left by a detach (writes after
					 * it were not seen): fresh start */
#define DRMESH_RESTORE_NO_IOSTAT 7	/* the device keeps no I/O counters, so
					 * writes before attach cannot be ruled
					 * out: fresh start */

/**
 * struct drmesh_dev - names an attached device (detach).
 * @version: DRMESH_IOCTL_VERSION.
 * @flags: 0.
 * @dev_major: device major.
 * @dev_minor: device minor.
 */
struct drmesh_dev {
	__u32 version;
	__u32 flags;
	__u32 dev_major;
	__u32 dev_minor;
};

/**
 * struct drmesh_bitmap - hand over the change bitmap (GET_BITMAP).
 * @version: DRMESH_IOCTL_VERSION.
 * @flags: 0.
 * @dev_major: device major.
 * @dev_minor: device minor.
 * @buf: user address the bitmap is copied to. Bit i (bit i%8 of byte i/8)
 *	covers bytes [i * granularity_bytes, (i + 1) * granularity_bytes).
 * @buf_bytes: size of @buf; must be at least @bitmap_bytes, else -ENOSPC with
 *	@bitmap_bytes filled in and nothing handed over.
 * @bitmap_bytes: out: bytes of bitmap written.
 * @bits_set: out: bits set in the handed-over bitmap.
 * @device_bytes: out: size of the tracked device.
 * @granularity_bytes: out: bytes per bit.
 * @reserved: 0.
 *
 * The bitmap handed over holds every write submitted since the previous
 * hand-over (or since attach); a fresh bitmap starts at the same instant, so
 * each write lands in exactly one of two consecutive bitmaps. If the copy to
 * @buf faults, the bits are merged back into the live bitmap (-EFAULT): no
 * change is lost.
 */
struct drmesh_bitmap {
	__u32 version;
	__u32 flags;
	__u32 dev_major;
	__u32 dev_minor;
	__u64 buf;
	__u64 buf_bytes;
	__u64 bitmap_bytes;
	__u64 bits_set;
	__u64 device_bytes;
	__u32 granularity_bytes;
	__u32 reserved;
};

/**
 * struct drmesh_snapshot - take a point-in-time snapshot (SNAPSHOT).
 * @version: DRMESH_IOCTL_VERSION.
 * @flags: 0.
 * @dev_major: in: attached device major.
 * @dev_minor: in: attached device minor.
 * @buf: in: user address the change bitmap is copied to (as GET_BITMAP).
 * @buf_bytes: in: size of @buf; must be at least @bitmap_bytes, else -ENOSPC
 *	with @bitmap_bytes filled in and nothing changed.
 * @bitmap_bytes: out: bytes of bitmap written.
 * @bits_set: out: bits set in the handed-over bitmap.
 * @device_bytes: out: size of the device (and of the snapshot device).
 * @cow_bytes: out: room for copied data in the COW store.
 * @granularity_bytes: out: bytes per bit, also the COW chunk size.
 * @snap_index: out: N of /dev/drmesh-snapN.
 * @snap_major: out: major of the snapshot device.
 * @snap_minor: out: minor of the snapshot device.
 * @cow_path: in: NUL-terminated path of the block device that becomes the
 *	COW store (opened exclusively, overwritten from byte 0; see README.md for
 *	its layout). Not on the same disk as any attached device.
 *
 * Freezes the filesystem on the device (if any), holds new writes, waits for
 * writes in flight, then at one instant hands over the change bitmap (every
 * write submitted since the previous hand-over) and starts the snapshot; held
 * writes go on after their old data is copied. One snapshot per disk.
 */
struct drmesh_snapshot {
	__u32 version;
	__u32 flags;
	__u32 dev_major;
	__u32 dev_minor;
	__u64 buf;
	__u64 buf_bytes;
	__u64 bitmap_bytes;
	__u64 bits_set;
	__u64 device_bytes;
	__u64 cow_bytes;
	__u32 granularity_bytes;
	__u32 snap_index;
	__u32 snap_major;
	__u32 snap_minor;
	char cow_path[DRMESH_PATH_BYTES];
};

/* Status flags (struct drmesh_status.state). */
#define DRMESH_STATE_ATTACHED (1u << 0)
#define DRMESH_STATE_DEVICE_GONE (1u << 1) /* device removed while attached */
#define DRMESH_STATE_SNAPSHOT (1u << 2) /* a snapshot exists (RELEASE drops it) */
#define DRMESH_STATE_SNAP_INVALID (1u << 3) /* COW store full or I/O error:
					     * snapshot reads fail with EIO */
#define DRMESH_STATE_PERSISTENT (1u << 4) /* tracking state kept on a store */
#define DRMESH_STATE_PERSIST_FAILED (1u << 5) /* the state store failed: every
					       * write is held dirty; the next
					       * attach starts fresh */

/**
 * struct drmesh_status - state of one device (STATUS).
 * @version: DRMESH_IOCTL_VERSION.
 * @flags: 0.
 * @dev_major: in: device major.
 * @dev_minor: in: device minor.
 * @state: out: DRMESH_STATE_* bits; 0 when the device is not attached.
 * @granularity_bytes: out: bytes per bit.
 * @device_bytes: out: size of the tracked device.
 * @bitmap_bytes: out: size a GET_BITMAP buffer needs.
 * @bits_set: out: bits set in the live bitmap (a racy snapshot).
 * @writes_seen: out: write-class bios recorded since attach.
 * @handovers: out: GET_BITMAP calls that succeeded since attach.
 * @attached_count: out: devices attached in total.
 * @reserved: 0.
 * @snap_index: out: N of /dev/drmesh-snapN when a snapshot exists.
 * @snap_error: out: positive errno that invalidated the snapshot, else 0.
 * @cow_chunks_used: out: chunks copied into the COW store.
 * @cow_chunks_total: out: chunks the COW store holds.
 * @tracking_id: out: see struct drmesh_attach.
 * @al_used: out: extents in the activity log now.
 * @al_slots: out: extents the activity log holds (0 without a state store).
 * @persist_error: out: positive errno of the state store's first failure.
 * @al_flushes: out: times a full activity log made the bitmap be written.
 */
struct drmesh_status {
	__u32 version;
	__u32 flags;
	__u32 dev_major;
	__u32 dev_minor;
	__u32 state;
	__u32 granularity_bytes;
	__u64 device_bytes;
	__u64 bitmap_bytes;
	__u64 bits_set;
	__u64 writes_seen;
	__u64 handovers;
	__u32 attached_count;
	__u32 reserved;
	__u32 snap_index;
	__u32 snap_error;
	__u64 cow_chunks_used;
	__u64 cow_chunks_total;
	__u8 tracking_id[16];
	__u32 al_used;
	__u32 al_slots;
	__u32 persist_error;
	__u32 al_flushes;
};

/* COW store layout (all integers little-endian); README.md describes it. */
#define DRMESH_COW_MAGIC "DRMCOW01"
#define DRMESH_COW_FORMAT 1
#define DRMESH_COW_HEADER_BYTES 4096
#define DRMESH_COW_LIVE 1	/* snapshot in use */
#define DRMESH_COW_INVALID 2	/* store full or I/O error: content unusable */
#define DRMESH_COW_RELEASED 3	/* snapshot dropped */

/**
 * struct drmesh_cow_header - first DRMESH_COW_HEADER_BYTES of a COW store.
 * @magic: DRMESH_COW_MAGIC (8 bytes, no NUL).
 * @format: DRMESH_COW_FORMAT.
 * @state: DRMESH_COW_LIVE, _INVALID or _RELEASED.
 * @chunk_bytes: bytes per chunk (the tracking granularity).
 * @origin_major: origin device major.
 * @origin_minor: origin device minor.
 * @index_offset_bytes: where the index starts (DRMESH_COW_HEADER_BYTES).
 * @index_entries: entries in the index, one per origin chunk: a __le32 that is
 *	0 when the chunk was not copied, else 1 + its data chunk number.
 * @data_offset_bytes: where the data area starts (chunk-aligned).
 * @data_chunks: chunks the data area holds.
 * @chunks_used: chunks copied (as of the last header write).
 * @origin_bytes: origin size.
 * @created_ns: CLOCK_REALTIME of the snapshot instant, in nanoseconds.
 * @pad: zero.
 *
 * The index on disk trails the kernel's copy in memory (written after each
 * batch of copies); the snapshot device always uses the memory copy. A
 * snapshot does not survive reboot or module unload.
 */
struct drmesh_cow_header {
	char magic[8];
	__le32 format;
	__le32 state;
	__le32 chunk_bytes;
	__le32 origin_major;
	__le32 origin_minor;
	__le32 pad0;
	__le64 index_offset_bytes;
	__le64 index_entries;
	__le64 data_offset_bytes;
	__le64 data_chunks;
	__le64 chunks_used;
	__le64 origin_bytes;
	__le64 created_ns;
	__u8 pad[DRMESH_COW_HEADER_BYTES - 88];
};

/*
 * Tracking state store layout (all integers little-endian); README.md,
 * "Tracking that survives reboot", explains how it is kept.
 * Blocks 0 and 1: two copies of the header, written in turn (the valid one
 * with the higher seq counts). Blocks 2 and 3: two copies of the activity log,
 * likewise. Then two bitmap slots of bitmap_bytes rounded up to a block; the
 * header names the current one, the other is written before a switch.
 */
#define DRMESH_TRK_MAGIC "DRMTRK01"
#define DRMESH_TRK_AL_MAGIC "DRMAL001"
#define DRMESH_TRK_FORMAT 1
#define DRMESH_TRK_BLOCK_BYTES 4096
#define DRMESH_TRK_BITMAP_OFFSET (4 * DRMESH_TRK_BLOCK_BYTES)
#define DRMESH_TRK_EXTENT_BYTES (4u << 20)
#define DRMESH_TRK_AL_SLOTS 500
#define DRMESH_TRK_LIVE 1	/* attached: the bitmap and the log's extents
				 * hold every write since handovers */
#define DRMESH_TRK_DETACHED 2	/* detached: writes after it unseen */

/**
 * struct drmesh_trk_header - one header copy of a tracking state store.
 * @magic: DRMESH_TRK_MAGIC (no NUL).
 * @format: DRMESH_TRK_FORMAT.
 * @state: DRMESH_TRK_LIVE or DRMESH_TRK_DETACHED.
 * @seq: incremented by each header write; the higher valid copy counts.
 * @handovers: hand-overs of the tracked device when the current bitmap slot
 *	was written: that slot holds every write since that hand-over that the
 *	activity log does not cover.
 * @device_bytes: tracked device size.
 * @nbits: bits of the bitmap.
 * @granularity_bytes: bytes per bit.
 * @bitmap_slot: 0 or 1: the current bitmap slot.
 * @bitmap_bytes: bytes of one slot's bitmap (before rounding up).
 * @extent_bytes: bytes one activity-log entry covers.
 * @al_slots: entries an activity log copy holds.
 * @tracking_id: see struct drmesh_attach.
 * @crc: crc32 (little-endian, seed ~0) of the whole block with @crc zero.
 */
struct drmesh_trk_header {
	char magic[8];
	__le32 format;
	__le32 state;
	__le64 seq;
	__le64 handovers;
	__le64 device_bytes;
	__le64 nbits;
	__le32 granularity_bytes;
	__le32 bitmap_slot;
	__le64 bitmap_bytes;
	__le32 extent_bytes;
	__le32 al_slots;
	__u8 tracking_id[16];
	__le32 crc;
	__u8 pad[DRMESH_TRK_BLOCK_BYTES - 92];
};

/**
 * struct drmesh_trk_al - one activity-log copy: extents that may hold writes
 *	the current bitmap slot lacks.
 * @magic: DRMESH_TRK_AL_MAGIC (no NUL).
 * @seq: incremented by each log write; the higher valid copy counts.
 * @count: entries used in @extent.
 * @crc: as in struct drmesh_trk_header.
 * @extent: extent numbers (byte offset / extent_bytes).
 */
struct drmesh_trk_al {
	char magic[8];
	__le64 seq;
	__le32 count;
	__le32 crc;
	__le64 extent[DRMESH_TRK_AL_SLOTS];
	__u8 pad[DRMESH_TRK_BLOCK_BYTES - 24 - 8 * DRMESH_TRK_AL_SLOTS];
};

#define DRMESH_IOC_ATTACH _IOWR(DRMESH_IOC_MAGIC, 1, struct drmesh_attach)
#define DRMESH_IOC_DETACH _IOW(DRMESH_IOC_MAGIC, 2, struct drmesh_dev)
#define DRMESH_IOC_GET_BITMAP _IOWR(DRMESH_IOC_MAGIC, 3, struct drmesh_bitmap)
#define DRMESH_IOC_STATUS _IOWR(DRMESH_IOC_MAGIC, 4, struct drmesh_status)
#define DRMESH_IOC_SNAPSHOT _IOWR(DRMESH_IOC_MAGIC, 5, struct drmesh_snapshot)
/* Drops the device's snapshot (struct drmesh_dev names the attached device). */
#define DRMESH_IOC_RELEASE _IOW(DRMESH_IOC_MAGIC, 6, struct drmesh_dev)

#ifdef __KERNEL__
#include <linux/build_bug.h>
#define DRMESH_ASSERT_SIZE(t, n) static_assert(sizeof(t) == (n))
#else
#include <assert.h>
#define DRMESH_ASSERT_SIZE(t, n) _Static_assert(sizeof(t) == (n), #t)
#endif
DRMESH_ASSERT_SIZE(struct drmesh_attach, 64 + 2 * DRMESH_PATH_BYTES);
DRMESH_ASSERT_SIZE(struct drmesh_dev, 16);
DRMESH_ASSERT_SIZE(struct drmesh_bitmap, 64);
DRMESH_ASSERT_SIZE(struct drmesh_status, 128);
DRMESH_ASSERT_SIZE(struct drmesh_snapshot, 80 + DRMESH_PATH_BYTES);
DRMESH_ASSERT_SIZE(struct drmesh_cow_header, DRMESH_COW_HEADER_BYTES);
DRMESH_ASSERT_SIZE(struct drmesh_trk_header, DRMESH_TRK_BLOCK_BYTES);
DRMESH_ASSERT_SIZE(struct drmesh_trk_al, DRMESH_TRK_BLOCK_BYTES);

#endif /* DRMESH_IOCTL_H */
