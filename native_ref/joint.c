/*
 * native_ref/joint.c - plain C twin of streamstore's joint fit: one frame's electron
 * clouds fitted together (start, refit, add, split, events).
 *
 * Same semantics as streamstore/counting/_joint_reference.py (its module docstring
 * is the specification, its functions the algorithm), bit for bit: every double
 * operation in the reference's order, compiled with -ffp-contract=off (no fused
 * multiply-add). Each jt_* function below is the reference's function of the same
 * name, in the same order:
 *   cloud   = (a * sy[i]) * sx[j] on the 7 x 7 around its pixel, the profile table
 *             interpolated linearly (lookup, shares, draw)
 *   near    = the clouds within reach (a grid of 4 px cells, as the reference's),
 *             the cap of least (d2, index), in ascending index
 *   region  = the union of the 5 x 5 windows of some places, raster order
 *   fit     = Levenberg-Marquardt of a group's clouds, the rest of the model held
 *   frame   = rule 5 (starts), rule 6 (refit) SWEEPS times, rules 7-8 (add, split)
 *             ROUNDS times at most, rule 6 POLISH times, rule 10a (prune), rule 10
 *             (events)
 * conf = joint_conf()'s JT_NCONF numbers (joint_conf_size; the wrapper checks the count).
 * The clouds' arrays grow as the reference's do: before each add phase to room for
 * every candidate, before each split phase to room for every heavy cloud.
 * One frame per call; the clouds and events are allocated here and released with
 * joint_free.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* conf's entries (joint_conf) */
enum {
    JT_SWEEPS, JT_ROUNDS, JT_REACH, JT_DROP, JT_LEAST, JT_ADD, JT_SPREAD, JT_MAX_STEP,
    JT_MERGE, JT_SPLIT_CHARGE, JT_SPLIT_OFFSET, JT_START_LEAST, JT_GROUP, JT_ITERS, JT_LAM0,
    JT_LAM1, JT_LAM2, JT_TOL, JT_WMIN, JT_WMAX, JT_POLISH, JT_DROP_WIDE, JT_WIDE_CHARGE,
    JT_WIDE_BY, JT_PRUNE, JT_NCONF
};

#define JT_FOOT 3   /* a cloud reaches 3 pixels around its own */
#define JT_CELL 4.0 /* the grid of the neighbour search, pixels a cell */

typedef struct {
    /* the frame */
    const double *signal, *iv;
    double *model;
    int64_t h, w;
    /* the profile table */
    const double *cdf, *pdf;
    int64_t ntab;
    double t0, inv_h;
    const double *conf;
    double e, width;
    /* the clouds (cap rows of 4) and their grid */
    double *cl;
    int64_t cap;
    int64_t *head, *nxt, *cell_of, *cand;
    double *dd;
    int64_t ncy, ncx;
    /* the fit's workspace: m (rmax), jac (rmax, npar), A, L (npar, npar) */
    int64_t npar;
    double *m, *jac, *A, *L, *g, *z, *step, *trial;
    double sh[6][7];
    int64_t *pr, *pc;
    double *data, *wt;
    /* the groups' buffers */
    int64_t *ids;
    double *P, *S, *P2, *pts;
} jt_state;

#define CL(s, i, j) ((s)->cl[4 * (i) + (j)])

static void jt_lookup(const jt_state *s, double t, double *c, double *p) {
    int64_t n = s->ntab;
    double x = (t - s->t0) * s->inv_h;
    if (x < 0.0) x = 0.0;
    if (x > (double)n - 1.0) x = (double)n - 1.0;
    int64_t k = (int64_t)floor(x);
    if (k > n - 2) k = n - 2;
    double f = x - (double)k;
    *c = s->cdf[k] + f * (s->cdf[k + 1] - s->cdf[k]);
    *p = s->pdf[k] + f * (s->pdf[k + 1] - s->pdf[k]);
}

/* rows row .. row + 2 of sh: shares of pixels lo .. lo + 6, by centre, by width */
static void jt_shares(jt_state *s, double mu, double sw, int64_t lo, int row) {
    double lo_u = ((double)lo - mu) / sw;
    double lo_c, lo_p, hi_c, hi_p;
    jt_lookup(s, lo_u, &lo_c, &lo_p);
    for (int k = 0; k < 7; k++) {
        double u = (((double)(lo + k) + 1.0) - mu) / sw;
        jt_lookup(s, u, &hi_c, &hi_p);
        s->sh[row][k] = hi_c - lo_c;
        s->sh[row + 1][k] = -(hi_p - lo_p) / sw;
        s->sh[row + 2][k] = -(hi_p * u - lo_p * lo_u) / sw;
        lo_c = hi_c;
        lo_p = hi_p;
        lo_u = u;
    }
}

static void jt_draw(jt_state *s, double a, double y, double x, double sw, int sign) {
    int64_t r0 = (int64_t)floor(y) - JT_FOOT;
    int64_t c0 = (int64_t)floor(x) - JT_FOOT;
    jt_shares(s, y, sw, r0, 0);
    jt_shares(s, x, sw, c0, 3);
    for (int i = 0; i < 7; i++) {
        int64_t r = r0 + i;
        if (r < 0 || r >= s->h) continue;
        for (int j = 0; j < 7; j++) {
            int64_t c = c0 + j;
            if (c < 0 || c >= s->w) continue;
            double v = (a * s->sh[0][i]) * s->sh[3][j];
            double *px = s->model + r * s->w + c;
            if (sign > 0) *px = *px + v;
            else *px = *px - v;
        }
    }
}

