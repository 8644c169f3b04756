/* The lock-step TFTP fast path in C: an ACK of the block just sent, answered by the next
 * DATA, without the interpreter.
 *
 * Why: a block-by-block client (BIOS PXE ROMs, iPXE, curl) costs the server one recv and
 * one send per block; in Python the calls, objects and GIL hand-overs around those two
 * syscalls cost more than the syscalls themselves (~10 of ~22 us per block, measured with
 * bench/tftp_throughput.py), and on a busy host that CPU is the throughput.
 *
 * What it decides is exactly ReadSession.lockstep (pxe/tftp.py), which stays the one
 * definition of the protocol: Python arms a Transfer with the session's lock-step window
 * (`ReadSession.lockstep_window`), the C loop answers the ACKs that window allows, and
 * everything else (the final ACK, errors, junk, duplicates, a short read, the transfer's
 * last timeout before its deadline) is held for Python, which feeds it to the session's
 * general path after taking back what the C loop did (`ReadSession.lockstep_advanced`).
 * Nothing here parses more than a 4-byte ACK; every other datagram is Python's.
 *
 * The loops run with the GIL released, on the worker's one thread: a Transfer or Pump
 * must not be used from two threads at once (a `busy` flag refuses it).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE  /* sched_getcpu, CPU_SET */
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#define RECV_MAX 1024            /* ACKs are 4 bytes, ERRORs short: as the Python loop */
#define READ_AHEAD (256 * 1024)  /* file bytes per pread, as pxe.tftp._READ_AHEAD */
#define EVENTS_MAX 64
#define FD_LIMIT (1 << 22)

/* What serve() and Pump.wait() report back. */
enum { QUIET = 0, LOOK = 1, REPORT = 2, HELD = 3 };
enum { HELD_NONE = 0, HELD_DATAGRAM = 1, HELD_ERRNO = 2 };

