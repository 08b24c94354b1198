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
 *   plateau   = a local max with an equal candidate neighbour stays only when it is the
 *               raster-first pixel of its 8-connected equal-signal candidate plateau and no
 *               candidate next to the plateau is brighter
 *   event     = such a local max with no X-ray hit within Chebyshev distance radius
 *   subpixel  = integer centre of mass of max(s, 0) over the in-frame 3 x 3,
 *               q = clamp(floor((2 S + 4 T) / S), 0, 3), value (qy << 2) | qx
 * Events in ascending flat index r * W + c per frame. Single-threaded on purpose:
 * it is the correctness oracle and the single-core speed anchor.
 *
 * Built on first use by native_ref/__init__.py with cc -O3 -march=native -shared -fPIC.
 */
#include <stdint.h>
#include <stdlib.h>

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
    /* 1 when local max i stands for its plateau; -1 when out of memory. seen: h*w bytes */ \
    static int NAME##_plateau_wins(const T *fr, const T *lo, const T *dark,                \
                                   const uint16_t *gain, int64_t p, int64_t h, int64_t w,  \
                                   uint8_t *seen) {                                        \
        int64_t value = NAME##_signal(fr, dark, gain, p);                                  \
        int64_t cap = 64, n = 1, head = 0;                                                 \
        int64_t *list = malloc(cap * sizeof(int64_t));                                     \
        int result = 1;                                                                    \
        if (!list) return -1;                                                              \
        list[0] = p;                                                                       \
        seen[p] = 1;                                                                       \
        while (head < n && result == 1) {                                                  \
            int64_t q = list[head++], qr = q / w, qc = q % w;                              \
            for (int dy = -1; dy <= 1 && result == 1; dy++) {                              \
                int64_t rr = qr + dy;                                                      \
                if (rr < 0 || rr >= h) continue;                                           \
                for (int dx = -1; dx <= 1; dx++) {                                         \
                    int64_t cc = qc + dx, t = rr * w + cc;                                 \
                    if (cc < 0 || cc >= w || (dy == 0 && dx == 0) || fr[t] <= lo[t])       \
                        continue;                                                          \
                    int64_t st = NAME##_signal(fr, dark, gain, t);                         \
                    if (st > value || (st == value && t < p)) {                            \
                        result = 0;                                                        \
                        break;                                                             \
                    }                                                                      \
                    if (st == value && !seen[t]) {                                         \
                        if (n == cap) {                                                    \
                            int64_t *grown = realloc(list, 2 * cap * sizeof(int64_t));     \
                            if (!grown) { result = -1; break; }                            \
                            list = grown;                                                  \
                            cap *= 2;                                                      \
                        }                                                                  \
                        seen[t] = 1;                                                       \
                        list[n++] = t;                                                     \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int64_t j = 0; j < n; j++) seen[list[j]] = 0;                                 \
        free(list);                                                                        \
        return result;                                                                     \
    }                                                                                      \
                                                                                           \
    static int NAME##_has_equal_neighbour(const T *fr, const T *lo, const T *dark,         \
                                          const uint16_t *gain, int64_t s, int64_t r,      \
                                          int64_t c, int64_t h, int64_t w) {               \
        for (int dy = -1; dy <= 1; dy++) {                                                 \
            int64_t rr = r + dy;                                                           \
            if (rr < 0 || rr >= h) continue;                                               \
            for (int dx = -1; dx <= 1; dx++) {                                             \
                int64_t cc = c + dx, t = rr * w + cc;                                      \
                if (cc < 0 || cc >= w || (dy == 0 && dx == 0) || fr[t] <= lo[t]) continue; \
                if (NAME##_signal(fr, dark, gain, t) == s) return 1;                       \
            }                                                                              \
        }                                                                                  \
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
    /* Returns the number of events, -1 when cap is too small, -2 when out of memory.      \
       gain may be NULL. */                                                                \
    int64_t NAME(const T *frames, int64_t n, int64_t h, int64_t w, const T *lo,            \
                 const T *dark, const uint16_t *gain, int64_t xray_level, int64_t radius,  \
                 int32_t want_sub, int64_t cap, uint32_t *out_idx, uint8_t *out_sub,       \
                 int64_t *offsets) {                                                       \
        int64_t k = 0;                                                                     \
        uint8_t *seen = NULL; /* plateau walks, allocated on first need */                 \
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
                        if (NAME##_has_equal_neighbour(fr, lo, dark, gain, s, r, c, h, w)) { \
                            if (!seen && !(seen = calloc(h * w, 1))) return -2;            \
                            int won = NAME##_plateau_wins(fr, lo, dark, gain, r * w + c, h, w, \
                                                          seen);                           \
                            if (won < 0) { free(seen); return -2; }                        \
                            if (!won) continue;                                            \
                        }                                                                  \
                        if (NAME##_near_xray(fr, lo, dark, gain, xray_level, r, c, h, w,   \
                                             radius))                                      \
                            continue;                                                      \
                        if (k >= cap) { free(seen); return -1; }                           \
                        out_idx[k] = (uint32_t)(r * w + c);                                \
                        if (want_sub) out_sub[k] = NAME##_subpixel(fr, dark, gain, r, c, h, w); \
                        k++;                                                               \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            offsets[f + 1] = k;                                                            \
        }                                                                                  \
        free(seen);                                                                        \
        return k;                                                                          \
    }

DEFINE_COUNT(count_u8, uint8_t, UINT8_MAX)
DEFINE_COUNT(count_u16, uint16_t, UINT16_MAX)
DEFINE_COUNT(count_i8, int8_t, INT8_MAX)
DEFINE_COUNT(count_i16, int16_t, INT16_MAX)
