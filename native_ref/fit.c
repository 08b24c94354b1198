/*
 * native_ref/fit.c - plain C twin of streamstore's cloud fit (one electron or two
 * in a 5 x 5 window), and of the cutting of its inputs (fit_window_pixels,
 * fit_neighbours, at the end).
 *
 * Same semantics as streamstore/counting/_fit_reference.py, bit for bit: every
 * double operation in the reference's order (compiled with -ffp-contract=off, so
 * no fused multiply-add):
 *   table     = linear interpolation of the cloud's cdf and pdf at u (widths)
 *   cloud     = (a * sy[i]) * sx[j], sy[i] = cdf((i - 1 - y) / s) - cdf((i - 2 - y) / s)
 *   chi2      = sum over q of (iv[q] * r) * r, r = win[q] - model[q]
 *   fit       = Levenberg-Marquardt, Cholesky of the damped normal equations
 *   one cloud = the event's, from the centre of mass of the positive charge of the
 *               central 3 x 3, fitted with its neighbours' clouds
 *   two       = only where that leaves chi2 > drop[k]: the event's cloud as two, from
 *               the pixel of greatest residual mirrored, then each start offset
 * conf = {iters one, iters two, lam first, lam least, lam greatest, tol, width least,
 * width greatest, 1 / the width's spread}. The event's cloud width is free in its one-cloud fit and s0 in its
 * two-cloud fit; the neighbours' is s0.
 * Output per window: chi2 one, chi2 two, a, y, x (one cloud), a1, y1, x1, a2, y2, x2,
 * width one, width two.
 */
#include <math.h>
#include <stdint.h>

#define FT_CLOUDS 6 /* the event's two clouds and up to 4 neighbours' */
#define FT_P (1 + 3 * FT_CLOUDS) /* the event's width, then three a cloud */

typedef struct {
    const double *cdf, *pdf;
    int64_t n;
    double t0, inv_h;
} ft_table;

static void ft_lookup(const ft_table *tb, double t, double *c, double *p) {
    double x = (t - tb->t0) * tb->inv_h;
    if (x < 0.0) x = 0.0;
    if (x > (double)tb->n - 1.0) x = (double)tb->n - 1.0;
    int64_t k = (int64_t)floor(x);
    if (k > tb->n - 2) k = tb->n - 2;
    double f = x - (double)k;
    *c = tb->cdf[k] + f * (tb->cdf[k + 1] - tb->cdf[k]);
    *p = tb->pdf[k] + f * (tb->pdf[k + 1] - tb->pdf[k]);
}

static void ft_shares(const ft_table *tb, double mu, double sw, double *s, double *d,
                      double *dw) {
    double lo_c, lo_p, hi_c, hi_p;
    double lo_u = (-2.0 - mu) / sw;
    ft_lookup(tb, lo_u, &lo_c, &lo_p);
    for (int k = 0; k < 5; k++) {
        double u = ((double)k - 1.0 - mu) / sw;
        ft_lookup(tb, u, &hi_c, &hi_p);
        s[k] = hi_c - lo_c;
        d[k] = -(hi_p - lo_p) / sw;
        dw[k] = -(hi_p * u - lo_p * lo_u) / sw;
        lo_c = hi_c;
        lo_p = hi_p;
        lo_u = u;
    }
}

/* model m and derivatives jac (25 x FT_P, row-major) at p: the event's width p[0],
   its ne clouds, then the neighbours' (width s0); the chi-square, infinite where
   the width leaves [conf[6], conf[7]] */
