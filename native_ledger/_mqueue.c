/*
 * native_ledger._mqueue: receive a POSIX queue message straight into a writable buffer.
 *
 * Why: the dispatcher moves each payment from the kernel queue into a slot of its holding
 * table, which lives in shared memory. posix_ipc's receive() returns a new bytes object, so a
 * dispatcher SIGKILLed between the receive and its write into the slot would lose a payment
 * that the kernel had already handed over. Here mq_receive(3) copies the message into the
 * slot itself (a memoryview of the table's mapping): once the call returns the payment is in
 * shared memory, where a restarted dispatcher finds it (see rinha/holding.py, "staging").
 *
 * One function: receive_into(mqd, buffer, offset) -> size received. It raises
 * BlockingIOError when the queue is empty and its descriptor is non-blocking, OSError
 * otherwise. The GIL is released around the system call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <mqueue.h>

PyDoc_STRVAR(receive_into_doc,
"receive_into(mqd, buffer, offset, /) -> int\n"
"--\n"
"\n"
"Receive one message from the POSIX queue descriptor `mqd` into the writable `buffer` at\n"
"`offset`; return its size. The space from `offset` to the end of the buffer must hold the\n"
"queue's largest message (EMSGSIZE otherwise). BlockingIOError if the queue is empty and the\n"
"descriptor non-blocking.");

static PyObject *
receive_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "receive_into() takes exactly 3 arguments");
        return NULL;
    }
    long mqd = PyLong_AsLong(args[0]);
    if (mqd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (mqd < 0 || mqd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a queue descriptor");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (offset < 0 || offset > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "offset outside the buffer");
        return NULL;
    }
    ssize_t received;
    Py_BEGIN_ALLOW_THREADS
    received = mq_receive((mqd_t)mqd, (char *)view.buf + offset,
                          (size_t)(view.len - offset), NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (received < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);  /* EAGAIN becomes BlockingIOError */
    }
    return PyLong_FromSsize_t(received);
}

static PyMethodDef mqueue_methods[] = {
    {"receive_into", (PyCFunction)(void (*)(void))receive_into, METH_FASTCALL,
     receive_into_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot mqueue_slots[] = {
    {0, NULL},
};

static struct PyModuleDef mqueue_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "native_ledger._mqueue",
    .m_doc = "Receive a POSIX queue message straight into shared memory.",
    .m_size = 0,
    .m_methods = mqueue_methods,
    .m_slots = mqueue_slots,
};

PyMODINIT_FUNC
PyInit__mqueue(void)
{
    return PyModuleDef_Init(&mqueue_module);
}
