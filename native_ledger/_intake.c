/*-------------------------------------------------------------------------
 *
 * _intake.c
 *    POST /payments answered in C inside each socketify worker.
 *
 * Every payment of the contest enters through POST /payments, hundreds a
 * second, and each one costs a worker's CPU: the route in Python
 * (rinha/body_route.py: cffi callbacks, json and Decimal, posix_ipc) cost
 * 39-47 us of worker CPU per request where nginx answering 202 by itself
 * costs 18.6 us.  Here the usual request never leaves C: uWS hands the body
 * to on_data(), parse_payment() turns it into the 24-byte queue record
 * (rinha/wire.py's "<16sq": 16 raw UUID bytes, int64 cents), mq_timedsend()
 * queues it and the answer is 202 with Content-Length 0: four system calls
 * (epoll_wait, recvfrom, mq_timedsend, sendto) and no Python, about what
 * nginx spends on answering 202 itself (0.96-1.07x its CPU per request in
 * benchmarks/budgets.py, against 1.64-1.77x for the Python route).
 *
 * One definition of what is valid: Python's.  parse_payment() accepts only
 * the exact shape clients send, {"correlationId":"<uuid>","amount":<n>}
 * with no whitespace, that key order, a plain amount of at most 7 integer
 * digits and 2 decimals, 0.01 to 1000000.00.  Anything else, however
 * harmless (other key order, whitespace, escapes, exponents, 19.900, a body
 * in more than one chunk, a queue error other than "full"), goes to the
 * Python callback `on_body` (rinha.intake's parse_payment and queue send),
 * and its answer stands.  So C answers only bodies it is certain Python
 * would accept with the same record; tests/unit/test_native_intake.py
 * checks that on 100,000+ generated bodies through parse().
 *
 * How uWS is reached.  The route is registered on socketify's App through
 * uWS's C API inside socketify's own libsocketify_linux_amd64.so, already
 * loaded by cffi.  The functions are found by dlopen(RTLD_NOLOAD) and dlsym
 * on that library, not by addresses handed over from cffi: both give the
 * same addresses (resolve() shows them, a test compares), and both end as
 * function pointers in the route, so the calls cost the same; measured at
 * start-up, the 7 functions take ~6 us through cffi's addressof and ~1 us
 * through dlsym, once per worker.  dlsym wins on what it checks: the names are
 * looked up in the library itself, and a route cannot be built from an
 * integer that is not the function it claims to be.  RTLD_NOLOAD refuses to
 * load a second copy (uWS's loop state lives in the one socketify uses);
 * the handle is never closed, so the library outlives every route.
 *
 * The GIL.  socketify's loop runs inside uv_run(), called through cffi,
 * which releases the GIL for the call; uWS then calls on_request(),
 * on_data() and on_aborted() on the loop's thread WITHOUT the GIL.  The
 * fast path touches no Python object and needs none; only the path to
 * Python takes it (PyGILState_Ensure, which finds the thread's own state)
 * and holds it until uWS has copied Python's answer.
 *
 * Per-request state and uWS's rules.  on_request() allocates one small
 * struct request (freed exactly once: in on_data() at the last chunk, or in
 * on_aborted()) and registers on_aborted() before returning, as uWS demands
 * of a handler that returns without responding.  A response is ended
 * exactly once, at the last chunk; uWS's end() writes the whole response
 * into the socket's buffer and then marks the response done, which clears
 * onAborted (and onData) before any close, so on_aborted() cannot fire
 * after the end and never meets a freed request (uWS HttpResponse.h,
 * internalEnd and HttpResponseData::markDone; the 50-hang-ups and 413
 * tests run under AddressSanitizer).  The usual body arrives in one chunk
 * and is parsed where uWS holds it; a body in several chunks is gathered
 * into a buffer of max_body bytes, allocated at its first chunk.  A body
 * over max_body is read to its end and discarded, then answered 413 with
 * the connection closed, as body_route.py does.
 *
 * The queue.  mq_timedsend() with an absolute timeout long past never
 * waits: a full queue fails at once with ETIMEDOUT (or EAGAIN if the
 * descriptor is non-blocking), and the answer is 503.  The descriptor's
 * O_NONBLOCK flag is left alone: the dispatcher shares the open file
 * description and sets it for its own reads.
 *
 *-------------------------------------------------------------------------
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <mqueue.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RECORD_SIZE 24                  /* wire.PAYMENT_RECORD: "<16sq" */
#define UUID_BYTES 16
#define UUID_TEXT 36
#define MAX_AMOUNT_CENTS INT64_C(100000000)     /* wire.MAX_AMOUNT_CENTS */
#define MAX_WHOLE_DIGITS 7              /* 1000000 */
#define MAX_BODY_LIMIT (1 << 20)        /* a sanity cap on max_body */

