// SPDX-License-Identifier: GPL-2.0
/*
 * drmesh-kmodctl: a small test client of /dev/drmesh-ctl, built statically so
 * it runs in a busybox guest.
 *
 *   attach PATH [GRANULARITY [STATE]]
 *                                  attaches (STATE: a state store device);
 *                                  prints MAJOR:MINOR GRANULARITY restore=
 *                                  al_extents= handovers= bits_set=
 *                                  tracking_id=
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
 *   snapshot MAJOR:MINOR COW OUT   takes a snapshot with COW store COW, hands
 *                                  the bitmap over into OUT; prints the
 *                                  snapshot device and the CLOCK_MONOTONIC
 *                                  ns just before (t0) and after (t1) the call
 *   release MAJOR:MINOR            drops the device's snapshot
 *   snaperrors PATH COW            snapshot/release bad arguments and states
 *   logwrite DEV FIRST N COUNT WRITER LOG STOPFILE
 *                                  up to COUNT random 4 KiB O_DIRECT writes to
 *                                  blocks FIRST..FIRST+N-1 of DEV, each block
 *                                  tagged (WRITER, sequence, block) with
 *                                  derived content; appends one record per
 *                                  write (start/end ns, block, tag) to LOG;
 *                                  stops early once STOPFILE exists
 *   verify SNAPDEV T0 T1 FIRST N LOG...
 *                                  every block of SNAPDEV equals a content the
 *                                  disk could have had between T0 and T1
 *   covers BITMAP GRANULARITY FROM TO LOG...
 *                                  every logged write that started at or after
 *                                  FROM and ended by TO has its bit set
 *   tags DEV FIRST N OUT           writes the tag (writer, sequence) of blocks
 *                                  FIRST..FIRST+N-1 of DEV to OUT (0 0: zeros)
 *   changed OLDTAGS NEWTAGS BITMAP GRANULARITY FIRST
 *                                  every block whose tag differs between the
 *                                  two files has its bit set in BITMAP
 *   readat DEV OFFSET LENGTH       reads; exit 0, or prints the errno and exit 3
 *   cowhdr COW                     prints the COW store header
 *   bench DEV rand4k|seq1m COUNT [JOBS]
 *                                  O_DIRECT write speed in MB/s; with JOBS,
 *                                  rand4k runs JOBS processes at once (seeds
 *                                  100, 101, ...), COUNT/JOBS writes each
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <time.h>
#include <endian.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
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

/*
 * Zeroes ioctl argument struct @x and fills in what every one starts with: the
 * interface version and the device number.
 */
#define ARG_INIT(x, major_, minor_)                      \
	do {                                             \
		memset(&(x), 0, sizeof(x));              \
		(x).version = DRMESH_IOCTL_VERSION;      \
		(x).dev_major = (major_);                \
		(x).dev_minor = (minor_);                \
	} while (0)

/* ARG_INIT() with the device given as "MAJOR:MINOR". */
#define ARG_INIT_DEV(x, dev)                             \
	do {                                             \
		__u32 major_, minor_;                    \
		parse_dev((dev), &major_, &minor_);      \
		ARG_INIT(x, major_, minor_);             \
	} while (0)

/* Writes @n bytes of @buf to the file @out, or exits. */
static void write_out(const char *out, const void *buf, size_t n)
{
	FILE *f = fopen(out, "w");

	if (!f || fwrite(buf, 1, n, f) != n || fclose(f))
		die(out);
}

static void print_id(const char *name, const __u8 *id)
{
	printf(" %s=", name);
	for (int i = 0; i < 16; i++)
		printf("%02x", id[i]);
}

static int cmd_attach(const char *path, unsigned int gran, const char *state)
{
	struct drmesh_attach a = { .version = DRMESH_IOCTL_VERSION,
				   .granularity_bytes = gran };

	snprintf(a.path, sizeof(a.path), "%s", path);
	snprintf(a.state_path, sizeof(a.state_path), "%s", state ? state : "");
	if (ioctl(ctl(), DRMESH_IOC_ATTACH, &a))
		die("attach");
	printf("%u:%u %u restore=%u al_extents=%u handovers=%llu bits_set=%llu",
	       a.dev_major, a.dev_minor, a.granularity_bytes, a.restore,
	       a.al_extents, (unsigned long long)a.handovers,
	       (unsigned long long)a.bits_set);
	print_id("tracking_id", a.tracking_id);
	printf("\n");
	return 0;
}

