/* p11gate load generator.
 *
 * PROCS processes, each loading the PKCS#11 module itself (so, through p11-kit-client.so,
 * each process is one connection), each running THREADS threads. Every thread opens its
 * own session (the first thread of each process logs in), finds the keys with CKA_ID 01
 * (EC) and 02 (RSA), waits for a common start, runs OP in a loop for WARMUP seconds
 * unrecorded and then SECONDS recorded, and records every call's latency in a
 * log-linear histogram (< 0.2 % error). The parent process only coordinates: it forks
 * before any module is loaded, so it holds no connection itself.
 *
 * usage: loadgen [-p PROCS] [-t THREADS] [-d SECONDS] [-w WARMUP] [-P PIN] [-l LABEL] [-H]
 *                MODULE OP
 * -H: after `window=end`, keep the sessions (and so the connections and the servers'
 *     per-connection processes) open until a line is read from stdin (or EOF).
 * OP: random | ecsign | rsasign | attrs | find
 * prints `window=start` when the recorded window opens and `window=end` when it closes
 * (flushed at once, so a caller can sample server CPU time at the edges), then one line
 * of key=value pairs on stdout:
 *   ops_per_s= p50_us= p99_us= mean_us= max_us= calls= completed= errors= first_error=
 *   procs= threads=
 * exit status 0 when the run happened (errors are counted, not fatal), 1 when set-up
 * failed (message on stderr), 2 on bad usage.
 *
 * Build: cc -O2 -pthread -I/usr/include/p11-kit-1 -o loadgen loadgen.c -ldl
 */
#define CK_PTR *
#define CK_DECLARE_FUNCTION(rv, name) rv name
#define CK_DECLARE_FUNCTION_POINTER(rv, name) rv (*name)
#define CK_CALLBACK_FUNCTION(rv, name) rv (*name)
#include <p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- latency histogram: exact below 1024 ns, then 512 sub-buckets per power of two */
#define NBUCKETS 16384
#define MAX_NS ((1ULL << 40) - 1)

static unsigned bucket_of(uint64_t ns) {
    if (ns > MAX_NS) ns = MAX_NS;
    if (ns < 1024) return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned shift = msb - 9u;
    return shift * 512u + (unsigned)(ns >> shift);
}

static double bucket_ns(unsigned b) {
    if (b < 1024) return (double)b;
    unsigned shift = b / 512u - 1u;
    uint64_t lower = (uint64_t)(b - shift * 512u) << shift;
    return (double)lower + (double)(1ULL << shift) / 2.0;
}

/* ---- state shared by the coordinator and all load processes (MAP_SHARED) */
struct shared {
    int ready, failed, go;
    int release;                      /* load processes may finalize (-H) */
    uint64_t t_start, t_end;          /* recorded window, CLOCK_MONOTONIC ns */
    uint64_t completed;               /* calls that completed inside the window */
    uint64_t calls, errors, sum_ns, max_ns;
    unsigned long first_error;
    char message[512];
    uint64_t hist[NBUCKETS];
};

static struct shared *sh;
static CK_FUNCTION_LIST *p11;
static CK_SLOT_ID slot;
static const char *op;

