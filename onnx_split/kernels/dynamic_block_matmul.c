/*
 * onnx_split.DynamicBlockMatMul: y = sum over the kept input blocks b of x[:, b] @ W[b, :] (+ bias),
 * a CPU kernel for ONNX Runtime, loaded with SessionOptions.register_custom_ops_library.
 *
 * Inputs:  X [..., K] float32, W [K, N] float32 (read in place: only the kept rows are touched),
 *          S [ceil(K / block)] float32 (per-block scale of the score, e.g. the block's weight norm),
 *          optional bias [N] float32, optional C [ceil(K / block), N] float32 (what each skipped
 *          block adds instead of nothing: its calibrated mean contribution).
 * Output:  Y [..., N] float32.
 * Attributes: block (int, features per block), rule (0: keep the `keep` best blocks, 1: keep every
 *          block whose score exceeds `threshold`), keep (int), threshold (float).
 * The score of block b is the root mean square over the call's rows of ||x_b||_2, times S[b]: one
 * set of blocks is kept for the whole batch, and a threshold calibrated one row per call applies to
 * any batch size. Ties in the top-k rule keep the lower block index.
 *
 * This file declares only the parts of the ONNX Runtime C API it uses, written from the documented,
 * versioned ABI: OrtGetApiBase()->GetApi(version) returns a table of function pointers whose order
 * never changes once a version has shipped, and a custom op is a struct of function pointers that
 * starts with its own version number. No ONNX Runtime header is needed to build it.
 *
 * The row kernel is chosen at load time from the CPU's features (AVX2 + FMA, else plain C); the
 * kernel object is read-only after creation, so concurrent Run() calls on one session are safe.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* ---- the ONNX Runtime C API, as much of it as this kernel uses ------------------------------- */

#define API_VERSION 16 /* CreateKernelV2 / KernelComputeV2 (status returns) exist from version 16 */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi; /* opaque here: used as a table of function pointers */
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;

typedef struct {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };          /* OrtErrorCode */
enum { ELEMENT_FLOAT = 1 };                                 /* ONNXTensorElementDataType */
enum { IO_REQUIRED = 0, IO_OPTIONAL = 1 };                  /* OrtCustomOpInputOutputCharacteristic */

/* positions in the OrtApi table (stable since the version in brackets) */
enum {
  API_CreateStatus = 0,                   /* [1] */
  API_CreateCustomOpDomain = 26,          /* [1] */
  API_CustomOpDomain_Add = 27,            /* [1] */
  API_AddCustomOpDomain = 28,             /* [1] */
  API_GetTensorMutableData = 51,          /* [1] */
  API_GetTensorElementType = 60,          /* [1] */
  API_GetDimensionsCount = 61,            /* [1] */
  API_GetDimensions = 62,                 /* [1] */
  API_GetTensorTypeAndShape = 65,         /* [1] */
  API_KernelInfoGetAttribute_float = 85,  /* [1] */
  API_KernelInfoGetAttribute_int64 = 86,  /* [1] */
  API_KernelContext_GetInputCount = 88,   /* [1] */
  API_KernelContext_GetInput = 90,        /* [1] */
  API_KernelContext_GetOutput = 91,       /* [1] */
  API_ReleaseStatus = 93,                 /* [1] */
  API_ReleaseTensorTypeAndShapeInfo = 99, /* [1] */
};

typedef OrtStatus *(*fn_CreateStatus)(int code, const char *msg);
typedef OrtStatus *(*fn_CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*fn_CustomOpDomain_Add)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*fn_AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*fn_GetTensorMutableData)(OrtValue *value, void **out);
typedef OrtStatus *(*fn_GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*fn_GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*fn_GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*fn_GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*fn_GetAttribute_float)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*fn_GetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*fn_GetInputCount)(const OrtKernelContext *context, size_t *out);
typedef OrtStatus *(*fn_GetInput)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*fn_GetOutput)(OrtKernelContext *context, size_t index, const int64_t *dims, size_t n,
                                   OrtValue **out);
typedef void (*fn_ReleaseStatus)(OrtStatus *status);
typedef void (*fn_ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);

static const OrtApi *g_api;
#define CALL(name) ((fn_##name)(((void *const *)g_api)[API_##name]))
#define CALL_AS(type, name) ((type)(((void *const *)g_api)[API_##name]))

/* The custom op: a version, then function pointers in the documented order. Fields past the
 * version this op declares are never read by ORT; the rest stay NULL here. */
