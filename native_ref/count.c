/*
 * native_ref/count.c - plain C twin of streamstore's counting kernel.
 *
 * Same semantics as streamstore/counting/_reference.py, bit for bit
 * (TMAX = largest value of the frame type):
 *   candidate = raw(p) > lo(p)                          one compare in the frame type
 *   s(p)      = (raw(p) - dark(p)) * gain(p)            int64; gain relative uint16 or absent
 *   X-ray     = candidate and (raw(p) == TMAX or s(p) > xray_level)
 *   local max = candidate whose key (s, -flat index) beats every candidate 8-neighbour:
 *               s > s(q) for q earlier in raster order, s >= s(q) for later q
 *   event     = local max with no X-ray hit within Chebyshev distance radius
 *   subpixel  = integer centre of mass of max(s, 0) over the in-frame 3 x 3,
 *               q = clamp(floor((2 S + 4 T) / S), 0, 3), value (qy << 2) | qx
 * Events in ascending flat index r * W + c per frame. Single-threaded on purpose:
 * it is the correctness oracle and the single-core speed anchor.
 *
 * Built on first use by native_ref/__init__.py with cc -O3 -march=native -shared -fPIC.
 */
#include <stdint.h>

#define BLOCK 64

static inline int64_t quantise(int64_t num, int64_t den) {
    if (num < 0) return 0;
    int64_t q = num / den;
    return q > 3 ? 3 : q;
}

