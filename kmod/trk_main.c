// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh_trk: block change tracking for drmesh.
 *
 * Attaches to block devices that are in use (mounted, live writes) and keeps a
 * bitmap of the ranges written since the last hand-over, at a fixed
 * granularity, and takes copy-on-write snapshots of them. trk_tracer.c sees
 * the writes, trk_snap.c keeps snapshots, trk_persist.c keeps the tracking
 * across reboots, trk_ctl.c is the control device;
 * README.md explains the design.
 */
#include <linux/module.h>

#include "drmesh_ioctl.h"
#include "trk.h"

static int __init trk_init(void)
{
	int ret;

	ret = trk_snap_init();
	if (ret)
		return ret;
	ret = trk_pst_init();
	if (ret)
		goto out_snap;
	ret = trk_tracer_init();
	if (ret)
		goto out_pst;
	ret = trk_ctl_init();
	if (ret)
		goto out_tracer;
	pr_info("drmesh_trk: loaded, interface version %d\n",
		DRMESH_IOCTL_VERSION);
	return 0;

out_tracer:
	trk_tracer_exit();
out_pst:
	trk_pst_exit();
out_snap:
	trk_snap_exit();
	return ret;
}

static void __exit trk_exit(void)
{
	trk_ctl_exit();
	trk_tracer_exit();
	trk_pst_exit();
	trk_snap_exit();
	pr_info("drmesh_trk: unloaded\n");
}

module_init(trk_init);
module_exit(trk_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("drmesh block change tracking and snapshots");
MODULE_AUTHOR("drmesh");
