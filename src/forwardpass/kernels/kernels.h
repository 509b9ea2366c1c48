/* What the kernels share: fp16 <-> float (nearest even; F16C where the compiler targets it, else plain C),
 * carving one call's scratch buffer into 64-byte aligned arrays, summing 16 vectors at once, e^x on vectors, and
 * what a linear does to its rows before quantizing them (fp_prologue). */
#ifndef FORWARDPASS_KERNELS_H
#define FORWARDPASS_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (!mant) {
            bits = sign;
        } else { /* subnormal: normalize */
            uint32_t e = 113;
            while (!(mant & 0x400)) { mant <<= 1; e--; }
            bits = sign | (e << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000, exp = (u >> 23) & 0xFF;
    uint32_t mant = u & 0x7FFFFF;
    if (exp == 0xFF) return (uint16_t)(sign | 0x7C00 | (mant ? 0x200 : 0)); /* inf, nan */
    const int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7C00); /* overflow: inf */
    if (e <= 0) {                                   /* a subnormal half, or zero */
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        const int shift = 14 - e;
        uint32_t half = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++; /* a carry into the exponent is still right */
    return (uint16_t)(sign | half);
#endif
}

/* f rounded to the nearest fp16 value, as a float */
static inline float round_to_half(float f) { return half_to_float(float_to_half(f)); }

static inline int64_t up64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* the scratch buffer's first 64-byte boundary */
static inline char *aligned(const void *scratch) { return (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63); }

/* the next `bytes` of the buffer at *p (rounded up to 64) */
static inline void *take(char **p, int64_t bytes) {
    void *at = *p;
    *p += up64(bytes);
    return at;
}

/* EACH(R, O) for a tile of `rows` (1-8) activation rows, R and O constants (so each tile's loops are unrolled):
 * O outputs at a time share each activation load, as many as the registers hold (R x O accumulators). */
#define FP_BY_ROWS(rows, EACH)                                                                                  \
    switch (rows) {                                                                                            \
    case 1: EACH(1, 4); break;                                                                                 \
    case 2: EACH(2, 4); break;                                                                                 \
    case 3: EACH(3, 2); break;                                                                                 \
    case 4: EACH(4, 2); break;                                                                                 \
    case 5: EACH(5, 2); break;                                                                                 \
    case 6: EACH(6, 2); break;                                                                                 \
    case 7: EACH(7, 2); break;                                                                                 \
    default: EACH(8, 2); break;                                                                                \
    }

#if defined(__AVX512F__)
/* the 16 sums of 16 vectors v[0..15] (each summed in one fixed order, whatever its slot) */
static inline __m512 sums16(const __m512 *v) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++)
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 r01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    const __m512 r23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xDD));
}
#endif

#if defined(__AVX512F__)
static inline __m512 exp16(__m512 x) {
    /* e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2; e^r by its Taylor polynomial to r^7 (error < 1e-7) */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.98412698e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888889e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666667e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666667e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) { /* exp16's steps on eight lanes; 2^n built in the exponent bits */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.98412698e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.38888889e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33333333e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16666667e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666667e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* What a linear does to its input rows before quantizing them (the decoder's fused nodes, ort_ops.c): nothing,
 * RMSNorm (x / sqrt(mean(x^2) + epsilon) * norm), or SwiGLU (a row holds 2K values: silu(first K) * last K). */
typedef struct {
    const float *norm; /* (K,), or NULL */
    float epsilon;
    int swiglu;
} fp_prologue;

/* the floats between one input row and the next */
static inline int64_t row_stride(const fp_prologue *p, int64_t K) { return p && p->swiglu ? 2 * K : K; }

/* RMSNorm's 1 / sqrt(mean(x^2) + epsilon) for a row of K (a multiple of 32), summed in one fixed order; 1 without */
static inline float row_scale(const fp_prologue *p, const float *row, int64_t K) {
    if (!p || !p->norm) return 1.0f;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#else
    for (int64_t j = 0; j < K; j++) sum += row[j] * row[j];
#endif
    return 1.0f / sqrtf(sum / (float)K + p->epsilon);
}

/* The 32 input values of block b of a row: the row itself, or the prologue's values written into out */
static inline const float *block_values(const fp_prologue *p, const float *row, int64_t K, int64_t b, float scale,
                                        float *out) {
    const float *x = row + b * 32;
    if (!p || (!p->norm && !p->swiglu)) return x;
    if (p->norm) {
        for (int j = 0; j < 32; j++) out[j] = x[j] * scale * p->norm[b * 32 + j];
        return out;
    }
    const float *up = x + K; /* SwiGLU: silu(gate) * up, silu(g) = g / (1 + e^-g) */
#if defined(__AVX512F__)
    for (int j = 0; j < 32; j += 16) {
        const __m512 g = _mm512_loadu_ps(x + j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_storeu_ps(out + j, _mm512_mul_ps(silu, _mm512_loadu_ps(up + j)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (int j = 0; j < 32; j += 8) {
        const __m256 g = _mm256_loadu_ps(x + j);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
    }
#else
    for (int j = 0; j < 32; j++) out[j] = x[j] / (1.0f + expf(-x[j])) * up[j];
#endif
    return out;
}

#endif
