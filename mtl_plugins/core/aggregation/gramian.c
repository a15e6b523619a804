/* Exact float64 Gramians of float32 rows, and weighted sums of the rows, for
 * mtl_plugins.core.aggregation.c_gramian.
 *
 * The rows are given as segments: row r of segment s starts at rows[s * t + r] (NULL: zeros)
 * and segment s holds the logical columns [offsets[s], offsets[s + 1]). A [T, P] matrix is
 * the table of one row pointer per (segment, row) into it; per-task gradients kept as one
 * tensor per parameter (c_gramian.py: the engine's per-task rows) are the table of their
 * data pointers.
 *
 * Gramian: K[i][j] = sum_k (double) g[i][k] * (double) g[j][k] over the columns of each
 * segment (mtl_gramians), or over all segments (mtl_gramian_rows). The product of two float32
 * numbers is exact in float64 (24 + 24 <= 53 significant bits), so only the float64 sums
 * round. The summation order is fixed by the source alone:
 *   - each segment is cut into items of CHUNK columns (the last one shorter);
 *   - within an item, column k goes to lane (k - item start) % LANES; each lane is a float64
 *     running sum; the item's value is the sum of its LANES lanes in lane order;
 *   - a segment's value is the sum of its items' values in item order (mtl_gramian_rows:
 *     one value for all items of all segments, in order).
 * Vector width, thread count and compiler only change how this is scheduled, not what is
 * added to what: the results are bitwise identical on every machine (an FMA cannot change
 * them either, the products being exact).
 *
 * Weighted sum (mtl_combine_rows): out_s[k] = (float) sum_r w[r] * (double) g[r][k], the
 * float64 sum in row order, rounded once (the weights shared by all segments, or one vector
 * per segment: GradVac's per-layer weights); out_s may be row 0 of segment s itself (each column
 * is read before it is written). The products w[r] * g are not exact, so whether the compiler
 * contracts them into FMAs (it does where the CPU has them) changes the last bit: the same on
 * one machine, for any thread count.
 *
 * Sums (mtl_sums): each float32 array summed in float64 (VW * 4 lanes, then in lane order):
 * finite float32 entries cannot overflow it, so a sum is finite iff its array is.
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

typedef struct job job_t;
typedef int (*item_fn)(const job_t *job, int64_t it, void *scratch);

struct job {
    const float *const *rows;               /* [nseg * t] row starts; NULL: zeros */
    const int64_t *offsets;                 /* [nseg + 1] logical columns of the segments */
    int64_t t, nitems, nthreads;
    const int64_t *item_start, *item_end, *item_seg;  /* logical columns, segment of items */
    const float *zeros;                     /* CHUNK zeros: the NULL rows' columns */
    item_fn fn;                             /* what is done with one item */
    double *partial;                        /* Gramian: [nitems][t * t], each item's values */
    const double *w;                        /* weighted sum: the weights of segment s */
    int64_t w_stride;                       /*   at w + s * w_stride (0: one [t] vector) */
    float *const *out;                      /* weighted sum: [nseg] outputs */
};

/* The t row pointers of item it, at its first column (the NULL rows: the zeros). */
static void item_rows(const job_t *job, int64_t it, const float **p) {
    const int64_t s = job->item_seg[it], skip = job->item_start[it] - job->offsets[s];
    for (int64_t r = 0; r < job->t; ++r) {
        const float *row = job->rows[s * job->t + r];
        p[r] = row != NULL ? row + skip : job->zeros;
    }
}

