/*-------------------------------------------------------------------------
 *
 * _ledger.c
 *    The shared-memory ledger of processed payments, per second and processor.
 *
 * Every rinha process in a container maps the same POSIX shared-memory
 * segment: the dispatcher adds the payments it completed, the sync (UDP
 * peers or Redis) mirrors the other instances' totals, the intake workers
 * sum a time window for GET /payments-summary.  The contest audits that summary against the
 * payment processors' own, so a payment must never be counted without its
 * amount, and a process killed at any instruction must leave the ledger
 * usable.  Hence no locks anywhere: every update is a single atomic
 * instruction on a 64-bit word.
 *
 * Layout (LEDGER_VERSION 2; all integers native-endian):
 *
 *   header, 64 bytes:
 *     uint32 magic, version, seconds (N, a power of two), regions (R, the
 *       most instances one deployment may have)
 *     uint32 in_use (regions labelled so far, 1..R), sync_epoch (the Redis
 *       carrier's purge generation these cells belong to; 0: none yet)
 *   directory, R entries of 64 bytes:
 *     int64 min_second, max_second (the span of seconds ever written to the
 *       region since creation or purge; INT64_MAX, INT64_MIN when empty)
 *     char label[48]  the instance whose region it is (NUL-terminated;
 *       empty for region 0)
 *   cells, R regions x N seconds x 2 processors of 16 bytes:
 *     int64 tag      the Unix second the cell currently belongs to
 *     uint64 word    count << 40 | cents
 *
 * Region 0 holds this instance's own payments; region i > 0 the mirror of
 * the instance named by its label, given out in the order the sync first
 * heard of each one (assign_region).  Only regions below in_use are read,
 * so a summary costs what the instances of the deployment cost, not R.
 * Processor 0 is the default, 1 the fallback.
 *
 * Memory: the segment is sized for R regions but only the header, the
 * directory and region 0 are reserved at creation (posix_fallocate, so a
 * full /dev/shm fails at start rather than with a SIGBUS mid-run); a
 * region's pages are reserved when it is assigned.  A cell never written
 * is all zeros, which reads as empty: tag 0 is second 0 with a zero word.
 *
 * The cells of a region are a ring: second s lives in slot s mod N (N is
 * 131072 by default, 2^17 s, about 36.4 hours).  A second older than N
 * seconds is overwritten when its slot is reused by a newer one, and a
 * write for a second more than N seconds older than the newest clobbers
 * that newer second's slot; the ring must simply be longer than any run.
 *
 * Packing the count (upper 24 bits) and the cents (lower 40 bits) into one
 * word makes "add a payment" one __atomic_fetch_add, so a reader's single
 * atomic load sees both halves of a payment or neither.  A cell holds at
 * most 2^24 - 1 payments and 2^40 - 1 cents (about 11 billion) per second;
 * a carry out of the cents would corrupt the count, far beyond any load.
 *
 * A slot is reset for a new second by its region's single writer (the
 * caller guarantees one resetting writer per region): tag = EMPTY, word = 0,
 * tag = second.  Readers load tag, word, tag and trust the word only when
 * both tags name the second they asked for, like a sequence lock whose
 * sequence is the second itself.  EMPTY is INT64_MIN, so that second is
 * refused by every call.
 *
 *-------------------------------------------------------------------------
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define LEDGER_MAGIC 0x4c4e4952u        /* "RINL" read as little-endian bytes */
#define LEDGER_VERSION 2u
#define DEFAULT_REGIONS 16u
#define MIN_REGIONS 2u
#define MAX_REGIONS 256u
#define LABEL_BYTES 48
#define PROCESSORS 2
#define DEFAULT_SECONDS 131072u
#define MIN_SECONDS 1024u
#define MAX_SECONDS (1u << 24)          /* 1 GiB of cells: a sanity cap */

#define COUNT_BITS 24
#define CENTS_BITS 40
#define CENTS_MASK ((UINT64_C(1) << CENTS_BITS) - 1)
#define MAX_COUNT ((UINT64_C(1) << COUNT_BITS) - 1)
#define MAX_CENTS CENTS_MASK
#define ONE_PAYMENT (UINT64_C(1) << CENTS_BITS)

#define EMPTY_TAG INT64_MIN

struct span {
    int64_t min_second;
    int64_t max_second;
};

struct header {
    uint32_t magic;
    uint32_t version;
    uint32_t seconds;
    uint32_t regions;
    uint32_t in_use;
    uint32_t sync_epoch;
    unsigned char padding[40];
};

struct region_entry {
    struct span span;
    char label[LABEL_BYTES];
};

struct cell {
    int64_t tag;
    uint64_t word;
};

_Static_assert(sizeof(struct header) == 64, "header must stay 64 bytes");
_Static_assert(sizeof(struct cell) == 16, "cell must stay 16 bytes");
_Static_assert(sizeof(struct region_entry) == 64, "directory entry must stay 64 bytes");

typedef struct {
    PyObject_HEAD
    struct header *hdr;                 /* NULL once closed */
    struct region_entry *dir;
    struct cell *cells;
    size_t size;
    uint64_t mask;                      /* seconds - 1 */
    uint32_t seconds;
    uint32_t regions;
    PyObject *name;
} LedgerObject;


/* ----------------------------------------------------- */
/* The lock-free core. */

static size_t
cells_offset(uint32_t regions)
{
    return sizeof(struct header) + (size_t)regions * sizeof(struct region_entry);
}

static size_t
region_bytes(uint32_t seconds)
{
    return (size_t)seconds * PROCESSORS * sizeof(struct cell);
}

