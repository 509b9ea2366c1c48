/* forwardpass's kernels as ONNX Runtime custom ops (domain "forwardpass"), over ONNX Runtime's C ABI.
 *
 *   Q4_1MatMul(X float (..., K), qs uint8 (N, K/32, 16), d float16 (N, K/32), m float16 (K/32, N)
 *              [, norm float (K) [, residual float (..., N)]]) -> Y (..., N)
 *   Q8_0MatMul(X float (..., K), qs int8 (N, K), d float16 (N, K/32) [, norm float (K)]) -> Y (..., N)
 *       Y = f(X) @ W^T (+ residual). f: the rows as they are; RMSNorm with the weights `norm` (attribute epsilon,
 *       default 1e-5); or with attribute swiglu = 1 (Q4_1MatMul, no norm), X (..., 2K) and f = silu(first K) *
 *       last K. So a decoder layer is five nodes: qkv (norm), Attention, o (+ residual), gate|up (norm),
 *       down (swiglu, + residual): each node ONNX Runtime runs costs some microseconds whatever it computes.
 *   Attention(qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
 *       -> output, present_key, present_value       (GroupQueryAttention's inputs, outputs and attributes
 *          num_heads / kv_num_heads; present_* may be the same memory as past_*: the cache is then updated in place)
 *
 * ONNX Runtime's Python wheel ships no headers, so this file declares what it uses: the C API is a table of
 * function pointers that only ever grows (a function's slot never moves), handed over to RegisterCustomOps,
 * and a custom op is a struct of callbacks whose `version` says how many of its fields ONNX Runtime reads.
 * The slot numbers below are those of the C API's `OrtApi` table (onnxruntime_c_api.h); ParallelFor, the
 * newest used, exists since ONNX Runtime 1.17.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

#include "kernels.h"

int64_t fp_q8_1_scratch_bytes(int64_t M, int64_t K);
void fp_quantize_q8_1(const float *x, const fp_prologue *p, int64_t r0, int64_t r1, int64_t M, int64_t K,
                      void *scratch);
void fp_q4_1_matmul(const void *scratch, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *wd,
                    const uint16_t *wm, int64_t n0, int64_t n1, int64_t N, float *y);
int64_t fp_q8_0_scratch_bytes(int64_t M, int64_t K);
void fp_quantize_q8_0(const float *x, const fp_prologue *p, int64_t r0, int64_t r1, int64_t M, int64_t K,
                      void *scratch);
void fp_q8_0_matmul(const void *scratch, int64_t M, int64_t K, const int8_t *qs, const uint16_t *wd, int64_t n0,
                    int64_t n1, int64_t N, float *y);
typedef struct {
    const float *qkv;
    void *keys, *values;
    int half;
    const int32_t *seqlens;
    const float *cos, *sin;
    float *out;
    int64_t B, T, H, Hkv, S, D, P;
} fp_attention;
void fp_attention_store(const fp_attention *a, int64_t i);
void fp_attention_group(const fp_attention *a, int64_t i, float *scores);

typedef struct OrtStatus OrtStatus; /* ONNX Runtime's opaque types */
typedef struct OrtValue OrtValue;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtShape OrtShape; /* OrtTensorTypeAndShapeInfo */
typedef struct {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { API_VERSION = 17 };                  /* the oldest table with every slot below */
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 }; /* OrtErrorCode */
enum { FLOAT = 1, UINT8 = 2, INT8 = 3, INT32 = 6, FLOAT16 = 10 }; /* ONNXTensorElementDataType */

/* OrtApi slots */
enum {
    CREATE_STATUS = 0, GET_ERROR_MESSAGE = 2, CREATE_CUSTOM_OP_DOMAIN = 26, CUSTOM_OP_DOMAIN_ADD = 27, ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51, GET_TENSOR_ELEMENT_TYPE = 60, GET_DIMENSIONS_COUNT = 61, GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65, KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85, KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
    KERNEL_CONTEXT_GET_INPUT = 90, KERNEL_CONTEXT_GET_OUTPUT = 91, RELEASE_STATUS = 93,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99, KERNEL_CONTEXT_PARALLEL_FOR = 274,
};