/* The value of one item for every pair (i <= j) into job->partial[it]. */
static int gramian_item(const job_t *job, int64_t it, void *scratch) {
    tile_acc *accs = (tile_acc *)scratch;
    const int64_t t = job->t, nt = (t + R - 1) / R;
    const int64_t c0 = job->item_start[it], c1 = job->item_end[it];
    const int64_t full = (c1 - c0) - (c1 - c0) % LANES;
    double *out = job->partial + it * t * t;
    const float *g[t];
    item_rows(job, it, g);
    memset(accs, 0, sizeof(tile_acc) * (size_t)(nt * nt));
    for (int64_t c = 0; c < full; c += BLOCK) {
        const int64_t n = c + BLOCK < full ? BLOCK : full - c;
        for (int64_t ti = 0; ti < nt; ++ti)
            for (int64_t tj = ti; tj < nt; ++tj) {
                const float *a[R], *b[R];
                const int ra = (int)(t - ti * R < R ? t - ti * R : R);
                const int rb = (int)(t - tj * R < R ? t - tj * R : R);
                for (int i = 0; i < ra; ++i) a[i] = g[ti * R + i] + c;
                for (int j = 0; j < rb; ++j) b[j] = g[tj * R + j] + c;
                dispatch(a, ra, b, rb, ti == tj, n, &accs[ti * nt + tj]);
            }
    }
    for (int64_t i = 0; i < t; ++i)
        for (int64_t j = i; j < t; ++j) {
            const vd *pair = accs[(i / R) * nt + j / R].v[(i % R) * R + j % R];
            double lane[LANES];
            for (int u = 0; u < V; ++u)
                for (int e = 0; e < VW; ++e) lane[u * VW + e] = pair[u][e];
            for (int64_t k = full; k < c1 - c0; ++k)  /* the tail: lanes 0.. in order */
                lane[k - full] += (double)g[i][k] * (double)g[j][k];
            double sum = 0.0;
            for (int l = 0; l < LANES; ++l) sum += lane[l];
            out[i * t + j] = sum;
        }
    return 0;
}

#define CU 4  /* vectors of columns per step of the weighted sum: independent FMA chains */

/* Columns [k, k + CU * VW) of the weighted sum, each column's float64 sum in row order. */
static inline __attribute__((always_inline)) void combine_block(const float *const *g,
                                                               int64_t t, const double *w,
                                                               int64_t k, float *o) {
    vd acc[CU];
    for (int u = 0; u < CU; ++u) acc[u] = (vd){0};
    for (int64_t r = 0; r < t; ++r) {
        const double wr = w[r];
        for (int u = 0; u < CU; ++u) {
            vf f;
            memcpy(&f, g[r] + k + u * VW, sizeof f);
            acc[u] += wr * __builtin_convertvector(f, vd);
        }
    }
    for (int u = 0; u < CU; ++u) {
        const vf f = __builtin_convertvector(acc[u], vf);
        memcpy(o + k + u * VW, &f, sizeof f);
    }
}

/* Columns [k, k + m) of the weighted sum (m <= VW), with the same arithmetic per column. */
static inline __attribute__((always_inline)) void combine_cols(const float *const *g,
                                                              int64_t t, const double *w,
                                                              int64_t k, int64_t m, float *o) {
    vd acc = {0};
    for (int64_t r = 0; r < t; ++r) {
        vf f = {0};
        memcpy(&f, g[r] + k, sizeof(float) * (size_t)m);
        acc += w[r] * __builtin_convertvector(f, vd);
    }
    const vf f = __builtin_convertvector(acc, vf);
    memcpy(o + k, &f, sizeof(float) * (size_t)m);
}

/* out_s over one item's columns: the weighted sum of the t rows, in float64, rounded once;
 * the last columns (fewer than CU * VW) through the same arithmetic a vector at a time. */
static int combine_item(const job_t *job, int64_t it, void *scratch) {
    (void)scratch;
    const int64_t t = job->t, s = job->item_seg[it];
    const int64_t n = job->item_end[it] - job->item_start[it];
    float *o = job->out[s] + (job->item_start[it] - job->offsets[s]);
    const double *w = job->w + s * job->w_stride;
    const float *g[t];
    item_rows(job, it, g);
    int64_t k = 0;
    for (; k + CU * VW <= n; k += CU * VW) combine_block(g, t, w, k, o);
    for (; k + VW <= n; k += VW) combine_cols(g, t, w, k, VW, o);
    if (k < n) combine_cols(g, t, w, k, n - k, o);
    return 0;
}

/* Worker `first` takes items first, first + nthreads, ...: a fixed share, so whichever
 * thread runs it, every item's value lands in its own slot of job->partial. */
typedef struct { const job_t *job; int64_t first; int failed; } worker_t;