static size_t
segment_size(uint32_t seconds, uint32_t regions)
{
    return cells_offset(regions) + (size_t)regions * region_bytes(seconds);
}

static uint32_t
regions_in_use(const LedgerObject *self)
{
    /* Acquire: pairs with assign's release, so a label and its span are
     * seen initialised before the region counts. */
    return __atomic_load_n(&self->hdr->in_use, __ATOMIC_ACQUIRE);
}

static struct cell *
slot_cells(const LedgerObject *self, int region, int64_t second)
{
    /* Two's complement makes the mask a true modulo for negative seconds. */
    uint64_t slot = (uint64_t)second & self->mask;
    return self->cells + ((size_t)region * self->seconds + slot) * PROCESSORS;
}

static void
cell_claim(struct cell *c, int64_t second)
{
    /* EMPTY first, released, so a reader that loads the zeroed word (which
     * acquires the release below) then sees a tag that is no longer the old
     * second on its second load and discards the word. */
    __atomic_store_n(&c->tag, EMPTY_TAG, __ATOMIC_RELEASE);
    /* Release: orders EMPTY before the zero for readers that acquire it. */
    __atomic_store_n(&c->word, 0, __ATOMIC_RELEASE);
    /* Release: a reader that acquires the new tag sees the zero, never the
     * old second's total under the new second's name. */
    __atomic_store_n(&c->tag, second, __ATOMIC_RELEASE);
}

static void
cell_own(struct cell *c, int64_t second)
{
    /* Acquire: pairs with the release that published the tag, possibly by
     * another writer process, so the word we keep belongs to that second. */
    if (__atomic_load_n(&c->tag, __ATOMIC_ACQUIRE) != second) {
        cell_claim(c, second);
    }
}

static uint64_t
cell_read(const struct cell *c, int64_t second)
{
    /* Acquire on all three loads keeps them in this order: the word cannot
     * be read before the first tag nor after the second, so two equal tags
     * bracket a word of that second. */
    int64_t before = __atomic_load_n(&c->tag, __ATOMIC_ACQUIRE);
    uint64_t word = __atomic_load_n(&c->word, __ATOMIC_ACQUIRE);
    int64_t after = __atomic_load_n(&c->tag, __ATOMIC_ACQUIRE);
    return (before == second && after == second) ? word : 0;
}

static void
span_include(struct span *sp, int64_t second)
{
    /* Relaxed loads: only the starting guess for the CAS, a stale one costs
     * an iteration.  Release on success: a summary that acquires the new
     * bound also sees the cell write made before it. */
    int64_t cur = __atomic_load_n(&sp->max_second, __ATOMIC_RELAXED);
    while (second > cur
           && !__atomic_compare_exchange_n(&sp->max_second, &cur, second, true,
                                           __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
    cur = __atomic_load_n(&sp->min_second, __ATOMIC_RELAXED);
    while (second < cur
           && !__atomic_compare_exchange_n(&sp->min_second, &cur, second, true,
                                           __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
}

static void
span_reset(struct span *sp)
{
    /* Relaxed: purge is maintenance with the writers quiet (see purge). */
    __atomic_store_n(&sp->min_second, INT64_MAX, __ATOMIC_RELAXED);
    __atomic_store_n(&sp->max_second, INT64_MIN, __ATOMIC_RELAXED);
}

static bool
span_read(const struct span *sp, int64_t *lo, int64_t *hi)
{
    /* Acquire: pairs with span_include's release, see there. */
    *lo = __atomic_load_n(&sp->min_second, __ATOMIC_ACQUIRE);
    *hi = __atomic_load_n(&sp->max_second, __ATOMIC_ACQUIRE);
    return *lo <= *hi;
}

static void
region_purge(LedgerObject *self, int region)
{
    struct span *sp = &self->dir[region].span;
    int64_t lo, hi;

    /* Only the seconds written since the last purge can hold anything (every
     * other cell is zero, or was emptied by an earlier purge), so only their
     * pages are touched.  Cells first, span last: a purge killed half-way
     * leaves the span in place and the next purge finishes the job. */
    if (span_read(sp, &lo, &hi)) {
        uint64_t n = (uint64_t)hi - (uint64_t)lo + 1;
        if (n > self->seconds) {
            n = self->seconds;
        }
        for (uint64_t i = 0; i < n; i++) {
            struct cell *c = slot_cells(self, region, (int64_t)((uint64_t)lo + i));
            for (int p = 0; p < PROCESSORS; p++) {
                /* Same order and orders as cell_claim, with no second to claim. */
                __atomic_store_n(&c[p].tag, EMPTY_TAG, __ATOMIC_RELEASE);
                __atomic_store_n(&c[p].word, 0, __ATOMIC_RELEASE);
            }
        }
    }
    span_reset(sp);
}

static void
region_sum(const LedgerObject *self, int region, int64_t from, int64_t to,
           uint64_t totals[2 * PROCESSORS])
{
    int64_t lo, hi;

    if (!span_read(&self->dir[region].span, &lo, &hi)) {
        return;
    }
    /* Only the N most recent seconds can still be in the ring. */
    int64_t oldest = hi < INT64_MIN + (int64_t)self->mask
        ? INT64_MIN : hi - (int64_t)self->mask;
    if (lo < oldest) { lo = oldest; }
    if (lo < from) { lo = from; }
    if (hi > to) { hi = to; }
    if (lo > hi) {
        return;
    }
    /* Count iterations rather than compare seconds: hi may be INT64_MAX. */
    uint64_t n = (uint64_t)hi - (uint64_t)lo + 1;
    for (uint64_t i = 0; i < n; i++) {
        int64_t second = (int64_t)((uint64_t)lo + i);
        const struct cell *c = slot_cells(self, region, second);
        for (int p = 0; p < PROCESSORS; p++) {
            uint64_t word = cell_read(&c[p], second);
            totals[2 * p] += word >> CENTS_BITS;
            totals[2 * p + 1] += word & CENTS_MASK;
        }
    }
}


/* ----------------------------------------------------- */
/* Argument conversion: every out-of-range integer is a ValueError. */

static int
as_int64(PyObject *obj, const char *what, int64_t *out)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);

    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s out of the int64 range: %R", what, obj);
        return -1;
    }
    *out = v;
    return 0;
}

static int
as_bounded(PyObject *obj, const char *what, int64_t max, int64_t *out)
{
    if (as_int64(obj, what, out) < 0) {
        return -1;
    }
    if (*out < 0 || *out > max) {
        PyErr_Format(PyExc_ValueError, "%s must be in 0..%lld, got %R",
                     what, (long long)max, obj);
        return -1;
    }
    return 0;
}

static int
as_second(PyObject *obj, int64_t *out)
{
    if (as_int64(obj, "second", out) < 0) {
        return -1;
    }
    if (*out == EMPTY_TAG) {
        PyErr_SetString(PyExc_ValueError,
                        "second -2**63 is reserved for empty cells");
        return -1;
    }
    return 0;
}

/* A summary bound: None is unbounded on that side. */
static int
as_bound(PyObject *obj, int64_t unbounded, int64_t *out)
{
    if (obj == Py_None) {
        *out = unbounded;
        return 0;
    }
    return as_int64(obj, "bound", out);
}

static int
check_open(const LedgerObject *self)
{
    if (self->hdr == NULL) {
        PyErr_SetString(PyExc_ValueError, "ledger is closed");
        return -1;
    }
    return 0;
}

/* A region number: one of the regions in use (0, this instance's own, is
 * always in use). */
static int
as_region(const LedgerObject *self, PyObject *obj, int64_t *out)
{
    return as_bounded(obj, "region (of those in use)", (int64_t)regions_in_use(self) - 1,
                      out);
}

/* The (region, second, processor) prefix shared by add, word, get, store. */
static int
parse_cell(LedgerObject *self, PyObject *const *args, Py_ssize_t nargs,
           Py_ssize_t expected, const char *fname,
           int *region, int64_t *second, int *processor)
{
    int64_t r, p;

    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)",
                     fname, expected, nargs);
        return -1;
    }
    if (check_open(self) < 0
        || as_region(self, args[0], &r) < 0
        || as_second(args[1], second) < 0
        || as_bounded(args[2], "processor", PROCESSORS - 1, &p) < 0) {
        return -1;
    }
    *region = (int)r;
    *processor = (int)p;
    return 0;
}

