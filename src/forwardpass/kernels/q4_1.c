/* y = x @ W^T for ggml Q4_1 weights, exactly as llama.cpp's CPU backend computes it: the activations are
 * quantized to 8 bits per block of 32 (ggml's Q8_1: scale d = max|x| / 127 and s = d * sum(q)), and a block's
 * contribution is  d_w * d_x * sum(q_w * q_x) + m_w * s_x  (Q4_1 weight = q * d + m, q in 0..15).
 *
 * Weights stay in GGUF's own bytes, split into three arrays: qs (N, K/32, 16) nibbles (byte j: element j in
 * the low nibble, j + 16 in the high one), d (N, K/32) fp16 and m (K/32, N) fp16, transposed so that the
 * minimum's term is a vector over 16 outputs. An output is computed in one fixed order whatever the number of
 * rows and wherever a thread's share of outputs starts, so a row's result does not depend on the rows beside it.
 *
 * Built on the machine that runs it (forwardpass/kernels/__init__.py, -O3 -march=native): the AVX-512 VNNI
 * path, else AVX2, else plain C.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define QK 32
#define EXPORT __attribute__((visibility("default"))) /* for tests (ctypes); the rest is internal */

/* One call's quantized activations (the scratch buffer): xq (M, K) int8 in the vector path's order, xd and
 * xs (M, K/32), and xv (M, K/128, 16): each group of four blocks' scales, each repeated over its four lanes. */
typedef struct {
    int8_t *xq;
    float *xd, *xs, *xv;
} acts;

int64_t fp_q8_1_scratch_bytes(int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    return up64(M * K) + 2 * up64(M * nb * 4) + up64(M * ((nb + 3) / 4) * 16 * 4) + 64;
}

static acts view(const void *scratch, int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    char *p = aligned(scratch);
    acts a;
    a.xq = take(&p, M * K);
    a.xd = take(&p, M * nb * 4);
    a.xs = take(&p, M * nb * 4);
    a.xv = take(&p, M * ((nb + 3) / 4) * 16 * 4);
    return a;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define FP_KERNEL "avx512vnni"
#define GROUPED 1 /* four blocks a vector: elements 0-15 of blocks b..b+3, then their elements 16-31 (a last
                    * group of 1-3 blocks likewise, its two halves 16 bytes a block wide) */
#define ROWS 8    /* activation rows sharing one unpacked group of weights */
#elif defined(__AVX2__) && defined(__FMA__)
#define FP_KERNEL "avx2"
#define GROUPED 0
#define ROWS 4
#else
#define FP_KERNEL "plain"
#define GROUPED 0
#define ROWS 1
#endif

EXPORT const char *fp_kernel_name(void) { return FP_KERNEL; }

/* Where element j (0..31) of block b of a row lands in the row's xq. */
static inline int64_t slot(int64_t b, int j, int64_t nb) {
    if (!GROUPED) return b * QK + j;
    const int64_t width = b < nb / 4 * 4 ? 4 : nb % 4; /* blocks in b's group: the last one may have 1-3 */
    return (b / 4) * 128 + (j / 16) * 16 * width + (b % 4) * 16 + j % 16;
}

/* Rows r0..r1-1 of x (M rows) float into the scratch, after the prologue p (NULL: none): ggml's Q8_1
 * (d = max|x| / 127, q = round(x / d), s = d * sum(q), d and s rounded to fp16 as Q8_1 stores them). */
