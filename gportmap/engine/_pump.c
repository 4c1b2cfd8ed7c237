/* gportmap.engine._pump: the plain relay's byte moving in C (optional).
 *
 * Why: on the plain path (no TLS, no stages, no plugins) the Python relay spends
 * most of its user time between system calls: a Python callback per readiness,
 * attribute lookups, counters. Here one epoll set holds every plain connection's
 * sockets; the hub watches that set's descriptor with one libev io watcher and, when
 * it is readable, calls Engine.run(), which serves every ready socket in C and
 * returns only the connections that ended. Python keeps everything else: accept,
 * admission, connect, the idle clock, the close reasons, the logs, upgrades.
 *
 * What a Pair does is exactly what gportmap.engine.hubrelay._Direction does, per
 * direction (up: client -> target, down: target -> client):
 *   - readable: recv into the engine's one buffer, send at once; an unsent tail is
 *     copied out (at most one per direction) and the source is not read until the
 *     destination took it (backpressure); at most MAX_READS reads per readiness;
 *   - a direction whose reads fill the buffer moves on to splice(2) through a pipe
 *     of its own (made then), unless splicing is off; splice_first splices from the
 *     first byte;
 *   - end of stream is forwarded as a half-close (shutdown SHUT_WR) while the other
 *     direction goes on; both ended: the pair has ended ("closed");
 *   - an error on a side ends the pair with that side and errno.
 * Counters: bytes read from the client count as received, bytes written to the
 * client as sent (as Connection.add_received/add_sent); they, and last_active, are
 * written to the Python Connection (and its RuleStats) once per run() for every pair
 * that moved, so Python code reading them sees what the Python relay would show.
 *
 * Descriptors: the engine owns none of the sockets (Python closes them) and
 * registers each in its epoll set under (descriptor, generation). An event whose
 * generation is not the descriptor's current one is ignored, so no event ever
 * reaches a pair that has ended; and a pair's descriptors are always removed from
 * the set when it ends (EPOLL_CTL_DEL), because closing one removes it only with the
 * last descriptor of its socket, and an upgrade's drainer (a fork) shares them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_READS 16
#define PIPE_SIZE (1 << 20)
#define MIN_PIPE_SIZE (1 << 16)
#define MAX_EVENTS 256

#define UP 0   /* client -> target */
#define DOWN 1 /* target -> client */
#define CLIENT 0
#define TARGET 1

enum { RUNNING = 0, CLOSED = 1, FAILED = 2 };

typedef struct PairObject PairObject;

typedef struct {
    PyObject_HEAD
    int epfd;
    char *buffer;
    Py_ssize_t buffer_size;
    /* per descriptor: the pair or waiter registered under it (borrowed: a registered
     * one is held by `held`) and the generation it was registered with */
    PyObject **owners;
    uint32_t *generations;
    int capacity;
    uint32_t generation;
    Py_ssize_t registered; /* pairs and waiters with a registered descriptor */
    PyObject *held;        /* set of those: keeps each alive while in epoll */
} EngineObject;

/* A non-blocking connect's wait for its socket to be writable, in the engine's set:
 * when it fires, the connect's result comes with it (SO_ERROR is asked only when
 * epoll reports an error or a hang-up), and a Pair made for that socket takes the
 * registration over (one epoll_ctl MOD instead of an ADD in libev's set, its
 * removal, and an ADD in this one). */
typedef struct {
    PyObject_HEAD
    EngineObject *engine;
    PyObject *owner;
    int fd;
    uint32_t gen;
    uint32_t events; /* registered (0: not in the set) */
    int fired;
    int error;       /* the connect's errno once fired (0: connected) */
} WaiterObject;

typedef struct {
    int src, dst;        /* descriptors (the pair's client/target) */
    int src_side, dst_side;
    int uploading;
    int reading;         /* wants src readable */
    int writing;         /* waits for dst writable (a tail or piped bytes) */
    int done;            /* end of stream read from src */
    char *tail;          /* unsent bytes, malloc'd */
    Py_ssize_t tail_len, tail_off;
    int pipe_r, pipe_w;
    Py_ssize_t pipe_cap, piped;
    int may_splice, spliced, splice_first;
} Direction;

struct PairObject {
    PyObject_HEAD
    EngineObject *engine;
    PyObject *conn;
    PyObject *stats;
    PyObject *owner;     /* the Python relay, for whoever handles an ended pair */
    Direction dirs[2];
    int fds[2];          /* CLIENT, TARGET */
    uint32_t events[2];  /* interest registered per side (0: not in the set) */
    uint32_t gens[2];
    int state;
    int error_side, error_errno;
    long long received, sent; /* not yet written to the Connection */
    int touched, listed;
};

static PyTypeObject EngineType;
static PyTypeObject PairType;
static PyTypeObject WaiterType;
static PyObject *s_bytes_received, *s_bytes_sent, *s_last_active, *s_stats;

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- registration ------------------------------------------------------------------ */