struct worker {
    pthread_t thread;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE ec, rsa;
    uint64_t *hist;
    uint64_t calls, completed, errors, sum_ns, max_ns;
    unsigned long first_error;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void nap_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static void fail(const char *fmt, ...) {
    char buf[sizeof sh->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (__atomic_fetch_add(&sh->failed, 1, __ATOMIC_SEQ_CST) == 0)
        memcpy(sh->message, buf, sizeof buf);
    _exit(1);
}

static CK_OBJECT_HANDLE key_by_id(CK_SESSION_HANDLE s, unsigned char id) {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[2] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, &id, 1}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG count = 0;
    CK_RV rv = p11->C_FindObjectsInit(s, t, 2);
    if (rv != CKR_OK) fail("C_FindObjectsInit: 0x%lx", rv);
    rv = p11->C_FindObjects(s, &h, 1, &count);
    p11->C_FindObjectsFinal(s);
    if (rv != CKR_OK || count != 1)
        fail("private key with CKA_ID %02x not found (rv 0x%lx, count %lu)", id, rv, count);
    return h;
}

/* One operation; returns the first non-OK return value, or CKR_OK. */
static CK_RV once(struct worker *w) {
    static const unsigned char data[32] = {
        0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
        0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
        0x5a, 0x5a};
    unsigned char out[512];
    CK_ULONG len = sizeof out;
    CK_RV rv;
    switch (op[0]) {
    case 'r':
        if (op[1] == 'a') /* random */
            return p11->C_GenerateRandom(w->session, out, 32);
        __attribute__((fallthrough)); /* rsasign */
    case 'e': {
        int ecdsa = op[0] == 'e';
        CK_MECHANISM m = {ecdsa ? CKM_ECDSA : CKM_SHA256_RSA_PKCS, NULL, 0};
        rv = p11->C_SignInit(w->session, &m, ecdsa ? w->ec : w->rsa);
        if (rv != CKR_OK) return rv;
        rv = p11->C_Sign(w->session, (CK_BYTE_PTR)data, sizeof data, out, &len);
        if (rv == CKR_OK && len != (ecdsa ? 64u : 256u)) return CKR_GENERAL_ERROR;
        return rv;
    }
    case 'a': {
        CK_KEY_TYPE kt = 0;
        CK_BBOOL sign = 0;
        unsigned char label[64];
        CK_ATTRIBUTE t[3] = {{CKA_KEY_TYPE, &kt, sizeof kt}, {CKA_SIGN, &sign, sizeof sign},
                             {CKA_LABEL, label, sizeof label}};
        rv = p11->C_GetAttributeValue(w->session, w->ec, t, 3);
        if (rv == CKR_OK && (kt != CKK_EC || sign != CK_TRUE)) return CKR_GENERAL_ERROR;
        return rv;
    }
    case 'f': {
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        unsigned char id = 1;
        CK_ATTRIBUTE t[2] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, &id, 1}};
        CK_OBJECT_HANDLE h[4];
        CK_ULONG count = 0;
        rv = p11->C_FindObjectsInit(w->session, t, 2);
        if (rv != CKR_OK) return rv;
        CK_RV rv2 = p11->C_FindObjects(w->session, h, 4, &count);
        rv = p11->C_FindObjectsFinal(w->session);
        if (rv2 != CKR_OK) return rv2;
        if (rv == CKR_OK && count != 1) return CKR_GENERAL_ERROR;
        return rv;
    }
    }
    return CKR_FUNCTION_NOT_SUPPORTED;
}

static void *run(void *arg) {
    struct worker *w = arg;
    while (!__atomic_load_n(&sh->go, __ATOMIC_ACQUIRE)) nap_us(50);
    uint64_t start = sh->t_start, end = sh->t_end;
    for (;;) {
        uint64_t t0 = now_ns();
        if (t0 >= end) break;
        CK_RV rv = once(w);
        uint64_t t1 = now_ns();
        if (t0 < start) continue; /* warm-up */
        uint64_t d = t1 - t0;
        w->hist[bucket_of(d)]++;
        w->calls++;
        w->sum_ns += d;
        if (d > w->max_ns) w->max_ns = d;
        if (t1 < end) w->completed++;
        if (rv != CKR_OK && w->errors++ == 0) w->first_error = rv;
    }
    return NULL;
}

