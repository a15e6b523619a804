/* Exact float64 Gramians of float32 rows, for mtl_plugins.core.aggregation.c_gramian.
 *
 * K[i][j] = sum_k (double) g[i][k] * (double) g[j][k] over the columns of each segment.
 * The product of two float32 numbers is exact in float64 (24 + 24 <= 53 significant bits),
 * so only the float64 sums round. The summation order is fixed by the source alone:
 *   - each segment is cut into items of CHUNK columns (the last one shorter);
 *   - within an item, column k goes to lane (k - item start) % LANES; each lane is a float64
 *     running sum; the item's value is the sum of its LANES lanes in lane order;
 *   - a segment's value is the sum of its items' values in item order.
 * Vector width, thread count and compiler only change how this is scheduled, not what is
 * added to what: the results are bitwise identical on every machine (an FMA cannot change
 * them either, the products being exact).
 *
 * Build flags (c_gramian.py): -O3 -DVW=<doubles per vector register> plus -mavx512f / -mavx2
 * -mfma where the CPU has them. No libraries beyond libc and pthreads.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef VW
#define VW 2                /* doubles per vector: 8 AVX-512, 4 AVX2, 2 baseline */
#endif
#define LANES 16            /* running sums per pair: fixed, whatever VW is */
#define V (LANES / VW)      /* vectors per pair */
#define R 3                 /* rows per tile: a 3 x 3 tile keeps 6..9 pairs in registers */
#define CHUNK 65536         /* columns per item: the unit of the summation order, and of work */
#define BLOCK 2048          /* columns per pass over the tiles (stays in L1/L2) */
#define ITEMS_PER_THREAD 4  /* a thread costs about one item's work to start: no fewer */

typedef double vd __attribute__((vector_size(8 * VW)));
typedef float vf __attribute__((vector_size(4 * VW)));
typedef struct { vd v[R * R][V]; } tile_acc;  /* pair (i, j) of a tile at v[i * R + j] */

static inline __attribute__((always_inline)) vd load(const float *p) {
    vf f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, vd);
}

/* acc += products of rows a[0..ra) and b[0..rb) over n columns (n a multiple of LANES); for a
 * diagonal tile (sym) b is a and only the pairs j >= i are formed. ra, rb, sym are constants
 * at every call site (dispatch), so the loops unroll and the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *const *a, const int ra,
                                                      const float *const *b, const int rb,
                                                      const int sym, const int64_t n,
                                                      tile_acc *acc) {
    vd s[R * R][V];
    for (int q = 0; q < R * R; ++q)
        for (int u = 0; u < V; ++u) s[q][u] = acc->v[q][u];
    for (int64_t k = 0; k < n; k += LANES) {
        for (int u = 0; u < V; ++u) {
            vd x[R], y[R];
            for (int i = 0; i < ra; ++i) x[i] = load(a[i] + k + VW * u);
            for (int j = 0; j < rb; ++j) y[j] = sym ? x[j] : load(b[j] + k + VW * u);
            for (int i = 0; i < ra; ++i)
                for (int j = sym ? i : 0; j < rb; ++j) s[i * R + j][u] += x[i] * y[j];
        }
    }
    for (int q = 0; q < R * R; ++q)
        for (int u = 0; u < V; ++u) acc->v[q][u] = s[q][u];
}

#define CASE(RA, RB, SYM) \
    case (RA) * 16 + (RB) * 2 + (SYM): tile(a, RA, b, RB, SYM, n, acc); break;

static void dispatch(const float *const *a, int ra, const float *const *b, int rb, int sym,
                     int64_t n, tile_acc *acc) {
    switch (ra * 16 + rb * 2 + sym) {
        CASE(1, 1, 1) CASE(2, 2, 1) CASE(3, 3, 1)
        CASE(1, 1, 0) CASE(1, 2, 0) CASE(1, 3, 0) CASE(2, 1, 0) CASE(2, 2, 0) CASE(2, 3, 0)
        CASE(3, 1, 0) CASE(3, 2, 0) CASE(3, 3, 0)
    }
}

typedef struct {
    const float *g;
    int64_t t, stride, nitems, nthreads;
    const int64_t *item_start, *item_end;  /* absolute columns of each item */
    double *partial;                         /* [nitems][t * t]: each item's values */
} job_t;

/* The value of one item for every pair (i <= j) into out[i * t + j]. */
static void item(const job_t *job, int64_t c0, int64_t c1, tile_acc *accs, double *out) {
    const int64_t t = job->t, nt = (t + R - 1) / R;
    const int64_t full = (c1 - c0) - (c1 - c0) % LANES;
    memset(accs, 0, sizeof(tile_acc) * (size_t)(nt * nt));
    for (int64_t c = 0; c < full; c += BLOCK) {
        const int64_t n = c + BLOCK < full ? BLOCK : full - c;
        for (int64_t ti = 0; ti < nt; ++ti)
            for (int64_t tj = ti; tj < nt; ++tj) {
                const float *a[R], *b[R];
                const int ra = (int)(t - ti * R < R ? t - ti * R : R);
                const int rb = (int)(t - tj * R < R ? t - tj * R : R);
                for (int i = 0; i < ra; ++i) a[i] = job->g + (ti * R + i) * job->stride + c0 + c;
                for (int j = 0; j < rb; ++j) b[j] = job->g + (tj * R + j) * job->stride + c0 + c;
                dispatch(a, ra, b, rb, ti == tj, n, &accs[ti * nt + tj]);
            }
    }
    for (int64_t i = 0; i < t; ++i)
        for (int64_t j = i; j < t; ++j) {
            const vd *pair = accs[(i / R) * nt + j / R].v[(i % R) * R + j % R];
            double lane[LANES];
            for (int u = 0; u < V; ++u)
                for (int e = 0; e < VW; ++e) lane[u * VW + e] = pair[u][e];
            for (int64_t k = c0 + full; k < c1; ++k)  /* the tail: lanes 0.. in order */
                lane[k - c0 - full] += (double)job->g[i * job->stride + k] *
                                       (double)job->g[j * job->stride + k];
            double sum = 0.0;
            for (int l = 0; l < LANES; ++l) sum += lane[l];
            out[i * t + j] = sum;
        }
}

