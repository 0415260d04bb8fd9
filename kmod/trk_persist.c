// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk persistent tracking: keeps a device's change bitmap on a state
 * store (another block device) so that tracking survives a reboot or a crash.
 *
 * The store holds two bitmap slots and an activity log, in the spirit of
 * DRBD's: the log names the extents of the device (DRMESH_TRK_EXTENT_BYTES
 * each) that may hold writes the current slot lacks. A write to an extent
 * that is not in the log is held (trk_pst_hold()) until the log with that
 * extent added is on stable storage; writes to logged extents pass at once.
 * When the log is full its oldest quarter leaves it: the slot's bitmap blocks
 * that cover those extents take the live bits first. So after a crash the
 * restored bitmap is the slot plus every logged extent, and at most
 * DRMESH_TRK_AL_SLOTS extents are reread.
 *
 * A checkpoint writes the whole live bitmap to the other slot and switches
 * the header to it with the current hand-over count, then empties the log.
 * Attach, every hand-over (before the swap, so the count is one the client
 * has already stored) and a clean shutdown (reboot notifier) checkpoint; the
 * next boot then restores an exact bitmap. See README.md, "Tracking that
 * survives reboot".
 *
 * Locking: trk_pst.lock serialises the log, checkpoints and hand-overs of one
 * device; it is taken under trk_lock, never the other way round, and nothing
 * done under it waits for trk_lock. The write hook only tests the member
 * bitmap under RCU; whoever clears member bits waits for an RCU grace period
 * before reading the live bitmap, so every write that passed as logged has
 * set its bits by then.
 */
#include <linux/kernel.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/part_stat.h>
#include <linux/crc32.h>
#include <linux/random.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>
#include <linux/bitmap.h>
#include <linux/sort.h>

#include "drmesh_ioctl.h"
#include "trk.h"

#define PST_BLOCK DRMESH_TRK_BLOCK_BYTES
#define PST_HDR_SECTOR(i) ((sector_t)(i) * (PST_BLOCK >> SECTOR_SHIFT))
#define PST_AL_SECTOR(i) ((sector_t)(2 + (i)) * (PST_BLOCK >> SECTOR_SHIFT))
/* Extents that leave a full log together (one RCU grace period for all). */
#define PST_EVICT (DRMESH_TRK_AL_SLOTS / 4)

/**
 * struct trk_pst - the state store of one tracked device.
 * @t: the tracked device.
 * @bdev: the store, held open exclusively.
 * @handle: what closing @bdev needs.
 * @lock: see the comment at the top.
 * @held_lock: protects @held (taken from the write hook, any context).
 * @held: writes waiting for their extents to be logged.
 * @work: logs the extents of @held and sends those writes on.
 * @member: extents in the log as on stable storage (read under RCU).
 * @nextents: extents of the device.
 * @ext_sect_shift: log2 of sectors per extent.
 * @al: the log's extents, oldest first.
 * @al_count: entries of @al.
 * @al_seq: seq of the last log write.
 * @hdr_seq: seq of the last header write.
 * @slot: the current bitmap slot.
 * @slot_bytes: bytes of a slot (bitmap bytes rounded up to a block).
 * @blk: one block for header and log writes and bitmap block updates.
 * @error: first I/O error of the store (positive errno), else 0; from then on
 *	writes are not held and the store is not written again.
 * @flushes: times a full log made extents leave it.
 * @prev_valid: t->spare holds the last hand-over's bits (kept, not zeroed,
 *	until the next hand-over: a crash before the client stored them must
 *	not lose them).
 */
struct trk_pst {
	struct trk_dev *t;
	struct block_device *bdev;
	struct trk_bdev_handle handle;
	struct mutex lock;
	spinlock_t held_lock;
	struct bio_list held;
	struct work_struct work;
	unsigned long *member;
	unsigned long nextents;
	unsigned int ext_sect_shift;
	u64 al[DRMESH_TRK_AL_SLOTS];
	unsigned int al_count;
	u64 al_seq;
	u64 hdr_seq;
	u32 slot;
	u64 slot_bytes;
	void *blk;
	int error;
	u32 flushes;
	bool prev_valid;
};

static struct workqueue_struct *pst_wq;