static int64_t jt_cell(double v, int64_t n) {
    double f = floor((v + JT_CELL) / JT_CELL);
    if (f < 0.0) return 0; /* clamped before the conversion: the same for every finite v */
    if (f > (double)(n - 1)) return n - 1;
    return (int64_t)f;
}

static void jt_grid_put(jt_state *s, int64_t i) {
    int64_t k = jt_cell(CL(s, i, 1), s->ncy) * s->ncx + jt_cell(CL(s, i, 2), s->ncx);
    s->cell_of[i] = k;
    s->nxt[i] = s->head[k];
    s->head[k] = i;
}

/* cloud i out of its cell's list (it is no longer near anything) */
static void jt_grid_drop(jt_state *s, int64_t i) {
    int64_t old = s->cell_of[i];
    if (s->head[old] == i) {
        s->head[old] = s->nxt[i];
    } else {
        int64_t j = s->head[old];
        while (s->nxt[j] != i) j = s->nxt[j];
        s->nxt[j] = s->nxt[i];
    }
    s->nxt[i] = -1;
    s->cell_of[i] = -1;
}

static void jt_grid_move(jt_state *s, int64_t i) {
    int64_t k = jt_cell(CL(s, i, 1), s->ncy) * s->ncx + jt_cell(CL(s, i, 2), s->ncx);
    if (k == s->cell_of[i]) return;
    jt_grid_drop(s, i);
    s->cell_of[i] = k;
    s->nxt[i] = s->head[k];
    s->head[k] = i;
}

/* rule 2 into ids; how many */
static int64_t jt_near(jt_state *s, double y, double x, int64_t cap, int64_t *ids) {
    double reach = s->conf[JT_REACH];
    double r2 = reach * reach;
    int64_t *cand = s->cand;
    double *dd = s->dd;
    int64_t cnt = 0;
    int64_t cy1 = jt_cell(y + reach, s->ncy), cx0 = jt_cell(x - reach, s->ncx),
            cx1 = jt_cell(x + reach, s->ncx);
    for (int64_t cy = jt_cell(y - reach, s->ncy); cy <= cy1; cy++) {
        for (int64_t cx = cx0; cx <= cx1; cx++) {
            for (int64_t j = s->head[cy * s->ncx + cx]; j >= 0; j = s->nxt[j]) {
                double dy = CL(s, j, 1) - y;
                double dx = CL(s, j, 2) - x;
                double d2 = dy * dy + dx * dx;
                if (d2 < r2) {
                    cand[cnt] = j;
                    dd[cnt] = d2;
                    cnt++;
                }
            }
        }
    }
    if (cnt > cap) { /* the cap nearest, by distance then index, to the front */
        for (int64_t a = 0; a < cap; a++) {
            int64_t best = a;
            for (int64_t b = a + 1; b < cnt; b++)
                if (dd[b] < dd[best] || (dd[b] == dd[best] && cand[b] < cand[best])) best = b;
            int64_t t = cand[a];
            cand[a] = cand[best];
            cand[best] = t;
            double u = dd[a];
            dd[a] = dd[best];
            dd[best] = u;
        }
        cnt = cap;
    }
    for (int64_t a = 0; a < cnt; a++) { /* ascending index */
        ids[a] = cand[a];
        for (int64_t b = a; b > 0 && ids[b - 1] > ids[b]; b--) {
            int64_t t = ids[b - 1];
            ids[b - 1] = ids[b];
            ids[b] = t;
        }
    }
    return cnt;
}

/* rule 3 of places pts[:npts] into (pr, pc); how many pixels */
static int64_t jt_region(jt_state *s, const double *pts, int64_t npts) {
    int64_t h = s->h, w = s->w;
    int64_t rlo = h, rhi = -1, clo = w, chi = -1;
    for (int64_t k = 0; k < npts; k++) {
        int64_t r = (int64_t)floor(pts[2 * k]);
        int64_t c = (int64_t)floor(pts[2 * k + 1]);
        if (r - 2 < rlo) rlo = r - 2;
        if (r + 2 > rhi) rhi = r + 2;
        if (c - 2 < clo) clo = c - 2;
        if (c + 2 > chi) chi = c + 2;
    }
    int64_t n = 0;
    int64_t r_end = rhi < h - 1 ? rhi : h - 1, c_end = chi < w - 1 ? chi : w - 1;
    for (int64_t r = rlo > 0 ? rlo : 0; r <= r_end; r++) {
        for (int64_t c = clo > 0 ? clo : 0; c <= c_end; c++) {
            int inside = 0;
            for (int64_t k = 0; k < npts; k++) {
                int64_t dr = r - (int64_t)floor(pts[2 * k]);
                int64_t dc = c - (int64_t)floor(pts[2 * k + 1]);
                if (llabs(dr) <= 2 && llabs(dc) <= 2) {
                    inside = 1;
                    break;
                }
            }
            if (inside) {
                s->pr[n] = r;
                s->pc[n] = c;
                n++;
            }
        }
    }
    return n;
}

/* rule 4's chi-square of the clouds P[:4 kk]; the model m and derivatives jac on the
   region (nothing where infinite) */