static double ft_chi2(const double *p, int ne, int nc, const double *w, const double *iv,
                      const ft_table *tb, double s0, const double *conf, double *m,
                      double *jac) {
    if (!(conf[6] <= p[0] && p[0] <= conf[7])) return INFINITY;
    double sy[5], dy[5], wy[5], sx[5], dx[5], wx[5];
    for (int q = 0; q < 25; q++) {
        m[q] = 0.0;
        jac[q * FT_P] = 0.0;
    }
    for (int c = 0; c < nc; c++) {
        double a = p[1 + 3 * c];
        double sw = c < ne ? p[0] : s0;
        ft_shares(tb, p[2 + 3 * c], sw, sy, dy, wy);
        ft_shares(tb, p[3 + 3 * c], sw, sx, dx, wx);
        for (int i = 0; i < 5; i++) {
            for (int j = 0; j < 5; j++) {
                int q = 5 * i + j;
                m[q] = m[q] + (a * sy[i]) * sx[j];
                jac[q * FT_P + 1 + 3 * c] = sy[i] * sx[j];
                jac[q * FT_P + 2 + 3 * c] = (a * dy[i]) * sx[j];
                jac[q * FT_P + 3 + 3 * c] = (a * sy[i]) * dx[j];
                if (c < ne)
                    jac[q * FT_P] = jac[q * FT_P] + ((a * wy[i]) * sx[j] + (a * sy[i]) * wx[j]);
            }
        }
    }
    double t = 0.0;
    for (int q = 0; q < 25; q++) {
        double r = w[q] - m[q];
        t = t + (iv[q] * r) * r;
    }
    double d = (p[0] - s0) * conf[8];
    return t + d * d;
}

/* Levenberg-Marquardt over the parameters f onwards (f = 1: the width held) */
static double ft_lm(double *p, int ne, int nc, const double *w, const double *iv,
                    const ft_table *tb, double s0, int64_t iters, int f, const double *conf) {
    int n = 1 + 3 * nc;
    double m[25], jac[25 * FT_P], A[FT_P][FT_P], L[FT_P][FT_P], g[FT_P], z[FT_P], step[FT_P],
        trial[FT_P];
    double lam = conf[2];
    double cur = ft_chi2(p, ne, nc, w, iv, tb, s0, conf, m, jac);
    for (int a = 0; a < f; a++) trial[a] = p[a];
    for (int64_t it = 0; it < iters; it++) {
        for (int a = f; a < n; a++) {
            for (int b = f; b <= a; b++) {
                double t = 0.0;
                for (int q = 0; q < 25; q++) t = t + (iv[q] * jac[q * FT_P + a]) * jac[q * FT_P + b];
                if (a == 0) t = t + conf[8] * conf[8];
                A[a][b] = t;
            }
            double t = 0.0;
            for (int q = 0; q < 25; q++) t = t + (iv[q] * jac[q * FT_P + a]) * (w[q] - m[q]);
            if (a == 0) t = t - ((p[0] - s0) * conf[8]) * conf[8];
            g[a] = t;
        }
        int taken = 0, done = 0;
        while (!taken && !done && lam <= conf[4]) {
            int ok = 1;
            for (int a = f; a < n && ok; a++) {
                for (int b = f; b <= a; b++) {
                    double t = A[a][b];
                    if (a == b) t = t + lam * A[a][a];
                    for (int k = f; k < b; k++) t = t - L[a][k] * L[b][k];
                    if (a == b) {
                        if (t <= 0.0) {
                            ok = 0;
                            break;
                        }
                        L[a][a] = sqrt(t);
                    } else {
                        L[a][b] = t / L[b][b];
                    }
                }
            }
            if (ok) {
                for (int a = f; a < n; a++) {
                    double t = g[a];
                    for (int k = f; k < a; k++) t = t - L[a][k] * z[k];
                    z[a] = t / L[a][a];
                }
                for (int a = n - 1; a >= f; a--) {
                    double t = z[a];
                    for (int k = a + 1; k < n; k++) t = t - L[k][a] * step[k];
                    step[a] = t / L[a][a];
                }
                for (int a = f; a < n; a++) trial[a] = p[a] + step[a];
                double nw = ft_chi2(trial, ne, nc, w, iv, tb, s0, conf, m, jac);
                if (nw < cur) {
                    done = cur - nw <= conf[5] * cur;
                    cur = nw;
                    for (int a = f; a < n; a++) p[a] = trial[a];
                    lam = lam * 0.1;
                    if (lam < conf[3]) lam = conf[3];
                    taken = 1;
                } else {
                    double pred = 0.0;
                    for (int a = f; a < n; a++) pred = pred + step[a] * g[a];
                    done = pred <= conf[5] * cur;
                }
            }
            if (!taken && !done) lam = lam * 10.0;
        }
        if (!taken || done) break;
    }
    return cur;
}

