/*
 * native_ref/resolve.c - plain C twin of streamstore's "resolve" counting rule.
 *
 * Same semantics as streamstore/counting/_resolve_reference.py, bit for bit
 * (TMAX = largest value of the frame type):
 *   masked    = lo_c(p) == TMAX; s(p) = (raw - dark) * gain in int64, 0 when masked
 *   candidate = raw(p) > lo_c(p); X-ray = candidate and (raw == TMAX or s > xray_level)
 *   local max = candidate whose key (s, -flat index) beats every candidate 8-neighbour
 *   accepted  = raw > lo (peak rule), or a 2 x 2 quadrant holding p with sum(s) > qthr at
 *               its top-left corner and p's key beating every candidate at Chebyshev
 *               distance 2 (charge rule); and no X-ray within Chebyshev distance radius
 *   split     = partner q: brightest unmasked 8-neighbour (raster-first on ties); S the
 *               charge over the pixels within 1 of p or q, anisotropy of its second
 *               moments along and across p-q (float64, the reference's order);
 *               16 S >= any16 E, or 16 S >= pair16 E and the anisotropy test, and p beating
 *               every candidate at Chebyshev distance 2, none a local max: a second event
 *               at q (one per pixel: the lowest origin's)
 *   subpixel  = centre of mass of max(s, 0) over the in-frame 3 x 3, weights 2/1/0 by
 *               side for the two events of a split
 * One frame per call; events in ascending flat index.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t idx;
    int64_t seq;
    uint8_t sub;
} rs_item;

static int rs_cmp(const void *a, const void *b) {
    const rs_item *x = a, *y = b;
    if (x->idx != y->idx) return x->idx < y->idx ? -1 : 1;
    return x->seq < y->seq ? -1 : (x->seq > y->seq);
}

static inline int64_t rs_quantise(int64_t num, int64_t den) {
    if (num < 0) return 0;
    int64_t q = num / (den > 1 ? den : 1);
    return q > 3 ? 3 : q;
}

static uint8_t rs_centroid(const int64_t *s, int64_t h, int64_t w, int64_t r, int64_t c,
                           int64_t br, int64_t bc, int partner) {
    int64_t total = 0, ty = 0, tx = 0;
    for (int dy = -1; dy <= 1; dy++) {
        int64_t rr = r + dy;
        if (rr < 0 || rr >= h) continue;
        for (int dx = -1; dx <= 1; dx++) {
            int64_t cc = c + dx;
            if (cc < 0 || cc >= w) continue;
            int64_t wv = s[rr * w + cc];
            if (wv < 0) wv = 0;
            if (partner) {
                int64_t da = dy * dy + dx * dx;
                int64_t db = (rr - br) * (rr - br) + (cc - bc) * (cc - bc);
                if (da < db) wv *= 2;
                else if (da > db) wv = 0;
            }
            total += wv;
            ty += dy * wv;
            tx += dx * wv;
        }
    }
    int64_t qy = rs_quantise(2 * total + 4 * ty, total);
    int64_t qx = rs_quantise(2 * total + 4 * tx, total);
    return (uint8_t)((qy << 2) | qx);
}

/* does the key of r*w+c beat candidate (rr, cc)? 1 when (rr, cc) is outside or no candidate */
static inline int rs_beats(const int64_t *s, const uint8_t *cand, int64_t h, int64_t w,
                           int64_t r, int64_t c, int64_t rr, int64_t cc) {
    if (rr < 0 || rr >= h || cc < 0 || cc >= w || !cand[rr * w + cc]) return 1;
    if (rr < r || (rr == r && cc < c)) return s[r * w + c] > s[rr * w + cc];
    return s[r * w + c] >= s[rr * w + cc];
}

/* does the key of (r, c) beat every candidate at Chebyshev distance 2? */
static int rs_wide(const int64_t *s, const uint8_t *cand, int64_t h, int64_t w, int64_t r,
                   int64_t c) {
    for (int dy = -2; dy <= 2; dy++)
        for (int dx = -2; dx <= 2; dx++)
            if ((abs(dy) == 2 || abs(dx) == 2) && !rs_beats(s, cand, h, w, r, c, r + dy, c + dx))
                return 0;
    return 1;
}

/* rule 3 at (r, c): an in-frame candidate beating every candidate 8-neighbour */
static int rs_is_local_max(const int64_t *s, const uint8_t *cand, int64_t h, int64_t w,
                           int64_t r, int64_t c) {
    if (r < 0 || r >= h || c < 0 || c >= w || !cand[r * w + c]) return 0;
    for (int dy = -1; dy <= 1; dy++)
        for (int dx = -1; dx <= 1; dx++)
            if ((dy || dx) && !rs_beats(s, cand, h, w, r, c, r + dy, c + dx)) return 0;
    return 1;
}

