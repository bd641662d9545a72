/* p11gate's native call executor: module threads that hold no Python GIL.
 *
 * The in-process back end (backends/inprocess.py) marshals a call's C arguments on the
 * event loop thread, then hands the function pointer and its argument words to this
 * executor. One of its POSIX threads makes the call and posts the CK_RV back; the loop
 * is woken through a pipe only when it is not already due to drain. With Python module
 * threads instead, each call passes the GIL between the loop thread and a module thread
 * twice (measured: about half of an in-process C_GenerateRandom's CPU); these threads
 * never touch the interpreter.
 *
 * The arguments are machine words: every PKCS#11 parameter this executor is used for is
 * a CK_ULONG or a pointer (the Python side checks each function's cffi type first), and
 * on the LP64 ABIs it is built for (x86_64, aarch64: checked there too) both are passed
 * in the same 64-bit integer registers or stack slots. The call is made through a
 * prototype of exactly the function's arity, never a variadic one.
 *
 * Memory: the job table is fixed at creation. Python keeps every buffer an argument
 * points at alive until the job is reported done, including after a missed deadline
 * (the thread may still be inside the module), so nothing here owns or frees them.
 *
 * Built on first use by backends/native/executor.py (cc -O2 -shared -fPIC -pthread),
 * cached by a hash of this file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define P11X_MAX_ARGS 12
#define P11X_ABI 1

typedef unsigned long rv_t;
typedef uintptr_t w;

enum { FREE = 0, QUEUED, RUNNING, DONE, CANCELLED };

struct job {
    void *fn;
    w a[P11X_MAX_ARGS];
    int nargs;
    int state;
    uint64_t tag;
    rv_t rv;
};

struct p11x {
    pthread_mutex_t mu;
    pthread_cond_t work;
    struct job *jobs;
    uint32_t njobs;
    uint32_t *free_list, nfree;
    uint32_t *queue, qhead, qlen;  /* ring of job indices waiting for a thread */
    uint32_t *done, dhead, dlen;   /* ring of job indices finished, not yet taken */
    int bell[2];                   /* the loop's doorbell pipe, owned here: a thread that
                                      returns late must never write to a reused fd */
    int rung;                      /* a bell byte is pending: finishing threads skip theirs */
    int stopping;
    int nthreads, alive, busy;
    pthread_t *threads;
};

int p11x_abi(void) { return P11X_ABI; }
int p11x_max_args(void) { return P11X_MAX_ARGS; }

static rv_t invoke(const struct job *j) {
    const w *a = j->a;
    switch (j->nargs) {
    case 0: return ((rv_t (*)(void))j->fn)();
    case 1: return ((rv_t (*)(w))j->fn)(a[0]);
    case 2: return ((rv_t (*)(w, w))j->fn)(a[0], a[1]);
    case 3: return ((rv_t (*)(w, w, w))j->fn)(a[0], a[1], a[2]);
    case 4: return ((rv_t (*)(w, w, w, w))j->fn)(a[0], a[1], a[2], a[3]);
    case 5: return ((rv_t (*)(w, w, w, w, w))j->fn)(a[0], a[1], a[2], a[3], a[4]);
    case 6: return ((rv_t (*)(w, w, w, w, w, w))j->fn)(a[0], a[1], a[2], a[3], a[4], a[5]);
    case 7: return ((rv_t (*)(w, w, w, w, w, w, w))j->fn)(a[0], a[1], a[2], a[3], a[4], a[5],
                                                            a[6]);
    case 8: return ((rv_t (*)(w, w, w, w, w, w, w, w))j->fn)(a[0], a[1], a[2], a[3], a[4],
                                                               a[5], a[6], a[7]);
    case 9: return ((rv_t (*)(w, w, w, w, w, w, w, w, w))j->fn)(a[0], a[1], a[2], a[3], a[4],
                                                                  a[5], a[6], a[7], a[8]);
    case 10: return ((rv_t (*)(w, w, w, w, w, w, w, w, w, w))j->fn)(
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
    case 11: return ((rv_t (*)(w, w, w, w, w, w, w, w, w, w, w))j->fn)(
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10]);
    case 12: return ((rv_t (*)(w, w, w, w, w, w, w, w, w, w, w, w))j->fn)(
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11]);
    }
    return 0x5UL; /* CKR_GENERAL_ERROR: refused at submit, never reached */
}

