/* Paged decode attention for the CPU: one query token per sequence against the K/V of its whole
 * context, read where they lie in the paged pool (no gather copy).
 *
 * Cache layout, one layer; k_cache and v_cache share their strides, counted in elements:
 *     cache[block][row][kv_head][d] at block * stride_block + row * stride_row
 *                                      + kv_head * stride_head + d          (stride of d is 1)
 * Position p of sequence s lies in block block_tables[s * table_stride + p / block_size], at row
 * p % block_size.
 *
 * A work item is one sequence and a run of its kv heads: all of them when there are enough
 * sequences to keep the threads busy, fewer otherwise. It walks the context TILE positions at a
 * time; within a tile each kv head serves all q heads of its group from one read of each K/V row
 * (the group's other heads find the row in L1), and the rows AHEAD tiles on are fetched early
 * (touch_tile) so that memory reads overlap the arithmetic. Softmax is online, in float32 and
 * base 2 (scores carry scale * log2(e)). Vectors are GCC vector extensions of 16 floats, one
 * AVX-512 register; elsewhere GCC splits them.
 *
 * bfloat16 caches: where the CPU has AVX512_BF16 and head_dim is a multiple of 32, q . K and
 * P V are `vdpbf16ps` dot products (32 bfloat16 products into 16 float32 sums an instruction):
 * q and K as stored, P rounded to bfloat16 (as FlashAttention does on GPUs) against two V rows
 * interleaved, while the softmax's sums stay in float32. Elsewhere bfloat16 becomes float32 by a
 * 16-bit shift and the products are float32 FMAs.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* LANES, vf and vi, select_vec and exp2_poly; head_dim must be a multiple of LANES */
#include "vector_math.h"
#define TILE 16           /* positions per tile: the scores of one q head fill one vector */
#define SUBGROUP 8        /* q heads whose accumulators live in registers together */
#define AHEAD 2            /* tiles between a row's fetch and its use */
#define PAGE_BYTES 4096
#define ITEMS_PER_THREAD 4 /* split kv heads over items until there are this many per thread */
#define MAX_ITEM_FLOATS 32768 /* q heads * head_dim of one item: two such arrays on the stack */
#define LOG2E 1.4426950408889634f

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
enum { OK = 0, BAD_ARGUMENT = 1, BAD_SEQ_LEN = 2, BAD_BLOCK_ID = 3 };

typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
/* Unaligned, aliasing-safe views of LANES elements in memory. */
typedef float vf_mem __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t vh_mem __attribute__((vector_size(32), aligned(2), may_alias));

typedef struct {
    const void *query, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *seq_lens;
    int64_t q_stride_seq, q_stride_head, out_stride_seq, out_stride_head;
    int64_t stride_block, stride_row, stride_head, table_stride;
    int64_t num_blocks, max_blocks, block_size, group, head_dim;
    float qk_scale;
    int bf16;
    int dp; /* bfloat16 dot products (DP_DIMS) for q . K and P V */
} Args;

static inline vf load_vec(const void *base, int64_t offset, int bf16) {
    if (bf16) {
        vh half = *(const vh_mem *)((const uint16_t *)base + offset);
        return (vf)(__builtin_convertvector(half, vu) << 16);
    }
    return *(const vf_mem *)((const float *)base + offset);
}

static inline float load_scalar(const void *base, int64_t offset, int bf16) {
    if (!bf16) return ((const float *)base)[offset];
    union { uint32_t u; float f; } bits = {.u = (uint32_t)((const uint16_t *)base)[offset] << 16};
    return bits.f;
}

static inline void store_scalar(void *base, int64_t offset, float value, int bf16) {
    if (!bf16) {
        ((float *)base)[offset] = value;
        return;
    }
    union { float f; uint32_t u; } bits = {.f = value};
    uint32_t rounded = bits.u + 0x7fffu + ((bits.u >> 16) & 1u); /* round to nearest even */
    ((uint16_t *)base)[offset] = isnan(value) ? 0x7fc0u : (uint16_t)(rounded >> 16);
}

static inline float hsum(vf v) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++) sum += v[i];
    return sum;
#endif
}

static inline float hmax(vf v) {
#ifdef __AVX512F__
    return _mm512_reduce_max_ps((__m512)v);
#else
    float best = v[0];
    for (int i = 1; i < LANES; i++) best = v[i] > best ? v[i] : best;
    return best;
#endif
}