/* The exact text around the two values. */
static const char BODY_HEAD[] = "{\"correlationId\":\"";
static const char BODY_MIDDLE[] = "\",\"amount\":";
#define HEAD_LENGTH (sizeof(BODY_HEAD) - 1)
#define MIDDLE_LENGTH (sizeof(BODY_MIDDLE) - 1)
#define AMOUNT_AT (HEAD_LENGTH + UUID_TEXT + MIDDLE_LENGTH)
#define SHORTEST_BODY (AMOUNT_AT + 1 + 1)               /* amount "1" */
#define LONGEST_BODY (AMOUNT_AT + MAX_WHOLE_DIGITS + 3 + 1)  /* "1000000.00" */

static const char JSON_TYPE[] = "application/json";
static const char INTERNAL_ERROR[] = "{\"error\": \"internal error\"}";


/* ----------------------------------------------------- */
/* The parser: certain or silent. */

static int
hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c |= 0x20;                          /* ASCII letters to lower case */
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

/* The 16 bytes of a canonical 8-4-4-4-12 UUID, either case, as
 * wire.parse_uuid reads it. */
static bool
parse_uuid(const unsigned char *text, unsigned char out[UUID_BYTES])
{
    int n = 0;

    for (int i = 0; i < UUID_TEXT; ) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-') {
                return false;
            }
            i++;
            continue;
        }
        int high = hex_value(text[i]);
        int low = hex_value(text[i + 1]);
        if (high < 0 || low < 0) {
            return false;
        }
        out[n++] = (unsigned char)(high << 4 | low);
        i += 2;
    }
    return true;
}

/* Integer cents of a plain decimal literal: no sign, no exponent, no
 * leading zero, 1-7 integer digits, 0-2 decimals, 0 < cents <= MAX.  Any
 * other literal, even one Python accepts (20.000, 1e2), returns false. */
static bool
parse_amount(const unsigned char *p, const unsigned char *end, int64_t *cents)
{
    int64_t whole = 0, fraction = 0;
    int digits = 0;

    if (p < end && *p == '0') {
        p++;                            /* "0" must be followed by decimals */
        if (p == end || *p != '.') {
            return false;
        }
    }
    else {
        while (p < end && *p >= '0' && *p <= '9') {
            if (++digits > MAX_WHOLE_DIGITS) {
                return false;
            }
            whole = whole * 10 + (*p++ - '0');
        }
        if (digits == 0) {
            return false;
        }
    }
    if (p < end && *p == '.') {
        p++;
        if (p == end || *p < '0' || *p > '9') {
            return false;
        }
        fraction = (*p++ - '0') * 10;
        if (p < end && *p >= '0' && *p <= '9') {
            fraction += *p++ - '0';
        }
    }
    if (p != end) {
        return false;
    }
    *cents = whole * 100 + fraction;
    return *cents > 0 && *cents <= MAX_AMOUNT_CENTS;
}

/* The queue record of a body C is certain about, or false: let Python
 * answer.  Lengths are checked first, so every read stays in the body. */
static bool
parse_payment(const char *body, size_t length, unsigned char record[RECORD_SIZE])
{
    const unsigned char *s = (const unsigned char *)body;
    int64_t cents;

    if (length < SHORTEST_BODY || length > LONGEST_BODY
        || memcmp(s, BODY_HEAD, HEAD_LENGTH) != 0
        || memcmp(s + HEAD_LENGTH + UUID_TEXT, BODY_MIDDLE, MIDDLE_LENGTH) != 0
        || s[length - 1] != '}'
        || !parse_uuid(s + HEAD_LENGTH, record)
        || !parse_amount(s + AMOUNT_AT, s + length - 1, &cents)) {
        return false;
    }
    /* int64 little-endian, whatever the host's order. */
    for (int i = 0; i < 8; i++) {
        record[UUID_BYTES + i] = (unsigned char)((uint64_t)cents >> (8 * i));
    }
    return true;
}


