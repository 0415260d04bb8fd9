// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk: block change tracking for drmesh.
 *
 * Attaches to block devices that are in use (mounted, live writes) and keeps a
 * bitmap of the ranges written since the last hand-over, at a fixed granularity.
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
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/kprobes.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/rculist.h>
#include <linux/uaccess.h>
#include <linux/capability.h>
#include <linux/bitmap.h>
#include <linux/atomic.h>
#include <linux/wait.h>

#include "drmesh_ioctl.h"

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

static DEFINE_MUTEX(trk_lock);
static LIST_HEAD(trk_devices);
static unsigned int trk_count;
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

static size_t trk_bitmap_bytes(const struct trk_dev *t)
{
	return DIV_ROUND_UP(t->nbits, 8);
}

static struct trk_dev *trk_find(dev_t dev)
{
	struct trk_dev *t;

	lockdep_assert_held(&trk_lock);
	list_for_each_entry(t, &trk_devices, node)
		if (t->bdev->bd_dev == dev)
			return t;
	return NULL;
}

static void trk_free(struct trk_dev *t)
{
	kvfree(rcu_access_pointer(t->live));
	kvfree(t->spare);
	kfree(t);
}

/* Checks the fields every parameter struct starts with. */
static int trk_check_header(u32 version, u32 flags)
{
	if (version != DRMESH_IOCTL_VERSION)
		return -EPROTO;
	if (flags)
		return -EINVAL;
	return 0;
}

static int trk_dev_t(u32 major, u32 minor, dev_t *dev)
{
	if (major >= (1u << (32 - MINORBITS)) || minor > MINORMASK)
		return -EINVAL;
	*dev = MKDEV(major, minor);
	return 0;
}

/**
 * trk_attach() - start tracking a device.
 * @arg: user pointer to struct drmesh_attach.
 *
 * Return: 0, or -EBUSY when the device is already attached, -ENOSPC when
 * TRK_MAX_DEVICES are, -EFBIG when the bitmaps would be too large for the
 * granularity, -EINVAL/-EPROTO for bad arguments, or the open error.
 */
static long trk_attach(void __user *arg)
{
	struct drmesh_attach a;
	struct block_device *bdev;
	struct trk_dev *t = NULL;
	unsigned int lbs, gran;
	dev_t dev;
	size_t bytes;
	int ret;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	ret = trk_check_header(a.version, a.flags);
	if (ret)
		return ret;
	if (a.reserved)
		return -EINVAL;
	if (strnlen(a.path, sizeof(a.path)) == sizeof(a.path))
		return -EINVAL;
	gran = a.granularity_bytes;
	if (gran && (!is_power_of_2(gran) || gran < SECTOR_SIZE ||
		     gran > DRMESH_GRANULARITY_BYTES_MAX))
		return -EINVAL;
	if (a.path[0]) {
		ret = lookup_bdev(a.path, &dev);
		if (ret)
			return ret;
	} else {
		ret = trk_dev_t(a.dev_major, a.dev_minor, &dev);
		if (ret)
			return ret;
	}

	mutex_lock(&trk_lock);
	if (trk_find(dev)) {
		ret = -EBUSY;
		goto out_unlock;
	}
	if (trk_count >= TRK_MAX_DEVICES) {
		ret = -ENOSPC;
		goto out_unlock;
	}
	/* Shared read-only open: allowed while the device is mounted. */
	bdev = blkdev_get_by_dev(dev, FMODE_READ, NULL);
	if (IS_ERR(bdev)) {
		ret = PTR_ERR(bdev);
		goto out_unlock;
	}
	lbs = bdev_logical_block_size(bdev);
	if (!gran)
		gran = max_t(unsigned int, 4096, lbs);
	if (gran < lbs) {
		ret = -EINVAL;
		goto out_put;
	}
	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (!t) {
		ret = -ENOMEM;
		goto out_put;
	}
	t->bdev = bdev;
	t->disk = bdev->bd_disk;
	t->start_sect = bdev->bd_start_sect;
	t->nr_sects = bdev_nr_sectors(bdev);
	t->gran_shift = ilog2(gran);
	t->nbits = DIV_ROUND_UP_ULL((u64)t->nr_sects << SECTOR_SHIFT, gran);
	if (!t->nbits) {
		ret = -EINVAL;
		goto out_free;
	}
	bytes = BITS_TO_LONGS(t->nbits) * sizeof(unsigned long);
	if (bytes > TRK_BITMAP_BYTES_MAX) {
		ret = -EFBIG;
		goto out_free;
	}
	RCU_INIT_POINTER(t->live, kvzalloc(bytes, GFP_KERNEL));
	t->spare = kvzalloc(bytes, GFP_KERNEL);
	if (!rcu_access_pointer(t->live) || !t->spare) {
		ret = -ENOMEM;
		goto out_free;
	}
	atomic64_set(&t->writes_seen, 0);
	atomic_set(&t->unwrapped, 0);

	/* Held until detach: rmmod is refused while any device is attached. */
	__module_get(THIS_MODULE);
	list_add_tail_rcu(&t->node, &trk_devices);
	trk_count++;
	mutex_unlock(&trk_lock);

	pr_info("drmesh_trk: attached %pg (%llu sectors, %u bytes per bit)\n",
		bdev, (unsigned long long)t->nr_sects, gran);
	a.dev_major = MAJOR(dev);
	a.dev_minor = MINOR(dev);
	a.granularity_bytes = gran;
	/* Attached either way; a caller that cannot read the answer can STATUS. */
	if (copy_to_user(arg, &a, sizeof(a)))
		return -EFAULT;
	return 0;

out_free:
	trk_free(t);
out_put:
	blkdev_put(bdev, FMODE_READ);
out_unlock:
	mutex_unlock(&trk_lock);
	return ret;
}