static int engine_reserve(EngineObject *e, int fd) {
    if (fd < e->capacity)
        return 0;
    int capacity = e->capacity ? e->capacity : 1024;
    while (capacity <= fd)
        capacity *= 2;
    PyObject **owners = PyMem_Realloc(e->owners, sizeof(PyObject *) * capacity);
    if (!owners)
        return -1;
    e->owners = owners;
    uint32_t *generations = PyMem_Realloc(e->generations, sizeof(uint32_t) * capacity);
    if (!generations)
        return -1;
    e->generations = generations;
    memset(e->owners + e->capacity, 0, sizeof(PyObject *) * (capacity - e->capacity));
    memset(e->generations + e->capacity, 0, sizeof(uint32_t) * (capacity - e->capacity));
    e->capacity = capacity;
    return 0;
}

/* Make the epoll set hold what the pair's directions want of `side`'s descriptor.
 * Returns 0, or an errno. */
static int pair_sync_side(PairObject *p, int side) {
    EngineObject *e = p->engine;
    int fd = p->fds[side];
    uint32_t want = 0;
    /* side's descriptor is the source of the direction starting there and the
     * destination of the other one */
    Direction *reader = &p->dirs[side == CLIENT ? UP : DOWN];
    Direction *writer = &p->dirs[side == CLIENT ? DOWN : UP];
    if (p->state == RUNNING) {
        if (reader->reading)
            want |= EPOLLIN;
        if (writer->writing)
            want |= EPOLLOUT;
    }
    if (want == p->events[side])
        return 0;
    struct epoll_event ev;
    ev.events = want;
    if (want == 0) {
        /* not reported any more (EPOLLHUP/ERR would be, even with no interest) */
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, &ev);
        if (fd < e->capacity && e->owners[fd] == (PyObject *)p)
            e->owners[fd] = NULL;
        p->events[side] = 0;
        return 0;
    }
    int op = EPOLL_CTL_MOD;
    if (p->events[side] == 0) {
        if (engine_reserve(e, fd) < 0)
            return ENOMEM;
        p->gens[side] = ++e->generation;
        e->owners[fd] = (PyObject *)p;
        e->generations[fd] = p->gens[side];
        op = EPOLL_CTL_ADD;
    }
    ev.data.u64 = ((uint64_t)p->gens[side] << 32) | (uint32_t)fd;
    if (epoll_ctl(e->epfd, op, fd, &ev) < 0) {
        int err = errno;
        if (op == EPOLL_CTL_ADD && err == EEXIST) /* a stale registration of this number */
            op = EPOLL_CTL_MOD;
        else if (op == EPOLL_CTL_MOD && err == ENOENT)
            op = EPOLL_CTL_ADD;
        else {
            if (op == EPOLL_CTL_ADD)
                e->owners[fd] = NULL;
            return err;
        }
        if (epoll_ctl(e->epfd, op, fd, &ev) < 0) {
            if (e->owners[fd] == (PyObject *)p && p->events[side] == 0)
                e->owners[fd] = NULL;
            return errno;
        }
    }
    p->events[side] = want;
    return 0;
}

/* The pair is held by the engine while any of its descriptors is in the set. */
static int pair_sync(PairObject *p) {
    int was = p->events[CLIENT] || p->events[TARGET];
    int err = pair_sync_side(p, CLIENT);
    if (!err)
        err = pair_sync_side(p, TARGET);
    int is = p->events[CLIENT] || p->events[TARGET];
    if (is && !was) {
        if (PySet_Add(p->engine->held, (PyObject *)p) < 0) {
            PyErr_Clear();
            err = ENOMEM;
        } else
            p->engine->registered++;
    } else if (was && !is) {
        p->engine->registered--;
        /* the caller holds a reference: the pair outlives this */
        if (PySet_Discard(p->engine->held, (PyObject *)p) < 0)
            PyErr_Clear();
    }
    return err;
}

/* Take every descriptor out of the set. `unregister`: with EPOLL_CTL_DEL (always,
 * today); without, the descriptors would only be forgotten, which is enough only
 * when no other descriptor of the same socket lives on (see Engine_run). */
static void pair_unwatch(PairObject *p, int unregister) {
    EngineObject *e = p->engine;
    int was = p->events[CLIENT] || p->events[TARGET];
    for (int side = 0; side < 2; side++) {
        if (p->events[side]) {
            struct epoll_event ev = {0};
            int fd = p->fds[side];
            if (unregister)
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, &ev);
            if (fd < e->capacity && e->owners[fd] == (PyObject *)p)
                e->owners[fd] = NULL;
            p->events[side] = 0;
        }
    }
    if (was) {
        e->registered--;
        if (PySet_Discard(e->held, (PyObject *)p) < 0)
            PyErr_Clear();
    }
}

