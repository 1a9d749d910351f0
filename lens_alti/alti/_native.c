/* lens_alti native CPU kernels (spec §6): distances of one tile without JIT.
 *
 * Built once per machine by lens_alti.alti.native with the system C compiler
 * (gcc/cc -O3 -march=native -fopenmp-simd -pthread) and cached next to the converted
 * weights; called through ctypes. Inputs of one tile (d is contiguous everywhere):
 *   y[c, d] resultants, s[c, d] per-receiver scales (NULL = 1), a[h, c, k] attention
 *   weights (k contiguous), vo[h, k, d] per-head value vectors after W_O.
 * Outputs (contiguous): heads[h, c, k] = ‖y_i − s_i⊙a_hij·vo_hj‖₁ (mode 0 only) and
 *   tokens[c, k] = ‖y_i − s_i⊙Σ_h a_hij·vo_hj‖ (L1 in modes 0/1, L2 in mode 2),
 *   or ‖s_i⊙Σ_h a_hij·vo_hj‖₂ (mode 3, "koba").
 *
 * Tiling: sources are cut into tiles whose vo (all heads) fits in L2; for each tile every
 * thread walks its blocks of ROWS receivers (blocks interleaved across threads, so causal
 * rows of every length are shared out). For one receiver and one source, heads go in
 * groups of GROUP whose accumulators stay in vector registers: per vector of d, y and the
 * running sum over heads are read once, and each head costs one load of vo and four vector
 * operations (fused multiply-subtract, absolute value, accumulate, fused multiply-add into
 * the sum), with per-head partial sums reduced once per (receiver, source, head).
 * Causal clipping inside the tile: a pair (i, j) whose attention is 0 in every head
 * (causal future, padding) is not computed; its distances are the norms of y_i, exactly
 * what the arithmetic would give.
 */
#ifndef LENS_ALTI_BODY
#define LENS_ALTI_BODY
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4
#define VBYTES 64 /* one AVX-512 register; split by the compiler on narrower CPUs */
#define MAX_THREADS 256

typedef void (*row_fn)(const void *job, int64_t r0, int64_t r1, int64_t k0, int64_t k1);

typedef struct {
    const void *job;
    row_fn fn;
    int64_t n_blocks, n_rows, tid, n_threads, n_keys, key_tile;
} worker_arg;

static void *worker(void *p) {
    const worker_arg *w = (const worker_arg *)p;
    /* interleaved row blocks: causal rows grow with i, so every thread gets short and long ones */
    /* key tiles outermost: one tile of vo (key_tile sources, all heads) stays in this core's L2
       while every row block of the thread reads it */
    for (int64_t k0 = 0; k0 < w->n_keys; k0 += w->key_tile) {
        int64_t k1 = k0 + w->key_tile < w->n_keys ? k0 + w->key_tile : w->n_keys;
        for (int64_t b = w->tid; b < w->n_blocks; b += w->n_threads) {
            int64_t r0 = b * ROWS, r1 = r0 + ROWS < w->n_rows ? r0 + ROWS : w->n_rows;
            w->fn(w->job, r0, r1, k0, k1);
        }
    }
    return NULL;
}

static int run_threads(const void *job, row_fn fn, int64_t n_rows, int64_t n_keys, int64_t key_tile, int n_threads) {
    int64_t n_blocks = (n_rows + ROWS - 1) / ROWS;
    if (n_threads > n_blocks) n_threads = (int)n_blocks;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads < 1) n_threads = 1;
    pthread_t th[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int ok[MAX_THREADS];
    for (int t = 0; t < n_threads; t++) {
        args[t] = (worker_arg){job, fn, n_blocks, n_rows, t, n_threads, n_keys, key_tile < 1 ? 1 : key_tile};
        ok[t] = t > 0 && pthread_create(&th[t], NULL, worker, &args[t]) == 0;
    }
    worker(&args[0]);
    for (int t = 1; t < n_threads; t++) {
        if (ok[t]) pthread_join(th[t], NULL);
        else worker(&args[t]); /* could not start a thread: do its blocks here */
    }
    return 0;
}

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

static inline REAL SUF(hsum)(VEC x) {
    REAL r = 0;
    for (int64_t i = 0; i < NV; i++) r += x[i];
    return r;
}

/* One receiver, one source, a group of N heads (N ≤ GROUP, known at compile time so the N
 * accumulators stay in registers): out[h] = Σ_d |y_d − s_d·(w_h·v_hd)| (heads != NULL) and
 * t_d (+)= Σ_h w_h·v_hd, where t is overwritten when `first`. y and t are read once per
 * vector for all N heads; each head costs one load and four vector operations per vector. */