/* ----------------------------------------------------- */
/* uWS's C API, as socketify's library exports it (socketify/native.py). */

typedef struct uws_app_s uws_app_t;
typedef struct uws_req_s uws_req_t;
typedef struct uws_res_s uws_res_t;

typedef void (*request_handler)(uws_res_t *, uws_req_t *, void *);
typedef void (*data_handler)(uws_res_t *, const char *, size_t, bool, void *);
typedef void (*aborted_handler)(uws_res_t *, void *);

struct uws_api {
    void (*app_post)(int, uws_app_t *, const char *, request_handler, void *);
    void (*res_on_data)(int, uws_res_t *, data_handler, void *);
    void (*res_on_aborted)(int, uws_res_t *, aborted_handler, void *);
    void (*res_write_status)(int, uws_res_t *, const char *, size_t);
    bool (*res_write_int_status)(int, uws_res_t *, int);
    void (*res_write_header)(int, uws_res_t *, const char *, size_t, const char *, size_t);
    void (*res_end)(int, uws_res_t *, const char *, size_t, bool);
};

static const struct {
    const char *name;
    size_t offset;
} API_SYMBOLS[] = {
    {"uws_app_post", offsetof(struct uws_api, app_post)},
    {"uws_res_on_data", offsetof(struct uws_api, res_on_data)},
    {"uws_res_on_aborted", offsetof(struct uws_api, res_on_aborted)},
    {"uws_res_write_status", offsetof(struct uws_api, res_write_status)},
    {"socketify_res_write_int_status", offsetof(struct uws_api, res_write_int_status)},
    {"uws_res_write_header", offsetof(struct uws_api, res_write_header)},
    {"uws_res_end", offsetof(struct uws_api, res_end)},
};
#define API_COUNT (sizeof(API_SYMBOLS) / sizeof(API_SYMBOLS[0]))

/* Fill `api` from the already loaded library at `path`; -1 with an
 * exception set if it is not loaded or lacks a function. */
static int
resolve_api(const char *path, struct uws_api *api)
{
    /* Never closed: the route keeps calling into the library. */
    void *library = dlopen(path, RTLD_NOW | RTLD_NOLOAD);

    if (library == NULL) {
        PyErr_Format(PyExc_OSError,
                     "socketify's library %s is not loaded (import socketify first): %s",
                     path, dlerror());
        return -1;
    }
    for (size_t i = 0; i < API_COUNT; i++) {
        void *function = dlsym(library, API_SYMBOLS[i].name);
        if (function == NULL) {
            PyErr_Format(PyExc_OSError, "%s has no %s", path, API_SYMBOLS[i].name);
            return -1;
        }
        /* POSIX guarantees a data pointer from dlsym converts to a function
         * pointer; memcpy says so without a cast the C standard frowns on. */
        memcpy((char *)api + API_SYMBOLS[i].offset, &function, sizeof(function));
    }
    return 0;
}


/* ----------------------------------------------------- */
/* The route. */

struct route_counts {
    unsigned long long accepted;        /* queued and answered 202 in C */
    unsigned long long full;            /* answered 503 in C: the queue was full */
    unsigned long long too_large;       /* answered 413 in C */
    unsigned long long deferred;        /* answered by on_body (Python) */
    unsigned long long aborted;         /* the client left before the last chunk */
    unsigned long long in_progress;     /* requests allocated and not yet freed */
};

typedef struct {
    PyObject_HEAD
    struct uws_api api;
    int ssl;
    mqd_t mqd;
    size_t max_body;
    PyObject *on_body;                  /* body -> (status, payload) */
    PyObject *too_large;                /* bytes: the 413 body */
    PyObject *queue_full;               /* bytes: the 503 body */
    struct route_counts counts;         /* touched on the loop's thread only */
    /* The worker's shared counters of POST /payments (rinha/metrics.py), where the
     * answers given in C are added; NULL when none were given.  This worker is their
     * only writer, so a plain increment is enough. */
    Py_buffer shared;
    uint64_t *shared_accepted, *shared_full, *shared_too_large;
} RouteObject;