/* -- directions ---------------------------------------------------------------------- */

static void close_pipe(Direction *d) {
    if (d->pipe_r >= 0) {
        close(d->pipe_r);
        close(d->pipe_w);
        d->pipe_r = d->pipe_w = -1;
        d->piped = 0;
    }
}

static int open_pipe(Direction *d) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        d->may_splice = 0; /* out of descriptors: copying needs none */
        return 0;
    }
    int capacity = fcntl(fds[1], F_SETPIPE_SZ, PIPE_SIZE);
    if (capacity < 0)
        capacity = fcntl(fds[1], F_GETPIPE_SZ);
    if (capacity < MIN_PIPE_SIZE) {
        close(fds[0]);
        close(fds[1]);
        d->may_splice = 0;
        return 0;
    }
    d->pipe_r = fds[0];
    d->pipe_w = fds[1];
    d->pipe_cap = capacity;
    d->piped = 0;
    return 1;
}

static void pair_fail(PairObject *p, int side, int err) {
    if (p->state != RUNNING)
        return;
    p->state = FAILED;
    p->error_side = side;
    p->error_errno = err;
}

static void count_in(PairObject *p, Direction *d, Py_ssize_t n) {
    p->touched = 1;
    if (d->uploading)
        p->received += n;
}

static void count_out(PairObject *p, Direction *d, Py_ssize_t n) {
    p->touched = 1;
    if (!d->uploading)
        p->sent += n;
}

static void wait_writable(PairObject *p, Direction *d) {
    d->reading = 0;
    d->writing = 1;
}

static void resume_reading(PairObject *p, Direction *d) {
    if (d->writing) {
        d->writing = 0;
        d->reading = !d->done;
    }
}

static void direction_end(PairObject *p, Direction *d) {
    d->done = 1;
    d->reading = 0;
    close_pipe(d);
    if (p->dirs[UP].done && p->dirs[DOWN].done) {
        if (p->state == RUNNING)
            p->state = CLOSED;
    } else
        shutdown(d->dst, SHUT_WR); /* errors ignored: a peer gone is seen by the other way */
}

static void splice_out(PairObject *p, Direction *d);
static void splice_in(PairObject *p, Direction *d);

static void copy_in(PairObject *p, Direction *d) {
    EngineObject *e = p->engine;
    char *buf = e->buffer;
    Py_ssize_t size = e->buffer_size;
    for (int i = 0; i < MAX_READS; i++) {
        ssize_t n = recv(d->src, buf, size, 0);
        if (n < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                pair_fail(p, d->src_side, errno);
            return;
        }
        if (n == 0) {
            direction_end(p, d);
            return;
        }
        count_in(p, d, n);
        ssize_t sent;
        do
            sent = send(d->dst, buf, n, MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                pair_fail(p, d->dst_side, errno);
                return;
            }
            sent = 0;
        }
        if (sent)
            count_out(p, d, sent);
        if (sent < n) {
            d->tail = PyMem_Malloc(n - sent);
            if (!d->tail) {
                pair_fail(p, d->dst_side, ENOMEM);
                return;
            }
            memcpy(d->tail, buf + sent, n - sent);
            d->tail_len = n - sent;
            d->tail_off = 0;
            wait_writable(p, d);
            return;
        }
        if (n < size)
            return; /* drained: the next readiness brings more */
        if (d->may_splice && open_pipe(d)) {
            splice_in(p, d); /* streaming: zero-copy from now on */
            return;
        }
    }
}

static void splice_in(PairObject *p, Direction *d) {
    ssize_t n;
    do
        n = splice(d->src, NULL, d->pipe_w, NULL, d->pipe_cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        if ((errno == EINVAL || errno == ENOSYS) && !d->spliced) {
            close_pipe(d); /* not spliceable here: copy instead */
            d->may_splice = 0;
            copy_in(p, d);
            return;
        }
        pair_fail(p, d->src_side, errno);
        return;
    }
    if (n == 0) {
        direction_end(p, d);
        return;
    }
    d->spliced = 1;
    count_in(p, d, n);
    d->piped = n;
    splice_out(p, d);
}

static void splice_out(PairObject *p, Direction *d) {
    while (d->piped) {
        ssize_t moved = splice(d->pipe_r, NULL, d->dst, NULL, d->piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (moved < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                wait_writable(p, d);
                return;
            }
            pair_fail(p, d->dst_side, errno);
            return;
        }
        d->piped -= moved;
        count_out(p, d, moved);
    }
    resume_reading(p, d);
}

static void flush_tail(PairObject *p, Direction *d) {
    Py_ssize_t left = d->tail_len - d->tail_off;
    ssize_t sent;
    do
        sent = send(d->dst, d->tail + d->tail_off, left, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            pair_fail(p, d->dst_side, errno);
        return;
    }
    count_out(p, d, sent);
    if (sent < left) {
        d->tail_off += sent;
        return;
    }
    PyMem_Free(d->tail);
    d->tail = NULL;
    d->tail_len = d->tail_off = 0;
    resume_reading(p, d);
}