/* out[r] = the sum of the lanes of rows[r], r < 16: a tree that halves the lanes per row and
 * doubles the rows per vector at each level, ~3 operations a row instead of ~8. */
static inline vf sum_rows(const vf *rows) {
#ifdef __AVX512F__
    __m512 half[8], quarter[4], eighth[2];
    for (int i = 0; i < 8; i++) { /* 256-bit halves: rows 2i | 2i+1, 8 lanes each */
        __m512 a = (__m512)rows[2 * i], b = (__m512)rows[2 * i + 1];
        half[i] = _mm512_shuffle_f32x4(a, b, 0x44) + _mm512_shuffle_f32x4(a, b, 0xee);
    }
    for (int i = 0; i < 4; i++) { /* 128-bit quarters: rows 4i .. 4i+3, 4 lanes each */
        __m512 a = half[2 * i], b = half[2 * i + 1];
        quarter[i] = _mm512_shuffle_f32x4(a, b, 0x88) + _mm512_shuffle_f32x4(a, b, 0xdd);
    }
    for (int i = 0; i < 2; i++) { /* quarter q: rows 8i+q | 8i+4+q, 2 lanes each */
        __m512d a = (__m512d)quarter[2 * i], b = (__m512d)quarter[2 * i + 1];
        eighth[i] = (__m512)_mm512_unpacklo_pd(a, b) + (__m512)_mm512_unpackhi_pd(a, b);
    }
    __m512 sums = _mm512_shuffle_ps(eighth[0], eighth[1], 0x88) + /* lane 4q+e: row q+4e */
                  _mm512_shuffle_ps(eighth[0], eighth[1], 0xdd);
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return (vf)_mm512_permutexvar_ps(order, sums);
#else
    vf sums;
    for (int r = 0; r < LANES; r++) sums[r] = hsum(rows[r]);
    return sums;
#endif
}

/* 2^x for x <= 0 (Cephes exp2f: 2^n times a degree-6 polynomial on [-0.5, 0.5], relative error
 * ~2e-7). Lanes below -126 give 2^-126, lanes above 0 give 1; NaN stays NaN. */
static inline vf exp2_nonpositive(vf x) {
    const vf zero = {0}, low = zero - 126.0f;
    vf clamped = select_vec(x < zero, x, zero); /* NaN too becomes 0 here... */
    clamped = select_vec(clamped > low, clamped, low);
    vf shifted = clamped + 0.5f;
    vi whole = __builtin_convertvector(shifted, vi);                  /* truncates to zero */
    whole -= (vi)(__builtin_convertvector(whole, vf) > shifted) & 1; /* ... now floor */
    vf f = select_vec(x == x, clamped, x) - __builtin_convertvector(whole, vf); /* ...not here */
    return exp2_poly(f) * (vf)((whole + 127) << 23);
}

/* scores[g] lane r = q[g] . K[row r] for the n <= TILE rows at k_head + rows[r] (lanes from n
 * on: 0). Each K vector is loaded once and multiplied into all ng heads' partial sums. */
static inline __attribute__((always_inline)) void score_tile(
    const float *q, const void *k_head, const int64_t *rows, int n, int64_t head_dim,
    vf *scores, const int ng, const int bf16) {
    vf partial[SUBGROUP][TILE];
    for (int r = 0; r < TILE; r++) {
        vf sum[SUBGROUP];
        for (int g = 0; g < ng; g++) sum[g] = (vf){0};
        for (int64_t d = 0; r < n && d < head_dim; d += LANES) {
            vf k = load_vec(k_head, rows[r] + d, bf16);
            for (int g = 0; g < ng; g++) sum[g] += *(const vf_mem *)(q + g * head_dim + d) * k;
        }
        for (int g = 0; g < ng; g++) partial[g][r] = sum[g];
    }
    for (int g = 0; g < ng; g++) scores[g] = sum_rows(partial[g]);
}

/* acc[g][d .. d + width * LANES) += sum_r probs[g] lane r * V[row r][same columns]: the
 * ng * width accumulators stay in registers while the tile's rows stream past. */
