// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk control device: /dev/drmesh-ctl and its ioctls (attach, detach,
 * bitmap hand-over, status, snapshot, release). Every argument is checked
 * before any state changes; see drmesh_ioctl.h for the interface.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/blkdev.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/rculist.h>
#include <linux/uaccess.h>
#include <linux/capability.h>
#include <linux/bitmap.h>
#include <linux/build_bug.h>
#include <linux/stddef.h>
#include <linux/random.h>

#include "drmesh_ioctl.h"
#include "trk.h"

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

/* The snapshot of @t (caller holds trk_lock). */
static struct trk_snap *trk_snap_of(struct trk_dev *t)
{
	return rcu_dereference_protected(t->snap, lockdep_is_held(&trk_lock));
}

/* A free slot of trk_slot_inflight (fewer than TRK_MAX_DEVICES attached). */
static unsigned int trk_free_slot(void)
{
	unsigned long used = 0;
	struct trk_dev *t;

	list_for_each_entry(t, &trk_devices, node)
		__set_bit(t->slot, &used);
	return find_first_zero_bit(&used, TRK_MAX_DEVICES);
}

static void trk_free(struct trk_dev *t)
{
	kvfree(rcu_access_pointer(t->live));
	kvfree(t->spare);
	kfree(t);
}

static int trk_dev_t(u32 major, u32 minor, dev_t *dev)
{
	if (major >= (1u << (32 - MINORBITS)) || minor > MINORMASK)
		return -EINVAL;
	*dev = MKDEV(major, minor);
	return 0;
}

/**
 * trk_read_arg() - copy an ioctl's argument in and check what all have.
 * @arg: user pointer to the argument.
 * @buf: where to copy it, @size bytes; a struct that starts with the fields of
 *	struct drmesh_dev (TRK_READ_ARG() checks that at build time).
 * @size: size of the argument struct.
 * @reserved: the struct's reserved field (in @buf), or NULL if it has none.
 * @dev: out: the device dev_major:dev_minor names, or NULL when the caller
 *	finds the device another way (attach by path).
 *
 * Return: 0, -EFAULT, -EPROTO for an unknown version, or -EINVAL for flags
 * or a reserved field that is not 0, or a major or minor out of range.
 */
static int trk_read_arg(void __user *arg, void *buf, size_t size,
			const u32 *reserved, dev_t *dev)
{
	const struct drmesh_dev *head = buf;

	if (copy_from_user(buf, arg, size))
		return -EFAULT;
	if (head->version != DRMESH_IOCTL_VERSION)
		return -EPROTO;
	if (head->flags || (reserved && *reserved))
		return -EINVAL;
	if (!dev)
		return 0;
	return trk_dev_t(head->dev_major, head->dev_minor, dev);
}