static const void *const *api; /* the table, from RegisterCustomOps */
#define CALL(slot, type) ((type)api[slot])

static OrtStatus *error(int code, const char *message) {
    return CALL(CREATE_STATUS, OrtStatus *(*)(int, const char *))(code, message);
}

/* The custom op: the fields ONNX Runtime reads for version 16 (V2 kernels returning a status). */
typedef struct Op Op;
struct Op {
    uint32_t version;
    void *(*CreateKernel)(const Op *, const void *, const OrtKernelInfo *);
    const char *(*GetName)(const Op *);
    const char *(*GetExecutionProviderType)(const Op *);
    int (*GetInputType)(const Op *, size_t);
    size_t (*GetInputTypeCount)(const Op *);
    int (*GetOutputType)(const Op *, size_t);
    size_t (*GetOutputTypeCount)(const Op *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const Op *, size_t);
    int (*GetOutputCharacteristic)(const Op *, size_t);
    int (*GetInputMemoryType)(const Op *, size_t);
    int (*GetVariadicInputMinArity)(const Op *);
    int (*GetVariadicInputHomogeneity)(const Op *);
    int (*GetVariadicOutputMinArity)(const Op *);
    int (*GetVariadicOutputHomogeneity)(const Op *);
    OrtStatus *(*CreateKernelV2)(const Op *, const void *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
};

/* An input tensor: its data, element type and shape (up to 8 dimensions). */
typedef struct {
    void *data;
    int type;
    size_t rank;
    int64_t dims[8];
} Tensor;

/* Input `index`; a missing one is an error unless `optional` (then t->data is NULL). */
static OrtStatus *read_input(OrtKernelContext *context, size_t index, Tensor *t, int optional) {
    const OrtValue *value = NULL;
    OrtShape *shape = NULL;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t,
                                                                      const OrtValue **))(context, index, &value);
    if (status) return status;
    t->data = NULL;
    if (!value && optional) return NULL;
    if (!value) return error(ORT_INVALID_ARGUMENT, "forwardpass kernel: an input is missing");
    if ((status = CALL(GET_TENSOR_TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, OrtShape **))(value, &shape)))
        return status;
    status = CALL(GET_DIMENSIONS_COUNT, OrtStatus *(*)(const OrtShape *, size_t *))(shape, &t->rank);
    if (!status && t->rank > 8) status = error(ORT_INVALID_ARGUMENT, "forwardpass kernel: more than 8 dimensions");
    if (!status) status = CALL(GET_DIMENSIONS, OrtStatus *(*)(const OrtShape *, int64_t *, size_t))(shape, t->dims, t->rank);
    if (!status) status = CALL(GET_TENSOR_ELEMENT_TYPE, OrtStatus *(*)(const OrtShape *, int *))(shape, &t->type);
    CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(OrtShape *))(shape);
    if (!status) status = CALL(GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(OrtValue *, void **))((OrtValue *)value, &t->data);
    return status;
}

static OrtStatus *input(OrtKernelContext *context, size_t index, Tensor *t) { return read_input(context, index, t, 0); }

typedef struct {
    int q8_0; /* Q8_0MatMul, else Q4_1MatMul */
    const float *x;
    fp_prologue pro;
    void *scratch;
    const void *qs;
    const uint16_t *d, *m;
    const float *residual; /* added to Y, or NULL */
    int64_t M, K, N;
    float *y;
} Work;

enum { OUTPUTS_PER_TASK = 16, ROWS_PER_TASK = 4 };

static void quantize_task(void *arg, size_t i) {
    const Work *w = arg;
    const int64_t r0 = (int64_t)i * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < w->M ? r0 + ROWS_PER_TASK : w->M;
    (w->q8_0 ? fp_quantize_q8_0 : fp_quantize_q8_1)(w->x, &w->pro, r0, r1, w->M, w->K, w->scratch);
}