typedef struct CustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct CustomOp *op);
  const char *(*GetExecutionProviderType)(const struct CustomOp *op);
  int (*GetInputType)(const struct CustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct CustomOp *op);
  int (*GetOutputType)(const struct CustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct CustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
  int (*GetVariadicInputMinArity)(const struct CustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
  void *later[9]; /* fields of later op versions: never read at version 16 */
} CustomOp;

/* ---- the row kernels ------------------------------------------------------------------------ */

/* y[m, n0:n0+nt] += sum_r x[m, rows[r]] * W[rows[r], n0:n0+nt] for the kept rows, in groups of 4. */
typedef void (*accumulate_fn)(const float *x, int64_t m_rows, int64_t k, const float *w, int64_t n,
                              const int64_t *rows, int64_t n_rows, float *y);

static int64_t tile_width(int64_t m_rows, int64_t n) {
  /* one row: the whole output row (it stays in L1 while the kept rows of W stream through it, each
   * block of rows one contiguous run of memory); more rows: an output tile of about 16 kB, so the
   * tile and the 4 row segments of W it meets stay in L1 */
  if (m_rows <= 1) return n;
  int64_t width = (4096 / m_rows) & ~(int64_t)15;
  if (width < 64) width = 64;
  return width < n ? width : n;
}

static void accumulate_plain(const float *x, int64_t m_rows, int64_t k, const float *w, int64_t n,
                             const int64_t *rows, int64_t n_rows, float *y) {
  int64_t width = tile_width(m_rows, n);
  for (int64_t n0 = 0; n0 < n; n0 += width) {
    int64_t nt = n - n0 < width ? n - n0 : width;
    int64_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
      const float *w0 = w + rows[r] * n + n0, *w1 = w + rows[r + 1] * n + n0;
      const float *w2 = w + rows[r + 2] * n + n0, *w3 = w + rows[r + 3] * n + n0;
      for (int64_t m = 0; m < m_rows; m++) {
        const float *xm = x + m * k;
        float a = xm[rows[r]], b = xm[rows[r + 1]], c = xm[rows[r + 2]], d = xm[rows[r + 3]];
        float *ym = y + m * n + n0;
        for (int64_t j = 0; j < nt; j++) ym[j] += a * w0[j] + b * w1[j] + c * w2[j] + d * w3[j];
      }
    }
    for (; r < n_rows; r++) {
      const float *w0 = w + rows[r] * n + n0;
      for (int64_t m = 0; m < m_rows; m++) {
        float a = x[m * k + rows[r]];
        float *ym = y + m * n + n0;
        for (int64_t j = 0; j < nt; j++) ym[j] += a * w0[j];
      }
    }
  }
}

#ifdef HAVE_X86
/* Four rows of x or more. The output is cut into column panels small enough that the panel of y
 * (m_rows x width floats, at most 128 kB) and a chunk of 16 kept rows of W's panel stay in L2. Each
 * chunk is first streamed in from memory row by row (a block of kept rows is one contiguous run, so
 * this is sequential), then every row of x meets it, 4 rows at a time with a 4 x 16 block of y in
 * 8 registers. xk holds the kept columns of x, row by row of W. W is read in place, never copied. */