/* trk_read_arg() into struct @x, which must start as struct drmesh_dev does. */
#define TRK_READ_ARG(arg, x, reserved, dev)				\
({									\
	BUILD_BUG_ON(offsetof(typeof(x), version) !=			\
		     offsetof(struct drmesh_dev, version) ||		\
		     offsetof(typeof(x), flags) !=			\
		     offsetof(struct drmesh_dev, flags) ||		\
		     offsetof(typeof(x), dev_major) !=			\
		     offsetof(struct drmesh_dev, dev_major) ||		\
		     offsetof(typeof(x), dev_minor) !=			\
		     offsetof(struct drmesh_dev, dev_minor));		\
	trk_read_arg(arg, &(x), sizeof(x), reserved, dev);		\
})

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
	struct trk_bdev_handle h;
	struct block_device *bdev;
	struct trk_dev *t = NULL;
	struct trk_restore r = { .restore = DRMESH_RESTORE_NONE };
	unsigned int lbs, gran;
	dev_t dev;
	size_t bytes;
	int ret;

	/* dev_major:dev_minor only count when there is no path. */
	ret = TRK_READ_ARG(arg, a, &a.reserved, NULL);
	if (ret)
		return ret;
	if (strnlen(a.path, sizeof(a.path)) == sizeof(a.path) ||
	    strnlen(a.state_path, sizeof(a.state_path)) ==
	    sizeof(a.state_path))
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
	bdev = trk_bdev_open_shared_ro(dev, &h);
	if (IS_ERR(bdev)) {
		ret = PTR_ERR(bdev);
		goto out_unlock;
	}
	/*
	 * A COW store's writes bypass tracking (trk_snap.c), and a state
	 * store's would be held by the hook they serve: neither is trackable.
	 */
	list_for_each_entry(t, &trk_devices, node) {
		struct trk_snap *s = trk_snap_of(t);

		if ((s && trk_snap_uses_disk(s, bdev->bd_disk)) ||
		    (t->pst && trk_pst_disk(t->pst) == bdev->bd_disk)) {
			ret = -EBUSY;
			t = NULL;
			goto out_put;
		}
	}
	t = NULL;
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
	t->bdev_handle = h;
	t->disk = bdev->bd_disk;
	t->start_sect = bdev->bd_start_sect;
	t->nr_sects = bdev_nr_sectors(bdev);
	t->gran_shift = ilog2(gran);
	t->nbits = DIV_ROUND_UP_ULL((u64)t->nr_sects << SECTOR_SHIFT, gran);
	if (!t->nbits) {
		ret = -EINVAL;
		goto out_free;
	}
	if (BITS_TO_LONGS(t->nbits) * sizeof(unsigned long) >
	    TRK_BITMAP_BYTES_MAX) {
		ret = -EFBIG;
		goto out_free;
	}
	/* Whole store blocks, so a bitmap slot can be read in directly. */
	bytes = trk_pst_bitmap_bytes(t->nbits);
	RCU_INIT_POINTER(t->live, kvzalloc(bytes, GFP_KERNEL));
	t->spare = kvzalloc(bytes, GFP_KERNEL);
	if (!rcu_access_pointer(t->live) || !t->spare) {
		ret = -ENOMEM;
		goto out_free;
	}
	atomic64_set(&t->writes_seen, 0);
	atomic_set(&t->unwrapped, 0);
	t->slot = trk_free_slot();
	RCU_INIT_POINTER(t->snap, NULL);
	get_random_bytes(t->tracking_id, sizeof(t->tracking_id));
	if (a.state_path[0]) {
		/* May restore the bitmap, hand-over count and tracking id. */
		t->pst = trk_pst_open(t, a.state_path, &r);
		if (IS_ERR(t->pst)) {
			ret = PTR_ERR(t->pst);
			t->pst = NULL;
			goto out_free;
		}
	}

	/* Held until detach: rmmod is refused while any device is attached. */
	__module_get(THIS_MODULE);
	list_add_tail_rcu(&t->node, &trk_devices);
	trk_count++;
	/* Under the lock: once it is dropped, a detach may close bdev. */
	pr_info("drmesh_trk: attached %pg (%llu sectors, %u bytes per bit%s)\n",
		bdev, (unsigned long long)t->nr_sects, gran,
		t->pst ? ", state kept on a store" : "");
	a.handovers = t->handovers;
	memcpy(a.tracking_id, t->tracking_id, sizeof(a.tracking_id));
	mutex_unlock(&trk_lock);

	a.dev_major = MAJOR(dev);
	a.dev_minor = MINOR(dev);
	a.granularity_bytes = gran;
	a.restore = r.restore;
	a.al_extents = r.al_extents;
	a.bits_set = r.bits_set;
	/* Attached either way; a caller that cannot read the answer can STATUS. */
	if (copy_to_user(arg, &a, sizeof(a)))
		return -EFAULT;
	return 0;

out_free:
	trk_free(t);
out_put:
	trk_bdev_close(bdev, &h);
out_unlock:
	mutex_unlock(&trk_lock);
	return ret;
}

/**
 * trk_detach() - stop tracking a device and drop what it held.
 * @arg: user pointer to struct drmesh_dev.
 *
 * Return: 0, -ENOENT when the device is not attached, -EBUSY while it has a
 * snapshot (release it first), or -EINVAL/-EPROTO.
 */
static long trk_detach(void __user *arg)
{
	struct drmesh_dev d;
	struct trk_dev *t;
	dev_t dev;
	int ret;

	ret = TRK_READ_ARG(arg, d, NULL, &dev);
	if (ret)
		return ret;

	mutex_lock(&trk_lock);
	t = trk_find(dev);
	if (!t) {
		mutex_unlock(&trk_lock);
		return -ENOENT;
	}
	if (trk_snap_of(t)) {
		mutex_unlock(&trk_lock);
		return -EBUSY;
	}
	list_del_rcu(&t->node);
	trk_count--;
	mutex_unlock(&trk_lock);

	/* No hook can still be using t once every RCU reader is done. */
	synchronize_rcu();
	if (t->pst)
		trk_pst_close(t->pst);
	pr_info("drmesh_trk: detached %pg\n", t->bdev);
	trk_bdev_close(t->bdev, &t->bdev_handle);
	trk_free(t);
	module_put(THIS_MODULE);
	return 0;
}

