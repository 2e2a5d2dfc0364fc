/* Matrix multiply for the CPU (float32): out[m, n] = x[m, k] @ W[n, k]^T (+ bias[n]).

   Decode steps multiply a few rows (one per running sequence) by every weight of the model,
   so the whole model streams from DRAM each step, and general GEMM libraries, tuned for
   large blocks, lose half the time at these shapes. This kernel is built for them:

   - W is repacked once, at load, into panels of 16 output columns: panel p is [k][16]
     contiguous, so a tile reads one 64-byte line per k, sequentially.
   - A tile is up to 6 rows x 16 columns, accumulated in 12 vector registers (12 independent
     FMA chains hide the FMA latency). The rows are split into balanced blocks of at most 6;
     the first block reads a panel from DRAM, the others from cache.
   - While a panel is being computed, each block prefetches its share of the next panel, so
     DRAM stays busy during the blocks that only read cache.
   - The two halves of the panels go to the threads (OpenMP, torch's thread pool).

   Written with GCC/Clang vector extensions (8 floats): -march=native turns them into AVX2 +
   FMA here, and into whatever SIMD another CPU has. The PyTorch twin (the reference in
   tests) is F.linear. */

#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#define PANEL 16
#define MAX_ROWS 6


/* W [n, k] -> panels [ceil(n / 16)][k][16], the columns past n zero. */
void pack_linear_weight_f32(const float *w, float *packed, int64_t n, int64_t k) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (int64_t p = 0; p < panels; ++p) {
        float *dst = packed + p * k * PANEL;
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < PANEL; ++j) {
                const int64_t col = p * PANEL + j;
                dst[i * PANEL + j] = col < n ? w[col * k + i] : 0.0f;
            }
    }
}

/* rows (<= 6, a constant after inlining) x 16 columns of one panel over all of k.
   `prefetch` (or NULL): lines of the next panel to pull into L2, one per `every` k steps. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const float *x, int64_t k, const float *panel, float *out, int64_t ldo,
    const float *bias, int cols, const float *prefetch, int every) {
    v8f lo0 = {0}, hi0 = {0}, lo1 = {0}, hi1 = {0}, lo2 = {0}, hi2 = {0},
         lo3 = {0}, hi3 = {0}, lo4 = {0}, hi4 = {0}, lo5 = {0}, hi5 = {0};
    const float *x0 = x, *x1 = x + k, *x2 = x + 2 * k, *x3 = x + 3 * k, *x4 = x + 4 * k,
                *x5 = x + 5 * k;
    int countdown = every;
    for (int64_t i = 0; i < k; ++i) {
        if (prefetch && --countdown == 0) {
            countdown = every;
            __builtin_prefetch(prefetch, 0, 2);
            prefetch += PANEL;
        }
        const v8f w_lo = load8(panel + i * PANEL), w_hi = load8(panel + i * PANEL + 8);
/* Named registers, not arrays: GCC spills an accumulator array to the stack every step. */
#define ROW(r)                                                                              \
    if (rows > r) {                                                                         \
        const float a = x##r[i];                                                            \
        lo##r += a * w_lo;                                                                  \
        hi##r += a * w_hi;                                                                  \
    }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
    v8f lo[MAX_ROWS] = {lo0, lo1, lo2, lo3, lo4, lo5};
    v8f hi[MAX_ROWS] = {hi0, hi1, hi2, hi3, hi4, hi5};
    float b[PANEL] = {0}, row[PANEL];
    if (bias) memcpy(b, bias, (size_t)cols * sizeof(float));
    const v8f b_lo = load8(b), b_hi = load8(b + 8);
    for (int r = 0; r < rows; ++r) {
        store8(row, lo[r] + b_lo);
        store8(row + 8, hi[r] + b_hi);
        memcpy(out + r * ldo, row, (size_t)cols * sizeof(float));
    }
}

static void tile_rows(int rows, const float *x, int64_t k, const float *panel, float *out,
                      int64_t ldo, const float *bias, int cols, const float *prefetch,
                      int every) {
    switch (rows) {
    case 1: tile(1, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    case 2: tile(2, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    case 3: tile(3, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    case 4: tile(4, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    case 5: tile(5, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    default: tile(6, x, k, panel, out, ldo, bias, cols, prefetch, every); break;
    }
}

/* out [m, n] = x [m, k] @ W^T (+ bias, or NULL); `packed` from pack_linear_weight_f32.
   x and out are contiguous rows. */
void packed_linear_f32(const float *x, const float *packed, const float *bias, float *out,
                       int64_t m, int64_t n, int64_t k, int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    const int64_t blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
    if (blocks == 0) return;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const float *panel = packed + p * k * PANEL;
        const float *next = p + 1 < panels ? panel + k * PANEL : NULL;
        const int cols = (int)(n - p * PANEL < PANEL ? n - p * PANEL : PANEL);
        int64_t first = 0;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t rows = (m - first) / (blocks - b); /* balanced: sizes differ by <= 1 */
            const float *prefetch = next ? next + (b * k / blocks) * PANEL : NULL;
            tile_rows((int)rows, x + first * k, k, panel, out + first * n + p * PANEL, n,
                      bias ? bias + p * PANEL : NULL, cols, prefetch, (int)blocks);
            first += rows;
        }
    }
}