__attribute__((target("avx2,fma")))
static void accumulate_avx2_blocked(const float *xk, int64_t m_rows, const float *w, int64_t n,
                                    const int64_t *rows, int64_t n_rows, float *y, float *stage) {
  enum { RC = 16 };
  /* Fewer than 12 rows: chunks of 8 rows of W read in place (rows of W are often a multiple of
   * 4 kB apart, so 16 of them would share one set of the 8-way L1 and evict each other between
   * the passes of the rows of x) through a 4 x 24 tile; panels a multiple of 24 columns. 12 rows
   * or more: chunks of 16 rows staged at a padded pitch, through a 4 x 16 tile. Either way this
   * chunk and the next one prefetched stay well inside L2. */
  int64_t chunk = stage ? RC : 8;
  int64_t width = stage ? (32768 / m_rows) & ~(int64_t)15 : (32768 / m_rows) / 48 * 48;
  if (width > 2016) width = 2016;
  if (width < 64) width = 64;
  if (width > n) width = n;
  int64_t pitch = width + 16; /* staged rows 64 bytes apart from a multiple of 4 kB: no L1 set conflicts */
  for (int64_t n0 = 0; n0 < n; n0 += width) {
    int64_t nt = n - n0 < width ? n - n0 : width;
    for (int64_t r = 0; r < (n_rows < chunk ? n_rows : chunk); r++) { /* bring the first chunk in */
      const char *start = (const char *)(w + rows[r] * n + n0);
      for (int64_t off = 0; off < nt * 4; off += 64) _mm_prefetch(start + off, _MM_HINT_T1);
    }
    for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
      int64_t rc = n_rows - r0 < chunk ? n_rows - r0 : chunk;
      const float *src[RC];
      for (int64_t r = 0; r < rc; r++) src[r] = w + rows[r0 + r] * n + n0;
      /* the next chunk of this panel is fetched while this one computes, one line per row per
       * 16 columns, so memory and arithmetic overlap */
      const float *next[RC];
      int64_t rn = n_rows - (r0 + chunk);
      rn = rn < 0 ? 0 : (rn < chunk ? rn : chunk);
      for (int64_t r = 0; r < rn; r++) next[r] = w + rows[r0 + chunk + r] * n + n0;
      if (stage) { /* many rows of x meet this chunk: stage it once where every load hits L1 */
        for (int64_t r = 0; r < rc; r++) {
          memcpy(stage + r * pitch, src[r], sizeof(float) * nt);
          src[r] = stage + r * pitch;
        }
      }
      int64_t j = 0;
      for (; !stage && j + 24 <= nt; j += 24) { /* 4 rows x 24 columns: 12 accumulators, 3 loads of W per 4 broadcasts */
        for (int64_t r = 0; r < rn; r++) {
          _mm_prefetch((const char *)(next[r] + j), _MM_HINT_T1);
          _mm_prefetch((const char *)(next[r] + j + 16), _MM_HINT_T1);
        }
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4) {
          __m256 acc[12];
          for (int t = 0; t < 12; t++) acc[t] = _mm256_setzero_ps();
          const float *xr = xk + r0 * m_rows + m;
          for (int64_t r = 0; r < rc; r++, xr += m_rows) {
            const float *wr = src[r] + j;
            __m256 w0 = _mm256_loadu_ps(wr), w1 = _mm256_loadu_ps(wr + 8), w2 = _mm256_loadu_ps(wr + 16);
            for (int i = 0; i < 4; i++) {
              __m256 p = _mm256_broadcast_ss(xr + i);
              acc[3 * i] = _mm256_fmadd_ps(p, w0, acc[3 * i]);
              acc[3 * i + 1] = _mm256_fmadd_ps(p, w1, acc[3 * i + 1]);
              acc[3 * i + 2] = _mm256_fmadd_ps(p, w2, acc[3 * i + 2]);
            }
          }
          for (int i = 0; i < 4; i++) {
            float *yi = y + (m + i) * n + n0 + j;
            for (int t = 0; t < 3; t++)
              _mm256_storeu_ps(yi + 8 * t, _mm256_add_ps(_mm256_loadu_ps(yi + 8 * t), acc[3 * i + t]));
          }
        }
        for (; m < m_rows; m++) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0;
          for (int64_t r = 0; r < rc; r++) {
            const float *wr = src[r] + j;
            __m256 p = _mm256_broadcast_ss(xk + (r0 + r) * m_rows + m);
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(wr), a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(wr + 8), a1);
            a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(wr + 16), a2);
          }
          float *y0 = y + m * n + n0 + j;
          _mm256_storeu_ps(y0, _mm256_add_ps(_mm256_loadu_ps(y0), a0));
          _mm256_storeu_ps(y0 + 8, _mm256_add_ps(_mm256_loadu_ps(y0 + 8), a1));
          _mm256_storeu_ps(y0 + 16, _mm256_add_ps(_mm256_loadu_ps(y0 + 16), a2));
        }
      }
      for (; j + 16 <= nt; j += 16) { /* what is left of the panel, 16 columns at a time */
        for (int64_t r = 0; r < rn; r++) _mm_prefetch((const char *)(next[r] + j), _MM_HINT_T1);
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
          const float *xr = xk + r0 * m_rows + m;
          for (int64_t r = 0; r < rc; r++, xr += m_rows) {
            const float *wr = src[r] + j;
            __m256 w0 = _mm256_loadu_ps(wr), w1 = _mm256_loadu_ps(wr + 8);
            __m256 p = _mm256_broadcast_ss(xr), q = _mm256_broadcast_ss(xr + 1);
            a0 = _mm256_fmadd_ps(p, w0, a0), a1 = _mm256_fmadd_ps(p, w1, a1);
            b0 = _mm256_fmadd_ps(q, w0, b0), b1 = _mm256_fmadd_ps(q, w1, b1);
            p = _mm256_broadcast_ss(xr + 2), q = _mm256_broadcast_ss(xr + 3);
            c0 = _mm256_fmadd_ps(p, w0, c0), c1 = _mm256_fmadd_ps(p, w1, c1);
            d0 = _mm256_fmadd_ps(q, w0, d0), d1 = _mm256_fmadd_ps(q, w1, d1);
          }
          float *y0 = y + m * n + n0 + j, *y1 = y0 + n, *y2 = y1 + n, *y3 = y2 + n;
          _mm256_storeu_ps(y0, _mm256_add_ps(_mm256_loadu_ps(y0), a0));
          _mm256_storeu_ps(y0 + 8, _mm256_add_ps(_mm256_loadu_ps(y0 + 8), a1));
          _mm256_storeu_ps(y1, _mm256_add_ps(_mm256_loadu_ps(y1), b0));
          _mm256_storeu_ps(y1 + 8, _mm256_add_ps(_mm256_loadu_ps(y1 + 8), b1));
          _mm256_storeu_ps(y2, _mm256_add_ps(_mm256_loadu_ps(y2), c0));
          _mm256_storeu_ps(y2 + 8, _mm256_add_ps(_mm256_loadu_ps(y2 + 8), c1));
          _mm256_storeu_ps(y3, _mm256_add_ps(_mm256_loadu_ps(y3), d0));
          _mm256_storeu_ps(y3 + 8, _mm256_add_ps(_mm256_loadu_ps(y3 + 8), d1));
        }
        for (; m < m_rows; m++) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0;
          for (int64_t r = 0; r < rc; r++) {
            const float *wr = src[r] + j;
            __m256 p = _mm256_broadcast_ss(xk + (r0 + r) * m_rows + m);
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(wr), a0), a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(wr + 8), a1);
          }
          float *y0 = y + m * n + n0 + j;
          _mm256_storeu_ps(y0, _mm256_add_ps(_mm256_loadu_ps(y0), a0));
          _mm256_storeu_ps(y0 + 8, _mm256_add_ps(_mm256_loadu_ps(y0 + 8), a1));
        }
      }
      for (int64_t m = 0; m < m_rows; m++) /* the last columns of the panel (fewer than 16) */
        for (int64_t r = 0; r < rc; r++) {
          const float *wr = src[r];
          float a = xk[(r0 + r) * m_rows + m], *ym = y + m * n + n0;
          for (int64_t jt = j; jt < nt; jt++) ym[jt] += a * wr[jt];
        }
    }
  }
}

