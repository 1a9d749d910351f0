/* lens_alti native CPU kernels (docs/spec.md §6): distances of one tile without JIT.
 *
 * Built once per machine by lens_alti.alti.native with the system C compiler
 * (gcc/cc -O3 -march=native -fopenmp, see native.FLAGS) and cached next to the converted
 * weights; called through ctypes. Threads: OpenMP, i.e. torch's own worker pool (pthreads
 * where the compiler has no OpenMP). Inputs of one tile (d is contiguous everywhere):
 *   y[c, d] resultants, s[c, d] per-receiver scales (NULL = 1), a[h, c, k] attention
 *   weights (k contiguous), vo[h, k, d] per-head value vectors after W_O.
 * Outputs (contiguous): heads[h, c, k] = ‖y_i − s_i⊙a_hij·vo_hj‖₁ (mode 0 only) and
 *   tokens[c, k] = ‖y_i − s_i⊙Σ_h a_hij·vo_hj‖ (L1 in modes 0/1, L2 in mode 2),
 *   or ‖s_i⊙Σ_h a_hij·vo_hj‖₂ (mode 3, "koba").
 *
 * Tiling: sources are cut into tiles whose vo (all heads) fits in L2; threads take
 * (source tile, block of ROWS receivers) items from a shared counter, tile by tile, so the
 * threads read the same tile while it is in L2 and a preempted thread holds up nobody
 * (causal rows of every length are shared out). For one receiver and one source, heads go in
 * balanced groups of at most GROUP whose accumulators stay in vector registers: per vector
 * of d, y and the running sum over heads are read once, and each head costs one load of vo
 * and four vector operations (fused multiply-subtract, absolute value, accumulate, fused
 * multiply-add into the sum), with per-head partial sums reduced once per (receiver, source,
 * head); the last group computes the token L1 distance in the same pass.
 * Causal clipping inside the tile: a pair (i, j) whose attention is 0 in every head
 * (causal future, padding) is not computed; its distances are the norms of y_i, exactly
 * what the arithmetic would give.
 */
#ifndef LENS_ALTI_BODY
#define LENS_ALTI_BODY
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4
#if defined(__AVX512F__) || !(defined(__AVX__) || defined(__x86_64__)) /* and other platforms: split by the compiler */
#define VBYTES 64 /* one AVX-512 register */
#elif defined(__AVX__)
#define VBYTES 32 /* one AVX register (64-byte vectors split in two ran 3.5x slower with -march=haswell) */
#else
#define VBYTES 16 /* SSE2 */
#endif
#define MAX_THREADS 256

typedef void (*row_fn)(const void *job, int64_t r0, int64_t r1, int64_t k0, int64_t k1);

typedef struct {
    const void *job;
    row_fn fn;
    int64_t n_blocks, n_rows, tid, n_threads, n_keys, key_tile;
    int64_t *next; /* shared work counter (dynamic schedule), or NULL: static */
} worker_arg;

static void *worker(void *p) {
    const worker_arg *w = (const worker_arg *)p;
    const int64_t n_tiles = (w->n_keys + w->key_tile - 1) / w->key_tile;
    if (w->next) {
        /* dynamic: items (key tile, row block) in key-tile-major order, taken from a shared
           counter, so a thread that the OS preempts (other processes on the cores) holds up
           nobody; neighbouring items share the tile of vo (key_tile sources, all heads),
           which stays in L2 while the threads read it */
        for (;;) {
            int64_t it = __atomic_fetch_add(w->next, 1, __ATOMIC_RELAXED);
            if (it >= n_tiles * w->n_blocks) break;
            int64_t k0 = (it / w->n_blocks) * w->key_tile, b = it % w->n_blocks;
            int64_t k1 = k0 + w->key_tile < w->n_keys ? k0 + w->key_tile : w->n_keys;
            int64_t r0 = b * ROWS, r1 = r0 + ROWS < w->n_rows ? r0 + ROWS : w->n_rows;
            w->fn(w->job, r0, r1, k0, k1);
        }
        return NULL;
    }
    /* static: interleaved row blocks, key tiles outermost */
    for (int64_t k0 = 0; k0 < w->n_keys; k0 += w->key_tile) {
        int64_t k1 = k0 + w->key_tile < w->n_keys ? k0 + w->key_tile : w->n_keys;
        for (int64_t b = w->tid; b < w->n_blocks; b += w->n_threads) {
            int64_t r0 = b * ROWS, r1 = r0 + ROWS < w->n_rows ? r0 + ROWS : w->n_rows;
            w->fn(w->job, r0, r1, k0, k1);
        }
    }
    return NULL;
}