static PyObject *
totals_tuple(const uint64_t totals[2 * PROCESSORS])
{
    return Py_BuildValue("(KKKK)",
                         (unsigned long long)totals[0], (unsigned long long)totals[1],
                         (unsigned long long)totals[2], (unsigned long long)totals[3]);
}


/* ----------------------------------------------------- */
/* Segment life cycle. */

static PyObject *
raise_errno(int err, PyObject *name)
{
    errno = err;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
}

static int
check_name(PyObject *name, const char **cname)
{
    Py_ssize_t len;

    *cname = PyUnicode_AsUTF8AndSize(name, &len);
    if (*cname == NULL) {
        return -1;
    }
    if (len < 2 || (*cname)[0] != '/' || strchr(*cname + 1, '/') != NULL
        || strlen(*cname) != (size_t)len) {
        PyErr_Format(PyExc_ValueError,
                     "segment name must be '/' then at least one character, "
                     "with no other '/' or NUL: %R", name);
        return -1;
    }
    return 0;
}

static int
ledger_create(LedgerObject *self, const char *cname, uint32_t seconds, uint32_t regions)
{
    size_t size = segment_size(seconds, regions);
    int fd, err;

    fd = shm_open(cname, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        raise_errno(errno, self->name);
        return -1;
    }
    /* Reserve the header, the directory and region 0 now: on a full
     * /dev/shm this fails here with ENOSPC instead of a SIGBUS in some
     * dispatcher mid-run.  Other regions are reserved when assigned. */
    if (ftruncate(fd, (off_t)size) < 0) {
        err = errno;
    }
    else {
        err = posix_fallocate(fd, 0, (off_t)(cells_offset(regions) + region_bytes(seconds)));
    }
    if (err == 0) {
        self->hdr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (self->hdr == MAP_FAILED) {
            self->hdr = NULL;
            err = errno;
        }
    }
    close(fd);
    if (err != 0) {
        shm_unlink(cname);
        raise_errno(err, self->name);
        return -1;
    }

    self->size = size;
    self->seconds = seconds;
    self->regions = regions;
    self->mask = seconds - 1;
    self->dir = (struct region_entry *)(self->hdr + 1);
    self->cells = (struct cell *)((char *)self->hdr + cells_offset(regions));
    self->hdr->version = LEDGER_VERSION;
    self->hdr->seconds = seconds;
    self->hdr->regions = regions;
    self->hdr->in_use = 1;
    self->hdr->sync_epoch = 0;
    /* The cells are zeros, which read as empty; only the spans need a value. */
    for (uint32_t r = 0; r < regions; r++) {
        span_reset(&self->dir[r].span);
    }
    /* Release, last: an opener that acquires the magic sees a finished
     * header and cells. */
    __atomic_store_n(&self->hdr->magic, LEDGER_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

static int
ledger_open(LedgerObject *self, const char *cname)
{
    struct stat st;
    struct header *hdr;
    uint32_t magic, seconds, regions, in_use;
    size_t size;
    int fd, err;

    fd = shm_open(cname, O_RDWR, 0);
    if (fd < 0) {
        raise_errno(errno, self->name);
        return -1;
    }
    if (fstat(fd, &st) < 0) {
        err = errno;
        close(fd);
        raise_errno(err, self->name);
        return -1;
    }
    size = (size_t)st.st_size;
    if (size < sizeof(struct header)) {
        close(fd);
        PyErr_Format(PyExc_ValueError,
                     "segment %R is %zu bytes, too small for a ledger", self->name, size);
        return -1;
    }
    hdr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    err = errno;
    close(fd);
    if (hdr == MAP_FAILED) {
        raise_errno(err, self->name);
        return -1;
    }

    /* Acquire: pairs with the creator's final release of the magic. */
    magic = __atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE);
    seconds = hdr->seconds;
    regions = hdr->regions;
    in_use = __atomic_load_n(&hdr->in_use, __ATOMIC_ACQUIRE);
    if (magic != LEDGER_MAGIC) {
        PyErr_Format(PyExc_ValueError,
                     "segment %R is not a rinha ledger (magic 0x%x%s)", self->name,
                     (unsigned int)magic, magic == 0 ? ", or still being created" : "");
    }
    else if (hdr->version != LEDGER_VERSION) {
        PyErr_Format(PyExc_ValueError,
                     "segment %R has ledger layout version %u, this module reads %u",
                     self->name, (unsigned int)hdr->version, LEDGER_VERSION);
    }
    else if (seconds < MIN_SECONDS || seconds > MAX_SECONDS
             || (seconds & (seconds - 1)) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "segment %R declares %u seconds, not a power of two in %u..%u",
                     self->name, (unsigned int)seconds, MIN_SECONDS, MAX_SECONDS);
    }
    else if (regions < MIN_REGIONS || regions > MAX_REGIONS
             || in_use < 1 || in_use > regions) {
        PyErr_Format(PyExc_ValueError,
                     "segment %R declares %u regions (%u in use), not %u..%u",
                     self->name, (unsigned int)regions, (unsigned int)in_use,
                     MIN_REGIONS, MAX_REGIONS);
    }
    else if (size != segment_size(seconds, regions)) {
        PyErr_Format(PyExc_ValueError,
                     "segment %R is %zu bytes, a ledger of %u seconds x %u regions is %zu",
                     self->name, size, (unsigned int)seconds, (unsigned int)regions,
                     segment_size(seconds, regions));
    }
    if (PyErr_Occurred()) {
        munmap(hdr, size);
        return -1;
    }

    self->hdr = hdr;
    self->size = size;
    self->seconds = seconds;
    self->regions = regions;
    self->mask = seconds - 1;
    self->dir = (struct region_entry *)(hdr + 1);
    self->cells = (struct cell *)((char *)hdr + cells_offset(regions));
    return 0;
}