__attribute__((target("avx2,fma")))
static void accumulate_avx2(const float *x, int64_t m_rows, int64_t k, const float *w, int64_t n,
                            const int64_t *rows, int64_t n_rows, float *y) {
  if (m_rows >= 4 && n_rows > 0) {
    float *xk = malloc(sizeof(float) * (size_t)(n_rows * m_rows));
    /* 12 rows or more: a staging tile of 16 x (panel width + 16) floats (see accumulate_avx2_blocked) */
    float *stage = m_rows >= 12 ? malloc(sizeof(float) * 16 * (size_t)(n + 16)) : NULL;
    if (xk) {
      for (int64_t r = 0; r < n_rows; r++)
        for (int64_t m = 0; m < m_rows; m++) xk[r * m_rows + m] = x[m * k + rows[r]];
      accumulate_avx2_blocked(xk, m_rows, w, n, rows, n_rows, y, stage);
      free(xk);
      free(stage);
      return;
    }
    free(stage);
  }
  int64_t width = tile_width(m_rows, n);
  for (int64_t n0 = 0; n0 < n; n0 += width) {
    int64_t nt = n - n0 < width ? n - n0 : width;
    int64_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
      const float *w0p = w + rows[r] * n + n0, *w1p = w + rows[r + 1] * n + n0;
      const float *w2p = w + rows[r + 2] * n + n0, *w3p = w + rows[r + 3] * n + n0;
      if (m_rows > 1 && r + 8 <= n_rows) /* fetch the next group's row segments while this one computes */
        for (int64_t g = 4; g < 8; g++)
          for (int64_t j = 0; j < nt; j += 16) _mm_prefetch((const char *)(w + rows[r + g] * n + n0 + j), _MM_HINT_T0);
      int64_t m = 0;
      for (; m + 2 <= m_rows; m += 2) { /* two rows of x share every load of W */
        const float *xm = x + m * k, *xq = xm + k;
        __m256 va = _mm256_set1_ps(xm[rows[r]]), vb = _mm256_set1_ps(xm[rows[r + 1]]);
        __m256 vc = _mm256_set1_ps(xm[rows[r + 2]]), vd = _mm256_set1_ps(xm[rows[r + 3]]);
        __m256 qa = _mm256_set1_ps(xq[rows[r]]), qb = _mm256_set1_ps(xq[rows[r + 1]]);
        __m256 qc = _mm256_set1_ps(xq[rows[r + 2]]), qd = _mm256_set1_ps(xq[rows[r + 3]]);
        float *ym = y + m * n + n0, *yq = ym + n;
        int64_t j = 0;
        for (; j + 8 <= nt; j += 8) {
          __m256 w0 = _mm256_loadu_ps(w0p + j), w1 = _mm256_loadu_ps(w1p + j);
          __m256 w2 = _mm256_loadu_ps(w2p + j), w3 = _mm256_loadu_ps(w3p + j);
          __m256 y0 = _mm256_loadu_ps(ym + j), y1 = _mm256_loadu_ps(yq + j);
          y0 = _mm256_fmadd_ps(va, w0, y0), y1 = _mm256_fmadd_ps(qa, w0, y1);
          y0 = _mm256_fmadd_ps(vb, w1, y0), y1 = _mm256_fmadd_ps(qb, w1, y1);
          y0 = _mm256_fmadd_ps(vc, w2, y0), y1 = _mm256_fmadd_ps(qc, w2, y1);
          y0 = _mm256_fmadd_ps(vd, w3, y0), y1 = _mm256_fmadd_ps(qd, w3, y1);
          _mm256_storeu_ps(ym + j, y0);
          _mm256_storeu_ps(yq + j, y1);
        }
        float a = xm[rows[r]], b = xm[rows[r + 1]], c = xm[rows[r + 2]], d = xm[rows[r + 3]];
        float e = xq[rows[r]], f = xq[rows[r + 1]], g = xq[rows[r + 2]], h = xq[rows[r + 3]];
        for (; j < nt; j++) {
          ym[j] += a * w0p[j] + b * w1p[j] + c * w2p[j] + d * w3p[j];
          yq[j] += e * w0p[j] + f * w1p[j] + g * w2p[j] + h * w3p[j];
        }
      }
      for (; m < m_rows; m++) {
        const float *xm = x + m * k;
        const float *w0 = w0p, *w1 = w1p, *w2 = w2p, *w3 = w3p;
        float a = xm[rows[r]], b = xm[rows[r + 1]], c = xm[rows[r + 2]], d = xm[rows[r + 3]];
        __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c), vd = _mm256_set1_ps(d);
        float *ym = y + m * n + n0;
        /* one row of x: nothing else hides W's latency, so fetch the next group's four row segments
         * one 64-byte line per row per step, a group ahead (a row of W is often one 4 kB page, where
         * the hardware prefetcher has to start over, and it meets four pages at a time here) */
        const float *p0 = NULL, *p1 = NULL, *p2 = NULL, *p3 = NULL;
        if (m_rows == 1 && r + 8 <= n_rows) {
          p0 = w + rows[r + 4] * n + n0, p1 = w + rows[r + 5] * n + n0;
          p2 = w + rows[r + 6] * n + n0, p3 = w + rows[r + 7] * n + n0;
        }
        int64_t j = 0;
        for (; j + 16 <= nt; j += 16) {
          if (p0) {
            _mm_prefetch((const char *)(p0 + j), _MM_HINT_T0), _mm_prefetch((const char *)(p1 + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(p2 + j), _MM_HINT_T0), _mm_prefetch((const char *)(p3 + j), _MM_HINT_T0);
          }
          __m256 y0 = _mm256_loadu_ps(ym + j), y1 = _mm256_loadu_ps(ym + j + 8);
          y0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w0 + j), y0);
          y1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w0 + j + 8), y1);
          y0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(w1 + j), y0);
          y1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(w1 + j + 8), y1);
          y0 = _mm256_fmadd_ps(vc, _mm256_loadu_ps(w2 + j), y0);
          y1 = _mm256_fmadd_ps(vc, _mm256_loadu_ps(w2 + j + 8), y1);
          y0 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(w3 + j), y0);
          y1 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(w3 + j + 8), y1);
          _mm256_storeu_ps(ym + j, y0);
          _mm256_storeu_ps(ym + j + 8, y1);
        }
        for (; j < nt; j++) ym[j] += a * w0[j] + b * w1[j] + c * w2[j] + d * w3[j];
      }
    }
    for (; r < n_rows; r++) {
      const float *w0 = w + rows[r] * n + n0;
      for (int64_t m = 0; m < m_rows; m++) {
        float a = x[m * k + rows[r]];
        __m256 va = _mm256_set1_ps(a);
        float *ym = y + m * n + n0;
        int64_t j = 0;
        for (; j + 8 <= nt; j += 8)
          _mm256_storeu_ps(ym + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(w0 + j), _mm256_loadu_ps(ym + j)));
        for (; j < nt; j++) ym[j] += a * w0[j];
      }
    }
  }
}
#endif

