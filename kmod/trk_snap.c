// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk snapshots: a point-in-time view of an attached device, kept by
 * copying each chunk's old data into a COW store before its first write.
 *
 * One snapshot per disk. Its worker thread does everything that may sleep:
 * it copies the chunks held writes are about to overwrite and then sends the
 * writes on (trk_pass_bio()), the writes queued together as one batch whose
 * reads of the old data are in flight at once (snap_batch_run()), and it
 * serves reads of the snapshot block device (/dev/drmesh-snapN) from the
 * store (copied chunks) or the origin (the rest).
 * Because one thread does both, a read of a chunk not yet copied cannot race
 * with the copy of that chunk: a write that needs the copy waits in the same
 * queue. Writes to chunks already copied go straight on (trk_tracer.c checks
 * the index), as the snapshot no longer reads those chunks from the origin.
 *
 * The index (chunk -> data chunk in the store, 0 = not copied) lives in memory
 * and is the authority; the worker writes the pages it changed to the store
 * whenever its queue runs empty, so the store describes itself (README.md has
 * the layout). A snapshot does not survive a reboot.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/kthread.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/ktime.h>
#include <linux/bitmap.h>
#include <linux/rculist.h>
#include <linux/completion.h>
#include <linux/jiffies.h>

#include "drmesh_ioctl.h"
#include "trk.h"

/*
 * The worker's copy buffer: at least one chunk. 1 MiB (BIO_MAX_VECS pages)
 * copies a 1 MiB write's old data with one read and one write.
 */
#define SNAP_BUF_BYTES_MIN (1u << 20)
/* In-memory index limit: 16 Mi chunks (64 GiB at 4 KiB chunks). */
#define SNAP_INDEX_BYTES_MAX (64ul << 20)

/**
 * struct snap_job - a held write in the worker's current batch.
 * @bio: the write.
 * @c: first chunk of its copy window: the chunks it overwrites from the first
 *	to the last one not copied yet (copied ones between are read too); or
 *	ULONG_MAX when every chunk it overwrites is copied.
 * @end: last chunk of the window.
 * @boff: where in the worker's buffer the window's old data is read to.
 */
struct snap_job {
	struct bio *bio;
	unsigned long c;
	unsigned long end;
	size_t boff;
};

/**
 * struct trk_snap - one live snapshot.
 * @t: the origin's tracker; stays attached while the snapshot exists.
 * @store: the COW store, open exclusively.
 * @store_handle: what closing @store needs.
 * @disk: the snapshot block device.
 * @nr: N of /dev/drmesh-snapN (also its minor).
 * @state: enum trk_snap_state.
 * @error: positive errno that invalidated the snapshot.
 * @shift: log2 of the chunk size (the tracking granularity).
 * @index: one __le32 per origin chunk: 0, or 1 + data chunk. Written only by
 *	the worker; read locklessly by the write hook.
 * @index_bytes: size of @index (whole pages).
 * @index_dirty: pages of @index not yet written to the store.
 * @data_chunks: capacity of the store's data area.
 * @data_sect: first sector of the data area.
 * @used: data chunks in use.
 * @created_ns: CLOCK_REALTIME at the snapshot instant.
 * @buf: the worker's I/O buffer (vmalloc, page aligned), @buf_bytes long.
 * @buf_bytes: size of @buf, a multiple of the chunk size.
 * @hdr: header buffer (DRMESH_COW_HEADER_BYTES).
 * @lock: protects @queue; taken from any context.
 * @queue: held writes and snapshot reads, in arrival order.
 * @wq: the worker waits here.
 * @worker: the worker thread.
 * @disk_added: @disk was added (so it must be deleted).
 * @pend: the store write of the last copy, built and not yet submitted
 *	(@pend_sent false) or in flight, or NULL; origin chunks
 *	@pend_chunks[0 .. @pend_n) get data chunks @pend_used on.
 * @pend_sent: @pend was submitted.
 * @pend_chunks: origin chunk numbers of @pend (one buffer's worth).
 * @pend_n: see @pend.
 * @pend_used: see @pend.
 * @pend_done: completion of @pend.
 * @jobs: the held writes of the worker's current batch (one per buffer chunk
 *	at most), @njobs of them, their copy windows in @buf up to @jobs_bytes.
 * @njobs: see @jobs.
 * @jobs_bytes: see @jobs.
 * @reads_left: reads of the batch in flight, plus one while they are sent.
 * @read_err: error of a read of the batch (negative errno), or 0.
 * @reads_done: completed when @reads_left drops to zero.
 * @flushed_at: jiffies of the last index write-out.
 */
