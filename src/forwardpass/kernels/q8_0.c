/* y = x @ W^T for ggml Q8_0 weights (the tied head), as llama.cpp's CPU backend computes it: the activations
 * quantized to 8 bits per block of 32 (ggml's Q8_0: d = max|x| / 127 kept as fp16, q = round(x / d)) and a
 * block's contribution d_w * d_x * sum(q_w * q_x), the sum exact in integers.
 *
 * Weights: qs (N, K) int8, GGUF's bytes without their scales (so the decoder's embedding rows are gathered from
 * the same table), d (N, K/32) fp16. As in q4_1.c, an output is computed in one fixed order whatever the number
 * of rows and wherever a thread's share of outputs starts.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define QK 32

typedef struct {
    int8_t *xq; /* (M, K) in element order */
    float *xd;  /* (M, K/32) */
    float *xp;  /* (M, K/64, 16): each pair of blocks' scales, each over its eight lanes */
} acts;

int64_t fp_q8_0_scratch_bytes(int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    return up64(M * K) + up64(M * nb * 4) + up64(M * (nb / 2) * 16 * 4) + 64;
}

static acts view(const void *scratch, int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    char *p = aligned(scratch);
    acts a;
    a.xq = take(&p, M * K);
    a.xd = take(&p, M * nb * 4);
    a.xp = take(&p, M * (nb / 2) * 16 * 4);
    return a;
}

/* Rows r0..r1-1 of x (M rows) float into the scratch as ggml's Q8_0, after the prologue p (NULL: none). */
void fp_quantize_q8_0(const float *x, const fp_prologue *p, int64_t r0, int64_t r1, int64_t M, int64_t K,
                      void *scratch) {
    const int64_t nb = K / QK;
    const acts a = view(scratch, M, K);
    for (int64_t r = r0; r < r1; r++) {
        const float *row = x + r * row_stride(p, K), scale = row_scale(p, row, K);
        for (int64_t b = 0; b < nb; b++) {
            float values[QK];
            const float *v = block_values(p, row, K, b, scale, values);
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            for (int j = 0; j < QK; j++) a.xq[r * K + b * QK + j] = (int8_t)lrintf(v[j] * id);
            const float dh = round_to_half(d);
            a.xd[r * nb + b] = dh;
            if (b < nb / 2 * 2)
                for (int j = 0; j < 8; j++) a.xp[(r * (nb / 2) + b / 2) * 16 + (b % 2) * 8 + j] = dh;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define ROWS 8

/* R activation rows x O consecutive outputs from n, over the pairs of blocks: each (row, output) vector of
 * partial sums into v[r][first + o] */
static inline __attribute__((always_inline)) void dots(acts a, const int R, const int O, int64_t K,
        const int8_t *qs, const uint16_t *wd, int64_t n, __m512 v[][16], int first) {
    const int64_t nb = K / QK, pairs = nb / 2;
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __mmask64 negative[4];
        __m512i magnitude[4];
        __m512 ws[4];
        for (int o = 0; o < O; o++) { /* u8 x s8 products: |w| times x with w's sign (exact: |q| <= 127) */
            const __m512i w = _mm512_loadu_si512((const void *)(qs + (n + o) * K + p * 64));
            negative[o] = _mm512_movepi8_mask(w);
            magnitude[o] = _mm512_abs_epi8(w);
            uint32_t two;
            memcpy(&two, wd + (n + o) * nb + 2 * p, sizeof two);
            ws[o] = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)two))));
        }
        for (int r = 0; r < R; r++) {
            const __m512i x = _mm512_loadu_si512((const void *)(a.xq + r * K + p * 64));
            const __m512 xs = _mm512_loadu_ps(a.xp + (r * pairs + p) * 16);
            for (int o = 0; o < O; o++) {
                const __m512i signed_x = _mm512_mask_sub_epi8(x, negative[o], _mm512_setzero_si512(), x);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude[o], signed_x);
                acc[r][o] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), xs), ws[o], acc[r][o]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) v[r][first + o] = acc[r][o];
}

/* outputs c0..c0+count-1 (count <= 16) of R rows, O at a time, into v */
static inline __attribute__((always_inline)) void outputs(acts a, const int R, const int O, int64_t K,
        const int8_t *qs, const uint16_t *wd, int64_t c0, int count, __m512 v[][16]) {
    int i = 0;
    for (; i + O <= count; i += O) dots(a, R, O, K, qs, wd, c0 + i, v, i);
    for (; i < count; i++) dots(a, R, 1, K, qs, wd, c0 + i, v, i);
}