/* How many threads to start: at most one per work item (row block, or row block × key tile
 * when `dynamic`), at most MAX_THREADS, at least 1. */
static int plan_threads(int64_t n_blocks, int64_t n_keys, int64_t key_tile, int n_threads, int dynamic) {
    const int64_t items = dynamic ? n_blocks * ((n_keys + key_tile - 1) / key_tile) : n_blocks;
    if (n_threads > items) n_threads = (int)(items < MAX_THREADS ? items : MAX_THREADS);
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads < 1) n_threads = 1;
    return n_threads;
}

/* Runs fn over blocks of ROWS rows × tiles of key_tile keys on n_threads threads; `dynamic`:
 * items from a shared counter (the kernels), else each thread its own interleaved blocks
 * (the roofline: exactly one block per thread). */
#ifdef _OPENMP
/* OpenMP: the library links libgomp.so.1, which resolves to the copy torch already loaded, so
 * the kernels run on torch's own worker threads (separate pthreads would compete with them
 * while they spin-wait after a torch op, ~25 % slower on 2 cores). */
static int run_threads(const void *job, row_fn fn, int64_t n_rows, int64_t n_keys, int64_t key_tile, int n_threads,
                       int dynamic) {
    int64_t n_blocks = (n_rows + ROWS - 1) / ROWS, next = 0;
    if (key_tile < 1) key_tile = 1;
    n_threads = plan_threads(n_blocks, n_keys, key_tile, n_threads, dynamic);
    if (n_threads == 1) {
        worker_arg a = {job, fn, n_blocks, n_rows, 0, 1, n_keys, key_tile, NULL};
        worker(&a);
        return 0;
    }
#pragma omp parallel num_threads(n_threads)
    {
        worker_arg a = {job, fn, n_blocks, n_rows, omp_get_thread_num(), omp_get_num_threads(), n_keys, key_tile,
                        dynamic ? &next : NULL};
        worker(&a);
    }
    return 0;
}
#else
static int run_threads(const void *job, row_fn fn, int64_t n_rows, int64_t n_keys, int64_t key_tile, int n_threads,
                       int dynamic) {
    int64_t n_blocks = (n_rows + ROWS - 1) / ROWS, next = 0;
    if (key_tile < 1) key_tile = 1;
    n_threads = plan_threads(n_blocks, n_keys, key_tile, n_threads, dynamic);
    pthread_t th[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int ok[MAX_THREADS];
    for (int t = 0; t < n_threads; t++) {
        args[t] = (worker_arg){job, fn, n_blocks, n_rows, t, n_threads, n_keys, key_tile, dynamic ? &next : NULL};
        ok[t] = t > 0 && pthread_create(&th[t], NULL, worker, &args[t]) == 0;
    }
    worker(&args[0]);
    for (int t = 1; t < n_threads; t++) {
        if (ok[t]) pthread_join(th[t], NULL);
        else if (!dynamic) worker(&args[t]); /* could not start a thread: do its blocks here */
    }
    return 0;
}
#endif

#define REAL float
#define IREAL int32_t
#define ABS __builtin_fabsf
#define SQRT __builtin_sqrtf
#define SUF(name) name##_f32
#include "_native.c" /* this file again, once per REAL */
#undef REAL
#undef IREAL
#undef ABS
#undef SQRT
#undef SUF
#define REAL double
#define IREAL int64_t
#define ABS __builtin_fabs
#define SQRT __builtin_sqrt
#define SUF(name) name##_f64
#include "_native.c" /* this file again, once per REAL */
#undef REAL
#undef IREAL
#undef ABS
#undef SQRT
#undef SUF

int lens_alti_abi_version(void) { return 1; }

#else /* ------------------------------------------------------------ body, once per REAL */

typedef REAL SUF(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(REAL))));
typedef IREAL SUF(ivec) __attribute__((vector_size(VBYTES), aligned(sizeof(REAL))));
#define VEC SUF(vec)
#define NV ((int64_t)(VBYTES / sizeof(REAL)))
#define LD(p) (*(const VEC *)(p))
#define ST(p, x) (*(VEC *)(p) = (x))
#define VABS(x) ((VEC)((SUF(ivec))(x) & (IREAL)(((uint64_t)1 << (8 * sizeof(REAL) - 1)) - 1)))