/*
 * Makes the spare bitmap live and returns the old live one, once no write can
 * touch it any more: every later write sets bits in the new live bitmap.
 */
static unsigned long *trk_swap(struct trk_dev *t)
{
	unsigned long *old;

	if (t->pst)
		return trk_pst_swap(t->pst);

	old = rcu_dereference_protected(t->live, lockdep_is_held(&trk_lock));
	rcu_assign_pointer(t->live, t->spare);
	/* Every hook that may still hold the old pointer is done after this. */
	synchronize_rcu();
	return old;
}

/*
 * Copies @old (swapped out by trk_swap()) to @buf and makes it the zeroed
 * spare. On a fault its bits go back into the live bitmap (-EFAULT), so
 * nothing is lost.
 */
static int trk_hand_over(struct trk_dev *t, unsigned long *old,
			 void __user *buf, u64 *bits_set)
{
	unsigned long *live;
	int ret = 0;

	live = rcu_dereference_protected(t->live, lockdep_is_held(&trk_lock));
	*bits_set = 0;
	if (copy_to_user(buf, old, trk_bitmap_bytes(t))) {
		trk_merge_bits(live, old, t->nbits);
		ret = -EFAULT;
	} else {
		/*
		 * A write submitted before the swap whose completion we could
		 * not wrap may still land after it: keep its bits (all of
		 * old's, as we do not know which) in the new bitmap too.
		 */
		if (atomic_xchg(&t->unwrapped, 0))
			trk_merge_bits(live, old, t->nbits);
		*bits_set = bitmap_weight(old, t->nbits);
		t->handovers++;
	}
	/* With a state store it stays as it is until the next hand-over. */
	if (!t->pst) {
		bitmap_zero(old, t->nbits);
		t->spare = old;
	}
	return ret;
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
	unsigned long *old;
	size_t bytes;
	dev_t dev;
	int ret;

	ret = TRK_READ_ARG(arg, b, &b.reserved, &dev);
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

	trk_pst_before_handover(t->pst);
	old = trk_swap(t);
	ret = trk_hand_over(t, old, u64_to_user_ptr(b.buf), &b.bits_set);
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

	ret = TRK_READ_ARG(arg, s, &s.reserved, &dev);
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
		memcpy(s.tracking_id, t->tracking_id, sizeof(s.tracking_id));
		if (t->pst) {
			s.state |= DRMESH_STATE_PERSISTENT;
			trk_pst_status(t->pst, &s.al_used, &s.al_slots,
				       &s.persist_error, &s.al_flushes);
			if (s.persist_error)
				s.state |= DRMESH_STATE_PERSIST_FAILED;
		}
		if (trk_snap_of(t)) {
			u64 cow_bytes;
			u32 major, minor;

			trk_snap_status(trk_snap_of(t), &s.snap_index,
					&s.snap_error, &s.cow_chunks_used,
					&s.cow_chunks_total, &cow_bytes,
					&major, &minor);
			s.state |= DRMESH_STATE_SNAPSHOT;
			if (s.snap_error)
				s.state |= DRMESH_STATE_SNAP_INVALID;
		}
	}
	mutex_unlock(&trk_lock);
	if (copy_to_user(arg, &s, sizeof(s)))
		return -EFAULT;
	return 0;
}

/* Unlinks and drops @t's snapshot (caller holds trk_lock). */
static void trk_drop_snap(struct trk_dev *t, bool aborted)
{
	struct trk_snap *s = trk_snap_of(t);

	rcu_assign_pointer(t->snap, NULL);
	/* No write hook can still be queueing to s after this. */
	synchronize_rcu();
	trk_snap_destroy(s, aborted);
}

/**
 * trk_snapshot() - hand over the bitmap and start a snapshot at one instant.
 * @arg: user pointer to struct drmesh_snapshot.
 *
 * Freezes the filesystem on the device (if one is mounted) so it is clean in
 * the snapshot, holds new writes of the device, waits for the ones in flight,
 * swaps the change bitmap and starts the snapshot; then lets the held writes
 * go on (each after its copy) and thaws.
 *
 * Return: 0; -ENOENT not attached; -EBUSY the disk already has a snapshot,
 * or the store is in use; -ENOSPC buffer too small (bitmap_bytes says what is
 * needed) or store too small; -EFAULT the bitmap could not be copied (no
 * snapshot, bits kept); -EINTR killed while waiting for writes in flight (no
 * snapshot, nothing handed over); -EINVAL/-EPROTO/-EFBIG; or the error of
 * opening the store, freezing or adding the device.
 */