static void rows_tile(acts a, int rows, int64_t K, const int8_t *qs, const uint16_t *wd, int64_t n0, int64_t n1,
                      int64_t N, float *y) {
    const int64_t nb = K / QK;
    for (int64_t c0 = n0; c0 < n1; c0 += 16) {
        const int count = (int)(n1 - c0 < 16 ? n1 - c0 : 16);
        __m512 v[ROWS][16];
#define OUTPUTS(R, O) outputs(a, R, O, K, qs, wd, c0, count, v)
        FP_BY_ROWS(rows, OUTPUTS);
#undef OUTPUTS
        for (int r = 0; r < rows; r++) {
            for (int j = count; j < 16; j++) v[r][j] = _mm512_setzero_ps();
            float sums[16];
            _mm512_storeu_ps(sums, sums16(v[r]));
            for (int i = 0; i < count; i++) {
                const int64_t n = c0 + i;
                float sum = sums[i];
                if (nb & 1) { /* an odd last block */
                    const int64_t b = nb - 1;
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + n * K + b * QK));
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(a.xq + r * K + b * QK));
                    const __m256i signed_x = _mm256_mask_sub_epi8(x, _mm256_movepi8_mask(w), _mm256_setzero_si256(), x);
                    const __m256 f = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w),
                                                                            signed_x));
                    __m128 h = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
                    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    h = _mm_add_ss(h, _mm_movehdup_ps(h));
                    sum += half_to_float(wd[n * nb + b]) * a.xd[r * nb + b] * _mm_cvtss_f32(h);
                }
                y[r * N + n] = sum;
            }
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#define ROWS 4

static void rows_tile(acts a, int rows, int64_t K, const int8_t *qs, const uint16_t *wd, int64_t n0, int64_t n1,
                      int64_t N, float *y) {
    const int64_t nb = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *q = qs + n * K;
        __m256 acc[ROWS];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q + b * QK));
            const __m256i magnitude = _mm256_sign_epi8(w, w);
            const float db = half_to_float(wd[n * nb + b]);
            for (int r = 0; r < rows; r++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a.xq + r * K + b * QK));
                /* |w| x sign(w) x: u8 x s8 pairs -> int16 (at most 2 * 128 * 127), then pairs -> int32 */
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w)), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(db * a.xd[r * nb + b]), acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[r * N + n] = _mm_cvtss_f32(h);
        }
    }
}

#else
#define ROWS 1

static void rows_tile(acts a, int rows, int64_t K, const int8_t *qs, const uint16_t *wd, int64_t n0, int64_t n1,
                      int64_t N, float *y) {
    const int64_t nb = K / QK;
    for (int64_t n = n0; n < n1; n++) {
        for (int r = 0; r < rows; r++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int isum = 0;
                for (int j = 0; j < QK; j++) isum += qs[n * K + b * QK + j] * a.xq[r * K + b * QK + j];
                sum += half_to_float(wd[n * nb + b]) * a.xd[r * nb + b] * (float)isum;
            }
            y[r * N + n] = sum;
        }
    }
}
#endif

/* Outputs n0..n1-1 of every row, from activations quantized into the scratch by fp_quantize_q8_0. */
void fp_q8_0_matmul(const void *scratch, int64_t M, int64_t K, const int8_t *qs, const uint16_t *wd, int64_t n0,
                    int64_t n1, int64_t N, float *y) {
    const int64_t nb = K / QK;
    const acts a = view(scratch, M, K);
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int rows = (int)(M - r0 < ROWS ? M - r0 : ROWS);
        const acts t = {a.xq + r0 * K, a.xd + r0 * nb, a.xp + r0 * (nb / 2) * 16};
        rows_tile(t, rows, K, qs, wd, n0, n1, N, y + r0 * N);
    }
}

/* The reference: plain C from x itself (tests compare the vector paths to it). */
__attribute__((visibility("default"))) void fp_q8_0_reference(const float *x, int64_t M, int64_t K,
                                                              const int8_t *qs, const uint16_t *wd, int64_t N,
                                                              float *y) {
    const int64_t nb = K / QK;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t n = 0; n < N; n++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const float *v = x + r * K + b * QK;
                float amax = 0.0f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
                const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                int isum = 0;
                for (int j = 0; j < QK; j++) isum += qs[n * K + b * QK + j] * (int)lrintf(v[j] * id);
                sum += half_to_float(wd[n * nb + b]) * round_to_half(d) * (float)isum;
            }
            y[r * N + n] = sum;
        }
    }
}
