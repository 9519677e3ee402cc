/* Sampling on the CPU, one row of float32 scores [vocab] per OpenMP work item: the two passes of
 * sampling_logits.py that read a batch's whole vocabulary, each fused into one kernel.
 *
 * repetition_penalty: over each penalised row's seen tokens (prompt and output, a token once
 * however often seen), a positive score divided by the row's penalty, a negative one multiplied
 * by it (HF/vLLM). The same float32 operations as the torch path, so the same bits.
 *
 * draw: x = score / temperature, e = exp(x - max x) (every +inf score 1 and the rest 0 when the
 * row has one), then inverse-CDF rounds: the first token whose cumulative e exceeds u * sum(e),
 * one float64 uniform u a round; a draw outside the row's top_p nucleus (the tokens strictly
 * more likely than it weigh top_p or more) is drawn again with the next uniform. As in the torch
 * path, the cumulative sum is float32 within chunks of CHUNK tokens and float64 over chunks, so a
 * token of probability 0 is never drawn and a small one keeps its interval. A row no round
 * settled gets winner -1 and its e normalised in place (probabilities, for the caller's race); a
 * row with nothing drawable (NaN scores) gets the last token id, as the torch path's clamp does.
 * exp is 2^n times a degree-6 polynomial (relative error ~2e-7); a token below 2^-126 of the
 * most likely one gets probability 0 (float32's own softmax loses it at 2^-149).
 *
 * Vectors are those of vector_math.h.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h" /* LANES, vf and vi, select_vec, exp2_poly */

#define CHUNK 256 /* tokens a float32 partial sum spans; sampling_logits.CDF_CHUNK */
#define LOG2E 1.4426950408889634f

enum { OK = 0, BAD_ARGUMENT = 1, BAD_TOKEN = 2, NO_MEMORY = 3 };

typedef float vf_mem __attribute__((vector_size(64), aligned(4), may_alias));

static inline float hsum(vf v) {
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++) sum += v[i];
    return sum;
}

/* e^y for y <= 0 (Cephes exp2f on y * log2(e)); y below -126 / log2(e), -inf included, gives 0;
 * NaN stays NaN. */
static inline vf exp_nonpositive(vf y) {
    const vf zero = {0}, low = zero - 126.0f;
    vf x = y * LOG2E;
    vi keep = x >= low;                        /* false for NaN and -inf too */
    vf clamped = select_vec(keep, x, zero);    /* in [-126, 0] */
    clamped = select_vec(clamped < zero, clamped, zero);
    vf shifted = clamped + 0.5f;
    vi whole = __builtin_convertvector(shifted, vi);                  /* truncates to zero */
    whole -= (vi)(__builtin_convertvector(whole, vf) > shifted) & 1; /* ... now floor */
    vf f = clamped - __builtin_convertvector(whole, vf);
    vf value = exp2_poly(f) * (vf)((whole + 127) << 23);
    value = select_vec(keep, value, zero);
    return select_vec(y == y, value, y); /* NaN in, NaN out */
}

int repetition_penalty(float *scores, int64_t vocab, int64_t count, const int64_t *rows,
                       const float *penalties, const int64_t *offsets, const int64_t *tokens,
                       int32_t num_threads) {
    if (vocab <= 0 || count < 0 || num_threads <= 0) return BAD_ARGUMENT;
    for (int64_t i = 0; i < offsets[count]; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab) return BAD_TOKEN; /* before touching a score */
    int status = OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(max : status) \
    if (num_threads > 1 && count > 1)
    for (int64_t c = 0; c < count; c++) {
        uint64_t *seen = calloc((size_t)(vocab + 63) / 64, sizeof(uint64_t));
        if (seen == NULL) {
            status = NO_MEMORY;
            continue;
        }
        float *row = scores + rows[c] * vocab;
        /* A penalty below what float32 holds (1e-300 is valid) is the smallest it holds: 0 would
         * make a score of 0 NaN. Positive scores over it may be infinite: draw handles those. */
        const float penalty = penalties[c] < FLT_MIN ? FLT_MIN : penalties[c];
        for (int64_t i = offsets[c]; i < offsets[c + 1]; i++) {
            int64_t t = tokens[i];
            uint64_t bit = (uint64_t)1 << (t & 63);
            if (seen[t >> 6] & bit) continue;
            seen[t >> 6] |= bit;
            row[t] = row[t] < 0 ? row[t] * penalty : row[t] / penalty;
        }
        free(seen);
    }
    return status;
}

/* x /= temperature and e = exp(x - max x) in place; per-chunk float32 sums into chunk_sums.
 * Returns the row's total, float64 over the chunks (0 or NaN: nothing drawable). */