/* Horizontal sum by halving (log2 NV vector adds), not inlined and by pointer: keeps the
 * callers' accumulators in registers inside their loops. */
static __attribute__((noinline)) REAL SUF(hsum)(const VEC *x) {
    REAL buf[NV];
    memcpy(buf, x, sizeof buf);
    for (int64_t w = NV / 2; w >= 1; w /= 2)
        for (int64_t i = 0; i < w; i++) buf[i] += buf[i + w];
    return buf[0];
}

/* One receiver, one source, a group of N heads (N ≤ GROUP, a compile-time constant in every
 * instance below, so the N accumulators and weights stay in vector registers):
 *   out[h] = Σ_d |y_d − s_d·w_h·v_hd|   (HAS_OUT),
 *   t_d    = (first ? 0 : t_d) + Σ_h w_h·v_hd, then either stored to t or, when `fuse`,
 *   *tok   = Σ_d |y_d − s_d·t_d| (the token L1 distance, for the last group of heads).
 * y and the running sum are read once per vector for all N heads. Without scales each head
 * costs one load and four vector operations per vector (two fused multiply-adds, an absolute
 * value, an add); HIDE gives the second product its own copy of the weight, so that the
 * compiler does not share w·v between them (which turns two FMAs into a multiply and two
 * adds: 5 operations, 3 of them on the add ports), and keeps v in one register. */
#if defined(__GNUC__) && ((defined(__AVX512F__) && VBYTES == 64) || (defined(__AVX__) && VBYTES == 32) || (defined(__SSE2__) && VBYTES == 16)) /* VEC is one register */
#define HIDE(x) __asm__("" : "+v"(x))
#else /* VEC spans several registers, which no register constraint fits */
#define HIDE(x) ((void)0)
#endif
#define GROUP 8
static inline __attribute__((always_inline)) void SUF(group_body)(
    const int N, const int HAS_OUT, const int HAS_S, const REAL *restrict y, const REAL *restrict s,
    const REAL *restrict v, int64_t svh, const REAL *restrict w, REAL *restrict t, int first, int fuse,
    REAL *restrict out, REAL *restrict tok, int64_t D) {
    VEC acc[GROUP], wv[GROUP], wt[GROUP];
    const VEC zero = {0};
    _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) {
        acc[hh] = zero, wv[hh] = w[hh] + zero, wt[hh] = wv[hh];
        if (HAS_OUT && !HAS_S) HIDE(wt[hh]);
    }
    VEC ta = zero;
    int64_t d = 0;
    for (; d + NV <= D; d += NV) {
        VEC t0 = first ? zero : LD(t + d), t1 = zero;
        const VEC yv = (HAS_OUT || fuse) ? LD(y + d) : zero;
        const VEC sv = HAS_S ? LD(s + d) : zero;
        _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) {
            VEC vv = LD(v + hh * svh + d);
            if (HAS_S) {
                VEC p = wv[hh] * vv;
                if (HAS_OUT) acc[hh] += VABS(yv - sv * p);
                if (hh & 1) t1 += p;
                else t0 += p;
            } else {
                if (HAS_OUT) HIDE(vv); /* one load, in a register, for both products */
                if (HAS_OUT) acc[hh] += VABS(yv - wv[hh] * vv);
                if (hh & 1) t1 = t1 + wt[hh] * vv;
                else t0 = t0 + wt[hh] * vv;
            }
        }
        const VEC tv = t0 + t1;
        if (fuse) ta += VABS(yv - (HAS_S ? sv * tv : tv));
        else ST(t + d, tv);
    }
    REAL sc[GROUP];
    _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) sc[hh] = HAS_OUT ? SUF(hsum)(&acc[hh]) : 0;
    REAL tsum = fuse ? SUF(hsum)(&ta) : 0;
    for (; d < D; d++) {
        REAL tt = first ? 0 : t[d];
        for (int hh = 0; hh < N; hh++) {
            REAL p = w[hh] * v[hh * svh + d];
            if (HAS_OUT) sc[hh] += ABS(y[d] - (HAS_S ? s[d] : (REAL)1) * p);
            tt += p;
        }
        if (fuse) tsum += ABS(y[d] - (HAS_S ? s[d] : (REAL)1) * tt);
        else t[d] = tt;
    }
    if (HAS_OUT)
        for (int hh = 0; hh < N; hh++) out[hh] = sc[hh];
    if (fuse) *tok = tsum;
}