/**
 * trk_sync_io() - synchronous I/O between a buffer and a block device.
 * @bdev: the device.
 * @opf: REQ_OP_READ or REQ_OP_WRITE with flags; flags go on the last bio only
 *	(a REQ_PREFLUSH on it still orders every earlier one, as they completed).
 * @sector: first sector.
 * @buf: page-aligned buffer (kmalloc, page or vmalloc memory).
 * @bytes: a multiple of the sector size.
 *
 * Submitted from this module, so the write hook does not see these bios:
 * callers only write to stores, which are never on an attached disk.
 *
 * Return: 0 or the first bio's error.
 */
int trk_sync_io(struct block_device *bdev, blk_opf_t opf, sector_t sector,
		void *buf, size_t bytes)
{
	const size_t chunk = (size_t)BIO_MAX_VECS << PAGE_SHIFT;
	size_t done;

	for (done = 0; done < bytes; done += chunk) {
		size_t n = min(chunk, bytes - done);
		bool last = done + n == bytes;
		blk_opf_t op = last ? opf : (opf & REQ_OP_MASK);
		struct bio *bio;
		size_t off;
		int ret;

		bio = bio_alloc(bdev, DIV_ROUND_UP(n, PAGE_SIZE), op, GFP_NOIO);
		bio->bi_iter.bi_sector = sector + (done >> SECTOR_SHIFT);
		for (off = 0; off < n; off += PAGE_SIZE)
			__bio_add_page(bio, trk_page(buf + done + off),
				       min_t(size_t, PAGE_SIZE, n - off), 0);
		if (is_vmalloc_addr(buf) && op_is_write(op))
			flush_kernel_vmap_range(buf + done, n);
		ret = submit_bio_wait(bio);
		if (is_vmalloc_addr(buf) && !op_is_write(op))
			invalidate_kernel_vmap_range(buf + done, n);
		bio_put(bio);
		if (ret)
			return ret;
	}
	return 0;
}

static u32 pst_crc(const void *block, size_t crc_offset)
{
	static const u8 zero[4];
	u32 crc = crc32_le(~0u, block, crc_offset);

	crc = crc32_le(crc, zero, sizeof(zero));
	return crc32_le(crc, block + crc_offset + 4,
			PST_BLOCK - crc_offset - 4);
}

static sector_t pst_slot_sector(const struct trk_pst *p, u32 slot)
{
	return (DRMESH_TRK_BITMAP_OFFSET + slot * p->slot_bytes) >> SECTOR_SHIFT;
}

/* Records the store's first failure; later writes are no longer held. */
static int pst_fail(struct trk_pst *p, int ret, const char *what)
{
	if (ret && !p->error) {
		p->error = -ret;
		pr_err("drmesh_trk: state store %pg of %pg: %s failed (%d); tracking goes on in memory only\n",
		       p->bdev, p->t->bdev, what, ret);
	}
	return ret;
}

/* Writes the next header copy: @state, @p->slot, @handovers. */
static int pst_write_header(struct trk_pst *p, u32 state, u64 handovers)
{
	struct drmesh_trk_header *h = p->blk;
	struct trk_dev *t = p->t;
	u64 seq = p->hdr_seq + 1;
	int ret;

	memset(h, 0, PST_BLOCK);
	memcpy(h->magic, DRMESH_TRK_MAGIC, sizeof(h->magic));
	h->format = cpu_to_le32(DRMESH_TRK_FORMAT);
	h->state = cpu_to_le32(state);
	h->seq = cpu_to_le64(seq);
	h->handovers = cpu_to_le64(handovers);
	h->device_bytes = cpu_to_le64((u64)t->nr_sects << SECTOR_SHIFT);
	h->nbits = cpu_to_le64(t->nbits);
	h->granularity_bytes = cpu_to_le32(1u << t->gran_shift);
	h->bitmap_slot = cpu_to_le32(p->slot);
	h->bitmap_bytes = cpu_to_le64(DIV_ROUND_UP(t->nbits, 8));
	h->extent_bytes = cpu_to_le32(DRMESH_TRK_EXTENT_BYTES);
	h->al_slots = cpu_to_le32(DRMESH_TRK_AL_SLOTS);
	memcpy(h->tracking_id, t->tracking_id, sizeof(h->tracking_id));
	h->crc = cpu_to_le32(pst_crc(h, offsetof(struct drmesh_trk_header, crc)));
	/* PREFLUSH: the slot written just before must be durable first. */
	ret = trk_sync_io(p->bdev, REQ_OP_WRITE | REQ_PREFLUSH | REQ_FUA,
			  PST_HDR_SECTOR(seq & 1), h, PST_BLOCK);
	if (!ret)
		p->hdr_seq = seq;
	return ret;
}