/* sum of squares of x[0:len], the block score's inner loop (float lanes, summed in double) */
typedef double (*sumsq_fn)(const float *x, int64_t len);

static double sumsq_plain(const float *x, int64_t len) {
  double sum = 0.0;
  for (int64_t i = 0; i < len; i++) sum += (double)x[i] * (double)x[i];
  return sum;
}

#ifdef HAVE_X86
__attribute__((target("avx2,fma")))
static double sumsq_avx2(const float *x, int64_t len) {
  __m256d a = _mm256_setzero_pd(), b = a; /* squares summed in double, as the plain path does */
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 u = _mm256_loadu_ps(x + i);
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(u)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1));
    a = _mm256_fmadd_pd(lo, lo, a), b = _mm256_fmadd_pd(hi, hi, b);
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(a, b));
  double sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < len; i++) sum += (double)x[i] * (double)x[i];
  return sum;
}
#endif

static sumsq_fn g_sumsq = sumsq_plain;
static accumulate_fn g_accumulate = accumulate_plain;
static const char *g_path = "plain C";
static pthread_once_t g_dispatch_once = PTHREAD_ONCE_INIT;
const char *onnx_split_dynamic_kernel_force_plain(int plain);

/* once per process: the AVX2/FMA row kernel where the CPU has both (unless ONNX_SPLIT_KERNEL_PLAIN
 * is set), else plain C */