int64_t fit_windows(const double *win, const double *iv, const double *nb, const int64_t *nn,
                    int64_t m, int64_t k_max, const double *cdf, const double *pdf, int64_t n_tab,
                    double t0, double inv_h, double s0, const double *drop, const double *starts,
                    int64_t n_starts, const double *conf, double *out) {
    if (k_max > FT_CLOUDS - 2) return -1;
    ft_table tb = {cdf, pdf, n_tab, t0, inv_h};
    for (int64_t k = 0; k < m; k++) {
        const double *w = win + 25 * k;
        const double *wt = iv + 25 * k;
        double *o = out + 13 * k;
        int64_t n_nb = nn[k];
        if (n_nb < 0 || n_nb > k_max) return -1;
        double tot = 0.0, ty = 0.0, tx = 0.0;
        for (int i = 1; i < 4; i++) {
            for (int j = 1; j < 4; j++) {
                double v = w[5 * i + j];
                if (v > 0.0) {
                    tot = tot + v;
                    ty = ty + v * (double)(i - 2);
                    tx = tx + v * (double)(j - 2);
                }
            }
        }
        double p1[FT_P], p2[FT_P];
        p1[0] = s0;
        p1[1] = 0.0;
        p1[2] = 0.5;
        p1[3] = 0.5;
        if (tot > 0.0) {
            p1[1] = tot;
            p1[2] = 0.5 + ty / tot;
            p1[3] = 0.5 + tx / tot;
        }
        for (int64_t a = 0; a < 3 * n_nb; a++) p1[4 + a] = nb[(k * k_max) * 3 + a];
        double one = ft_lm(p1, 1, 1 + (int)n_nb, w, wt, &tb, s0, (int64_t)conf[0], 0, conf);
        o[0] = one;
        o[1] = one;
        for (int a = 0; a < 3; a++) o[2 + a] = p1[1 + a];
        for (int a = 5; a < 11; a++) o[a] = 0.0;
        o[11] = p1[0];
        o[12] = 0.0;
        if (!(one > drop[k])) continue;
        double mod[25], jac[25 * FT_P];
        ft_chi2(p1, 1, 1 + (int)n_nb, w, wt, &tb, s0, conf, mod, jac);
        double top = -INFINITY, ry = 0.0, rx = 0.0;
        for (int q = 0; q < 25; q++) {
            if (wt[q] > 0.0 && w[q] - mod[q] > top) {
                top = w[q] - mod[q];
                ry = (((double)(q / 5) - 2.0) + 0.5) - p1[2];
                rx = (((double)(q % 5) - 2.0) + 0.5) - p1[3];
            }
        }
        double best = INFINITY;
        for (int64_t s = -1; s < n_starts; s++) {
            double oy = s < 0 ? ry : starts[2 * s], ox = s < 0 ? rx : starts[2 * s + 1];
            double half = p1[1] * 0.5;
            p2[0] = s0;
            p2[1] = half;
            p2[2] = p1[2] + oy;
            p2[3] = p1[3] + ox;
            p2[4] = half;
            p2[5] = p1[2] - oy;
            p2[6] = p1[3] - ox;
            for (int64_t a = 0; a < 3 * n_nb; a++) p2[7 + a] = p1[4 + a];
            double two = ft_lm(p2, 2, 2 + (int)n_nb, w, wt, &tb, s0, (int64_t)conf[1], 1, conf);
            if (two < best) {
                best = two;
                o[1] = two;
                for (int a = 0; a < 6; a++) o[5 + a] = p2[1 + a];
                o[12] = p2[0];
            }
        }
    }
    return 0;
}

/*
 * The fit's inputs, as streamstore/counting/_fit_reference.py cuts them
 * (window_pixels_reference, neighbours_reference), from int64 frames and maps.
 */

/* Each event's 5 x 5 window: signal, weight 1 / (1 / iv + err^2) written as
 * iv / (1 + iv * err * err), err = model_error * max(s, 0); 0 off the frame and
 * where iv is not above 0; charge = the signal of the central 3 x 3. */