static double jt_chi2(jt_state *s, const double *P, int64_t kk, int64_t npix) {
    const double *conf = s->conf;
    double inv_sp = 1.0 / conf[JT_SPREAD];
    int64_t np = s->npar;
    double *m = s->m, *jac = s->jac;
    for (int64_t c = 0; c < kk; c++) {
        double sw = P[4 * c + 3], y = P[4 * c + 1], x = P[4 * c + 2];
        if (!(conf[JT_WMIN] <= sw && sw <= conf[JT_WMAX])) return INFINITY;
        if (!(-3.0 <= y && y < (double)s->h + 3.0 && -3.0 <= x && x < (double)s->w + 3.0))
            return INFINITY;
        if (!(P[4 * c] == P[4 * c])) return INFINITY;
    }
    for (int64_t q = 0; q < npix; q++) m[q] = 0.0;
    for (int64_t c = 0; c < kk; c++) {
        double a = P[4 * c], y = P[4 * c + 1], x = P[4 * c + 2], sw = P[4 * c + 3];
        int64_t r0 = (int64_t)floor(y) - JT_FOOT;
        int64_t c0 = (int64_t)floor(x) - JT_FOOT;
        jt_shares(s, y, sw, r0, 0);
        jt_shares(s, x, sw, c0, 3);
        double(*sh)[7] = s->sh;
        for (int64_t q = 0; q < npix; q++) {
            int64_t i = s->pr[q] - r0;
            int64_t j = s->pc[q] - c0;
            double *J = jac + q * np + 4 * c;
            if (0 <= i && i < 7 && 0 <= j && j < 7) {
                m[q] = m[q] + (a * sh[0][i]) * sh[3][j];
                J[0] = sh[0][i] * sh[3][j];
                J[1] = (a * sh[1][i]) * sh[3][j];
                J[2] = (a * sh[0][i]) * sh[4][j];
                J[3] = (a * sh[2][i]) * sh[3][j] + (a * sh[0][i]) * sh[5][j];
            } else {
                J[0] = 0.0;
                J[1] = 0.0;
                J[2] = 0.0;
                J[3] = 0.0;
            }
        }
    }
    double t = 0.0;
    for (int64_t q = 0; q < npix; q++) {
        double r = s->data[q] - m[q];
        t = t + (s->wt[q] * r) * r;
    }
    for (int64_t c = 0; c < kk; c++) {
        double d = (P[4 * c + 3] - s->width) * inv_sp;
        t = t + d * d;
    }
    return t;
}

/* Levenberg-Marquardt from P (changed in place); the final chi-square */
static double jt_lm(jt_state *s, double *P, int64_t kk, int64_t npix) {
    const double *conf = s->conf;
    int64_t np = s->npar;
    double *m = s->m, *jac = s->jac, *A = s->A, *L = s->L, *g = s->g, *z = s->z,
           *step = s->step, *trial = s->trial;
    const double *data = s->data, *wt = s->wt;
    double inv_sp = 1.0 / conf[JT_SPREAD];
    int64_t n = 4 * kk;
    double lam = conf[JT_LAM0];
    double cur = jt_chi2(s, P, kk, npix);
    if (!(cur < INFINITY)) return cur;
    int64_t iters = (int64_t)conf[JT_ITERS];
    for (int64_t it = 0; it < iters; it++) {
        for (int64_t a = 0; a < n; a++) {
            for (int64_t b = 0; b <= a; b++) {
                double t = 0.0;
                for (int64_t q = 0; q < npix; q++)
                    t = t + (wt[q] * jac[q * np + a]) * jac[q * np + b];
                if (a == b && a % 4 == 3) t = t + inv_sp * inv_sp;
                A[a * np + b] = t;
            }
            double t = 0.0;
            for (int64_t q = 0; q < npix; q++) t = t + (wt[q] * jac[q * np + a]) * (data[q] - m[q]);
            if (a % 4 == 3) t = t - ((P[a] - s->width) * inv_sp) * inv_sp;
            g[a] = t;
        }
        int taken = 0, done = 0;
        while (!taken && !done && lam <= conf[JT_LAM2]) {
            int ok = 1;
            for (int64_t a = 0; a < n; a++) {
                for (int64_t b = 0; b <= a; b++) {
                    double t = A[a * np + b];
                    if (a == b) t = t + lam * A[a * np + a];
                    for (int64_t k = 0; k < b; k++) t = t - L[a * np + k] * L[b * np + k];
                    if (a == b) {
                        if (t <= 0.0) {
                            ok = 0;
                            break;
                        }
                        L[a * np + a] = sqrt(t);
                    } else {
                        L[a * np + b] = t / L[b * np + b];
                    }
                }
                if (!ok) break;
            }
            if (ok) {
                for (int64_t a = 0; a < n; a++) {
                    double t = g[a];
                    for (int64_t k = 0; k < a; k++) t = t - L[a * np + k] * z[k];
                    z[a] = t / L[a * np + a];
                }
                for (int64_t a = n - 1; a >= 0; a--) {
                    double t = z[a];
                    for (int64_t k = a + 1; k < n; k++) t = t - L[k * np + a] * step[k];
                    step[a] = t / L[a * np + a];
                }
                for (int64_t a = 0; a < n; a++) trial[a] = P[a] + step[a];
                double nw = jt_chi2(s, trial, kk, npix);
                if (nw < cur) {
                    done = cur - nw <= conf[JT_TOL] * cur;
                    cur = nw;
                    for (int64_t a = 0; a < n; a++) P[a] = trial[a];
                    double lo = lam * 0.1; /* Python's max(lam * 0.1, LAM1) */
                    lam = conf[JT_LAM1] > lo ? conf[JT_LAM1] : lo;
                    taken = 1;
                } else {
                    double pred = 0.0;
                    for (int64_t a = 0; a < n; a++) pred = pred + step[a] * g[a];
                    done = pred <= conf[JT_TOL] * cur;
                }
            }
            if (!taken && !done) lam = lam * 10.0;
        }
        if (!taken || done) break;
    }
    return cur;
}