static void matmul_task(void *arg, size_t i) {
    const Work *w = arg;
    const int64_t n0 = (int64_t)i * OUTPUTS_PER_TASK, n1 = n0 + OUTPUTS_PER_TASK < w->N ? n0 + OUTPUTS_PER_TASK : w->N;
    if (w->q8_0)
        fp_q8_0_matmul(w->scratch, w->M, w->K, w->qs, w->d, n0, n1, w->N, w->y);
    else
        fp_q4_1_matmul(w->scratch, w->M, w->K, w->qs, w->d, w->m, n0, n1, w->N, w->y);
    if (w->residual)
        for (int64_t r = 0; r < w->M; r++)
            for (int64_t n = n0; n < n1; n++) w->y[r * w->N + n] += w->residual[r * w->N + n];
}

static OrtStatus *parallel(OrtKernelContext *context, void (*task)(void *, size_t), size_t total, Work *w) {
    return CALL(KERNEL_CONTEXT_PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t),
                                                             size_t, size_t, void *))(context, task, total, 0, w);
}

/* Y = f(X) @ W^T (+ residual): activations quantized (in parallel over rows when there are many), then outputs in
 * parallel. dims: Y's shape (rank of X). */
static OrtStatus *linear(OrtKernelContext *context, Work *w, const int64_t *dims, size_t rank) {
    OrtValue *out = NULL;
    OrtStatus *status;
    if ((status = CALL(KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t,
                                                                OrtValue **))(context, 0, dims, rank, &out)) ||
        (status = CALL(GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(OrtValue *, void **))(out, (void **)&w->y)))
        return status;
    if (w->M == 0 || w->N == 0) return NULL;
    /* the quantized activations: a buffer kept per calling thread, grown as needed */
    static _Thread_local void *buffer;
    static _Thread_local int64_t capacity;
    const int64_t need = (w->q8_0 ? fp_q8_0_scratch_bytes : fp_q8_1_scratch_bytes)(w->M, w->K);
    if (need > capacity) {
        free(buffer);
        capacity = 0;
        if (!(buffer = malloc((size_t)need))) return error(ORT_FAIL, "forwardpass kernel: out of memory");
        capacity = need;
    }
    w->scratch = buffer;
    if (w->M <= ROWS_PER_TASK) {
        quantize_task(w, 0);
    } else if ((status = parallel(context, quantize_task, (size_t)((w->M + ROWS_PER_TASK - 1) / ROWS_PER_TASK), w))) {
        return status;
    }
    return parallel(context, matmul_task, (size_t)((w->N + OUTPUTS_PER_TASK - 1) / OUTPUTS_PER_TASK), w);
}

/* A linear's attributes: epsilon (RMSNorm's, float) and swiglu (int); either may be absent. */
typedef struct {
    float epsilon;
    int64_t swiglu;
} LinearKernel;

static void optional_attribute(OrtStatus *status) { /* a missing attribute: its default stays */
    if (status) CALL(RELEASE_STATUS, void (*)(OrtStatus *))(status);
}

static OrtStatus *create_linear(const Op *op, const void *table, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)table;
    LinearKernel *k = malloc(sizeof *k);
    if (!k) return error(ORT_FAIL, "forwardpass kernel: out of memory");
    k->epsilon = 1e-5f;
    k->swiglu = 0;
    optional_attribute(CALL(KERNEL_INFO_GET_ATTRIBUTE_FLOAT, OrtStatus *(*)(const OrtKernelInfo *, const char *,
                                                                           float *))(info, "epsilon", &k->epsilon));
    optional_attribute(CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *,
                                                                           int64_t *))(info, "swiglu", &k->swiglu));
    if (k->swiglu != 0 && k->swiglu != 1) {
        free(k);
        return error(ORT_INVALID_ARGUMENT, "forwardpass linear: the swiglu attribute must be 0 or 1");
    }
    *kernel = k;
    return NULL;
}

static void destroy_linear(void *kernel) { free(kernel); }

/* X's rows (M), the linear's K (X's last dimension, half of it for swiglu) and Y's dims; the norm and residual
 * inputs checked against them. 0, or an error message written into `message`. */
