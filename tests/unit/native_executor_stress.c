/* Stress harness for src/p11gate/backends/native/executor.c, built with the sanitizers by
 * tests/unit/test_native_executor_sanitizers.py: 200,000 calls through 4 threads and a
 * 64-slot table, every 97th cancelled if still queued; each CK_RV checked, every call
 * answered or cancelled exactly once, then stop and free. */
#include <stdint.h>
#include <stdio.h>
#include <poll.h>
#include <unistd.h>
#include <stdlib.h>
typedef struct p11x p11x;
p11x *p11x_new(int nthreads, uint32_t njobs);
int64_t p11x_submit(p11x *x, uintptr_t fn, int nargs, const uintptr_t *args, uint64_t tag);
int p11x_cancel(p11x *x, uint32_t i, uint64_t tag);
int p11x_take(p11x *x, uint64_t *tags, unsigned long *rvs, int max);
int p11x_bell_fd(p11x *x);
int p11x_stop(p11x *x);
int p11x_free(p11x *x);
static unsigned long add3(uintptr_t a, uintptr_t b, uintptr_t c) { return a + b + c; }
int main(void) {
    p11x *x = p11x_new(4, 64);
    int fd = p11x_bell_fd(x);
    uint64_t tag = 1, done = 0, sent = 0, cancelled = 0;
    uint64_t tags[256]; unsigned long rvs[256];
    int64_t last = -1; uint64_t lasttag = 0;
    while (done + cancelled < 200000) {
        while (sent < 200000) {
            uintptr_t a[3] = {tag, 1, 2};
            int64_t i = p11x_submit(x, (uintptr_t)add3, 3, a, tag);
            if (i == -1) break;
            if (i < 0) { fprintf(stderr, "submit %ld\n", (long)i); return 1; }
            last = i; lasttag = tag; tag++; sent++;
            if (sent % 97 == 0 && p11x_cancel(x, (uint32_t)last, lasttag)) cancelled++;
        }
        struct pollfd p = {fd, POLLIN, 0};
        poll(&p, 1, 1000);
        char buf[64]; while (read(fd, buf, sizeof buf) > 0) {}
        int n;
        while ((n = p11x_take(x, tags, rvs, 256)) > 0) {
            for (int k = 0; k < n; k++) if (rvs[k] != tags[k] + 3) { fprintf(stderr, "bad rv\n"); return 1; }
            done += n;
        }
    }
    while (p11x_stop(x)) usleep(1000);
    if (p11x_free(x) != 0) return 1;
    printf("done %lu cancelled %lu\n", (unsigned long)done, (unsigned long)cancelled);
    return done + cancelled == 200000 ? 0 : 1;
}