static void *run_items(void *arg) {
    worker_t *w = (worker_t *)arg;
    const job_t *job = w->job;
    const int64_t nt = (job->t + R - 1) / R;
    void *scratch = NULL;
    if (job->fn == gramian_item) {  /* the tile accumulators */
        scratch = aligned_alloc(64, sizeof(tile_acc) * (size_t)(nt * nt));
        if (scratch == NULL) {
            w->failed = 1;
            return NULL;
        }
    }
    for (int64_t it = w->first; it < job->nitems; it += job->nthreads)
        w->failed |= job->fn(job, it, scratch);
    free(scratch);
    return NULL;
}

#define MAX_THREADS 256

/* Runs job->fn on every item of the segments (job->rows, job->offsets, job->t and the
 * fn's inputs set) on up to nthreads threads; fills in the items (job->item_*, kept for
 * gather, freed by release) and the Gramian's job->partial. Returns 0, or -1 when memory
 * could not be allocated. */
static int run(job_t *job, int64_t nseg, int64_t nthreads) {
    int64_t nitems = 0;
    for (int64_t s = 0; s < nseg; ++s) {
        const int64_t width = job->offsets[s + 1] - job->offsets[s];
        nitems += width > CHUNK ? (width + CHUNK - 1) / CHUNK : 1;
    }
    int64_t *bounds = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * nitems + 1));
    float *zeros = (float *)calloc(CHUNK, sizeof(float));
    double *partial = job->fn == gramian_item
        ? (double *)malloc(sizeof(double) * (size_t)(nitems * job->t * job->t + 1)) : NULL;
    if (bounds == NULL || zeros == NULL || (job->fn == gramian_item && partial == NULL)) {
        free(bounds);
        free(zeros);
        free(partial);
        return -1;
    }
    int64_t *start = bounds, *end = bounds + nitems, *seg = bounds + 2 * nitems, it = 0;
    for (int64_t s = 0; s < nseg; ++s) {
        int64_t c = job->offsets[s];
        do {
            start[it] = c;
            end[it] = c + CHUNK < job->offsets[s + 1] ? c + CHUNK : job->offsets[s + 1];
            seg[it++] = s;
            c += CHUNK;
        } while (c < job->offsets[s + 1]);
    }
    int64_t n = nthreads < 1 ? 1 : nthreads;
    n = n > (nitems + ITEMS_PER_THREAD - 1) / ITEMS_PER_THREAD
            ? (nitems + ITEMS_PER_THREAD - 1) / ITEMS_PER_THREAD : n;
    n = n > MAX_THREADS ? MAX_THREADS : n;
    job->nitems = nitems;
    job->nthreads = n;
    job->item_start = start;
    job->item_end = end;
    job->item_seg = seg;
    job->zeros = zeros;
    job->partial = partial;
    pthread_t threads[MAX_THREADS];
    worker_t workers[MAX_THREADS];
    int running[MAX_THREADS];
    for (int64_t w = 0; w < n; ++w) {
        workers[w] = (worker_t){job, w, 0};
        running[w] = w > 0 && pthread_create(&threads[w], NULL, run_items, &workers[w]) == 0;
    }
    for (int64_t w = 0; w < n; ++w)  /* worker 0's share, and any whose thread did not start */
        if (!running[w]) run_items(&workers[w]);
    int failed = 0;
    for (int64_t w = 0; w < n; ++w) {
        if (running[w]) pthread_join(threads[w], NULL);
        failed |= workers[w].failed;
    }
    free(zeros);
    return failed ? -1 : 0;
}

/* The items' values (job->partial) summed in item order into out: one t x t Gramian per
 * segment (per_segment) or one for all; symmetric. Frees what run() allocated. */
static void gather(job_t *job, int64_t nseg, int per_segment, double *out) {
    const int64_t t = job->t, nout = per_segment ? nseg : 1;
    for (int64_t q = 0; q < nout * t * t; ++q) out[q] = 0.0;
    for (int64_t it = 0; it < job->nitems; ++it) {  /* items in order: the fixed order */
        double *o = out + (per_segment ? job->item_seg[it] : 0) * t * t;
        const double *p = job->partial + it * t * t;
        for (int64_t i = 0; i < t; ++i)
            for (int64_t j = i; j < t; ++j) o[i * t + j] += p[i * t + j];
    }
    for (int64_t s = 0; s < nout; ++s)
        for (int64_t i = 0; i < t; ++i)
            for (int64_t j = 0; j < i; ++j)
                out[s * t * t + i * t + j] = out[s * t * t + j * t + i];
}

