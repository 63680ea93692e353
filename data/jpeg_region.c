/* Region-of-interest JPEG decoding for the fused crop + scaled decode (docs/data.md, "Decoding only the crop").
 *
 * libjpeg-turbo can skip whole rows (jpeg_skip_scanlines: no inverse DCT, upsampling or colour conversion for
 * them) and restrict each row to a range of iMCU columns (jpeg_crop_scanline). So a training crop costs the
 * entropy decoding of the whole file (which also checks it) plus the pixel work of the crop and of the last
 * row, instead of the pixel work of the whole frame.
 *
 * Built at set-up (python -m data.build_helpers, make native) with the system C compiler against the system
 * libjpeg's headers; called through ctypes. Plain C, no Python headers: one shared object serves every Python
 * version.
 *
 * The system libjpeg is opened by its path (EFFNET_LIBJPEG, set at build time) with RTLD_DEEPBIND rather than
 * linked: torchvision and Pillow wheels load their own copies, one of which may carry the same soname
 * (libjpeg.so.62) without the partial-decoding functions, and a linked dependency would bind to that copy.
 * RTLD_DEEPBIND is glibc's: elsewhere the build stops here and the set-up reports the helper as unavailable.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#ifndef RTLD_DEEPBIND
#error "needs dlopen's RTLD_DEEPBIND (glibc): on this C library the region decoder is not built"
#endif
#ifndef EFFNET_LIBJPEG
#error "build with -DEFFNET_LIBJPEG=\"/path/to/libjpeg.so.62\""
#endif

/* The libjpeg functions used, looked up in the opened library. */
static struct {
    struct jpeg_error_mgr *(*std_error)(struct jpeg_error_mgr *);
    void (*create_decompress)(j_decompress_ptr, int, size_t);
    void (*mem_src)(j_decompress_ptr, const unsigned char *, unsigned long);
    int (*read_header)(j_decompress_ptr, boolean);
    boolean (*start_decompress)(j_decompress_ptr);
    void (*crop_scanline)(j_decompress_ptr, JDIMENSION *, JDIMENSION *);
    JDIMENSION (*skip_scanlines)(j_decompress_ptr, JDIMENSION);
    JDIMENSION (*read_scanlines)(j_decompress_ptr, JSAMPARRAY, JDIMENSION);
    boolean (*finish_decompress)(j_decompress_ptr);
    void (*destroy_decompress)(j_decompress_ptr);
} api;