static void ring_bell(int fd) {
    char b = 0;
    while (write(fd, &b, 1) < 0 && errno == EINTR) {
    }
    /* EAGAIN: the pipe is full of bells, the loop is woken anyway */
}

/* Called with the lock held, after the call: post the result, ring if needed. Returns
 * with the lock held. */
static void finished(struct p11x *x, uint32_t i, rv_t rv) {
    struct job *j = &x->jobs[i];
    x->busy--;
    j->rv = rv;
    j->state = DONE;
    x->done[(x->dhead + x->dlen) % x->njobs] = i;
    x->dlen++;
    if (!x->rung) {
        x->rung = 1;
        int fd = x->bell[1];
        pthread_mutex_unlock(&x->mu);
        ring_bell(fd);
        pthread_mutex_lock(&x->mu);
    }
}

static void *serve(void *arg) {
    struct p11x *x = arg;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        while (!x->stopping && x->qlen == 0)
            pthread_cond_wait(&x->work, &x->mu);
        if (x->qlen == 0) /* stopping, nothing left */
            break;
        uint32_t i = x->queue[x->qhead];
        x->qhead = (x->qhead + 1) % x->njobs;
        x->qlen--;
        struct job *j = &x->jobs[i];
        if (j->state == CANCELLED) { /* its deadline passed while it waited */
            j->state = FREE;
            x->free_list[x->nfree++] = i;
            continue;
        }
        j->state = RUNNING;
        x->busy++;
        pthread_mutex_unlock(&x->mu);
        rv_t rv = invoke(j);
        pthread_mutex_lock(&x->mu);
        finished(x, i, rv);
    }
    x->alive--;
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

/* Join the threads (all told to stop) and free everything; started: the mutex,
 * condition and pipe exist. */
static void destroy(struct p11x *x, int started) {
    if (started) {
        for (int t = 0; t < x->nthreads; t++)
            pthread_join(x->threads[t], NULL);
        pthread_mutex_destroy(&x->mu);
        pthread_cond_destroy(&x->work);
    }
    if (x->bell[0] >= 0)
        close(x->bell[0]);
    if (x->bell[1] >= 0)
        close(x->bell[1]);
    free(x->jobs);
    free(x->free_list);
    free(x->queue);
    free(x->done);
    free(x->threads);
    free(x);
}

static void stop_all(struct p11x *x) {
    x->stopping = 1;
    pthread_cond_broadcast(&x->work);
}

struct p11x *p11x_new(int nthreads, uint32_t njobs) {
    if (nthreads < 1 || nthreads > 256 || njobs < 1 || njobs > (1u << 20))
        return NULL;
    struct p11x *x = calloc(1, sizeof *x);
    if (x == NULL)
        return NULL;
    x->jobs = calloc(njobs, sizeof *x->jobs);
    x->free_list = calloc(njobs, sizeof(uint32_t));
    x->queue = calloc(njobs, sizeof(uint32_t));
    x->done = calloc(njobs, sizeof(uint32_t));
    x->threads = calloc((size_t)nthreads, sizeof(pthread_t));
    x->bell[0] = x->bell[1] = -1;
    if (!x->jobs || !x->free_list || !x->queue || !x->done || !x->threads)
        goto fail;
    x->njobs = njobs;
    for (uint32_t i = 0; i < njobs; i++)
        x->free_list[i] = njobs - 1 - i;
    x->nfree = njobs;
    if (pipe2(x->bell, O_NONBLOCK | O_CLOEXEC) != 0)
        goto fail;
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->work, NULL);
    for (int t = 0; t < nthreads; t++) {
        if (pthread_create(&x->threads[t], NULL, serve, x) != 0)
            break;
        x->nthreads++;
    }
    int ok = x->nthreads == nthreads;
    pthread_mutex_lock(&x->mu);
    x->alive = x->nthreads; /* the threads read it only once told to stop */
    pthread_mutex_unlock(&x->mu);
    if (ok)
        return x;
    /* could not start them all: stop the ones that did, give up */
    pthread_mutex_lock(&x->mu);
    stop_all(x);
    pthread_mutex_unlock(&x->mu);
    destroy(x, 1);
    return NULL;