/* rule 4: the clouds ids[:ng] (as they stand) fitted from P[:4 kk] (changed in place)
   on the region of pts[:npts]; the chi-square */
static double jt_fit(jt_state *s, const int64_t *ids, int64_t ng, double *P, int64_t kk,
                     const double *pts, int64_t npts) {
    int64_t w = s->w;
    int64_t npix = jt_region(s, pts, npts);
    double *data = s->data;
    for (int64_t q = 0; q < npix; q++) data[q] = s->model[s->pr[q] * w + s->pc[q]];
    for (int64_t k = 0; k < ng; k++) {
        int64_t i = ids[k];
        int64_t r0 = (int64_t)floor(CL(s, i, 1)) - JT_FOOT;
        int64_t c0 = (int64_t)floor(CL(s, i, 2)) - JT_FOOT;
        jt_shares(s, CL(s, i, 1), CL(s, i, 3), r0, 0);
        jt_shares(s, CL(s, i, 2), CL(s, i, 3), c0, 3);
        for (int64_t q = 0; q < npix; q++) {
            int64_t a = s->pr[q] - r0;
            int64_t b = s->pc[q] - c0;
            if (0 <= a && a < 7 && 0 <= b && b < 7)
                data[q] = data[q] - (CL(s, i, 0) * s->sh[0][a]) * s->sh[3][b];
        }
    }
    for (int64_t q = 0; q < npix; q++) {
        int64_t p = s->pr[q] * w + s->pc[q];
        data[q] = s->signal[p] - data[q];
        s->wt[q] = s->iv[p];
    }
    if (kk == 0 || npix <= 4 * kk) return jt_chi2(s, P, kk, npix);
    return jt_lm(s, P, kk, npix);
}

/* the clouds ids[:ng] become P's first ng, the rest appended from index n; the model
   follows; the new count of clouds */
static int64_t jt_replace(jt_state *s, const int64_t *ids, int64_t ng, const double *P,
                          int64_t kk, int64_t n) {
    for (int64_t k = 0; k < ng; k++) {
        int64_t i = ids[k];
        jt_draw(s, CL(s, i, 0), CL(s, i, 1), CL(s, i, 2), CL(s, i, 3), -1);
    }
    for (int64_t k = 0; k < kk; k++) {
        int64_t i = k < ng ? ids[k] : n + (k - ng);
        for (int j = 0; j < 4; j++) CL(s, i, j) = P[4 * k + j];
        jt_draw(s, CL(s, i, 0), CL(s, i, 1), CL(s, i, 2), CL(s, i, 3), 1);
        if (k < ng) jt_grid_move(s, i);
        else jt_grid_put(s, i);
    }
    return n + kk - ng;
}

/* rule 7's tests of fitted clouds P against their starts S */
static int jt_good(const jt_state *s, const double *P, int64_t kk, const double *S,
                   double least) {
    double step = s->conf[JT_MAX_STEP];
    for (int64_t c = 0; c < kk; c++) {
        for (int j = 0; j < 4; j++) {
            double v = P[4 * c + j];
            if (!(v - v == 0.0)) return 0; /* not a number, or infinite */
        }
        if (!(P[4 * c] > least)) return 0;
        if (!(fabs(P[4 * c + 1] - S[4 * c + 1]) < step)) return 0;
        if (!(fabs(P[4 * c + 2] - S[4 * c + 2]) < step)) return 0;
    }
    double m2 = s->conf[JT_MERGE] * s->conf[JT_MERGE];
    for (int64_t c = 0; c < kk; c++) {
        for (int64_t d = c + 1; d < kk; d++) {
            double dy = P[4 * c + 1] - P[4 * d + 1];
            double dx = P[4 * c + 2] - P[4 * d + 2];
            if (dy * dy + dx * dx <= m2) return 0;
        }
    }
    return 1;
}

static double jt_box(const double *res, int64_t h, int64_t w, int64_t r, int64_t c) {
    double t = 0.0;
    for (int64_t i = r - 1; i < r + 2; i++) {
        if (i < 0 || i >= h) continue;
        for (int64_t j = c - 1; j < c + 2; j++) {
            if (j < 0 || j >= w) continue;
            t = t + res[i * w + j];
        }
    }
    return t;
}

static void jt_residual(const jt_state *s, double *res) {
    for (int64_t p = 0; p < s->h * s->w; p++) {
        if (s->iv[p] > 0.0) res[p] = s->signal[p] - s->model[p];
        else res[p] = 0.0;
    }
}

static void jt_store(const jt_state *s, double *P, int64_t k, int64_t i) {
    for (int j = 0; j < 4; j++) P[4 * k + j] = CL(s, i, j);
}

static void jt_pts_of(jt_state *s, int64_t ng) {
    for (int64_t k = 0; k < ng; k++) {
        s->pts[2 * k] = CL(s, s->ids[k], 1);
        s->pts[2 * k + 1] = CL(s, s->ids[k], 2);
    }
}