static void on_readable(PairObject *p, Direction *d) {
    if (d->pipe_r >= 0 || (d->splice_first && d->may_splice && open_pipe(d)))
        splice_in(p, d);
    else
        copy_in(p, d);
}

static void on_writable(PairObject *p, Direction *d) {
    if (d->piped)
        splice_out(p, d);
    else if (d->tail)
        flush_tail(p, d);
    else
        resume_reading(p, d);
}

/* Counters and last_active onto the Python Connection. Returns -1 on a Python error. */
static int add_attr(PyObject *obj, PyObject *name, long long n) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (!value)
        return -1;
    PyObject *delta = PyLong_FromLongLong(n);
    if (!delta) {
        Py_DECREF(value);
        return -1;
    }
    PyObject *sum = PyNumber_Add(value, delta);
    Py_DECREF(value);
    Py_DECREF(delta);
    if (!sum)
        return -1;
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

static int pair_flush(PairObject *p, PyObject *now) {
    int rc = 0;
    if (p->received) {
        long long n = p->received;
        p->received = 0;
        if (add_attr(p->conn, s_bytes_received, n) < 0 || add_attr(p->stats, s_bytes_received, n) < 0)
            rc = -1;
    }
    if (p->sent) {
        long long n = p->sent;
        p->sent = 0;
        if (add_attr(p->conn, s_bytes_sent, n) < 0 || add_attr(p->stats, s_bytes_sent, n) < 0)
            rc = -1;
    }
    if (now && PyObject_SetAttr(p->conn, s_last_active, now) < 0)
        rc = -1;
    p->touched = 0;
    return rc;
}

/* -- Engine ------------------------------------------------------------------------------ */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer_size", NULL};
    Py_ssize_t buffer_size = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &buffer_size))
        return NULL;
    if (buffer_size < 1024 || buffer_size > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "buffer_size must be between 1 KiB and 16 MiB");
        return NULL;
    }
    EngineObject *e = (EngineObject *)type->tp_alloc(type, 0);
    if (!e)
        return NULL;
    e->epfd = -1;
    e->held = PySet_New(NULL);
    e->buffer = PyMem_Malloc(buffer_size);
    if (!e->held || !e->buffer) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    e->buffer_size = buffer_size;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static int Engine_traverse(EngineObject *e, visitproc visit, void *arg) {
    Py_VISIT(e->held);
    return 0;
}

static int Engine_clear(EngineObject *e) {
    Py_CLEAR(e->held);
    return 0;
}

static void Engine_dealloc(EngineObject *e) {
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    if (e->epfd >= 0)
        close(e->epfd);
    PyMem_Free(e->buffer);
    PyMem_Free(e->owners);
    PyMem_Free(e->generations);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_fileno(EngineObject *e, PyObject *unused) {
    return PyLong_FromLong(e->epfd);
}

/* Serve every ready descriptor (at most MAX_EVENTS, without waiting); return the
 * list of pairs that ended. */
static PyObject *Engine_run(EngineObject *e, PyObject *unused) {
    struct epoll_event events[MAX_EVENTS];
    if (e->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return NULL;
    }
    int n = epoll_wait(e->epfd, events, MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *ended = PyList_New(0);
    PyObject *touched = PyList_New(0);
    if (!ended || !touched) {
        Py_XDECREF(ended);
        Py_XDECREF(touched);
        return NULL;
    }
    int failed = 0;
    for (int i = 0; i < n; i++) {
        int fd = (int)(uint32_t)events[i].data.u64;
        uint32_t gen = (uint32_t)(events[i].data.u64 >> 32);
        if (fd >= e->capacity || e->owners[fd] == NULL || e->generations[fd] != gen)
            continue; /* a description that outlived its pair: see the file's docstring */
        if (Py_TYPE(e->owners[fd]) == &WaiterType) {
            WaiterObject *w = (WaiterObject *)e->owners[fd];
            if (w->fired)
                continue; /* Python adopts or closes it when it handles the first */
            w->fired = 1;
            w->error = 0;
            if (events[i].events & (EPOLLERR | EPOLLHUP)) {
                int err = 0;
                socklen_t len = sizeof(err);
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                    err = errno;
                w->error = err ? err : ECONNRESET;
            }
            if (PyList_Append(ended, (PyObject *)w) < 0)
                failed = 1;
            continue;
        }
        PairObject *p = (PairObject *)e->owners[fd];
        if (p->state != RUNNING)
            continue;
        int side = p->fds[CLIENT] == fd && p->gens[CLIENT] == gen ? CLIENT : TARGET;
        uint32_t ev = events[i].events;
        Direction *reader = &p->dirs[side == CLIENT ? UP : DOWN];
        Direction *writer = &p->dirs[side == CLIENT ? DOWN : UP];
        /* writing first: a tail that goes out lets the other way read again */
        if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && writer->writing)
            on_writable(p, writer);
        if (p->state == RUNNING && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) && reader->reading)
            on_readable(p, reader);
        if (p->state == RUNNING) {
            int err = pair_sync(p);
            if (err)
                pair_fail(p, side, err);
        }
        if (p->touched && !p->listed) {
            if (PyList_Append(touched, (PyObject *)p) < 0)
                PyErr_Clear(); /* flushed by a later run */
            else
                p->listed = 1;
        }
        if (p->state != RUNNING) {
            /* the pair is held by `ended` from here: unwatch may drop the engine's */
            if (PyList_Append(ended, (PyObject *)p) < 0)
                failed = 1;
            /* Unregistered, not only forgotten: closing a socket takes it out of the
             * set only with the last descriptor of it, and another may live on (a
             * fork's, an upgrade's): it would be reported for ever, spinning the loop. */
            pair_unwatch(p, 1);
        }
    }
    PyObject *now = PyFloat_FromDouble(monotonic_now());
    if (!now)
        PyErr_Clear();
    Py_ssize_t count = PyList_GET_SIZE(touched);
    for (Py_ssize_t i = 0; i < count; i++) {
        PairObject *p = (PairObject *)PyList_GET_ITEM(touched, i);
        p->listed = 0;
        if (pair_flush(p, now) < 0)
            PyErr_Clear(); /* (no memory for an int) the counters lag; the pairs must not be lost */
    }
    Py_XDECREF(now);
    Py_DECREF(touched);
    if (failed) {
        Py_DECREF(ended);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return NULL;
    }
    return ended;
}