struct trk_snap {
	struct trk_dev *t;
	struct block_device *store;
	struct trk_bdev_handle store_handle;
	struct gendisk *disk;
	int nr;
	atomic_t state;
	int error;
	unsigned int shift;
	__le32 *index;
	size_t index_bytes;
	unsigned long *index_dirty;
	u64 data_chunks;
	sector_t data_sect;
	atomic64_t used;
	u64 created_ns;
	void *buf;
	size_t buf_bytes;
	void *hdr;
	spinlock_t lock;
	struct bio_list queue;
	wait_queue_head_t wq;
	struct task_struct *worker;
	bool disk_added;
	struct bio *pend;
	bool pend_sent;
	unsigned long *pend_chunks;
	unsigned long pend_n;
	u64 pend_used;
	struct completion pend_done;
	struct snap_job *jobs;
	unsigned int njobs;
	size_t jobs_bytes;
	atomic_t reads_left;
	int read_err;
	struct completion reads_done;
	unsigned long flushed_at;
};

/* The index goes out to the store once the worker was idle this long. */
#define SNAP_FLUSH_DELAY (HZ / 2)

static int snap_major;
static DEFINE_IDA(snap_ida);

/*
 * A bio over @bytes (sector multiple) of page-aligned @buf at @sector of @bdev.
 * Submitted from this module: a write to an attached disk would not pass the
 * tracker, so callers only write to the store, which is never on an attached
 * disk.
 */
static struct bio *snap_bio(struct block_device *bdev, blk_opf_t opf,
			    sector_t sector, void *buf, size_t bytes)
{
	unsigned int nr = DIV_ROUND_UP(bytes, PAGE_SIZE);
	struct bio *bio = bio_alloc(bdev, nr, opf, GFP_NOIO);
	size_t off;

	bio->bi_iter.bi_sector = sector;
	for (off = 0; off < bytes; off += PAGE_SIZE) {
		unsigned int len = min_t(size_t, PAGE_SIZE, bytes - off);

		if (bio_add_page(bio, trk_page(buf + off), len, 0) != len) {
			bio_put(bio);
			return NULL;
		}
	}
	if (is_vmalloc_addr(buf) && op_is_write(opf))
		flush_kernel_vmap_range(buf, bytes);
	return bio;
}

static void snap_pend_end_io(struct bio *bio)
{
	complete(bio->bi_private);
}

static unsigned long snap_nchunks(const struct trk_snap *s)
{
	return s->t->nbits;
}

static u64 snap_origin_bytes(const struct trk_snap *s)
{
	return (u64)s->t->nr_sects << SECTOR_SHIFT;
}

static int snap_write_header(struct trk_snap *s, u32 state)
{
	struct drmesh_cow_header *h = s->hdr;

	memset(h, 0, sizeof(*h));
	memcpy(h->magic, DRMESH_COW_MAGIC, sizeof(h->magic));
	h->format = cpu_to_le32(DRMESH_COW_FORMAT);
	h->state = cpu_to_le32(state);
	h->chunk_bytes = cpu_to_le32(1u << s->shift);
	h->origin_major = cpu_to_le32(MAJOR(s->t->bdev->bd_dev));
	h->origin_minor = cpu_to_le32(MINOR(s->t->bdev->bd_dev));
	h->index_offset_bytes = cpu_to_le64(DRMESH_COW_HEADER_BYTES);
	h->index_entries = cpu_to_le64(snap_nchunks(s));
	h->data_offset_bytes = cpu_to_le64((u64)s->data_sect << SECTOR_SHIFT);
	h->data_chunks = cpu_to_le64(s->data_chunks);
	h->chunks_used = cpu_to_le64(atomic64_read(&s->used));
	h->origin_bytes = cpu_to_le64(snap_origin_bytes(s));
	h->created_ns = cpu_to_le64(s->created_ns);
	return trk_sync_io(s->store, REQ_OP_WRITE | REQ_SYNC | REQ_FUA, 0, h,
			   DRMESH_COW_HEADER_BYTES);
}

/*
 * Writes the index pages changed since the last call, one write per run of
 * changed pages (a copy changes one entry, and random copies dirty most pages
 * of a small index between two write-outs: one write per page cost a round
 * trip each while a held write waited). Worker only.
 */
static int snap_flush_index(struct trk_snap *s)
{
	unsigned long p, q, pages = s->index_bytes >> PAGE_SHIFT;
	int ret;

	for (p = find_first_bit(s->index_dirty, pages); p < pages;
	     p = find_next_bit(s->index_dirty, pages, q)) {
		q = min(find_next_zero_bit(s->index_dirty, pages, p),
			p + BIO_MAX_VECS);
		bitmap_clear(s->index_dirty, p, q - p);
		ret = trk_sync_io(s->store, REQ_OP_WRITE | REQ_SYNC,
				  (DRMESH_COW_HEADER_BYTES + (p << PAGE_SHIFT)) >>
					  SECTOR_SHIFT,
				  (void *)s->index + (p << PAGE_SHIFT),
				  (q - p) << PAGE_SHIFT);
		if (ret)
			return ret;
	}
	return 0;
}

/*
 * The snapshot can no longer be trusted (store full, I/O error): reads fail
 * from now on, held and later writes go on without copies, and every bit of
 * the live change bitmap is set so the next cycle rescans the whole device.
 */
