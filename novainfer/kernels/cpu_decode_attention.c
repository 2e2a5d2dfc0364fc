/* Paged decode attention for the CPU (float32), read in place from the KV cache.

   The PyTorch reference first gathers each sequence's cached K/V into a contiguous copy and
   then runs SDPA over it, so every decode step moves the whole context through DRAM three
   times. Here each (sequence, KV head) walks its block table once: pass 1 reads K and scores
   all query heads of the group, pass 2 reads V and accumulates the softmax-weighted rows.

   Built at first use by novainfer/kernels/cpu_native.py and called through ctypes (which
   releases the GIL). Threads come from the same libgomp that torch uses.

   Layouts: q, out [num_seqs, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
   num_kv_heads, head_dim]; block_tables [num_seqs, table_width] int32, rows table_stride
   apart; seq_lens int32. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

/* head_dim must be a multiple of 8 (the vector width); the Python side checks it. */

typedef float v4f __attribute__((vector_size(16)));

static inline void store4(float *p, v4f v) { memcpy(p, &v, sizeof v); }

/* [sum(a), sum(b), sum(c), sum(d)]: one transposing reduction for four dot products
   instead of four horizontal sums. */
static inline v4f hsum4(v8f a, v8f b, v8f c, v8f d) {
#define HALVES(v) (__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7))
    const v4f x0 = HALVES(a), x1 = HALVES(b), x2 = HALVES(c), x3 = HALVES(d);
#undef HALVES
    /* u01 = [x0_0 + x0_2, x1_0 + x1_2, x0_1 + x0_3, x1_1 + x1_3], likewise u23 */
    const v4f u01 = __builtin_shufflevector(x0, x1, 0, 4, 1, 5) +
                    __builtin_shufflevector(x0, x1, 2, 6, 3, 7);
    const v4f u23 = __builtin_shufflevector(x2, x3, 0, 4, 1, 5) +
                    __builtin_shufflevector(x2, x3, 2, 6, 3, 7);
    return __builtin_shufflevector(u01, u23, 0, 1, 4, 5) +
           __builtin_shufflevector(u01, u23, 2, 3, 6, 7);
}

/* Up to 3 query heads (a constant after inlining) share each K load; named accumulators,
   not arrays, so GCC keeps them in registers. */
#define MAX_HEADS 3

/* Scores of `heads` query heads (q, head_dim apart) against 4 consecutive cached tokens
   (k, token_stride apart): s[h * len + t] = scale * q_h . k_t. */
static inline __attribute__((always_inline)) void scores_4_tokens(
    const int heads, const float *q, const float *k, int64_t token_stride, int64_t head_dim,
    float scale, float *s, int64_t len) {
    v8f a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0},
        a13 = {0}, a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0};
    const float *q0 = q, *q1 = q + head_dim, *q2 = q + 2 * head_dim;
    for (int64_t d = 0; d < head_dim; d += 8) {
        const v8f w0 = load8(q0 + d);
        const v8f w1 = heads > 1 ? load8(q1 + d) : w0;
        const v8f w2 = heads > 2 ? load8(q2 + d) : w0;
#define TOKEN(t)                                                                            \
    {                                                                                       \
        const v8f kt = load8(k + t * token_stride + d);                                     \
        a0##t += w0 * kt;                                                                   \
        if (heads > 1) a1##t += w1 * kt;                                                    \
        if (heads > 2) a2##t += w2 * kt;                                                    \
    }
        TOKEN(0) TOKEN(1) TOKEN(2) TOKEN(3)
#undef TOKEN
    }
    store4(s, hsum4(a00, a01, a02, a03) * scale);
    if (heads > 1) store4(s + len, hsum4(a10, a11, a12, a13) * scale);
    if (heads > 2) store4(s + 2 * len, hsum4(a20, a21, a22, a23) * scale);
}

/* The same for one token. */
static inline __attribute__((always_inline)) void scores_1_token(
    const int heads, const float *q, const float *k, int64_t head_dim, float scale, float *s,
    int64_t len) {
    v8f a0 = {0}, a1 = {0}, a2 = {0};
    for (int64_t d = 0; d < head_dim; d += 8) {
        const v8f kt = load8(k + d);
        a0 += load8(q + d) * kt;
        if (heads > 1) a1 += load8(q + head_dim + d) * kt;
        if (heads > 2) a2 += load8(q + 2 * head_dim + d) * kt;
    }
    s[0] = scale * hsum(a0);
    if (heads > 1) s[len] = scale * hsum(a1);
    if (heads > 2) s[2 * len] = scale * hsum(a2);
}