static void
ledger_unmap(LedgerObject *self)
{
    if (self->hdr != NULL) {
        munmap(self->hdr, self->size);
        self->hdr = NULL;
        self->cells = NULL;
    }
}


/* ----------------------------------------------------- */
/* The Ledger type. */

static PyObject *
Ledger_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "create", "seconds", "regions", NULL};
    PyObject *name = NULL, *seconds_obj = NULL, *regions_obj = NULL;
    int create = -1;
    int64_t seconds = DEFAULT_SECONDS, regions = DEFAULT_REGIONS;
    const char *cname;
    LedgerObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|$pOO:Ledger", kwlist,
                                     &name, &create, &seconds_obj, &regions_obj)) {
        return NULL;
    }
    if (create < 0) {
        PyErr_SetString(PyExc_TypeError,
                        "Ledger() missing required keyword-only argument: 'create'");
        return NULL;
    }
    if (check_name(name, &cname) < 0) {
        return NULL;
    }
    if (create && seconds_obj != NULL) {
        if (as_int64(seconds_obj, "seconds", &seconds) < 0) {
            return NULL;
        }
        if (seconds < MIN_SECONDS || seconds > MAX_SECONDS
            || (seconds & (seconds - 1)) != 0) {
            PyErr_Format(PyExc_ValueError,
                         "seconds must be a power of two in %u..%u, got %R",
                         MIN_SECONDS, MAX_SECONDS, seconds_obj);
            return NULL;
        }
    }
    if (create && regions_obj != NULL) {
        if (as_int64(regions_obj, "regions", &regions) < 0) {
            return NULL;
        }
        if (regions < MIN_REGIONS || regions > MAX_REGIONS) {
            PyErr_Format(PyExc_ValueError, "regions must be in %u..%u, got %R",
                         MIN_REGIONS, MAX_REGIONS, regions_obj);
            return NULL;
        }
    }

    self = (LedgerObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(name);
    self->name = name;
    if ((create ? ledger_create(self, cname, (uint32_t)seconds, (uint32_t)regions)
                : ledger_open(self, cname)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
Ledger_dealloc(LedgerObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    ledger_unmap(self);
    Py_XDECREF(self->name);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Ledger_repr(LedgerObject *self)
{
    return PyUnicode_FromFormat("<Ledger name=%R seconds=%u%s>", self->name,
                                (unsigned int)self->seconds,
                                self->hdr == NULL ? " closed" : "");
}


PyDoc_STRVAR(Ledger_add__doc__,
"add($self, region, second, processor, cents, /)\n--\n\n"
"Count one payment of `cents` in that cell; return the cell's packed word\n"
"from before the add.\n\n"
"One atomic fetch-add of (1 << 40) + cents, safe from any number of\n"
"processes.  If the slot held another second (N or more seconds ago) it is\n"
"first reset for this one, which is not safe against another writer of the\n"
"same region: each region has a single writer.  cents must be in 0..2**40-1.");

static PyObject *
Ledger_add(LedgerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int region, processor;
    int64_t second, cents;
    struct cell *c;
    uint64_t before;

    if (parse_cell(self, args, nargs, 4, "add", &region, &second, &processor) < 0
        || as_bounded(args[3], "cents", (int64_t)MAX_CENTS, &cents) < 0) {
        return NULL;
    }
    c = slot_cells(self, region, second) + processor;
    cell_own(c, second);
    /* Acq_rel: release publishes the count and cents together to readers'
     * acquire loads; acquire makes the returned previous word the
     * one our add was applied to, after every earlier writer's add. */
    before = __atomic_fetch_add(&c->word, ONE_PAYMENT + (uint64_t)cents,
                                __ATOMIC_ACQ_REL);
    span_include(&self->dir[region].span, second);
    return PyLong_FromUnsignedLongLong(before);
}


PyDoc_STRVAR(Ledger_store__doc__,
"store($self, region, second, processor, count, cents, /)\n--\n\n"
"Set that cell to an absolute total (peer sync, restore).\n\n"
"Resets the slot like add() if it held another second, then stores the\n"
"packed word atomically.  count must be in 0..2**24-1, cents in 0..2**40-1.");

static PyObject *
Ledger_store(LedgerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int region, processor;
    int64_t second, count, cents;
    struct cell *c;

    if (parse_cell(self, args, nargs, 5, "store", &region, &second, &processor) < 0
        || as_bounded(args[3], "count", (int64_t)MAX_COUNT, &count) < 0
        || as_bounded(args[4], "cents", (int64_t)MAX_CENTS, &cents) < 0) {
        return NULL;
    }
    c = slot_cells(self, region, second) + processor;
    cell_own(c, second);
    /* Release: like add, publishes count and cents together. */
    __atomic_store_n(&c->word, ((uint64_t)count << CENTS_BITS) | (uint64_t)cents,
                     __ATOMIC_RELEASE);
    span_include(&self->dir[region].span, second);
    Py_RETURN_NONE;
}


PyDoc_STRVAR(Ledger_word__doc__,
"word($self, region, second, processor, /)\n--\n\n"
"The packed word (count << 40 | cents) of that second, 0 if its slot now\n"
"holds another second.");

static PyObject *
Ledger_word(LedgerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int region, processor;
    int64_t second;

    if (parse_cell(self, args, nargs, 3, "word", &region, &second, &processor) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(
        cell_read(slot_cells(self, region, second) + processor, second));
}


PyDoc_STRVAR(Ledger_get__doc__,
"get($self, region, second, processor, /)\n--\n\n"
"(count, cents) of that second, (0, 0) if its slot now holds another second.");

static PyObject *
Ledger_get(LedgerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int region, processor;
    int64_t second;
    uint64_t word;

    if (parse_cell(self, args, nargs, 3, "get", &region, &second, &processor) < 0) {
        return NULL;
    }
    word = cell_read(slot_cells(self, region, second) + processor, second);
    return Py_BuildValue("(KK)", (unsigned long long)(word >> CENTS_BITS),
                         (unsigned long long)(word & CENTS_MASK));
}


PyDoc_STRVAR(Ledger_summary__doc__,
"summary($self, from_second=None, to_second=None)\n--\n\n"
"(default_count, default_cents, fallback_count, fallback_cents) summed over\n"
"every region in use for from_second <= s <= to_second; None leaves that\n"
"side open.\n\n"
"Only seconds in a region's written span and among its N most recent are\n"
"visited; older ones may have been overwritten by the ring.");

static PyObject *
Ledger_summary(LedgerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"from_second", "to_second", NULL};
    PyObject *from_obj = Py_None, *to_obj = Py_None;
    int64_t from, to;
    uint64_t totals[2 * PROCESSORS] = {0};

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:summary", kwlist,
                                     &from_obj, &to_obj)
        || check_open(self) < 0
        || as_bound(from_obj, INT64_MIN, &from) < 0
        || as_bound(to_obj, INT64_MAX, &to) < 0) {
        return NULL;
    }
    uint32_t in_use = regions_in_use(self);
    for (uint32_t r = 0; r < in_use; r++) {
        region_sum(self, (int)r, from, to, totals);
    }
    return totals_tuple(totals);
}


PyDoc_STRVAR(Ledger_region_summary__doc__,
"region_summary($self, region, from_second=None, to_second=None)\n--\n\n"
"Like summary(), over one region only.");

static PyObject *
Ledger_region_summary(LedgerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"region", "from_second", "to_second", NULL};
    PyObject *region_obj, *from_obj = Py_None, *to_obj = Py_None;
    int64_t region, from, to;
    uint64_t totals[2 * PROCESSORS] = {0};

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OO:region_summary", kwlist,
                                     &region_obj, &from_obj, &to_obj)
        || check_open(self) < 0
        || as_region(self, region_obj, &region) < 0
        || as_bound(from_obj, INT64_MIN, &from) < 0
        || as_bound(to_obj, INT64_MAX, &to) < 0) {
        return NULL;
    }
    region_sum(self, (int)region, from, to, totals);
    return totals_tuple(totals);
}


