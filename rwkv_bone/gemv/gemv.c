/* Few-row matrix products for one-token decoding on x86-64 CPUs with AVX-512 (rwkv_bone/gemv).

   y[b, o] = sum_k W[o, k] x[b, k]     W (N, K) row-major, x (B, K), y (B, N) float32

   W is float32 (with x float32: fp32 FMAs) or bfloat16 (with x bfloat16: vdpbf16ps, exact bf16
   products summed in float32). At B <= 8 the product is bound by reading W once; the kernels
   keep R rows of W x NB rows of x as R*NB float32 accumulators in registers, so each W vector is
   loaded once and used NB times. Rows of W are split over OpenMP threads (torch's own libgomp:
   same soname, so the same runtime and thread pool); batches of more than 8 rows reuse the R rows
   of W from cache. Built by rwkv_bone/gemv/__init__.py with -O3 -march=native -fopenmp. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define RB_SUPPORTED 1

#define FMA_F32(a, w, x) _mm512_fmadd_ps((w), (x), (a))
#define FMA_BF16(a, w, x) _mm512_dpbf16_ps((a), (__m512bh)(w), (__m512bh)(x))

/* One block: R rows of W (stride K) against NB rows of x (stride K); y rows stride ldy. */
#define BLOCK(NAME, WT, VT, LOAD, STEP, FMA, R, NB)                                                   \
    static void NAME##_r##R##_b##NB(const WT *W, const WT *x, int64_t K, float *y, int64_t ldy) {     \
        __m512 acc[R][NB];                                                                            \
        _Pragma("GCC unroll 32") for (int r = 0; r < R; r++)                                          \
            _Pragma("GCC unroll 32") for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();    \
        for (int64_t k = 0; k < K; k += STEP) {                                                       \
            VT w[R];                                                                                  \
            _Pragma("GCC unroll 32") for (int r = 0; r < R; r++) {                                    \
                w[r] = LOAD(W + r * K + k);                                                           \
                _mm_prefetch((const char *)(W + r * K + k) + NAME##_PREFETCH, _MM_HINT_T0);           \
            }                                                                                         \
            _Pragma("GCC unroll 32") for (int b = 0; b < NB; b++) {                                   \
                VT xb = LOAD(x + b * K + k);                                                          \
                _Pragma("GCC unroll 32") for (int r = 0; r < R; r++) acc[r][b] = FMA(acc[r][b], w[r], xb); \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++)                                                                   \
            for (int b = 0; b < NB; b++) y[b * ldy + r] = _mm512_reduce_add_ps(acc[r][b]);            \
    }

/* Software prefetch distance along each row of W, in bytes (bench/bench_gemv.py: +10-30% for bf16
   at B = 8, +0-8% for fp32; the hardware prefetcher alone falls behind on R rows per thread). */
#define f32_PREFETCH 2048
#define bf16_PREFETCH 1024
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define LOAD_BF16(p) _mm512_loadu_si512((const void *)(p))

/* Every block shape (R, NB) that exists, once: each row of RB_ROWS picks among them, and batches
   of more than 8 need R with every NB. SHAPES(X, args...) expands X(args..., R, NB) for each. */
#define SHAPES(X, ...)                                                                                \
    X(__VA_ARGS__, 1, 1) X(__VA_ARGS__, 1, 2) X(__VA_ARGS__, 1, 3) X(__VA_ARGS__, 1, 4)              \
    X(__VA_ARGS__, 1, 5) X(__VA_ARGS__, 1, 6) X(__VA_ARGS__, 1, 7) X(__VA_ARGS__, 1, 8)              \
    X(__VA_ARGS__, 2, 1) X(__VA_ARGS__, 2, 2) X(__VA_ARGS__, 2, 4) X(__VA_ARGS__, 2, 8)              \
    X(__VA_ARGS__, 3, 1) X(__VA_ARGS__, 3, 2) X(__VA_ARGS__, 3, 3) X(__VA_ARGS__, 3, 4)              \
    X(__VA_ARGS__, 3, 5) X(__VA_ARGS__, 3, 6) X(__VA_ARGS__, 3, 7) X(__VA_ARGS__, 3, 8)              \
    X(__VA_ARGS__, 4, 1) X(__VA_ARGS__, 4, 2) X(__VA_ARGS__, 4, 3) X(__VA_ARGS__, 4, 4)              \
    X(__VA_ARGS__, 4, 5) X(__VA_ARGS__, 4, 6)

SHAPES(BLOCK, f32, float, __m512, LOAD_F32, 16, FMA_F32)
SHAPES(BLOCK, bf16, uint16_t, __m512i, LOAD_BF16, 32, FMA_BF16)

typedef void (*block_fn)(const void *, const void *, int64_t, float *, int64_t);

/* Rows of W per block for nb rows of x (1..8): chosen by bench/bench_gemv.py on a 2-core EPYC. */
static int RB_ROWS[2][9] = {{0, 1, 4, 4, 4, 4, 4, 3, 3}, {0, 1, 1, 1, 4, 4, 4, 3, 3}};

#define PICK(NAME, R, NB) if (r == R && nb == NB) return (block_fn)NAME##_r##R##_b##NB;
static block_fn pick(int bf16, int r, int nb) {
    if (bf16) { SHAPES(PICK, bf16) } else { SHAPES(PICK, f32) }
    return 0;
}

int rb_gemv_get_rows(int bf16, int nb) { return nb >= 1 && nb <= 8 ? RB_ROWS[bf16 != 0][nb] : 0; }

int rb_gemv_set_rows(int bf16, int nb, int r) {  /* for the benchmark's sweep; 0 when no such block */
    if (nb < 1 || nb > 8 || !pick(bf16, r, nb)) return 0;
    for (int m = 1; nb == 8 && m < 8; m++)  /* batches of more than 8 use R rows for the rest too */
        if (!pick(bf16, r, m)) return 0;
    RB_ROWS[bf16 != 0][nb] = r;
    return 1;
}

/* y (B, N) = x (B, K) W (N, K)^T; K a multiple of 32. Returns 0, or -1 on bad sizes. Each thread
   takes a contiguous range of blocks of W's rows and runs every group of 8 rows of x on a block
   before the next, so W is read from memory once whatever B is. */
static int gemv(int bf16, const void *W, const void *x, float *y, int64_t B, int64_t N, int64_t K, int threads) {
    if (B < 1 || N < 1 || K < 32 || K % 32) return -1;
    const int64_t esize = bf16 ? 2 : 4;
    const char *Wc = (const char *)W, *xc = (const char *)x;
    const int R = RB_ROWS[bf16 != 0][B < 8 ? B : 8];
    const int rem = (int)(B % 8);
    block_fn f8 = pick(bf16, R, 8), fr = rem ? pick(bf16, R, rem) : 0;
    block_fn t8 = pick(bf16, 1, 8), tr = rem ? pick(bf16, 1, rem) : 0;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t groups = N / R, lo = groups * t / nt, hi = groups * (t + 1) / nt;
        for (int64_t g = lo; g < hi; g++)
            for (int64_t b0 = 0; b0 < B; b0 += 8)
                (B - b0 >= 8 ? f8 : fr)(Wc + g * R * K * esize, xc + b0 * K * esize, K, y + b0 * N + g * R, N);
        if (t == nt - 1)
            for (int64_t o = groups * R; o < N; o++)
                for (int64_t b0 = 0; b0 < B; b0 += 8)
                    (B - b0 >= 8 ? t8 : tr)(Wc + o * K * esize, xc + b0 * K * esize, K, y + b0 * N + o, N);
    }
    return 0;
}