static int linear_shapes(const Tensor *x, const Tensor *norm, const Tensor *residual, int swiglu, int64_t N,
                         Work *w, int64_t *dims, char *message, size_t size, const char *op) {
    const int64_t last = x->rank ? x->dims[x->rank - 1] : 0;
    w->K = swiglu ? last / 2 : last;
    w->M = 1;
    for (size_t i = 0; i + 1 < x->rank; i++) w->M *= (dims[i] = x->dims[i]);
    dims[x->rank ? x->rank - 1 : 0] = N;
    if (norm->data && (norm->type != FLOAT || norm->rank != 1 || norm->dims[0] != w->K)) {
        snprintf(message, size, "%s: expected norm float (%lld), the input's width; got rank %zu, length %lld", op,
                 (long long)w->K, norm->rank, (long long)(norm->rank ? norm->dims[0] : 0));
        return 1;
    }
    if (residual->data) {
        int same = residual->type == FLOAT && residual->rank == x->rank;
        for (size_t i = 0; same && i < x->rank; i++) same = residual->dims[i] == dims[i];
        if (!same) {
            snprintf(message, size, "%s: expected residual float of the output's shape (..., %lld)", op, (long long)N);
            return 1;
        }
    }
    if (swiglu && norm->data) {
        snprintf(message, size, "%s: swiglu and norm together are not supported", op);
        return 1;
    }
    return 0;
}

static OrtStatus *q4_1_compute(void *kernel, OrtKernelContext *context) {
    const LinearKernel *k = kernel;
    Tensor x, qs, d, m, norm, residual;
    OrtStatus *status;
    if ((status = input(context, 0, &x)) || (status = input(context, 1, &qs)) || (status = input(context, 2, &d)) ||
        (status = input(context, 3, &m)) || (status = read_input(context, 4, &norm, 1)) ||
        (status = read_input(context, 5, &residual, 1)))
        return status;
    char message[256];
    const int64_t last = x.rank ? x.dims[x.rank - 1] : 0, K = k->swiglu ? last / 2 : last;
    const int64_t N = qs.rank == 3 ? qs.dims[0] : 0, nb = K / 32;
    if (x.type != FLOAT || x.rank < 1 || K % 32 || (k->swiglu && last % 2) || qs.type != UINT8 || qs.rank != 3 ||
        qs.dims[1] != nb || qs.dims[2] != 16 || d.type != FLOAT16 || d.rank != 2 || d.dims[0] != N ||
        d.dims[1] != nb || m.type != FLOAT16 || m.rank != 2 || m.dims[0] != nb || m.dims[1] != N) {
        snprintf(message, sizeof message, "Q4_1MatMul: expected X float (..., K) (2K with swiglu) with K a multiple "
                 "of 32, qs uint8 (N, K/32, 16), d float16 (N, K/32), m float16 (K/32, N); got K = %lld, qs of rank %zu",
                 (long long)K, qs.rank);
        return error(ORT_INVALID_ARGUMENT, message);
    }
    Work w = {0, x.data, {norm.data, k->epsilon, (int)k->swiglu}, NULL, qs.data, d.data, m.data, residual.data,
              0, 0, N, NULL};
    int64_t dims[8];
    if (linear_shapes(&x, &norm, &residual, (int)k->swiglu, N, &w, dims, message, sizeof message, "Q4_1MatMul"))
        return error(ORT_INVALID_ARGUMENT, message);
    return linear(context, &w, dims, x.rank);
}

static OrtStatus *q8_0_compute(void *kernel, OrtKernelContext *context) {
    const LinearKernel *k = kernel;
    Tensor x, qs, d, norm, residual = {0};
    OrtStatus *status;
    if ((status = input(context, 0, &x)) || (status = input(context, 1, &qs)) || (status = input(context, 2, &d)) ||
        (status = read_input(context, 3, &norm, 1)))
        return status;
    char message[256];
    if (k->swiglu)
        return error(ORT_INVALID_ARGUMENT, "Q8_0MatMul: the swiglu attribute is Q4_1MatMul's only");
    const int64_t K = x.rank ? x.dims[x.rank - 1] : 0, N = qs.rank == 2 ? qs.dims[0] : 0;
    if (x.type != FLOAT || x.rank < 1 || K % 32 || qs.type != INT8 || qs.rank != 2 || qs.dims[1] != K ||
        d.type != FLOAT16 || d.rank != 2 || d.dims[0] != N || d.dims[1] != K / 32) {
        snprintf(message, sizeof message, "Q8_0MatMul: expected X float (..., K) with K a multiple of 32, qs int8 "
                 "(N, K), d float16 (N, K/32); got K = %lld, qs of rank %zu", (long long)K, qs.rank);
        return error(ORT_INVALID_ARGUMENT, message);
    }
    Work w = {1, x.data, {norm.data, k->epsilon, 0}, NULL, qs.data, d.data, NULL, NULL, 0, K, N, NULL};
    int64_t dims[8];
    if (linear_shapes(&x, &norm, &residual, 0, N, &w, dims, message, sizeof message, "Q8_0MatMul"))
        return error(ORT_INVALID_ARGUMENT, message);
    return linear(context, &w, dims, x.rank);
}