/* An ioctl that takes struct drmesh_dev (detach, release), or exits. */
static int dev_ioctl(const char *dev, unsigned long nr, const char *what)
{
	struct drmesh_dev d;

	ARG_INIT_DEV(d, dev);
	if (ioctl(ctl(), nr, &d))
		die(what);
	return 0;
}

static int get_status(const char *dev, struct drmesh_status *s)
{
	ARG_INIT_DEV(*s, dev);
	return ioctl(ctl(), DRMESH_IOC_STATUS, s);
}

/* A buffer for @dev's bitmap; its size in *@bytes. Exits on failure. */
static unsigned char *bitmap_buf(const char *dev, __u64 *bytes)
{
	struct drmesh_status s;
	unsigned char *buf;

	if (get_status(dev, &s))
		die("status");
	buf = malloc(s.bitmap_bytes ? s.bitmap_bytes : 1);
	if (!buf)
		die("malloc");
	*bytes = s.bitmap_bytes;
	return buf;
}

static int cmd_status(const char *dev)
{
	struct drmesh_status s;

	if (get_status(dev, &s))
		die("status");
	printf("state=%u granularity_bytes=%u device_bytes=%llu bitmap_bytes=%llu "
	       "bits_set=%llu writes_seen=%llu handovers=%llu attached_count=%u "
	       "snap_index=%u snap_error=%u cow_chunks_used=%llu cow_chunks_total=%llu ",
	       s.state, s.granularity_bytes, (unsigned long long)s.device_bytes,
	       (unsigned long long)s.bitmap_bytes, (unsigned long long)s.bits_set,
	       (unsigned long long)s.writes_seen, (unsigned long long)s.handovers,
	       s.attached_count, s.snap_index, s.snap_error,
	       (unsigned long long)s.cow_chunks_used,
	       (unsigned long long)s.cow_chunks_total);
	printf("al_used=%u al_slots=%u persist_error=%u al_flushes=%u",
	       s.al_used, s.al_slots, s.persist_error, s.al_flushes);
	print_id("tracking_id", s.tracking_id);
	printf("\n");
	return 0;
}