/* every number finite and no centre moved MAX_STEP (rule 6's test) */
static int jt_moved_less(const jt_state *s, const double *P, int64_t kk, const double *S) {
    double step = s->conf[JT_MAX_STEP];
    for (int64_t c = 0; c < kk; c++) {
        for (int j = 0; j < 4; j++) {
            double v = P[4 * c + j];
            if (!(v - v == 0.0)) return 0;
        }
        if (!(fabs(P[4 * c + 1] - S[4 * c + 1]) < step)) return 0;
        if (!(fabs(P[4 * c + 2] - S[4 * c + 2]) < step)) return 0;
    }
    return 1;
}

/* rule 6, one sweep */
static void jt_refit(jt_state *s, int64_t n) {
    int64_t group = (int64_t)s->conf[JT_GROUP];
    int64_t *ids = s->ids;
    for (int64_t i = 0; i < n; i++) {
        int64_t ng = jt_near(s, CL(s, i, 1), CL(s, i, 2), group, ids);
        for (int64_t k = 0; k < ng; k++) {
            jt_store(s, s->P, k, ids[k]);
            jt_store(s, s->S, k, ids[k]);
        }
        jt_pts_of(s, ng);
        double chi = jt_fit(s, ids, ng, s->P, ng, s->pts, ng);
        if (!(chi < INFINITY)) continue;
        if (jt_moved_less(s, s->P, ng, s->S)) jt_replace(s, ids, ng, s->P, ng, n);
    }
}

/* rule 10a: faint crowded clouds that do not earn their place go (charge 0) */
static void jt_prune(jt_state *s, int64_t n) {
    const double *conf = s->conf;
    int64_t group = (int64_t)conf[JT_GROUP];
    int64_t *ids = s->ids;
    for (int64_t i = 0; i < n; i++) {
        double a = CL(s, i, 0);
        if (!(a > 0.0 && a < conf[JT_PRUNE] * s->e)) continue;
        int64_t ng = jt_near(s, CL(s, i, 1), CL(s, i, 2), group, ids);
        int64_t at = -1;
        for (int64_t q = 0; q < ng; q++)
            if (ids[q] == i) at = q;
        if (at < 0 || ng < 2) continue;
        jt_pts_of(s, ng);
        for (int64_t q = 0; q < ng; q++) jt_store(s, s->P2, q, ids[q]);
        double chi1 = jt_fit(s, ids, ng, s->P2, ng, s->pts, ng);
        int64_t kq = 0;
        for (int64_t q = 0; q < ng; q++) {
            if (q != at) {
                jt_store(s, s->P, kq, ids[q]);
                jt_store(s, s->S, kq, ids[q]);
                kq++;
            }
        }
        double chi0 = jt_fit(s, ids, ng, s->P, ng - 1, s->pts, ng);
        if (!(chi0 - chi1 <= conf[JT_DROP] && jt_moved_less(s, s->P, ng - 1, s->S))) continue;
        jt_draw(s, CL(s, i, 0), CL(s, i, 1), CL(s, i, 2), CL(s, i, 3), -1);
        jt_grid_drop(s, i);
        CL(s, i, 0) = 0.0;
        for (int64_t q = at; q < ng - 1; q++) ids[q] = ids[q + 1];
        jt_replace(s, ids, ng - 1, s->P, ng - 1, n);
    }
}

/* rule 7 over the candidate pixels cands[:ncand] (in order); the new count of clouds */
static int64_t jt_add(jt_state *s, int64_t n, const int64_t *cands, int64_t ncand) {
    const double *conf = s->conf;
    int64_t h = s->h, w = s->w;
    int64_t *ids = s->ids;
    double *P = s->P, *S = s->S, *P2 = s->P2, *pts = s->pts;
    double low = conf[JT_ADD] * s->e;
    for (int64_t k = 0; k < ncand; k++) {
        int64_t r = cands[k] / w; /* non-negative: // and / agree */
        int64_t c = cands[k] - r * w;
        /* the residual's sum now (clouds added nearby may have taken this charge) */
        double t = 0.0;
        for (int64_t i = r - 1; i < r + 2; i++) {
            if (i < 0 || i >= h) continue;
            for (int64_t j = c - 1; j < c + 2; j++) {
                if (j < 0 || j >= w) continue;
                if (s->iv[i * w + j] > 0.0) t = t + (s->signal[i * w + j] - s->model[i * w + j]);
            }
        }
        if (!(t > low)) continue;
        double y = (double)r + 0.5;
        double x = (double)c + 0.5;
        int64_t ng = jt_near(s, y, x, (int64_t)conf[JT_GROUP] - 1, ids);
        for (int64_t q = 0; q < ng; q++) {
            jt_store(s, P, q, ids[q]);
            jt_store(s, P2, q, ids[q]);
        }
        jt_pts_of(s, ng);
        pts[2 * ng] = y;
        pts[2 * ng + 1] = x;
        double chi0 = jt_fit(s, ids, ng, P2, ng, pts, ng + 1);
        P[4 * ng] = t;
        P[4 * ng + 1] = y;
        P[4 * ng + 2] = x;
        P[4 * ng + 3] = s->width;
        for (int64_t q = 0; q < 4 * ng + 4; q++) S[q] = P[q];
        double chi1 = jt_fit(s, ids, ng, P, ng + 1, pts, ng + 1);
        if (chi0 - chi1 > conf[JT_DROP] && jt_good(s, P, ng + 1, S, conf[JT_LEAST] * s->e))
            n = jt_replace(s, ids, ng, P, ng + 1, n);
    }
    return n;
}