static const char *q4_1_name(const Op *op) { (void)op; return "Q4_1MatMul"; }
static const char *cpu(const Op *op) { (void)op; return NULL; } /* NULL: the CPU execution provider */
static int q4_1_input_type(const Op *op, size_t i) {
    (void)op;
    return i == 0 || i >= 4 ? FLOAT : i == 1 ? UINT8 : FLOAT16;
}
static size_t six(const Op *op) { (void)op; return 6; }
static size_t four(const Op *op) { (void)op; return 4; }
static int float_type(const Op *op, size_t i) { (void)op; (void)i; return FLOAT; }
static size_t one(const Op *op) { (void)op; return 1; }
static size_t three(const Op *op) { (void)op; return 3; }
static int required(const Op *op, size_t i) { (void)op; (void)i; return 0; } /* INPUT_OUTPUT_REQUIRED */
static int q4_1_input_kind(const Op *op, size_t i) { (void)op; return i >= 4; } /* 1: INPUT_OUTPUT_OPTIONAL */
static int q8_0_input_kind(const Op *op, size_t i) { (void)op; return i >= 3; }
static int default_memory(const Op *op, size_t i) { (void)op; (void)i; return 0; } /* OrtMemTypeDefault */
static int zero(const Op *op) { (void)op; return 0; }

/* A custom op of the V2 kind (version 16): its name, input types, count and which are optional (input_kind),
 * output types and count, kernel callbacks; every output required, all in CPU memory. */
#define OP(name, input_type, inputs, input_kind, output_type, outputs, create, destroy, compute)                \
    {                                                                                                            \
        .version = 16, .GetName = name, .GetExecutionProviderType = cpu, .GetInputType = input_type,               \
        .GetInputTypeCount = inputs, .GetOutputType = output_type, .GetOutputTypeCount = outputs,                  \
        .KernelDestroy = destroy, .GetInputCharacteristic = input_kind, .GetOutputCharacteristic = required,       \
        .GetInputMemoryType = default_memory, .GetVariadicInputMinArity = zero, .GetVariadicInputHomogeneity = zero, \
        .GetVariadicOutputMinArity = zero, .GetVariadicOutputHomogeneity = zero, .CreateKernelV2 = create,          \
        .KernelComputeV2 = compute,                                                                              \
    }

static const Op q4_1_op = OP(q4_1_name, q4_1_input_type, six, q4_1_input_kind, float_type, one,
        create_linear, destroy_linear, q4_1_compute);

static const char *q8_0_name(const Op *op) { (void)op; return "Q8_0MatMul"; }
static int q8_0_input_type(const Op *op, size_t i) {
    (void)op;
    return i == 0 || i == 3 ? FLOAT : i == 1 ? INT8 : FLOAT16;
}

static const Op q8_0_op = OP(q8_0_name, q8_0_input_type, four, q8_0_input_kind, float_type, one,
        create_linear, destroy_linear, q8_0_compute);

/* -- Attention ------------------------------------------------------------------------------------------------ */

typedef struct {
    int64_t heads, kv_heads;
} AttentionKernel;

static OrtStatus *create_attention(const Op *op, const void *table, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)table;
    AttentionKernel *k = malloc(sizeof *k);
    if (!k) return error(ORT_FAIL, "Attention: out of memory");
    OrtStatus *status;
    typedef OrtStatus *(*attribute)(const OrtKernelInfo *, const char *, int64_t *);
    if ((status = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attribute)(info, "num_heads", &k->heads)) ||
        (status = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attribute)(info, "kv_num_heads", &k->kv_heads))) {
        free(k);
        return status;
    }
    if (k->heads <= 0 || k->kv_heads <= 0 || k->heads % k->kv_heads) {
        free(k);
        return error(ORT_INVALID_ARGUMENT, "Attention: num_heads must be a positive multiple of kv_num_heads");
    }
    *kernel = k;
    return NULL;
}