static void load_process(int index, const char *module, int threads, const char *pin,
                         const char *label) {
    /* Set up one process at a time: SoftHSMv2 rewrites its token file on C_Login, and
     * several processes doing that at once have been seen to leave it empty. */
    while (__atomic_load_n(&sh->ready, __ATOMIC_SEQ_CST) < index) {
        if (__atomic_load_n(&sh->failed, __ATOMIC_SEQ_CST)) _exit(1);
        nap_us(200);
    }
    void *lib = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) fail("dlopen: %s", dlerror());
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (!get) fail("%s has no C_GetFunctionList", module);
    CK_RV rv = get(&p11);
    if (rv != CKR_OK) fail("C_GetFunctionList: 0x%lx", rv);
    CK_C_INITIALIZE_ARGS init = {NULL, NULL, NULL, NULL, CKF_OS_LOCKING_OK, NULL};
    rv = p11->C_Initialize(&init);
    if (rv != CKR_OK) fail("C_Initialize: 0x%lx", rv);

    CK_SLOT_ID slots[64];
    CK_ULONG nslots = 64;
    rv = p11->C_GetSlotList(CK_TRUE, slots, &nslots);
    if (rv != CKR_OK || nslots == 0) fail("no slot with a token (rv 0x%lx)", rv);
    slot = slots[0];
    if (label && *label) {
        size_t ll = strlen(label);
        int found = 0;
        for (CK_ULONG i = 0; i < nslots && !found && ll <= 32; i++) {
            CK_TOKEN_INFO ti;
            if (p11->C_GetTokenInfo(slots[i], &ti) != CKR_OK) continue;
            found = !memcmp(ti.label, label, ll);
            for (size_t k = ll; k < 32 && found; k++) found = ti.label[k] == ' ';
            if (found) slot = slots[i];
        }
        if (!found) fail("no token labelled %s", label);
    }

    struct worker *w = calloc((size_t)threads, sizeof *w);
    if (!w) fail("out of memory");
    for (int i = 0; i < threads; i++) {
        rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                &w[i].session);
        if (rv != CKR_OK) fail("C_OpenSession: 0x%lx", rv);
        if (i == 0) {
            rv = p11->C_Login(w[0].session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
            if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) fail("C_Login: 0x%lx", rv);
        }
    }
    for (int i = 0; i < threads; i++) {
        w[i].ec = key_by_id(w[i].session, 1);
        w[i].rsa = key_by_id(w[i].session, 2);
        w[i].hist = calloc(NBUCKETS, sizeof *w[i].hist);
        if (!w[i].hist) fail("out of memory");
        if (pthread_create(&w[i].thread, NULL, run, &w[i]) != 0) fail("pthread_create failed");
    }
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_SEQ_CST);

    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        for (unsigned b = 0; b < NBUCKETS; b++)
            if (w[i].hist[b]) __atomic_fetch_add(&sh->hist[b], w[i].hist[b], __ATOMIC_RELAXED);
        __atomic_fetch_add(&sh->calls, w[i].calls, __ATOMIC_RELAXED);
        __atomic_fetch_add(&sh->completed, w[i].completed, __ATOMIC_RELAXED);
        __atomic_fetch_add(&sh->sum_ns, w[i].sum_ns, __ATOMIC_RELAXED);
        if (w[i].errors) {
            unsigned long none = 0;
            __atomic_compare_exchange_n(&sh->first_error, &none, w[i].first_error, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            __atomic_fetch_add(&sh->errors, w[i].errors, __ATOMIC_RELAXED);
        }
        uint64_t m = __atomic_load_n(&sh->max_ns, __ATOMIC_RELAXED);
        while (w[i].max_ns > m &&
               !__atomic_compare_exchange_n(&sh->max_ns, &m, w[i].max_ns, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
        }
    }
    /* keep the sessions and the connection open until the caller has sampled CPU time */
    while (!__atomic_load_n(&sh->release, __ATOMIC_ACQUIRE)) nap_us(200);
    for (int i = 0; i < threads; i++) p11->C_CloseSession(w[i].session);
    p11->C_Finalize(NULL);
    _exit(0);
}