typedef struct {
    PyObject_HEAD
    int sock;                  /* connected to the client */
    int file;                  /* the file, read with pread; not owned */
    long long size;
    long long blksize;
    long long last_block;      /* size // blksize + 1 */
    int armed;                 /* the window below may be used */
    long long last_sent;       /* the block whose ACK the fast path answers */
    double until;              /* monotonic time from which the fast path declines */
    double report_due;         /* serve() returns REPORT after a step past this time */
    double stepped_at;         /* when the fast path last answered */
    unsigned long long steps;  /* blocks the fast path has sent */
    int busy;
    int spin_misses;           /* spins in a row that ended with nothing (spin_for_one) */
    double spin_paused_until;
    char *chunk;               /* read-ahead: blocks chunk_first .. + chunk_count */
    long long chunk_blocks;
    long long chunk_first;
    long long chunk_count;
    int held;                  /* a datagram or errno for Python (HELD_*) */
    int held_errno;
    Py_ssize_t held_len;
    unsigned char held_data[RECV_MAX];
} Transfer;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.monotonic()'s clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Blocks chunk_first .. chunk_first + chunk_count - 1 hold `block` afterwards, or 0 when the
 * file read short (it shrank since it was opened: Python's path decides what to send). */
static int load_chunk(Transfer *t, long long block)
{
    long long first = block - (block - 1) % t->chunk_blocks;
    long long count = t->last_block - first + 1;
    if (count > t->chunk_blocks)
        count = t->chunk_blocks;
    long long offset = (first - 1) * t->blksize;
    long long want = count * t->blksize;
    if (want > t->size - offset)
        want = t->size - offset;
    long long got = 0;
    while (got < want) {
        ssize_t n = pread(t->file, t->chunk + got, (size_t)(want - got), offset + got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += n;
    }
    t->chunk_first = first;
    t->chunk_count = got == want ? count : 0;
    return got == want;
}

/* `data` answered with the next DATA if it is the ACK the armed window allows: 1 if it
 * was (the state moved on as ReadSession.lockstep moves it), 0 if Python must see it. */
static int answer(Transfer *t, const unsigned char *data, ssize_t len, double now)
{
    if (!t->armed || len != 4 || data[0] != 0 || data[1] != 4)
        return 0;
    if (((data[2] << 8) | data[3]) != (t->last_sent & 0xFFFF))
        return 0;
    if (now >= t->until || t->last_sent >= t->last_block)
        return 0;  /* near the deadline, or the last ACK: the session's general path */
    long long block = t->last_sent + 1;
    if (block < t->chunk_first || block >= t->chunk_first + t->chunk_count) {
        if (!load_chunk(t, block))
            return 0;
    }
    long long offset = (block - 1) * t->blksize;
    long long length = t->size - offset;
    if (length > t->blksize)
        length = t->blksize;
    unsigned char header[4] = {0, 3, (unsigned char)((block >> 8) & 0xFF),
                               (unsigned char)(block & 0xFF)};
    struct iovec iov[2] = {
        {header, 4},
        {t->chunk + (block - t->chunk_first) * t->blksize, (size_t)length},
    };
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    t->last_sent = block;
    t->stepped_at = now;
    t->steps++;
    if (sendmsg(t->sock, &msg, 0) < 0 && errno == ECONNREFUSED) {
        /* ICMP port unreachable: the client has gone. Other send errors are a loss on
         * this host, cured by the retransmission timer, as in the Python loop. */
        t->held = HELD_ERRNO;
        t->held_errno = errno;
    }
    return 1;
}

/* One datagram (or error) from t->sock: answered, or held for Python. Returns 0 if the
 * socket had nothing (EAGAIN/EINTR, or the receive timer fired), 1 if answered, 2 if
 * something is now held. */
static int receive_one(Transfer *t, int flags)
{
    unsigned char buf[RECV_MAX];
    ssize_t n = recv(t->sock, buf, sizeof buf, flags);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        t->held = HELD_ERRNO;
        t->held_errno = errno;
        return 2;
    }
    double now = monotonic_now();
    if (answer(t, buf, n, now))
        return t->held ? 2 : 1;
    memcpy(t->held_data, buf, (size_t)n);
    t->held_len = n;
    t->held = HELD_DATAGRAM;
    return 2;
}

/* Polls the socket for up to `spin` seconds before the caller blocks, yielding the CPU
 * between polls. Why: a client on this host or a fast LAN answers a DATA within tens of
 * microseconds, and a process that slept meanwhile pays the wake-up of an idle CPU on
 * every block (on this VM ~40 us of an ~85 us round trip with one client: 2.5x the
 * throughput with a 50 us spin). sched_yield() gives the CPU to anything runnable on it,
 * so on a busy host the spin costs little; a client that is slower than the spin (a real
 * wire, a slow ROM) stops it after SPIN_MISSES misses in a row, for SPIN_PAUSE seconds.
 * Returns as receive_one, 0 when nothing came. */
#define SPIN_MISSES 8
#define SPIN_PAUSE 1.0
static int spin_for_one(Transfer *t, double spin)
{
    if (spin <= 0)
        return 0;
    double now = monotonic_now();
    if (now < t->spin_paused_until)
        return 0;
    double until = now + spin;
    do {
        int got = receive_one(t, MSG_DONTWAIT);
        if (got) {
            t->spin_misses = 0;
            return got;
        }
        sched_yield();
    } while (monotonic_now() < until);
    if (++t->spin_misses >= SPIN_MISSES) {
        t->spin_misses = 0;
        t->spin_paused_until = until + SPIN_PAUSE;
    }
    return 0;
}

static int Transfer_init(Transfer *t, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"sock", "file", "blksize", "size", NULL};
    int sock, file;
    long long blksize, size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiLL", keywords, &sock, &file, &blksize,
                                     &size))
        return -1;
    if (sock < 0 || file < 0 || blksize < 8 || blksize > 65464 || size < 0) {
        PyErr_SetString(PyExc_ValueError, "bad descriptor, block size or file size");
        return -1;
    }
    if (t->chunk != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Transfer already initialised");
        return -1;
    }
    long long blocks = READ_AHEAD / blksize;
    t->chunk_blocks = blocks > 0 ? blocks : 1;
    t->chunk = PyMem_RawMalloc((size_t)(t->chunk_blocks * blksize));
    if (t->chunk == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->sock = sock;
    t->file = file;
    t->blksize = blksize;
    t->size = size;
    t->last_block = size / blksize + 1;
    t->chunk_first = 1;
    t->chunk_count = 0;
    return 0;
}