void fp_quantize_q8_1(const float *x, const fp_prologue *p, int64_t r0, int64_t r1, int64_t M, int64_t K,
                      void *scratch) {
    const int64_t nb = K / QK, groups = (nb + 3) / 4;
    const acts a = view(scratch, M, K);
    for (int64_t r = r0; r < r1; r++) {
        memset(a.xv + r * groups * 16, 0, (size_t)groups * 16 * sizeof(float)); /* a last group's missing blocks */
        const float *row = x + r * row_stride(p, K), scale = row_scale(p, row, K);
        for (int64_t b = 0; b < nb; b++) {
            float values[QK];
            const float *v = block_values(p, row, K, b, scale, values);
#if GROUPED
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.0f;
            const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
            /* rounded to nearest even, as lrintf in the default rounding mode */
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            _mm_storeu_si128((__m128i *)(a.xq + r * K + slot(b, 0, nb)), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(a.xq + r * K + slot(b, 16, nb)), _mm512_cvtsepi32_epi8(q1));
            const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                const int q = (int)lrintf(v[j] * id);
                a.xq[r * K + slot(b, j, nb)] = (int8_t)q;
                sum += q;
            }
#endif
            const float dh = round_to_half(d), sh = round_to_half(d * (float)sum); /* Q8_1 keeps both as fp16 */
            a.xd[r * nb + b] = dh;
            a.xs[r * nb + b] = sh;
            for (int j = 0; j < 4; j++) a.xv[(r * groups + b / 4) * 16 + (b % 4) * 4 + j] = dh;
        }
    }
}

#if GROUPED
/* R activation rows x O consecutive outputs from n: each (row, output) vector of partial sums into v[r][o] */
static inline __attribute__((always_inline)) void dots(acts a, const int R, const int O, int64_t K,
        const uint8_t *qs, const uint16_t *wd, int64_t n, __m512 v[][16], int first) {
    const int64_t nb = K / QK, full = nb / 4, groups = (nb + 3) / 4, rest = nb % 4;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __mmask64 bytes = rest ? ((__mmask64)1 << (16 * rest)) - 1 : ~(__mmask64)0;
    const __mmask8 scales = (__mmask8)((1u << (rest ? rest : 4)) - 1);
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) { /* the last group may hold 1-3 blocks: masked loads */
        const __mmask64 kb = g < full ? ~(__mmask64)0 : bytes;
        const int64_t half = g < full ? 64 : 16 * rest; /* bytes of elements 0-15 of the group's blocks */
        __m512i lo[4], hi[4];
        __m512 ws[4];
        for (int o = 0; o < O; o++) {
            const __m512i w = _mm512_maskz_loadu_epi8(kb, qs + (n + o) * nb * 16 + g * 64);
            lo[o] = _mm512_and_si512(w, m4);
            hi[o] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
            const __m128i ds = _mm_maskz_loadu_epi16(g < full ? (__mmask8)0xF : scales, wd + (n + o) * nb + g * 4);
            ws[o] = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_cvtph_ps(ds)));
        }
        for (int r = 0; r < R; r++) {
            const int8_t *x = a.xq + r * K + g * 128;
            const __m512i x0 = _mm512_maskz_loadu_epi8(kb, x), x1 = _mm512_maskz_loadu_epi8(kb, x + half);
            const __m512 xs = _mm512_loadu_ps(a.xv + (r * groups + g) * 16);
            for (int o = 0; o < O; o++) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[o], x0), hi[o], x1);
                acc[r][o] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), xs), ws[o], acc[r][o]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) v[r][first + o] = acc[r][o];
}

/* outputs c0..c0+count-1 (count <= 16) of R rows, O at a time, into v */
static inline __attribute__((always_inline)) void outputs(acts a, const int R, const int O, int64_t K,
        const uint8_t *qs, const uint16_t *wd, int64_t c0, int count, __m512 v[][16]) {
    int i = 0;
    for (; i + O <= count; i += O) dots(a, R, O, K, qs, wd, c0 + i, v, i);
    for (; i < count; i++) dots(a, R, 1, K, qs, wd, c0 + i, v, i);
}

