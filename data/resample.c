/* Pillow's resize of an RGBX image, bilinear or bicubic, with Pillow's pixels (docs/data.md, "The resize").
 *
 * Same arithmetic as Pillow's Resample.c: filter weights in double precision from the box's float coordinates,
 * rounded to 22-bit fixed point, an integer sum per pixel, each pass clipped to 8 bits, the horizontal pass on
 * the box's rows only. Integer sums do not depend on their order, so the passes can run four channels (SSE4.1)
 * or sixteen bytes at a time and still give Pillow's pixels; what must match is the choice of which pass runs
 * first, which Pillow 13 changed (pillow13_order). data/resample.py checks the result against Pillow on load.
 *
 * Plain C with SSE4.1 where the CPU has it (x86-64, chosen at run time), scalar loops elsewhere.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_SSE41_CODE 1
#define SSE41 __attribute__((target("sse4.1")))
#endif

enum { PRECISION_BITS = 22, HALF = 1 << (PRECISION_BITS - 1), PIXEL_BYTES = 4 };
enum { FILTER_BILINEAR = 2, FILTER_BICUBIC = 3 };  /* Pillow's Resampling numbers */
enum { RESIZED = 0, NO_MEMORY = 1, BAD_REQUEST = 2 };

static double bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic(double x) {  /* Keys' cubic with a = -0.5, as Pillow writes it */
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* One pass's weights: for output pixel i, ksize fixed-point weights starting at input pixel start[i]. Pillow
 * stores only the taps inside the image; here, where the image is wide enough, every pixel gets exactly ksize
 * taps (the window moved inside the image, the extra weights 0), so the inner loop has a fixed length. */
struct pass {
    int ksize;
    int fixed_length;  /* every pixel has ksize taps */
    int *start;
    int *count;  /* taps with a weight (Pillow's xmax - xmin); ksize where the window is fixed */
    int32_t *weight;
};

static void free_pass(struct pass *p) {
    free(p->start);
    free(p->count);
    free(p->weight);
}

static int make_pass(int in_size, float in0, float in1, int out_size, int filter, int fixed_length, struct pass *p) {
    double (*f)(double) = filter == FILTER_BICUBIC ? bicubic : bilinear;
    const double scale = (double)(in1 - in0) / out_size;  /* the float subtraction, as in Pillow */
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = (filter == FILTER_BICUBIC ? 2.0 : 1.0) * filterscale;
    const int ksize = (int)ceil(support) * 2 + 1;
    double *taps = malloc(sizeof(double) * (size_t)ksize);
    p->ksize = ksize;
    p->start = malloc(sizeof(int) * (size_t)out_size);
    p->count = malloc(sizeof(int) * (size_t)out_size);
    p->weight = calloc((size_t)ksize * (size_t)out_size, sizeof(int32_t));
    if (!taps || !p->start || !p->count || !p->weight) {
        free(taps);
        return 0;
    }
    p->fixed_length = fixed_length = fixed_length && in_size >= ksize;
    const double inverse = 1.0 / filterscale;
    for (int i = 0; i < out_size; i++) {
        const double center = in0 + (i + 0.5) * scale;
        int first = (int)(center - support + 0.5), end = (int)(center + support + 0.5);
        if (first < 0) first = 0;
        if (end > in_size) end = in_size;
        const int n = end - first;
        double total = 0.0;
        for (int x = 0; x < n; x++) {
            taps[x] = f((x + first - center + 0.5) * inverse);
            total += taps[x];
        }
        const int start = fixed_length && first + ksize > in_size ? in_size - ksize : first;
        int32_t *w = p->weight + (size_t)i * ksize + (first - start);
        for (int x = 0; x < n; x++) {
            const double v = total != 0.0 ? taps[x] / total : taps[x];
            w[x] = v < 0 ? (int)(-0.5 + v * (1 << PRECISION_BITS)) : (int)(0.5 + v * (1 << PRECISION_BITS));
        }
        p->start[i] = start;
        p->count[i] = fixed_length ? ksize : n;
    }
    free(taps);
    return 1;
}

static inline uint8_t clip8(int32_t sum) {
    sum >>= PRECISION_BITS;
    return sum < 0 ? 0 : sum > 255 ? 255 : (uint8_t)sum;
}

/* rows x out_w pixels of out from the same rows of in, each a weighted sum along its row. */
static void horizontal_scalar(const uint8_t *in, size_t in_stride, int rows, uint8_t *out, size_t out_stride,
                              int out_w, const struct pass *p) {
    for (int y = 0; y < rows; y++) {
        const uint8_t *line = in + (size_t)y * in_stride;
        uint8_t *dst = out + (size_t)y * out_stride;
        for (int i = 0; i < out_w; i++, dst += PIXEL_BYTES) {
            const uint8_t *src = line + (size_t)p->start[i] * PIXEL_BYTES;
            const int32_t *w = p->weight + (size_t)i * p->ksize;
            int32_t s0 = HALF, s1 = HALF, s2 = HALF, s3 = HALF;
            for (int x = 0; x < p->count[i]; x++, src += PIXEL_BYTES) {
                s0 += src[0] * w[x];
                s1 += src[1] * w[x];
                s2 += src[2] * w[x];
                s3 += src[3] * w[x];
            }
            dst[0] = clip8(s0);
            dst[1] = clip8(s1);
            dst[2] = clip8(s2);
            dst[3] = clip8(s3);
        }
    }
}

/* out_h rows of out (width pixels each) from in, each a weighted sum of input rows. */
static void vertical_scalar(const uint8_t *in, size_t in_stride, int width, uint8_t *out, size_t out_stride,
                            int out_h, const struct pass *p) {
    const int values = width * PIXEL_BYTES;
    for (int y = 0; y < out_h; y++) {
        const uint8_t *top = in + (size_t)p->start[y] * in_stride;
        const int32_t *w = p->weight + (size_t)y * p->ksize;
        uint8_t *dst = out + (size_t)y * out_stride;
        for (int i = 0; i < values; i++) {
            int32_t sum = HALF;
            for (int k = 0; k < p->count[y]; k++) sum += top[(size_t)k * in_stride + i] * w[k];
            dst[i] = clip8(sum);
        }
    }
}

#ifdef HAVE_SSE41_CODE
/* The four channels of one pixel in one register; a compile-time tap count lets the compiler unroll. */
#define HORIZONTAL_SSE41(KSIZE)                                                                                \
    for (int y = 0; y < rows; y++) {                                                                          \
        const uint8_t *line = in + (size_t)y * in_stride;                                                     \
        uint8_t *dst = out + (size_t)y * out_stride;                                                          \
        const int32_t *w = p->weight;                                                                         \
        for (int i = 0; i < out_w; i++, w += (KSIZE), dst += PIXEL_BYTES) {                                   \
            const uint8_t *src = line + (size_t)p->start[i] * PIXEL_BYTES;                                    \
            __m128i sum = _mm_set1_epi32(HALF);                                                               \
            for (int x = 0; x < (KSIZE); x++) {                                                               \
                int32_t pixel;                                                                                \
                memcpy(&pixel, src + x * PIXEL_BYTES, sizeof pixel);                                          \
                sum = _mm_add_epi32(sum, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(pixel)),         \
                                                         _mm_set1_epi32(w[x])));                              \
            }                                                                                                 \
            sum = _mm_srai_epi32(sum, PRECISION_BITS);                                                        \
            const int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(sum, sum), sum));       \
            memcpy(dst, &packed, sizeof packed);                                                              \
        }                                                                                                     \
    }