/* ---- W packed in panels (rwkv_bone/gemv/packed.py) ----------------------------------------------
   At B = 8 the row-major kernels above load 8 vectors of x per 3 vectors of W (11 cache lines per 24
   FMAs), and that traffic, not the FMAs, caps them at ~27 GB/s. Packed, W's rows come in panels of
   PANEL = 48: panel p holds rows 48p .. 48p+h-1 (h = 48, or what is left, a multiple of 16). The
   layout is one transposition of 32-bit words: W (N, K) float32 is N x K words; W bfloat16 is N x K/2
   words, a word being the pair (W[o, 2i], W[o, 2i + 1]), the operand order of vdpbf16ps. Panel p is
   its (h, words) block stored transposed, (words, h) row-major. So one step reads h contiguous
   outputs' weights (float32: 16 per vector; bf16: 16 outputs x 2 k per vector) and broadcasts one
   word of each x row (one x, or a pair of x), and an x cache line serves 16 steps: 3.5 lines per 24
   FMAs, and W streams as one sequential run per panel. y[b, 48p + j] = sum_k W[48p + j, k] x[b, k],
   summed in k order (bf16: in pairs, each pair's products summed exactly, as vdpbf16ps does). */
#define PANEL 48
/* Software prefetch distance along a panel, in bytes (~21 k steps ahead): B8 51-53 GB/s at 4096
   against 35-42 at 1024 in the same runs, B1 alike (bench/results/bench_gemv.txt). */