/* rule 8 over the clouds heavy[:nheavy] (in order) as they were listed (snap); the
   new count of clouds */
static int64_t jt_split(jt_state *s, int64_t n, const int64_t *heavy, int64_t nheavy,
                        const double *snap) {
    const double *conf = s->conf;
    int64_t *ids = s->ids;
    double *P = s->P, *S = s->S, *P2 = s->P2, *pts = s->pts;
    double off = conf[JT_SPLIT_OFFSET];
    for (int64_t k = 0; k < nheavy; k++) {
        int64_t i = heavy[k];
        if (!(CL(s, i, 0) == snap[3 * k] && CL(s, i, 1) == snap[3 * k + 1] &&
              CL(s, i, 2) == snap[3 * k + 2]))
            continue; /* refitted beside another's split since listed */
        double a = CL(s, i, 0), y = CL(s, i, 1), x = CL(s, i, 2);
        int64_t ng = jt_near(s, y, x, (int64_t)conf[JT_GROUP] - 1, ids);
        int64_t at = -1;
        for (int64_t q = 0; q < ng; q++)
            if (ids[q] == i) at = q;
        if (at < 0) continue;
        jt_pts_of(s, ng);
        for (int64_t q = 0; q < ng; q++) jt_store(s, P2, q, ids[q]);
        double chi0 = jt_fit(s, ids, ng, P2, ng, pts, ng);
        double best = INFINITY;
        for (int o = 0; o < 2; o++) {
            double oy = o == 0 ? 0.0 : off;
            double ox = o == 0 ? off : 0.0;
            int64_t kq = 0;
            for (int64_t q = 0; q < ng; q++) { /* the others first, in order, then the two */
                if (q != at) {
                    jt_store(s, P, kq, ids[q]);
                    kq++;
                }
            }
            P[4 * kq] = a * 0.5;
            P[4 * kq + 1] = y + oy;
            P[4 * kq + 2] = x + ox;
            P[4 * kq + 3] = s->width;
            P[4 * kq + 4] = a * 0.5;
            P[4 * kq + 5] = y - oy;
            P[4 * kq + 6] = x - ox;
            P[4 * kq + 7] = s->width;
            double chi1 = jt_fit(s, ids, ng, P, ng + 1, pts, ng);
            if (chi1 < best) {
                best = chi1;
                for (int64_t q = 0; q < 4 * ng + 4; q++) P2[q] = P[q];
            }
        }
        double drop = conf[JT_DROP];
        if (a >= conf[JT_WIDE_CHARGE] * s->e && CL(s, i, 3) > s->width + conf[JT_WIDE_BY])
            drop = conf[JT_DROP_WIDE];
        if (!(chi0 - best > drop)) continue;
        int64_t kq = 0;
        for (int64_t q = 0; q < ng; q++) { /* the starts the moves are measured from */
            if (q != at) {
                jt_store(s, S, kq, ids[q]);
                kq++;
            }
        }
        jt_store(s, S, kq, i);
        jt_store(s, S, kq + 1, i);
        if (!jt_good(s, P2, ng + 1, S, conf[JT_LEAST] * s->e)) continue;
        /* the others keep their indices, the cloud becomes the first of the two */
        kq = 0;
        for (int64_t q = 0; q < ng; q++) {
            if (q != at) {
                for (int j = 0; j < 4; j++) P[4 * q + j] = P2[4 * kq + j];
                kq++;
            }
        }
        for (int j = 0; j < 4; j++) {
            P[4 * at + j] = P2[4 * kq + j];
            P[4 * ng + j] = P2[4 * kq + 4 + j];
        }
        n = jt_replace(s, ids, ng, P, ng + 1, n);
    }
    return n;
}

/* rule 7's pixels into out, in raster order, and their sums into vals; how many
   (res, box: room for the residual and its 3 x 3 sums) */
static int64_t jt_candidates(const jt_state *s, double *res, double *box, int64_t *out,
                             double *vals) {
    int64_t h = s->h, w = s->w;
    jt_residual(s, res);
    for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++) box[r * w + c] = jt_box(res, h, w, r, c);
    double low = s->conf[JT_ADD] * s->e;
    int64_t n = 0;
    for (int64_t r = 0; r < h; r++) {
        for (int64_t c = 0; c < w; c++) {
            double v = box[r * w + c];
            if (!(s->iv[r * w + c] > 0.0 && v > low)) continue;
            int top = 1;
            int64_t i1 = r + 2 < h ? r + 2 : h, j1 = c + 2 < w ? c + 2 : w;
            for (int64_t i = r - 1 > 0 ? r - 1 : 0; i < i1; i++)
                for (int64_t j = c - 1 > 0 ? c - 1 : 0; j < j1; j++)
                    if (box[i * w + j] > v) top = 0;
            if (top) {
                out[n] = r * w + c;
                n++;
            }
        }
    }
    for (int64_t k = 0; k < n; k++) vals[k] = box[(out[k] / w) * w + out[k] % w];
    return n;
}

/* idx[:n] sorted by falling keys (stable: the reference's merge sort); tmp: room for n */
static void jt_by_falling(const double *keys, int64_t *idx, int64_t n, int64_t *tmp) {
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n;) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid;
            for (int64_t k = lo; k < hi; k++) {
                if (a < mid && (b >= hi || !(keys[idx[b]] > keys[idx[a]]))) {
                    tmp[k] = idx[a];
                    a++;
                } else {
                    tmp[k] = idx[b];
                    b++;
                }
            }
            lo = hi;
        }
        for (int64_t k = 0; k < n; k++) idx[k] = tmp[k];
    }
}