static inline __attribute__((always_inline)) void value_columns(
    const vf *probs, const void *v_head, const int64_t *rows, int n, int64_t head_dim,
    float *acc, int64_t d, const int ng, const int width, const int bf16) {
    vf sum[SUBGROUP][2];
    for (int g = 0; g < ng; g++)
        for (int w = 0; w < width; w++)
            sum[g][w] = *(const vf_mem *)(acc + g * head_dim + d + w * LANES);
    for (int r = 0; r < n; r++)
        for (int w = 0; w < width; w++) {
            vf v = load_vec(v_head, rows[r] + d + w * LANES, bf16);
            for (int g = 0; g < ng; g++) sum[g][w] += probs[g][r] * v;
        }
    for (int g = 0; g < ng; g++)
        for (int w = 0; w < width; w++)
            *(vf_mem *)(acc + g * head_dim + d + w * LANES) = sum[g][w];
}

static inline __attribute__((always_inline)) void value_tile(
    const vf *probs, const void *v_head, const int64_t *rows, int n, int64_t head_dim,
    float *acc, const int ng, const int bf16) {
    int64_t d = 0;
    for (; d + 2 * LANES <= head_dim; d += 2 * LANES)
        value_columns(probs, v_head, rows, n, head_dim, acc, d, ng, 2, bf16);
    if (d < head_dim) value_columns(probs, v_head, rows, n, head_dim, acc, d, ng, 1, bf16);
}

typedef void (*score_fn)(const float *, const void *, const int64_t *, int, int64_t, vf *);
typedef void (*value_fn)(const vf *, const void *, const int64_t *, int, int64_t, float *);

/* One copy of each tile function per (subgroup size, dtype), so the loops over heads unroll. */
#define TILE_FUNCTIONS(NG, NAME, BF16)                                                       \
    static void score_##NAME##_##NG(const float *q, const void *k, const int64_t *rows,     \
                                    int n, int64_t hd, vf *s) {                              \
        score_tile(q, k, rows, n, hd, s, NG, BF16);                                          \
    }                                                                                        \
    static void value_##NAME##_##NG(const vf *p, const void *v, const int64_t *rows, int n, \
                                    int64_t hd, float *acc) {                                \
        value_tile(p, v, rows, n, hd, acc, NG, BF16);                                        \
    }
#define BOTH_DTYPES(NG) TILE_FUNCTIONS(NG, f32, 0) TILE_FUNCTIONS(NG, bf16, 1)
BOTH_DTYPES(1) BOTH_DTYPES(2) BOTH_DTYPES(3) BOTH_DTYPES(4)
BOTH_DTYPES(5) BOTH_DTYPES(6) BOTH_DTYPES(7) BOTH_DTYPES(8)
#define BY_SUBGROUP(P) {P##1, P##2, P##3, P##4, P##5, P##6, P##7, P##8}
static const score_fn SCORE_TILE[2][SUBGROUP] = {BY_SUBGROUP(score_f32_), BY_SUBGROUP(score_bf16_)};
static const value_fn VALUE_TILE[2][SUBGROUP] = {BY_SUBGROUP(value_f32_), BY_SUBGROUP(value_bf16_)};

#ifdef __AVX512BF16__
#define HAVE_DP 1
#define DP_DIMS 32 /* bfloat16 values in one AVX-512 register: head_dim must be a multiple */

/* As score_tile, for bfloat16 q (qh, as stored) and K: each K register of 32 values goes into
 * all ng heads' sums by one vdpbf16ps each; the scores are scaled once summed. */
static inline __attribute__((always_inline)) void score_tile_dp(
    const uint16_t *qh, const void *k_head, const int64_t *rows, int n, int64_t head_dim,
    vf *scores, float scale, const int ng) {
    vf partial[SUBGROUP][TILE];
    for (int r = 0; r < TILE; r++) {
        __m512 sum[SUBGROUP];
        for (int g = 0; g < ng; g++) sum[g] = _mm512_setzero_ps();
        for (int64_t d = 0; r < n && d < head_dim; d += DP_DIMS) {
            __m512bh k = (__m512bh)_mm512_loadu_si512((const uint16_t *)k_head + rows[r] + d);
            for (int g = 0; g < ng; g++) {
                __m512bh q = (__m512bh)_mm512_loadu_si512(qh + g * head_dim + d);
                sum[g] = _mm512_dpbf16_ps(sum[g], q, k);
            }
        }
        for (int g = 0; g < ng; g++) partial[g][r] = (vf)sum[g];
    }
    for (int g = 0; g < ng; g++) scores[g] = sum_rows(partial[g]) * scale;
}

/* As value_tile, for a bfloat16 V: rows r and r + 1 are interleaved value by value, so that one
 * vdpbf16ps against the pair (p_r, p_r+1) adds both rows' terms to 16 columns of a head. */
