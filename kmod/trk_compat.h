/* SPDX-License-Identifier: GPL-2.0 */
/*
 * drmesh_trk: every difference between the kernel versions the module builds
 * against, and nothing else. The rest of the module calls only the trk_*
 * helpers below for these operations, never the kernel calls they wrap.
 *
 * Two API families are implemented:
 *   - 6.1 to 6.4 (tested: Debian 12's 6.1): blkdev_get_by_*() with an fmode_t,
 *     freeze_bdev(), blk_alloc_disk(node), ftrace_instruction_pointer_set()
 *     (renamed in 6.2);
 *   - 6.9 and later (tested: Debian's 6.12): block devices opened as a
 *     struct file (bdev_file_open_by_*(), released with bdev_fput(); 6.9),
 *     bdev_freeze() (6.8), queue limits given to blk_alloc_disk() (6.9).
 * Between them (6.5 to 6.8) the open call took two other forms (a holder-ops
 * argument and blk_mode_t in 6.5, struct bdev_handle in 6.7/6.8, where
 * blkdev_get_by_*() went away); no kernel of those is packaged where the
 * module is built and tested, so the build refuses them rather than guess.
 *
 * Version checks rather than feature probes: these are mainline kernels whose
 * API does not move within a stable series. A distribution kernel that
 * backports one of these changes needs a probe here.
 */
#ifndef DRMESH_TRK_COMPAT_H
#define DRMESH_TRK_COMPAT_H

#include <linux/version.h>
#include <linux/blkdev.h>
#include <linux/fs.h>
#include <linux/ftrace.h>
#include <linux/err.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0)
#error "drmesh_trk needs Linux 6.1 or later"
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0) && \
	LINUX_VERSION_CODE < KERNEL_VERSION(6, 9, 0)
#error "drmesh_trk: Linux 6.5 to 6.8 are not supported (see trk_compat.h)"
#endif

#define TRK_BDEV_FILE (LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0))

/*
 * The redirect in trk_tracer.c rewrites the traced function's instruction
 * pointer; where the architecture cannot, the kernel's fallback does nothing
 * and the hook would silently miss every write.
 */
#ifndef CONFIG_DYNAMIC_FTRACE_WITH_REGS
#error "drmesh_trk needs CONFIG_DYNAMIC_FTRACE_WITH_REGS"
#endif

/**
 * struct trk_bdev_handle - what closing an open block device needs.
 * @file: 6.9+: the open file that holds the device.
 * @mode: 6.1: the mode it was opened with.
 */
struct trk_bdev_handle {
#if TRK_BDEV_FILE
	struct file *file;
#else
	fmode_t mode;
#endif
};

/**
 * trk_bdev_open_shared_ro() - open a block device read-only, not exclusively
 *	(allowed while it is mounted).
 * @dev: its number.
 * @h: filled in for trk_bdev_close().
 *
 * Return: the device, or ERR_PTR.
 */
static inline struct block_device *
trk_bdev_open_shared_ro(dev_t dev, struct trk_bdev_handle *h)
{
#if TRK_BDEV_FILE
	struct file *f = bdev_file_open_by_dev(dev, BLK_OPEN_READ, NULL, NULL);

	if (IS_ERR(f))
		return ERR_CAST(f);
	h->file = f;
	return file_bdev(f);
#else
	h->mode = FMODE_READ;
	return blkdev_get_by_dev(dev, h->mode, NULL);
#endif
}

/**
 * trk_bdev_open_excl_rw() - open a block device by path for reading and
 *	writing, exclusively (fails with -EBUSY while mounted or claimed).
 * @path: its path.
 * @holder: the claim's owner (non-NULL).
 * @h: filled in for trk_bdev_close().
 *
 * Return: the device, or ERR_PTR.
 */
static inline struct block_device *
trk_bdev_open_excl_rw(const char *path, void *holder,
		      struct trk_bdev_handle *h)
{
#if TRK_BDEV_FILE
	/* A holder makes the open exclusive. */
	struct file *f = bdev_file_open_by_path(path,
						BLK_OPEN_READ | BLK_OPEN_WRITE,
						holder, NULL);

	if (IS_ERR(f))
		return ERR_CAST(f);
	h->file = f;
	return file_bdev(f);
#else
	h->mode = FMODE_READ | FMODE_WRITE | FMODE_EXCL;
	return blkdev_get_by_path(path, h->mode, holder);
#endif
}

/**
 * trk_bdev_close() - close a device opened by one of the above.
 * @bdev: the device.
 * @h: its handle.
 *
 * An exclusive claim is dropped before this returns (6.9+: bdev_fput()).
 */
static inline void trk_bdev_close(struct block_device *bdev,
				  struct trk_bdev_handle *h)
{
#if TRK_BDEV_FILE
	bdev_fput(h->file);
#else
	blkdev_put(bdev, h->mode);
#endif
}

/* Freezes the filesystem on @bdev, if any (returns 0 or -errno). */
static inline int trk_bdev_freeze(struct block_device *bdev)
{
#if TRK_BDEV_FILE
	return bdev_freeze(bdev);
#else
	return freeze_bdev(bdev);
#endif
}

static inline int trk_bdev_thaw(struct block_device *bdev)
{
#if TRK_BDEV_FILE
	return bdev_thaw(bdev);
#else
	return thaw_bdev(bdev);
#endif
}

/**
 * trk_alloc_disk() - allocate a bio-based disk.
 * @logical_block_bytes: its logical block size.
 *
 * Return: the disk, or ERR_PTR (never NULL).
 */
static inline struct gendisk *trk_alloc_disk(unsigned int logical_block_bytes)
{
#if TRK_BDEV_FILE
	struct queue_limits lim = {
		.logical_block_size = logical_block_bytes,
	};

	return blk_alloc_disk(&lim, NUMA_NO_NODE);
#else
	struct gendisk *disk = blk_alloc_disk(NUMA_NO_NODE);

	if (!disk)
		return ERR_PTR(-ENOMEM);
	blk_queue_logical_block_size(disk->queue, logical_block_bytes);
	return disk;
#endif
}

/* From an ftrace callback: the traced function continues at @ip instead. */
static inline void trk_ftrace_redirect(struct ftrace_regs *fregs,
				       unsigned long ip)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	ftrace_regs_set_instruction_pointer(fregs, ip);
#else
	ftrace_instruction_pointer_set(fregs, ip);
#endif
}

#endif /* DRMESH_TRK_COMPAT_H */