#define DEFINE_COUNT(NAME, T, TMAX)                                                        \
    static inline int64_t NAME##_signal(const T *fr, const T *dark, const uint16_t *gain,  \
                                        int64_t i) {                                       \
        int64_t s = (int64_t)fr[i] - (int64_t)dark[i];                                     \
        return gain ? s * (int64_t)gain[i] : s;                                            \
    }                                                                                      \
                                                                                           \
    /* 0 when neighbour i is a candidate whose key beats signal s */                       \
    static inline int NAME##_beats(int64_t s, const T *fr, const T *lo, const T *dark,     \
                                   const uint16_t *gain, int64_t i, int earlier) {         \
        if (fr[i] <= lo[i]) return 1;                                                      \
        int64_t t = NAME##_signal(fr, dark, gain, i);                                      \
        return earlier ? s > t : s >= t;                                                   \
    }                                                                                      \
                                                                                           \
    static int NAME##_is_local_max(int64_t s, const T *fr, const T *lo, const T *dark,     \
                                   const uint16_t *gain, int64_t r, int64_t c, int64_t h,  \
                                   int64_t w) {                                            \
        for (int dy = -1; dy <= 1; dy++) {                                                 \
            int64_t rr = r + dy;                                                           \
            if (rr < 0 || rr >= h) continue;                                               \
            for (int dx = -1; dx <= 1; dx++) {                                             \
                int64_t cc = c + dx;                                                       \
                if (cc < 0 || cc >= w || (dy == 0 && dx == 0)) continue;                   \
                int earlier = dy < 0 || (dy == 0 && dx < 0);                               \
                if (!NAME##_beats(s, fr, lo, dark, gain, rr * w + cc, earlier)) return 0;  \
            }                                                                              \
        }                                                                                  \
        return 1;                                                                          \
    }                                                                                      \
                                                                                           \
    static int NAME##_near_xray(const T *fr, const T *lo, const T *dark,                   \
                                const uint16_t *gain, int64_t xray_level, int64_t r,       \
                                int64_t c, int64_t h, int64_t w, int64_t radius) {         \
        int64_t ra = r - radius < 0 ? 0 : r - radius;                                      \
        int64_t rb = r + radius + 1 > h ? h : r + radius + 1;                              \
        int64_t ca = c - radius < 0 ? 0 : c - radius;                                      \
        int64_t cb = c + radius + 1 > w ? w : c + radius + 1;                              \
        for (int64_t rr = ra; rr < rb; rr++)                                               \
            for (int64_t cc = ca; cc < cb; cc++) {                                         \
                int64_t i = rr * w + cc;                                                   \
                if (fr[i] > lo[i] &&                                                       \
                    (fr[i] == TMAX || NAME##_signal(fr, dark, gain, i) > xray_level))      \
                    return 1;                                                              \
            }                                                                              \
        return 0;                                                                          \
    }                                                                                      \
                                                                                           \
    static uint8_t NAME##_subpixel(const T *fr, const T *dark, const uint16_t *gain,       \
                                   int64_t r, int64_t c, int64_t h, int64_t w) {           \
        int64_t total = 0, ty = 0, tx = 0;                                                 \
        for (int dy = -1; dy <= 1; dy++) {                                                 \
            int64_t rr = r + dy;                                                           \
            if (rr < 0 || rr >= h) continue;                                               \
            for (int dx = -1; dx <= 1; dx++) {                                             \
                int64_t cc = c + dx;                                                       \
                if (cc < 0 || cc >= w) continue;                                           \
                int64_t v = NAME##_signal(fr, dark, gain, rr * w + cc);                    \
                if (v > 0) {                                                               \
                    total += v;                                                            \
                    ty += dy * v;                                                          \
                    tx += dx * v;                                                          \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        int64_t qy = quantise(2 * total + 4 * ty, total);                                  \
        int64_t qx = quantise(2 * total + 4 * tx, total);                                  \
        return (uint8_t)((qy << 2) | qx);                                                  \
    }                                                                                      \
                                                                                           \
    /* Returns the number of events, or -1 when cap is too small. gain may be NULL. */     \
    int64_t NAME(const T *frames, int64_t n, int64_t h, int64_t w, const T *lo,            \
                 const T *dark, const uint16_t *gain, int64_t xray_level, int64_t radius,  \
                 int32_t want_sub, int64_t cap, uint32_t *out_idx, uint8_t *out_sub,       \
                 int64_t *offsets) {                                                       \
        int64_t k = 0;                                                                     \
        offsets[0] = 0;                                                                    \
        for (int64_t f = 0; f < n; f++) {                                                  \
            const T *fr = frames + f * h * w;                                              \
            for (int64_t r = 0; r < h; r++) {                                              \
                const T *row = fr + r * w;                                                 \
                const T *lrow = lo + r * w;                                                \
                for (int64_t c0 = 0; c0 < w; c0 += BLOCK) {                                \
                    uint64_t bits = 0;                                                     \
                    if (c0 + BLOCK <= w) {                                                 \
                        for (int j = 0; j < BLOCK; j++)                                    \
                            bits |= (uint64_t)(row[c0 + j] > lrow[c0 + j]) << j;           \
                    } else {                                                               \
                        for (int64_t j = 0; j < w - c0; j++)                               \
                            bits |= (uint64_t)(row[c0 + j] > lrow[c0 + j]) << j;           \
                    }                                                                      \
                    while (bits) {                                                         \
                        int64_t c = c0 + __builtin_ctzll(bits);                            \
                        bits &= bits - 1;                                                  \
                        int64_t s = NAME##_signal(fr, dark, gain, r * w + c);              \
                        if (!NAME##_is_local_max(s, fr, lo, dark, gain, r, c, h, w))       \
                            continue;                                                      \
                        if (NAME##_near_xray(fr, lo, dark, gain, xray_level, r, c, h, w,   \
                                             radius))                                      \
                            continue;                                                      \
                        if (k >= cap) return -1;                                           \
                        out_idx[k] = (uint32_t)(r * w + c);                                \
                        if (want_sub) out_sub[k] = NAME##_subpixel(fr, dark, gain, r, c, h, w); \
                        k++;                                                               \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            offsets[f + 1] = k;                                                            \
        }                                                                                  \
        return k;                                                                          \
    }

DEFINE_COUNT(count_u8, uint8_t, UINT8_MAX)
DEFINE_COUNT(count_u16, uint16_t, UINT16_MAX)
DEFINE_COUNT(count_i8, int8_t, INT8_MAX)
DEFINE_COUNT(count_i16, int16_t, INT16_MAX)
