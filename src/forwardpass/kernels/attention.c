/* Attention with rotary positions over a KV cache that is one buffer per layer, as the decoder's
 * GroupQueryAttention node computes it (num_heads query heads sharing kv_num_heads key/value heads,
 * interleaved rotary from cos/sin caches, softmax(q k / sqrt(D)) v), with two differences that matter here:
 * every (row, query head, position) is computed on its own, in one fixed order, so a row's result does not
 * depend on the rows beside it; and rows may be at different positions with several new tokens each.
 *
 * Per row b with T new tokens, seqlens[b] + 1 is the row's length after this call: its new tokens take
 * positions seqlens[b] + 1 - T ... seqlens[b]; new token t attends to positions 0 .. its own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct {
    const float *qkv;     /* (B, T, (H + 2 Hkv) D) */
    void *keys, *values; /* (B, Hkv, S, D): float, or fp16 bits when half */
    int half;
    const int32_t *seqlens;
    const float *cos, *sin; /* (P, D / 2) */
    float *out;             /* (B, T, H D) */
    int64_t B, T, H, Hkv, S, D, P;
} fp_attention;

static inline int64_t first_position(const fp_attention *a, int64_t b) { return (int64_t)a->seqlens[b] + 1 - a->T; }

/* element `index` of a cache */
static inline float cache_at(const fp_attention *a, const void *cache, int64_t index) {
    return a->half ? half_to_float(((const uint16_t *)cache)[index]) : ((const float *)cache)[index];
}

/* The interleaved rotation of one head's vector at position p: (x0, x1) pairs turned by angle i at p. */
static void rotate(const fp_attention *a, const float *x, int64_t p, float *y) {
    const float *c = a->cos + p * (a->D / 2), *s = a->sin + p * (a->D / 2);
    for (int64_t i = 0; i < a->D / 2; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        y[2 * i] = x0 * c[i] - x1 * s[i];
        y[2 * i + 1] = x0 * s[i] + x1 * c[i];
    }
}

/* Task i of B * T * Hkv: one new token's key (rotated) and value into the cache. */
void fp_attention_store(const fp_attention *a, int64_t i) {
    const int64_t g = i % a->Hkv, t = (i / a->Hkv) % a->T, b = i / (a->Hkv * a->T);
    const int64_t p = first_position(a, b) + t, width = (a->H + 2 * a->Hkv) * a->D;
    const float *token = a->qkv + (b * a->T + t) * width;
    const int64_t at = ((b * a->Hkv + g) * a->S + p) * a->D;
    const float *value = token + (a->H + a->Hkv + g) * a->D;
    if (!a->half) {
        rotate(a, token + (a->H + g) * a->D, p, (float *)a->keys + at);
        memcpy((float *)a->values + at, value, (size_t)a->D * sizeof(float));
        return;
    }
    float key[256];
    rotate(a, token + (a->H + g) * a->D, p, key);
    uint16_t *k = (uint16_t *)a->keys + at, *v = (uint16_t *)a->values + at;
    for (int64_t d = 0; d < a->D; d++) {
        k[d] = float_to_half(key[d]);
        v[d] = float_to_half(value[d]);
    }
}

#if defined(__AVX512F__)
/* 64 cache elements from `index` as four vectors */
static inline void load64(const fp_attention *a, const void *cache, int64_t index, __m512 *x0, __m512 *x1, __m512 *x2,
                          __m512 *x3) {
    if (a->half) {
        const uint16_t *h = (const uint16_t *)cache + index;
        *x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        *x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 16)));
        *x2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 32)));
        *x3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 48)));
    } else {
        const float *f = (const float *)cache + index;
        *x0 = _mm512_loadu_ps(f);
        *x1 = _mm512_loadu_ps(f + 16);
        *x2 = _mm512_loadu_ps(f + 32);
        *x3 = _mm512_loadu_ps(f + 48);
    }
}
#endif

/* softmax of s[0..n-1] in place */
static void softmax(float *s, int64_t n) {
#if defined(__AVX512F__)
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_maskz_loadu_ps(k, s + j));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m));
        _mm512_mask_storeu_ps(s + j, k, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), inv));
    }