/* Add one to a shared counter, if the route has them. */
static inline void
count_shared(uint64_t *counter)
{
    if (counter != NULL) {
        (*counter)++;
    }
}

/* One request whose body is arriving. */
struct request {
    RouteObject *route;
    char *body;                         /* max_body bytes once a chunk came before the last */
    size_t length;                      /* bytes gathered into body */
    bool gathered;                      /* a chunk came before the last one */
    bool too_large;                     /* over max_body: discard, answer 413 at the end */
    bool failed;                        /* no memory for the body: answer 500 at the end */
};

static void
request_free(struct request *request)
{
    request->route->counts.in_progress--;
    free(request->body);
    free(request);
}

/* Status, Content-Type if there is a body, the body; exactly once per
 * response.  uWS writes Content-Length, 0 for an empty body, which nginx's
 * keep-alive upstreams need. */
static void
reply(RouteObject *route, uws_res_t *res, int status, const char *payload, size_t length,
      bool close_connection)
{
    route->api.res_write_int_status(route->ssl, res, status);
    if (length) {
        route->api.res_write_header(route->ssl, res, "Content-Type", 12,
                                    JSON_TYPE, sizeof(JSON_TYPE) - 1);
    }
    route->api.res_end(route->ssl, res, payload, length, close_connection);
}

static void
reply_bytes(RouteObject *route, uws_res_t *res, int status, PyObject *payload,
            bool close_connection)
{
    /* Immutable bytes owned by the route: readable without the GIL. */
    reply(route, res, status, PyBytes_AS_STRING(payload),
          (size_t)PyBytes_GET_SIZE(payload), close_connection);
}

/* Python's answer to the body; takes the GIL for the call. */
static void
answer_in_python(RouteObject *route, uws_res_t *res, const char *body, size_t length)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = NULL;
    PyObject *data = PyBytes_FromStringAndSize(body, (Py_ssize_t)length);
    long status = 0;

    route->counts.deferred++;
    if (data != NULL) {
        result = PyObject_CallOneArg(route->on_body, data);
        Py_DECREF(data);
    }
    if (result != NULL) {
        if (PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 2
            && PyLong_Check(PyTuple_GET_ITEM(result, 0))
            && PyBytes_Check(PyTuple_GET_ITEM(result, 1))) {
            status = PyLong_AsLong(PyTuple_GET_ITEM(result, 0));
            if (status == -1 && PyErr_Occurred()) {
                PyErr_Clear();
            }
        }
        if (status < 100 || status > 599) {
            PyErr_Format(PyExc_TypeError,
                         "on_body must return (status, bytes), got %R", result);
            Py_CLEAR(result);
        }
    }
    if (result == NULL) {
        /* on_body is meant never to raise (body_route.py catches and logs);
         * if it does, the client still gets an answer. */
        PyErr_WriteUnraisable(route->on_body);
        reply(route, res, 500, INTERNAL_ERROR, sizeof(INTERNAL_ERROR) - 1, false);
    }
    else {
        /* Still under the GIL: the payload lives until uWS has copied it. */
        reply_bytes(route, res, (int)status, PyTuple_GET_ITEM(result, 1), false);
        Py_DECREF(result);
    }
    PyGILState_Release(gil);
}

enum sent { SENT, FULL, FAILED };

static enum sent
enqueue(mqd_t mqd, const unsigned char record[RECORD_SIZE])
{
    /* Long past: a full queue fails at once instead of waiting. */
    static const struct timespec already_passed = {0, 0};
    int rc;

    do {
        rc = mq_timedsend(mqd, (const char *)record, RECORD_SIZE, 0, &already_passed);
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
        return SENT;
    }
    return (errno == ETIMEDOUT || errno == EAGAIN) ? FULL : FAILED;
}