typedef void (*SUF(group_fn))(const REAL *, const REAL *, const REAL *, int64_t, const REAL *, REAL *, int, int,
                              REAL *, REAL *, int64_t);
#define DEFINE_GROUP(N, O, S)                                                                                   \
    static void SUF(group_##N##_##O##_##S)(const REAL *restrict y, const REAL *restrict s,                     \
                                           const REAL *restrict v, int64_t svh, const REAL *restrict w,        \
                                           REAL *restrict t, int first, int fuse, REAL *restrict out,          \
                                           REAL *restrict tok, int64_t D) {                                    \
        SUF(group_body)(N, O, S, y, s, v, svh, w, t, first, fuse, out, tok, D);                                \
    }
#define DEFINE_GROUPS(N) DEFINE_GROUP(N, 0, 0) DEFINE_GROUP(N, 0, 1) DEFINE_GROUP(N, 1, 0) DEFINE_GROUP(N, 1, 1)
DEFINE_GROUPS(1)
DEFINE_GROUPS(2)
DEFINE_GROUPS(3)
DEFINE_GROUPS(4)
DEFINE_GROUPS(5)
DEFINE_GROUPS(6)
DEFINE_GROUPS(7)
DEFINE_GROUPS(8)
#undef DEFINE_GROUPS
#undef DEFINE_GROUP
#define GROUP_ROW(N) {SUF(group_##N##_0_0), SUF(group_##N##_0_1), SUF(group_##N##_1_0), SUF(group_##N##_1_1)}
/* [N][2 · has_out + has_s] */
static const SUF(group_fn) SUF(groups)[GROUP + 1][4] = {
    {NULL, NULL, NULL, NULL}, GROUP_ROW(1), GROUP_ROW(2), GROUP_ROW(3), GROUP_ROW(4),
    GROUP_ROW(5), GROUP_ROW(6), GROUP_ROW(7), GROUP_ROW(8)};
#undef GROUP_ROW