SSE41 static void horizontal_sse41(const uint8_t *in, size_t in_stride, int rows, uint8_t *out, size_t out_stride,
                                   int out_w, const struct pass *p) {
    if (!p->fixed_length) {  /* an image narrower than the filter */
        horizontal_scalar(in, in_stride, rows, out, out_stride, out_w, p);
        return;
    }
    switch (p->ksize) {
    case 3: HORIZONTAL_SSE41(3) break;
    case 5: HORIZONTAL_SSE41(5) break;
    case 7: HORIZONTAL_SSE41(7) break;
    default: {
        const int ksize = p->ksize;
        HORIZONTAL_SSE41(ksize)
    }
    }
}

/* Sixteen bytes (four pixels) of one output row. */
SSE41 static inline __m128i vertical16(const uint8_t *src, size_t stride, int taps, const int32_t *w) {
    __m128i s0 = _mm_set1_epi32(HALF), s1 = s0, s2 = s0, s3 = s0;
    for (int k = 0; k < taps; k++, src += stride) {
        const __m128i v = _mm_loadu_si128((const __m128i *)src), weight = _mm_set1_epi32(w[k]);
        s0 = _mm_add_epi32(s0, _mm_mullo_epi32(_mm_cvtepu8_epi32(v), weight));
        s1 = _mm_add_epi32(s1, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(v, 4)), weight));
        s2 = _mm_add_epi32(s2, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(v, 8)), weight));
        s3 = _mm_add_epi32(s3, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(v, 12)), weight));
    }
    s0 = _mm_srai_epi32(s0, PRECISION_BITS);
    s1 = _mm_srai_epi32(s1, PRECISION_BITS);
    s2 = _mm_srai_epi32(s2, PRECISION_BITS);
    s3 = _mm_srai_epi32(s3, PRECISION_BITS);
    return _mm_packus_epi16(_mm_packs_epi32(s0, s1), _mm_packs_epi32(s2, s3));
}