/* no local maximum at Chebyshev distance 2 of (r, c) */
static int rs_lonely(const int64_t *s, const uint8_t *cand, int64_t h, int64_t w, int64_t r,
                     int64_t c) {
    for (int dy = -2; dy <= 2; dy++)
        for (int dx = -2; dx <= 2; dx++)
            if ((abs(dy) == 2 || abs(dx) == 2) && rs_is_local_max(s, cand, h, w, r + dy, c + dx))
                return 0;
    return 1;
}

/* the events of one frame from its signal and flags; returns the count, -2 out of memory */
static int64_t rs_frame(const int64_t *s, const uint8_t *cand, const uint8_t *xray,
                        const uint8_t *okp, const uint8_t *peak, const int64_t *qthr,
                        int64_t h, int64_t w, int64_t radius, int subpixel, int64_t e_unit,
                        int64_t pair16, int64_t any16, int64_t spread16, uint32_t *out_idx,
                        uint8_t *out_sub) {
    int64_t n_cand = 0;
    for (int64_t i = 0; i < h * w; i++) n_cand += cand[i];
    rs_item *items = malloc((size_t)(2 * n_cand + 1) * sizeof(rs_item));
    if (!items) return -2;
    int64_t n = 0, seq = 0;
    for (int64_t r = 0; r < h; r++) {
        for (int64_t c = 0; c < w; c++) {
            if (!cand[r * w + c]) continue;
            int is_max = 1;
            for (int dy = -1; dy <= 1 && is_max; dy++)
                for (int dx = -1; dx <= 1; dx++)
                    if ((dy || dx) && !rs_beats(s, cand, h, w, r, c, r + dy, c + dx)) {
                        is_max = 0;
                        break;
                    }
            if (!is_max) continue;
            if (!peak[r * w + c]) {
                int charged = 0;
                for (int64_t r0 = r - 1; r0 <= r; r0++)
                    for (int64_t c0 = c - 1; c0 <= c; c0++) {
                        if (r0 < 0 || c0 < 0 || r0 >= h - 1 || c0 >= w - 1) continue;
                        int64_t quad = s[r0 * w + c0] + s[r0 * w + c0 + 1] +
                                       s[(r0 + 1) * w + c0] + s[(r0 + 1) * w + c0 + 1];
                        if (quad > qthr[r0 * w + c0]) charged = 1;
                    }
                if (!charged) continue;
                if (!rs_wide(s, cand, h, w, r, c)) continue;
            }
            int near = 0;
            int64_t ra = r - radius < 0 ? 0 : r - radius;
            int64_t rb = r + radius + 1 > h ? h : r + radius + 1;
            int64_t ca = c - radius < 0 ? 0 : c - radius;
            int64_t cb = c + radius + 1 > w ? w : c + radius + 1;
            for (int64_t rr = ra; rr < rb && !near; rr++)
                for (int64_t cc = ca; cc < cb; cc++)
                    if (xray[rr * w + cc]) {
                        near = 1;
                        break;
                    }
            if (near) continue;
            int has = 0, ey = 0, ex = 0;
            int64_t best = 0;
            for (int dy = -1; dy <= 1; dy++) {
                int64_t rr = r + dy;
                if (rr < 0 || rr >= h) continue;
                for (int dx = -1; dx <= 1; dx++) {
                    int64_t cc = c + dx;
                    if ((dy == 0 && dx == 0) || cc < 0 || cc >= w || !okp[rr * w + cc]) continue;
                    if (!has || s[rr * w + cc] > best) {
                        has = 1;
                        best = s[rr * w + cc];
                        ey = dy;
                        ex = dx;
                    }
                }
            }
            int split = 0;
            if (has && rs_wide(s, cand, h, w, r, c) && rs_lonely(s, cand, h, w, r, c)) {
                int64_t e2 = ey * ey + ex * ex, big = 0, su = 0, suu = 0, sv = 0, svv = 0;
                for (int dy = -2; dy <= 2; dy++) {
                    int64_t rr = r + dy;
                    if (rr < 0 || rr >= h) continue;
                    for (int dx = -2; dx <= 2; dx++) {
                        int64_t cc = c + dx;
                        if (cc < 0 || cc >= w) continue;
                        int ady = abs(dy), adx = abs(dx);
                        int inside = (ady <= 1 && adx <= 1) ||
                                     (abs(dy - ey) <= 1 && abs(dx - ex) <= 1);
                        if (!inside) continue;
                        int64_t v = s[rr * w + cc];
                        int64_t u = 2 * (dy * ey + dx * ex) - e2;
                        int64_t x = 2 * (dy * ex - dx * ey);
                        big += v;
                        su += v * u;
                        suu += v * u * u;
                        sv += v * x;
                        svv += v * x * x;
                    }
                }
                /* float64 in the reference's order; built with -ffp-contract=off (no FMA) */
                double fs = (double)big;
                double a = fs * (double)suu - (double)su * (double)su;
                double b = fs * (double)svv - (double)sv * (double)sv;
                int elongated = 16.0 * (a - b) >= (double)(spread16 * 4 * e2) * (fs * fs);
                split = 16 * big >= any16 * e_unit || (16 * big >= pair16 * e_unit && elongated);
            }
            items[n].idx = r * w + c;
            items[n].seq = seq++;
            items[n].sub = subpixel ? rs_centroid(s, h, w, r, c, r + ey, c + ex, split) : 0;
            n++;
            if (split) {
                items[n].idx = (r + ey) * w + (c + ex);
                items[n].seq = seq++;
                items[n].sub = subpixel ? rs_centroid(s, h, w, r + ey, c + ex, r, c, 1) : 0;
                n++;
            }
        }
    }
    /* an accepted pixel is never a partner (no two local maxima are adjacent), so equal
       indices are splits to one pixel: the first in origin order stays */
    qsort(items, (size_t)n, sizeof(rs_item), rs_cmp);
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (k > 0 && (int64_t)out_idx[k - 1] == items[i].idx) continue;
        out_idx[k] = (uint32_t)items[i].idx;
        if (subpixel) out_sub[k] = items[i].sub;
        k++;
    }
    free(items);
    return k;
}