static void choose_kernel(void) { onnx_split_dynamic_kernel_force_plain(getenv("ONNX_SPLIT_KERNEL_PLAIN") != NULL); }

/* which row kernel this CPU runs (for tests and reports) */
__attribute__((visibility("default")))
const char *onnx_split_dynamic_kernel_path(void) {
  pthread_once(&g_dispatch_once, choose_kernel);
  return g_path;
}

/* force the plain C path (tests compare both paths); returns the path in use */
__attribute__((visibility("default")))
const char *onnx_split_dynamic_kernel_force_plain(int plain) {
#ifdef HAVE_X86
  if (!plain && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    g_accumulate = accumulate_avx2;
    g_sumsq = sumsq_avx2;
    g_path = "avx2+fma";
    return g_path;
  }
#endif
  g_accumulate = accumulate_plain;
  g_sumsq = sumsq_plain;
  g_path = "plain C";
  return g_path;
}

/* ---- the op ----------------------------------------------------------------------------------- */

typedef struct {
  int64_t block, rule, keep;
  float threshold;
} Kernel;

static OrtStatus *fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static OrtStatus *fail(int code, const char *fmt, ...) {
  char text[400];
  va_list args;
  va_start(args, fmt);
  vsnprintf(text, sizeof text, fmt, args);
  va_end(args);
  return CALL(CreateStatus)(code, text);
}

static OrtStatus *create_kernel(const CustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op;
  (void)api;
  Kernel *kernel = calloc(1, sizeof *kernel);
  if (!kernel) return fail(ORT_FAIL, "onnx_split.DynamicBlockMatMul: out of memory");
  OrtStatus *status = CALL_AS(fn_GetAttribute_int64, KernelInfoGetAttribute_int64)(info, "block", &kernel->block);
  if (!status) status = CALL_AS(fn_GetAttribute_int64, KernelInfoGetAttribute_int64)(info, "rule", &kernel->rule);
  if (!status) status = CALL_AS(fn_GetAttribute_int64, KernelInfoGetAttribute_int64)(info, "keep", &kernel->keep);
  if (!status)
    status = CALL_AS(fn_GetAttribute_float, KernelInfoGetAttribute_float)(info, "threshold", &kernel->threshold);
  if (!status && kernel->block < 1)
    status = fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: block must be >= 1, not %lld",
                  (long long)kernel->block);
  if (!status && kernel->rule != 0 && kernel->rule != 1)
    status = fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: rule must be 0 (top-k) or 1 (threshold)");
  if (status) {
    free(kernel);
    return status;
  }
  *out = kernel;
  return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