/*
 * Writes the next log copy from @p->al; PREFLUSH makes bitmap blocks written
 * before it (extents leaving the log) durable first.
 */
static int pst_write_log(struct trk_pst *p)
{
	struct drmesh_trk_al *al = p->blk;
	u64 seq = p->al_seq + 1;
	unsigned int i;
	int ret;

	memset(al, 0, PST_BLOCK);
	memcpy(al->magic, DRMESH_TRK_AL_MAGIC, sizeof(al->magic));
	al->seq = cpu_to_le64(seq);
	al->count = cpu_to_le32(p->al_count);
	for (i = 0; i < p->al_count; i++)
		al->extent[i] = cpu_to_le64(p->al[i]);
	al->crc = cpu_to_le32(pst_crc(al, offsetof(struct drmesh_trk_al, crc)));
	ret = trk_sync_io(p->bdev, REQ_OP_WRITE | REQ_PREFLUSH | REQ_FUA,
			  PST_AL_SECTOR(seq & 1), al, PST_BLOCK);
	if (!ret)
		p->al_seq = seq;
	return ret;
}

/* The live bitmap; stable while p->lock is held (hand-overs take it). */
static unsigned long *pst_live(struct trk_pst *p)
{
	return rcu_dereference_protected(p->t->live, lockdep_is_held(&p->lock));
}

/*
 * Empties the member set and waits until every write that passed as logged
 * has set its bits in the live bitmap. Writes from now on are held.
 */
static void pst_unlog_all(struct trk_pst *p)
{
	bitmap_zero(p->member, p->nextents);
	synchronize_rcu();
}

/**
 * pst_checkpoint() - write the live bitmap to the other slot, switch to it
 *	with the current hand-over count, and empty the log.
 * @p: the store; p->lock held.
 * @state: header state to write.
 * @with_prev: for a checkpoint between hand-overs: include the bits of the
 *	last hand-over, which the client may not have stored yet.
 *
 * Every crash point leaves a header whose slot plus log cover every write
 * since its count: the new slot is durable before the header names it, and
 * the log empties only after that.
 */
static int pst_checkpoint(struct trk_pst *p, u32 state, bool with_prev)
{
	struct trk_dev *t = p->t;
	u64 count = t->handovers;
	u32 old_slot = p->slot;
	int ret;

	lockdep_assert_held(&p->lock);
	if (p->error)
		return -EIO;
	pst_unlog_all(p);
	if (with_prev && p->prev_valid && count) {
		/*
		 * The last hand-over's bits join the live bitmap (they are
		 * handed over again: a few blocks reread) so the slot may
		 * carry the count before it, which the client surely stored.
		 */
		trk_merge_bits(pst_live(p), t->spare, t->nbits);
		count--;
	}
	ret = trk_sync_io(p->bdev, REQ_OP_WRITE, pst_slot_sector(p, !old_slot),
			  pst_live(p), p->slot_bytes);
	if (ret)
		return pst_fail(p, ret, "bitmap write");
	p->slot = !old_slot;
	ret = pst_write_header(p, state, count);
	if (ret) {
		p->slot = old_slot;
		return pst_fail(p, ret, "header write");
	}
	p->al_count = 0;
	return pst_fail(p, pst_write_log(p), "activity log write");
}

static int pst_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/*
 * Makes room in a full log: the oldest PST_EVICT extents leave it after the
 * slot's bitmap blocks that cover them took the live bits (read, OR, write:
 * the slot keeps the bits of every write since its count).
 */