/* A whole body: queued and answered in C if certain, else Python's. */
static void
answer(RouteObject *route, uws_res_t *res, const char *body, size_t length)
{
    unsigned char record[RECORD_SIZE];

    if (parse_payment(body, length, record)) {
        switch (enqueue(route->mqd, record)) {
        case SENT:
            route->counts.accepted++;
            count_shared(route->shared_accepted);
            route->api.res_write_status(route->ssl, res, "202 Accepted", 12);
            route->api.res_end(route->ssl, res, "", 0, false);
            return;
        case FULL:
            /* An explicit refusal, never a silent drop (invariant 1). */
            route->counts.full++;
            count_shared(route->shared_full);
            reply_bytes(route, res, 503, route->queue_full, false);
            return;
        case FAILED:
            break;                      /* nothing was queued: Python tries, and says */
        }
    }
    answer_in_python(route, res, body, length);
}

static void
on_aborted(uws_res_t *Py_UNUSED(res), void *user_data)
{
    struct request *request = user_data;

    request->route->counts.aborted++;
    request_free(request);
}

static void
on_data(uws_res_t *res, const char *chunk, size_t length, bool last, void *user_data)
{
    struct request *request = user_data;
    RouteObject *route = request->route;

    if (!last) {
        request->gathered = true;
        if (request->too_large || request->failed) {
            return;
        }
        if (length > route->max_body - request->length) {
            request->too_large = true;  /* read on to the end, keep nothing */
            return;
        }
        if (request->body == NULL && (request->body = malloc(route->max_body)) == NULL) {
            request->failed = true;
            return;
        }
        memcpy(request->body + request->length, chunk, length);
        request->length += length;
        return;
    }

    /* The last chunk: answer, then free the request (nothing calls back
     * for it after the end; see the header comment). */
    if (request->too_large || length > route->max_body - request->length) {
        route->counts.too_large++;
        count_shared(route->shared_too_large);
        reply_bytes(route, res, 413, route->too_large, true);
    }
    else if (request->failed) {
        reply(route, res, 500, INTERNAL_ERROR, sizeof(INTERNAL_ERROR) - 1, false);
    }
    else if (!request->gathered) {
        answer(route, res, chunk, length);  /* the usual case: one chunk, read in place */
    }
    else {
        if (length) {
            memcpy(request->body + request->length, chunk, length);
        }
        /* Several chunks: Python's, as the parser takes one chunk only. */
        answer_in_python(route, res, request->body, request->length + length);
    }
    request_free(request);
}

static void
on_request(uws_res_t *res, uws_req_t *Py_UNUSED(req), void *user_data)
{
    RouteObject *route = user_data;
    struct request *request = calloc(1, sizeof(*request));

    if (request == NULL) {
        reply(route, res, 500, INTERNAL_ERROR, sizeof(INTERNAL_ERROR) - 1, false);
        return;
    }
    request->route = route;
    route->counts.in_progress++;
    /* uWS terminates a process whose handler returns without responding
     * and without an abort handler. */
    route->api.res_on_aborted(route->ssl, res, on_aborted, request);
    route->api.res_on_data(route->ssl, res, on_data, request);
}


/* ----------------------------------------------------- */
/* The Python face of the route. */