static void snap_invalidate(struct trk_snap *s, int err)
{
	struct trk_dev *t = s->t;

	if (atomic_read(&s->state) != TRK_SNAP_ACTIVE)
		return;
	s->error = -err;
	atomic_set(&s->state, TRK_SNAP_INVALID);
	rcu_read_lock();
	trk_set_bits(rcu_dereference(t->live), 0, t->nbits - 1);
	rcu_read_unlock();
	pr_warn("drmesh_trk: snapshot %d of %pg invalidated (error %d)\n",
		s->nr, t->bdev, err);
	snap_write_header(s, DRMESH_COW_INVALID);
}

/* Submits the store write of the last copy, if it was not yet. */
static void snap_cow_send(struct trk_snap *s)
{
	if (!s->pend || s->pend_sent)
		return;
	s->pend_sent = true;
	submit_bio(s->pend);
}

/*
 * Waits for the store write of the last copy and only then lets the index
 * point at it (a write to those chunks may skip the queue from then on).
 */
static int snap_cow_finish(struct trk_snap *s)
{
	unsigned long i;
	int ret;

	if (!s->pend)
		return 0;
	snap_cow_send(s);
	wait_for_completion_io(&s->pend_done);
	ret = blk_status_to_errno(s->pend->bi_status);
	bio_put(s->pend);
	s->pend = NULL;
	if (ret)
		return ret;
	for (i = 0; i < s->pend_n; i++) {
		unsigned long c = s->pend_chunks[i];

		WRITE_ONCE(s->index[c], cpu_to_le32(s->pend_used + i + 1));
		set_bit((c * sizeof(__le32)) >> PAGE_SHIFT, s->index_dirty);
	}
	return 0;
}

/*
 * Adds to store write @bio the chunks of window [c, end] (origin chunk c at
 * @boff in the buffer) that are not copied yet, as the pages where the read
 * put them, so nothing is moved in memory (a chunk is whole pages, the buffer
 * page aligned); records them in @pend_chunks from *@k on.
 */
static int snap_pack_window(struct trk_snap *s, struct bio *bio,
			    unsigned long c, unsigned long end, size_t boff,
			    unsigned long *k)
{
	size_t chunk = 1ul << s->shift, off;
	unsigned long i;

	if (is_vmalloc_addr(s->buf))
		flush_kernel_vmap_range(s->buf + boff, (end - c + 1) * chunk);
	for (i = c; i <= end; i++) {
		void *p = s->buf + boff + (i - c) * chunk;

		if (s->index[i])
			continue;
		for (off = 0; off < chunk; off += PAGE_SIZE)
			if (bio_add_page(bio, trk_page(p + off), PAGE_SIZE, 0) !=
			    PAGE_SIZE)
				return -EIO;
		s->pend_chunks[(*k)++] = i;
	}
	return 0;
}

/*
 * Makes @pend the store write of @n chunks to data chunks @used on (REQ_SYNC:
 * a held write waits for it; without it the block layer treats it as
 * background writeback and may throttle it). Not submitted; the caller adds
 * the pages (snap_pack_window()).
 */
static void snap_pend_init(struct trk_snap *s, unsigned long n, u64 used)
{
	s->pend = bio_alloc(s->store, n << (s->shift - PAGE_SHIFT),
			    REQ_OP_WRITE | REQ_SYNC, GFP_NOIO);
	s->pend->bi_iter.bi_sector =
		s->data_sect + (used << (s->shift - SECTOR_SHIFT));
	s->pend->bi_end_io = snap_pend_end_io;
	s->pend->bi_private = &s->pend_done;
	s->pend_sent = false;
	s->pend_n = n;
	s->pend_used = used;
	reinit_completion(&s->pend_done);
}

/* Drops @pend before it was submitted (packing failed). */
static void snap_pend_drop(struct trk_snap *s)
{
	bio_put(s->pend);
	s->pend = NULL;
}

/*
 * Copies chunks [c, last] that are not copied yet into the store, a buffer's
 * worth of origin at a time: one read of the whole window (chunks copied
 * before are read too, which is cheaper than splitting the read around them),
 * then one store write of the chunks to copy, packed, to the next free data
 * chunks. The old data is read synchronously. The last window's store write
 * is built but not submitted: the caller sends the held write to the origin
 * first (it is what its submitter waits for), then the store write
 * (snap_cow_send()), and waits for the store write only before the next
 * queued bio (snap_cow_finish()). The snapshot reads those chunks only after
 * that, and then from the store.
 *
 * Neither a flush nor FUA on the store write, and the origin write does not
 * wait for it: a snapshot lives only while the module is loaded (it does not
 * survive unload or reboot, README.md), so the store needs no durability,
 * only ordering within this run, and that the worker gives: the index points
 * at a copy only once its write completed, and a completed write is seen by
 * every later read of the same device, in the drive's cache or not. The
 * origin write cannot overtake the read of the old data (it is sent after the
 * read completed), and it may land before the store write: the old data is
 * in memory then, and nothing reads these chunks from the origin again. After
 * a crash the store is never read (the next snapshot rewrites it from byte 0).
 *
 * Return: 0, -ENOSPC when the store is full, or an I/O error.
 */