static inline __attribute__((always_inline)) void value_tile_dp(
    const vf *probs, const void *v_head, const int64_t *rows, int n, int64_t head_dim,
    float *acc, const int ng) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                         32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    uint32_t pairs[SUBGROUP][TILE / 2]; /* word j: p_2j | p_2j+1 << 16, in bfloat16 */
    for (int g = 0; g < ng; g++)
        _mm256_storeu_si256((__m256i *)pairs[g], (__m256i)_mm512_cvtneps_pbh((__m512)probs[g]));
    const uint16_t *v = (const uint16_t *)v_head;
    for (int64_t d = 0; d < head_dim; d += DP_DIMS) {
        __m512 lo[SUBGROUP], hi[SUBGROUP]; /* columns d .. d + 15 and d + 16 .. d + 31 */
        for (int g = 0; g < ng; g++) {
            lo[g] = _mm512_loadu_ps(acc + g * head_dim + d);
            hi[g] = _mm512_loadu_ps(acc + g * head_dim + d + 16);
        }
        for (int r = 0; r < n; r += 2) {
            __m512i first = _mm512_loadu_si512(v + rows[r] + d);
            /* past the tile's last row: zeros, never the cache (an unused slot may hold NaN) */
            __m512i second = r + 1 < n ? _mm512_loadu_si512(v + rows[r + 1] + d)
                                       : _mm512_setzero_si512();
            __m512bh low_pairs = (__m512bh)_mm512_permutex2var_epi16(first, low, second);
            __m512bh high_pairs = (__m512bh)_mm512_permutex2var_epi16(first, high, second);
            for (int g = 0; g < ng; g++) {
                __m512bh p = (__m512bh)_mm512_set1_epi32((int)pairs[g][r / 2]);
                lo[g] = _mm512_dpbf16_ps(lo[g], low_pairs, p);
                hi[g] = _mm512_dpbf16_ps(hi[g], high_pairs, p);
            }
        }
        for (int g = 0; g < ng; g++) {
            _mm512_storeu_ps(acc + g * head_dim + d, lo[g]);
            _mm512_storeu_ps(acc + g * head_dim + d + 16, hi[g]);
        }
    }
}

typedef void (*score_dp_fn)(const uint16_t *, const void *, const int64_t *, int, int64_t, vf *,
                            float);
#define DP_FUNCTIONS(NG)                                                                      \
    static void score_dp_##NG(const uint16_t *q, const void *k, const int64_t *rows, int n,  \
                              int64_t hd, vf *s, float scale) {                              \
        score_tile_dp(q, k, rows, n, hd, s, scale, NG);                                      \
    }                                                                                        \
    static void value_dp_##NG(const vf *p, const void *v, const int64_t *rows, int n,        \
                              int64_t hd, float *acc) {                                      \
        value_tile_dp(p, v, rows, n, hd, acc, NG);                                           \
    }
DP_FUNCTIONS(1) DP_FUNCTIONS(2) DP_FUNCTIONS(3) DP_FUNCTIONS(4)
DP_FUNCTIONS(5) DP_FUNCTIONS(6) DP_FUNCTIONS(7) DP_FUNCTIONS(8)
static const score_dp_fn SCORE_DP[SUBGROUP] = BY_SUBGROUP(score_dp_);
static const value_fn VALUE_DP[SUBGROUP] = BY_SUBGROUP(value_dp_);
#else
#define HAVE_DP 0
#define DP_DIMS 32
#endif

/* Whether the bfloat16 dot products serve this call: compiled in, a bfloat16 cache, and heads
 * of whole registers. The two below are reached only where it says so. */
static int use_dp(int32_t dtype, int64_t head_dim) {
    return HAVE_DP && dtype == DTYPE_BFLOAT16 && head_dim % DP_DIMS == 0;
}

static void score_dp(const uint16_t *qh, const void *k_head, const int64_t *rows, int n,
                     int64_t head_dim, vf *scores, float scale, int ng) {
#if HAVE_DP
    SCORE_DP[ng - 1](qh, k_head, rows, n, head_dim, scores, scale);
#else
    (void)qh, (void)k_head, (void)rows, (void)n, (void)head_dim, (void)scores, (void)scale;
    (void)ng;
#endif
}