static void destroy_attention(void *kernel) { free(kernel); }

static void store_task(void *arg, size_t i) { fp_attention_store(arg, (int64_t)i); }

static void group_task(void *arg, size_t i) {
    const fp_attention *a = arg;
    const int64_t G = a->H / a->Hkv, room = G * a->S;
    float local[16384]; /* the group's attention weights: on the stack up to 16384 (3 heads x 5461 positions) */
    float *scores = room <= 16384 ? local : malloc((size_t)room * sizeof(float));
    if (!scores) { /* out of memory: the group's output becomes NaN, which the decoder's callers refuse */
        const int64_t g = (int64_t)i % a->Hkv, row = (int64_t)i / a->Hkv;
        for (int64_t d = 0; d < G * a->D; d++) a->out[row * a->H * a->D + g * G * a->D + d] = NAN;
        return;
    }
    fp_attention_group(a, (int64_t)i, scores);
    if (scores != local) free(scores);
}

/* present = past's memory when they are bound to one buffer; otherwise a copy of past, then updated */
static OrtStatus *cache_output(OrtKernelContext *context, size_t index, const Tensor *past, void **cache) {
    OrtValue *value = NULL;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *,
                                                                      size_t, OrtValue **))(context, index, past->dims,
                                                                                            past->rank, &value);
    if (status || (status = CALL(GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(OrtValue *, void **))(value, cache)))
        return status;
    if (*cache != past->data) {
        size_t count = 1;
        for (size_t i = 0; i < past->rank; i++) count *= (size_t)past->dims[i];
        if (count) memcpy(*cache, past->data, count * (past->type == FLOAT16 ? 2 : 4));
    }
    return NULL;
}

static OrtStatus *attention_compute(void *kernel, OrtKernelContext *context) {
    const AttentionKernel *k = kernel;
    Tensor qkv, pk, pv, seqlens, total, cos, sin;
    OrtStatus *status;
    if ((status = input(context, 0, &qkv)) || (status = input(context, 1, &pk)) || (status = input(context, 2, &pv)) ||
        (status = input(context, 3, &seqlens)) || (status = input(context, 4, &total)) ||
        (status = input(context, 5, &cos)) || (status = input(context, 6, &sin)))
        return status;
    char message[320];
    const int64_t H = k->heads, Hkv = k->kv_heads;
    const int shapes = qkv.type == FLOAT && qkv.rank == 3 && (pk.type == FLOAT || pk.type == FLOAT16) &&
                       pk.rank == 4 && pv.type == pk.type &&
                       pv.rank == 4 && seqlens.type == INT32 && seqlens.rank == 1 && cos.type == FLOAT && cos.rank == 2 &&
                       sin.type == FLOAT && sin.rank == 2;
    const int64_t B = shapes ? qkv.dims[0] : 0, T = shapes ? qkv.dims[1] : 0, D = shapes ? pk.dims[3] : 0;
    if (!shapes || pk.dims[0] != B || pk.dims[1] != Hkv || D % 2 || D > 256 || D <= 0 || H / Hkv * D > 16 * 256 ||
        qkv.dims[2] != (H + 2 * Hkv) * D || seqlens.dims[0] != B || cos.dims[1] != D / 2 || sin.dims[0] != cos.dims[0] ||
        sin.dims[1] != D / 2 || pv.dims[0] != B || pv.dims[1] != Hkv || pv.dims[2] != pk.dims[2] || pv.dims[3] != D) {
        snprintf(message, sizeof message, "Attention: expected qkv float (B, T, (%lld + 2 x %lld) D), past key/value "
                 "float or float16 (B, %lld, S, D) with D even and at most 256 (and at most 4096 query values a group), seqlens_k int32 (B), cos/sin caches (P, D/2)",
                 (long long)H, (long long)Hkv, (long long)Hkv);
        return error(ORT_INVALID_ARGUMENT, message);
    }
    fp_attention a = {qkv.data, NULL, NULL, pk.type == FLOAT16, seqlens.data, cos.data, sin.data, NULL, B, T, H, Hkv,
                      pk.dims[2], D, cos.dims[0]};
    for (int64_t b = 0; b < B; b++) {
        const int64_t last = a.seqlens[b];
        if (last + 1 - T < 0 || last >= a.S || last >= a.P) {
            snprintf(message, sizeof message, "Attention: row %lld ends at position %lld with %lld new tokens; the "
                     "cache holds %lld positions and the rotary caches %lld", (long long)b, (long long)last,
                     (long long)T, (long long)a.S, (long long)a.P);
            return error(ORT_INVALID_ARGUMENT, message);
        }
    }
    const int64_t out_dims[3] = {B, T, H * D};
    OrtValue *out = NULL;
    if ((status = CALL(KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t,
                                                                OrtValue **))(context, 0, out_dims, 3, &out)) ||
        (status = CALL(GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(OrtValue *, void **))(out, (void **)&a.out)) ||
        (status = cache_output(context, 1, &pk, &a.keys)) || (status = cache_output(context, 2, &pv, &a.values)))
        return status;
    if (B == 0 || T == 0) return NULL;
    typedef OrtStatus *(*parallel_for)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);
    if ((status = CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for)(context, store_task, (size_t)(B * T * Hkv), 0, &a)))
        return status;
    return CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for)(context, group_task, (size_t)(B * T * Hkv), 0, &a);
}