static int snap_cow(struct trk_snap *s, unsigned long c, unsigned long last)
{
	unsigned long bufc = s->buf_bytes >> s->shift;
	u64 origin = snap_origin_bytes(s);

	while (c <= last) {
		unsigned long end, i, n = 0;
		u64 used, off;
		size_t bytes, run;
		int ret;

		if (s->index[c]) {
			c++;
			continue;
		}
		end = min(last, c + bufc - 1);
		/* The buffer is about to be reused. */
		ret = snap_cow_finish(s);
		if (ret)
			return ret;
		for (i = c; i <= end; i++)
			if (!s->index[i])
				n++;
		used = atomic64_read(&s->used);
		if (used + n > s->data_chunks)
			return -ENOSPC;
		off = (u64)c << s->shift;
		run = (size_t)(end - c + 1) << s->shift;
		/* The last chunk may end past the device: zeros there. */
		bytes = min_t(u64, run, origin - off);
		ret = trk_sync_io(s->t->bdev, REQ_OP_READ, off >> SECTOR_SHIFT,
				  s->buf, bytes);
		if (ret)
			return ret;
		if (bytes < run)
			memset(s->buf + bytes, 0, run - bytes);
		snap_pend_init(s, n, used);
		i = 0;
		if (snap_pack_window(s, s->pend, c, end, 0, &i)) {
			snap_pend_drop(s);
			return -EIO;
		}
		atomic64_add(n, &s->used);
		c = end + 1;
	}
	return 0;
}

/* The chunks [*c, *last] of the origin that held write @bio overwrites. */
static bool snap_write_chunks(struct trk_snap *s, struct bio *bio,
			      unsigned long *c, unsigned long *last)
{
	struct trk_dev *t = s->t;
	unsigned int shift = s->shift - SECTOR_SHIFT;
	sector_t first, end, lo, hi;

	first = bio->bi_iter.bi_sector + bio->bi_bdev->bd_start_sect;
	end = first + bio_sectors(bio);
	lo = max(first, t->start_sect);
	hi = min(end, t->start_sect + t->nr_sects);
	if (lo >= hi)
		return false;
	*c = (lo - t->start_sect) >> shift;
	*last = (hi - 1 - t->start_sect) >> shift;
	return true;
}

/*
 * A held write on its own: copy what it overwrites (while the snapshot
 * lives), a buffer's worth at a time, and send it on. For writes whose copy
 * does not fit in the buffer's room (snap_batch_add()).
 */
static void snap_write(struct trk_snap *s, struct bio *bio)
{
	unsigned long c, last;
	int ret;

	if (atomic_read(&s->state) == TRK_SNAP_ACTIVE &&
	    snap_write_chunks(s, bio, &c, &last)) {
		ret = snap_cow(s, c, last);
		if (ret)
			snap_invalidate(s, ret);
	}
	trk_pass_bio(bio);
	snap_cow_send(s);
	/* Before the next queued bio: a read of these chunks must find them. */
	ret = snap_cow_finish(s);
	if (ret)
		snap_invalidate(s, ret);
}

/*
 * Adds held write @bio to the worker's batch when its copy fits: when every
 * chunk it overwrites is copied already, or when its copy window fits in the
 * room left in the buffer and shares no chunk with a window already in the
 * batch (so each chunk is read once, before any write of the batch goes on).
 * Looks only at the index, which only the worker changes; any context.
 *
 * Return: whether @bio joined the batch.
 */
static bool snap_batch_add(struct trk_snap *s, struct bio *bio)
{
	struct snap_job *job = &s->jobs[s->njobs];
	unsigned long c, last, wc = ULONG_MAX, we = 0;
	unsigned int j;
	size_t bytes;

	if (s->njobs == s->buf_bytes >> s->shift)
		return false;
	if (snap_write_chunks(s, bio, &c, &last)) {
		/*
		 * Its window could not be larger than the buffer either; and
		 * this runs under the queue lock, so no long walk of the index
		 * for a large discard.
		 */
		if (last - c >= s->buf_bytes >> s->shift)
			return false;
		for (; c <= last; c++) {
			if (s->index[c])
				continue;
			if (wc == ULONG_MAX)
				wc = c;
			we = c;
		}
	}
	if (wc != ULONG_MAX) {
		bytes = (we - wc + 1) << s->shift;
		if (bytes > s->buf_bytes - s->jobs_bytes)
			return false;
		for (j = 0; j < s->njobs; j++)
			if (s->jobs[j].c != ULONG_MAX &&
			    wc <= s->jobs[j].end && s->jobs[j].c <= we)
				return false;
		job->boff = s->jobs_bytes;
		s->jobs_bytes += bytes;
	}
	job->bio = bio;
	job->c = wc;
	job->end = we;
	s->njobs++;
	return true;
}

static void snap_batch_read_end_io(struct bio *bio)
{
	struct trk_snap *s = bio->bi_private;

	if (bio->bi_status)
		WRITE_ONCE(s->read_err, blk_status_to_errno(bio->bi_status));
	bio_put(bio);
	if (atomic_dec_and_test(&s->reads_left))
		complete(&s->reads_done);
}