static double percentile_us(double q) {
    uint64_t total = 0;
    for (unsigned b = 0; b < NBUCKETS; b++) total += sh->hist[b];
    if (!total) return 0;
    uint64_t rank = (uint64_t)(q * (double)total), seen = 0;
    if (rank >= total) rank = total - 1;
    for (unsigned b = 0; b < NBUCKETS; b++) {
        seen += sh->hist[b];
        if (seen > rank) return bucket_ns(b) / 1000.0;
    }
    return 0;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [-p PROCS] [-t THREADS] [-d SECONDS] [-w WARMUP] [-P PIN] [-l LABEL] [-H] "
            "MODULE OP\n  OP: random | ecsign | rsasign | attrs | find\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv) {
    int procs = 1, threads = 1, hold = 0, c;
    double seconds = 3.0, warmup = 0.2;
    const char *pin = "1234", *label = NULL;
    while ((c = getopt(argc, argv, "p:t:d:w:P:l:H")) != -1) {
        switch (c) {
        case 'p': procs = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'P': pin = optarg; break;
        case 'l': label = optarg; break;
        case 'H': hold = 1; break;
        default: usage(argv[0]);
        }
    }
    if (argc - optind != 2 || procs < 1 || procs > 256 || threads < 1 || threads > 256 ||
        seconds <= 0 || warmup < 0)
        usage(argv[0]);
    const char *module = argv[optind];
    op = argv[optind + 1];
    if (strcmp(op, "random") && strcmp(op, "ecsign") && strcmp(op, "rsasign") &&
        strcmp(op, "attrs") && strcmp(op, "find"))
        usage(argv[0]);

    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) { perror("mmap"); return 1; }
    fflush(NULL);
    pid_t *pids = calloc((size_t)procs, sizeof *pids);
    for (int i = 0; i < procs; i++) {
        pids[i] = fork();
        if (pids[i] < 0) { perror("fork"); return 1; }
        if (pids[i] == 0) load_process(i, module, threads, pin, label);
    }

    /* wait until every process is ready (or one failed or died) */
    uint64_t deadline = now_ns() + 120ULL * 1000000000ULL;
    int alive = procs;
    while (__atomic_load_n(&sh->ready, __ATOMIC_SEQ_CST) < procs) {
        int status;
        pid_t p = waitpid(-1, &status, WNOHANG);
        if (p > 0) alive--;
        if (sh->failed || p > 0 || now_ns() > deadline) {
            for (int i = 0; i < procs; i++) kill(pids[i], SIGKILL);
            while (wait(NULL) > 0 || errno == EINTR) {}
            if (sh->failed) fprintf(stderr, "%s\n", sh->message);
            else if (p > 0) fprintf(stderr, "a load process died during set-up (status 0x%x)\n",
                                    status);
            else fprintf(stderr, "set-up did not finish within 120 s\n");
            return 1;
        }
        nap_us(1000);
    }
    uint64_t t = now_ns();
    sh->t_start = t + (uint64_t)(warmup * 1e9);
    sh->t_end = sh->t_start + (uint64_t)(seconds * 1e9);
    __atomic_store_n(&sh->go, 1, __ATOMIC_RELEASE);

    /* Mark the recorded window on stdout as it opens and closes, so that the caller can
     * sample the CPU time of the server processes right at its edges. */
    uint64_t now = now_ns();
    if (now < sh->t_start) nap_us((long)((sh->t_start - now) / 1000));
    printf("window=start\n");
    fflush(stdout);
    now = now_ns();
    if (now < sh->t_end) nap_us((long)((sh->t_end - now) / 1000));
    printf("window=end\n");
    fflush(stdout);
    if (hold) { /* -H: the caller samples, then writes a line (or closes stdin) */
        int ch;
        while ((ch = getchar()) != EOF && ch != '\n') {}
    }
    __atomic_store_n(&sh->release, 1, __ATOMIC_RELEASE);

    int crashed = 0;
    for (; alive > 0; alive--) {
        int status;
        pid_t p = wait(&status);
        if (p < 0) { if (errno == EINTR) { alive++; continue; } break; }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) crashed++;
    }
    if (crashed) {
        fprintf(stderr, "%d load process(es) failed%s%s\n", crashed, sh->failed ? ": " : "",
                sh->failed ? sh->message : "");
        return 1;
    }
    double mean = sh->calls ? (double)sh->sum_ns / (double)sh->calls / 1000.0 : 0;
    printf("ops_per_s=%.1f p50_us=%.2f p99_us=%.2f mean_us=%.2f max_us=%.1f calls=%llu "
           "completed=%llu errors=%llu first_error=0x%lx procs=%d threads=%d\n",
           (double)sh->completed / seconds, percentile_us(0.50), percentile_us(0.99), mean,
           (double)sh->max_ns / 1000.0, (unsigned long long)sh->calls,
           (unsigned long long)sh->completed,
           (unsigned long long)sh->errors, sh->first_error, procs, threads);
    return 0;
}