/* Worker `first` takes items first, first + nthreads, ...: a fixed share, so whichever
 * thread runs it, every item's value lands in its own slot of job->partial. */
typedef struct { const job_t *job; int64_t first; int failed; } worker_t;

static void *run_items(void *arg) {
    worker_t *w = (worker_t *)arg;
    const job_t *job = w->job;
    const int64_t nt = (job->t + R - 1) / R;
    tile_acc *accs = (tile_acc *)aligned_alloc(64, sizeof(tile_acc) * (size_t)(nt * nt));
    if (accs == NULL) {
        w->failed = 1;
        return NULL;
    }
    for (int64_t it = w->first; it < job->nitems; it += job->nthreads)
        item(job, job->item_start[it], job->item_end[it], accs,
             job->partial + it * job->t * job->t);
    free(accs);
    return NULL;
}

#define MAX_THREADS 256

/* out[s] (t x t, symmetric) = Gramian of columns [offsets[s], offsets[s + 1]) of the t rows
 * at g (row r at g + r * stride, columns contiguous), for s < nseg, on up to nthreads
 * threads. Returns 0, or -1 when memory could not be allocated (out is then unspecified).
 * Not checked here (c_gramian.py checks them): t >= 1, offsets[0] = 0, non-decreasing
 * offsets within the rows, out holding nseg * t * t doubles. */
int mtl_gramians(const float *g, int64_t t, int64_t stride, const int64_t *offsets,
                 int64_t nseg, int64_t nthreads, double *out) {
    int64_t nitems = 0;
    for (int64_t s = 0; s < nseg; ++s) {
        const int64_t width = offsets[s + 1] - offsets[s];
        nitems += width > CHUNK ? (width + CHUNK - 1) / CHUNK : 1;
    }
    int64_t *bounds = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * nitems + 1));
    double *partial = (double *)malloc(sizeof(double) * (size_t)(nitems * t * t + 1));
    if (bounds == NULL || partial == NULL) {
        free(bounds);
        free(partial);
        return -1;
    }
    int64_t *start = bounds, *end = bounds + nitems, *seg = bounds + 2 * nitems, it = 0;
    for (int64_t s = 0; s < nseg; ++s) {
        int64_t c = offsets[s];
        do {
            start[it] = c;
            end[it] = c + CHUNK < offsets[s + 1] ? c + CHUNK : offsets[s + 1];
            seg[it++] = s;
            c += CHUNK;
        } while (c < offsets[s + 1]);
    }
    int64_t n = nthreads < 1 ? 1 : nthreads;
    n = n > (nitems + ITEMS_PER_THREAD - 1) / ITEMS_PER_THREAD
            ? (nitems + ITEMS_PER_THREAD - 1) / ITEMS_PER_THREAD : n;
    n = n > MAX_THREADS ? MAX_THREADS : n;
    const job_t job = {g, t, stride, nitems, n, start, end, partial};
    pthread_t threads[MAX_THREADS];
    worker_t workers[MAX_THREADS];
    int running[MAX_THREADS];
    for (int64_t w = 0; w < n; ++w) {
        workers[w] = (worker_t){&job, w, 0};
        running[w] = w > 0 && pthread_create(&threads[w], NULL, run_items, &workers[w]) == 0;
    }
    for (int64_t w = 0; w < n; ++w)  /* worker 0's share, and any whose thread did not start */
        if (!running[w]) run_items(&workers[w]);
    int failed = 0;
    for (int64_t w = 0; w < n; ++w) {
        if (running[w]) pthread_join(threads[w], NULL);
        failed |= workers[w].failed;
    }
    if (!failed) {
        for (int64_t q = 0; q < nseg * t * t; ++q) out[q] = 0.0;
        for (it = 0; it < nitems; ++it) {  /* items in order: the fixed summation order */
            double *o = out + seg[it] * t * t;
            const double *p = partial + it * t * t;
            for (int64_t i = 0; i < t; ++i)
                for (int64_t j = i; j < t; ++j) o[i * t + j] += p[i * t + j];
        }
        for (int64_t s = 0; s < nseg; ++s)
            for (int64_t i = 0; i < t; ++i)
                for (int64_t j = 0; j < i; ++j)
                    out[s * t * t + i * t + j] = out[s * t * t + j * t + i];
    }
    free(bounds);
    free(partial);
    return failed ? -1 : 0;
}