/**
 * trk_detach() - stop tracking a device and drop what it held.
 * @arg: user pointer to struct drmesh_dev.
 *
 * Return: 0, -ENOENT when the device is not attached, or -EINVAL/-EPROTO.
 */
static long trk_detach(void __user *arg)
{
	struct drmesh_dev d;
	struct trk_dev *t;
	dev_t dev;
	int ret;

	if (copy_from_user(&d, arg, sizeof(d)))
		return -EFAULT;
	ret = trk_check_header(d.version, d.flags);
	if (ret)
		return ret;
	ret = trk_dev_t(d.dev_major, d.dev_minor, &dev);
	if (ret)
		return ret;

	mutex_lock(&trk_lock);
	t = trk_find(dev);
	if (!t) {
		mutex_unlock(&trk_lock);
		return -ENOENT;
	}
	list_del_rcu(&t->node);
	trk_count--;
	mutex_unlock(&trk_lock);

	/* No probe can still be using t once every RCU reader is done. */
	synchronize_rcu();
	pr_info("drmesh_trk: detached %pg\n", t->bdev);
	blkdev_put(t->bdev, FMODE_READ);
	trk_free(t);
	module_put(THIS_MODULE);
	return 0;
}

/* ORs @src into the live bitmap with atomic word operations. */
static void trk_merge_back(unsigned long *live, const unsigned long *src,
			   unsigned long nbits)
{
	unsigned long i;

	for (i = 0; i < BITS_TO_LONGS(nbits); i++)
		if (src[i])
			atomic_long_or(src[i], (atomic_long_t *)&live[i]);
}

/**
 * trk_get_bitmap() - hand over the bitmap and start a new one.
 * @arg: user pointer to struct drmesh_bitmap.
 *
 * Return: 0, -ENOSPC when the buffer is too small (bitmap_bytes says what is
 * needed; nothing handed over), -ENOENT when not attached, -EFAULT when the
 * copy faults (bits merged back), or -EINVAL/-EPROTO.
 */
static long trk_get_bitmap(void __user *arg)
{
	struct drmesh_bitmap b;
	struct trk_dev *t;
	unsigned long *old, *live;
	size_t bytes;
	dev_t dev;
	int ret;

	if (copy_from_user(&b, arg, sizeof(b)))
		return -EFAULT;
	ret = trk_check_header(b.version, b.flags);
	if (ret)
		return ret;
	if (b.reserved)
		return -EINVAL;
	ret = trk_dev_t(b.dev_major, b.dev_minor, &dev);
	if (ret)
		return ret;

	mutex_lock(&trk_lock);
	t = trk_find(dev);
	if (!t) {
		ret = -ENOENT;
		goto out_unlock;
	}
	bytes = trk_bitmap_bytes(t);
	b.bitmap_bytes = bytes;
	b.device_bytes = (u64)t->nr_sects << SECTOR_SHIFT;
	b.granularity_bytes = 1u << t->gran_shift;
	b.bits_set = 0;
	if (b.buf_bytes < bytes) {
		ret = -ENOSPC;
		goto out_answer;
	}

	/*
	 * Swap, then wait for every probe that may still hold the old pointer:
	 * from here on no write can touch `old`, and every later write sets
	 * bits in the new live bitmap.
	 */
	old = rcu_dereference_protected(t->live, lockdep_is_held(&trk_lock));
	live = t->spare;
	rcu_assign_pointer(t->live, live);
	synchronize_rcu();

	if (copy_to_user(u64_to_user_ptr(b.buf), old, bytes)) {
		trk_merge_back(live, old, t->nbits);
		ret = -EFAULT;
	} else {
		/*
		 * A write submitted before the swap whose completion we could
		 * not wrap may still land after it: keep its bits (all of
		 * old's, as we do not know which) in the new bitmap too.
		 */
		if (atomic_xchg(&t->unwrapped, 0))
			trk_merge_back(live, old, t->nbits);
		b.bits_set = bitmap_weight(old, t->nbits);
		t->handovers++;
	}
	bitmap_zero(old, t->nbits);
	t->spare = old;
	if (ret)
		goto out_unlock;
out_answer:
	if (copy_to_user(arg, &b, sizeof(b)) && !ret)
		ret = -EFAULT;
out_unlock:
	mutex_unlock(&trk_lock);
	return ret;
}