#define DEFINE_RESOLVE(NAME, T, TMAX)                                                      \
    int64_t NAME(const T *frames, int64_t nf, int64_t h, int64_t w, const T *lo,           \
                 const T *lo_c, const T *dark, const uint16_t *gain, const int64_t *qthr,  \
                 int64_t xray_level, int64_t radius, int32_t subpixel, int64_t e_unit,     \
                 int64_t pair16, int64_t any16, int64_t spread16, uint32_t *out_idx,       \
                 uint8_t *out_sub, int64_t *offsets) {                                     \
        int64_t npix = h * w, k = 0;                                                       \
        int64_t *s = malloc((size_t)(npix ? npix : 1) * sizeof(int64_t));                  \
        uint8_t *flags = malloc((size_t)(npix ? npix : 1) * 4);                            \
        if (!s || !flags) { free(s); free(flags); return -2; }                             \
        uint8_t *cand = flags, *xray = flags + npix, *okp = flags + 2 * npix;              \
        uint8_t *peak = flags + 3 * npix;                                                  \
        offsets[0] = 0;                                                                    \
        for (int64_t f = 0; f < nf; f++) {                                                 \
            const T *fr = frames + f * npix;                                               \
            for (int64_t i = 0; i < npix; i++) {                                           \
                T v = fr[i];                                                               \
                int ok = lo_c[i] != TMAX;                                                  \
                int64_t sv = 0;                                                            \
                if (ok) {                                                                  \
                    sv = (int64_t)v - (int64_t)dark[i];                                    \
                    if (gain) sv *= (int64_t)gain[i];                                      \
                }                                                                          \
                s[i] = sv;                                                                 \
                okp[i] = (uint8_t)ok;                                                      \
                cand[i] = v > lo_c[i];                                                     \
                peak[i] = v > lo[i];                                                       \
                xray[i] = cand[i] && (v == TMAX || sv > xray_level);                       \
            }                                                                              \
            int64_t got = rs_frame(s, cand, xray, okp, peak, qthr, h, w, radius, subpixel, \
                                   e_unit, pair16, any16, spread16, out_idx + k,           \
                                   subpixel ? out_sub + k : out_sub);                      \
            if (got < 0) { free(s); free(flags); return got; }                             \
            k += got;                                                                      \
            offsets[f + 1] = k;                                                            \
        }                                                                                  \
        free(s);                                                                           \
        free(flags);                                                                       \
        return k;                                                                          \
    }

DEFINE_RESOLVE(resolve_u8, uint8_t, UINT8_MAX)
DEFINE_RESOLVE(resolve_u16, uint16_t, UINT16_MAX)
DEFINE_RESOLVE(resolve_i8, int8_t, INT8_MAX)
DEFINE_RESOLVE(resolve_i16, int16_t, INT16_MAX)