static void value_dp(const vf *probs, const void *v_head, const int64_t *rows, int n,
                     int64_t head_dim, float *acc, int ng) {
#if HAVE_DP
    VALUE_DP[ng - 1](probs, v_head, rows, n, head_dim, acc);
#else
    (void)probs, (void)v_head, (void)rows, (void)n, (void)head_dim, (void)acc, (void)ng;
#endif
}

/* Turns one head's tile of scores into probabilities in place and folds them into the running
 * max m and sum l; a new max first rescales l and the head's accumulator acc [head_dim]. */
static void softmax_tile(vf *scores, int n, float *m, float *l, float *acc, int64_t head_dim) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vi valid = lane < n;
    vf s = select_vec(valid, *scores, (vf){0} - INFINITY);
    float tile_max = hmax(s);
    if (tile_max > *m) {
        float alpha = exp2f(*m - tile_max); /* 0 on the first tile, where *m is -inf */
        *l *= alpha;
        for (int64_t d = 0; d < head_dim; d += LANES) *(vf_mem *)(acc + d) *= alpha;
        *m = tile_max;
    }
    vf p = select_vec(valid, exp2_nonpositive(s - *m), (vf){0});
    *l += hsum(p);
    *scores = p;
}

/* Cache offsets (elements, from kv head 0) of positions start .. start + n - 1. */
static int tile_rows(const Args *a, const int32_t *table, int64_t start, int n, int64_t *rows) {
    int64_t entry = start / a->block_size, row = start % a->block_size;
    int64_t block = table[entry];
    for (int r = 0; r < n; r++, row++) {
        if (row == a->block_size) {
            block = table[++entry];
            row = 0;
        }
        if (block < 0 || block >= a->num_blocks) return BAD_BLOCK_ID;
        rows[r] = block * a->stride_block + row * a->stride_row;
    }
    return OK;
}

/* Fetches the item's K/V rows at positions start .. start + TILE - 1, AHEAD tiles before their
 * use. The blocks lie anywhere in the pool and the hardware prefetchers stop at page boundaries.
 * Measured on Zen 4 and 5: prefetch instructions alone are mostly lost (a prefetch that would
 * walk the page table is dropped), plain loads of every line hold the core's few miss buffers
 * and stall the arithmetic behind them. So: one plain load of the tile's first line and of the
 * first line of each further page (it walks the page table), a prefetch for every other line.
 * Two tiles ahead against one plain load per line one tile ahead: decode attention over a
 * 100 MB cache 8.5 -> 7.5 ms. Returns a sum of what was loaded, for the caller to keep the
 * loads alive. */
static unsigned touch_tile(const Args *a, const int32_t *table, int64_t start, int64_t seq_len,
                           int64_t first, int64_t count) {
    int64_t rows[TILE];
    int n = seq_len - start < TILE ? (int)(seq_len - start) : TILE;
    if (n <= 0 || tile_rows(a, table, start, n, rows) != OK) return 0;
    const int64_t element = a->bf16 ? 2 : 4, row_bytes = a->head_dim * element;
    unsigned sum = 0;
    for (int r = 0; r < n; r++)
        for (int64_t kv = first; kv < first + count; kv++) {
            int64_t offset = (rows[r] + kv * a->stride_head) * element;
            const unsigned char *k = (const unsigned char *)a->k_cache + offset;
            const unsigned char *v = (const unsigned char *)a->v_cache + offset;
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
                const unsigned char *lines[2] = {k + byte, v + byte};
                for (int i = 0; i < 2; i++) {
                    if ((r == 0 && byte == 0) || (uintptr_t)lines[i] % PAGE_BYTES < 64)
                        sum += *lines[i];
                    else
                        __builtin_prefetch(lines[i], 0, 3);
                }
            }
        }
    return sum;
}

/* One tile of positions for the item's kv heads first .. first + count - 1; q, m, l and acc
 * hold the item's q heads in order. */