/* *p (old rows, each of size bytes) in new room for rows (the rest zero); 0 or -1 */
static int jt_grow(void **p, int64_t old, int64_t rows, size_t size) {
    void *q = realloc(*p, (size_t)rows * size);
    if (q == NULL) return -1;
    memset((char *)q + (size_t)old * size, 0, (size_t)(rows - old) * size);
    *p = q;
    return 0;
}

/* the clouds' arrays grown to room for cap rows (the reference's _grown) */
static int jt_grow_all(jt_state *s, int64_t cap) {
    int64_t old = s->cap;
    if (jt_grow((void **)&s->cl, old, cap, 4 * sizeof(double)) ||
        jt_grow((void **)&s->nxt, old, cap, sizeof(int64_t)) ||
        jt_grow((void **)&s->cell_of, old, cap, sizeof(int64_t)) ||
        jt_grow((void **)&s->cand, old, cap, sizeof(int64_t)) ||
        jt_grow((void **)&s->dd, old, cap, sizeof(double)))
        return -1;
    s->cap = cap;
    return 0;
}

static void *jt_zeros(int64_t n, size_t size) { return calloc((size_t)(n > 0 ? n : 1), size); }

void joint_free(void *p) { free(p); }

/* how many numbers conf holds (joint_conf) */
int64_t joint_conf_size(void) { return JT_NCONF; }

/*
 * One frame's clouds (rules 5-10): signal, iv (h, w); starts (n0, 2); cdf, pdf (ntab);
 * conf (joint_conf). On success *clouds_out (n', 4) and *event_out (n') are allocated
 * here (release them with joint_free) and n' is returned; -1 where out of memory
 * (nothing allocated then).
 */
