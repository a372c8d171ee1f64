"""The Triton program of the ``triton`` backend (imported only by :mod:`.triton_kernel`, lazily).

Kept as a plain function, not decorated: :func:`.triton_kernel._jit` wraps it with ``triton.jit``
once per mode (compiled for CUDA tensors, interpreted for CPU tensors under ``TRITON_INTERPRET=1``).

No function of ``triton.language.standard`` is called (``tl.zeros``, ``tl.max``, ``tl.sum``): those
are ``@triton.jit`` functions, wrapped when ``triton.language`` is imported, so with triton imported
before ``TRITON_INTERPRET=1`` was set the interpreter could not call them. Row reductions are
``tl.reduce`` (a builtin the interpreter replaces) with the combine functions ``tl.max`` / ``tl.sum``
pass: the interpreter recognises them (a numpy reduction; they are never called), and compiled this
is exactly what ``tl.max`` / ``tl.sum`` emit.
"""

from __future__ import annotations

import triton.language as tl


def block_sparse_attention_fwd(
    Q, K, V, Out,
    q_perm, q_pos, q_unit, q_valid,
    k_pos, k_cls, k_valid,
    table, row_ptr, blocks,
    sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    Hq, G, Nq, Sq, Sk, nQ, U, C, D,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, sample × query head): the kept key blocks of its list, online softmax.

    Q/Out ``[B, Hq, Nq, D]`` in the original query order (rows gathered / scattered through
    ``q_perm``; ``-1`` at empty slots); K/V ``[B, Hkv, Sk, D]`` cube-major, block-aligned, rows
    contiguous. ``blocks`` holds ``2 * key_block + full`` per kept block, the row of (b, h, qb) from
    ``row_ptr[r]`` to ``row_ptr[r + 1]``. ``sm_scale`` is the score scale times log2(e) (exp2 below).
    """
    qb = nQ - 1 - tl.program_id(0)  # the longest rows (last query blocks) first
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // G
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qslot = b * Sq + offs_m
    q_ok = tl.load(q_valid + qslot) != 0
    qi = tl.load(q_perm + qslot).to(tl.int64)
    qp = tl.load(q_pos + qslot)
    qu = tl.load(q_unit + qslot).to(tl.int64)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    trow = table + ((b * Hq + h) * U + qu) * C  # [BLOCK] rows of the unit-by-class table
    kbase = K + b * stride_kb + kvh * stride_kh
    vbase = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK], 0.0, tl.float32)
    acc = tl.full([BLOCK, BLOCK_D], 0.0, tl.float32)
    r = bh.to(tl.int64) * nQ + qb
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    for t in range(start, end):
        e = tl.load(blocks + t)
        kn = (e >> 1).to(tl.int64) * BLOCK + offs_n
        k = tl.load(kbase + kn[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        if (e & 1) == 0:  # partial block: the token mask
            kslot = b * Sk + kn
            kv = tl.load(k_valid + kslot) != 0
            kp = tl.load(k_pos + kslot)
            kc = tl.load(k_cls + kslot)
            sel = tl.load(trow[:, None] + kc[None, :]) != 0
            ok = sel & kv[None, :] & (kp[None, :] <= qp[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        # rows with nothing attended so far keep m = -inf; exp2 of their -inf scores is 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        vt = tl.load(vbase + kn[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    # invalid queries and rows that attended nothing: zero; a NaN sum stays NaN (never dropped)
    zero = (l_i == 0.0) | ~q_ok
    out = tl.where(zero[:, None], 0.0, acc / tl.where(zero, 1.0, l_i)[:, None])
    tl.store(
        Out + b * stride_ob + h * stride_oh + qi[:, None] * stride_on + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=(qi >= 0)[:, None] & d_ok[None, :],
    )
