// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh-kmodctl: a small test client of /dev/drmesh-ctl, built statically so
 * it runs in a busybox guest.
 *
 *   attach PATH [GRANULARITY]      prints MAJOR:MINOR GRANULARITY
 *   detach MAJOR:MINOR
 *   status MAJOR:MINOR             prints the status fields
 *   bitmap MAJOR:MINOR OUT         hands the bitmap over into file OUT
 *   randwrite FILE COUNT SEED      random O_DIRECT writes into an existing,
 *                                  allocated FILE or a block device; prints
 *                                  the device byte ranges written ("START
 *                                  LENGTH" lines)
 *   or OUT IN...                   OUT = bitwise OR of bitmap files IN...
 *   syncwrite PATH OFFSET LENGTH   one O_DIRECT|O_DSYNC write (FUA, or a
 *                                  write and a flush where FUA is missing)
 *   zeroout DEVICE OFFSET LENGTH   BLKZEROOUT (write-zeroes where supported)
 *   map FILE OFFSET LENGTH         prints the device byte ranges of a file range
 *   check BITMAP GRANULARITY RANGES
 *                                  every range's bits must be set; prints the
 *                                  ratio of set bits to written bits; with
 *                                  a 4th argument "exact", no other bit may
 *                                  be set
 *   errors PATH                    bad arguments fail with the documented errno
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>
#include <linux/fiemap.h>

#include "drmesh_ioctl.h"

static int ctl_fd = -1;

static int ctl(void)
{
	if (ctl_fd < 0) {
		ctl_fd = open("/dev/" DRMESH_CTL_NAME, O_RDWR | O_CLOEXEC);
		if (ctl_fd < 0) {
			perror("open /dev/" DRMESH_CTL_NAME);
			exit(2);
		}
	}
	return ctl_fd;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void parse_dev(const char *s, __u32 *major, __u32 *minor)
{
	if (sscanf(s, "%u:%u", major, minor) != 2) {
		fprintf(stderr, "bad device %s (want MAJOR:MINOR)\n", s);
		exit(2);
	}
}

static int cmd_attach(const char *path, unsigned int gran)
{
	struct drmesh_attach a = { .version = DRMESH_IOCTL_VERSION,
				   .granularity_bytes = gran };

	snprintf(a.path, sizeof(a.path), "%s", path);
	if (ioctl(ctl(), DRMESH_IOC_ATTACH, &a))
		die("attach");
	printf("%u:%u %u\n", a.dev_major, a.dev_minor, a.granularity_bytes);
	return 0;
}

static int cmd_detach(const char *dev)
{
	struct drmesh_dev d = { .version = DRMESH_IOCTL_VERSION };

	parse_dev(dev, &d.dev_major, &d.dev_minor);
	if (ioctl(ctl(), DRMESH_IOC_DETACH, &d))
		die("detach");
	return 0;
}

static int get_status(const char *dev, struct drmesh_status *s)
{
	memset(s, 0, sizeof(*s));
	s->version = DRMESH_IOCTL_VERSION;
	parse_dev(dev, &s->dev_major, &s->dev_minor);
	return ioctl(ctl(), DRMESH_IOC_STATUS, s);
}

static int cmd_status(const char *dev)
{
	struct drmesh_status s;

	if (get_status(dev, &s))
		die("status");
	printf("state=%u granularity_bytes=%u device_bytes=%llu bitmap_bytes=%llu "
	       "bits_set=%llu writes_seen=%llu handovers=%llu attached_count=%u\n",
	       s.state, s.granularity_bytes, (unsigned long long)s.device_bytes,
	       (unsigned long long)s.bitmap_bytes, (unsigned long long)s.bits_set,
	       (unsigned long long)s.writes_seen, (unsigned long long)s.handovers,
	       s.attached_count);
	return 0;
}

static int cmd_bitmap(const char *dev, const char *out)
{
	struct drmesh_status s;
	struct drmesh_bitmap b = { .version = DRMESH_IOCTL_VERSION };
	unsigned char *buf;
	FILE *f;

	if (get_status(dev, &s))
		die("status");
	buf = malloc(s.bitmap_bytes ? s.bitmap_bytes : 1);
	if (!buf)
		die("malloc");
	parse_dev(dev, &b.dev_major, &b.dev_minor);
	b.buf = (uintptr_t)buf;
	b.buf_bytes = s.bitmap_bytes;
	if (ioctl(ctl(), DRMESH_IOC_GET_BITMAP, &b))
		die("get bitmap");
	f = fopen(out, "w");
	if (!f || fwrite(buf, 1, b.bitmap_bytes, f) != b.bitmap_bytes || fclose(f))
		die(out);
	printf("bits_set=%llu bitmap_bytes=%llu granularity_bytes=%u\n",
	       (unsigned long long)b.bits_set,
	       (unsigned long long)b.bitmap_bytes, b.granularity_bytes);
	free(buf);
	return 0;
}

/* Prints the device byte ranges behind [off, off + len) of fd's file. */
static void print_map(int fd, uint64_t off, uint64_t len)
{
	enum { N = 64 };
	struct fiemap *fm = calloc(1, sizeof(*fm) + N * sizeof(struct fiemap_extent));
	uint64_t pos = off, end = off + len;

	if (!fm)
		die("calloc");
	while (pos < end) {
		fm->fm_start = pos;
		fm->fm_length = end - pos;
		fm->fm_flags = FIEMAP_FLAG_SYNC;
		fm->fm_extent_count = N;
		if (ioctl(fd, FS_IOC_FIEMAP, fm))
			die("fiemap");
		if (!fm->fm_mapped_extents) {
			fprintf(stderr, "fiemap: hole at %" PRIu64 "\n", pos);
			exit(1);
		}
		for (unsigned int i = 0; i < fm->fm_mapped_extents; i++) {
			struct fiemap_extent *e = &fm->fm_extents[i];
			uint64_t lo = e->fe_logical > pos ? e->fe_logical : pos;
			uint64_t hi = e->fe_logical + e->fe_length;

			if (hi > end)
				hi = end;
			if (lo < hi)
				printf("%" PRIu64 " %" PRIu64 "\n",
				       (uint64_t)(e->fe_physical + (lo - e->fe_logical)),
				       hi - lo);
			pos = hi;
		}
	}
	free(fm);
}

static int cmd_syncwrite(const char *path, uint64_t off, uint64_t len)
{
	void *buf;
	int fd = open(path, O_WRONLY | O_DIRECT | O_DSYNC);

	if (fd < 0)
		die(path);
	if (posix_memalign(&buf, 4096, len))
		die("alloc");
	memset(buf, 0xa5, len);
	if (pwrite(fd, buf, len, off) != (ssize_t)len)
		die("pwrite");
	close(fd);
	free(buf);
	return 0;
}

static int cmd_zeroout(const char *path, uint64_t off, uint64_t len)
{
	uint64_t range[2] = { off, len };
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		die(path);
	if (ioctl(fd, BLKZEROOUT, range))
		die("BLKZEROOUT");
	close(fd);
	return 0;
}

static int cmd_map(const char *path, uint64_t off, uint64_t len)
{
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		die(path);
	print_map(fd, off, len);
	close(fd);
	return 0;
}

static int cmd_randwrite(const char *path, unsigned int count, unsigned int seed)
{
	struct stat st;
	void *buf;
	int fd = open(path, O_RDWR | O_DIRECT);
	uint64_t *offs = calloc(count, sizeof(*offs));
	uint64_t *lens = calloc(count, sizeof(*lens));

	if (fd < 0 || fstat(fd, &st))
		die(path);
	if (S_ISBLK(st.st_mode)) {
		uint64_t size;

		if (ioctl(fd, BLKGETSIZE64, &size))
			die("BLKGETSIZE64");
		st.st_size = size;
	}
	if (!offs || !lens || posix_memalign(&buf, 4096, 65536))
		die("alloc");
	srand(seed);
	for (unsigned int i = 0; i < count; i++) {
		uint64_t blocks = st.st_size / 4096;
		uint64_t len = 4096ull * (1 + rand() % 16);
		uint64_t off = 4096ull * ((uint64_t)rand() % blocks);

		if (off + len > (uint64_t)st.st_size)
			len = st.st_size - off;
		memset(buf, rand() & 0xff, len);
		if (pwrite(fd, buf, len, off) != (ssize_t)len)
			die("pwrite");
		offs[i] = off;
		lens[i] = len;
	}
	if (fdatasync(fd))
		die("fdatasync");
	for (unsigned int i = 0; i < count; i++) {
		if (S_ISBLK(st.st_mode))
			printf("%" PRIu64 " %" PRIu64 "\n", offs[i], lens[i]);
		else
			print_map(fd, offs[i], lens[i]);
	}
	close(fd);
	return 0;
}

static int cmd_check(const char *bitmap, unsigned int gran, const char *ranges,
		     int exact)
{
	FILE *f = fopen(bitmap, "r");
	FILE *r = fopen(ranges, "r");
	unsigned char *map, *want;
	long bytes;
	uint64_t start, len, set = 0, written = 0, missing = 0;

	if (!f || !r)
		die("open");
	fseek(f, 0, SEEK_END);
	bytes = ftell(f);
	rewind(f);
	map = malloc(bytes + 1);
	want = calloc(bytes + 1, 1);
	if (!map || !want || fread(map, 1, bytes, f) != (size_t)bytes)
		die("read bitmap");
	while (fscanf(r, "%" SCNu64 " %" SCNu64, &start, &len) == 2) {
		if (!len)
			continue;
		for (uint64_t bit = start / gran; bit <= (start + len - 1) / gran; bit++) {
			if (bit / 8 >= (uint64_t)bytes) {
				fprintf(stderr, "range %" PRIu64 "+%" PRIu64
					" beyond the bitmap\n", start, len);
				return 1;
			}
			want[bit / 8] |= 1u << (bit % 8);
		}
	}
	for (long i = 0; i < bytes; i++) {
		set += __builtin_popcount(map[i]);
		written += __builtin_popcount(want[i]);
		missing += __builtin_popcount(want[i] & ~map[i]);
	}
	printf("written_bits=%" PRIu64 " set_bits=%" PRIu64 " missing_bits=%"
	       PRIu64 " ratio=%.3f\n", written, set, missing,
	       written ? (double)set / written : 0.0);
	if (exact && set != written) {
		fprintf(stderr, "bits set outside the written ranges\n");
		return 1;
	}
	return missing ? 1 : 0;
}

static int cmd_or(const char *out, char **in, int n)
{
	unsigned char *acc = NULL;
	long acc_bytes = 0;

	for (int i = 0; i < n; i++) {
		FILE *f = fopen(in[i], "r");
		int c;
		long j = 0;

		if (!f)
			die(in[i]);
		while ((c = fgetc(f)) != EOF) {
			if (j >= acc_bytes) {
				acc = realloc(acc, j + 1);
				if (!acc)
					die("realloc");
				acc[j] = 0;
				acc_bytes = j + 1;
			}
			acc[j++] |= c;
		}
		fclose(f);
	}
	FILE *f = fopen(out, "w");

	if (!f || (acc_bytes && fwrite(acc, 1, acc_bytes, f) != (size_t)acc_bytes) ||
	    fclose(f))
		die(out);
	free(acc);
	return 0;
}

static int failures;

static void expect(const char *what, int ret, int err)
{
	int got = ret ? errno : 0;

	if (got != err) {
		printf("FAIL %s: got %s, want %s\n", what, strerror(got), strerror(err));
		failures++;
	} else {
		printf("ok   %s: %s\n", what, strerror(err));
	}
}

static int cmd_errors(const char *path)
{
	int fd = ctl();
	struct drmesh_attach a;
	struct drmesh_dev d;
	struct drmesh_bitmap b;
	struct drmesh_status s;
	struct stat st;
	unsigned char small[1];

	if (stat(path, &st))
		die(path);

#define ATTACH_INIT()                                            \
	do {                                                     \
		memset(&a, 0, sizeof(a));                        \
		a.version = DRMESH_IOCTL_VERSION;                \
		snprintf(a.path, sizeof(a.path), "%s", path);    \
	} while (0)

	ATTACH_INIT();
	a.version = 99;
	expect("attach, unknown version", ioctl(fd, DRMESH_IOC_ATTACH, &a), EPROTO);
	ATTACH_INIT();
	a.flags = 1;
	expect("attach, unknown flag", ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	a.reserved = 7;
	expect("attach, reserved set", ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	a.granularity_bytes = 3000;
	expect("attach, granularity not a power of two",
	       ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	a.granularity_bytes = 256;
	expect("attach, granularity below a sector",
	       ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	a.granularity_bytes = 2u << 20;
	expect("attach, granularity above 1 MiB",
	       ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	memset(a.path, 'x', sizeof(a.path));
	expect("attach, path without NUL", ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	ATTACH_INIT();
	snprintf(a.path, sizeof(a.path), "/dev/no-such-disk");
	expect("attach, no such path", ioctl(fd, DRMESH_IOC_ATTACH, &a), ENOENT);
	ATTACH_INIT();
	snprintf(a.path, sizeof(a.path), "/dev/null");
	expect("attach, not a block device", ioctl(fd, DRMESH_IOC_ATTACH, &a), ENOTBLK);
	ATTACH_INIT();
	a.path[0] = 0;
	a.dev_major = 1u << 20;
	expect("attach, major out of range", ioctl(fd, DRMESH_IOC_ATTACH, &a), EINVAL);
	expect("attach, NULL argument", ioctl(fd, DRMESH_IOC_ATTACH, NULL), EFAULT);
	expect("unknown ioctl", ioctl(fd, _IO(DRMESH_IOC_MAGIC, 99), NULL), ENOTTY);

	ATTACH_INIT();
	expect("attach", ioctl(fd, DRMESH_IOC_ATTACH, &a), 0);
	ATTACH_INIT();
	expect("attach twice", ioctl(fd, DRMESH_IOC_ATTACH, &a), EBUSY);
	ATTACH_INIT();
	a.path[0] = 0;
	a.dev_major = major(st.st_rdev);
	a.dev_minor = minor(st.st_rdev);
	expect("attach twice, by number", ioctl(fd, DRMESH_IOC_ATTACH, &a), EBUSY);

	memset(&b, 0, sizeof(b));
	b.version = DRMESH_IOCTL_VERSION;
	b.dev_major = major(st.st_rdev);
	b.dev_minor = minor(st.st_rdev);
	b.buf = (uintptr_t)small;
	b.buf_bytes = sizeof(small);
	expect("bitmap, buffer too small", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), ENOSPC);
	if (b.bitmap_bytes <= sizeof(small)) {
		printf("FAIL bitmap_bytes not reported on ENOSPC\n");
		failures++;
	}
	/* A faulting buffer hands nothing over: the bits stay in the live map. */
	{
		int dfd = open(path, O_WRONLY | O_DIRECT);
		void *blk;
		uint64_t before;

		if (dfd < 0 || posix_memalign(&blk, 4096, 4096))
			die("open for write");
		memset(blk, 0x5a, 4096);
		if (pwrite(dfd, blk, 4096, 4096 * 10) != 4096 || fsync(dfd))
			die("pwrite");
		close(dfd);
		memset(&s, 0, sizeof(s));
		s.version = DRMESH_IOCTL_VERSION;
		s.dev_major = b.dev_major;
		s.dev_minor = b.dev_minor;
		if (ioctl(fd, DRMESH_IOC_STATUS, &s))
			die("status");
		before = s.bits_set;
		b.buf = 8; /* an unmapped address */
		b.buf_bytes = b.bitmap_bytes;
		expect("bitmap, faulting buffer", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), EFAULT);
		if (ioctl(fd, DRMESH_IOC_STATUS, &s))
			die("status");
		if (before == 0 || s.bits_set < before) {
			printf("FAIL bits lost on EFAULT: %llu before, %llu after\n",
			       (unsigned long long)before, (unsigned long long)s.bits_set);
			failures++;
		} else {
			printf("ok   bits kept after a faulting hand-over (%llu)\n",
			       (unsigned long long)s.bits_set);
		}
		free(blk);
	}

	memset(&d, 0, sizeof(d));
	d.version = DRMESH_IOCTL_VERSION;
	d.dev_major = major(st.st_rdev);
	d.dev_minor = minor(st.st_rdev);
	d.flags = 2;
	expect("detach, unknown flag", ioctl(fd, DRMESH_IOC_DETACH, &d), EINVAL);
	d.flags = 0;
	expect("detach", ioctl(fd, DRMESH_IOC_DETACH, &d), 0);
	expect("detach twice", ioctl(fd, DRMESH_IOC_DETACH, &d), ENOENT);
	b.buf = (uintptr_t)small;
	expect("bitmap, not attached", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), ENOENT);
	b.reserved = 1;
	expect("bitmap, reserved set", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), EINVAL);

	memset(&s, 0, sizeof(s));
	s.version = DRMESH_IOCTL_VERSION;
	s.dev_major = major(st.st_rdev);
	s.dev_minor = minor(st.st_rdev);
	expect("status, not attached", ioctl(fd, DRMESH_IOC_STATUS, &s), 0);
	if (s.state != 0) {
		printf("FAIL status of a detached device: state %u\n", s.state);
		failures++;
	}
	s.version = 0;
	expect("status, unknown version", ioctl(fd, DRMESH_IOC_STATUS, &s), EPROTO);
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "attach"))
		return cmd_attach(argv[2], argc > 3 ? strtoul(argv[3], NULL, 0) : 0);
	if (argc == 3 && !strcmp(argv[1], "detach"))
		return cmd_detach(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "status"))
		return cmd_status(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "bitmap"))
		return cmd_bitmap(argv[2], argv[3]);
	if (argc == 5 && !strcmp(argv[1], "randwrite"))
		return cmd_randwrite(argv[2], strtoul(argv[3], NULL, 0),
				     strtoul(argv[4], NULL, 0));
	if (argc == 5 && !strcmp(argv[1], "map"))
		return cmd_map(argv[2], strtoull(argv[3], NULL, 0),
			       strtoull(argv[4], NULL, 0));
	if (argc == 5 && !strcmp(argv[1], "syncwrite"))
		return cmd_syncwrite(argv[2], strtoull(argv[3], NULL, 0),
				     strtoull(argv[4], NULL, 0));
	if (argc == 5 && !strcmp(argv[1], "zeroout"))
		return cmd_zeroout(argv[2], strtoull(argv[3], NULL, 0),
				   strtoull(argv[4], NULL, 0));
	if ((argc == 5 || (argc == 6 && !strcmp(argv[5], "exact"))) &&
	    !strcmp(argv[1], "check"))
		return cmd_check(argv[2], strtoul(argv[3], NULL, 0), argv[4],
				 argc == 6);
	if (argc >= 4 && !strcmp(argv[1], "or"))
		return cmd_or(argv[2], argv + 3, argc - 3);
	if (argc == 3 && !strcmp(argv[1], "errors"))
		return cmd_errors(argv[2]);
	fprintf(stderr, "usage: see the comment at the top of drmesh-kmodctl.c\n");
	return 2;
}