static long trk_snapshot(void __user *arg)
{
	struct drmesh_snapshot a;
	struct trk_dev *t, *other;
	struct trk_snap *s;
	unsigned long *old;
	u64 cow_used, cow_total;
	u32 snap_error;
	dev_t dev;
	int ret;

	ret = TRK_READ_ARG(arg, a, NULL, &dev);
	if (ret)
		return ret;
	if (!a.cow_path[0] ||
	    strnlen(a.cow_path, sizeof(a.cow_path)) == sizeof(a.cow_path))
		return -EINVAL;

	mutex_lock(&trk_lock);
	t = trk_find(dev);
	if (!t) {
		ret = -ENOENT;
		goto out_unlock;
	}
	/* One snapshot per disk: a worker's writes bypass other snapshots. */
	list_for_each_entry(other, &trk_devices, node) {
		if (other->disk == t->disk && trk_snap_of(other)) {
			ret = -EBUSY;
			goto out_unlock;
		}
	}
	a.bitmap_bytes = trk_bitmap_bytes(t);
	a.device_bytes = (u64)t->nr_sects << SECTOR_SHIFT;
	a.granularity_bytes = 1u << t->gran_shift;
	a.bits_set = 0;
	if (a.buf_bytes < a.bitmap_bytes) {
		ret = -ENOSPC;
		goto out_answer;
	}
	/* Before writes are held: it writes the whole bitmap to the store. */
	trk_pst_before_handover(t->pst);
	s = trk_snap_create(t, a.cow_path);
	if (IS_ERR(s)) {
		ret = PTR_ERR(s);
		goto out_unlock;
	}
	/*
	 * The filesystem writes back and marks itself clean; it stays frozen
	 * until the snapshot exists. Raw writers are not frozen: they are held.
	 */
	ret = trk_bdev_freeze(t->bdev);
	if (ret) {
		trk_snap_destroy(s, true);
		goto out_unlock;
	}
	rcu_assign_pointer(t->snap, s);
	/* Every write hook from here on sees the snapshot and holds writes. */
	synchronize_rcu();
	/* Writes sent on before that: the snapshot must hold their data. */
	ret = wait_event_killable(trk_drain_wait,
				  !atomic_read(&trk_slot_inflight[t->slot]));
	if (ret) {
		trk_drop_snap(t, true);
		trk_bdev_thaw(t->bdev);
		goto out_unlock;
	}
	/* The snapshot instant: bitmap and snapshot start together. */
	old = trk_swap(t);
	trk_snap_activate(s);
	trk_bdev_thaw(t->bdev);

	ret = trk_hand_over(t, old, u64_to_user_ptr(a.buf), &a.bits_set);
	if (ret) {
		/* The caller cannot use a snapshot without its bitmap. */
		trk_drop_snap(t, false);
		goto out_unlock;
	}
	trk_snap_status(s, &a.snap_index, &snap_error, &cow_used, &cow_total,
			&a.cow_bytes, &a.snap_major, &a.snap_minor);
out_answer:
	if (copy_to_user(arg, &a, sizeof(a)) && !ret)
		ret = -EFAULT;	/* the snapshot exists: STATUS tells */
out_unlock:
	mutex_unlock(&trk_lock);
	return ret;
}

/**
 * trk_release() - drop a device's snapshot.
 * @arg: user pointer to struct drmesh_dev.
 *
 * Return: 0, -ENOENT when the device is not attached or has no snapshot, or
 * -EINVAL/-EPROTO.
 */
static long trk_release(void __user *arg)
{
	struct drmesh_dev d;
	struct trk_dev *t;
	dev_t dev;
	int ret;

	ret = TRK_READ_ARG(arg, d, NULL, &dev);
	if (ret)
		return ret;
	mutex_lock(&trk_lock);
	t = trk_find(dev);
	if (!t || !trk_snap_of(t))
		ret = -ENOENT;
	else
		trk_drop_snap(t, false);
	mutex_unlock(&trk_lock);
	return ret;
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
	case DRMESH_IOC_SNAPSHOT:
		return trk_snapshot(uarg);
	case DRMESH_IOC_RELEASE:
		return trk_release(uarg);
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

int trk_ctl_init(void)
{
	return misc_register(&trk_misc);
}

void trk_ctl_exit(void)
{
	misc_deregister(&trk_misc);
}