static inline __attribute__((always_inline)) void score_block_heads(
    const int heads, const float *q, const float *k, int64_t n, int64_t token_stride,
    int64_t head_dim, float scale, float *s, int64_t len) {
    int64_t t = 0;
    for (; t + 4 <= n; t += 4)
        scores_4_tokens(heads, q, k + t * token_stride, token_stride, head_dim, scale, s + t, len);
    for (; t < n; ++t)
        scores_1_token(heads, q, k + t * token_stride, head_dim, scale, s + t, len);
}

/* out_h[0:head_dim] += sum_t p[h * len + t] * v_t for `heads` query heads (out_h head_dim
   apart) over `n` cached tokens (v, token_stride apart): each V load serves every head. */
static inline __attribute__((always_inline)) void weighted_block_heads(
    const int heads, float *out, const float *p, const float *v, int64_t n,
    int64_t token_stride, int64_t head_dim, int64_t len) {
    float *o0 = out, *o1 = out + head_dim, *o2 = out + 2 * head_dim;
    const float *p0 = p, *p1 = p + len, *p2 = p + 2 * len;
    int64_t d = 0;
    for (; d + 32 <= head_dim; d += 32) {
#define LOAD(h) v8f c##h##0 = load8(o##h + d), c##h##1 = load8(o##h + d + 8), \
                    c##h##2 = load8(o##h + d + 16), c##h##3 = load8(o##h + d + 24);
        LOAD(0)
        v8f c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0}, c20 = {0}, c21 = {0}, c22 = {0},
            c23 = {0};
        if (heads > 1) {
            c10 = load8(o1 + d); c11 = load8(o1 + d + 8);
            c12 = load8(o1 + d + 16); c13 = load8(o1 + d + 24);
        }
        if (heads > 2) {
            c20 = load8(o2 + d); c21 = load8(o2 + d + 8);
            c22 = load8(o2 + d + 16); c23 = load8(o2 + d + 24);
        }
#undef LOAD
        const float *r = v + d;
        for (int64_t t = 0; t < n; ++t, r += token_stride) {
            const float w0 = p0[t], w1 = heads > 1 ? p1[t] : 0.0f, w2 = heads > 2 ? p2[t] : 0.0f;
#define CHUNK(i)                                                                            \
    {                                                                                       \
        const v8f vi = load8(r + 8 * i);                                                    \
        c0##i += w0 * vi;                                                                   \
        if (heads > 1) c1##i += w1 * vi;                                                    \
        if (heads > 2) c2##i += w2 * vi;                                                    \
    }
            CHUNK(0) CHUNK(1) CHUNK(2) CHUNK(3)
#undef CHUNK
        }
#define STORE(h) store8(o##h + d, c##h##0); store8(o##h + d + 8, c##h##1); \
                 store8(o##h + d + 16, c##h##2); store8(o##h + d + 24, c##h##3);
        STORE(0)
        if (heads > 1) { STORE(1) }
        if (heads > 2) { STORE(2) }
#undef STORE
    }
    for (; d < head_dim; d += 8) { /* head_dim % 32: one vector at a time */
        v8f c0 = load8(o0 + d), c1 = heads > 1 ? load8(o1 + d) : c0,
            c2 = heads > 2 ? load8(o2 + d) : c0;
        const float *r = v + d;
        for (int64_t t = 0; t < n; ++t, r += token_stride) {
            const v8f vt = load8(r);
            c0 += p0[t] * vt;
            if (heads > 1) c1 += p1[t] * vt;
            if (heads > 2) c2 += p2[t] * vt;
        }
        store8(o0 + d, c0);
        if (heads > 1) store8(o1 + d, c1);
        if (heads > 2) store8(o2 + d, c2);
    }
}

/* Pulls the rows of this work item in block `i` of the table (tokens from `start` on) into
L2 while the previous block is computed: the hardware prefetcher does not follow the block
table. ~15% faster when the cache streams from DRAM. Nothing past the context.
   always_inline: GCC treats a function whose only effect is a prefetch as pure and deletes
   the call before inlining it (seen with GCC 12: no prefetch left in the library). */
static inline __attribute__((always_inline)) void prefetch_block(const float *cache, const int32_t *table, int64_t i,
                                  int64_t start, int64_t len, int64_t block_size,
                                  int64_t token_stride, int64_t row_floats) {
    if (start >= len) return;
    const int64_t n = len - start < block_size ? len - start : block_size;
    const float *rows = cache + table[i] * block_size * token_stride;
    for (int64_t t = 0; t < n; ++t, rows += token_stride)
        for (int64_t f = 0; f < row_floats; f += 16) __builtin_prefetch(rows + f, 0, 2);
}