static void attend_tile(const Args *a, const int64_t *rows, int n, int64_t first, int64_t count,
                        const float *q, const uint16_t *qh, float *m, float *l, float *acc) {
    const int64_t D = a->head_dim, G = a->group, element = a->bf16 ? 2 : 4;
    vf scores[SUBGROUP];
    for (int64_t kv = 0; kv < count; kv++) {
        int64_t head_bytes = (first + kv) * a->stride_head * element;
        const char *k_head = (const char *)a->k_cache + head_bytes;
        const char *v_head = (const char *)a->v_cache + head_bytes;
        for (int64_t h = kv * G; h < (kv + 1) * G; h += SUBGROUP) {
            int ng = (kv + 1) * G - h < SUBGROUP ? (int)((kv + 1) * G - h) : SUBGROUP;
            if (a->dp)
                score_dp(qh + h * D, k_head, rows, n, D, scores, a->qk_scale, ng);
            else
                SCORE_TILE[a->bf16][ng - 1](q + h * D, k_head, rows, n, D, scores);
            for (int g = 0; g < ng; g++)
                softmax_tile(&scores[g], n, &m[h + g], &l[h + g], acc + (h + g) * D, D);
            if (a->dp)
                value_dp(scores, v_head, rows, n, D, acc + h * D, ng);
            else
                VALUE_TILE[a->bf16][ng - 1](scores, v_head, rows, n, D, acc + h * D);
        }
    }
}

/* The work item of kv heads first .. first + count - 1 of sequence seq. */
static int attend_item(const Args *a, int64_t seq, int64_t first, int64_t count) {
    const int64_t D = a->head_dim, H = count * a->group, seq_len = a->seq_lens[seq];
    if (seq_len < 1 || seq_len > a->max_blocks * a->block_size) return BAD_SEQ_LEN;
    const int32_t *table = a->block_tables + seq * a->table_stride;
    const int64_t q_first = seq * a->q_stride_seq + first * a->group * a->q_stride_head;
    const int64_t out_first = seq * a->out_stride_seq + first * a->group * a->out_stride_head;
    float q[H * D], acc[H * D], m[H], l[H]; /* per q head of the item */
    uint16_t qh[a->dp ? H * D : 1];          /* q as stored, for the bfloat16 dot products */
    for (int64_t h = 0; h < H; h++) {
        for (int64_t d = 0; d < D; d++) {
            int64_t at = q_first + h * a->q_stride_head + d;
            if (a->dp) qh[h * D + d] = ((const uint16_t *)a->query)[at];
            q[h * D + d] = load_scalar(a->query, at, a->bf16) * a->qk_scale;
            acc[h * D + d] = 0.0f;
        }
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    int64_t rows[TILE];
    unsigned touched = 0;
    for (int64_t ahead = 0; ahead < AHEAD; ahead++)
        touched += touch_tile(a, table, ahead * TILE, seq_len, first, count);
    for (int64_t start = 0; start < seq_len; start += TILE) {
        int n = seq_len - start < TILE ? (int)(seq_len - start) : TILE;
        if (tile_rows(a, table, start, n, rows) != OK) return BAD_BLOCK_ID;
        touched += touch_tile(a, table, start + AHEAD * TILE, seq_len, first, count);
        attend_tile(a, rows, n, first, count, q, qh, m, l, acc);
    }
    __asm__ volatile("" : : "r"(touched)); /* the touches' only use */
    for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++)
            store_scalar(a->out, out_first + h * a->out_stride_head + d, acc[h * D + d] / l[h],
                         a->bf16);
    return OK;
}

/* kv heads per work item: all of a sequence's (its rows then read in address order) unless that
 * leaves fewer than ITEMS_PER_THREAD items per thread or exceeds MAX_ITEM_FLOATS. */
static int64_t heads_per_item(int64_t num_seqs, int64_t num_kv_heads, int64_t head_floats,
                              int64_t num_threads) {
    int64_t items_per_seq = 1;
    while (items_per_seq < num_kv_heads &&
           (num_seqs * items_per_seq < ITEMS_PER_THREAD * num_threads ||
            (num_kv_heads + items_per_seq - 1) / items_per_seq * head_floats > MAX_ITEM_FLOATS))
        items_per_seq++;
    return (num_kv_heads + items_per_seq - 1) / items_per_seq;
}

/* out [num_seqs, num_kv_heads * group, head_dim] = attention of each sequence's one query over
 * its seq_lens[s] cached positions. Returns OK, or the largest error code a work item met (an
 * item that meets one leaves its output unwritten). */