PyDoc_STRVAR(Ledger_seconds_written__doc__,
"seconds_written($self, region, /)\n--\n\n"
"(min_second, max_second) ever written to that region since creation or\n"
"purge, None if none.  Seconds before max_second - N + 1 may be overwritten.");

static PyObject *
Ledger_seconds_written(LedgerObject *self, PyObject *region_obj)
{
    int64_t region, lo, hi;

    if (check_open(self) < 0
        || as_region(self, region_obj, &region) < 0) {
        return NULL;
    }
    if (!span_read(&self->dir[region].span, &lo, &hi)) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(LL)", (long long)lo, (long long)hi);
}


PyDoc_STRVAR(Ledger_purge__doc__,
"purge($self, region=None)\n--\n\n"
"Empty every cell of that region (every region in use if None) and forget\n"
"its span; the regions keep their labels.\n\n"
"Not atomic against concurrent writers: quiet them first.");

static PyObject *
Ledger_purge(LedgerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"region", NULL};
    PyObject *region_obj = Py_None;
    int64_t region;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:purge", kwlist, &region_obj)
        || check_open(self) < 0) {
        return NULL;
    }
    if (region_obj == Py_None) {
        uint32_t in_use = regions_in_use(self);
        for (uint32_t r = 0; r < in_use; r++) {
            region_purge(self, (int)r);
        }
    }
    else {
        if (as_region(self, region_obj, &region) < 0) {
            return NULL;
        }
        region_purge(self, (int)region);
    }
    Py_RETURN_NONE;
}