#define PANEL_PREFETCH 4096

/* One panel of H vectors (16 H outputs) against NB rows of x (stride K elements); one step of the
   loop is one word: KS = 1 float32 element or 2 bf16 ones. */
#define f32_ELEM float
#define f32_VEC __m512
#define f32_KS 1
#define f32_VLEN 16
#define f32_LOADW(p) _mm512_loadu_ps(p)
#define f32_BCAST(p) _mm512_set1_ps(*(p))
#define f32_FMA(a, w, x) _mm512_fmadd_ps((w), (x), (a))
#define bf16_ELEM uint16_t
#define bf16_VEC __m512i
#define bf16_KS 2
#define bf16_VLEN 32
#define bf16_LOADW(p) _mm512_loadu_si512((const void *)(p))
#define bf16_BCAST(p) _mm512_castps_si512(_mm512_set1_ps(load_word(p)))
#define bf16_FMA(a, w, x) _mm512_dpbf16_ps((a), (__m512bh)(w), (__m512bh)(x))
static inline float load_word(const uint16_t *p) { float v; memcpy(&v, p, sizeof v); return v; }

#define PBLOCK(T, H, NB)                                                                               \
    static void panel_##T##_h##H##_b##NB(const void *Pv, int64_t ld, int64_t pf, const void *xv, int64_t K, \
                                         float *y, int64_t ldy) {                                     \
        const T##_ELEM *P = (const T##_ELEM *)Pv, *x = (const T##_ELEM *)xv;                          \
        __m512 acc[H][NB];                                                                            \
        _Pragma("GCC unroll 8") for (int h = 0; h < H; h++)                                           \
            _Pragma("GCC unroll 8") for (int b = 0; b < NB; b++) acc[h][b] = _mm512_setzero_ps();     \
        for (int64_t k = 0; k < K; k += T##_KS) {                                                     \
            const T##_ELEM *p = P + (k / T##_KS) * ld;                                                \
            T##_VEC w[H];                                                                             \
            _Pragma("GCC unroll 8") for (int h = 0; h < H; h++) {                                     \
                w[h] = T##_LOADW(p + T##_VLEN * h);                                                   \
                _mm_prefetch((const char *)(p + T##_VLEN * h + pf), _MM_HINT_T0);                     \
            }                                                                                         \
            _Pragma("GCC unroll 8") for (int b = 0; b < NB; b++) {                                    \
                T##_VEC xb = T##_BCAST(x + b * K + k);                                                \
                _Pragma("GCC unroll 8") for (int h = 0; h < H; h++) acc[h][b] = T##_FMA(acc[h][b], w[h], xb); \
            }                                                                                         \
        }                                                                                             \
        for (int b = 0; b < NB; b++)                                                                  \
            for (int h = 0; h < H; h++) _mm512_storeu_ps(y + b * ldy + 16 * h, acc[h][b]);            \
    }
#define PBLOCKS(T, H) PBLOCK(T, H, 1) PBLOCK(T, H, 2) PBLOCK(T, H, 3) PBLOCK(T, H, 4) PBLOCK(T, H, 5) \
                      PBLOCK(T, H, 6) PBLOCK(T, H, 7) PBLOCK(T, H, 8)
PBLOCKS(f32, 1)
PBLOCKS(f32, 2)
PBLOCKS(f32, 3)
PBLOCKS(bf16, 1)
PBLOCKS(bf16, 2)
PBLOCKS(bf16, 3)

typedef void (*panel_fn)(const void *, int64_t, int64_t, const void *, int64_t, float *, int64_t);
#define PROW(T, H) {0, panel_##T##_h##H##_b1, panel_##T##_h##H##_b2, panel_##T##_h##H##_b3, panel_##T##_h##H##_b4, \
                    panel_##T##_h##H##_b5, panel_##T##_h##H##_b6, panel_##T##_h##H##_b7, panel_##T##_h##H##_b8}
static const panel_fn PANELS[2][4][9] = {{{0}, PROW(f32, 1), PROW(f32, 2), PROW(f32, 3)},
                                         {{0}, PROW(bf16, 1), PROW(bf16, 2), PROW(bf16, 3)}};

/* y (B, N) from the panel blocks, for the layouts they read: panel p starts at word o * words(K)
   with rows of 16 h words (packed), or at W + o with rows of N floats (float32 W (K, N) row-major).
   Each thread takes a contiguous range of panels and runs every group of 8 rows of x on a panel
   before the next, so W is read from memory once whatever B is. Returns 0, or -1 on bad sizes. */
static int panel_product(int bf16, const void *W, int packed, const void *x, float *y, int64_t B, int64_t N,
                         int64_t K, int threads) {
    if (B < 1 || N < 16 || N % 16 || K < 1 || (bf16 && (K % 2 || !packed))) return -1;
    const int64_t panels = (N + PANEL - 1) / PANEL, esize = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo = panels * t / nt, hi = panels * (t + 1) / nt;
        for (int64_t p = lo; p < hi; p++) {
            int64_t o = p * PANEL, h = (N - o < PANEL ? N - o : PANEL) / 16;
            const char *base = (const char *)W + (packed ? o * K : o) * esize;
            /* ld: elements from one step's row of the panel to the next; pf: the prefetch distance
               in elements ((K, N): 8 rows on) */
            int64_t ld = packed ? 16 * h * (bf16 ? 2 : 1) : N, pf = packed ? PANEL_PREFETCH / esize : 8 * N;
            for (int64_t b0 = 0; b0 < B; b0 += 8) {
                int nb = (int)(B - b0 < 8 ? B - b0 : 8);
                PANELS[bf16][h][nb](base, ld, pf, (const char *)x + b0 * K * esize, K, y + b0 * N + o, N);
            }
        }
    }
    return 0;
}

/* y (B, N) = x (B, K) W^T with W packed (N a multiple of 16, any K >= 1, any B >= 1). */
int rb_gemv_f32_packed(const float *P, const float *x, float *y, int64_t B, int64_t N, int64_t K, int threads) {
    return panel_product(0, P, 1, x, y, B, N, K, threads);
}

/* The same for bfloat16 W packed as pairs and x bfloat16 (K even). */
int rb_gemv_bf16_packed(const uint16_t *P, const uint16_t *x, float *y, int64_t B, int64_t N, int64_t K,
                        int threads) {
    return panel_product(1, P, 1, x, y, B, N, K, threads);
}

/* y (B, N) = x (B, K) W for W (K, N) row-major (RWKV's x @ time_maa_w1 and the like; N a multiple of
   16): the same blocks, a "panel" being 48 columns of W, one row of 48 per k step at stride N. */
int rb_gemv_f32_kn(const float *W, const float *x, float *y, int64_t B, int64_t N, int64_t K, int threads) {
    return panel_product(0, W, 0, x, y, B, N, K, threads);
}

/* The packing: W as N x K 32-bit words (see above), N a multiple of 16. A panel's rows are one
   contiguous run of W and its packed block is the same run, transposed in tiles of 16 words. */
static void transpose_panel(const uint32_t *src, uint32_t *dst, int64_t h, int64_t K) {
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t kn = K - k0 < 16 ? K - k0 : 16;
        for (int64_t j = 0; j < h; j++)
            for (int64_t k = 0; k < kn; k++) dst[(k0 + k) * h + j] = src[j * K + k0 + k];
    }
}