static int pst_evict(struct trk_pst *p)
{
	unsigned int n = min_t(unsigned int, PST_EVICT, p->al_count);
	/* Bits of one extent, and bits of one block: both powers of two. */
	unsigned long ext_bits = 1ul << (p->ext_sect_shift + SECTOR_SHIFT -
					 p->t->gran_shift);
	const unsigned long blk_bits = PST_BLOCK * 8;
	unsigned long *live;
	u64 last_blk = U64_MAX;
	unsigned int i;
	int ret;

	for (i = 0; i < n; i++)
		clear_bit(p->al[i], p->member);
	synchronize_rcu();
	live = pst_live(p);
	/* In ascending order, so each block is read and written once. */
	sort(p->al, n, sizeof(p->al[0]), pst_cmp_u64, NULL);
	for (i = 0; i < n; i++) {
		u64 blk = p->al[i] * ext_bits / blk_bits;
		unsigned long *words = p->blk;
		unsigned long *src = live + blk * (blk_bits / BITS_PER_LONG);
		/* The last hand-over's bits too, until the next one. */
		unsigned long *prev = p->t->spare + blk * (blk_bits / BITS_PER_LONG);
		unsigned int w;

		if (blk == last_blk)
			continue;
		last_blk = blk;
		ret = trk_sync_io(p->bdev, REQ_OP_READ,
				  pst_slot_sector(p, p->slot) +
				  blk * (PST_BLOCK >> SECTOR_SHIFT),
				  p->blk, PST_BLOCK);
		if (ret)
			return pst_fail(p, ret, "bitmap block read");
		for (w = 0; w < blk_bits / BITS_PER_LONG; w++)
			words[w] |= READ_ONCE(src[w]) | prev[w];
		ret = trk_sync_io(p->bdev, REQ_OP_WRITE,
				  pst_slot_sector(p, p->slot) +
				  blk * (PST_BLOCK >> SECTOR_SHIFT),
				  p->blk, PST_BLOCK);
		if (ret)
			return pst_fail(p, ret, "bitmap block write");
	}
	p->al_count -= n;
	memmove(p->al, p->al + n, p->al_count * sizeof(p->al[0]));
	p->flushes++;
	/* The caller's log write (with PREFLUSH) drops them on the store. */
	return 0;
}

/* Extents [*first, *last] of device sectors [lo, hi) of @p's device. */
static void pst_extents(const struct trk_pst *p, sector_t lo, sector_t hi,
			u64 *first, u64 *last)
{
	*first = lo >> p->ext_sect_shift;
	*last = (hi - 1) >> p->ext_sect_shift;
}

/* Device sectors [lo, hi) a bio covers of @p's device, false if none. */
static bool pst_bio_range(const struct trk_pst *p, struct bio *bio,
			  sector_t *lo, sector_t *hi)
{
	struct trk_dev *t = p->t;
	sector_t first = bio->bi_iter.bi_sector + bio->bi_bdev->bd_start_sect;
	sector_t end = first + bio_sectors(bio);

	if (bio->bi_bdev->bd_disk != t->disk || !bio_sectors(bio))
		return false;
	*lo = max(first, t->start_sect) - t->start_sect;
	*hi = min(end, t->start_sect + t->nr_sects);
	if (*hi <= *lo + t->start_sect)
		return false;
	*hi -= t->start_sect;
	return true;
}

/* Extents of [lo, hi) neither logged nor already in p->al. */
static unsigned int pst_new_extents(struct trk_pst *p, sector_t lo, sector_t hi)
{
	unsigned int need = 0, i;
	u64 first, last, e;

	pst_extents(p, lo, hi, &first, &last);
	for (e = first; e <= last; e++) {
		if (test_bit(e, p->member))
			continue;
		for (i = 0; i < p->al_count && p->al[i] != e; i++)
			;
		need += i == p->al_count;
	}
	return need;
}

/* Appends the extents pst_new_extents() counted to p->al (room was made). */
static void pst_add_extents(struct trk_pst *p, sector_t lo, sector_t hi)
{
	u64 first, last, e;
	unsigned int i;

	pst_extents(p, lo, hi, &first, &last);
	for (e = first; e <= last; e++) {
		if (test_bit(e, p->member))
			continue;
		for (i = 0; i < p->al_count && p->al[i] != e; i++)
			;
		if (i == p->al_count)
			p->al[p->al_count++] = e;
	}
}

/* Sets member bits for every logged extent (after the log is durable). */
static void pst_mark_logged(struct trk_pst *p)
{
	unsigned int i;

	for (i = 0; i < p->al_count; i++)
		set_bit(p->al[i], p->member);
}

/*
 * Writes the log if extents were added, then sends @round's writes on. They
 * go on under p->lock, so no eviction or checkpoint runs between the log
 * write and the bits they set; only after that may their extents leave the
 * log again. After a store failure they go on unlogged (status reports it).
 */
static void pst_commit(struct trk_pst *p, struct bio_list *round, bool *added)
{
	struct bio *bio;

	if (*added && !p->error &&
	    !pst_fail(p, pst_write_log(p), "activity log write"))
		pst_mark_logged(p);
	*added = false;
	while ((bio = bio_list_pop(round)))
		trk_submit_logged(bio);
}