void fit_window_pixels(const int64_t *frames, int64_t h, int64_t w, const int64_t *dark,
                       const int64_t *gain, int32_t has_gain, const double *iv_map,
                       const int64_t *frame_of, const int64_t *r, const int64_t *c, int64_t m,
                       double model_error, double *win, double *wiv, int64_t *charge) {
    for (int64_t i = 0; i < m; i++) {
        const int64_t *fr = frames + frame_of[i] * h * w;
        int64_t total = 0;
        for (int q = 0; q < 25; q++) {
            int dy = q / 5 - 2, dx = q % 5 - 2;
            int64_t rr = r[i] + dy, cc = c[i] + dx;
            win[i * 25 + q] = 0.0;
            wiv[i * 25 + q] = 0.0;
            if (rr < 0 || rr >= h || cc < 0 || cc >= w) continue;
            int64_t p = rr * w + cc;
            double weight = iv_map[p];
            if (!(weight > 0)) continue; /* masked: no charge, no weight */
            int64_t s = fr[p] - dark[p];
            if (has_gain) s *= gain[p];
            double err = model_error * (double)(s > 0 ? s : 0);
            win[i * 25 + q] = (double)s;
            wiv[i * 25 + q] = weight / (1.0 + weight * err * err);
            if (dy >= -1 && dy <= 1 && dx >= -1 && dx <= 1) total += s;
        }
        charge[i] = total;
    }
}

/* numpy's searchsorted of x in the ascending key[0..n): side "left" (first >= x)
 * or "right" (first > x). */
static int64_t nb_search(const int64_t *key, int64_t n, int64_t x, int right) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (key[mid] < x || (right && key[mid] == x)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* The events within Chebyshev distance reach of each event in its frame (key =
 * frame * h * w + pixel, ascending; reach + 1 at most a row), the nearest most of
 * them by Chebyshev then Euclidean distance then list position: nb (m, most, 3)
 * their charge (at least 0) and centre from the event's pixel's corner, nn how
 * many, alone none. ck, ci: room for (2 reach + 1) (reach + 1) keys and events. */
void fit_neighbours(const int64_t *key, const int64_t *r, const int64_t *c,
                    const int64_t *charge, int64_t m, int64_t h, int64_t w, int64_t reach,
                    int64_t most, double *nb, int64_t *nn, uint8_t *alone, int64_t *ck,
                    int64_t *ci) {
    int64_t hw = h * w;
    for (int64_t i = 0; i < m; i++) {
        int64_t base0 = key[i] / hw * hw;
        int64_t left = c[i] - reach > 0 ? c[i] - reach : 0;
        int64_t right = c[i] + reach < w - 1 ? c[i] + reach : w - 1;
        int64_t k = 0;
        for (int64_t dy = -reach; dy <= reach; dy++) {
            int64_t rr = r[i] + dy;
            if (rr < 0 || rr >= h) continue;
            int64_t base = base0 + rr * w;
            int64_t lo = nb_search(key, m, base + left, 0);
            int64_t hi = nb_search(key, m, base + right, 1);
            for (int64_t j = 0; j <= reach; j++) {
                int64_t at = lo + j;
                if (at < hi && at != i) {
                    int64_t dr = r[at] - r[i], dc = c[at] - c[i];
                    int64_t adr = dr < 0 ? -dr : dr, adc = dc < 0 ? -dc : dc;
                    int64_t cheb = adr > adc ? adr : adc;
                    ck[k] = (cheb * 64 + dr * dr + dc * dc) * ((int64_t)1 << 36) + at;
                    ci[k] = at;
                    k++;
                }
            }
        }
        alone[i] = k == 0;
        nn[i] = k < most ? k : most;
        for (int64_t s = 0; s < nn[i]; s++) { /* the nearest first */
            int64_t b = s;
            for (int64_t t = s + 1; t < k; t++)
                if (ck[t] < ck[b]) b = t;
            int64_t tk = ck[s], ti = ci[s];
            ck[s] = ck[b]; ci[s] = ci[b];
            ck[b] = tk; ci[b] = ti;
            int64_t at = ci[s];
            double *o = nb + (i * most + s) * 3;
            o[0] = (double)(charge[at] > 0 ? charge[at] : 0);
            o[1] = (double)(r[at] - r[i]) + 0.5;
            o[2] = (double)(c[at] - c[i]) + 0.5;
        }
    }
}