/* rows activation rows (a tile) x weight rows n0..n1-1 */
static void rows_tile(acts a, int rows, int64_t K, const uint8_t *qs, const uint16_t *wd, const uint16_t *wm,
                      int64_t n0, int64_t n1, int64_t N, float *y) {
    const int64_t nb = K / QK;
    for (int64_t c0 = n0; c0 < n1; c0 += 16) { /* 16 outputs: their dots, then the minimum's term as a vector */
        const int count = (int)(n1 - c0 < 16 ? n1 - c0 : 16);
        __m512 v[ROWS][16];
#define OUTPUTS(R, O) outputs(a, R, O, K, qs, wd, c0, count, v)
        FP_BY_ROWS(rows, OUTPUTS);
#undef OUTPUTS
        for (int r = 0; r < rows; r++)
            for (int j = count; j < 16; j++) v[r][j] = _mm512_setzero_ps();
        const __mmask16 k = (__mmask16)((1u << count) - 1);
        __m512 ms[ROWS]; /* the minimum's term of each row: each block's 16 minimums converted once for all rows */
        for (int r = 0; r < rows; r++) ms[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, wm + b * N + c0));
            for (int r = 0; r < rows; r++) ms[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.xs[r * nb + b]), ms[r]);
        }
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * N + c0, k, _mm512_add_ps(sums16(v[r]), ms[r]));
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
static void rows_tile(acts a, int rows, int64_t K, const uint8_t *qs, const uint16_t *wd, const uint16_t *wm,
                      int64_t n0, int64_t n1, int64_t N, float *y) {
    const int64_t nb = K / QK;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *q = qs + n * nb * 16;
        const uint16_t *d = wd + n * nb;
        __m256 acc[ROWS];
        float msum[ROWS] = {0};
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(q + b * 16));
            const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
            const float db = half_to_float(d[b]), mb = half_to_float(wm[b * N + n]);
            for (int r = 0; r < rows; r++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a.xq + r * K + b * QK));
                /* u8 x s8 pairs -> int16 (at most 2 * 15 * 127), then pairs -> int32 */
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(db * a.xd[r * nb + b]), acc[r]);
                msum[r] += mb * a.xs[r * nb + b];
            }
        }
        for (int r = 0; r < rows; r++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[r * N + n] = _mm_cvtss_f32(h) + msum[r];
        }
    }
}

#else
static void rows_tile(acts a, int rows, int64_t K, const uint8_t *qs, const uint16_t *wd, const uint16_t *wm,
                      int64_t n0, int64_t n1, int64_t N, float *y) {
    const int64_t nb = K / QK;
    for (int64_t n = n0; n < n1; n++) {
        for (int r = 0; r < rows; r++) {
            float sum = 0.0f, msum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = qs + (n * nb + b) * 16;
                const int8_t *x = a.xq + r * K + b * QK;
                int isum = 0;
                for (int j = 0; j < QK / 2; j++) isum += (q[j] & 0x0F) * x[j] + (q[j] >> 4) * x[j + QK / 2];
                sum += half_to_float(wd[n * nb + b]) * a.xd[r * nb + b] * (float)isum;
                msum += half_to_float(wm[b * N + n]) * a.xs[r * nb + b];
            }
            y[r * N + n] = sum + msum;
        }
    }
}
#endif

/* Outputs n0..n1-1 of every row, from activations quantized into the scratch by fp_quantize_q8_1. */
void fp_q4_1_matmul(const void *scratch, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *wd,
                    const uint16_t *wm, int64_t n0, int64_t n1, int64_t N, float *y) {
    const int64_t nb = K / QK;
    acts a = view(scratch, M, K);
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int rows = (int)(M - r0 < ROWS ? M - r0 : ROWS);
        const acts t = {a.xq + r0 * K, a.xd + r0 * nb, a.xs + r0 * nb, a.xv + r0 * ((nb + 3) / 4) * 16};
        rows_tile(t, rows, K, qs, wd, wm, n0, n1, N, y + r0 * N);
    }
}

/* The reference: plain C over the natural order, from x itself (tests compare the vector paths to it). */
EXPORT void fp_q4_1_reference(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *wd,
                       const uint16_t *wm, int64_t N, float *y) {
    const int64_t nb = K / QK;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t n = 0; n < N; n++) {
            float sum = 0.0f, msum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const float *v = x + r * K + b * QK;
                float amax = 0.0f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
                const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                int isum = 0, qsum = 0;
                for (int j = 0; j < QK; j++) {
                    const int q = (int)lrintf(v[j] * id);
                    const uint8_t byte = qs[(n * nb + b) * 16 + j % 16];
                    isum += (j < 16 ? byte & 0x0F : byte >> 4) * q;
                    qsum += q;
                }
                sum += half_to_float(wd[n * nb + b]) * round_to_half(d) * (float)isum;
                msum += half_to_float(wm[b * N + n]) * round_to_half(d * (float)qsum);
            }
            y[r * N + n] = sum + msum;
        }
    }
}