static void pst_work(struct work_struct *work)
{
	struct trk_pst *p = container_of(work, struct trk_pst, work);
	struct bio_list bios, round;
	struct bio *bio;
	unsigned long flags;
	bool added = false;

	spin_lock_irqsave(&p->held_lock, flags);
	bios = p->held;
	bio_list_init(&p->held);
	spin_unlock_irqrestore(&p->held_lock, flags);

	bio_list_init(&round);
	mutex_lock(&p->lock);
	while ((bio = bio_list_pop(&bios))) {
		unsigned int shift = p->t->gran_shift - SECTOR_SHIFT;
		sector_t lo, hi;
		unsigned int need;

		if (p->error || !pst_bio_range(p, bio, &lo, &hi)) {
			bio_list_add(&round, bio);
			continue;
		}
		need = pst_new_extents(p, lo, hi);
		if (need > DRMESH_TRK_AL_SLOTS / 2) {
			/*
			 * Too wide for the log (a large discard): its bits go
			 * to the live bitmap now and a checkpoint makes them
			 * durable before it is sent on.
			 */
			pst_commit(p, &round, &added);
			trk_set_bits(pst_live(p), lo >> shift, (hi - 1) >> shift);
			pst_checkpoint(p, DRMESH_TRK_LIVE, true);
			bio_list_add(&round, bio);
			pst_commit(p, &round, &added);
			continue;
		}
		if (p->al_count + need > DRMESH_TRK_AL_SLOTS) {
			/* Writes of this round must be out before eviction. */
			pst_commit(p, &round, &added);
			/* Evicted extents may be this write's: count again. */
			while (!p->error &&
			       p->al_count + need > DRMESH_TRK_AL_SLOTS) {
				pst_evict(p);
				need = pst_new_extents(p, lo, hi);
			}
			if (p->error)
				need = 0;
		}
		if (need) {
			pst_add_extents(p, lo, hi);
			added = true;
		}
		bio_list_add(&round, bio);
	}
	pst_commit(p, &round, &added);
	mutex_unlock(&p->lock);
}

/**
 * trk_pst_hold() - hold a write until its extents are logged.
 * @p: the store of a device the write overlaps.
 * @lo: first device sector written.
 * @hi: sector after the last one.
 * @bio: the write.
 *
 * Called by the write hook under rcu_read_lock(); never sleeps.
 *
 * Return: true when @bio was queued (the worker sends it on), false when its
 * extents are all logged (or the store failed) and it may go on now.
 */
bool trk_pst_hold(struct trk_pst *p, sector_t lo, sector_t hi, struct bio *bio)
{
	unsigned long flags;
	u64 first, last, e;

	if (READ_ONCE(p->error))
		return false;
	pst_extents(p, lo, hi, &first, &last);
	for (e = first; e <= last; e++)
		if (!test_bit(e, p->member))
			break;
	if (e > last)
		return false;
	spin_lock_irqsave(&p->held_lock, flags);
	bio_list_add(&p->held, bio);
	spin_unlock_irqrestore(&p->held_lock, flags);
	queue_work(pst_wq, &p->work);
	return true;
}

/* Reads the valid one of two copies with the higher seq; NULL if neither. */
static void *pst_pick(void *two, size_t magic_off, const char *magic,
		      size_t seq_off, size_t crc_off)
{
	void *best = NULL;
	u64 best_seq = 0;
	int i;

	for (i = 0; i < 2; i++) {
		void *b = two + i * PST_BLOCK;
		u64 seq = le64_to_cpup(b + seq_off);

		if (memcmp(b + magic_off, magic, 8) ||
		    le32_to_cpup(b + crc_off) != pst_crc(b, crc_off))
			continue;
		if (!best || seq > best_seq) {
			best = b;
			best_seq = seq;
		}
	}
	return best;
}

/* Writes to @bdev since boot, as its I/O counters tell. */
static u64 pst_written_sectors(struct block_device *bdev)
{
	return part_stat_read(bdev, sectors[STAT_WRITE]) +
	       part_stat_read(bdev, sectors[STAT_DISCARD]);
}

/*
 * Decides whether the state read into @blocks (headers, then logs) can be
 * restored into @t, and if so restores it: the slot into the live bitmap, the
 * logged extents on top. Returns a DRMESH_RESTORE_* value, or -errno.
 */
