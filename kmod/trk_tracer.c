// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk tracer: sees every write of an attached device, and holds the
 * writes a snapshot must copy first.
 *
 * An ftrace hook on submit_bio_noacct(), the one entry every bio passes before
 * it reaches a driver, sends the call to trk_submit_bio() in this module (the
 * same arguments, in the submitter's context; see README.md for why this hook
 * and its limits). trk_submit_bio() records the range in the live bitmap,
 * wraps the bio's completion (bi_end_io/bi_private) so the range is recorded
 * again in the bitmap that is live when the write completes, and then either
 * calls submit_bio_noacct() itself (the hook lets calls from this module
 * through) or, when a snapshot must copy the old data first, queues the bio
 * to that snapshot's worker, which copies and then submits it. A write in
 * flight across a hand-over is in both bitmaps, and a reader that reads the
 * device after a hand-over misses nothing: whatever had not landed yet is in
 * the next bitmap.
 *
 * Locking: trk_lock (a mutex) serialises attach, detach, hand-over and
 * snapshots. trk_submit_bio() walks the tracker list and reads each tracker's
 * live bitmap and snapshot under RCU; writers of the list and of those
 * pointers wait for those readers with synchronize_rcu().
 */
#include <linux/kernel.h>
#include <linux/bio.h>
#include <linux/ftrace.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/delay.h>
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
 * @slots: trk_slot_inflight counters this write counts in once it was sent
 *	on to the driver (0 while a snapshot holds it).
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
	u32 slots;
};

DEFINE_MUTEX(trk_lock);
LIST_HEAD(trk_devices);
unsigned int trk_count;

static struct kmem_cache *trk_io_cache;
/* Wrapped bios not yet completed; unload waits for zero. */
static atomic_t trk_inflight = ATOMIC_INIT(0);
static DECLARE_WAIT_QUEUE_HEAD(trk_inflight_wait);
atomic_t trk_slot_inflight[TRK_MAX_DEVICES];
DECLARE_WAIT_QUEUE_HEAD(trk_drain_wait);
/*
 * Tasks inside trk_submit_bio(), per CPU (a task may leave on another CPU, so
 * only the sum means anything). Unload waits for the sum to reach zero: a
 * task may sleep in submit_bio_noacct() called from there and return into
 * this module's code afterwards.
 */
static DEFINE_PER_CPU(long, trk_hook_users);

/* Sets bits [first, last] without losing concurrent setters' bits. */
void trk_set_bits(unsigned long *map, unsigned long first,
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
	TRK_COUNT,	/* only find the slots (a held write sent on) */
};

/**
 * struct trk_match - what trk_mark_range() found.
 * @slots: bit i set for each matching device in slot i.
 * @hold: the snapshot that must see the write before it goes on, or NULL.
 */
struct trk_match {
	u32 slots;
	struct trk_snap *hold;
};

/*
 * Marks disk sectors [first, end) of @disk in every tracker that covers them.
 * Caller holds rcu_read_lock(). Fills @m (may be NULL); returns how many
 * trackers matched.
 */
static unsigned int trk_mark_range(struct gendisk *disk, sector_t first,
				   sector_t end, enum trk_mark how,
				   struct trk_match *m)
{
	struct trk_dev *t;
	unsigned int matched = 0;

	list_for_each_entry_rcu(t, &trk_devices, node) {
		unsigned long *map;
		struct trk_snap *s;
		sector_t lo, hi;
		unsigned int shift;

		if (t->disk != disk)
			continue;
		lo = max(first, t->start_sect);
		hi = min(end, t->start_sect + t->nr_sects);
		if (lo >= hi)
			continue;
		matched++;
		if (m) {
			m->slots |= 1u << t->slot;
			/* At most one snapshot per disk: the first one found. */
			s = rcu_dereference(t->snap);
			if (how == TRK_SUBMITTED && s && !m->hold &&
			    trk_snap_needs_hold(s, lo - t->start_sect,
						hi - t->start_sect))
				m->hold = s;
		}
		if (how == TRK_UNWRAPPED) {
			atomic_set(&t->unwrapped, 1);
			continue;
		}
		if (how == TRK_COUNT)
			continue;
		shift = t->gran_shift - SECTOR_SHIFT;
		map = rcu_dereference(t->live);
		trk_set_bits(map, (lo - t->start_sect) >> shift,
			     (hi - 1 - t->start_sect) >> shift);
		if (how == TRK_SUBMITTED)
			atomic64_inc(&t->writes_seen);
	}
	return matched;
}

/*
 * Holds a write until every state store of a device it overlaps has logged
 * its extents (trk_persist.c). Caller holds rcu_read_lock(). Returns true
 * when a store took the bio (its worker sends it on via trk_submit_logged()).
 */
static bool trk_log_first(struct gendisk *disk, sector_t first, sector_t end,
			  struct bio *bio)
{
	struct trk_dev *t;