/* Into new memory: dst (N * K words) from src. Threads take panels. */
void rb_gemv_pack32(const uint32_t *src, uint32_t *dst, int64_t N, int64_t K, int threads) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t o = p * PANEL, h = N - o < PANEL ? N - o : PANEL;
        transpose_panel(src + o * K, dst + o * K, h, K);
    }
}

/* In place: each thread copies a panel to its own scratch (h x K words, in L2) and writes it back
   transposed: no second copy of W, no fresh pages. Returns 0, or -1 if scratch fails. */
int rb_gemv_pack32_inplace(uint32_t *W, int64_t N, int64_t K, int threads) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint32_t *scratch = malloc((size_t)(PANEL * K) * sizeof(uint32_t));
        if (!scratch) failed = 1;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (!scratch) continue;
            const int64_t o = p * PANEL, h = N - o < PANEL ? N - o : PANEL;
            memcpy(scratch, W + o * K, (size_t)(h * K) * sizeof(uint32_t));
            transpose_panel(scratch, W + o * K, h, K);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* ---- one WKV6 step, float32 (RWKV6.step) --------------------------------------------------------
   For each of BH = B x H heads of size N, with state S (N, N) (row i: key channel, column j: value):
       y[j] = sum_i r[i] S[i][j] + (sum_i r[i] u[i] k[i]) v[j],    S'[i][j] = d[i] S[i][j] + k[i] v[j]
   (u per head: H x N). torch's path reads S three times and writes two (N, N) tensors (the matmul,
   the outer product, the in-place update); here each row of S is read once and S' written once. */
