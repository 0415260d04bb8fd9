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

#define TRK_MAX_DEVICES 16
/* Each of the two bitmaps of a device is at most this big (4 TiB at 4 KiB). */
#define TRK_BITMAP_BYTES_MAX (128ul << 20)

/**
 * struct trk_dev - one tracked device.
 * @node: entry in trk_devices (RCU).
 * @bdev: the tracked device, held open (read-only, shared) while attached.
 * @disk: @bdev's disk; bios are matched against it.
 * @start_sect: first sector of @bdev on @disk (non-zero for a partition).
 * @nr_sects: sectors of @bdev at attach.
 * @gran_shift: log2 of bytes per bit.
 * @nbits: bits per bitmap.
 * @live: the bitmap the probe sets bits in (RCU).
 * @spare: the other bitmap, all zero, owned by the hand-over path.
 * @writes_seen: write-class bios recorded.
 * @handovers: successful hand-overs.
 * @unwrapped: set when a write's completion could not be wrapped (no memory);
 *	the next hand-over then also keeps its bits in the new bitmap.
 */
struct trk_dev {
	struct list_head node;
	struct block_device *bdev;
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
};

/* Serialises attach, detach and hand-over; the tracer only reads, under RCU. */
extern struct mutex trk_lock;
/* Attached devices (struct trk_dev.node), RCU list. */
extern struct list_head trk_devices;
/* Entries of trk_devices; under trk_lock. */
extern unsigned int trk_count;

void trk_merge_bits(unsigned long *live, const unsigned long *src,
		    unsigned long nbits);
int trk_tracer_init(void);
void trk_tracer_exit(void);
int trk_ctl_init(void);
void trk_ctl_exit(void);

#endif /* DRMESH_TRK_H */
