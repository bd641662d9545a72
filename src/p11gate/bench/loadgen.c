/* p11gate load generator: N threads, each with its own session on one PKCS#11 module
 * instance, run one operation for a fixed time and record every call's latency.
 *
 * usage: loadgen MODULE OP THREADS SECONDS PIN TOKEN_LABEL|-
 * OP: random | ecsign | rsasign | attrs | find
 * prints: ops_per_s=F p50_us=F p99_us=F errors=N
 */
#define CK_PTR *
#define CK_DECLARE_FUNCTION(rv, name) rv name
#define CK_DECLARE_FUNCTION_POINTER(rv, name) rv (*name)
#define CK_CALLBACK_FUNCTION(rv, name) rv (*name)
#include <p11-kit/pkcs11.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static CK_FUNCTION_LIST *p11;
static CK_SLOT_ID slot;
static const char *op;
static double duration;
static volatile int running;

struct worker {
    pthread_t thread;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE ec, rsa;
    double *lat;
    long n, cap, errors;
};

static double clock_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static CK_OBJECT_HANDLE key_by_id(CK_SESSION_HANDLE s, unsigned char id) {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[2] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, &id, 1}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG count = 0;
    if (p11->C_FindObjectsInit(s, t, 2) != CKR_OK) return CK_INVALID_HANDLE;
    p11->C_FindObjects(s, &h, 1, &count);
    p11->C_FindObjectsFinal(s);
    return count == 1 ? h : CK_INVALID_HANDLE;
}

static int once(struct worker *w) {
    unsigned char out[512], data[32];
    CK_ULONG len = sizeof out;
    memset(data, 0x5a, sizeof data);
    if (!strcmp(op, "random"))
        return p11->C_GenerateRandom(w->session, out, 32) == CKR_OK;
    if (!strcmp(op, "ecsign") || !strcmp(op, "rsasign")) {
        int ecdsa = !strcmp(op, "ecsign");
        CK_MECHANISM m = {ecdsa ? CKM_ECDSA : CKM_SHA256_RSA_PKCS, NULL, 0};
        if (p11->C_SignInit(w->session, &m, ecdsa ? w->ec : w->rsa) != CKR_OK) return 0;
        return p11->C_Sign(w->session, data, sizeof data, out, &len) == CKR_OK;
    }
    if (!strcmp(op, "attrs")) {
        CK_KEY_TYPE kt;
        CK_BBOOL sign;
        unsigned char label[64];
        CK_ATTRIBUTE t[3] = {{CKA_KEY_TYPE, &kt, sizeof kt}, {CKA_SIGN, &sign, sizeof sign},
                             {CKA_LABEL, label, sizeof label}};
        return p11->C_GetAttributeValue(w->session, w->ec, t, 3) == CKR_OK;
    }
    if (!strcmp(op, "find")) {
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        unsigned char id = 1;
        CK_ATTRIBUTE t[2] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, &id, 1}};
        CK_OBJECT_HANDLE h[4];
        CK_ULONG count = 0;
        if (p11->C_FindObjectsInit(w->session, t, 2) != CKR_OK) return 0;
        CK_RV rv = p11->C_FindObjects(w->session, h, 4, &count);
        return p11->C_FindObjectsFinal(w->session) == CKR_OK && rv == CKR_OK && count == 1;
    }
    return 0;
}

static void *run(void *arg) {
    struct worker *w = arg;
    while (!running) { struct timespec t = {0, 100000}; nanosleep(&t, NULL); }
    double end = clock_s() + duration;
    for (;;) {
        double t0 = clock_s();
        if (t0 >= end || running < 0) break;
        int ok = once(w);
        double t1 = clock_s();
        if (!ok) w->errors++;
        if (w->n == w->cap) {
            w->cap = w->cap ? w->cap * 2 : 65536;
            w->lat = realloc(w->lat, (size_t)w->cap * sizeof *w->lat);
            if (!w->lat) { fprintf(stderr, "out of memory\n"); exit(3); }
        }
        w->lat[w->n++] = t1 - t0;
    }
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s MODULE OP THREADS SECONDS PIN TOKEN_LABEL|-\n", argv[0]);
        return 2;
    }
    op = argv[2];
    int threads = atoi(argv[3]);
    duration = atof(argv[4]);
    const char *pin = argv[5], *label = argv[6];
    if (threads < 1 || threads > 1024 || duration <= 0) { fprintf(stderr, "bad args\n"); return 2; }

    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (!get || get(&p11) != CKR_OK) { fprintf(stderr, "C_GetFunctionList failed\n"); return 1; }
    CK_C_INITIALIZE_ARGS init = {NULL, NULL, NULL, NULL, CKF_OS_LOCKING_OK, NULL};
    CK_RV rv = p11->C_Initialize(&init);
    if (rv != CKR_OK) { fprintf(stderr, "C_Initialize: 0x%lx\n", rv); return 1; }

    CK_SLOT_ID slots[64];
    CK_ULONG nslots = 64;
    if (p11->C_GetSlotList(CK_TRUE, slots, &nslots) != CKR_OK || !nslots) {
        fprintf(stderr, "no token\n"); return 1;
    }
    slot = slots[0];
    if (strcmp(label, "-")) {
        size_t ll = strlen(label);
        int found = 0;
        for (CK_ULONG i = 0; i < nslots && !found; i++) {
            CK_TOKEN_INFO ti;
            if (p11->C_GetTokenInfo(slots[i], &ti) != CKR_OK) continue;
            if (ll <= 32 && !memcmp(ti.label, label, ll)) {
                found = 1;
                for (size_t k = ll; k < 32; k++) if (ti.label[k] != ' ') found = 0;
                if (found) slot = slots[i];
            }
        }
        if (!found) { fprintf(stderr, "token %s not found\n", label); return 1; }
    }

    struct worker *w = calloc((size_t)threads, sizeof *w);
    for (int i = 0; i < threads; i++) {
        rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                &w[i].session);
        if (rv != CKR_OK) { fprintf(stderr, "C_OpenSession: 0x%lx\n", rv); return 1; }
        if (i == 0) {
            rv = p11->C_Login(w[0].session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
            if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
                fprintf(stderr, "C_Login: 0x%lx\n", rv); return 1;
            }
        }
    }
    for (int i = 0; i < threads; i++) {
        w[i].ec = key_by_id(w[i].session, 1);
        w[i].rsa = key_by_id(w[i].session, 2);
        if (!w[i].ec || !w[i].rsa) { fprintf(stderr, "keys id 01/02 not found\n"); return 1; }
        pthread_create(&w[i].thread, NULL, run, &w[i]);
    }
    double t0 = clock_s();
    running = 1;
    long total = 0, errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        total += w[i].n;
        errors += w[i].errors;
    }
    double elapsed = clock_s() - t0;
    double *all = malloc((size_t)(total ? total : 1) * sizeof *all);
    long k = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, w[i].lat, (size_t)w[i].n * sizeof *all);
        k += w[i].n;
        p11->C_CloseSession(w[i].session);
    }
    qsort(all, (size_t)total, sizeof *all, by_value);
    double p50 = total ? all[total / 2] : 0, p99 = total ? all[(long)(total * 0.99)] : 0;
    printf("ops_per_s=%.1f p50_us=%.1f p99_us=%.1f errors=%ld\n", total / elapsed, p50 * 1e6,
           p99 * 1e6, errors);
    p11->C_Finalize(NULL);
    return 0;
}