int paged_decode_attention(
    void *out, const void *query, const void *k_cache, const void *v_cache,
    const int32_t *block_tables, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_kv_heads, int64_t group, int64_t head_dim,
    int64_t num_blocks, int64_t block_size, int64_t max_blocks,
    int64_t out_stride_seq, int64_t out_stride_head, int64_t q_stride_seq, int64_t q_stride_head,
    int64_t stride_block, int64_t stride_row, int64_t stride_head, int64_t table_stride,
    float scale, int32_t dtype, int32_t num_threads) {
    if (head_dim <= 0 || head_dim % LANES != 0 || group <= 0 || block_size <= 0) return BAD_ARGUMENT;
    if (num_kv_heads <= 0 || num_threads <= 0) return BAD_ARGUMENT;
    if (group * head_dim > MAX_ITEM_FLOATS) return BAD_ARGUMENT;
    if (dtype != DTYPE_FLOAT32 && dtype != DTYPE_BFLOAT16) return BAD_ARGUMENT;
    const Args a = {query, k_cache, v_cache, out, block_tables, seq_lens,
                    q_stride_seq, q_stride_head, out_stride_seq, out_stride_head,
                    stride_block, stride_row, stride_head, table_stride,
                    num_blocks, max_blocks, block_size, group, head_dim, scale * LOG2E,
                    dtype == DTYPE_BFLOAT16, use_dp(dtype, head_dim)};
    const int64_t per_item = heads_per_item(num_seqs, num_kv_heads, group * head_dim, num_threads);
    const int64_t per_seq = (num_kv_heads + per_item - 1) / per_item;
    int status = OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(max : status) \
    if (num_threads > 1)
    for (int64_t item = 0; item < num_seqs * per_seq; item++) {
        int64_t first = item % per_seq * per_item;
        int64_t count = num_kv_heads - first < per_item ? num_kv_heads - first : per_item;
        int result = attend_item(&a, item / per_seq, first, count);
        status = result > status ? result : status;
    }
    return status;
}

/* ---- Prefill: the n query tokens of one sequence, the last n of its context (or, given
 * positions, any n increasing positions of it: KVShare's selective recomputation), each
 * attending to the positions up to its own (causal), over the same paged cache and the same
 * tile functions.
 *
 * A work item is one kv head and a tile of up to QUERY_TILE consecutive query tokens: the G q
 * heads of each token make the item's query vectors (token-major), and they walk the key tiles
 * up to the item's last position together, each subgroup of up to SUBGROUP vectors scoring a
 * key tile from one read of its rows. A vector's lanes past its own position are masked; a key
 * tile wholly past it leaves it untouched. Items go largest first (the last query tiles see
 * the most keys), so the threads finish together. */

#define QUERY_TILE 16
#define MAX_PREFILL_ITEM_FLOATS 16384 /* query vectors * head_dim of one item, per array */

typedef struct {
    Args a;
    int64_t num_queries, context_len, tile_tokens;
    const int64_t *positions; /* of each query token, increasing; NULL: the context's last n */
} PrefillArgs;

/* Query tokens tile * tile_tokens .. of kv head kv: their G q heads each. */
static int attend_query_tile(const PrefillArgs *p, int64_t kv, int64_t tile) {
    const Args *a = &p->a;
    const int64_t D = a->head_dim, G = a->group;
    const int64_t first_token = tile * p->tile_tokens;
    const int64_t tokens = p->num_queries - first_token < p->tile_tokens
                               ? p->num_queries - first_token
                               : p->tile_tokens;
    const int64_t V = tokens * G, offset = p->context_len - p->num_queries;
    float q[V * D], acc[V * D], m[V], l[V];
    uint16_t qh[a->dp ? V * D : 1]; /* q as stored, for the bfloat16 dot products */
    int64_t position[V]; /* of each vector's token: it sees keys 0 .. position */
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t v = t * G + g, head = kv * G + g;
            const int64_t at = (first_token + t) * a->q_stride_seq + head * a->q_stride_head;
            for (int64_t d = 0; d < D; d++) {
                if (a->dp) qh[v * D + d] = ((const uint16_t *)a->query)[at + d];
                q[v * D + d] = load_scalar(a->query, at + d, a->bf16) * a->qk_scale;
                acc[v * D + d] = 0.0f;
            }
            m[v] = -INFINITY;
            l[v] = 0.0f;
            position[v] = p->positions ? p->positions[first_token + t] : offset + first_token + t;
        }
    const int64_t head_bytes = kv * a->stride_head * (a->bf16 ? 2 : 4);
    const char *k_head = (const char *)a->k_cache + head_bytes;
    const char *v_head = (const char *)a->v_cache + head_bytes;
    const int64_t last = position[V - 1];
    int64_t rows[TILE];
    vf scores[SUBGROUP];
    for (int64_t start = 0; start <= last; start += TILE) {
        int n = last + 1 - start < TILE ? (int)(last + 1 - start) : TILE;
        if (tile_rows(a, a->block_tables, start, n, rows) != OK) return BAD_BLOCK_ID;
        /* positions grow with v: the vectors wholly before the tile lead, and are skipped */
        for (int64_t v = 0; v < V;) {
            if (position[v] < start) {
                v++;
                continue;
            }
            int ng = V - v < SUBGROUP ? (int)(V - v) : SUBGROUP;
            if (a->dp)
                score_dp(qh + v * D, k_head, rows, n, D, scores, a->qk_scale, ng);
            else
                SCORE_TILE[a->bf16][ng - 1](q + v * D, k_head, rows, n, D, scores);
            for (int g = 0; g < ng; g++) {
                int64_t seen = position[v + g] - start + 1; /* lanes this vector may see */
                softmax_tile(&scores[g], seen < n ? (int)seen : n, &m[v + g], &l[v + g],
                             acc + (v + g) * D, D);
            }
            if (a->dp)
                value_dp(scores, v_head, rows, n, D, acc + v * D, ng);
            else
                VALUE_TILE[a->bf16][ng - 1](scores, v_head, rows, n, D, acc + v * D);
            v += ng;
        }
    }
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t v = t * G + g, head = kv * G + g;
            const int64_t at = (first_token + t) * a->out_stride_seq + head * a->out_stride_head;
            for (int64_t d = 0; d < D; d++)
                store_scalar(a->out, at + d, acc[v * D + d] / l[v], a->bf16);
        }
    return OK;
}