/* Σ_d |y_d − s_d·t_d| (power 1) or Σ_d (y_d − s_d·t_d)² (power 2); y may be NULL (0), s NULL (1). */
static inline REAL SUF(dist)(const REAL *restrict y, const REAL *restrict s, const REAL *restrict t, int64_t D,
                             int power) {
    VEC a0 = {0}, a1 = {0};
    int64_t d = 0;
    for (; d + 2 * NV <= D; d += 2 * NV) {
        VEC e0 = s ? LD(s + d) * LD(t + d) : LD(t + d), e1 = s ? LD(s + d + NV) * LD(t + d + NV) : LD(t + d + NV);
        if (y) e0 = LD(y + d) - e0, e1 = LD(y + d + NV) - e1;
        a0 += power == 1 ? VABS(e0) : e0 * e0;
        a1 += power == 1 ? VABS(e1) : e1 * e1;
    }
    for (; d + NV <= D; d += NV) {
        VEC e0 = s ? LD(s + d) * LD(t + d) : LD(t + d);
        if (y) e0 = LD(y + d) - e0;
        a0 += power == 1 ? VABS(e0) : e0 * e0;
    }
    const VEC a01 = a0 + a1;
    REAL acc = SUF(hsum)(&a01);
    for (; d < D; d++) {
        REAL e = (s ? s[d] : (REAL)1) * t[d];
        if (y) e = y[d] - e;
        acc += power == 1 ? ABS(e) : e * e;
    }
    return acc;
}

typedef struct {
    int64_t H, C, K, D;
    const REAL *y; int64_t sy;
    const REAL *s; int64_t ss;
    const REAL *a; int64_t sah, sac;
    const REAL *vo; int64_t svh, svk;
    REAL *heads;
    REAL *tokens;
    int mode;
    volatile int failed;
} SUF(job);

static void SUF(rows)(const void *job_, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
    const SUF(job) *jb = (const SUF(job) *)job_;
    const int64_t H = jb->H, K = jb->K, D = jb->D, C = jb->C;
    const int mode = jb->mode;
    const int64_t nr = r1 - r0;
    REAL *tot = (REAL *)malloc((size_t)(ROWS * D) * sizeof(REAL) + 64);
    if (!tot) {
        ((SUF(job) *)job_)->failed = 1;
        return;
    }
    REAL ynorm1[ROWS], ynorm2[ROWS];
    int scaled[ROWS];
    for (int64_t r = 0; r < nr; r++) {
        const REAL *y = jb->y + (r0 + r) * jb->sy;
        ynorm1[r] = SUF(dist)(NULL, NULL, y, D, 1);
        ynorm2[r] = SQRT(SUF(dist)(NULL, NULL, y, D, 2));
        scaled[r] = 0;
        if (jb->s) {
            const REAL *s = jb->s + (r0 + r) * jb->ss;
            for (int64_t d = 0; d < D; d++)
                if (s[d] != (REAL)1) { scaled[r] = 1; break; }
        }
    }
    for (int64_t j = k0; j < k1; j++) {
        int active[ROWS];
        int any = 0;
        for (int64_t r = 0; r < nr; r++) {
            active[r] = 0;
            for (int64_t h = 0; h < H; h++)
                if (jb->a[h * jb->sah + (r0 + r) * jb->sac + j] != 0) { active[r] = 1; break; }
            any |= active[r];
            if (!active[r]) {
                /* every part is exactly 0: ‖y − 0‖ (koba: ‖0‖) */
                if (mode == 0)
                    for (int64_t h = 0; h < H; h++) jb->heads[(h * C + r0 + r) * K + j] = ynorm1[r];
                jb->tokens[(r0 + r) * K + j] = mode == 3 ? 0 : (mode == 2 ? ynorm2[r] : ynorm1[r]);
            }
        }
        if (!any) continue;
        /* head groups (balanced: 12 heads → 6 + 6) outside receivers: a group's vo rows stay in
           L1 while the block's receivers use them; the last group computes the token L1 inline */
        const int64_t n_groups = (H + GROUP - 1) / GROUP;
        for (int64_t gi = 0, g0 = 0; gi < n_groups; gi++) {
            const int n = (int)((H - g0) / (n_groups - gi) + ((H - g0) % (n_groups - gi) != 0));
            const int last = g0 + n == H, fuse = last && (mode == 0 || mode == 1);
            for (int64_t r = 0; r < nr; r++) {
                if (!active[r]) continue;
                const REAL *y = jb->y + (r0 + r) * jb->sy;
                const REAL *s = scaled[r] ? jb->s + (r0 + r) * jb->ss : NULL;
                REAL w[GROUP], out[GROUP];
                for (int hh = 0; hh < n; hh++) w[hh] = jb->a[(g0 + hh) * jb->sah + (r0 + r) * jb->sac + j];
                SUF(groups)[n][2 * (mode == 0) + (s != NULL)](y, s, jb->vo + g0 * jb->svh + j * jb->svk, jb->svh,
                                                              w, tot + r * D, g0 == 0, fuse, out,
                                                              jb->tokens + (r0 + r) * K + j, D);
                if (mode == 0)
                    for (int hh = 0; hh < n; hh++) jb->heads[((g0 + hh) * C + r0 + r) * K + j] = out[hh];
            }
            g0 += n;
        }
        if (mode == 0 || mode == 1) continue;
        for (int64_t r = 0; r < nr; r++) {
            if (!active[r]) continue;
            const REAL *restrict y = jb->y + (r0 + r) * jb->sy;
            const REAL *restrict s = scaled[r] ? jb->s + (r0 + r) * jb->ss : NULL;
            const REAL *restrict t = tot + r * D;
            REAL acc = mode == 3 ? SQRT(SUF(dist)(NULL, s, t, D, 2)) : SQRT(SUF(dist)(y, s, t, D, 2));
            jb->tokens[(r0 + r) * K + j] = acc;
        }
    }
    free(tot);
}