/* shape and float32 data of input `index`; dims holds up to 8 entries */
static OrtStatus *input(OrtKernelContext *context, size_t index, const char *what, const float **data,
                        int64_t *dims, size_t *rank) {
  const OrtValue *value = NULL;
  OrtStatus *status = CALL_AS(fn_GetInput, KernelContext_GetInput)(context, index, &value);
  if (status) return status;
  if (!value) return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: input %s is missing", what);
  OrtTensorTypeAndShapeInfo *info = NULL;
  if ((status = CALL(GetTensorTypeAndShape)(value, &info))) return status;
  int type = 0;
  status = CALL(GetTensorElementType)(info, &type);
  if (!status) status = CALL(GetDimensionsCount)(info, rank);
  if (!status && *rank > 8)
    status = fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: input %s has rank %zu > 8", what, *rank);
  if (!status) status = CALL(GetDimensions)(info, dims, *rank);
  CALL(ReleaseTensorTypeAndShapeInfo)(info);
  if (status) return status;
  if (type != ELEMENT_FLOAT)
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: input %s must be float32 (element type %d)",
                what, type);
  return CALL(GetTensorMutableData)((OrtValue *)value, (void **)data);
}

static OrtStatus *compute(void *opaque, OrtKernelContext *context) {
  const Kernel *kernel = opaque;
  const float *x, *w, *scale, *bias = NULL, *comp = NULL;
  int64_t xd[8], wd[8], sd[8], bd[8], cd[8];
  size_t xr, wr, sr, br = 0, cr = 0, n_inputs = 0;
  OrtStatus *status;
  if ((status = input(context, 0, "X", &x, xd, &xr))) return status;
  if ((status = input(context, 1, "W", &w, wd, &wr))) return status;
  if ((status = input(context, 2, "S", &scale, sd, &sr))) return status;
  if ((status = CALL_AS(fn_GetInputCount, KernelContext_GetInputCount)(context, &n_inputs))) return status;
  if (n_inputs > 3) {
    const OrtValue *value = NULL;
    if ((status = CALL_AS(fn_GetInput, KernelContext_GetInput)(context, 3, &value))) return status;
    if (value && (status = input(context, 3, "bias", &bias, bd, &br))) return status;
  }
  if (n_inputs > 4) {
    const OrtValue *value = NULL;
    if ((status = CALL_AS(fn_GetInput, KernelContext_GetInput)(context, 4, &value))) return status;
    if (value && (status = input(context, 4, "C", &comp, cd, &cr))) return status;
  }
  if (xr < 1 || wr != 2)
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: X needs rank >= 1 and W rank 2 (got %zu, %zu)",
                xr, wr);
  int64_t k = wd[0], n = wd[1];
  if (xd[xr - 1] != k)
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: X has %lld features, W has %lld rows",
                (long long)xd[xr - 1], (long long)k);
  int64_t n_blocks = (k + kernel->block - 1) / kernel->block;
  if (sr != 1 || sd[0] != n_blocks)
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: S must have one value per block (%lld)",
                (long long)n_blocks);
  if (bias && (br != 1 || bd[0] != n))
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: bias must be [N] = [%lld]", (long long)n);
  if (comp && (cr != 2 || cd[0] != n_blocks || cd[1] != n))
    return fail(ORT_INVALID_ARGUMENT, "onnx_split.DynamicBlockMatMul: C must be [blocks, N] = [%lld, %lld]",
                (long long)n_blocks, (long long)n);
  int64_t m_rows = 1;
  for (size_t i = 0; i + 1 < xr; i++) m_rows *= xd[i];
  int64_t yd[8];
  memcpy(yd, xd, sizeof(int64_t) * xr);
  yd[xr - 1] = n;
  OrtValue *out = NULL;
  float *y = NULL;
  if ((status = CALL_AS(fn_GetOutput, KernelContext_GetOutput)(context, 0, yd, xr, &out))) return status;
  if ((status = CALL(GetTensorMutableData)(out, (void **)&y))) return status;
  if (m_rows == 0 || n == 0) return NULL;
  for (int64_t m = 0; m < m_rows; m++) {
    if (bias)
      memcpy(y + m * n, bias, sizeof(float) * n);
    else
      memset(y + m * n, 0, sizeof(float) * n);
  }
  if (k == 0) return NULL;

  /* scores over the whole batch, then the kept blocks' rows in ascending order */
  double *score = malloc(sizeof(double) * n_blocks);
  unsigned char *kept = malloc(n_blocks);
  int64_t *rows = malloc(sizeof(int64_t) * k);
  if (!score || !kept || !rows) {
    free(score), free(kept), free(rows);
    return fail(ORT_FAIL, "onnx_split.DynamicBlockMatMul: out of memory");
  }
  for (int64_t b = 0; b < n_blocks; b++) score[b] = 0.0;
  for (int64_t m = 0; m < m_rows; m++) {
    const float *xm = x + m * k;
    for (int64_t b = 0; b < n_blocks; b++) {
      int64_t end = (b + 1) * kernel->block < k ? (b + 1) * kernel->block : k;
      score[b] += g_sumsq(xm + b * kernel->block, end - b * kernel->block);
    }
  }
  for (int64_t b = 0; b < n_blocks; b++) score[b] = sqrt(score[b] / (double)m_rows) * (double)scale[b];
  if (kernel->rule == 0) {
    for (int64_t b = 0; b < n_blocks; b++) {
      int64_t better = 0; /* blocks ranked before b: a higher score, or an equal one with a lower index */
      for (int64_t j = 0; j < n_blocks && better < kernel->keep; j++)
        if (score[j] > score[b] || (score[j] == score[b] && j < b)) better++;
      kept[b] = better < kernel->keep;
    }
  } else {
    for (int64_t b = 0; b < n_blocks; b++) kept[b] = score[b] > (double)kernel->threshold;
  }
  int64_t n_rows = 0;
  for (int64_t b = 0; b < n_blocks; b++) {
    if (!kept[b]) continue;
    int64_t end = (b + 1) * kernel->block < k ? (b + 1) * kernel->block : k;
    for (int64_t i = b * kernel->block; i < end; i++) rows[n_rows++] = i;
  }
  g_accumulate(x, m_rows, k, w, n, rows, n_rows, y);
  float *added = NULL;
  if (comp && n_rows < k) { /* the skipped blocks' rows of C, summed once, then added to every row */
    added = calloc((size_t)n, sizeof(float));
    if (!added) {
      free(score), free(kept), free(rows);
      return fail(ORT_FAIL, "onnx_split.DynamicBlockMatMul: out of memory");
    }
    for (int64_t b = 0; b < n_blocks; b++)
      if (!kept[b])
        for (int64_t j = 0; j < n; j++) added[j] += comp[b * n + j];
    for (int64_t m = 0; m < m_rows; m++)
      for (int64_t j = 0; j < n; j++) y[m * n + j] += added[j];
  }
  free(score), free(kept), free(rows), free(added);
  return NULL;
}