static double exponentiate(float *x, int64_t vocab, float temperature, float *chunk_sums) {
    const int64_t whole = vocab / LANES * LANES;
    vf best = (vf){0} - INFINITY;
    vi nan_lanes = {0};
    for (int64_t i = 0; i < whole; i += LANES) {
        vf v = *(vf_mem *)(x + i) / temperature;
        *(vf_mem *)(x + i) = v;
        nan_lanes |= v != v;
        best = select_vec(v > best, v, best);
    }
    float m = -INFINITY;
    int any_nan = 0;
    for (int i = 0; i < LANES; i++) {
        m = best[i] > m ? best[i] : m;
        any_nan |= nan_lanes[i] != 0;
    }
    for (int64_t i = whole; i < vocab; i++) {
        x[i] /= temperature;
        any_nan |= x[i] != x[i];
        m = x[i] > m ? x[i] : m;
    }
    if (any_nan || m == -INFINITY) return NAN;
    const int infinite = m == INFINITY;
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * CHUNK, end = start + CHUNK < vocab ? start + CHUNK : vocab;
        vf acc = {0};
        int64_t i = start;
        for (; i + LANES <= end; i += LANES) {
            vf v = *(vf_mem *)(x + i);
            vf e = infinite ? select_vec(v == INFINITY, (vf){0} + 1.0f, (vf){0})
                            : exp_nonpositive(v - m);
            *(vf_mem *)(x + i) = e;
            acc += e;
        }
        float sum = hsum(acc);
        for (; i < end; i++) {
            float e = infinite ? (x[i] == INFINITY ? 1.0f : 0.0f) : expf(x[i] - m);
            x[i] = e;
            sum += e;
        }
        chunk_sums[c] = sum;
        total += sum;
    }
    return total;
}

/* The token at uniform u of a row of e (total `total`, chunk sums as exponentiate left them). */
static int64_t inverse_cdf(const float *e, int64_t vocab, const float *chunk_sums, double total,
                           double u) {
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    const double target = u * total; /* u < 1: below the total, so some chunk holds it */
    double before = 0.0;
    int64_t c = 0;
    while (c < chunks - 1 && before + chunk_sums[c] <= target) before += chunk_sums[c++];
    const int64_t start = c * CHUNK, end = start + CHUNK < vocab ? start + CHUNK : vocab;
    const double offset = target - before;
    float acc = 0.0f;
    int64_t last = -1; /* the chunk's last token of nonzero probability */
    for (int64_t i = start; i < end; i++) {
        if (e[i] > 0.0f) last = i;
        acc += e[i];
        if ((double)acc > offset) return i;
    }
    /* Rounding between the two sums put the offset at the chunk's mass. */
    return last >= 0 ? last : end - 1;
}

/* The mass of the tokens strictly more likely than `winner`, float32 within chunks. */
static double mass_above(const float *e, int64_t vocab, int64_t winner) {
    const float w = e[winner];
    const vf zero = {0};
    double mass = 0.0;
    for (int64_t start = 0; start < vocab; start += CHUNK) {
        const int64_t end = start + CHUNK < vocab ? start + CHUNK : vocab;
        vf acc = zero;
        int64_t i = start;
        for (; i + LANES <= end; i += LANES) {
            vf v = *(const vf_mem *)(e + i);
            acc += select_vec(v > w, v, zero);
        }
        float sum = hsum(acc);
        for (; i < end; i++) sum += e[i] > w ? e[i] : 0.0f;
        mass += sum;
    }
    return mass;
}

int draw(float *scores, int64_t num_rows, int64_t vocab, const float *temperatures,
         const double *top_p, const double *uniforms, int64_t rounds, int64_t *winners,
         int32_t num_threads) {
    if (num_rows < 0 || vocab <= 0 || rounds <= 0 || num_threads <= 0) return BAD_ARGUMENT;
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    float *all_sums = malloc((size_t)(num_rows > 0 ? num_rows : 1) * chunks * sizeof(float));
    if (all_sums == NULL) return NO_MEMORY;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) \
    if (num_threads > 1 && num_rows > 1)
    for (int64_t r = 0; r < num_rows; r++) {
        float *e = scores + r * vocab, *chunk_sums = all_sums + r * chunks;
        const double total = exponentiate(e, vocab, temperatures[r], chunk_sums);
        if (!(total > 0.0)) {
            winners[r] = vocab - 1;
            continue;
        }
        int64_t winner = -1;
        for (int64_t k = 0; k < rounds && winner < 0; k++) {
            int64_t drawn = inverse_cdf(e, vocab, chunk_sums, total, uniforms[r * rounds + k]);
            double above = top_p[r] < 1.0 ? mass_above(e, vocab, drawn) : 0.0;
            if (!(above >= top_p[r] * total && above > 0.0)) winner = drawn;
        }
        winners[r] = winner;
        if (winner < 0) {
            const float scale = (float)(1.0 / total);
            for (int64_t i = 0; i < vocab; i++) e[i] *= scale;
        }
    }
    free(all_sums);
    return OK;
}
