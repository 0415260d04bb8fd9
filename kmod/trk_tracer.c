// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk tracer: sees every write of an attached device.
 *
 * Writes are seen by a kprobe on submit_bio_noacct(), the one entry every bio
 * passes before it reaches a driver (see README.md for why this hook and its
 * limits). The probe never delays or completes a bio: it records the range in
 * the live bitmap and wraps the bio's completion (bi_end_io/bi_private), so the
 * range is recorded again in the bitmap that is live when the write completes.
 * A write in flight across a hand-over is therefore in both bitmaps, and a
 * reader that reads the device after a hand-over misses nothing: whatever had
 * not landed yet is in the next bitmap.
 *
 * Locking: trk_lock (a mutex) serialises attach, detach and hand-over. The
 * probe walks the tracker list and reads each tracker's live bitmap under RCU
 * (kprobe handlers run with preemption disabled); writers of the list and of the
 * live-bitmap pointer wait for those readers with synchronize_rcu().
 */
#include <linux/kernel.h>
#include <linux/bio.h>
#include <linux/kprobes.h>
#include <linux/slab.h>
#include <linux/rculist.h>
#include <linux/bitmap.h>
#include <linux/wait.h>

#include "trk.h"

/**
 * struct trk_io - completion wrapper of one write bio.
 * @end_io: the bio's own bi_end_io, restored before it is called.
 * @private: the bio's own bi_private.
 * @disk: the disk written (compared only, never dereferenced).
 * @first: first disk sector written.
 * @end: sector after the last one written.
 *
 * Holds no tracker: at completion the tracker list is walked again, so detach
 * never waits for writes in flight; only module unload does (trk_inflight).
 */
struct trk_io {
	bio_end_io_t *end_io;
	void *private;
	struct gendisk *disk;
	sector_t first;
	sector_t end;
};

DEFINE_MUTEX(trk_lock);
LIST_HEAD(trk_devices);
unsigned int trk_count;

static struct kmem_cache *trk_io_cache;
/* Wrapped bios not yet completed; unload waits for zero. */
static atomic_t trk_inflight = ATOMIC_INIT(0);
static DECLARE_WAIT_QUEUE_HEAD(trk_inflight_wait);

/* Sets bits [first, last] without losing concurrent setters' bits. */
static void trk_set_bits(unsigned long *map, unsigned long first,
			 unsigned long last)
{
	unsigned long i = first;

	for (; i <= last && (i % BITS_PER_LONG); i++)
		set_bit(i, map);
	/*
	 * Whole words: a plain store of all-ones cannot lose a concurrent
	 * atomic set of any of its bits, and nothing clears a live bitmap.
	 */
	for (; i + BITS_PER_LONG - 1 <= last; i += BITS_PER_LONG)
		WRITE_ONCE(map[i / BITS_PER_LONG], ~0ul);
	for (; i <= last; i++)
		set_bit(i, map);
}

static bool trk_is_write_class(const struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_WRITE:
	case REQ_OP_WRITE_ZEROES:
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
		return true;
	default:
		/* REQ_OP_FLUSH and reads carry no written range. */
		return false;
	}
}

enum trk_mark {
	TRK_SUBMITTED,	/* set the bits, count the write */
	TRK_COMPLETED,	/* set the bits */
	TRK_UNWRAPPED,	/* flag: a write's completion will not be seen */
};

/*
 * Marks disk sectors [first, end) of @disk in every tracker that covers them.
 * Caller holds rcu_read_lock(). Returns how many trackers matched.
 */
static unsigned int trk_mark_range(struct gendisk *disk, sector_t first,
				   sector_t end, enum trk_mark how)
{
	struct trk_dev *t;
	unsigned int matched = 0;

	list_for_each_entry_rcu(t, &trk_devices, node) {
		unsigned long *map;
		sector_t lo, hi;
		unsigned int shift;

		if (t->disk != disk)
			continue;
		lo = max(first, t->start_sect);
		hi = min(end, t->start_sect + t->nr_sects);
		if (lo >= hi)
			continue;
		matched++;
		if (how == TRK_UNWRAPPED) {
			atomic_set(&t->unwrapped, 1);
			continue;
		}
		shift = t->gran_shift - SECTOR_SHIFT;
		map = rcu_dereference(t->live);
		trk_set_bits(map, (lo - t->start_sect) >> shift,
			     (hi - 1 - t->start_sect) >> shift);
		if (how == TRK_SUBMITTED)
			atomic64_inc(&t->writes_seen);
	}
	return matched;
}

/**
 * trk_end_io() - completion of a wrapped write.
 * @bio: the bio, its own bi_end_io/bi_private replaced by ours.
 *
 * Records the range in the bitmaps live now, restores the bio's own completion
 * and calls it. Runs in any context, often an interrupt; must not sleep.
 */
