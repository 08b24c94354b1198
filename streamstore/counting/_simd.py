"""Vector building blocks of the counting kernel, written as LLVM IR (numba intrinsics).

LLVM's auto-vectoriser does well on plain loops but poorly on what the
counting kernel needs most: turning 64 comparisons into a 64-bit mask (it
shifts and ORs lane by lane instead of using a mask register) and keeping
16-bit arithmetic in 16-bit lanes (numba widens every integer to 64 bits).
So the hot loops are spelled out here on ``<64 x iN>`` vectors, which LLVM
lowers to what the CPU has (AVX-512 mask registers, AVX2 ``pmovmskb``, NEON),
and the rest of the kernel stays readable numba in ``_kernels.py``.

Rows of signals and of their horizontal maxima have one sentinel column at
each end: pixel ``c`` is element ``c + 1``, and a row is long enough for a
64-lane load at every block start ``c0 = 64 b`` plus two. SKIP (0 in unsigned
rows, the minimum in int32 rows) marks a pixel that is not a candidate: it never
competes.

* :func:`signal_row`: the signals of the full 64-pixel blocks of one frame row
  (the caller does the ``W mod 64`` tail), and whether the row may hold an X-ray
  hit. The frame, dark and threshold rows are read once, in steps of
  ``SIG_LANES`` pixels.
* :func:`test_row`: the 3 x 3 local-maximum test (rule 4 of ``_reference.py``)
  of a row against the rows above and below; it appends the maxima it settles
  to the event list and leaves words of bits for the rest. On the way it stores
  the horizontal maxima of the row below, which the next row's test reads as its
  row above (each row's maxima are computed once).
* :func:`xray_row`: the exact X-ray hits of a row, as words of bits (the rare
  path, when :func:`signal_row` says there may be one).

The dark and threshold rows :func:`signal_row` streams may instead be one value
for every pixel (frames the camera dark-subtracted,
:func:`._maps.frame_only_maps`): a map whose numba layout is not C-contiguous
is a read-only view of one value with zero strides, which the code broadcasts
to every lane from its first element. Only the frame is then streamed, and
:func:`test_row` prefetches only the frame's next row. The layout is part of the
type, so these are variants of their own and the others' code is unchanged.

Signals are computed in one of two ways, chosen by the types the kernel is
compiled for:

* *narrow* (unsigned frames, unsigned threshold map, no gain; unsigned rows of
  bytes, or of 16 bits for data whose signals are mostly 255 or more):
  ``u = max(raw - dark, 0)`` in the frame's width (a saturating subtract), a
  candidate where ``u > t``, stored as ``min(u, ceiling)``, the ceiling the row
  type's largest value (BYTE_TOP for bytes; a candidate has ``u >= 1``, so 0 is
  free for SKIP). With a one-byte dark map (*compact*:
  ``dark = base + d8`` for a per-row ``base``), ``t = 255`` marks a pixel that
  is never a candidate. The 3 x 3 test on bytes is exact for every centre below
  BYTE_TOP: a neighbour of 255 or more is stored as BYTE_TOP and still beats
  it; a centre stored as BYTE_TOP (on the benchmark frame 2 of 470 740
  candidates) is left to the caller. Half the bytes of int16 rows per vector,
  and the six working rows of a full-width frame fit in the L1 cache. In 16-bit
  rows only ``u = 65535`` reaches the ceiling;
* *wide* (int32 rows: signed frames, a gain map, a signed threshold map):
  ``d = raw - dark`` in 32 bits, a candidate where ``d > t``, stored as
  ``d * gain``, exact.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "BYTE_TOP",
    "EQ_ANY",
    "LANES",
    "SAT_ANY",
    "cttz",
    "hmax_row",
    "signal_row",
    "signal_row_gain",
    "test_row",
    "xray_row",
]

#: Pixels per block: the width of the test's vectors and of the bit-mask words.
LANES = 64
#: Pixels per step of the signal loop: two steps per block. Half-width vectors
#: streamed the frame faster here (full frame: 2.3 against 2.9 ms for 64 lanes).
SIG_LANES = 32
#: Ceiling of the byte rows: a signal of 255 or more is stored as 255.
BYTE_TOP = 255

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _vec(t: ir.Type, lanes: int = LANES) -> ir.VectorType:
    return ir.VectorType(t, lanes)


def _const(t: ir.IntType, value: int, lanes: int = LANES) -> ir.Constant:
    return ir.Constant(_vec(t, lanes), [value] * lanes)


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int = LANES) -> ir.Value:
    undef = ir.Constant(_vec(value.type, lanes), ir.Undefined)
    v = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    return builder.shuffle_vector(v, undef, zeros)


def _data(context, builder, aryty, ary) -> ir.Value:
    return context.make_array(aryty)(context, builder, ary).data


def _load(builder: ir.IRBuilder, data: ir.Value, idx: ir.Value, lanes: int = LANES) -> ir.Value:
    ptr = builder.bitcast(builder.gep(data, [idx]), _vec(data.type.pointee, lanes).as_pointer())
    return builder.load(ptr, align=1)


def _store(builder: ir.IRBuilder, data: ir.Value, idx: ir.Value, value: ir.Value) -> None:
    ptr = builder.bitcast(builder.gep(data, [idx]), value.type.as_pointer())
    builder.store(value, ptr, align=1)


def _lanes(context, builder, aryty, ary):
    """``(c0, lanes) -> vector``: a map row's elements from ``c0``, or, for a row of
    one value (not C-contiguous: zero strides, see the module docstring), that
    value in every lane, which reads no more memory."""
    data = _data(context, builder, aryty, ary)
    if aryty.layout == "C":
        return lambda c0, lanes=LANES: _load(builder, data, c0, lanes)
    # splat here, before the caller's loop: stores to the rows may alias the value
    # for all LLVM knows, so it would not hoist a load made in the loop
    value = builder.load(data)
    splats = {n: _splat(builder, value, n) for n in (SIG_LANES, LANES)}
    return lambda c0, lanes=LANES: splats[lanes]


def _ext(builder: ir.IRBuilder, v: ir.Value, signed: bool, t: ir.IntType) -> ir.Value:
    width = v.type.element.width
    vt = _vec(t, v.type.count)
    if width == t.width:
        return v
    if width > t.width:
        return builder.trunc(v, vt)
    return builder.sext(v, vt) if signed else builder.zext(v, vt)


def _max(builder: ir.IRBuilder, x: ir.Value, y: ir.Value, signed: bool = True) -> ir.Value:
    cmp = builder.icmp_signed if signed else builder.icmp_unsigned
    return builder.select(cmp(">", x, y), x, y)


def _call(builder: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Value) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))


def _reduce(builder: ir.IRBuilder, op: str, v: ir.Value) -> ir.Value:
    """``llvm.vector.reduce.<op>`` of ``v``: one scalar."""
    elem = v.type.element
    return _call(builder, f"llvm.vector.reduce.{op}.v{v.type.count}i{elem.width}", elem, v)


def _index(builder: ir.IRBuilder, blk: ir.Value, extra: int = 0, lanes: int = LANES) -> ir.Value:
    c0 = builder.mul(blk, ir.Constant(_I64, lanes))
    return builder.add(c0, ir.Constant(_I64, extra)) if extra else c0


def _u64_op(name: str, emit, doc: str):
    """An intrinsic ``uint64 -> uint64`` whose body is ``emit(builder, x)``."""

    def op(typingctx, x):
        def codegen(context, builder, signature, args):
            return emit(builder, args[0])

        return types.uint64(types.uint64), codegen

    op.__name__ = name
    op.__doc__ = doc
    return intrinsic(op)


_TRUE = ir.Constant(ir.IntType(1), 1)
_FALSE = ir.Constant(ir.IntType(1), 0)
cttz = _u64_op("cttz", lambda b, x: b.cttz(x, _TRUE), "Trailing zero bits of a nonzero uint64.")


class _Signals:
    """Code generator of the signals of one block, for one combination of types."""

    def __init__(self, frame_dt, dark_dt, t_dt, row_dt, gain: bool) -> None:
        self.fsigned = frame_dt.signed
        self.fw = frame_dt.bitwidth
        self.tsigned = t_dt.signed
        self.rw = row_dt.bitwidth
        self.gain = gain
        self.narrow = not row_dt.signed  # unsigned rows: see the module docstring
        self.compact = dark_dt.bitwidth < frame_dt.bitwidth  # one-byte dark over a base
        fmax = (1 << (self.fw - 1)) - 1 if self.fsigned else (1 << self.fw) - 1
        self.top = ir.Constant(ir.IntType(self.fw), fmax)
        self.skip = 0 if self.narrow else -(1 << (self.rw - 1))
        self.lanes = SIG_LANES

    def emit(self, builder, f, dk, t, g, base, lanes=SIG_LANES) -> tuple[ir.Value, ir.Value]:
        """Signals of one block in the row type (SKIP where not a candidate), and
        the values the X-ray test looks at: the exact signals in the frame's width
        (narrow, 0 where not a candidate) or the row itself (wide)."""
        b = builder
        rt = ir.IntType(self.rw)
        if self.narrow:
            ft = ir.IntType(self.fw)
            if self.compact:
                dk = b.add(_ext(b, dk, False, ft), _splat(b, b.trunc(base, ft), lanes))
            u = b.select(b.icmp_unsigned(">", f, dk), b.sub(f, dk), _const(ft, 0, lanes))
            cw = ir.IntType(max(self.fw, t.type.element.width))
            cand = b.icmp_unsigned(">", _ext(b, u, False, cw), _ext(b, t, False, cw))
            ceiling = (1 << self.rw) - 1  # BYTE_TOP in byte rows, 65535 in 16-bit rows
            uc = u
            if ceiling < (1 << self.fw) - 1:
                top = _const(ft, ceiling, lanes)
                uc = b.select(b.icmp_unsigned("<", u, top), u, top)
            s = _ext(b, uc, False, rt)
        else:
            de = _ext(b, dk, self.fsigned and not self.compact, _I32)
            if self.compact:
                de = b.add(de, _splat(b, b.trunc(base, _I32), lanes))
            d = b.sub(_ext(b, f, self.fsigned, _I32), de)
            cand = b.icmp_signed(">", d, _ext(b, t, self.tsigned, _I32))
            s = _ext(b, b.mul(d, _ext(b, g, False, _I32)) if self.gain else d, True, rt)
        if self.compact:  # t = 255: never a candidate
            cand = b.and_(cand, b.icmp_unsigned("!=", t, _const(t.type.element, 255, lanes)))
        out = b.select(cand, s, _const(rt, self.skip, lanes))
        if self.narrow:
            return out, b.select(cand, u, _const(ir.IntType(self.fw), 0, lanes))
        return out, out

    def xray_init(self) -> list[ir.Constant]:
        """Start of the running maxima of the X-ray values and of the raw values."""
        low = -(1 << (self.fw - 1)) if self.fsigned else 0
        n = self.lanes
        first = _const(ir.IntType(self.fw), 0, n) if self.narrow else _const(_I32, self.skip, n)
        return [first, _const(ir.IntType(self.fw), low, n)]

    def xray_update(self, builder, acc, xval, f) -> list[ir.Value]:
        return [
            _max(builder, acc[0], xval, not self.narrow),
            _max(builder, acc[1], f, self.fsigned),
        ]

    def xray_test(self, builder, acc, level: ir.Value) -> ir.Value:
        """Whether the row may hold an X-ray hit: a signal above ``level``, or a
        saturated pixel. Exact for the first; the second also fires for a saturated
        pixel that is not a candidate (masked), and :func:`xray_row` then finds none."""
        b = builder
        smax = _reduce(b, "umax" if self.narrow else "smax", acc[0])
        fmax = _reduce(b, "smax" if self.fsigned else "umax", acc[1])
        wide = b.zext(smax, _I64) if self.narrow else b.sext(smax, _I64)
        above = b.icmp_signed(">", wide, level)
        return b.or_(above, b.icmp_unsigned("==", fmax, self.top))


def _make_signal_row(gain: bool):
    def signal_row(typingctx, row, drow, trow, grow, srow, nfull, base, level, flip):
        gen = _Signals(row.dtype, drow.dtype, trow.dtype, srow.dtype, gain)
        sig = types.boolean(row, drow, trow, grow, srow, types.intp, types.int64, types.int64,
                            types.int64)  # fmt: skip

        def codegen(context, builder, signature, args):
            b = builder
            f_, g_, s_ = (_data(context, b, signature.args[i], args[i]) for i in (0, 3, 4))
            d_, t_ = (_lanes(context, b, signature.args[i], args[i]) for i in (1, 2))
            nfull, base, level = args[5:8]
            n = SIG_LANES
            fl = _splat(b, b.trunc(args[8], ir.IntType(gen.fw)), n)
            acc_p = [cgutils.alloca_once_value(b, v) for v in gen.xray_init()]
            steps = b.mul(nfull, ir.Constant(_I64, LANES // n))

            def loop_body(flipped: bool) -> None:
                with cgutils.for_range(b, steps) as loop:
                    c0 = _index(b, loop.index, lanes=n)
                    f = _load(b, f_, c0, n)
                    if flipped:
                        f = b.xor(f, fl)
                    dk = d_(c0, n)
                    t = t_(c0, n)
                    g = _load(b, g_, c0, n) if gain else None
                    out, xval = gen.emit(b, f, dk, t, g, base)
                    acc = gen.xray_update(b, [b.load(p) for p in acc_p], xval, f)
                    for p, v in zip(acc_p, acc, strict=True):
                        b.store(v, p)
                    _store(b, s_, _index(b, loop.index, 1, lanes=n), out)

            # the loop twice, with and without the XOR: it cost unsigned frames ~5 %
            is_flipped = b.icmp_unsigned("!=", args[8], ir.Constant(_I64, 0))
            with b.if_else(is_flipped) as (then, otherwise):
                with then:
                    loop_body(True)
                with otherwise:
                    loop_body(False)
            return gen.xray_test(b, [b.load(p) for p in acc_p], level)

        return sig, codegen

    signal_row.__name__ = "signal_row_gain" if gain else "signal_row"
    signal_row.__doc__ = """Signals of the ``nfull`` full blocks of a row into ``srow``; any X-ray?

    ``drow`` is the dark row (or its one-byte form over ``base``), ``trow`` the
    threshold row (either may be one value for every pixel), ``grow`` the gain
    row (read by the gain variant only), ``level`` the X-ray level, ``flip`` what
    each frame value is XORed with as it is read (the sign bit for wrapped frames,
    which are so read as unsigned ones, else 0). Returns False only when no full
    block holds an X-ray hit (True may be a saturated pixel that is not a
    candidate).
    """
    return intrinsic(signal_row)


signal_row = _make_signal_row(False)
signal_row_gain = _make_signal_row(True)


def _hmax(builder, row, c0, signed: bool) -> ir.Value:
    """Horizontal maximum of pixels ``c - 1, c, c + 1`` for the 64 pixels from ``c0``."""
    b = builder
    v = [_load(b, row, b.add(c0, ir.Constant(_I64, k))) for k in range(3)]
    return _max(b, _max(b, v[0], v[1], signed), v[2], signed)


@intrinsic
def hmax_row(typingctx, srow, hrow, nblocks):
    """Horizontal 3-maxima of a signal row into ``hrow`` (same layout)."""
    sig = types.void(srow, hrow, types.intp)
    signed = srow.dtype.signed

    def codegen(context, builder, signature, args):
        s_, h_ = (_data(context, builder, signature.args[i], args[i]) for i in range(2))
        with cgutils.for_range(builder, args[2]) as loop:
            c0 = _index(builder, loop.index)
            hm = _hmax(builder, s_, c0, signed)
            _store(builder, h_, builder.add(c0, ir.Constant(_I64, 1)), hm)
        return context.get_dummy_value()

    return sig, codegen


def _prefetch(builder: ir.IRBuilder, data: ir.Value, idx: ir.Value) -> None:
    """Hint the CPU to fetch the cache line of ``data[idx]`` (LLVM ``prefetch``)."""
    i8p = ir.IntType(8).as_pointer()
    ptr = builder.bitcast(builder.gep(data, [idx]), i8p)
    _call(builder, "llvm.prefetch.p0i8", ir.VoidType(), ptr, ir.Constant(_I32, 0),
          ir.Constant(_I32, 3), ir.Constant(_I32, 1))  # fmt: skip


#: Flags returned by :func:`test_row`.
EQ_ANY = 1
SAT_ANY = 2


@intrinsic
def test_row(typingctx, hup, mid, down, hdown, eqw, satw, summary, nblocks, pf_f, pf_d, pf_t,
             n_pf, out, k, p_row):  # fmt: skip
    """The 3 x 3 test of every block of row ``mid``, its events appended to ``out``.

    ``hup``: horizontal maxima of the row above (:func:`hmax_row`); ``down``: the
    signals of the row below, whose maxima are stored into ``hdown`` on the way.
    A pixel is a local maximum (rule 4) when it beats its earlier neighbours
    strictly and its later ones or equals them. The local maxima that are settled
    here, neither equal to a later neighbour (bit ``j`` of ``eqw[b]`` for pixel
    ``64 b + j``: a plateau, rule 5) nor, in unsigned rows, stored at the row
    type's ceiling (bit of ``satw[b]``: the clamped values cannot decide; int32
    rows leave ``satw`` alone), are appended to ``out[k:]`` as ``p_row + column``, in column order;
    the caller decides the others. Writes up to four slots past the last event.
    Bit ``b % 64`` of ``summary[b // 64]``: ``eqw[b]`` or ``satw[b]`` is not zero.
    Returns ``(new k, flags)``, flags EQ_ANY | SAT_ANY: some eq / sat bit is set.
    """
    ret = types.UniTuple(types.int64, 2)
    sig = ret(hup, mid, down, hdown, eqw, satw, summary, types.intp, pf_f, pf_d, pf_t,
              types.intp, out, types.int64, types.uint32)  # fmt: skip
    rbits = mid.dtype.bitwidth
    signed = mid.dtype.signed
    # the rows to prefetch: not a map row of one value (see the module docstring)
    steps = [(i, 64 // a.dtype.bitwidth * 8) for i, a in ((8, pf_f), (9, pf_d), (10, pf_t))
             if i == 8 or a.layout == "C"]  # fmt: skip

    def codegen(context, builder, signature, args):
        b = builder
        hup_, mid_, down_, hdn_, eq_, sat_, sm_ = (
            _data(context, b, signature.args[i], args[i]) for i in range(7)
        )
        nblocks = args[7]
        pf = [(_data(context, b, signature.args[i], args[i]), step) for i, step in steps]
        n_pf = args[11]
        out_ = _data(context, b, signature.args[12], args[12])
        k_p = cgutils.alloca_once_value(b, args[13])
        p_row = args[14]
        zero = ir.Constant(_I64, 0)
        eqany_p = cgutils.alloca_once_value(b, zero)
        satany_p = cgutils.alloca_once_value(b, zero)
        with cgutils.for_range(b, b.udiv(b.add(nblocks, ir.Constant(_I64, 63)),
                                          ir.Constant(_I64, 64))) as loop:  # fmt: skip
            b.store(zero, b.gep(sm_, [loop.index]))
        rt = ir.IntType(rbits)
        one = ir.Constant(_I64, 1)
        cmp = b.icmp_signed if signed else b.icmp_unsigned
        with cgutils.for_range(b, nblocks) as loop:
            c0 = _index(b, loop.index)
            with b.if_then(b.icmp_signed("<", loop.index, n_pf)):
                # the next frame row's lines, so memory streams while this test computes
                for data, step in pf:
                    for kk in range(0, LANES, step):
                        _prefetch(b, data, b.add(c0, ir.Constant(_I64, kk)))
            c1 = b.add(c0, one)
            hd = _hmax(b, down_, c0, signed)
            _store(b, hdn_, c1, hd)
            m = [_load(b, mid_, b.add(c0, ir.Constant(_I64, kk))) for kk in range(3)]
            before = _max(b, _load(b, hup_, c1), m[0], signed)
            after = _max(b, m[2], hd, signed)
            # m >= after is m > after - 1 (saturating: SKIP - 1 stays SKIP, and a SKIP
            # pixel fails m > before anyway), so one comparison tests all eight
            name = f"llvm.{'s' if signed else 'u'}sub.sat.v{LANES}i{rbits}"
            after1 = _call(b, name, after.type, after, _const(rt, 1))
            ok = cmp(">", m[1], _max(b, before, after1, signed))
            eq = b.and_(ok, b.icmp_unsigned("==", m[1], after))
            special = eq
            if not signed:  # unsigned rows: centres at the ceiling are decided by the caller
                sat = b.icmp_unsigned("==", m[1], _const(rt, (1 << rbits) - 1))
                eq = b.and_(eq, b.not_(sat))
                special = b.or_(eq, sat)
                satb = b.bitcast(sat, _I64)
                b.store(satb, b.gep(sat_, [loop.index]))
                b.store(b.or_(b.load(satany_p), satb), satany_p)
            eqb = b.bitcast(eq, _I64)
            b.store(eqb, b.gep(eq_, [loop.index]))
            b.store(b.or_(b.load(eqany_p), eqb), eqany_p)
            spb = b.bitcast(special, _I64)
            nz = b.zext(b.icmp_unsigned("!=", spb, zero), _I64)
            sp = b.gep(sm_, [b.lshr(loop.index, ir.Constant(_I64, 6))])
            bit = b.shl(nz, b.and_(loop.index, ir.Constant(_I64, 63)))
            b.store(b.or_(b.load(sp), bit), sp)
            # the settled maxima: the first four written whatever their number (the
            # slots past the count are scratch), so the common case does not branch
            bits = b.bitcast(b.and_(ok, b.not_(special)), _I64)
            base = b.add(p_row, b.trunc(c0, _I32))
            k = b.load(k_p)
            t = bits
            for i in range(4):
                tz = b.trunc(b.cttz(t, _FALSE), _I32)
                b.store(b.add(base, tz), b.gep(out_, [b.add(k, ir.Constant(_I64, i))]))
                t = b.and_(t, b.sub(t, one))
            n = b.ctpop(bits)
            with b.if_then(b.icmp_unsigned(">", n, ir.Constant(_I64, 4)), likely=False):
                t_p = cgutils.alloca_once_value(b, t)
                i_p = cgutils.alloca_once_value(b, b.add(k, ir.Constant(_I64, 4)))
                with cgutils.for_range(b, b.sub(n, ir.Constant(_I64, 4))):
                    tv = b.load(t_p)
                    iv = b.load(i_p)
                    tz = b.trunc(b.cttz(tv, _TRUE), _I32)
                    b.store(b.add(base, tz), b.gep(out_, [iv]))
                    b.store(b.and_(tv, b.sub(tv, one)), t_p)
                    b.store(b.add(iv, one), i_p)
            b.store(b.add(k, n), k_p)
        eq_flag = b.zext(b.icmp_unsigned("!=", b.load(eqany_p), zero), _I64)
        sat_flag = b.zext(b.icmp_unsigned("!=", b.load(satany_p), zero), _I64)
        flags = b.or_(eq_flag, b.shl(sat_flag, one))
        return context.make_tuple(b, signature.return_type, [b.load(k_p), flags])

    return sig, codegen


@intrinsic
def xray_row(typingctx, row, drow, trow, grow, mid, words, nfull, base, level, flip):
    """Bits of the X-ray hits among the full blocks of a row (exact).

    A candidate that is saturated or whose signal exceeds ``level``. Unsigned
    rows hold clamped signals, so their signals are computed again from the frame row
    and the maps (as in :func:`signal_row`, ``flip`` as there); int32 rows are
    exact and read as they are (``grow`` is not read).
    """
    sig = types.void(row, drow, trow, grow, mid, words, types.intp, types.int64, types.int64,
                     types.int64)  # fmt: skip
    gen = _Signals(row.dtype, drow.dtype, trow.dtype, mid.dtype, False)

    def codegen(context, builder, signature, args):
        b = builder
        f_, d_, t_, g_, m_, w_ = (_data(context, b, signature.args[i], args[i]) for i in range(6))
        nfull, base, level = args[6:9]
        if gen.narrow:  # compare in the frame's width: level clipped to [0, TMAX]
            ft = ir.IntType(gen.fw)
            fmax = ir.Constant(_I64, (1 << gen.fw) - 1)
            lv = b.select(b.icmp_signed(">", level, fmax), fmax, level)
            lv = b.select(b.icmp_signed("<", lv, ir.Constant(_I64, 0)), ir.Constant(_I64, 0), lv)
            lvl = _splat(b, b.trunc(lv, ft))
        else:
            rt = ir.IntType(gen.rw)
            top = ir.Constant(_I64, (1 << (gen.rw - 1)) - 1)
            lvl = _splat(b, b.trunc(b.select(b.icmp_signed(">", level, top), top, level), rt))
        fl = _splat(b, b.trunc(args[9], ir.IntType(gen.fw)))
        with cgutils.for_range(b, nfull) as loop:
            c0 = _index(b, loop.index)
            f = b.xor(_load(b, f_, c0), fl)
            if gen.narrow:
                dk = _load(b, d_, c0)
                t = _load(b, t_, c0)
                _, xval = gen.emit(b, f, dk, t, None, base, LANES)
                cand = b.icmp_unsigned("!=", xval, _const(ft, 0))
                big = b.icmp_unsigned(">", xval, lvl)
            else:
                m = _load(b, m_, b.add(c0, ir.Constant(_I64, 1)))
                cand = b.icmp_signed("!=", m, _const(rt, gen.skip))
                big = b.icmp_signed(">", m, lvl)
            hit = b.or_(b.icmp_unsigned("==", f, _splat(b, gen.top)), big)
            b.store(b.bitcast(b.and_(cand, hit), _I64), b.gep(w_, [loop.index]))
        return context.get_dummy_value()

    return sig, codegen