int64_t joint_frame(const double *signal, const double *iv, int64_t h, int64_t w,
                    const double *starts, int64_t n0, double e, double width, const double *cdf,
                    const double *pdf, int64_t ntab, double t0, double inv_h, const double *conf,
                    double **clouds_out, uint8_t **event_out) {
    jt_state st;
    jt_state *s = &st;
    memset(s, 0, sizeof(st));
    s->signal = signal;
    s->iv = iv;
    s->h = h;
    s->w = w;
    s->cdf = cdf;
    s->pdf = pdf;
    s->ntab = ntab;
    s->t0 = t0;
    s->inv_h = inv_h;
    s->conf = conf;
    s->e = e;
    s->width = width;
    int64_t n = n0;
    int64_t result = -1;
    int64_t hw = h * w;
    int64_t g = (int64_t)conf[JT_GROUP];
    int64_t npar = 4 * g;
    int64_t side = 2 * (int64_t)ceil(conf[JT_REACH]) + 7;
    int64_t rmax = side * side;
    s->npar = npar;
    s->cap = 2 * n + 16;
    s->ncy = (int64_t)floor(((double)h + JT_CELL) / JT_CELL) + 2;
    s->ncx = (int64_t)floor(((double)w + JT_CELL) / JT_CELL) + 2;
    s->cl = jt_zeros(4 * s->cap, sizeof(double));
    s->model = jt_zeros(hw, sizeof(double));
    s->head = malloc((size_t)(s->ncy * s->ncx) * sizeof(int64_t));
    s->nxt = jt_zeros(s->cap, sizeof(int64_t));
    s->cell_of = jt_zeros(s->cap, sizeof(int64_t));
    s->cand = jt_zeros(s->cap, sizeof(int64_t));
    s->dd = jt_zeros(s->cap, sizeof(double));
    s->m = jt_zeros(rmax, sizeof(double));
    s->jac = jt_zeros(rmax * npar, sizeof(double));
    s->A = jt_zeros(npar * npar, sizeof(double));
    s->L = jt_zeros(npar * npar, sizeof(double));
    s->g = jt_zeros(npar, sizeof(double));
    s->z = jt_zeros(npar, sizeof(double));
    s->step = jt_zeros(npar, sizeof(double));
    s->trial = jt_zeros(npar, sizeof(double));
    s->pr = jt_zeros(rmax, sizeof(int64_t));
    s->pc = jt_zeros(rmax, sizeof(int64_t));
    s->data = jt_zeros(rmax, sizeof(double));
    s->wt = jt_zeros(rmax, sizeof(double));
    s->ids = jt_zeros(g + 1 > 3 ? g + 1 : 3, sizeof(int64_t)); /* rule 10 asks for 2 */
    s->P = jt_zeros(npar + 4, sizeof(double));
    s->S = jt_zeros(npar + 4, sizeof(double));
    s->P2 = jt_zeros(npar + 4, sizeof(double));
    s->pts = jt_zeros(2 * (g + 1), sizeof(double));
    double *res = jt_zeros(hw, sizeof(double)), *box = jt_zeros(hw, sizeof(double));
    double *vals = jt_zeros(hw, sizeof(double));
    int64_t *cands = jt_zeros(hw, sizeof(int64_t)), *order = jt_zeros(hw, sizeof(int64_t));
    int64_t *picked = jt_zeros(hw, sizeof(int64_t)), *tmp = jt_zeros(hw, sizeof(int64_t));
    int64_t *heavy = NULL, *htmp = NULL;
    double *charge = NULL, *snap = NULL, *clouds = NULL;
    uint8_t *event = NULL;
    if (!s->cl || !s->model || !s->head || !s->nxt || !s->cell_of || !s->cand || !s->dd ||
        !s->m || !s->jac || !s->A || !s->L || !s->g || !s->z || !s->step || !s->trial ||
        !s->pr || !s->pc || !s->data || !s->wt || !s->ids || !s->P || !s->S || !s->P2 ||
        !s->pts || !res || !box || !vals || !cands || !order || !picked || !tmp)
        goto out;
    for (int64_t k = 0; k < s->ncy * s->ncx; k++) s->head[k] = -1;
    for (int64_t k = 0; k < s->cap; k++) s->nxt[k] = -1;
    for (int64_t k = 0; k < n; k++) { /* rule 5 */
        int64_t r = (int64_t)floor(starts[2 * k]);
        int64_t c = (int64_t)floor(starts[2 * k + 1]);
        double t = 0.0;
        for (int64_t i = r - 1; i < r + 2; i++) {
            if (i < 0 || i >= h) continue;
            for (int64_t j = c - 1; j < c + 2; j++) {
                if (j < 0 || j >= w) continue;
                t = t + signal[i * w + j];
            }
        }
        double least = conf[JT_START_LEAST] * e; /* Python's max(t, least) */
        CL(s, k, 0) = least > t ? least : t;
        CL(s, k, 1) = starts[2 * k];
        CL(s, k, 2) = starts[2 * k + 1];
        CL(s, k, 3) = width;
        jt_draw(s, CL(s, k, 0), CL(s, k, 1), CL(s, k, 2), CL(s, k, 3), 1);
        jt_grid_put(s, k);
    }
    for (int64_t it = 0; it < (int64_t)conf[JT_SWEEPS]; it++) jt_refit(s, n); /* rule 6 */
    for (int64_t round = 0; round < (int64_t)conf[JT_ROUNDS]; round++) { /* rules 7-9 */
        int64_t before = n;
        int64_t ncand = jt_candidates(s, res, box, cands, vals);
        for (int64_t k = 0; k < ncand; k++) order[k] = k;
        jt_by_falling(vals, order, ncand, tmp);
        for (int64_t k = 0; k < ncand; k++) picked[k] = cands[order[k]];
        if (n + ncand > s->cap) { /* room for every candidate */
            if (jt_grow_all(s, 2 * (n + ncand) + 16)) goto out;
        }
        n = jt_add(s, n, picked, ncand);
        double wide = width + 2.0 * conf[JT_SPREAD];
        heavy = jt_zeros(n, sizeof(int64_t));
        htmp = jt_zeros(n, sizeof(int64_t));
        charge = jt_zeros(n, sizeof(double));
        snap = jt_zeros(3 * n, sizeof(double));
        if (!heavy || !htmp || !charge || !snap) goto out;
        int64_t nheavy = 0;
        for (int64_t i = 0; i < n; i++) {
            if (CL(s, i, 0) > conf[JT_SPLIT_CHARGE] * e || CL(s, i, 3) > wide) {
                heavy[nheavy] = i;
                nheavy++;
            }
        }
        for (int64_t i = 0; i < n; i++) charge[i] = CL(s, i, 0);
        jt_by_falling(charge, heavy, nheavy, htmp);
        for (int64_t k = 0; k < nheavy; k++)
            for (int j = 0; j < 3; j++) snap[3 * k + j] = CL(s, heavy[k], j);
        if (n + nheavy > s->cap) {
            if (jt_grow_all(s, 2 * (n + nheavy) + 16)) goto out;
        }
        n = jt_split(s, n, heavy, nheavy, snap);
        free(heavy);
        free(htmp);
        free(charge);
        free(snap);
        heavy = htmp = NULL;
        charge = snap = NULL;
        if (n == before) break;
    }
    for (int64_t it = 0; it < (int64_t)conf[JT_POLISH]; it++) jt_refit(s, n);
    jt_prune(s, n); /* rule 10a */
    clouds = jt_zeros(4 * n, sizeof(double));
    event = jt_zeros(n, sizeof(uint8_t));
    if (!clouds || !event) goto out;
    for (int64_t i = 0; i < n; i++) { /* rule 10 */
        if (!(CL(s, i, 0) > 0.0)) continue;
        if (CL(s, i, 0) <= conf[JT_LEAST] * e) {
            int64_t crowded = jt_near(s, CL(s, i, 1), CL(s, i, 2), 2, s->ids);
            if (crowded > 1) continue;
        }
        event[i] = 1;
    }
    memcpy(clouds, s->cl, (size_t)(4 * n) * sizeof(double));
    *clouds_out = clouds;
    *event_out = event;
    clouds = NULL;
    event = NULL;
    result = n;
out:
    free(clouds);
    free(event);
    free(heavy);
    free(htmp);
    free(charge);
    free(snap);
    free(res);
    free(box);
    free(vals);
    free(cands);
    free(order);
    free(picked);
    free(tmp);
    free(s->cl);
    free(s->model);
    free(s->head);
    free(s->nxt);
    free(s->cell_of);
    free(s->cand);
    free(s->dd);
    free(s->m);
    free(s->jac);
    free(s->A);
    free(s->L);
    free(s->g);
    free(s->z);
    free(s->step);
    free(s->trial);
    free(s->pr);
    free(s->pc);
    free(s->data);
    free(s->wt);
    free(s->ids);
    free(s->P);
    free(s->S);
    free(s->P2);
    free(s->pts);
    return result;
}