static void trk_end_io(struct bio *bio)
{
	struct trk_io *io = bio->bi_private;

	rcu_read_lock();
	trk_mark_range(io->disk, io->first, io->end, TRK_COMPLETED);
	rcu_read_unlock();
	bio->bi_end_io = io->end_io;
	bio->bi_private = io->private;
	kmem_cache_free(trk_io_cache, io);
	if (bio->bi_end_io)
		bio->bi_end_io(bio);
	/*
	 * Last: unload waits for zero and then for an RCU grace period, which
	 * also covers the return from here when this runs with preemption
	 * off (interrupt and softirq completions, the usual case).
	 */
	if (atomic_dec_and_test(&trk_inflight))
		wake_up(&trk_inflight_wait);
}

/**
 * trk_record_bio() - record a bio's range in every tracker of its disk.
 * @bio: a bio entering submit_bio_noacct().
 *
 * Runs in the submitter's context with preemption disabled; must not sleep.
 * A write with REQ_PREFLUSH or REQ_FUA is a REQ_OP_WRITE and is recorded like
 * any other; an empty flush has no sectors and records nothing. A bio that is
 * already wrapped (the remainder of a split, resubmitted) is not wrapped again:
 * its wrapper covers the whole original range.
 */
static void trk_record_bio(struct bio *bio)
{
	struct block_device *bdev = bio->bi_bdev;
	struct trk_io *io;
	sector_t first, end;
	unsigned int sectors;

	if (!bdev || !trk_is_write_class(bio))
		return;
	sectors = bio_sectors(bio);
	if (!sectors)
		return;
	/*
	 * Before partition remapping bi_sector is relative to the partition;
	 * bd_start_sect is 0 for a whole disk, so this is the disk sector.
	 */
	first = bio->bi_iter.bi_sector + bdev->bd_start_sect;
	end = first + sectors;

	rcu_read_lock();
	if (!trk_mark_range(bdev->bd_disk, first, end, TRK_SUBMITTED))
		goto out;
	if (bio->bi_end_io == trk_end_io)
		goto out;
	io = kmem_cache_alloc(trk_io_cache, GFP_NOWAIT | __GFP_NOWARN);
	if (!io) {
		/* Seen by the next hand-over: same RCU read section. */
		trk_mark_range(bdev->bd_disk, first, end, TRK_UNWRAPPED);
		goto out;
	}
	io->end_io = bio->bi_end_io;
	io->private = bio->bi_private;
	io->disk = bdev->bd_disk;
	io->first = first;
	io->end = end;
	atomic_inc(&trk_inflight);
	bio->bi_private = io;
	bio->bi_end_io = trk_end_io;
out:
	rcu_read_unlock();
}

static int trk_probe_pre(struct kprobe *p, struct pt_regs *regs)
{
	trk_record_bio((struct bio *)regs_get_kernel_argument(regs, 0));
	return 0;
}

static struct kprobe trk_probe = {
	.symbol_name = "submit_bio_noacct",
	.pre_handler = trk_probe_pre,
};

/* ORs @src into the live bitmap with atomic word operations. */
void trk_merge_bits(unsigned long *live, const unsigned long *src,
		    unsigned long nbits)
{
	unsigned long i;

	for (i = 0; i < BITS_TO_LONGS(nbits); i++)
		if (src[i])
			atomic_long_or(src[i], (atomic_long_t *)&live[i]);
}

/**
 * trk_tracer_init() - set up the completion wrappers' cache and the probe.
 *
 * Return: 0, or the error of the cache or of register_kprobe().
 */
int trk_tracer_init(void)
{
	int ret;

	trk_io_cache = KMEM_CACHE(trk_io, 0);
	if (!trk_io_cache)
		return -ENOMEM;
	ret = register_kprobe(&trk_probe);
	if (ret) {
		pr_err("drmesh_trk: cannot probe submit_bio_noacct: %d\n", ret);
		kmem_cache_destroy(trk_io_cache);
	}
	return ret;
}

/**
 * trk_tracer_exit() - remove the probe once nothing is attached.
 *
 * Waits for writes wrapped before the last detach to complete.
 */
void trk_tracer_exit(void)
{
	/* The module reference taken per attach means nothing is attached. */
	WARN_ON(!list_empty(&trk_devices));
	unregister_kprobe(&trk_probe);
	/* Writes wrapped before the last detach may still be in flight. */
	wait_event(trk_inflight_wait, atomic_read(&trk_inflight) == 0);
	/* ...and their trk_end_io() may still be returning. */
	synchronize_rcu();
	kmem_cache_destroy(trk_io_cache);
}