#define GROUP 8
#define DEFINE_GROUP(N)                                                                                    \
    static void SUF(group##N)(const REAL *restrict y, const REAL *restrict s, const REAL *restrict v,     \
                              int64_t svh, const REAL *restrict w, REAL *restrict t, int first,           \
                              REAL *restrict out, int64_t D) {                                            \
        VEC acc[N];                                                                                       \
        VEC wv[N];                                                                                        \
        _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) acc[hh] = (VEC){0}, wv[hh] = w[hh] + (VEC){0}; \
        int64_t d = 0;                                                                                    \
        for (; d + NV <= D; d += NV) {                                                                    \
            VEC tv = first ? (VEC){0} : LD(t + d);                                                        \
            if (out) {                                                                                    \
                VEC yv = LD(y + d);                                                                       \
                if (s) {                                                                                  \
                    VEC sv = LD(s + d);                                                                   \
                    _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) {                              \
                        VEC p = wv[hh] * LD(v + hh * svh + d);                                            \
                        acc[hh] += VABS(yv - sv * p);                                                     \
                        tv += p;                                                                          \
                    }                                                                                     \
                } else {                                                                                  \
                    _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) {                              \
                        VEC vv = LD(v + hh * svh + d);                                                    \
                        acc[hh] += VABS(yv - wv[hh] * vv);                                                \
                        tv += wv[hh] * vv;                                                                \
                    }                                                                                     \
                }                                                                                         \
            } else {                                                                                      \
                _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) tv += wv[hh] * LD(v + hh * svh + d); \
            }                                                                                             \
            ST(t + d, tv);                                                                                \
        }                                                                                                 \
        REAL sc[N];                                                                                       \
        _Pragma("GCC unroll 8") for (int hh = 0; hh < N; hh++) sc[hh] = out ? SUF(hsum)(acc[hh]) : 0;   \
        for (; d < D; d++) {                                                                              \
            REAL tt = first ? 0 : t[d];                                                                   \
            for (int hh = 0; hh < N; hh++) {                                                              \
                REAL p = w[hh] * v[hh * svh + d];                                                         \
                if (out) sc[hh] += ABS(y[d] - (s ? s[d] : (REAL)1) * p);                                  \
                tt += p;                                                                                  \
            }                                                                                             \
            t[d] = tt;                                                                                    \
        }                                                                                                 \
        if (out)                                                                                          \
            for (int hh = 0; hh < N; hh++) out[hh] = sc[hh];                                              \
    }
DEFINE_GROUP(1)
DEFINE_GROUP(2)
DEFINE_GROUP(3)
DEFINE_GROUP(4)
DEFINE_GROUP(5)
DEFINE_GROUP(6)
DEFINE_GROUP(7)
DEFINE_GROUP(8)
#undef DEFINE_GROUP

typedef void (*SUF(group_fn))(const REAL *, const REAL *, const REAL *, int64_t, const REAL *, REAL *, int, REAL *,
                              int64_t);
static const SUF(group_fn) SUF(groups)[GROUP + 1] = {NULL, SUF(group1), SUF(group2), SUF(group3), SUF(group4),
                                                     SUF(group5), SUF(group6), SUF(group7), SUF(group8)};

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
    REAL acc = SUF(hsum)(a0 + a1);
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
        /* head groups outside receivers: a group's vo rows (GROUP · d values) stay in L1 for the block */
        for (int64_t g0 = 0; g0 < H; g0 += GROUP) {
            const int n = H - g0 < GROUP ? (int)(H - g0) : GROUP;
            for (int64_t r = 0; r < nr; r++) {
                if (!active[r]) continue;
                const REAL *y = jb->y + (r0 + r) * jb->sy;
                const REAL *s = scaled[r] ? jb->s + (r0 + r) * jb->ss : NULL;
                REAL w[GROUP], out[GROUP];
                for (int hh = 0; hh < n; hh++) w[hh] = jb->a[(g0 + hh) * jb->sah + (r0 + r) * jb->sac + j];
                SUF(groups)[n](y, s, jb->vo + g0 * jb->svh + j * jb->svk, jb->svh, w, tot + r * D, g0 == 0,
                               mode == 0 ? out : NULL, D);
                if (mode == 0)
                    for (int hh = 0; hh < n; hh++) jb->heads[((g0 + hh) * C + r0 + r) * K + j] = out[hh];
            }
        }
        for (int64_t r = 0; r < nr; r++) {
            if (!active[r]) continue;
            const REAL *restrict y = jb->y + (r0 + r) * jb->sy;
            const REAL *restrict s = scaled[r] ? jb->s + (r0 + r) * jb->ss : NULL;
            const REAL *restrict t = tot + r * D;
            REAL acc = mode == 3 ? SQRT(SUF(dist)(NULL, s, t, D, 2))
                     : mode == 2 ? SQRT(SUF(dist)(y, s, t, D, 2))
                                 : SUF(dist)(y, s, t, D, 1);
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
    run_threads(&jb, SUF(rows), C, K, key_tile, n_threads);
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
        total += SUF(hsum)((a0 + a1) + (a2 + a3));
    }
    volatile REAL sink = total; /* keeps the loop alive; nothing shared is written */
    (void)sink;
}

REAL SUF(lens_alti_roofline)(const REAL *y, const REAL *v, int64_t D, int64_t reps, int n_threads) {
    SUF(roof) rf = {y, v, D, reps};
    /* one row block per thread: ROWS * n_threads rows */
    return (REAL)run_threads(&rf, SUF(roof_rows), (int64_t)ROWS * n_threads, 1, 1, n_threads);
}

#undef VEC
#undef NV
#undef LD
#undef ST
#undef VABS
#endif