static void release(job_t *job) {
    free((void *)job->item_start);  /* bounds: item_start is its first third */
    free(job->partial);
}

/* out[s] (t x t, symmetric) = Gramian of columns [offsets[s], offsets[s + 1]) of the t rows
 * at g (row r at g + r * stride, columns contiguous), for s < nseg, on up to nthreads
 * threads. Returns 0, or -1 when memory could not be allocated (out is then unspecified).
 * Not checked here (c_gramian.py checks them): t >= 1, offsets[0] = 0, non-decreasing
 * offsets within the rows, out holding nseg * t * t doubles. */
int mtl_gramians(const float *g, int64_t t, int64_t stride, const int64_t *offsets,
                 int64_t nseg, int64_t nthreads, double *out) {
    const float **rows = (const float **)malloc(sizeof(float *) * (size_t)(nseg * t + 1));
    if (rows == NULL) return -1;
    for (int64_t s = 0; s < nseg; ++s)
        for (int64_t r = 0; r < t; ++r) rows[s * t + r] = g + r * stride + offsets[s];
    job_t job = {.rows = rows, .offsets = offsets, .t = t, .fn = gramian_item};
    const int status = run(&job, nseg, nthreads);
    if (status == 0) gather(&job, nseg, 1, out);
    release(&job);
    free(rows);
    return status;
}

/* out (t x t, symmetric) = Gramian of the t rows over all nseg segments (rows, offsets: see
 * the top of this file), the items of all segments summed in order; per_segment: one
 * Gramian per segment instead (out holding nseg * t * t doubles, as mtl_gramians). Returns
 * 0 or -1 as mtl_gramians. Not checked here: t >= 1, offsets[0] = 0, non-decreasing
 * offsets. */
int mtl_gramian_rows(const float *const *rows, int64_t t, const int64_t *offsets,
                     int64_t nseg, int64_t nthreads, int64_t per_segment, double *out) {
    job_t job = {.rows = rows, .offsets = offsets, .t = t, .fn = gramian_item};
    const int status = run(&job, nseg, nthreads);
    if (status == 0) gather(&job, nseg, per_segment != 0, out);
    release(&job);
    return status;
}

/* out[s][k] = (float) sum_r w[s * w_stride + r] * (double) rows[s * t + r][k] for every
 * column k of every segment s (see the top of this file): one weight vector for all
 * segments (w_stride 0) or one per segment (w_stride t); out[s] may be rows[s * t] itself.
 * Returns 0 or -1 as mtl_gramians. Not checked here: t >= 1, offsets[0] = 0,
 * non-decreasing offsets, every out[s] non-NULL and holding its segment's columns. */
int mtl_combine_rows(const float *const *rows, int64_t t, const int64_t *offsets,
                     int64_t nseg, const double *w, int64_t w_stride, float *const *out,
                     int64_t nthreads) {
    job_t job = {.rows = rows, .offsets = offsets, .t = t, .fn = combine_item, .w = w,
                 .w_stride = w_stride, .out = out};
    const int status = run(&job, nseg, nthreads);
    release(&job);
    return status;
}

/* out[i] = sum of the n[i] floats at p[i] in float64 (4 * VW running sums, added in order,
 * then the tail), for i < count: NaN/inf when an entry is, finite otherwise (finite float32
 * entries cannot overflow a float64 sum). Not checked here: p[i] holding n[i] floats. */
void mtl_sums(const float *const *p, const int64_t *n, int64_t count, double *out) {
    for (int64_t i = 0; i < count; ++i) {
        vd acc[CU];
        for (int u = 0; u < CU; ++u) acc[u] = (vd){0};
        int64_t k = 0;
        for (; k + CU * VW <= n[i]; k += CU * VW)
            for (int u = 0; u < CU; ++u) acc[u] += load(p[i] + k + u * VW);
        double sum = 0.0;
        for (int u = 0; u < CU; ++u)
            for (int e = 0; e < VW; ++e) sum += acc[u][e];
        for (; k < n[i]; ++k) sum += (double)p[i][k];
        out[i] = sum;
    }
}