static int cmd_bitmap(const char *dev, const char *out)
{
	struct drmesh_bitmap b;
	unsigned char *buf;

	ARG_INIT_DEV(b, dev);
	buf = bitmap_buf(dev, &b.buf_bytes);
	b.buf = (uintptr_t)buf;
	if (ioctl(ctl(), DRMESH_IOC_GET_BITMAP, &b))
		die("get bitmap");
	write_out(out, buf, b.bitmap_bytes);
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
	write_out(out, acc, acc_bytes);
	free(acc);
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void snap_init(struct drmesh_snapshot *a, const char *dev, const char *cow)
{
	ARG_INIT_DEV(*a, dev);
	snprintf(a->cow_path, sizeof(a->cow_path), "%s", cow);
}

static int cmd_snapshot(const char *dev, const char *cow, const char *out)
{
	struct drmesh_snapshot a;
	unsigned char *buf;
	uint64_t t0, t1;

	snap_init(&a, dev, cow);
	buf = bitmap_buf(dev, &a.buf_bytes);
	a.buf = (uintptr_t)buf;
	t0 = now_ns();
	if (ioctl(ctl(), DRMESH_IOC_SNAPSHOT, &a))
		die("snapshot");
	t1 = now_ns();
	write_out(out, buf, a.bitmap_bytes);
	printf("/dev/" DRMESH_SNAP_NAME "%u %" PRIu64 " %" PRIu64
	       " bits_set=%llu cow_bytes=%llu dev=%u:%u\n", a.snap_index, t0, t1,
	       (unsigned long long)a.bits_set, (unsigned long long)a.cow_bytes,
	       a.snap_major, a.snap_minor);
	free(buf);
	return 0;
}

/* One logged write; the block's content follows from (writer, seq, block). */
struct wrec {
	uint64_t t_begin_ns;
	uint64_t t_end_ns;
	uint64_t block;
	uint32_t writer;
	uint32_t seq;
};

#define TAG_MAGIC 0x57524d44u /* "DMRW" */
#define BLK 4096

static void fill_block(unsigned char *b, uint32_t writer, uint32_t seq, uint64_t block)
{
	uint64_t x = ((uint64_t)writer << 32 | seq) ^ (block * 0x9e3779b97f4a7c15ull) ^ 1;
	uint32_t hdr[4] = { TAG_MAGIC, writer, seq, 0 };

	for (int i = 0; i < BLK; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(b + i, &x, 8);
	}
	memcpy(b, hdr, sizeof(hdr));
	memcpy(b + 16, &block, 8);
}

static int cmd_logwrite(const char *path, uint64_t first, uint64_t n,
			unsigned int count, unsigned int writer, const char *log,
			const char *stop)
{
	int fd = open(path, O_WRONLY | O_DIRECT);
	FILE *f = fopen(log, "a");
	struct wrec *r = calloc(count, sizeof(*r));
	void *buf;

	if (fd < 0 || !f || !r || posix_memalign(&buf, BLK, BLK))
		die("logwrite setup");
	srand(writer * 7919 + 1);
	for (unsigned int i = 0; i < count; i++) {
		uint64_t block = first + (uint64_t)rand() % n;

		if (i % 32 == 0 && !access(stop, F_OK)) {
			count = i;
			break;
		}

		fill_block(buf, writer, i + 1, block);
		r[i].block = block;
		r[i].writer = writer;
		r[i].seq = i + 1;
		r[i].t_begin_ns = now_ns();
		if (pwrite(fd, buf, BLK, block * BLK) != BLK)
			die("pwrite");
		r[i].t_end_ns = now_ns();
	}
	if (fwrite(r, sizeof(*r), count, f) != count || fclose(f))
		die(log);
	printf("logwrite: writer %u wrote %u blocks\n", writer, count);
	close(fd);
	return 0;
}

static struct wrec *load_logs(char **paths, int n, size_t *nrec)
{
	struct wrec *all = NULL;
	size_t have = 0;

	for (int i = 0; i < n; i++) {
		FILE *f = fopen(paths[i], "r");
		struct wrec r;

		if (!f)
			die(paths[i]);
		while (fread(&r, sizeof(r), 1, f) == 1) {
			all = realloc(all, (have + 1) * sizeof(*all));
			if (!all)
				die("realloc");
			all[have++] = r;
		}
		fclose(f);
	}
	*nrec = have;
	return all;
}

static int by_block(const void *a, const void *b)
{
	const struct wrec *x = a, *y = b;

	return x->block < y->block ? -1 : x->block > y->block;
}

/*
 * For each block of the snapshot: its tag (0/0 for a never-written, all-zero
 * block) must name a content the disk could hold at the snapshot instant,
 * which lies in [t0, t1]: the initial zeros unless a write ended before t0,
 * or a write that started before t1 and that no other write to the block
 * started after and ended before t0.
 */
static int cmd_verify(const char *snap, uint64_t t0, uint64_t t1, uint64_t first,
		      uint64_t n, char **logs, int nlogs)
{
	size_t nrec, lo = 0;
	struct wrec *r = load_logs(logs, nlogs, &nrec);
	int fd = open(snap, O_RDONLY | O_DIRECT);
	unsigned char *buf, *want;
	uint64_t bad = 0, overwritten = 0, written_blocks = 0;

	if (fd < 0 || posix_memalign((void **)&buf, BLK, BLK) || !(want = malloc(BLK)))
		die("verify setup");
	qsort(r, nrec, sizeof(*r), by_block);
	for (uint64_t b = first; b < first + n; b++) {
		uint32_t tag[4] = { 0, 0, 0, 0 };
		size_t hi, k, j;
		int zero = 1, ok = 0, later = 0;

		if (pread(fd, buf, BLK, b * BLK) != BLK) {
			printf("verify: read of block %" PRIu64 ": %s\n", b, strerror(errno));
			return 1;
		}
		for (int i = 0; i < BLK && zero; i++)
			zero = !buf[i];
		if (!zero) {
			memcpy(tag, buf, sizeof(tag));
			fill_block(want, tag[1], tag[2], b);
			if (tag[0] != TAG_MAGIC || memcmp(buf, want, BLK)) {
				printf("verify: block %" PRIu64 " holds no whole logged content\n", b);
				bad++;
				continue;
			}
		}
		while (lo < nrec && r[lo].block < b)
			lo++;
		for (hi = lo; hi < nrec && r[hi].block == b; hi++)
			;
		if (hi > lo)
			written_blocks++;
		if (zero) {
			ok = 1;
			for (k = lo; k < hi; k++)
				if (r[k].t_end_ns < t0)
					ok = 0;
		}
		for (k = lo; k < hi && !ok; k++) {
			if (r[k].writer != tag[1] || r[k].seq != tag[2])
				continue;
			if (r[k].t_begin_ns >= t1)
				continue;
			ok = 1;
			for (j = lo; j < hi; j++)
				if (r[j].t_begin_ns > r[k].t_end_ns && r[j].t_end_ns < t0)
					ok = 0;
		}
		/* Written after the instant: the snapshot kept the old data. */
		for (k = lo; k < hi; k++)
			if (r[k].t_begin_ns > t1)
				later = 1;
		overwritten += later;
		if (!ok) {
			printf("verify: block %" PRIu64 " has writer %u seq %u, not a "
			       "content of the snapshot instant\n", b, tag[1], tag[2]);
			bad++;
		}
	}
	printf("verify: blocks=%" PRIu64 " written=%" PRIu64
	       " overwritten_after_snapshot=%" PRIu64 " wrong=%" PRIu64 "\n",
	       n, written_blocks, overwritten, bad);
	close(fd);
	return bad ? 1 : 0;
}

static int cmd_covers(const char *bitmap, unsigned int gran, uint64_t from,
		      uint64_t to, char **logs, int nlogs)
{
	size_t nrec;
	struct wrec *r = load_logs(logs, nlogs, &nrec);
	FILE *f = fopen(bitmap, "r");
	unsigned char *map, *want;
	uint64_t checked = 0, missing = 0, set = 0, wbits = 0;
	long bytes;

	if (!f)
		die(bitmap);
	fseek(f, 0, SEEK_END);
	bytes = ftell(f);
	rewind(f);
	map = malloc(bytes + 1);
	want = calloc(bytes + 1, 1);
	if (!map || !want || fread(map, 1, bytes, f) != (size_t)bytes)
		die("read bitmap");
	for (size_t i = 0; i < nrec; i++) {
		uint64_t bit = r[i].block * BLK / gran;

		if (r[i].t_begin_ns < from || r[i].t_end_ns > to)
			continue;
		checked++;
		if (bit / 8 >= (uint64_t)bytes || !(map[bit / 8] & (1u << (bit % 8)))) {
			missing++;
			continue;
		}
		want[bit / 8] |= 1u << (bit % 8);
	}
	for (long i = 0; i < bytes; i++) {
		set += __builtin_popcount(map[i]);
		wbits += __builtin_popcount(want[i]);
	}
	printf("covers: writes=%" PRIu64 " missing=%" PRIu64 " written_bits=%"
	       PRIu64 " set_bits=%" PRIu64 "\n", checked, missing, wbits, set);
	return missing ? 1 : 0;
}

static int cmd_tags(const char *path, uint64_t first, uint64_t n, const char *out)
{
	int fd = open(path, O_RDONLY | O_DIRECT);
	FILE *f = fopen(out, "w");
	unsigned char *buf;

	if (fd < 0 || !f || posix_memalign((void **)&buf, BLK, BLK))
		die("tags setup");
	for (uint64_t b = first; b < first + n; b++) {
		uint32_t tag[4] = { 0, 0, 0, 0 };

		if (pread(fd, buf, BLK, b * BLK) != BLK)
			die("tags read");
		memcpy(tag, buf, sizeof(tag));
		if (tag[0] != TAG_MAGIC)
			tag[1] = tag[2] = 0;
		fprintf(f, "%u %u\n", tag[1], tag[2]);
	}
	if (fclose(f))
		die(out);
	close(fd);
	return 0;
}

/*
 * The promise a hand-over makes to the block-reader: a block that differs
 * between two consecutive snapshots has its bit set in the bitmap handed
 * over with the second one.
 */
static int cmd_changed(const char *old_tags, const char *new_tags, const char *bitmap,
		       unsigned int gran, uint64_t first)
{
	FILE *a = fopen(old_tags, "r"), *b = fopen(new_tags, "r"), *m = fopen(bitmap, "r");
	unsigned int w0, s0, w1, s1;
	uint64_t blk = first, changed = 0, missing = 0;
	unsigned char *map;
	long bytes;

	if (!a || !b || !m)
		die("changed: open");
	fseek(m, 0, SEEK_END);
	bytes = ftell(m);
	rewind(m);
	map = malloc(bytes + 1);
	if (!map || fread(map, 1, bytes, m) != (size_t)bytes)
		die("read bitmap");
	while (fscanf(a, "%u %u", &w0, &s0) == 2 && fscanf(b, "%u %u", &w1, &s1) == 2) {
		uint64_t bit = blk * BLK / gran;

		if (w0 != w1 || s0 != s1) {
			changed++;
			if (bit / 8 >= (uint64_t)bytes || !(map[bit / 8] & (1u << (bit % 8)))) {
				printf("changed: block %" PRIu64 " differs but its bit is clear\n", blk);
				missing++;
			}
		}
		blk++;
	}
	printf("changed: blocks=%" PRIu64 " changed=%" PRIu64 " missing=%" PRIu64 "\n",
	       blk - first, changed, missing);
	return missing || !changed ? 1 : 0;
}

static int cmd_readat(const char *path, uint64_t off, uint64_t len)
{
	int fd = open(path, O_RDONLY | O_DIRECT);
	void *buf;

	if (fd < 0)
		die(path);
	if (posix_memalign(&buf, BLK, 1 << 20))
		die("alloc");
	while (len) {
		size_t n = len < (1 << 20) ? len : (1 << 20);
		ssize_t got = pread(fd, buf, n, off);

		if (got < 0) {
			printf("%s\n", strerror(errno));
			return 3;
		}
		if (got == 0)
			break;
		off += got;
		len -= got;
	}
	close(fd);
	return 0;
}

static int cmd_cowhdr(const char *path)
{
	struct drmesh_cow_header h;
	int fd = open(path, O_RDONLY);

	if (fd < 0 || pread(fd, &h, sizeof(h), 0) != sizeof(h))
		die(path);
	if (memcmp(h.magic, DRMESH_COW_MAGIC, 8)) {
		printf("no COW store header\n");
		return 1;
	}
	printf("format=%u state=%u chunk_bytes=%u origin=%u:%u index_offset=%llu "
	       "index_entries=%llu data_offset=%llu data_chunks=%llu chunks_used=%llu "
	       "origin_bytes=%llu\n", le32toh(h.format), le32toh(h.state),
	       le32toh(h.chunk_bytes), le32toh(h.origin_major), le32toh(h.origin_minor),
	       (unsigned long long)le64toh(h.index_offset_bytes),
	       (unsigned long long)le64toh(h.index_entries),
	       (unsigned long long)le64toh(h.data_offset_bytes),
	       (unsigned long long)le64toh(h.data_chunks),
	       (unsigned long long)le64toh(h.chunks_used),
	       (unsigned long long)le64toh(h.origin_bytes));
	close(fd);
	return 0;
}

/* @count O_DIRECT writes of @bs bytes to @fd, random (seed @seed) or sequential. */
static void bench_writes(int fd, int seq, size_t bs, uint64_t size,
			 unsigned int count, unsigned int seed)
{
	void *buf;

	if (posix_memalign(&buf, 4096, bs))
		die("bench buffer");
	memset(buf, 0x3c, bs);
	srand(seed);
	for (unsigned int i = 0; i < count; i++) {
		uint64_t off = seq ? (i * bs) % (size / bs * bs)
				   : 4096ull * ((uint64_t)rand() % (size / 4096));

		if (pwrite(fd, buf, bs, off) != (ssize_t)bs)
			die("pwrite");
	}
	free(buf);
}

/*
 * With @jobs > 1 (rand4k only), that many processes write at once, each
 * count/jobs writes from its own seed (none the single writer's, so they
 * mostly write other blocks), so the device sees that many writes in flight
 * (the single writer waits for each write before the next).
 */
static int cmd_bench(const char *path, const char *mode, unsigned int count,
		     unsigned int jobs)
{
	int fd = open(path, O_WRONLY | O_DIRECT);
	int seq = !strcmp(mode, "seq1m");
	size_t bs = seq ? (1 << 20) : 4096;
	uint64_t size, t0, t1;

	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size))
		die("bench setup");
	if (jobs < 1 || (seq && jobs > 1)) {
		fprintf(stderr, "bench: JOBS must be 1 for seq1m, at least 1\n");
		return 2;
	}
	count = count / jobs * jobs;
	t0 = now_ns();
	if (jobs == 1) {
		bench_writes(fd, seq, bs, size, count, 99);
	} else {
		for (unsigned int j = 0; j < jobs; j++) {
			pid_t pid = fork();

			if (pid < 0)
				die("fork");
			if (!pid) {
				bench_writes(fd, seq, bs, size, count / jobs, 100 + j);
				_exit(0);
			}
		}
		for (unsigned int j = 0; j < jobs; j++) {
			int st;

			if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
				die("bench writer");
		}
	}
	if (fdatasync(fd))
		die("fdatasync");
	t1 = now_ns();
	printf("%.2f\n", (double)count * bs / 1e6 / ((t1 - t0) / 1e9));
	close(fd);
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

	ARG_INIT(b, major(st.st_rdev), minor(st.st_rdev));
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
		ARG_INIT(s, b.dev_major, b.dev_minor);
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

	ARG_INIT(d, major(st.st_rdev), minor(st.st_rdev));
	d.flags = 2;
	expect("detach, unknown flag", ioctl(fd, DRMESH_IOC_DETACH, &d), EINVAL);
	d.flags = 0;
	expect("detach", ioctl(fd, DRMESH_IOC_DETACH, &d), 0);
	expect("detach twice", ioctl(fd, DRMESH_IOC_DETACH, &d), ENOENT);
	b.buf = (uintptr_t)small;
	expect("bitmap, not attached", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), ENOENT);
	b.reserved = 1;
	expect("bitmap, reserved set", ioctl(fd, DRMESH_IOC_GET_BITMAP, &b), EINVAL);

	ARG_INIT(s, major(st.st_rdev), minor(st.st_rdev));
	expect("status, not attached", ioctl(fd, DRMESH_IOC_STATUS, &s), 0);
	if (s.state != 0) {
		printf("FAIL status of a detached device: state %u\n", s.state);
		failures++;
	}
	s.version = 0;
	expect("status, unknown version", ioctl(fd, DRMESH_IOC_STATUS, &s), EPROTO);
	return failures ? 1 : 0;
}