/*
 * Reads the old data of every copy window of the batch into the buffer, all
 * reads in flight at once, and waits for them.
 */
static int snap_batch_read(struct trk_snap *s)
{
	u64 origin = snap_origin_bytes(s);
	struct blk_plug plug;
	unsigned int j;
	int ret = 0;

	atomic_set(&s->reads_left, 1);
	s->read_err = 0;
	reinit_completion(&s->reads_done);
	blk_start_plug(&plug);
	for (j = 0; j < s->njobs; j++) {
		struct snap_job *job = &s->jobs[j];
		u64 off = (u64)job->c << s->shift;
		size_t run = (job->end - job->c + 1) << s->shift;
		struct bio *bio;

		if (job->c == ULONG_MAX)
			continue;
		/* The last chunk may end past the device: zeros there. */
		if (origin - off < run)
			memset(s->buf + job->boff + (origin - off), 0,
			       run - (origin - off));
		bio = snap_bio(s->t->bdev, REQ_OP_READ, off >> SECTOR_SHIFT,
			       s->buf + job->boff, min_t(u64, run, origin - off));
		if (!bio) {
			ret = -EIO;
			break;
		}
		bio->bi_end_io = snap_batch_read_end_io;
		bio->bi_private = s;
		atomic_inc(&s->reads_left);
		submit_bio(bio);
	}
	blk_finish_plug(&plug);
	if (!atomic_dec_and_test(&s->reads_left))
		wait_for_completion_io(&s->reads_done);
	if (is_vmalloc_addr(s->buf))
		invalidate_kernel_vmap_range(s->buf, s->jobs_bytes);
	return ret ?: READ_ONCE(s->read_err);
}

/*
 * The worker's batch of held writes: the old data of all their copy windows
 * is read at once, the writes go on together, then one store write takes
 * every chunk copied, packed. With several writes queued (a filesystem's
 * writeback, several writers) the reads overlap instead of each write
 * waiting for its own read in turn; a lone write is copied as before. Every
 * read completes before any write of the batch is sent, and the windows do not
 * overlap, so each chunk's copy is its content at the snapshot instant; the
 * index points at the copies once the store write completed (snap_cow_send()
 * and snap_cow_finish(), whose comment on snap_cow() says why nothing is
 * flushed), before the worker takes the next bio.
 */
static void snap_batch_run(struct trk_snap *s)
{
	unsigned long n = 0, k = 0, i;
	struct blk_plug plug;
	unsigned int j;
	u64 used;
	int ret = 0;

	if (atomic_read(&s->state) != TRK_SNAP_ACTIVE)
		goto pass;
	for (j = 0; j < s->njobs; j++)
		if (s->jobs[j].c != ULONG_MAX)
			for (i = s->jobs[j].c; i <= s->jobs[j].end; i++)
				n += !s->index[i];
	if (!n)
		goto pass;
	used = atomic64_read(&s->used);
	if (used + n > s->data_chunks) {
		ret = -ENOSPC;
		goto pass;
	}
	ret = snap_batch_read(s);
	if (ret)
		goto pass;
	snap_pend_init(s, n, used);
	for (j = 0; j < s->njobs && !ret; j++)
		if (s->jobs[j].c != ULONG_MAX)
			ret = snap_pack_window(s, s->pend, s->jobs[j].c,
					       s->jobs[j].end, s->jobs[j].boff,
					       &k);
	if (ret) {
		snap_pend_drop(s);
		goto pass;
	}
	atomic64_add(n, &s->used);
pass:
	if (ret)
		snap_invalidate(s, ret);
	/* The writes first: their submitters wait for them. */
	blk_start_plug(&plug);
	for (j = 0; j < s->njobs; j++)
		trk_pass_bio(s->jobs[j].bio);
	blk_finish_plug(&plug);
	s->njobs = 0;
	s->jobs_bytes = 0;
	snap_cow_send(s);
	/* Before the next queued bio: a read of these chunks must find them. */
	ret = snap_cow_finish(s);
	if (ret)
		snap_invalidate(s, ret);
}

/* Copies @n bytes from @src into @bio at @it, advancing @it. */
static void snap_copy_to_bio(struct bio *bio, struct bvec_iter *it,
			     const void *src, size_t n)
{
	while (n) {
		struct bio_vec bv = bio_iter_iovec(bio, *it);
		size_t len = min_t(size_t, bv.bv_len, n);

		memcpy_to_page(bv.bv_page, bv.bv_offset, src, len);
		bio_advance_iter_single(bio, it, len);
		src += len;
		n -= len;
	}
}