fail:
    destroy(x, 0);
    return NULL;
}

/* Queue one call: returns its job index, -1 if the table is full, -2 if stopping or the
 * arity is out of range. The argument words are copied. */
int64_t p11x_submit(struct p11x *x, void *fn, int nargs, const w *args, uint64_t tag) {
    if (nargs < 0 || nargs > P11X_MAX_ARGS || fn == NULL)
        return -2;
    pthread_mutex_lock(&x->mu);
    if (x->stopping) {
        pthread_mutex_unlock(&x->mu);
        return -2;
    }
    if (x->nfree == 0) {
        pthread_mutex_unlock(&x->mu);
        return -1;
    }
    uint32_t i = x->free_list[--x->nfree];
    struct job *j = &x->jobs[i];
    j->fn = fn;
    j->nargs = nargs;
    if (nargs > 0)
        memcpy(j->a, args, (size_t)nargs * sizeof(w));
    j->tag = tag;
    j->rv = 0;
    j->state = QUEUED;
    x->queue[(x->qhead + x->qlen) % x->njobs] = i;
    x->qlen++;
    pthread_cond_signal(&x->work);
    pthread_mutex_unlock(&x->mu);
    return (int64_t)i;
}

/* A queued job whose deadline passed: 1 if it had not started (it never will), 0 if a
 * thread already runs it or it is done (it is reported by p11x_take as usual). */
int p11x_cancel(struct p11x *x, uint32_t i, uint64_t tag) {
    int cancelled = 0;
    pthread_mutex_lock(&x->mu);
    if (i < x->njobs && x->jobs[i].tag == tag && x->jobs[i].state == QUEUED) {
        x->jobs[i].state = CANCELLED;
        cancelled = 1;
    }
    pthread_mutex_unlock(&x->mu);
    return cancelled;
}

/* Take up to max finished jobs: their tags and CK_RVs; their table entries are free
 * again. When none is left the bell is cleared (call after reading the pipe: a thread
 * finishing later sees it clear and rings again). */
int p11x_take(struct p11x *x, uint64_t *tags, rv_t *rvs, int max) {
    int n = 0;
    pthread_mutex_lock(&x->mu);
    while (n < max && x->dlen > 0) {
        uint32_t i = x->done[x->dhead];
        x->dhead = (x->dhead + 1) % x->njobs;
        x->dlen--;
        tags[n] = x->jobs[i].tag;
        rvs[n] = x->jobs[i].rv;
        x->jobs[i].state = FREE;
        x->free_list[x->nfree++] = i;
        n++;
    }
    if (x->dlen == 0)
        x->rung = 0;
    pthread_mutex_unlock(&x->mu);
    return n;
}

/* The read end of the doorbell pipe, for the loop's reader. */
int p11x_bell_fd(struct p11x *x) { return x->bell[0]; }

/* Threads inside the module right now. */
int p11x_busy(struct p11x *x) {
    pthread_mutex_lock(&x->mu);
    int n = x->busy;
    pthread_mutex_unlock(&x->mu);
    return n;
}

/* Ask every thread to end once the queue is empty (jobs still queued are run first).
 * Returns how many are still alive: 0 means p11x_free may be called. */
int p11x_stop(struct p11x *x) {
    pthread_mutex_lock(&x->mu);
    stop_all(x);
    int alive = x->alive;
    pthread_mutex_unlock(&x->mu);
    return alive;
}

/* Only after p11x_stop returned 0 (or later polls of it did): joins and frees. A thread
 * hung in the module keeps the executor alive; it is then never freed (leaked on
 * purpose: the thread may still write to it). */
int p11x_free(struct p11x *x) {
    pthread_mutex_lock(&x->mu);
    int alive = x->alive;
    pthread_mutex_unlock(&x->mu);
    if (!x->stopping || alive != 0)
        return -1;
    destroy(x, 1);
    return 0;
}