static int
as_bytes(PyObject *obj, const char *what)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* Point the route's shared counters into `counts`, a writable buffer of
 * 8-byte words (a slice of rinha/metrics.py's segment), at `indexes`. */
static int
attach_shared_counts(RouteObject *self, PyObject *counts, const Py_ssize_t indexes[3])
{
    uint64_t *words;
    Py_ssize_t n;

    if (PyObject_GetBuffer(counts, &self->shared, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    words = self->shared.buf;
    n = self->shared.len / (Py_ssize_t)sizeof(uint64_t);
    if ((uintptr_t)words % _Alignof(uint64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "shared_counts must be 8-byte aligned");
        goto fail;
    }
    for (int i = 0; i < 3; i++) {
        if (indexes[i] < 0 || indexes[i] >= n) {
            PyErr_Format(PyExc_ValueError, "counter index %zd outside shared_counts (%zd words)",
                         indexes[i], n);
            goto fail;
        }
    }
    self->shared_accepted = &words[indexes[0]];
    self->shared_full = &words[indexes[1]];
    self->shared_too_large = &words[indexes[2]];
    return 0;
fail:
    PyBuffer_Release(&self->shared);
    self->shared.obj = NULL;
    return -1;
}

static PyObject *
Route_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"library", "app", "ssl", "pattern", "mqd", "on_body",
                             "max_body", "too_large", "queue_full", "shared_counts",
                             "accepted_index", "full_index", "too_large_index", NULL};
    PyObject *library = NULL, *on_body, *too_large, *queue_full, *shared_counts = Py_None;
    unsigned long long app;
    int ssl, mqd;
    const char *pattern;
    Py_ssize_t max_body, indexes[3] = {0, 0, 0};
    RouteObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&KpsiOnOO|$Onnn:PaymentRoute", kwlist,
                                     PyUnicode_FSConverter, &library, &app, &ssl,
                                     &pattern, &mqd, &on_body, &max_body, &too_large,
                                     &queue_full, &shared_counts, &indexes[0], &indexes[1],
                                     &indexes[2])) {
        return NULL;
    }
    if (app == 0 || !PyCallable_Check(on_body) || max_body < 1 || max_body > MAX_BODY_LIMIT
        || mqd < 0 || as_bytes(too_large, "too_large") < 0
        || as_bytes(queue_full, "queue_full") < 0) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError,
                         "need an app address, a callable on_body, 1 <= max_body <= %d "
                         "and a queue descriptor", MAX_BODY_LIMIT);
        }
        Py_DECREF(library);
        return NULL;
    }
    self = (RouteObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(library);
        return NULL;
    }
    if (shared_counts != Py_None && attach_shared_counts(self, shared_counts, indexes) < 0) {
        Py_DECREF(library);
        Py_DECREF(self);
        return NULL;
    }
    int resolved = resolve_api(PyBytes_AS_STRING(library), &self->api);
    Py_DECREF(library);
    if (resolved < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->ssl = ssl;
    self->mqd = (mqd_t)mqd;
    self->max_body = (size_t)max_body;
    self->on_body = Py_NewRef(on_body);
    self->too_large = Py_NewRef(too_large);
    self->queue_full = Py_NewRef(queue_full);
    /* uWS keeps `self` as the route's user data for as long as the app
     * lives and cannot forget a route: the registered object is never
     * freed (this reference is never released). */
    Py_INCREF(self);
    self->api.app_post(ssl, (uws_app_t *)(uintptr_t)app, pattern, on_request, self);
    return (PyObject *)self;
}