/* Open the library and find every function; NULL on success, else what is missing (dlerror's text). */
const char *effnet_open_libjpeg(void) {
    void *library = dlopen(EFFNET_LIBJPEG, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (!library) return dlerror();
    const struct { void **slot; const char *name; } wanted[] = {
        {(void **)&api.std_error, "jpeg_std_error"},
        {(void **)&api.create_decompress, "jpeg_CreateDecompress"},
        {(void **)&api.mem_src, "jpeg_mem_src"},
        {(void **)&api.read_header, "jpeg_read_header"},
        {(void **)&api.start_decompress, "jpeg_start_decompress"},
        {(void **)&api.crop_scanline, "jpeg_crop_scanline"},
        {(void **)&api.skip_scanlines, "jpeg_skip_scanlines"},
        {(void **)&api.read_scanlines, "jpeg_read_scanlines"},
        {(void **)&api.finish_decompress, "jpeg_finish_decompress"},
        {(void **)&api.destroy_decompress, "jpeg_destroy_decompress"},
    };
    for (size_t i = 0; i < sizeof wanted / sizeof wanted[0]; i++) {
        *wanted[i].slot = dlsym(library, wanted[i].name);
        if (!*wanted[i].slot) return dlerror();
    }
    return NULL;
}

enum { DECODED = 0, LIBJPEG_ERROR = 1, LIBJPEG_WARNING = 2, BAD_REQUEST = 3 };
enum { ROWS_PER_READ = 16, PIXEL_BYTES = 4 };

struct error_trap {
    struct jpeg_error_mgr manager;
    jmp_buf escape;
};

static void leave_on_error(j_common_ptr cinfo) {
    longjmp(((struct error_trap *)cinfo->err)->escape, 1);
}

/* Count warnings (a damaged file) instead of printing them; the caller hands such files to Pillow. */
static void count_warnings(j_common_ptr cinfo, int level) {
    if (level < 0) cinfo->err->num_warnings++;
}

/* Decode the rectangle (left, top, width, height) of the image scaled by 1/scale (scale 1, 2, 4 or 8) as RGBX
 * (the fourth byte 255), row after row into out (height * width * 4 bytes). The pixels equal those of a full decode at that scale. */
int effnet_decode_region(const unsigned char *data, unsigned long size, int scale, int left, int top, int width,
                         int height, unsigned char *out) {
    struct jpeg_decompress_struct cinfo;
    struct error_trap trap;
    cinfo.err = api.std_error(&trap.manager);
    trap.manager.error_exit = leave_on_error;
    trap.manager.emit_message = count_warnings;
    if (setjmp(trap.escape)) {
        api.destroy_decompress(&cinfo);
        return LIBJPEG_ERROR;
    }
    api.create_decompress(&cinfo, JPEG_LIB_VERSION, sizeof cinfo);
    api.mem_src(&cinfo, data, size);
    api.read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_EXT_RGBX;  /* 4 bytes a pixel: the layout Pillow keeps RGB in */
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    api.start_decompress(&cinfo);
    const int full_width = (int)cinfo.output_width;
    if (cinfo.output_components != PIXEL_BYTES || left < 0 || top < 0 || width < 1 || height < 1
        || left + width > full_width || top + height > (int)cinfo.output_height) {
        api.destroy_decompress(&cinfo);
        return BAD_REQUEST;
    }
    /* One iMCU more on each side than asked: smooth chroma upsampling reads the neighbouring chroma sample,
     * which libjpeg replaces by the edge sample at the border of a cropped row, so only interior columns of
     * the cropped decode equal the full decode. */
    const int margin = cinfo.max_h_samp_factor * (int)cinfo.min_DCT_scaled_size;
    const int first = left > margin ? left - margin : 0;
    const int end = left + width + margin < full_width ? left + width + margin : full_width;
    JDIMENSION column = (JDIMENSION)first, columns = (JDIMENSION)(end - first);
    api.crop_scanline(&cinfo, &column, &columns);  /* widens to whole iMCUs: column <= first */
    JSAMPARRAY rows = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, columns * PIXEL_BYTES, ROWS_PER_READ);
    if (top > 0 && api.skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        api.destroy_decompress(&cinfo);
        return LIBJPEG_ERROR;
    }
    const size_t shift = (size_t)(left - (int)column) * PIXEL_BYTES, row_bytes = (size_t)width * PIXEL_BYTES;
    int status = DECODED;
    for (int y = 0; y < height;) {
        const int wanted = height - y < ROWS_PER_READ ? height - y : ROWS_PER_READ;
        const int got = (int)api.read_scanlines(&cinfo, rows, (JDIMENSION)wanted);
        if (got < 1) {
            status = LIBJPEG_ERROR;
            break;
        }
        for (int k = 0; k < got; k++, y++) memcpy(out + (size_t)y * row_bytes, rows[k] + shift, row_bytes);
    }
    /* Go on to the end and finish, so that the file is checked as a full decode checks it: damage below the
     * crop fails or warns here as it does in Pillow. Skipping the rows still entropy-decodes them, but a skip
     * that reaches the last row only marks the image done, so the last row is read. */
    const JDIMENSION rows_left = cinfo.output_height - cinfo.output_scanline;
    if (status == DECODED && rows_left > 1
        && api.skip_scanlines(&cinfo, rows_left - 1) != rows_left - 1) status = LIBJPEG_ERROR;
    while (status == DECODED && cinfo.output_scanline < cinfo.output_height) {
        if (api.read_scanlines(&cinfo, rows, ROWS_PER_READ) < 1) status = LIBJPEG_ERROR;
    }
    if (status == DECODED) api.finish_decompress(&cinfo);
    if (status == DECODED && trap.manager.num_warnings) status = LIBJPEG_WARNING;
    api.destroy_decompress(&cinfo);
    return status;
}