/* Dispatch on the number of query heads sharing the loads (1..3). */
static void score_block(int heads, const float *q, const float *k, int64_t n,
                        int64_t token_stride, int64_t head_dim, float scale, float *s,
                        int64_t len) {
    if (heads >= 3) score_block_heads(3, q, k, n, token_stride, head_dim, scale, s, len);
    else if (heads == 2) score_block_heads(2, q, k, n, token_stride, head_dim, scale, s, len);
    else score_block_heads(1, q, k, n, token_stride, head_dim, scale, s, len);
}

static void weighted_block(int heads, float *out, const float *p, const float *v, int64_t n,
                           int64_t token_stride, int64_t head_dim, int64_t len) {
    if (heads >= 3) weighted_block_heads(3, out, p, v, n, token_stride, head_dim, len);
    else if (heads == 2) weighted_block_heads(2, out, p, v, n, token_stride, head_dim, len);
    else weighted_block_heads(1, out, p, v, n, token_stride, head_dim, len);
}

/* Attention of one sequence for KV heads [h0, h1). Both passes walk the block table in
   order and finish a whole block (a few KB, cache-resident) before the next one; the query
   heads of a KV head are taken up to 3 at a time, sharing every K and V load. */
static void attend_one(const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *table, int64_t len, int64_t h0, int64_t h1, int64_t group,
                       int64_t head_dim, int64_t block_size, int64_t token_stride, float scale,
                       float *scores, float *out) {
    const int64_t block_stride = block_size * token_stride;
    const int64_t heads = (h1 - h0) * group; /* query heads handled here, j = h * group + g */
    /* Pass 1: scores[j * len + t] = scale * q_j . k_t */
    for (int64_t start = 0, i = 0; start < len; start += block_size, ++i) {
        const float *block = k_cache + table[i] * block_stride + h0 * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        prefetch_block(k_cache + h0 * head_dim, table, i + 1, start + n, len, block_size,
                       token_stride, (h1 - h0) * head_dim);
        for (int64_t h = 0; h < h1 - h0; ++h)
            for (int64_t g = 0; g < group; g += MAX_HEADS) {
                const int64_t j = h * group + g;
                score_block((int)(group - g), q + j * head_dim, block + h * head_dim, n,
                            token_stride, head_dim, scale, scores + j * len + start, len);
            }
    }
    /* Softmax per query head; the normaliser is folded into the weights. */
    for (int64_t j = 0; j < heads; ++j) {
        float *s = scores + j * len;
        float m = s[0];
#pragma omp simd reduction(max : m) /* reductions in vector lanes, reordered */
        for (int64_t t = 1; t < len; ++t) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            s[t] = exp_f32(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
    /* Pass 2: out_j = sum_t p_jt v_t */
    memset(out, 0, sizeof(float) * heads * head_dim);
    for (int64_t start = 0, i = 0; start < len; start += block_size, ++i) {
        const float *block = v_cache + table[i] * block_stride + h0 * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        prefetch_block(v_cache + h0 * head_dim, table, i + 1, start + n, len, block_size,
                       token_stride, (h1 - h0) * head_dim);
        for (int64_t h = 0; h < h1 - h0; ++h)
            for (int64_t g = 0; g < group; g += MAX_HEADS) {
                const int64_t j = h * group + g;
                weighted_block((int)(group - g), out + j * head_dim, scores + j * len + start,
                               block + h * head_dim, n, token_stride, head_dim, len);
            }
    }
}

/* Returns 0; before reading the cache, 1 when a sequence length is outside
   [1, table_width * block_size] and 2 when a block id it needs is outside [0, num_blocks);
   -1 when scratch memory could not be allocated. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int32_t *block_tables, int64_t table_width,
                               int64_t table_stride, const int32_t *seq_lens, float *out,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t num_blocks,
                               float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    /* A work item is a whole sequence, unless there are too few to keep the threads busy:
       then each KV head is its own item. */
    const int64_t slices = num_seqs >= 2 * num_threads ? 1 : num_kv_heads;
    const int64_t per_slice = num_kv_heads / slices;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; ++b) {
        const int64_t len = seq_lens[b];
        if (len < 1 || len > table_width * block_size) return 1;
        const int32_t *table = block_tables + b * table_stride;
        for (int64_t i = 0; i * block_size < len; ++i)
            if (table[i] < 0 || table[i] >= num_blocks) return 2;
        longest = len > longest ? len : longest;
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = (float *)malloc(sizeof(float) * per_slice * group * longest);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < num_seqs * slices; ++w) {
            if (scores == NULL) continue;
            const int64_t b = w / slices, h0 = (w % slices) * per_slice;
            const int64_t head = b * num_heads + h0 * group;
            attend_one(q + head * head_dim, k_cache, v_cache, block_tables + b * table_stride,
                       seq_lens[b], h0, h0 + per_slice, group, head_dim, block_size,
                       token_stride, scale, scores, out + head * head_dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
