/* SPDX-License-Identifier: GPL-2.0 */
/*
 * drmesh_trk: what the tracer (trk_tracer.c) and the control device
 * (trk_ctl.c) share: the tracked devices and the lock around them.
 */
#ifndef DRMESH_TRK_H
#define DRMESH_TRK_H

#include <linux/types.h>
#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/blkdev.h>
#include <linux/wait.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>

#include "trk_compat.h"

#define TRK_MAX_DEVICES 16
/* Each of the two bitmaps of a device is at most this big (4 TiB at 4 KiB). */
#define TRK_BITMAP_BYTES_MAX (128ul << 20)

struct trk_snap;
struct trk_pst;

/**
 * struct trk_dev - one tracked device.
 * @node: entry in trk_devices (RCU).
 * @bdev: the tracked device, held open (read-only, shared) while attached.
 * @bdev_handle: what closing @bdev needs.
 * @disk: @bdev's disk; bios are matched against it.
 * @start_sect: first sector of @bdev on @disk (non-zero for a partition).
 * @nr_sects: sectors of @bdev at attach.
 * @gran_shift: log2 of bytes per bit.
 * @nbits: bits per bitmap.
 * @live: the bitmap the write hook sets bits in (RCU).
 * @spare: the other bitmap, all zero, owned by the hand-over path.
 * @writes_seen: write-class bios recorded.
 * @handovers: successful hand-overs.
 * @unwrapped: set when a write's completion could not be wrapped (no memory);
 *	the next hand-over then also keeps its bits in the new bitmap.
 * @slot: index of this device's counter in trk_slot_inflight.
 * @snap: the device's snapshot, or NULL (RCU; changed under trk_lock).
 * @pst: the device's state store, or NULL (set before the device is listed,
 *	cleared after it is unlisted).
 * @tracking_id: names this line of tracking (see struct drmesh_attach).
 */
struct trk_dev {
	struct list_head node;
	struct block_device *bdev;
	struct trk_bdev_handle bdev_handle;
	struct gendisk *disk;
	sector_t start_sect;
	sector_t nr_sects;
	unsigned int gran_shift;
	unsigned long nbits;
	unsigned long __rcu *live;
	unsigned long *spare;
	atomic64_t writes_seen;
	u64 handovers;
	atomic_t unwrapped;
	unsigned int slot;
	struct trk_snap __rcu *snap;
	struct trk_pst *pst;
	u8 tracking_id[16];
};

/*
 * Writes sent on to the driver and not yet completed, per attach slot. A
 * write counts in the slot of every device it overlaps; the counters outlive
 * the devices (module lifetime), so a completion after detach is harmless.
 * Taking a snapshot waits for its slot to reach zero (trk_drain_wait).
 */
extern atomic_t trk_slot_inflight[TRK_MAX_DEVICES];
extern wait_queue_head_t trk_drain_wait;

/* Snapshot states (struct trk_snap.state). */
enum trk_snap_state {
	TRK_SNAP_PENDING = 1,	/* writes held until the snapshot instant */
	TRK_SNAP_ACTIVE,	/* first write to a chunk copies it first */
	TRK_SNAP_INVALID,	/* store full or I/O error: reads fail */
	TRK_SNAP_ABORTED,	/* creation failed: held writes pass */
};

/* Serialises attach, detach and hand-over; the tracer only reads, under RCU. */
extern struct mutex trk_lock;
/* Attached devices (struct trk_dev.node), RCU list. */
extern struct list_head trk_devices;
/* Entries of trk_devices; under trk_lock. */
extern unsigned int trk_count;

void trk_merge_bits(unsigned long *live, const unsigned long *src,
		    unsigned long nbits);
void trk_set_bits(unsigned long *map, unsigned long first, unsigned long last);
void trk_pass_bio(struct bio *bio);
void trk_submit_logged(struct bio *bio);
bool trk_disk_attached(struct gendisk *disk);
int trk_tracer_init(void);
void trk_tracer_exit(void);
int trk_ctl_init(void);
void trk_ctl_exit(void);

/* trk_snap.c: snapshots, their COW store and their block device. */
struct trk_snap *trk_snap_create(struct trk_dev *t, const char *cow_path);
void trk_snap_activate(struct trk_snap *s);
void trk_snap_destroy(struct trk_snap *s, bool aborted);
bool trk_snap_needs_hold(struct trk_snap *s, sector_t first, sector_t end);
void trk_snap_queue(struct trk_snap *s, struct bio *bio);
bool trk_snap_uses_disk(struct trk_snap *s, struct gendisk *disk);
void trk_snap_status(struct trk_snap *s, u32 *index, u32 *error, u64 *used,
		     u64 *total, u64 *cow_bytes, u32 *major, u32 *minor);
int trk_snap_init(void);
void trk_snap_exit(void);

/* The page behind @p, from kmalloc, the page allocator or vmalloc. */
static inline struct page *trk_page(void *p)
{
	return is_vmalloc_addr(p) ? vmalloc_to_page(p) : virt_to_page(p);
}

/* trk_persist.c: tracking state kept on a store across reboots. */
/**
 * struct trk_restore - what attaching with a state store found.
 * @restore: DRMESH_RESTORE_*.
 * @al_extents: activity-log extents a crash left (marked changed).
 * @bits_set: bits set in the restored bitmap.
 */
struct trk_restore {
	u32 restore;
	u32 al_extents;
	u64 bits_set;
};
int trk_sync_io(struct block_device *bdev, blk_opf_t opf, sector_t sector,
		void *buf, size_t bytes);
size_t trk_pst_bitmap_bytes(unsigned long nbits);
struct trk_pst *trk_pst_open(struct trk_dev *t, const char *path,
			     struct trk_restore *r);
void trk_pst_close(struct trk_pst *p);
bool trk_pst_hold(struct trk_pst *p, sector_t lo, sector_t hi, struct bio *bio);
void trk_pst_before_handover(struct trk_pst *p);
unsigned long *trk_pst_swap(struct trk_pst *p);
void trk_pst_status(struct trk_pst *p, u32 *used, u32 *slots, u32 *error,
		    u32 *flushes);
struct gendisk *trk_pst_disk(struct trk_pst *p);
int trk_pst_init(void);
void trk_pst_exit(void);

#endif /* DRMESH_TRK_H */