/* A region label: 1..LABEL_BYTES-1 bytes of UTF-8 with no NUL. */
static int
as_label(PyObject *obj, const char **out, Py_ssize_t *len)
{
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "label must be str, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = PyUnicode_AsUTF8AndSize(obj, len);
    if (*out == NULL) {
        return -1;
    }
    if (*len < 1 || *len >= LABEL_BYTES || strlen(*out) != (size_t)*len) {
        PyErr_Format(PyExc_ValueError, "label must be 1..%d bytes with no NUL: %R",
                     LABEL_BYTES - 1, obj);
        return -1;
    }
    return 0;
}

static int
find_label(const LedgerObject *self, const char *label, uint32_t in_use)
{
    for (uint32_t r = 1; r < in_use; r++) {
        if (strncmp(self->dir[r].label, label, LABEL_BYTES) == 0) {
            return (int)r;
        }
    }
    return -1;
}

/* Reserve a region's pages before it is used (see ledger_create). */
static int
reserve_region(LedgerObject *self, uint32_t region)
{
    const char *cname = PyUnicode_AsUTF8(self->name);
    int fd, err;

    if (cname == NULL) {
        return -1;
    }
    fd = shm_open(cname, O_RDWR, 0);
    if (fd < 0) {
        raise_errno(errno, self->name);
        return -1;
    }
    err = posix_fallocate(fd, (off_t)(cells_offset(self->regions)
                                      + (size_t)region * region_bytes(self->seconds)),
                          (off_t)region_bytes(self->seconds));
    close(fd);
    if (err != 0) {
        raise_errno(err, self->name);
        return -1;
    }
    return 0;
}


PyDoc_STRVAR(Ledger_region_of__doc__,
"region_of($self, label, /)\n--\n\n"
"The region labelled `label` (an instance's name), None if none is.");

static PyObject *
Ledger_region_of(LedgerObject *self, PyObject *label_obj)
{
    const char *label;
    Py_ssize_t len;
    int region;

    if (check_open(self) < 0 || as_label(label_obj, &label, &len) < 0) {
        return NULL;
    }
    region = find_label(self, label, regions_in_use(self));
    if (region < 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLong(region);
}


PyDoc_STRVAR(Ledger_assign_region__doc__,
"assign_region($self, label, /)\n--\n\n"
"The region labelled `label`, given the next free region (its pages\n"
"reserved first) if none is yet.  LookupError when every region is taken.\n\n"
"Labels are never taken back (a purge keeps them): an instance keeps its\n"
"region for the life of the segment.  One assigning process at a time:\n"
"the supervisor before it forks, then the dispatcher.");

static PyObject *
Ledger_assign_region(LedgerObject *self, PyObject *label_obj)
{
    const char *label;
    Py_ssize_t len;
    uint32_t in_use;
    int region;

    if (check_open(self) < 0 || as_label(label_obj, &label, &len) < 0) {
        return NULL;
    }
    in_use = regions_in_use(self);
    region = find_label(self, label, in_use);
    if (region >= 0) {
        return PyLong_FromLong(region);
    }
    if (in_use >= self->regions) {
        PyErr_Format(PyExc_LookupError,
                     "all %u regions of ledger %R are taken; %R cannot have one "
                     "(LEDGER_REGIONS bounds the instances of a deployment)",
                     (unsigned int)self->regions, self->name, label_obj);
        return NULL;
    }
    if (reserve_region(self, in_use) < 0) {
        return NULL;
    }
    memset(self->dir[in_use].label, 0, LABEL_BYTES);
    memcpy(self->dir[in_use].label, label, (size_t)len);
    span_reset(&self->dir[in_use].span);
    /* Release: a reader that sees the new count sees the label and span. */
    __atomic_store_n(&self->hdr->in_use, in_use + 1, __ATOMIC_RELEASE);
    return PyLong_FromUnsignedLong(in_use);
}


PyDoc_STRVAR(Ledger_labels__doc__,
"labels($self)\n--\n\n"
"The label of every region in use, by region ('' for region 0, this\n"
"instance's own).");

static PyObject *
Ledger_labels(LedgerObject *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t in_use;
    PyObject *list;

    if (check_open(self) < 0) {
        return NULL;
    }
    in_use = regions_in_use(self);
    list = PyList_New(in_use);
    if (list == NULL) {
        return NULL;
    }
    for (uint32_t r = 0; r < in_use; r++) {
        PyObject *text = PyUnicode_DecodeUTF8(
            self->dir[r].label, (Py_ssize_t)strnlen(self->dir[r].label, LABEL_BYTES),
            "replace");
        if (text == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, r, text);
    }
    return list;
}


PyDoc_STRVAR(Ledger_close__doc__,
"close($self)\n--\n\n"
"Unmap the segment (it stays in /dev/shm; see unlink()).  Idempotent; any\n"
"other call afterwards raises ValueError.");

static PyObject *
Ledger_close(LedgerObject *self, PyObject *Py_UNUSED(ignored))
{
    ledger_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *
Ledger_enter(LedgerObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Ledger_exit(LedgerObject *self, PyObject *const *Py_UNUSED(args),
            Py_ssize_t Py_UNUSED(nargs))
{
    ledger_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *
Ledger_get_name(LedgerObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->name);
    return self->name;
}

static PyObject *
Ledger_get_seconds(LedgerObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->seconds);
}

static PyObject *
Ledger_get_regions(LedgerObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->regions);
}

static PyObject *
Ledger_get_regions_in_use(LedgerObject *self, void *Py_UNUSED(closure))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(regions_in_use(self));
}