static void Transfer_dealloc(Transfer *t)
{
    PyMem_RawFree(t->chunk);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int refuse_if_busy(int busy)
{
    if (busy)
        PyErr_SetString(PyExc_RuntimeError, "in use by a running loop");
    return busy;
}

static PyObject *Transfer_arm(Transfer *t, PyObject *args)
{
    long long last_sent, last_block;
    double until, report_due;
    if (!PyArg_ParseTuple(args, "LLdd", &last_sent, &last_block, &until, &report_due))
        return NULL;
    if (refuse_if_busy(t->busy))
        return NULL;
    if (t->chunk == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Transfer not initialised");
        return NULL;
    }
    if (last_block != t->last_block || last_sent < 0 || last_sent > last_block) {
        PyErr_SetString(PyExc_ValueError, "window does not fit this transfer");
        return NULL;
    }
    t->armed = 1;
    t->last_sent = last_sent;
    t->until = until;
    t->report_due = report_due;
    Py_RETURN_NONE;
}

static PyObject *Transfer_disarm(Transfer *t, PyObject *Py_UNUSED(ignored))
{
    if (refuse_if_busy(t->busy))
        return NULL;
    t->armed = 0;
    Py_RETURN_NONE;
}

static PyObject *Transfer_take(Transfer *t, PyObject *Py_UNUSED(ignored))
{
    int held = t->held;
    t->held = HELD_NONE;
    if (held == HELD_DATAGRAM)
        return PyBytes_FromStringAndSize((const char *)t->held_data, t->held_len);
    if (held == HELD_ERRNO) {
        errno = t->held_errno;
        return PyErr_SetFromErrno(PyExc_OSError);  /* ECONNREFUSED: ConnectionRefusedError */
    }
    Py_RETURN_NONE;
}

/* Moves this process, once, to the CPU that took in the socket's last packet
 * (SO_INCOMING_CPU: the NIC queue's, or the client's own on this host), leaving it free to
 * move on. Why: a lone lock-step transfer wakes its worker once per block; from another
 * CPU each wake-up is an interrupt between CPUs, and the scheduler does not move a task
 * that runs that often (it is always cache-hot). 4 curl clients on loopback, 2 cores:
 * 0.77x tftpd-hpa as placed, 1.11x moved (bench/tftp_throughput.py, median of 7). */
static void follow_packets(int sock)
{
    int cpu = -1;
    socklen_t len = sizeof cpu;
    if (getsockopt(sock, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &len) < 0 || cpu < 0 ||
        cpu >= CPU_SETSIZE || cpu == sched_getcpu())
        return;
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof allowed, &allowed) < 0 || !CPU_ISSET(cpu, &allowed) ||
        CPU_COUNT(&allowed) < 2)
        return;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(0, sizeof one, &one) == 0)
        sched_setaffinity(0, sizeof allowed, &allowed);
}

/* Any descriptor but `own` ready on `epfd`, without waiting. */
static int others_ready(int epfd, int own)
{
    struct epoll_event events[8];
    int n = epoll_wait(epfd, events, 8, 0);
    for (int i = 0; i < n; i++) {
        if (events[i].data.fd != own)
            return 1;
    }
    return 0;
}

static PyObject *Transfer_serve(Transfer *t, PyObject *args)
{
    int epfd;
    double look_interval, spin;
    if (!PyArg_ParseTuple(args, "idd", &epfd, &look_interval, &spin))
        return NULL;
    if (refuse_if_busy(t->busy))
        return NULL;
    int code = QUIET;
    t->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    double look_at = monotonic_now() + look_interval;
    for (;;) {
        int got = t->held ? 2 : spin_for_one(t, spin);
        /* Blocking: the socket's SO_RCVTIMEO, set by Python, ends a silence. */
        if (got == 0)
            got = receive_one(t, 0);
        if (got == 0) {
            code = QUIET;
            break;
        }
        if (got == 2) {
            code = HELD;
            break;
        }
        double now = t->stepped_at;
        if (now >= t->report_due) {
            code = REPORT;
            break;
        }
        if (now >= look_at) {
            look_at = now + look_interval;
            follow_packets(t->sock);
            if (others_ready(epfd, t->sock)) {
                code = LOOK;
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS
    t->busy = 0;
    return PyLong_FromLong(code);
}

static PyObject *Transfer_get_last_sent(Transfer *t, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(t->last_sent);
}

static PyObject *Transfer_get_stepped_at(Transfer *t, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(t->stepped_at);
}

static PyObject *Transfer_get_steps(Transfer *t, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(t->steps);
}

static PyObject *Transfer_get_sock(Transfer *t, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(t->sock);
}

static PyGetSetDef Transfer_getset[] = {
    {"last_sent", (getter)Transfer_get_last_sent, NULL, "the highest block sent", NULL},
    {"stepped_at", (getter)Transfer_get_stepped_at, NULL, "when the fast path last sent",
     NULL},
    {"steps", (getter)Transfer_get_steps, NULL, "blocks the fast path has sent", NULL},
    {"sock", (getter)Transfer_get_sock, NULL, "the transfer's socket descriptor", NULL},
    {NULL},
};

static PyMethodDef Transfer_methods[] = {
    {"arm", (PyCFunction)Transfer_arm, METH_VARARGS,
     "arm(last_sent, last_block, until, report_due): the lock-step window to answer in"},
    {"disarm", (PyCFunction)Transfer_disarm, METH_NOARGS, "decline every datagram"},
    {"take", (PyCFunction)Transfer_take, METH_NOARGS,
     "the held datagram (bytes), None, or raises the held socket error"},
    {"serve", (PyCFunction)Transfer_serve, METH_VARARGS,
     "serve(epfd, look_interval, spin) -> QUIET | LOOK | REPORT | HELD: the loop of a\n"
     "worker's only transfer, polling `spin` seconds before each blocking recv"},
    {NULL},
};

static PyTypeObject TransferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pxe._lockstep.Transfer",
    .tp_doc = "Transfer(sock, file, blksize, size): one lock-step transfer's fast path",
    .tp_basicsize = sizeof(Transfer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Transfer_init,
    .tp_dealloc = (destructor)Transfer_dealloc,
    .tp_methods = Transfer_methods,
    .tp_getset = Transfer_getset,
};

/* ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int epfd;
    int busy;
    Transfer **by_fd;  /* strong references, indexed by socket descriptor */
    int capacity;
} Pump;

static int Pump_init(Pump *p, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"epfd", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", keywords, &p->epfd))
        return -1;
    return 0;
}

static void Pump_dealloc(Pump *p)
{
    for (int i = 0; i < p->capacity; i++)
        Py_XDECREF(p->by_fd[i]);
    PyMem_Free(p->by_fd);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Pump_add(Pump *p, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &TransferType)) {
        PyErr_SetString(PyExc_TypeError, "a Transfer");
        return NULL;
    }
    if (refuse_if_busy(p->busy))
        return NULL;
    Transfer *t = (Transfer *)arg;
    if (t->sock >= FD_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "descriptor too large");
        return NULL;
    }
    if (t->sock >= p->capacity) {
        int capacity = p->capacity ? p->capacity : 64;
        while (capacity <= t->sock)
            capacity *= 2;
        Transfer **grown = PyMem_Realloc(p->by_fd, sizeof(Transfer *) * (size_t)capacity);
        if (grown == NULL)
            return PyErr_NoMemory();
        memset(grown + p->capacity, 0, sizeof(Transfer *) * (size_t)(capacity - p->capacity));
        p->by_fd = grown;
        p->capacity = capacity;
    }
    Py_INCREF(t);
    Py_XSETREF(p->by_fd[t->sock], t);
    Py_RETURN_NONE;
}