static PyObject *Engine_close(EngineObject *e, PyObject *unused) {
    if (e->epfd >= 0) {
        close(e->epfd);
        e->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_get_registered(EngineObject *e, void *closure) {
    return PyLong_FromSsize_t(e->registered);
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll set's descriptor: readable when run() has work."},
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Serve every ready socket without waiting; return the pairs that ended."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Close the epoll set (the sockets are not the engine's)."},
    {NULL}};

static PyGetSetDef Engine_getset[] = {
    {"registered", (getter)Engine_get_registered, NULL, "Pairs with a socket in the set.", NULL}, {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gportmap.engine._pump.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One epoll set for every plain relay of a process (see the module's source).",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* -- Pair ---------------------------------------------------------------------------------- */

static void direction_init(Direction *d, int src, int dst, int src_side, int uploading, int may_splice,
                           int splice_first) {
    memset(d, 0, sizeof(*d));
    d->src = src;
    d->dst = dst;
    d->src_side = src_side;
    d->dst_side = 1 - src_side;
    d->uploading = uploading;
    d->pipe_r = d->pipe_w = -1;
    d->may_splice = may_splice;
    d->splice_first = splice_first;
}

static PyObject *Pair_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"engine", "client", "target", "conn", "may_splice", "splice_first", "waiter", NULL};
    PyObject *engine, *conn, *waiter = Py_None;
    int client, target, may_splice = 0, splice_first = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iiO|ppO", kwlist, &EngineType, &engine, &client, &target, &conn,
                                     &may_splice, &splice_first, &waiter))
        return NULL;
    if (client < 0 || target < 0 || client == target) {
        PyErr_SetString(PyExc_ValueError, "two distinct open descriptors are needed");
        return NULL;
    }
    if (waiter != Py_None && (Py_TYPE(waiter) != &WaiterType || ((WaiterObject *)waiter)->fd != target ||
                              ((WaiterObject *)waiter)->engine != (EngineObject *)engine)) {
        PyErr_SetString(PyExc_ValueError, "waiter: the same engine's Waiter on the target's descriptor, or None");
        return NULL;
    }
    PyObject *stats = PyObject_GetAttr(conn, s_stats);
    if (!stats)
        return NULL;
    PairObject *p = (PairObject *)type->tp_alloc(type, 0);
    if (!p) {
        Py_DECREF(stats);
        return NULL;
    }
    Py_INCREF(engine);
    p->engine = (EngineObject *)engine;
    Py_INCREF(conn);
    p->conn = conn;
    p->stats = stats;
    p->owner = Py_None;
    Py_INCREF(Py_None);
    p->fds[CLIENT] = client;
    p->fds[TARGET] = target;
    direction_init(&p->dirs[UP], client, target, CLIENT, 1, may_splice, splice_first);
    direction_init(&p->dirs[DOWN], target, client, TARGET, 0, may_splice, splice_first);
    p->error_side = -1;
    WaiterObject *w = (WaiterObject *)waiter;
    if (waiter != Py_None && w->events && w->fd < p->engine->capacity &&
        p->engine->owners[w->fd] == waiter) {
        /* take over the waiter's registration of the target's descriptor */
        EngineObject *e = p->engine;
        if (PySet_Add(e->held, (PyObject *)p) < 0) {
            Py_DECREF(p);
            return NULL;
        }
        p->events[TARGET] = w->events;
        p->gens[TARGET] = w->gen;
        e->owners[target] = (PyObject *)p;
        w->events = 0;
        /* the pair replaces the waiter in `registered` and `held` */
        if (PySet_Discard(e->held, waiter) < 0)
            PyErr_Clear();
    }
    return (PyObject *)p;
}