/* A read of the snapshot device: copied chunks from the store, the rest from the origin. */
static void snap_read(struct trk_snap *s, struct bio *bio)
{
	struct bvec_iter it = bio->bi_iter;
	u64 chunk = 1ull << s->shift, origin = snap_origin_bytes(s);
	u64 pos = (u64)it.bi_sector << SECTOR_SHIFT, end = pos + it.bi_size;
	int ret = 0;

	while (pos < end) {
		u64 wstart = round_down(pos, chunk);
		u64 wend = min_t(u64, wstart + s->buf_bytes, round_up(end, chunk));
		unsigned long c = wstart >> s->shift, last = (wend - 1) >> s->shift;
		size_t n;

		if (atomic_read(&s->state) != TRK_SNAP_ACTIVE) {
			ret = -EIO;
			break;
		}
		/* Fill the buffer with [wstart, wend), in runs of one source. */
		while (c <= last) {
			u32 e = le32_to_cpu(s->index[c]);
			void *dst = s->buf + ((c << s->shift) - wstart);
			unsigned long k = 1;

			if (e) {
				while (c + k <= last &&
				       le32_to_cpu(s->index[c + k]) == e + k)
					k++;
				ret = trk_sync_io(s->store, REQ_OP_READ,
						  s->data_sect + ((u64)(e - 1) <<
								  (s->shift - SECTOR_SHIFT)),
						  dst, k << s->shift);
			} else {
				u64 off = (u64)c << s->shift;

				while (c + k <= last && !s->index[c + k])
					k++;
				ret = trk_sync_io(s->t->bdev, REQ_OP_READ,
						  off >> SECTOR_SHIFT, dst,
						  min_t(u64, k << s->shift, origin - off));
			}
			if (ret)
				goto out;
			c += k;
		}
		n = min(end, wend) - pos;
		snap_copy_to_bio(bio, &it, s->buf + (pos - wstart), n);
		pos += n;
	}
out:
	bio->bi_status = errno_to_blk_status(ret);
	bio_endio(bio);
}

static bool snap_has_work(struct trk_snap *s)
{
	return atomic_read(&s->state) != TRK_SNAP_PENDING &&
	       READ_ONCE(s->queue.head);
}

static bool snap_index_dirty(struct trk_snap *s)
{
	unsigned long pages = s->index_bytes >> PAGE_SHIFT;

	return find_first_bit(s->index_dirty, pages) < pages;
}

static int snap_worker(void *arg)
{
	struct trk_snap *s = arg;

	for (;;) {
		struct bio *bio = NULL;
		long delay;

		spin_lock_irq(&s->lock);
		/* Held writes wait for the snapshot instant. */
		if (atomic_read(&s->state) != TRK_SNAP_PENDING)
			bio = bio_list_pop(&s->queue);
		/*
		 * A held write takes the writes queued right behind it into its
		 * batch, up to the next snapshot read (which must see their
		 * copies) or the first one that does not fit.
		 */
		if (bio && bio->bi_bdev->bd_disk != s->disk &&
		    snap_batch_add(s, bio)) {
			struct bio *next;

			while ((next = s->queue.head) &&
			       next->bi_bdev->bd_disk != s->disk &&
			       snap_batch_add(s, next))
				bio_list_pop(&s->queue);
		}
		spin_unlock_irq(&s->lock);
		if (s->njobs) {
			snap_batch_run(s);
			continue;
		}
		if (bio) {
			if (bio->bi_bdev->bd_disk == s->disk)
				snap_read(s, bio);
			else
				snap_write(s, bio);
			continue;
		}
		if (kthread_should_stop())
			break;
		/*
		 * Idle. The index goes out when the worker is idle, at most
		 * every SNAP_FLUSH_DELAY, not after every copy: one more write
		 * per copy would cost about as much as the copy.
		 */
		delay = MAX_SCHEDULE_TIMEOUT;
		if (atomic_read(&s->state) == TRK_SNAP_ACTIVE && snap_index_dirty(s)) {
			unsigned long due = s->flushed_at + SNAP_FLUSH_DELAY;

			delay = time_before(jiffies, due) ? due - jiffies : 0;
			if (!delay) {
				if (snap_flush_index(s))
					snap_invalidate(s, -EIO);
				s->flushed_at = jiffies;
				continue;
			}
		}
		/* Interruptible only so an idle worker is not a hung task. */
		wait_event_interruptible_timeout(s->wq, kthread_should_stop() ||
							snap_has_work(s), delay);
	}
	return 0;
}

/**
 * trk_snap_queue() - hand a bio to the snapshot's worker.
 * @s: the snapshot; the caller keeps it alive (RCU or its block device).
 * @bio: a held write of the origin or a read of the snapshot device.
 *
 * Any context; never sleeps.
 */
void trk_snap_queue(struct trk_snap *s, struct bio *bio)
{
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	bio_list_add(&s->queue, bio);
	spin_unlock_irqrestore(&s->lock, flags);
	wake_up(&s->wq);
}

/**
 * trk_snap_needs_hold() - must a write wait for the snapshot?
 * @s: the snapshot (caller holds rcu_read_lock()).
 * @lo: first sector written, relative to the origin device.
 * @hi: sector after the last one written.
 *
 * Never sleeps. True while the snapshot is being taken, and when a chunk of
 * the range was not copied yet.
 */