void rb_wkv_step_f32(const float *S, const float *r, const float *k, const float *v, const float *d,
                     const float *u, float *y, float *S2, int64_t BH, int64_t H, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < BH; bh++) {
        const float *Sh = S + bh * N * N, *rh = r + bh * N, *kh = k + bh * N, *vh = v + bh * N;
        const float *dh = d + bh * N, *uh = u + (bh % H) * N;
        float *yh = y + bh * N, *S2h = S2 + bh * N * N;
        float bonus = 0.0f;
        for (int64_t i = 0; i < N; i++) bonus += rh[i] * uh[i] * kh[i];
        for (int64_t j = 0; j < N; j++) yh[j] = 0.0f;
        for (int64_t i = 0; i < N; i++) {
            const float ri = rh[i], di = dh[i], ki = kh[i], *row = Sh + i * N;
            float *out = S2h + i * N;
#pragma omp simd
            for (int64_t j = 0; j < N; j++) {
                yh[j] += ri * row[j];
                out[j] = di * row[j] + ki * vh[j];
            }
        }
#pragma omp simd
        for (int64_t j = 0; j < N; j++) yh[j] += bonus * vh[j];
    }
}

int rb_gemv_f32(const float *W, const float *x, float *y, int64_t B, int64_t N, int64_t K, int threads) {
    return gemv(0, W, x, y, B, N, K, threads);
}
int rb_gemv_bf16(const uint16_t *W, const uint16_t *x, float *y, int64_t B, int64_t N, int64_t K, int threads) {
    return gemv(1, W, x, y, B, N, K, threads);
}
#else
#define RB_SUPPORTED 0
#endif

int rb_gemv_supported(void) { return RB_SUPPORTED; }