static int Pair_traverse(PairObject *p, visitproc visit, void *arg) {
    Py_VISIT(p->engine);
    Py_VISIT(p->conn);
    Py_VISIT(p->stats);
    Py_VISIT(p->owner);
    return 0;
}

static int Pair_clear(PairObject *p) {
    Py_CLEAR(p->owner);
    Py_CLEAR(p->conn);
    Py_CLEAR(p->stats);
    return 0;
}

static void release_directions(PairObject *p) {
    for (int i = 0; i < 2; i++) {
        close_pipe(&p->dirs[i]);
        PyMem_Free(p->dirs[i].tail);
        p->dirs[i].tail = NULL;
        p->dirs[i].tail_len = p->dirs[i].tail_off = 0;
        p->dirs[i].reading = p->dirs[i].writing = 0;
    }
}

static void Pair_dealloc(PairObject *p) {
    PyObject_GC_UnTrack(p);
    /* a registered pair is held by its engine, so here it has no descriptor in the set */
    release_directions(p);
    Pair_clear(p);
    Py_CLEAR(p->engine);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pair_synced(PairObject *p) {
    int err = pair_sync(p);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Pair_start(PairObject *p, PyObject *unused) {
    if (p->state != RUNNING || !p->conn) {
        PyErr_SetString(PyExc_ValueError, "the pair has ended");
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        Direction *d = &p->dirs[i];
        if (!d->done && !d->writing)
            d->reading = 1;
    }
    return pair_synced(p);
}

static PyObject *Pair_stop(PairObject *p, PyObject *unused) {
    /* Every descriptor out of the set, pipes closed, tails dropped; the sockets are
     * the caller's to close. Counters not yet written are written. */
    if (p->state == RUNNING)
        p->state = CLOSED;
    pair_unwatch(p, 1);
    release_directions(p);
    if (p->conn && (p->received || p->sent) && pair_flush(p, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static Direction *pick(PairObject *p, int up) {
    return &p->dirs[up ? UP : DOWN];
}

static PyObject *Pair_pending(PairObject *p, PyObject *arg) {
    /* (bytes read and not yet written, end read) of one direction; a pipe's bytes are
     * drained into the tail (reads of a pipe never block). */
    int up = PyObject_IsTrue(arg);
    if (up < 0)
        return NULL;
    Direction *d = pick(p, up);
    Py_ssize_t pending = (d->tail ? d->tail_len - d->tail_off : 0);
    if (d->pipe_r >= 0 && d->piped) {
        char *tail = PyMem_Malloc(pending + d->piped);
        if (!tail)
            return PyErr_NoMemory();
        if (pending)
            memcpy(tail, d->tail + d->tail_off, pending);
        while (d->piped) {
            ssize_t n = read(d->pipe_r, tail + pending, d->piped);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break; /* the count said more than the pipe held */
            pending += n;
            d->piped -= n;
        }
        d->piped = 0;
        PyMem_Free(d->tail);
        d->tail = tail;
        d->tail_len = pending;
        d->tail_off = 0;
    }
    PyObject *data = PyBytes_FromStringAndSize(d->tail ? d->tail + d->tail_off : "", pending);
    if (!data)
        return NULL;
    return Py_BuildValue("(NO)", data, d->done ? Py_True : Py_False);
}

static PyObject *Pair_resume(PairObject *p, PyObject *args) {
    /* Take on a frozen state of one direction: an end read stays read (no second
     * half-close), a tail goes out before reading resumes. */
    int up, done;
    Py_buffer tail;
    if (!PyArg_ParseTuple(args, "py*p", &up, &tail, &done))
        return NULL;
    Direction *d = pick(p, up);
    if (done) {
        d->done = 1;
        d->reading = 0;
    }
    if (tail.len) {
        char *copy = PyMem_Malloc(tail.len);
        if (!copy) {
            PyBuffer_Release(&tail);
            return PyErr_NoMemory();
        }
        memcpy(copy, tail.buf, tail.len);
        PyMem_Free(d->tail);
        d->tail = copy;
        d->tail_len = tail.len;
        d->tail_off = 0;
        wait_writable(p, d);
    }
    PyBuffer_Release(&tail);
    if (p->state != RUNNING)
        Py_RETURN_NONE;
    return pair_synced(p);
}

static PyObject *fd_list(PairObject *p, int writing) {
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (int i = 0; i < 2; i++) {
        Direction *d = &p->dirs[i];
        int fd = writing ? (d->writing ? d->dst : -1) : (d->reading ? d->src : -1);
        if (fd < 0)
            continue;
        PyObject *value = PyLong_FromLong(fd);
        if (!value || PyList_Append(list, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(value);
    }
    return list;
}

static PyObject *Pair_reading_fds(PairObject *p, PyObject *unused) {
    return fd_list(p, 0);
}

static PyObject *Pair_writing_fds(PairObject *p, PyObject *unused) {
    return fd_list(p, 1);
}

static PyObject *Pair_get_up_done(PairObject *p, void *c) {
    return PyBool_FromLong(p->dirs[UP].done);
}

static PyObject *Pair_get_down_done(PairObject *p, void *c) {
    return PyBool_FromLong(p->dirs[DOWN].done);
}

static PyObject *Pair_get_ended(PairObject *p, void *c) {
    return PyBool_FromLong(p->state != RUNNING);
}

static PyObject *Pair_get_error(PairObject *p, void *c) {
    /* (side, errno) of the error that ended it, side 0 the client and 1 the target;
     * None when it has not failed */
    if (p->state != FAILED)
        Py_RETURN_NONE;
    return Py_BuildValue("(ii)", p->error_side, p->error_errno);
}

static PyObject *Pair_get_spliced(PairObject *p, void *c) {
    return PyBool_FromLong(p->dirs[UP].spliced || p->dirs[DOWN].spliced);
}

/* `owner` of a Pair or a Waiter: whoever handles it when Engine.run() returns it. */
static PyObject *owner_get(PyObject *owner) {
    owner = owner ? owner : Py_None;
    Py_INCREF(owner);
    return owner;
}

static int owner_set(PyObject **slot, PyObject *value) {
    if (!value)
        value = Py_None;
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
    return 0;
}

static PyObject *Pair_get_owner(PairObject *p, void *c) {
    return owner_get(p->owner);
}

static int Pair_set_owner(PairObject *p, PyObject *value, void *c) {
    return owner_set(&p->owner, value);
}

static PyMethodDef Pair_methods[] = {
    {"start", (PyCFunction)Pair_start, METH_NOARGS, "Read both sockets from now on."},
    {"stop", (PyCFunction)Pair_stop, METH_NOARGS,
     "Take both sockets out of the engine (not closing them), close the pipes."},
    {"pending", (PyCFunction)Pair_pending, METH_O, "pending(up) -> (bytes read not yet written, end read)."},
    {"resume", (PyCFunction)Pair_resume, METH_VARARGS, "resume(up, tail, done): take on a frozen state."},
    {"reading_fds", (PyCFunction)Pair_reading_fds, METH_NOARGS, "Descriptors a direction reads now."},
    {"writing_fds", (PyCFunction)Pair_writing_fds, METH_NOARGS, "Descriptors a direction waits to write."},
    {NULL}};

static PyGetSetDef Pair_getset[] = {
    {"up_done", (getter)Pair_get_up_done, NULL, "The client's end was read.", NULL},
    {"down_done", (getter)Pair_get_down_done, NULL, "The target's end was read.", NULL},
    {"ended", (getter)Pair_get_ended, NULL, "Both ends read, an error, or stopped.", NULL},
    {"error", (getter)Pair_get_error, NULL, "(side, errno) of the error that ended it, or None.", NULL},
    {"spliced", (getter)Pair_get_spliced, NULL, "A direction moved bytes with splice(2).", NULL},
    {"owner", (getter)Pair_get_owner, (setter)Pair_set_owner, "Whoever handles the pair's end.", NULL},
    {NULL}};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gportmap.engine._pump.Pair",
    .tp_basicsize = sizeof(PairObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Pair(engine, client_fd, target_fd, conn, may_splice=False, splice_first=False): one connection.",
    .tp_new = Pair_new,
    .tp_dealloc = (destructor)Pair_dealloc,
    .tp_traverse = (traverseproc)Pair_traverse,
    .tp_clear = (inquiry)Pair_clear,
    .tp_methods = Pair_methods,
    .tp_getset = Pair_getset,
};


/* -- Waiter ---------------------------------------------------------------------------------- */

static void waiter_unwatch(WaiterObject *w, int unregister) {
    EngineObject *e = w->engine;
    if (!w->events)
        return;
    if (unregister) {
        struct epoll_event ev = {0};
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->fd, &ev);
    }
    if (w->fd < e->capacity && e->owners[w->fd] == (PyObject *)w)
        e->owners[w->fd] = NULL;
    w->events = 0;
    e->registered--;
    if (PySet_Discard(e->held, (PyObject *)w) < 0)
        PyErr_Clear();
}

static PyObject *Waiter_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"engine", "fd", NULL};
    PyObject *engine;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i", kwlist, &EngineType, &engine, &fd))
        return NULL;
    EngineObject *e = (EngineObject *)engine;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "an open descriptor is needed");
        return NULL;
    }
    WaiterObject *w = (WaiterObject *)type->tp_alloc(type, 0);
    if (!w)
        return NULL;
    Py_INCREF(engine);
    w->engine = e;
    Py_INCREF(Py_None);
    w->owner = Py_None;
    w->fd = fd;
    w->error = -1;
    if (engine_reserve(e, fd) < 0) {
        Py_DECREF(w);
        return PyErr_NoMemory();
    }
    if (PySet_Add(e->held, (PyObject *)w) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    w->gen = ++e->generation;
    struct epoll_event ev;
    ev.events = EPOLLOUT;
    ev.data.u64 = ((uint64_t)w->gen << 32) | (uint32_t)fd;
    int rc = epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (rc < 0 && errno == EEXIST) /* a stale registration of this number */
        rc = epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev);
    if (rc < 0) {
        int err = errno;
        if (PySet_Discard(e->held, (PyObject *)w) < 0)
            PyErr_Clear();
        Py_DECREF(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->owners[fd] = (PyObject *)w;
    e->generations[fd] = w->gen;
    w->events = EPOLLOUT;
    e->registered++;
    return (PyObject *)w;
}

static int Waiter_traverse(WaiterObject *w, visitproc visit, void *arg) {
    Py_VISIT(w->engine);
    Py_VISIT(w->owner);
    return 0;
}

static int Waiter_clear(WaiterObject *w) {
    Py_CLEAR(w->owner);
    return 0;
}

static void Waiter_dealloc(WaiterObject *w) {
    PyObject_GC_UnTrack(w);
    Waiter_clear(w);
    Py_CLEAR(w->engine);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *Waiter_close(WaiterObject *w, PyObject *unused) {
    /* Out of the set (unless a Pair took the registration over); the socket is the
     * caller's. */
    waiter_unwatch(w, 1);
    Py_RETURN_NONE;
}

static PyObject *Waiter_get_error(WaiterObject *w, void *c) {
    if (!w->fired)
        Py_RETURN_NONE;
    return PyLong_FromLong(w->error);
}

static PyObject *Waiter_get_registered(WaiterObject *w, void *c) {
    return PyBool_FromLong(w->events != 0);
}

static PyObject *Waiter_get_owner(WaiterObject *w, void *c) {
    return owner_get(w->owner);
}

static int Waiter_set_owner(WaiterObject *w, PyObject *value, void *c) {
    return owner_set(&w->owner, value);
}

static PyMethodDef Waiter_methods[] = {
    {"close", (PyCFunction)Waiter_close, METH_NOARGS, "Stop waiting (the socket is not closed)."}, {NULL}};

static PyGetSetDef Waiter_getset[] = {
    {"error", (getter)Waiter_get_error, NULL, "The connect's errno once writable (0: connected), else None.", NULL},
    {"registered", (getter)Waiter_get_registered, NULL, "Its descriptor is in the set, as its own.", NULL},
    {"owner", (getter)Waiter_get_owner, (setter)Waiter_set_owner, "Whoever handles it when it fires.", NULL},
    {NULL}};

static PyTypeObject WaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gportmap.engine._pump.Waiter",
    .tp_basicsize = sizeof(WaiterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Waiter(engine, fd): a connecting socket's wait to be writable, in the engine's set.",
    .tp_new = Waiter_new,
    .tp_dealloc = (destructor)Waiter_dealloc,
    .tp_traverse = (traverseproc)Waiter_traverse,
    .tp_clear = (inquiry)Waiter_clear,
    .tp_methods = Waiter_methods,
    .tp_getset = Waiter_getset,
};

static struct PyModuleDef pump_module = {
    PyModuleDef_HEAD_INIT, "gportmap.engine._pump",
    "The plain relay's byte moving in C: an optional accelerator of gportmap.engine.hubrelay.", -1, NULL,
};

PyMODINIT_FUNC PyInit__pump(void) {
    s_bytes_received = PyUnicode_InternFromString("bytes_received");
    s_bytes_sent = PyUnicode_InternFromString("bytes_sent");
    s_last_active = PyUnicode_InternFromString("last_active");
    s_stats = PyUnicode_InternFromString("stats");
    if (!s_bytes_received || !s_bytes_sent || !s_last_active || !s_stats)
        return NULL;
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&PairType) < 0 || PyType_Ready(&WaiterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&pump_module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    Py_INCREF(&PairType);
    Py_INCREF(&WaiterType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Pair", (PyObject *)&PairType) < 0 ||
        PyModule_AddObject(m, "Waiter", (PyObject *)&WaiterType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_READS", MAX_READS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