	list_for_each_entry_rcu(t, &trk_devices, node) {
		sector_t lo, hi;

		if (t->disk != disk || !t->pst)
			continue;
		lo = max(first, t->start_sect);
		hi = min(end, t->start_sect + t->nr_sects);
		if (lo < hi && trk_pst_hold(t->pst, lo - t->start_sect,
					    hi - t->start_sect, bio))
			return true;
	}
	return false;
}

/**
 * trk_disk_attached() - whether a device of @disk is attached.
 * @disk: the disk; caller holds trk_lock.
 *
 * A state store or COW store there would have its writes seen, and held, by
 * the hook it serves.
 */
bool trk_disk_attached(struct gendisk *disk)
{
	struct trk_dev *t;

	lockdep_assert_held(&trk_lock);
	list_for_each_entry(t, &trk_devices, node)
		if (t->disk == disk)
			return true;
	return false;
}

/* Counts a write that goes on to the driver in @slots' in-flight counters. */
static void trk_count_slots(u32 slots)
{
	while (slots) {
		unsigned int i = __ffs(slots);

		atomic_inc(&trk_slot_inflight[i]);
		slots &= slots - 1;
	}
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

	u32 slots = io->slots;

	rcu_read_lock();
	trk_mark_range(io->disk, io->first, io->end, TRK_COMPLETED, NULL);
	rcu_read_unlock();
	bio->bi_end_io = io->end_io;
	bio->bi_private = io->private;
	kmem_cache_free(trk_io_cache, io);
	while (slots) {
		unsigned int i = __ffs(slots);

		if (atomic_dec_and_test(&trk_slot_inflight[i]))
			wake_up(&trk_drain_wait);
		slots &= slots - 1;
	}
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
 * trk_hook_bio() - record a bio's range in every tracker of its disk.
 * @bio: a bio entering submit_bio_noacct().
 * @logged: the state stores already logged its extents (it comes from their
 *	worker): not held for them again.
 *
 * Runs in the submitter's context, which may be atomic; never sleeps. A write
 * with REQ_PREFLUSH or REQ_FUA is a REQ_OP_WRITE and is recorded like any
 * other; an empty flush has no sectors and records nothing. A bio that is
 * already wrapped was already sent on once (the remainder of a split,
 * resubmitted by the block layer): it is not wrapped, counted or held again,
 * as its wrapper covers the whole original range and a snapshot already saw
 * all of it.
 *
 * Return: true when a snapshot took the bio (its worker sends it on), false
 * when the caller must send it on now.
 */
static bool trk_hook_bio(struct bio *bio, bool logged)
{
	struct block_device *bdev = bio->bi_bdev;
	struct trk_match m = {};
	struct trk_io *io;
	sector_t first, end;
	unsigned int sectors;
	bool held = false;

	if (!bdev || !trk_is_write_class(bio))
		return false;
	sectors = bio_sectors(bio);
	if (!sectors)
		return false;
	/*
	 * Before partition remapping bi_sector is relative to the partition;
	 * bd_start_sect is 0 for a whole disk, so this is the disk sector.
	 */
	first = bio->bi_iter.bi_sector + bdev->bd_start_sect;
	end = first + sectors;

	rcu_read_lock();
	if (bio->bi_end_io == trk_end_io) {
		trk_mark_range(bdev->bd_disk, first, end, TRK_SUBMITTED, NULL);
		goto out;
	}
	/* Before any bit is set: a held bio passes here again later. */
	if (!logged && trk_log_first(bdev->bd_disk, first, end, bio)) {
		held = true;
		goto out;
	}
	if (!trk_mark_range(bdev->bd_disk, first, end, TRK_SUBMITTED, &m))
		goto out;
	io = kmem_cache_alloc(trk_io_cache, GFP_NOWAIT | __GFP_NOWARN);
	if (!io) {
		/* Seen by the next hand-over: same RCU read section. */
		trk_mark_range(bdev->bd_disk, first, end, TRK_UNWRAPPED, NULL);
	} else {
		io->end_io = bio->bi_end_io;
		io->private = bio->bi_private;
		io->disk = bdev->bd_disk;
		io->first = first;
		io->end = end;
		io->slots = m.hold ? 0 : m.slots;
		atomic_inc(&trk_inflight);
		bio->bi_private = io;
		bio->bi_end_io = trk_end_io;
	}
	if (m.hold) {
		/* Under RCU: the snapshot cannot go away before it is queued. */
		trk_snap_queue(m.hold, bio);
		held = true;
	} else if (io) {
		trk_count_slots(m.slots);
	}
out:
	rcu_read_unlock();
	return held;
}

/**
 * trk_pass_bio() - send on a write a snapshot held, from this module.
 * @bio: a write that trk_hook_bio() queued to a snapshot.
 *
 * Counts it in the in-flight counters of the devices it overlaps now (so a
 * later snapshot waits for it), then submits it. The ftrace hook lets calls
 * from this module through, so the bio is not seen again.
 */
void trk_pass_bio(struct bio *bio)
{
	if (bio->bi_end_io == trk_end_io) {
		struct trk_io *io = bio->bi_private;
		struct trk_match m = {};

		rcu_read_lock();
		trk_mark_range(io->disk, io->first, io->end, TRK_COUNT, &m);
		io->slots = m.slots;
		trk_count_slots(m.slots);
		rcu_read_unlock();
	}
	submit_bio_noacct(bio);
	/* Not a tail call: the hook recognises calls from here by return address. */
	barrier();
}

/**
 * trk_submit_bio() - where the hook sends every submit_bio_noacct() call.
 * @bio: the caller's bio.
 *
 * Same signature as submit_bio_noacct(): the hook rewrites the instruction
 * pointer at its entry, so this runs with the caller's arguments and returns
 * to the caller. Its own call to submit_bio_noacct() returns into this
 * module, which is how the hook tells it from the caller's (Kbuild builds
 * this file without sibling-call optimisation, so the call is never a jump).
 */
static void notrace trk_submit_bio(struct bio *bio)
{
	this_cpu_inc(trk_hook_users);
	if (!list_empty(&trk_devices) && trk_hook_bio(bio, false)) {
		this_cpu_dec(trk_hook_users);
		return;
	}
	submit_bio_noacct(bio);
	this_cpu_dec(trk_hook_users);
}

/**
 * trk_submit_logged() - send on a write a state store held for its log.
 * @bio: a write that trk_log_first() queued; its extents are logged now.
 *
 * Goes through the hook as a new write would (bits, completion wrapper,
 * snapshot), except for the log, and is sent on from this module.
 */
void trk_submit_logged(struct bio *bio)
{
	if (!trk_hook_bio(bio, true))
		submit_bio_noacct(bio);
	/* Not a tail call: the hook recognises calls from here by return address. */
	barrier();
}

/*
 * The ftrace callback at the entry of submit_bio_noacct(): calls that come
 * from this module (trk_submit_bio() passing a bio on, a snapshot worker
 * sending a held write) run the original function; every other call is sent
 * to trk_submit_bio(). Runs with preemption off; never sleeps.
 */
static void notrace trk_ftrace(unsigned long ip, unsigned long parent_ip,
			       struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	if (!within_module(parent_ip, THIS_MODULE))
		trk_ftrace_redirect(fregs, (unsigned long)trk_submit_bio);
}

static struct ftrace_ops trk_ftrace_ops = {
	.func = trk_ftrace,
	/*
	 * IPMODIFY: we change where the call goes, and ftrace refuses a
	 * second such user of the function (a live patch) rather than let
	 * two fight over it. SAVE_REGS: needed with IPMODIFY.
	 */
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY,
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
 * trk_tracer_init() - set up the completion wrappers' cache and the hook.
 *
 * Return: 0, or the error of the cache or of the ftrace registration.
 */
int trk_tracer_init(void)
{
	int ret;

	trk_io_cache = KMEM_CACHE(trk_io, 0);
	if (!trk_io_cache)
		return -ENOMEM;
	ret = ftrace_set_filter_ip(&trk_ftrace_ops,
				   (unsigned long)submit_bio_noacct, 0, 0);
	if (ret) {
		pr_err("drmesh_trk: cannot hook submit_bio_noacct: %d\n", ret);
		goto out_cache;
	}
	ret = register_ftrace_function(&trk_ftrace_ops);
	if (ret) {
		pr_err("drmesh_trk: cannot register the ftrace hook: %d\n", ret);
		ftrace_set_filter_ip(&trk_ftrace_ops,
				     (unsigned long)submit_bio_noacct, 1, 0);
		goto out_cache;
	}
	return 0;

out_cache:
	kmem_cache_destroy(trk_io_cache);
	return ret;
}

static long trk_hook_users_sum(void)
{
	long sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += per_cpu(trk_hook_users, cpu);
	return sum;
}

/**
 * trk_tracer_exit() - remove the hook once nothing is attached.
 *
 * Waits until no task is inside this module's code any more: tasks still in
 * trk_submit_bio() (they may sleep in the submit_bio_noacct() called from
 * there), wrapped writes not yet completed, and the few instructions that
 * each of those runs after it stopped counting itself.
 */
void trk_tracer_exit(void)
{
	/* The module reference taken per attach means nothing is attached. */
	WARN_ON(!list_empty(&trk_devices));
	/* Returns once no CPU can enter trk_ftrace() any more. */
	unregister_ftrace_function(&trk_ftrace_ops);
	ftrace_set_filter_ip(&trk_ftrace_ops, (unsigned long)submit_bio_noacct,
			     1, 0);
	/* Tasks already redirected: a poll, as they do not wake us. */
	while (trk_hook_users_sum())
		msleep(20);
	/* Writes wrapped before the last detach may still be in flight. */
	wait_event(trk_inflight_wait, atomic_read(&trk_inflight) == 0);
	/*
	 * After its decrement a task still runs a few instructions here: with
	 * preemption off (interrupt completions) an RCU grace period covers
	 * them; preempted in process context, only a Tasks RCU grace period
	 * (every task has since switched voluntarily) does.
	 */
	synchronize_rcu();
	synchronize_rcu_tasks();
	kmem_cache_destroy(trk_io_cache);
}