static PyObject *
Ledger_get_sync_epoch(LedgerObject *self, void *Py_UNUSED(closure))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(__atomic_load_n(&self->hdr->sync_epoch, __ATOMIC_ACQUIRE));
}

static int
Ledger_set_sync_epoch(LedgerObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    int64_t epoch;

    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "sync_epoch cannot be deleted");
        return -1;
    }
    if (check_open(self) < 0 || as_bounded(value, "sync_epoch", UINT32_MAX, &epoch) < 0) {
        return -1;
    }
    __atomic_store_n(&self->hdr->sync_epoch, (uint32_t)epoch, __ATOMIC_RELEASE);
    return 0;
}

static PyObject *
Ledger_get_closed(LedgerObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->hdr == NULL);
}


static struct PyMethodDef Ledger_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Ledger_add, METH_FASTCALL,
        Ledger_add__doc__},
    {"store", (PyCFunction)(void (*)(void))Ledger_store, METH_FASTCALL,
        Ledger_store__doc__},
    {"word", (PyCFunction)(void (*)(void))Ledger_word, METH_FASTCALL,
        Ledger_word__doc__},
    {"get", (PyCFunction)(void (*)(void))Ledger_get, METH_FASTCALL,
        Ledger_get__doc__},
    {"summary", (PyCFunction)(void (*)(void))Ledger_summary,
        METH_VARARGS | METH_KEYWORDS, Ledger_summary__doc__},
    {"region_summary", (PyCFunction)(void (*)(void))Ledger_region_summary,
        METH_VARARGS | METH_KEYWORDS, Ledger_region_summary__doc__},
    {"seconds_written", (PyCFunction)Ledger_seconds_written, METH_O,
        Ledger_seconds_written__doc__},
    {"purge", (PyCFunction)(void (*)(void))Ledger_purge,
        METH_VARARGS | METH_KEYWORDS, Ledger_purge__doc__},
    {"region_of", (PyCFunction)Ledger_region_of, METH_O, Ledger_region_of__doc__},
    {"assign_region", (PyCFunction)Ledger_assign_region, METH_O,
        Ledger_assign_region__doc__},
    {"labels", (PyCFunction)Ledger_labels, METH_NOARGS, Ledger_labels__doc__},
    {"close", (PyCFunction)Ledger_close, METH_NOARGS, Ledger_close__doc__},
    {"__enter__", (PyCFunction)Ledger_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Ledger_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL}       /* sentinel */
};