int SUF(lens_alti_tile)(int64_t H, int64_t C, int64_t K, int64_t D, const REAL *y, int64_t sy, const REAL *s,
                        int64_t ss, const REAL *a, int64_t sah, int64_t sac, const REAL *vo, int64_t svh,
                        int64_t svk, REAL *heads, REAL *tokens, int mode, int n_threads) {
    SUF(job) jb = {H, C, K, D, y, sy, s, ss, a, sah, sac, vo, svh, svk, heads, tokens, mode, 0};
    /* sources per tile: the tile of vo (H · key_tile · D values) about 384 KiB, within L2 */
    int64_t key_tile = (int64_t)(384 * 1024) / (H * D * (int64_t)sizeof(REAL));
    run_threads(&jb, SUF(rows), C, K, key_tile, n_threads, 1);
    return jb.failed ? -1 : 0; /* -1: out of memory */
}

/* The roofline: the least work per element any L1 kernel does (one fused multiply-subtract,
 * an absolute value and an add), over L1-resident rows, repeated `reps` times per thread. */
typedef struct {
    const REAL *y, *v;
    int64_t D, reps;
} SUF(roof);

static void SUF(roof_rows)(const void *p, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
    SUF(roof) *rf = (SUF(roof) *)p;
    (void)r0, (void)r1, (void)k0, (void)k1;
    const REAL *restrict y = rf->y, *restrict v = rf->v;
    REAL total = 0;
    const int64_t D = rf->D;
    for (int64_t it = 0; it < rf->reps; it++) {
        const REAL w = (REAL)1 + (REAL)it * (REAL)1e-9;
        VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t d = 0; d + 4 * NV <= D; d += 4 * NV) {
            a0 += VABS(LD(y + d) - w * LD(v + d));
            a1 += VABS(LD(y + d + NV) - w * LD(v + d + NV));
            a2 += VABS(LD(y + d + 2 * NV) - w * LD(v + d + 2 * NV));
            a3 += VABS(LD(y + d + 3 * NV) - w * LD(v + d + 3 * NV));
        }
        const VEC a03 = (a0 + a1) + (a2 + a3);
        total += SUF(hsum)(&a03);
    }
    volatile REAL sink = total; /* keeps the loop alive; nothing shared is written */
    (void)sink;
}

REAL SUF(lens_alti_roofline)(const REAL *y, const REAL *v, int64_t D, int64_t reps, int n_threads) {
    SUF(roof) rf = {y, v, D, reps};
    /* one row block per thread: ROWS * n_threads rows */
    return (REAL)run_threads(&rf, SUF(roof_rows), (int64_t)ROWS * n_threads, 1, 1, n_threads, 0);
}

#undef VEC
#undef NV
#undef LD
#undef ST
#undef VABS
#endif