static const char *attention_name(const Op *op) { (void)op; return "Attention"; }
/* two registrations of one op: caches of float, or of float16 (as llama.cpp keeps them: half the bytes) */
static int attention_input_type(const Op *op, size_t i) { (void)op; return i == 3 || i == 4 ? INT32 : FLOAT; }
static int attention16_input_type(const Op *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? INT32 : i == 1 || i == 2 ? FLOAT16 : FLOAT;
}
static int attention16_output_type(const Op *op, size_t i) { (void)op; return i ? FLOAT16 : FLOAT; }
static size_t seven(const Op *op) { (void)op; return 7; }

static const Op attention_op = OP(attention_name, attention_input_type, seven, required, float_type, three,
        create_attention, destroy_attention, attention_compute);

static const Op attention16_op = OP(attention_name, attention16_input_type, seven, required, attention16_output_type, three,
        create_attention, destroy_attention, attention_compute);

/* One domain for the process, made once (sessions may be created from several threads) and never released:
 * sessions keep using it. A failure to make it is kept and reported to every later registration. */
static OrtCustomOpDomain *domain;
static OrtStatus *domain_failure;
static pthread_once_t domain_once = PTHREAD_ONCE_INIT;

static void make_domain(void) {
    OrtCustomOpDomain *made = NULL;
    typedef OrtStatus *(*add)(OrtCustomOpDomain *, const void *);
    OrtStatus *status = CALL(CREATE_CUSTOM_OP_DOMAIN, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("forwardpass",
                                                                                                          &made);
    if (!status && !((status = CALL(CUSTOM_OP_DOMAIN_ADD, add)(made, &q4_1_op)) ||
                     (status = CALL(CUSTOM_OP_DOMAIN_ADD, add)(made, &q8_0_op)) ||
                     (status = CALL(CUSTOM_OP_DOMAIN_ADD, add)(made, &attention_op)) ||
                     (status = CALL(CUSTOM_OP_DOMAIN_ADD, add)(made, &attention16_op))))
        domain = made;
    domain_failure = status;
}

EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const void *const *table = base->GetApi(API_VERSION); /* the same table every call */
    if (!table) return NULL; /* an ONNX Runtime older than 1.17: the session then reports the unknown op */
    api = table;
    pthread_once(&domain_once, make_domain);
    if (!domain) {
        const char *why = domain_failure ? CALL(GET_ERROR_MESSAGE, const char *(*)(const OrtStatus *))(domain_failure)
                                         : "unknown";
        char message[512];
        snprintf(message, sizeof message, "forwardpass kernels: the custom-op domain could not be made: %s", why);
        return error(ORT_FAIL, message);
    }
    return CALL(ADD_CUSTOM_OP_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