bool trk_snap_needs_hold(struct trk_snap *s, sector_t lo, sector_t hi)
{
	unsigned int shift = s->shift - SECTOR_SHIFT;
	unsigned long c, last;

	switch (atomic_read(&s->state)) {
	case TRK_SNAP_PENDING:
		return true;
	case TRK_SNAP_ACTIVE:
		break;
	default:
		return false;
	}
	last = (hi - 1) >> shift;
	for (c = lo >> shift; c <= last; c++)
		if (!READ_ONCE(s->index[c]))
			return true;
	return false;
}

static void snap_submit_bio(struct bio *bio)
{
	struct trk_snap *s = bio->bi_bdev->bd_disk->private_data;

	switch (bio_op(bio)) {
	case REQ_OP_READ:
		/* del_gendisk() waits for us to return: s is alive. */
		trk_snap_queue(s, bio);
		return;
	case REQ_OP_FLUSH:
		bio_endio(bio);	/* nothing is ever written here */
		return;
	default:
		bio_io_error(bio);	/* read-only */
		return;
	}
}

static const struct block_device_operations snap_fops = {
	.owner = THIS_MODULE,
	.submit_bio = snap_submit_bio,
};

/**
 * trk_snap_create() - prepare a snapshot of @t (not yet started).
 * @t: an attached device; caller holds trk_lock.
 * @cow_path: path of the block device to use as the COW store.
 *
 * Opens and formats the store, starts the worker and adds the read-only
 * snapshot device; the worker serves nothing until trk_snap_activate().
 *
 * Return: the snapshot, or ERR_PTR: -EINVAL (granularity below a page, store
 * on the origin's disk), -EBUSY (store on an attached disk or open elsewhere),
 * -ENOSPC (store too small), -EFBIG (index too large), -ENOMEM, or the
 * error of opening, formatting or adding a device.
 */
struct trk_snap *trk_snap_create(struct trk_dev *t, const char *cow_path)
{
	struct trk_dev *other;
	struct trk_snap *s;
	u64 store_bytes, data_off;
	int ret;

	lockdep_assert_held(&trk_lock);
	if ((1u << t->gran_shift) < PAGE_SIZE)
		return ERR_PTR(-EINVAL);
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return ERR_PTR(-ENOMEM);
	s->t = t;
	s->shift = t->gran_shift;
	s->nr = -1;
	atomic_set(&s->state, TRK_SNAP_PENDING);
	spin_lock_init(&s->lock);
	bio_list_init(&s->queue);
	init_waitqueue_head(&s->wq);
	init_completion(&s->pend_done);
	init_completion(&s->reads_done);
	s->flushed_at = jiffies;
	s->index_bytes = round_up(t->nbits * sizeof(__le32), PAGE_SIZE);
	if (s->index_bytes > SNAP_INDEX_BYTES_MAX) {
		ret = -EFBIG;
		goto out_free;
	}

	s->store = trk_bdev_open_excl_rw(cow_path, s, &s->store_handle);
	if (IS_ERR(s->store)) {
		ret = PTR_ERR(s->store);
		s->store = NULL;
		goto out_free;
	}
	/* Copies written to the origin's disk would need copies themselves. */
	if (s->store->bd_disk == t->disk) {
		ret = -EINVAL;
		goto out_free;
	}
	/* Our store writes bypass tracking: so no tracked disk may hold one. */
	list_for_each_entry(other, &trk_devices, node) {
		if (other->disk == s->store->bd_disk) {
			ret = -EBUSY;
			goto out_free;
		}
	}
	store_bytes = bdev_nr_bytes(s->store);
	data_off = round_up(DRMESH_COW_HEADER_BYTES + s->index_bytes,
			    1ull << s->shift);
	s->data_sect = data_off >> SECTOR_SHIFT;
	s->data_chunks = store_bytes > data_off ?
		min_t(u64, (store_bytes - data_off) >> s->shift, U32_MAX - 1) : 0;
	if (!s->data_chunks) {
		ret = -ENOSPC;
		goto out_free;
	}

	ret = -ENOMEM;
	s->index = kvzalloc(s->index_bytes, GFP_KERNEL);
	s->index_dirty = bitmap_zalloc(s->index_bytes >> PAGE_SHIFT, GFP_KERNEL);
	s->buf_bytes = max_t(size_t, SNAP_BUF_BYTES_MIN, 1ul << s->shift);
	s->buf = vmalloc(s->buf_bytes);
	s->pend_chunks = kcalloc(s->buf_bytes >> s->shift, sizeof(*s->pend_chunks),
				 GFP_KERNEL);
	s->jobs = kcalloc(s->buf_bytes >> s->shift, sizeof(*s->jobs), GFP_KERNEL);
	s->hdr = kzalloc(DRMESH_COW_HEADER_BYTES, GFP_KERNEL);
	if (!s->index || !s->index_dirty || !s->buf || !s->pend_chunks ||
	    !s->jobs || !s->hdr)
		goto out_free;