/**
 * trk_status() - report one device's state.
 * @arg: user pointer to struct drmesh_status.
 *
 * Return: 0 (state 0 when the device is not attached), or -EINVAL/-EPROTO.
 */
static long trk_status(void __user *arg)
{
	struct drmesh_status s;
	struct trk_dev *t;
	dev_t dev;
	int ret;

	if (copy_from_user(&s, arg, sizeof(s)))
		return -EFAULT;
	ret = trk_check_header(s.version, s.flags);
	if (ret)
		return ret;
	if (s.reserved)
		return -EINVAL;
	ret = trk_dev_t(s.dev_major, s.dev_minor, &dev);
	if (ret)
		return ret;

	s = (struct drmesh_status){
		.version = s.version,
		.dev_major = s.dev_major,
		.dev_minor = s.dev_minor,
	};
	mutex_lock(&trk_lock);
	s.attached_count = trk_count;
	t = trk_find(dev);
	if (t) {
		unsigned long *live;

		live = rcu_dereference_protected(t->live,
						 lockdep_is_held(&trk_lock));
		s.state = DRMESH_STATE_ATTACHED;
		if (!disk_live(t->disk))
			s.state |= DRMESH_STATE_DEVICE_GONE;
		s.granularity_bytes = 1u << t->gran_shift;
		s.device_bytes = (u64)t->nr_sects << SECTOR_SHIFT;
		s.bitmap_bytes = trk_bitmap_bytes(t);
		s.bits_set = bitmap_weight(live, t->nbits);
		s.writes_seen = atomic64_read(&t->writes_seen);
		s.handovers = t->handovers;
	}
	mutex_unlock(&trk_lock);
	if (copy_to_user(arg, &s, sizeof(s)))
		return -EFAULT;
	return 0;
}

static long trk_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	switch (cmd) {
	case DRMESH_IOC_ATTACH:
		return trk_attach(uarg);
	case DRMESH_IOC_DETACH:
		return trk_detach(uarg);
	case DRMESH_IOC_GET_BITMAP:
		return trk_get_bitmap(uarg);
	case DRMESH_IOC_STATUS:
		return trk_status(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations trk_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = trk_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice trk_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = DRMESH_CTL_NAME,
	.fops = &trk_fops,
	.mode = 0600,
};

static int __init trk_init(void)
{
	int ret;

	trk_io_cache = KMEM_CACHE(trk_io, 0);
	if (!trk_io_cache)
		return -ENOMEM;
	ret = register_kprobe(&trk_probe);
	if (ret) {
		pr_err("drmesh_trk: cannot probe submit_bio_noacct: %d\n", ret);
		goto out_cache;
	}
	ret = misc_register(&trk_misc);
	if (ret)
		goto out_probe;
	pr_info("drmesh_trk: loaded, interface version %d\n",
		DRMESH_IOCTL_VERSION);
	return 0;

out_probe:
	unregister_kprobe(&trk_probe);
out_cache:
	kmem_cache_destroy(trk_io_cache);
	return ret;
}

static void __exit trk_exit(void)
{
	/* The module reference taken per attach means nothing is attached. */
	WARN_ON(!list_empty(&trk_devices));
	misc_deregister(&trk_misc);
	unregister_kprobe(&trk_probe);
	/* Writes wrapped before the last detach may still be in flight. */
	wait_event(trk_inflight_wait, atomic_read(&trk_inflight) == 0);
	/* ...and their trk_end_io() may still be returning. */
	synchronize_rcu();
	kmem_cache_destroy(trk_io_cache);
	pr_info("drmesh_trk: unloaded\n");
}

module_init(trk_init);
module_exit(trk_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("drmesh block change tracking");
MODULE_AUTHOR("drmesh");