SSE41 static void vertical_sse41(const uint8_t *in, size_t in_stride, int width, uint8_t *out, size_t out_stride,
                                 int out_h, const struct pass *p) {
    const int values = width * PIXEL_BYTES;
    if (values < 16) {
        vertical_scalar(in, in_stride, width, out, out_stride, out_h, p);
        return;
    }
    for (int y = 0; y < out_h; y++) {
        const uint8_t *top = in + (size_t)p->start[y] * in_stride;
        const int32_t *w = p->weight + (size_t)y * p->ksize;
        uint8_t *dst = out + (size_t)y * out_stride;
        for (int i = 0;; i += 16) {
            if (i + 16 > values) i = values - 16;  /* the last block overlaps the one before: same values */
            _mm_storeu_si128((__m128i *)(dst + i), vertical16(top + i, in_stride, p->count[y], w));
            if (i + 16 == values) break;
        }
    }
}
#endif

typedef void (*horizontal_fn)(const uint8_t *, size_t, int, uint8_t *, size_t, int, const struct pass *);
typedef void (*vertical_fn)(const uint8_t *, size_t, int, uint8_t *, size_t, int, const struct pass *);

/* 1 where this build runs the SSE4.1 loops on this CPU. */
int effnet_resize_simd(void) {
#ifdef HAVE_SSE41_CODE
    return __builtin_cpu_supports("sse4.1");
#else
    return 0;
#endif
}

/* Image.resize((out_w, out_h), filter, box=(x0, y0, x1, y1)) of the RGBX image in (in_h rows of in_stride bytes)
 * into out (out_h * out_w * 4 bytes). pillow13_order: run the vertical pass first where Pillow >= 13 does (the
 * height shrinks by more than twice as many pixels as the width); simd: 0 forces the scalar loops. */
int effnet_resize(const uint8_t *in, int in_w, int in_h, int in_stride, float x0, float y0, float x1, float y1,
                  int out_w, int out_h, int filter, int pillow13_order, int simd, uint8_t *out) {
    if ((filter != FILTER_BILINEAR && filter != FILTER_BICUBIC) || in_w < 1 || in_h < 1 || out_w < 1 || out_h < 1
        || in_stride < in_w * PIXEL_BYTES || x0 < 0 || y0 < 0 || x1 > in_w || y1 > in_h || x1 - x0 < 0
        || y1 - y0 < 0) return BAD_REQUEST;
    const size_t out_stride = (size_t)out_w * PIXEL_BYTES;
    if (x0 - (int)x0 == 0 && x1 - x0 == out_w && y0 - (int)y0 == 0 && y1 - y0 == out_h) {  /* Pillow crops */
        for (int y = 0; y < out_h; y++)
            memcpy(out + y * out_stride, in + (size_t)(y + (int)y0) * in_stride + (size_t)x0 * PIXEL_BYTES, out_stride);
        return RESIZED;
    }
    horizontal_fn horizontal = horizontal_scalar;
    vertical_fn vertical = vertical_scalar;
#ifdef HAVE_SSE41_CODE
    if (simd && effnet_resize_simd()) {
        horizontal = horizontal_sse41;
        vertical = vertical_sse41;
    }
#else
    (void)simd;
#endif
    const int need_horizontal = out_w != in_w || x0 != 0 || x1 != out_w;
    const int need_vertical = out_h != in_h || y0 != 0 || y1 != out_h;
    const int horizontal_first = !(pillow13_order && in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2);
    struct pass across = {0}, down = {0};
    uint8_t *between = NULL;
    int status = NO_MEMORY;
    if (!make_pass(in_w, x0, x1, out_w, filter, 1, &across) || !make_pass(in_h, y0, y1, out_h, filter, 0, &down))
        goto done;
    if (!need_vertical) {  /* (one of the two is needed: the whole image at its own size is Pillow's copy) */
        horizontal(in, (size_t)in_stride, in_h, out, out_stride, out_w, &across);
    } else if (!need_horizontal) {
        vertical(in, (size_t)in_stride, in_w, out, out_stride, out_h, &down);
    } else if (horizontal_first) {  /* only the rows the vertical pass reads */
        const int first = down.start[0], end = down.start[out_h - 1] + down.count[out_h - 1];
        for (int y = 0; y < out_h; y++) down.start[y] -= first;
        if (!(between = malloc(out_stride * (size_t)(end - first)))) goto done;
        horizontal(in + (size_t)first * in_stride, (size_t)in_stride, end - first, between, out_stride, out_w, &across);
        vertical(between, out_stride, out_w, out, out_stride, out_h, &down);
    } else {
        const size_t between_stride = (size_t)in_w * PIXEL_BYTES;
        if (!(between = malloc(between_stride * (size_t)out_h))) goto done;
        vertical(in, (size_t)in_stride, in_w, between, between_stride, out_h, &down);
        horizontal(between, between_stride, out_h, out, out_stride, out_w, &across);
    }
    status = RESIZED;
done:
    free_pass(&across);
    free_pass(&down);
    free(between);
    return status;
}