static const char *op_name(const CustomOp *op) { (void)op; return "DynamicBlockMatMul"; }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_type(const CustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t op_inputs(const CustomOp *op) { (void)op; return 5; }
static size_t op_outputs(const CustomOp *op) { (void)op; return 1; }
static int op_input_kind(const CustomOp *op, size_t index) { (void)op; return index >= 3 ? IO_OPTIONAL : IO_REQUIRED; }
static int op_output_kind(const CustomOp *op, size_t index) { (void)op; (void)index; return IO_REQUIRED; }
static int op_memory(const CustomOp *op, size_t index) { (void)op; (void)index; return 0; /* OrtMemTypeDefault */ }
static int op_one(const CustomOp *op) { (void)op; return 1; }

static CustomOp g_op = {
    .version = API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_type,
    .GetInputTypeCount = op_inputs,
    .GetOutputType = op_type,
    .GetOutputTypeCount = op_outputs,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = op_input_kind,
    .GetOutputCharacteristic = op_output_kind,
    .GetInputMemoryType = op_memory,
    .GetVariadicInputMinArity = op_one,
    .GetVariadicInputHomogeneity = op_one,
    .GetVariadicOutputMinArity = op_one,
    .GetVariadicOutputHomogeneity = op_one,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static OrtCustomOpDomain *g_domain;
static OrtStatus *g_domain_status;

static void make_domain(void) {
  pthread_once(&g_dispatch_once, choose_kernel);
  g_domain_status = CALL(CreateCustomOpDomain)("onnx_split", &g_domain);
  if (!g_domain_status) g_domain_status = CALL(CustomOpDomain_Add)(g_domain, &g_op);
}

/* The entry point ONNX Runtime looks up in a custom-op library. One domain serves every session. */
__attribute__((visibility("default")))
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(API_VERSION);
  if (!api) { /* an ONNX Runtime older than 1.16: version 1 of the table can still say so */
    g_api = base->GetApi(1);
    return g_api ? fail(ORT_FAIL, "onnx_split.DynamicBlockMatMul needs ONNX Runtime >= 1.16 (C API %d)", API_VERSION)
                 : NULL;
  }
  g_api = api;
  pthread_once(&g_once, make_domain);
  if (g_domain_status) return fail(ORT_FAIL, "onnx_split.DynamicBlockMatMul: could not create its domain");
  return CALL(AddCustomOpDomain)(options, g_domain);
}