static int cmd_snaperrors(const char *path, const char *cow)
{
	int fd = ctl();
	struct drmesh_attach a = { .version = DRMESH_IOCTL_VERSION };
	struct drmesh_snapshot sn;
	struct drmesh_dev d;
	struct drmesh_status s;
	char dev[32];
	unsigned char *buf;

	snprintf(a.path, sizeof(a.path), "%s", path);
	if (ioctl(fd, DRMESH_IOC_ATTACH, &a))
		die("attach");
	snprintf(dev, sizeof(dev), "%u:%u", a.dev_major, a.dev_minor);
	if (get_status(dev, &s))
		die("status");
	buf = malloc(s.bitmap_bytes);
	if (!buf)
		die("malloc");
#define SNAP_INIT()                                   \
	do {                                          \
		snap_init(&sn, dev, cow);             \
		sn.buf = (uintptr_t)buf;              \
		sn.buf_bytes = s.bitmap_bytes;        \
	} while (0)
	ARG_INIT(d, a.dev_major, a.dev_minor);

	SNAP_INIT();
	sn.version = DRMESH_IOCTL_VERSION + 1;
	expect("snapshot, unknown version", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EPROTO);
	SNAP_INIT();
	sn.flags = 4;
	expect("snapshot, unknown flag", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EINVAL);
	SNAP_INIT();
	sn.cow_path[0] = 0;
	expect("snapshot, empty COW path", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EINVAL);
	SNAP_INIT();
	memset(sn.cow_path, 'c', sizeof(sn.cow_path));
	expect("snapshot, COW path without NUL", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EINVAL);
	SNAP_INIT();
	snprintf(sn.cow_path, sizeof(sn.cow_path), "/dev/no-such-store");
	expect("snapshot, no such COW store", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), ENOENT);
	SNAP_INIT();
	snprintf(sn.cow_path, sizeof(sn.cow_path), "%s", path);
	expect("snapshot, COW store on the origin", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EINVAL);
	SNAP_INIT();
	sn.buf_bytes = 1;
	expect("snapshot, bitmap buffer too small", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), ENOSPC);
	SNAP_INIT();
	sn.dev_minor = a.dev_minor + 77;
	expect("snapshot, device not attached", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), ENOENT);
	expect("snapshot, NULL argument", ioctl(fd, DRMESH_IOC_SNAPSHOT, NULL), EFAULT);
	expect("release, no snapshot", ioctl(fd, DRMESH_IOC_RELEASE, &d), ENOENT);
	SNAP_INIT();
	sn.buf = 8; /* unmapped: no snapshot may be left behind */
	expect("snapshot, faulting bitmap buffer", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EFAULT);
	if (get_status(dev, &s) || (s.state & DRMESH_STATE_SNAPSHOT)) {
		printf("FAIL snapshot left behind after EFAULT (state %u)\n", s.state);
		failures++;
	}
	SNAP_INIT();
	expect("snapshot", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), 0);
	SNAP_INIT();
	expect("snapshot twice", ioctl(fd, DRMESH_IOC_SNAPSHOT, &sn), EBUSY);
	{
		struct drmesh_attach c = { .version = DRMESH_IOCTL_VERSION };

		snprintf(c.path, sizeof(c.path), "%s", cow);
		expect("attach the COW store", ioctl(fd, DRMESH_IOC_ATTACH, &c), EBUSY);
	}
	expect("detach with a snapshot", ioctl(fd, DRMESH_IOC_DETACH, &d), EBUSY);
	if (get_status(dev, &s) || !(s.state & DRMESH_STATE_SNAPSHOT)) {
		printf("FAIL status does not show the snapshot\n");
		failures++;
	}
	d.flags = 1;
	expect("release, unknown flag", ioctl(fd, DRMESH_IOC_RELEASE, &d), EINVAL);
	d.flags = 0;
	d.version = 0;
	expect("release, unknown version", ioctl(fd, DRMESH_IOC_RELEASE, &d), EPROTO);
	d.version = DRMESH_IOCTL_VERSION;
	expect("release", ioctl(fd, DRMESH_IOC_RELEASE, &d), 0);
	expect("release twice", ioctl(fd, DRMESH_IOC_RELEASE, &d), ENOENT);
	expect("detach", ioctl(fd, DRMESH_IOC_DETACH, &d), 0);
	free(buf);
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "attach"))
		return cmd_attach(argv[2], argc > 3 ? strtoul(argv[3], NULL, 0) : 0,
				  argc > 4 ? argv[4] : NULL);
	if (argc == 3 && !strcmp(argv[1], "detach"))
		return dev_ioctl(argv[2], DRMESH_IOC_DETACH, "detach");
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
	if (argc == 5 && !strcmp(argv[1], "snapshot"))
		return cmd_snapshot(argv[2], argv[3], argv[4]);
	if (argc == 3 && !strcmp(argv[1], "release"))
		return dev_ioctl(argv[2], DRMESH_IOC_RELEASE, "release");
	if (argc == 4 && !strcmp(argv[1], "snaperrors"))
		return cmd_snaperrors(argv[2], argv[3]);
	if (argc == 9 && !strcmp(argv[1], "logwrite"))
		return cmd_logwrite(argv[2], strtoull(argv[3], NULL, 0),
				    strtoull(argv[4], NULL, 0), strtoul(argv[5], NULL, 0),
				    strtoul(argv[6], NULL, 0), argv[7], argv[8]);
	if (argc >= 8 && !strcmp(argv[1], "verify"))
		return cmd_verify(argv[2], strtoull(argv[3], NULL, 0),
				  strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0),
				  strtoull(argv[6], NULL, 0), argv + 7, argc - 7);
	if (argc >= 7 && !strcmp(argv[1], "covers"))
		return cmd_covers(argv[2], strtoul(argv[3], NULL, 0),
				  strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0),
				  argv + 6, argc - 6);
	if (argc == 5 && !strcmp(argv[1], "readat"))
		return cmd_readat(argv[2], strtoull(argv[3], NULL, 0),
				  strtoull(argv[4], NULL, 0));
	if (argc == 6 && !strcmp(argv[1], "tags"))
		return cmd_tags(argv[2], strtoull(argv[3], NULL, 0),
				strtoull(argv[4], NULL, 0), argv[5]);
	if (argc == 7 && !strcmp(argv[1], "changed"))
		return cmd_changed(argv[2], argv[3], argv[4], strtoul(argv[5], NULL, 0),
				   strtoull(argv[6], NULL, 0));
	if (argc == 3 && !strcmp(argv[1], "cowhdr"))
		return cmd_cowhdr(argv[2]);
	if ((argc == 5 || argc == 6) && !strcmp(argv[1], "bench"))
		return cmd_bench(argv[2], argv[3], strtoul(argv[4], NULL, 0),
				 argc == 6 ? strtoul(argv[5], NULL, 0) : 1);
	fprintf(stderr, "usage: see the comment at the top of drmesh-kmodctl.c\n");
	return 2;
}