/* out [n, num_kv_heads * group, head_dim] = causal attention of the sequence's last n tokens
 * (or the tokens at `positions` [n], increasing, the last context_len - 1; NULL: the last n),
 * queries [n, Hq, D], over its context_len cached positions (theirs among them), the blocks in
 * block_table [table_len]. Returns OK or the largest error code an item met. */
int paged_prefill_attention(
    void *out, const void *query, const void *k_cache, const void *v_cache,
    const int32_t *block_table, const int64_t *positions, int64_t num_queries, int64_t context_len,
    int64_t num_kv_heads, int64_t group, int64_t head_dim,
    int64_t num_blocks, int64_t block_size, int64_t table_len,
    int64_t out_stride_tok, int64_t out_stride_head, int64_t q_stride_tok, int64_t q_stride_head,
    int64_t stride_block, int64_t stride_row, int64_t stride_head,
    float scale, int32_t dtype, int32_t num_threads) {
    if (head_dim <= 0 || head_dim % LANES != 0 || group <= 0 || block_size <= 0) return BAD_ARGUMENT;
    if (num_kv_heads <= 0 || num_threads <= 0 || num_queries <= 0) return BAD_ARGUMENT;
    if (group * head_dim > MAX_PREFILL_ITEM_FLOATS) return BAD_ARGUMENT;
    if (dtype != DTYPE_FLOAT32 && dtype != DTYPE_BFLOAT16) return BAD_ARGUMENT;
    if (context_len < num_queries || context_len > table_len * block_size) return BAD_SEQ_LEN;
    if (positions) {
        if (positions[0] < 0 || positions[num_queries - 1] != context_len - 1) return BAD_SEQ_LEN;
        for (int64_t t = 1; t < num_queries; t++)
            if (positions[t] <= positions[t - 1]) return BAD_SEQ_LEN;
    }
    int64_t tile_tokens = MAX_PREFILL_ITEM_FLOATS / (group * head_dim);
    tile_tokens = tile_tokens < QUERY_TILE ? tile_tokens : QUERY_TILE;
    const PrefillArgs p = {{query, k_cache, v_cache, out, block_table, NULL,
                            q_stride_tok, q_stride_head, out_stride_tok, out_stride_head,
                            stride_block, stride_row, stride_head, table_len,
                            num_blocks, table_len, block_size, group, head_dim, scale * LOG2E,
                            dtype == DTYPE_BFLOAT16, use_dp(dtype, head_dim)},
                           num_queries, context_len, tile_tokens, positions};
    const int64_t tiles = (num_queries + tile_tokens - 1) / tile_tokens;
    int status = OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(max : status) \
    if (num_threads > 1)
    for (int64_t item = 0; item < tiles * num_kv_heads; item++) {
        int result = attend_query_tile(&p, item % num_kv_heads, tiles - 1 - item / num_kv_heads);
        status = result > status ? result : status;
    }
    return status;
}