#else
    float m = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < n; j++) m = fmaxf(m, s[j]);
    for (int64_t j = 0; j < n; j++) sum += (s[j] = expf(s[j] - m));
    for (int64_t j = 0; j < n; j++) s[j] /= sum;
#endif
}

/* Task i of B * T * Hkv: one new token's outputs for the query heads sharing key/value head g, in one pass over
 * that head's keys and values (read once for the group: at many rows the cache is as many bytes as the weights).
 * scores: room for (H / Hkv) * S floats. */
void fp_attention_group(const fp_attention *a, int64_t i, float *scores) {
    const int64_t g = i % a->Hkv, t = (i / a->Hkv) % a->T, b = i / (a->Hkv * a->T), D = a->D;
    const int64_t G = a->H / a->Hkv, p = first_position(a, b) + t, n = p + 1;
    const int64_t width = (a->H + 2 * a->Hkv) * D;
    float q[16 * 256]; /* the group's rotated queries, scaled by 1/sqrt(D) */
    const float scale = 1.0f / sqrtf((float)D);
    for (int64_t h = 0; h < G; h++) {
        rotate(a, a->qkv + (b * a->T + t) * width + (g * G + h) * D, p, q + h * D);
        for (int64_t d = 0; d < D; d++) q[h * D + d] *= scale;
    }
    const int64_t base = (b * a->Hkv + g) * a->S * D; /* this row and head's cache: element base + j * D + d */
    float *o = a->out + (b * a->T + t) * a->H * D + g * G * D;
#if defined(__AVX512F__)
    if (D == 64 && G <= 8) {
        __m512 dots[8][16]; /* 16 positions' partial dot products a head, summed 16 at once (sums16) */
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int count = n - j0 < 16 ? (int)(n - j0) : 16;
            for (int jj = 0; jj < 16; jj++) {
                if (jj >= count) {
                    for (int64_t h = 0; h < G; h++) dots[h][jj] = _mm512_setzero_ps();
                    continue;
                }
                __m512 k0, k1, k2, k3;
                load64(a, a->keys, base + (j0 + jj) * 64, &k0, &k1, &k2, &k3);
                for (int64_t h = 0; h < G; h++) {
                    const float *qh = q + h * 64;
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), k0);
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16), k1, acc);
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32), k2, acc);
                    dots[h][jj] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 48), k3, acc);
                }
            }
            const __mmask16 k = (__mmask16)((1u << count) - 1);
            for (int64_t h = 0; h < G; h++) _mm512_mask_storeu_ps(scores + h * n + j0, k, sums16(dots[h]));
        }
        for (int64_t h = 0; h < G; h++) softmax(scores + h * n, n);
        __m512 acc[8][4];
        for (int64_t h = 0; h < G; h++)
            for (int v = 0; v < 4; v++) acc[h][v] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m512 v0, v1, v2, v3;
            load64(a, a->values, base + j * 64, &v0, &v1, &v2, &v3);
            for (int64_t h = 0; h < G; h++) {
                const __m512 w = _mm512_set1_ps(scores[h * n + j]);
                acc[h][0] = _mm512_fmadd_ps(w, v0, acc[h][0]);
                acc[h][1] = _mm512_fmadd_ps(w, v1, acc[h][1]);
                acc[h][2] = _mm512_fmadd_ps(w, v2, acc[h][2]);
                acc[h][3] = _mm512_fmadd_ps(w, v3, acc[h][3]);
            }
        }
        for (int64_t h = 0; h < G; h++)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(o + h * 64 + 16 * v, acc[h][v]);
        return;
    }
#endif
    for (int64_t h = 0; h < G; h++) {
        float *s = scores + h * n;
        for (int64_t j = 0; j < n; j++) {
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += q[h * D + d] * cache_at(a, a->keys, base + j * D + d);
            s[j] = dot;
        }
        softmax(s, n);
        for (int64_t d = 0; d < D; d++) o[h * D + d] = 0.0f;
        for (int64_t j = 0; j < n; j++)
            for (int64_t d = 0; d < D; d++) o[h * D + d] += s[j] * cache_at(a, a->values, base + j * D + d);
    }
}