static int pst_restore(struct trk_pst *p, void *blocks, u32 *al_extents)
{
	struct trk_dev *t = p->t;
	const struct drmesh_trk_header *h;
	const struct drmesh_trk_al *al;
	unsigned long *live = pst_live(p);
	unsigned long ext_bits;
	u32 i, count;
	int ret;

	h = pst_pick(blocks, offsetof(struct drmesh_trk_header, magic),
		     DRMESH_TRK_MAGIC, offsetof(struct drmesh_trk_header, seq),
		     offsetof(struct drmesh_trk_header, crc));
	al = pst_pick(blocks + 2 * PST_BLOCK,
		      offsetof(struct drmesh_trk_al, magic), DRMESH_TRK_AL_MAGIC,
		      offsetof(struct drmesh_trk_al, seq),
		      offsetof(struct drmesh_trk_al, crc));
	if (h)
		p->hdr_seq = le64_to_cpu(h->seq);
	if (al)
		p->al_seq = le64_to_cpu(al->seq);
	if (!h || le32_to_cpu(h->format) != DRMESH_TRK_FORMAT)
		return DRMESH_RESTORE_FRESH;
	if (le64_to_cpu(h->device_bytes) != (u64)t->nr_sects << SECTOR_SHIFT ||
	    le64_to_cpu(h->nbits) != t->nbits ||
	    le32_to_cpu(h->granularity_bytes) != 1u << t->gran_shift ||
	    le64_to_cpu(h->bitmap_bytes) != DIV_ROUND_UP(t->nbits, 8) ||
	    le32_to_cpu(h->extent_bytes) != DRMESH_TRK_EXTENT_BYTES ||
	    le32_to_cpu(h->al_slots) != DRMESH_TRK_AL_SLOTS ||
	    le32_to_cpu(h->bitmap_slot) > 1)
		return DRMESH_RESTORE_GEOMETRY;
	if (le32_to_cpu(h->state) != DRMESH_TRK_LIVE)
		return DRMESH_RESTORE_DETACHED;
	/*
	 * Nothing may have written the device between boot and this attach:
	 * such writes were never seen. The block layer's counters tell.
	 */
	if (!blk_queue_io_stat(bdev_get_queue(t->bdev)))
		return DRMESH_RESTORE_NO_IOSTAT;
	if (pst_written_sectors(t->bdev))
		return DRMESH_RESTORE_WRITTEN;

	p->slot = le32_to_cpu(h->bitmap_slot);
	ret = trk_sync_io(p->bdev, REQ_OP_READ, pst_slot_sector(p, p->slot),
			  live, p->slot_bytes);
	if (ret)
		return ret;
	/* Bits past the device's end are never set in memory. */
	if (t->nbits % BITS_PER_LONG)
		live[t->nbits / BITS_PER_LONG] &=
			BITMAP_LAST_WORD_MASK(t->nbits);
	memset((void *)live + BITS_TO_LONGS(t->nbits) * sizeof(long), 0,
	       p->slot_bytes - BITS_TO_LONGS(t->nbits) * sizeof(long));
	ext_bits = 1ul << (p->ext_sect_shift + SECTOR_SHIFT - t->gran_shift);
	count = al ? min_t(u32, le32_to_cpu(al->count), DRMESH_TRK_AL_SLOTS) : 0;
	*al_extents = 0;
	for (i = 0; i < count; i++) {
		u64 e = le64_to_cpu(al->extent[i]);
		unsigned long first = e * ext_bits;

		if (e >= p->nextents)
			continue;
		trk_set_bits(live, first, min(first + ext_bits, t->nbits) - 1);
		(*al_extents)++;
	}
	t->handovers = le64_to_cpu(h->handovers);
	memcpy(t->tracking_id, h->tracking_id, sizeof(t->tracking_id));
	return *al_extents ? DRMESH_RESTORE_CRASH : DRMESH_RESTORE_CLEAN;
}

/**
 * trk_pst_bitmap_bytes() - bytes a bitmap allocation of @nbits needs so that
 *	a whole slot can be read into it.
 * @nbits: bits of the bitmap.
 */
size_t trk_pst_bitmap_bytes(unsigned long nbits)
{
	return round_up(BITS_TO_LONGS(nbits) * sizeof(long), PST_BLOCK);
}