static void
Route_dealloc(RouteObject *self)
{
    /* Reached only by a route that failed before registering. */
    PyTypeObject *tp = Py_TYPE(self);

    Py_XDECREF(self->on_body);
    Py_XDECREF(self->too_large);
    Py_XDECREF(self->queue_full);
    if (self->shared.obj != NULL) {
        PyBuffer_Release(&self->shared);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(Route_counts__doc__,
"counts($self)\n--\n\n"
"What the route did so far: a dict of accepted (queued, 202 in C), full\n"
"(503 in C), too_large (413 in C), deferred (answered by on_body), aborted\n"
"(the client left mid-body) and in_progress (requests not yet freed).");

static PyObject *
Route_counts(RouteObject *self, PyObject *Py_UNUSED(ignored))
{
    const struct route_counts *c = &self->counts;

    return Py_BuildValue("{sKsKsKsKsKsK}", "accepted", c->accepted, "full", c->full,
                         "too_large", c->too_large, "deferred", c->deferred,
                         "aborted", c->aborted, "in_progress", c->in_progress);
}

static struct PyMethodDef Route_methods[] = {
    {"counts", (PyCFunction)Route_counts, METH_NOARGS, Route_counts__doc__},
    {NULL, NULL, 0, NULL}       /* sentinel */
};

PyDoc_STRVAR(Route__doc__,
"PaymentRoute(library, app, ssl, pattern, mqd, on_body, max_body, too_large, queue_full)\n"
"--\n\n"
"Register POST `pattern` on the uWS app at address `app` (socketify's\n"
"`app.app`; `ssl` its `app.SSL`), through the functions of socketify's\n"
"loaded library at path `library`.  A body C is certain about is queued as\n"
"a 24-byte record on the POSIX queue descriptor `mqd` and answered 202 (503\n"
"with `queue_full` if the queue is full); a body over `max_body` bytes is\n"
"answered 413 with `too_large` and the connection closed; every other body\n"
"is passed to `on_body(body) -> (status, payload bytes)`, called with the\n"
"GIL, whose answer is sent as is.\n\n"
"uWS cannot remove a route: the object lives as long as the process.");

static PyType_Slot Route_slots[] = {
    {Py_tp_doc, (void *)Route__doc__},
    {Py_tp_new, Route_new},
    {Py_tp_dealloc, Route_dealloc},
    {Py_tp_methods, Route_methods},
    {0, NULL}                   /* sentinel */
};

static PyType_Spec Route_spec = {
    .name = "native_ledger._intake.PaymentRoute",
    .basicsize = sizeof(RouteObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Route_slots,
};


/* ----------------------------------------------------- */
/* Module functions. */

PyDoc_STRVAR(intake_parse__doc__,
"parse($module, body, /)\n--\n\n"
"The 24-byte queue record (16 UUID bytes, int64 little-endian cents) of a\n"
"POST /payments body the C route would queue itself, or None for a body\n"
"it leaves to Python.  The route's own parser, for tests.");

static PyObject *
intake_parse(PyObject *Py_UNUSED(module), PyObject *body)
{
    Py_buffer view;
    unsigned char record[RECORD_SIZE];

    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    bool certain = parse_payment(view.buf, (size_t)view.len, record);
    PyBuffer_Release(&view);
    if (!certain) {
        Py_RETURN_NONE;
    }
    return PyBytes_FromStringAndSize((const char *)record, RECORD_SIZE);
}

PyDoc_STRVAR(intake_resolve__doc__,
"resolve($module, library, /)\n--\n\n"
"{function name: address} of the uWS functions a route would call, from\n"
"the loaded library at path `library` (OSError if it is not loaded).");

static PyObject *
intake_resolve(PyObject *Py_UNUSED(module), PyObject *path)
{
    PyObject *library = NULL;
    struct uws_api api;

    if (!PyUnicode_FSConverter(path, &library)) {
        return NULL;
    }
    int resolved = resolve_api(PyBytes_AS_STRING(library), &api);
    Py_DECREF(library);
    if (resolved < 0) {
        return NULL;
    }
    PyObject *found = PyDict_New();
    for (size_t i = 0; found != NULL && i < API_COUNT; i++) {
        void *function;
        memcpy(&function, (char *)&api + API_SYMBOLS[i].offset, sizeof(function));
        PyObject *address = PyLong_FromVoidPtr(function);
        if (address == NULL
            || PyDict_SetItemString(found, API_SYMBOLS[i].name, address) < 0) {
            Py_CLEAR(found);
        }
        Py_XDECREF(address);
    }
    return found;
}

static struct PyMethodDef intake_methods[] = {
    {"parse", (PyCFunction)intake_parse, METH_O, intake_parse__doc__},
    {"resolve", (PyCFunction)intake_resolve, METH_O, intake_resolve__doc__},
    {NULL, NULL, 0, NULL}       /* sentinel */
};


/* ----------------------------------------------------- */
/* Multi-phase initialisation. */

static int
intake_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &Route_spec, NULL);

    if (type == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, (PyTypeObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    Py_DECREF(type);
    if (PyModule_AddIntConstant(module, "RECORD_SIZE", RECORD_SIZE) < 0
        || PyModule_AddIntConstant(module, "MAX_AMOUNT_CENTS", (long)MAX_AMOUNT_CENTS) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot intake_slots[] = {
    {Py_mod_exec, intake_exec},
    {0, NULL}                   /* sentinel */
};

PyDoc_STRVAR(intake_module__doc__,
"POST /payments answered in C inside the socketify workers (see rinha/body_route.py).");

static struct PyModuleDef intake_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "native_ledger._intake",
    .m_doc = intake_module__doc__,
    .m_size = 0,
    .m_methods = intake_methods,
    .m_slots = intake_slots,
};

PyMODINIT_FUNC
PyInit__intake(void)
{
    return PyModuleDef_Init(&intake_module);
}