	/* An all-zero index first, then the header that makes it a store. */
	ret = blkdev_issue_zeroout(s->store,
				   DRMESH_COW_HEADER_BYTES >> SECTOR_SHIFT,
				   s->index_bytes >> SECTOR_SHIFT, GFP_KERNEL, 0);
	if (!ret)
		ret = snap_write_header(s, DRMESH_COW_LIVE);
	if (ret)
		goto out_free;

	ret = ida_alloc_max(&snap_ida, MINORMASK, GFP_KERNEL);
	if (ret < 0)
		goto out_free;
	s->nr = ret;
	s->worker = kthread_run(snap_worker, s, "drmesh-cow%d", s->nr);
	if (IS_ERR(s->worker)) {
		ret = PTR_ERR(s->worker);
		s->worker = NULL;
		goto out_free;
	}

	s->disk = trk_alloc_disk(bdev_logical_block_size(t->bdev));
	if (IS_ERR(s->disk)) {
		ret = PTR_ERR(s->disk);
		s->disk = NULL;
		goto out_free;
	}
	s->disk->major = snap_major;
	s->disk->first_minor = s->nr;
	s->disk->minors = 1;
	/* A partition scan would read before the snapshot exists. */
	s->disk->flags |= GENHD_FL_NO_PART;
	s->disk->fops = &snap_fops;
	s->disk->private_data = s;
	snprintf(s->disk->disk_name, DISK_NAME_LEN, DRMESH_SNAP_NAME "%d", s->nr);
	set_capacity(s->disk, t->nr_sects);
	set_disk_ro(s->disk, true);
	ret = add_disk(s->disk);
	if (ret)
		goto out_free;
	s->disk_added = true;
	return s;

out_free:
	trk_snap_destroy(s, true);
	return ERR_PTR(ret);
}

/**
 * trk_snap_activate() - the snapshot instant: copies start, held writes go on.
 * @s: a snapshot from trk_snap_create(), linked to its tracker, with no
 *	write of the origin in flight.
 */
void trk_snap_activate(struct trk_snap *s)
{
	s->created_ns = ktime_get_real_ns();
	atomic_set(&s->state, TRK_SNAP_ACTIVE);
	wake_up(&s->wq);
	pr_info("drmesh_trk: snapshot %d of %pg (%llu chunks of store)\n",
		s->nr, s->t->bdev, s->data_chunks);
}

/**
 * trk_snap_destroy() - drop a snapshot no write can reach any more.
 * @s: the snapshot, unlinked from its tracker and an RCU grace period past.
 * @aborted: creation failed before the snapshot instant.
 *
 * Lets the worker send on the writes still queued (without copies) and fail
 * queued reads, deletes the snapshot device (later reads of it fail), then
 * writes out the index, marks the store released and closes it.
 */
void trk_snap_destroy(struct trk_snap *s, bool aborted)
{
	bool invalid = atomic_read(&s->state) == TRK_SNAP_INVALID;

	/*
	 * First, so that reads still queued (even ones that waited for an
	 * instant that never came) fail at once rather than hold up the
	 * deletion of the device.
	 */
	atomic_set(&s->state, TRK_SNAP_ABORTED);
	wake_up(&s->wq);
	if (s->disk_added)
		del_gendisk(s->disk);
	if (s->worker)
		kthread_stop(s->worker);
	if (s->store && s->hdr && !aborted) {
		if (!invalid)
			snap_flush_index(s);
		snap_write_header(s, invalid ? DRMESH_COW_INVALID :
				  DRMESH_COW_RELEASED);
	}
	if (s->disk)
		put_disk(s->disk);
	if (s->nr >= 0)
		ida_free(&snap_ida, s->nr);
	if (s->store)
		trk_bdev_close(s->store, &s->store_handle);
	kfree(s->hdr);
	kfree(s->pend_chunks);
	kfree(s->jobs);
	vfree(s->buf);
	bitmap_free(s->index_dirty);
	kvfree(s->index);
	if (!aborted)
		pr_info("drmesh_trk: snapshot %d released\n", s->nr);
	kfree(s);
}

/* Is @disk this snapshot's COW store? (attach refuses it) */
bool trk_snap_uses_disk(struct trk_snap *s, struct gendisk *disk)
{
	return s->store->bd_disk == disk;
}

/* What STATUS reports about a snapshot. */
void trk_snap_status(struct trk_snap *s, u32 *nr, u32 *error, u64 *used,
		     u64 *total, u64 *cow_bytes, u32 *major, u32 *minor)
{
	*nr = s->nr;
	*error = atomic_read(&s->state) == TRK_SNAP_INVALID ? s->error : 0;
	*used = atomic64_read(&s->used);
	*total = s->data_chunks;
	*cow_bytes = s->data_chunks << s->shift;
	*major = snap_major;
	*minor = s->nr;
}

int trk_snap_init(void)
{
	int ret = register_blkdev(0, DRMESH_SNAP_NAME);

	if (ret < 0)
		return ret;
	snap_major = ret;
	return 0;
}

void trk_snap_exit(void)
{
	unregister_blkdev(snap_major, DRMESH_SNAP_NAME);
	ida_destroy(&snap_ida);
}