static PyObject *Pump_discard(Pump *p, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (refuse_if_busy(p->busy))
        return NULL;
    if (fd >= 0 && fd < p->capacity)
        Py_CLEAR(p->by_fd[fd]);
    Py_RETURN_NONE;
}

/* wait(timeout) -> [fd, ...]: serve every lock-step ACK that arrives until something needs
 * Python (a descriptor not ours, or a Transfer holding a datagram or an error) or
 * `timeout` seconds pass (negative: no limit). */
static PyObject *Pump_wait(Pump *p, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (refuse_if_busy(p->busy))
        return NULL;
    int out[EVENTS_MAX];
    int count = 0, failed = 0;
    p->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    double deadline = monotonic_now() + timeout;
    for (;;) {
        int wait_ms = -1;
        if (timeout >= 0) {
            double left = deadline - monotonic_now();
            wait_ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        }
        struct epoll_event events[EVENTS_MAX];
        int n = epoll_wait(p->epfd, events, EVENTS_MAX, wait_ms);
        if (n < 0) {
            if (errno != EINTR)
                failed = errno;
            break;  /* a signal: Python runs its handlers, then waits again */
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            Transfer *t = fd >= 0 && fd < p->capacity ? p->by_fd[fd] : NULL;
            if (t == NULL || t->held || receive_one(t, MSG_DONTWAIT) == 2)
                out[count++] = fd;
        }
        if (count > 0 || n == 0 || (timeout >= 0 && monotonic_now() >= deadline))
            break;
    }
    Py_END_ALLOW_THREADS
    p->busy = 0;
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *fd = PyLong_FromLong(out[i]);
        if (fd == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, fd);
    }
    return list;
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)Pump_add, METH_O, "add(transfer): serve its socket's ACKs"},
    {"discard", (PyCFunction)Pump_discard, METH_O, "discard(fd): before the socket closes"},
    {"wait", (PyCFunction)Pump_wait, METH_O,
     "wait(timeout) -> descriptors needing Python, serving lock-step ACKs meanwhile"},
    {NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pxe._lockstep.Pump",
    .tp_doc = "Pump(epfd): lock-step transfers served on an epoll instance",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
};

static struct PyModuleDef lockstep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pxe._lockstep",
    .m_doc = "The lock-step TFTP fast path (see pxe/_lockstep.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__lockstep(void)
{
    if (PyType_Ready(&TransferType) < 0 || PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lockstep_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "QUIET", QUIET) < 0 ||
        PyModule_AddIntConstant(m, "LOOK", LOOK) < 0 ||
        PyModule_AddIntConstant(m, "REPORT", REPORT) < 0 ||
        PyModule_AddIntConstant(m, "HELD", HELD) < 0 ||
        PyModule_AddObjectRef(m, "Transfer", (PyObject *)&TransferType) < 0 ||
        PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