/**
 * trk_pst_open() - open @t's state store, restore what it holds, and start
 *	keeping it.
 * @t: a device being attached (not yet on trk_devices; its bitmaps zeroed,
 *	sized by trk_pst_bitmap_bytes(); t->tracking_id a fresh random id).
 * @path: the store's path.
 * @r: out: what was restored (DRMESH_RESTORE_*), al extents, bits set.
 *
 * Return: the store, or ERR_PTR: -EINVAL when it is on @t's disk, -ENOSPC
 * when it is too small, the open error, or an I/O error.
 */
struct trk_pst *trk_pst_open(struct trk_dev *t, const char *path,
			     struct trk_restore *r)
{
	struct trk_pst *p;
	void *blocks = NULL;
	u64 need;
	int ret;

	p = kzalloc(sizeof(*p), GFP_KERNEL);
	if (!p)
		return ERR_PTR(-ENOMEM);
	p->t = t;
	mutex_init(&p->lock);
	spin_lock_init(&p->held_lock);
	bio_list_init(&p->held);
	INIT_WORK(&p->work, pst_work);
	p->ext_sect_shift = ilog2(DRMESH_TRK_EXTENT_BYTES) - SECTOR_SHIFT;
	p->nextents = DIV_ROUND_UP_ULL((u64)t->nr_sects, 1ull << p->ext_sect_shift);
	p->slot_bytes = round_up(DIV_ROUND_UP(t->nbits, 8), PST_BLOCK);
	p->member = bitmap_zalloc(p->nextents, GFP_KERNEL);
	p->blk = (void *)__get_free_page(GFP_KERNEL);
	blocks = kvmalloc(4 * PST_BLOCK, GFP_KERNEL);
	if (!p->member || !p->blk || !blocks) {
		ret = -ENOMEM;
		goto out_free;
	}
	p->bdev = trk_bdev_open_excl_rw(path, p, &p->handle);
	if (IS_ERR(p->bdev)) {
		ret = PTR_ERR(p->bdev);
		goto out_free;
	}
	/* Its writes would pass through our own hook: a loop. */
	if (p->bdev->bd_disk == t->disk) {
		ret = -EINVAL;
		goto out_close;
	}
	if (trk_disk_attached(p->bdev->bd_disk)) {
		ret = -EBUSY;
		goto out_close;
	}
	need = DRMESH_TRK_BITMAP_OFFSET + 2 * p->slot_bytes;
	if ((u64)bdev_nr_sectors(p->bdev) << SECTOR_SHIFT < need) {
		ret = -ENOSPC;
		goto out_close;
	}
	ret = trk_sync_io(p->bdev, REQ_OP_READ, 0, blocks, 4 * PST_BLOCK);
	if (ret)
		goto out_close;
	mutex_lock(&p->lock);
	r->al_extents = 0;
	ret = pst_restore(p, blocks, &r->al_extents);
	if (ret >= 0) {
		r->restore = ret;
		if (ret != DRMESH_RESTORE_CLEAN && ret != DRMESH_RESTORE_CRASH) {
			bitmap_zero(pst_live(p), t->nbits);
			t->handovers = 0;
		}
		r->bits_set = bitmap_weight(pst_live(p), t->nbits);
		/* From here on the store describes this attach. */
		ret = pst_checkpoint(p, DRMESH_TRK_LIVE, false);
	}
	mutex_unlock(&p->lock);
	if (ret)
		goto out_close;
	kvfree(blocks);
	return p;

out_close:
	trk_bdev_close(p->bdev, &p->handle);
out_free:
	kvfree(blocks);
	free_page((unsigned long)p->blk);
	bitmap_free(p->member);
	kfree(p);
	return ERR_PTR(ret);
}

/**
 * trk_pst_close() - after detach: mark the store detached and close it.
 * @p: the store of a device already off trk_devices (an RCU grace period
 *	has passed, so the hook queues nothing more).
 *
 * Writes still held are logged and sent on first. The store is marked
 * detached because writes from now on are not seen: a later attach must not
 * restore it.
 */
void trk_pst_close(struct trk_pst *p)
{
	flush_work(&p->work);
	mutex_lock(&p->lock);
	if (!p->error)
		pst_fail(p, pst_write_header(p, DRMESH_TRK_DETACHED,
					     p->t->handovers),
			 "header write");
	mutex_unlock(&p->lock);
	trk_bdev_close(p->bdev, &p->handle);
	free_page((unsigned long)p->blk);
	bitmap_free(p->member);
	kfree(p);
}