static PyGetSetDef Ledger_getset[] = {
    {"name", (getter)Ledger_get_name, NULL, "The shared-memory segment name.", NULL},
    {"seconds", (getter)Ledger_get_seconds, NULL,
        "N, the seconds in each region's ring.", NULL},
    {"regions", (getter)Ledger_get_regions, NULL,
        "R, the most regions (instances of the deployment) it can hold.", NULL},
    {"regions_in_use", (getter)Ledger_get_regions_in_use, NULL,
        "Regions labelled so far, region 0 included.", NULL},
    {"sync_epoch", (getter)Ledger_get_sync_epoch, (setter)Ledger_set_sync_epoch,
        "The Redis carrier's purge generation the cells belong to (0: none yet).", NULL},
    {"closed", (getter)Ledger_get_closed, NULL, "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL}  /* sentinel */
};

PyDoc_STRVAR(Ledger__doc__,
"Ledger(name, *, create, seconds=131072, regions=16)\n--\n\n"
"A mapping of the shared-memory payment ledger `name` (e.g. '/rinha-api1-ledger').\n\n"
"create=True makes a new segment of `seconds` per ring (a power of two, at\n"
"least 1024; the default is about 36.4 h) and `regions` (2..256: this\n"
"instance's own and a mirror of each other one), and raises FileExistsError\n"
"if the name exists.  create=False opens an existing one, takes N and R from\n"
"its header and ignores both; a missing name raises FileNotFoundError and a\n"
"segment that is not a ledger of this layout raises ValueError.\n\n"
"Each region is a ring of N seconds: a second is overwritten when its slot\n"
"is reused N seconds later.");

static PyType_Slot Ledger_slots[] = {
    {Py_tp_doc, (void *)Ledger__doc__},
    {Py_tp_new, Ledger_new},
    {Py_tp_dealloc, Ledger_dealloc},
    {Py_tp_repr, Ledger_repr},
    {Py_tp_methods, Ledger_methods},
    {Py_tp_getset, Ledger_getset},
    {0, NULL}                   /* sentinel */
};

static PyType_Spec Ledger_spec = {
    .name = "native_ledger._ledger.Ledger",
    .basicsize = sizeof(LedgerObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Ledger_slots,
};


/* ----------------------------------------------------- */
/* Module functions. */

PyDoc_STRVAR(ledger_unlink__doc__,
"unlink($module, name, /)\n--\n\n"
"Remove the segment `name`; False if it did not exist.  Processes that\n"
"mapped it keep their mapping until they close it.");

static PyObject *
ledger_unlink(PyObject *Py_UNUSED(module), PyObject *name)
{
    const char *cname;

    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "name must be str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    if (check_name(name, &cname) < 0) {
        return NULL;
    }
    if (shm_unlink(cname) < 0) {
        if (errno == ENOENT) {
            Py_RETURN_FALSE;
        }
        return raise_errno(errno, name);
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(ledger_pack__doc__,
"pack($module, count, cents, /)\n--\n\n"
"The packed word count << 40 | cents.");

static PyObject *
ledger_pack(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int64_t count, cents;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "pack() takes exactly 2 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (as_bounded(args[0], "count", (int64_t)MAX_COUNT, &count) < 0
        || as_bounded(args[1], "cents", (int64_t)MAX_CENTS, &cents) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(((uint64_t)count << CENTS_BITS) | (uint64_t)cents);
}

PyDoc_STRVAR(ledger_unpack__doc__,
"unpack($module, word, /)\n--\n\n"
"(count, cents) of a packed word, such as add()'s return value.");

static PyObject *
ledger_unpack(PyObject *Py_UNUSED(module), PyObject *word_obj)
{
    unsigned long long word = PyLong_AsUnsignedLongLong(word_obj);

    if (word == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Format(PyExc_ValueError, "word must be in 0..2**64-1, got %R",
                         word_obj);
        }
        return NULL;
    }
    return Py_BuildValue("(KK)", word >> CENTS_BITS, word & CENTS_MASK);
}

static struct PyMethodDef ledger_methods[] = {
    {"unlink", (PyCFunction)ledger_unlink, METH_O, ledger_unlink__doc__},
    {"pack", (PyCFunction)(void (*)(void))ledger_pack, METH_FASTCALL,
        ledger_pack__doc__},
    {"unpack", (PyCFunction)ledger_unpack, METH_O, ledger_unpack__doc__},
    {NULL, NULL, 0, NULL}       /* sentinel */
};


/* ----------------------------------------------------- */
/* Multi-phase initialisation. */

static int
ledger_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &Ledger_spec, NULL);

    if (type == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, (PyTypeObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    Py_DECREF(type);

    PyObject *max_cents = PyLong_FromUnsignedLongLong(MAX_CENTS);
    int failed = max_cents == NULL
        || PyModule_AddObjectRef(module, "MAX_CENTS", max_cents) < 0;
    Py_XDECREF(max_cents);
    if (failed) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "OWN", 0) < 0
        || PyModule_AddIntConstant(module, "PEER", 1) < 0
        || PyModule_AddIntConstant(module, "DEFAULT", 0) < 0
        || PyModule_AddIntConstant(module, "FALLBACK", 1) < 0
        || PyModule_AddIntConstant(module, "COUNT_BITS", COUNT_BITS) < 0
        || PyModule_AddIntConstant(module, "CENTS_BITS", CENTS_BITS) < 0
        || PyModule_AddIntConstant(module, "MAX_COUNT", (long)MAX_COUNT) < 0
        || PyModule_AddIntConstant(module, "DEFAULT_SECONDS", DEFAULT_SECONDS) < 0
        || PyModule_AddIntConstant(module, "MIN_SECONDS", MIN_SECONDS) < 0
        || PyModule_AddIntConstant(module, "MAX_SECONDS", MAX_SECONDS) < 0
        || PyModule_AddIntConstant(module, "DEFAULT_REGIONS", DEFAULT_REGIONS) < 0
        || PyModule_AddIntConstant(module, "MIN_REGIONS", MIN_REGIONS) < 0
        || PyModule_AddIntConstant(module, "MAX_REGIONS", MAX_REGIONS) < 0
        || PyModule_AddIntConstant(module, "LABEL_BYTES", LABEL_BYTES) < 0
        || PyModule_AddIntConstant(module, "LAYOUT_VERSION", LEDGER_VERSION) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot ledger_slots[] = {
    {Py_mod_exec, ledger_exec},
    {0, NULL}                   /* sentinel */
};

PyDoc_STRVAR(ledger_module__doc__,
"The shared-memory ledger of processed payments (see native_ledger).");

static struct PyModuleDef ledger_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "native_ledger._ledger",
    .m_doc = ledger_module__doc__,
    .m_size = 0,
    .m_methods = ledger_methods,
    .m_slots = ledger_slots,
};

PyMODINIT_FUNC
PyInit__ledger(void)
{
    return PyModuleDef_Init(&ledger_module);
}