/**
 * trk_pst_before_handover() - checkpoint before a hand-over.
 * @p: the store, or NULL (does nothing).
 *
 * Called under trk_lock before the writes are held for a snapshot: the slot
 * then holds every write since the current count, which the client stored at
 * the previous hand-over. From then on the previous hand-over's bits (kept in
 * t->spare) are no longer needed, and trk_pst_swap() may reuse that bitmap.
 */
void trk_pst_before_handover(struct trk_pst *p)
{
	if (!p)
		return;
	mutex_lock(&p->lock);
	if (!p->error)
		pst_checkpoint(p, DRMESH_TRK_LIVE, false);
	mutex_unlock(&p->lock);
}

/**
 * trk_pst_swap() - a persistent device's bitmap swap.
 * @p: the store.
 *
 * Like trk_swap() for a device without a store, but the old live bitmap
 * stays intact as t->spare (the previous hand-over's bits, see
 * pst_checkpoint()), and the pointers change under p->lock, where evictions
 * read them.
 *
 * Return: the old live bitmap, to hand over.
 */
unsigned long *trk_pst_swap(struct trk_pst *p)
{
	struct trk_dev *t = p->t;
	unsigned long *old;

	mutex_lock(&p->lock);
	old = pst_live(p);
	bitmap_zero(t->spare, t->nbits);
	rcu_assign_pointer(t->live, t->spare);
	/* Every hook that may still hold the old pointer is done after this. */
	synchronize_rcu();
	t->spare = old;
	p->prev_valid = true;
	mutex_unlock(&p->lock);
	return old;
}

/**
 * trk_pst_status() - the store's figures for STATUS.
 * @p: the store, or NULL (all zero).
 * @used: out: extents in the log.
 * @slots: out: extents the log holds.
 * @error: out: first failure (positive errno) or 0.
 * @flushes: out: times a full log made extents leave it.
 */
void trk_pst_status(struct trk_pst *p, u32 *used, u32 *slots, u32 *error,
		    u32 *flushes)
{
	*used = *slots = *error = *flushes = 0;
	if (!p)
		return;
	mutex_lock(&p->lock);
	*used = p->al_count;
	*slots = DRMESH_TRK_AL_SLOTS;
	*error = p->error;
	*flushes = p->flushes;
	mutex_unlock(&p->lock);
}

/*
 * Reboot and power-off: checkpoint every store, so the next boot restores
 * exact bitmaps (userspace is gone and filesystems are unmounted or read-only
 * by now; a write after this is logged again as usual).
 */
static int pst_reboot(struct notifier_block *nb, unsigned long action,
		      void *data)
{
	struct trk_dev *t;

	mutex_lock(&trk_lock);
	list_for_each_entry(t, &trk_devices, node) {
		struct trk_pst *p = t->pst;

		if (!p)
			continue;
		flush_work(&p->work);
		mutex_lock(&p->lock);
		if (!pst_checkpoint(p, DRMESH_TRK_LIVE, false))
			pr_info("drmesh_trk: tracking state of %pg saved to %pg\n",
				t->bdev, p->bdev);
		mutex_unlock(&p->lock);
	}
	mutex_unlock(&trk_lock);
	return NOTIFY_DONE;
}

static struct notifier_block pst_reboot_nb = {
	.notifier_call = pst_reboot,
};

/** trk_pst_init() - the log worker's queue and the reboot notifier. */
int trk_pst_init(void)
{
	int ret;

	/* MEM_RECLAIM: writeback that frees memory may wait for it. */
	pst_wq = alloc_workqueue("drmesh_pst", WQ_MEM_RECLAIM, 0);
	if (!pst_wq)
		return -ENOMEM;
	ret = register_reboot_notifier(&pst_reboot_nb);
	if (ret)
		destroy_workqueue(pst_wq);
	return ret;
}

/** trk_pst_exit() - undo trk_pst_init() (nothing is attached any more). */
void trk_pst_exit(void)
{
	unregister_reboot_notifier(&pst_reboot_nb);
	destroy_workqueue(pst_wq);
}

/**
 * trk_pst_disk() - the disk @p's store is on (an attach refuses to track it).
 * @p: the store.
 */
struct gendisk *trk_pst_disk(struct trk_pst *p)
{
	return p->bdev->bd_disk;
}
