"""Triton source of templar_lib.kernels (see there for the math). Imported only when a fused kernel is first used,
so that CPU-only installs never import triton; TRITON_INTERPRET=1 must be set before this import to interpret."""

import triton
import triton.language as tl


@triton.jit
def _row_major_rank(flags):
    """Inclusive prefix count of a (rows, cols) int32 0/1 tile in row-major order."""
    row_totals = tl.sum(flags, axis=1)
    before_row = tl.cumsum(row_totals, axis=0) - row_totals
    return tl.cumsum(flags, axis=1) + before_row[:, None]


@triton.jit
def _kth_largest(bits, K: tl.constexpr, VALID: tl.constexpr, R: tl.constexpr, THRESHOLDS: tl.constexpr):
    """The largest t with #(bits ≥ t) ≥ K, or any t with #(bits ≥ t) = K (then no ties need breaking).

    bits: (BLOCK_R, BLOCK_C) int32, -1 outside the chunk's R rows. The search starts from [min over rows of the row
    maximum, maximum] when R ≥ K (each row holds its maximum, so at least R ≥ K elements are ≥ the smallest), else
    from [0, maximum]; it splits the interval at THRESHOLDS points per round (1: bisection), their counts, each
    < 2¹⁶, packed into one integer so that a round costs one reduction over the chunk, not THRESHOLDS; and it stops
    as soon as a threshold keeps exactly K (on continuous data, a handful of rounds)."""
    row_max = tl.max(bits, axis=1)
    high = tl.max(row_max, axis=0)
    if R >= K:
        rows = tl.arange(0, bits.shape[0])
        low = tl.min(tl.where(rows < R, row_max, 0x7FFFFFFF), axis=0)
        count_low = tl.full((), K + 1, tl.int32)  # ≥ K, not counted: "not known to be exactly K"
    else:
        low = tl.full((), 0, tl.int32)
        count_low = tl.full((), VALID, tl.int32)  # #(bits ≥ 0): every element inside the chunk
    while (low < high) & (count_low != K):
        span = (high - low).to(tl.int64)
        if THRESHOLDS > 2:
            packed = tl.zeros(bits.shape, tl.int64)
        else:
            packed = tl.zeros(bits.shape, tl.int32)
        for j in tl.static_range(1, THRESHOLDS + 1):
            threshold = (low + (span * j + THRESHOLDS) // (THRESHOLDS + 1)).to(tl.int32)  # ⌈j·span / (T+1)⌉ up
            packed += (bits >= threshold).to(packed.dtype) << (16 * (j - 1))
        counts = tl.sum(tl.sum(packed, axis=1), axis=0)
        new_low = low
        new_high = high
        new_count = count_low
        found = low != low  # False, as a scalar tensor
        for j in tl.static_range(1, THRESHOLDS + 1):
            threshold = (low + (span * j + THRESHOLDS) // (THRESHOLDS + 1)).to(tl.int32)
            count = ((counts >> (16 * (j - 1))) & 0xFFFF).to(tl.int32)
            new_low = tl.where(count >= K, threshold, new_low)  # counts fall as j rises: the last such j wins
            new_count = tl.where(count >= K, count, new_count)
            new_high = tl.where((count < K) & ~found, threshold - 1, new_high)  # the first such j wins
            found = found | (count < K)
        low = new_low
        high = new_high
        count_low = new_count
    return low


@triton.jit
def _top_k(bits, K: tl.constexpr, R: tl.constexpr, C: tl.constexpr, THRESHOLDS: tl.constexpr):
    """The K largest of a chunk's bits (-1 outside the chunk) as a 0/1 mask; where several equal the K-th, the
    first ones in row-major order (torch's stable sort would keep the same)."""
    low = _kth_largest(bits, K, R * C, R, THRESHOLDS)
    kept = bits >= low
    if tl.sum(tl.sum(kept.to(tl.int32), axis=1), axis=0) != K:  # ties at low: the first ones, row-major
        above = bits > low
        tied = (bits == low).to(tl.int32)
        needed = K - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
        kept = above | ((_row_major_rank(tied) <= needed) & (tied > 0))
    return kept


@triton.jit
def _store_kept(x, kept, chunk, position, idx_ptr, vals_ptr, K: tl.constexpr):
    """The kept positions (row-major within the chunk) and their x, in increasing position, to row `chunk`."""
    slot = _row_major_rank(kept.to(tl.int32)) - 1
    out = chunk.to(tl.int64) * K + slot
    tl.store(idx_ptr + out, position.to(tl.int64), mask=kept)
    tl.store(vals_ptr + out, x, mask=kept)


@triton.jit
def encode(m_ptr, g_ptr, dr_ptr, dc_ptr, idx_ptr, vals_ptr, cols, blocks_x, n_chunks, decay, lr,
           R: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
           PRECISION: tl.constexpr, THRESHOLDS: tl.constexpr, SKIP: tl.constexpr = 0):
    """Chunks program_id, program_id + programs, ... (one each when there are as many programs as chunks).
    SKIP (measurement only, wrong results): 1 = keep the first K positions instead of selecting, 2 = no DCT."""
    i = tl.arange(0, BLOCK_R)[:, None]
    j = tl.arange(0, BLOCK_C)[None, :]
    inside = (i < R) & (j < C)
    k_r = tl.arange(0, BLOCK_R)
    k_c = tl.arange(0, BLOCK_C)
    d_r = tl.load(dr_ptr + k_r[:, None] * BLOCK_R + k_r[None, :])  # D_r[k, a], zero-padded
    d_c_t = tl.load(dc_ptr + k_c[None, :] * BLOCK_C + k_c[:, None])  # D_cᵀ[b, l] = D_c[l, b]
    chunk = tl.program_id(0)
    while chunk < n_chunks:
        by = chunk // blocks_x
        bx = chunk % blocks_x
        offsets = (by * R + i).to(tl.int64) * cols + bx * C + j
        m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
        g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        m = m * decay + g * lr
        tl.store(m_ptr + offsets, m, mask=inside)
        # X = D_r · m · D_cᵀ on the padded tile (the padding of D is zero, so X is zero outside (R, C))
        if SKIP == 2:
            x = m
        else:
            x = tl.dot(tl.dot(d_r, m, input_precision=PRECISION), d_c_t, input_precision=PRECISION)
        # the k-th largest |X| as int32 bits (for floats ≥ 0 the int order is the float order); padding is -1
        bits = tl.where(inside, tl.abs(x).to(tl.int32, bitcast=True), -1)
        if SKIP == 1:
            kept = (i * C + j < K) & inside
        else:
            kept = _top_k(bits, K, R, C, THRESHOLDS)
        _store_kept(x, kept, chunk, i * C + j, idx_ptr, vals_ptr, K)
        chunk += tl.num_programs(0)


@triton.jit
def decode(m_ptr, idx_ptr, vals_ptr, largest_ptr, dr_ptr, dc_ptr, cols, blocks_x, n_chunks,
           R: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_C: tl.constexpr, VALUES: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.arange(0, BLOCK_K)
    listed = s < K
    a = tl.arange(0, BLOCK_R)
    b = tl.arange(0, BLOCK_C)
    i = a[:, None]
    j = b[None, :]
    inside = (i < R) & (j < C)
    if VALUES == 3:  # as compression.quantize_int8: scale = max|vals| / 127 over the parameter
        scale = tl.maximum(tl.div_rn(tl.load(largest_ptr), 127.0), 1.1754943508222875e-38)
    chunk = tl.program_id(0)
    while chunk < n_chunks:
        by = chunk // blocks_x
        bx = chunk % blocks_x
        entry = chunk.to(tl.int64) * K + s
        position = tl.load(idx_ptr + entry, mask=listed, other=0)
        v = tl.load(vals_ptr + entry, mask=listed, other=0.0)
        if VALUES == 1:
            # round to nearest even at bfloat16's 8-bit mantissa, in the bits (the interpreter's cast truncates)
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        elif VALUES == 2:
            v = v.to(tl.float16).to(tl.float32)
        elif VALUES == 3:  # q = round_half_even(v / scale), |q| ≤ 127; v = q · scale
            y = tl.div_rn(v, scale)
            q = tl.where(tl.abs(y) < 4194304.0, (y + 12582912.0) - 12582912.0, y)  # round half to even: 1.5·2²³
            v = tl.minimum(tl.maximum(q, -127.0), 127.0) * scale
        v = tl.where(listed, v, 0.0)
        tl.store(vals_ptr + entry, v, mask=listed)
        row = (position // C).to(tl.int32)
        col = (position % C).to(tl.int32)
        basis_rows = tl.load(dr_ptr + row[None, :] * BLOCK_R + a[:, None]) * v[None, :]  # (BLOCK_R, BLOCK_K)
        basis_cols = tl.load(dc_ptr + col[:, None] * BLOCK_C + b[None, :])  # (BLOCK_K, BLOCK_C)
        t = tl.dot(basis_rows, basis_cols, input_precision=PRECISION)  # D_rᵀ · X · D_c
        offsets = (by * R + i).to(tl.int64) * cols + bx * C + j
        m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
        tl.store(m_ptr + offsets, m - t, mask=inside)
        chunk += tl.num_programs(0)


@triton.jit
def sparse_select(e_ptr, d_ptr, out_ptr, idx_ptr, vals_ptr, cols, blocks_x, n_chunks, decay,
                  R: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  THRESHOLDS: tl.constexpr, HAS_ERROR: tl.constexpr):
    """sparseloco steps 1–3 (templar_lib.kernels.sparse_select), chunks program_id, program_id + programs, ..."""
    i = tl.arange(0, BLOCK_R)[:, None]
    j = tl.arange(0, BLOCK_C)[None, :]
    inside = (i < R) & (j < C)
    chunk = tl.program_id(0)
    while chunk < n_chunks:
        by = chunk // blocks_x
        bx = chunk % blocks_x
        offsets = (by * R + i).to(tl.int64) * cols + bx * C + j
        e = tl.load(d_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_ERROR:
            e = tl.load(e_ptr + offsets, mask=inside, other=0.0).to(tl.float32) * decay + e
        tl.store(out_ptr + offsets, e, mask=inside)
        # |e| as bits by clearing the sign bit (not tl.abs: PTX leaves the bits of |NaN| unspecified), so a NaN or
        # an inf is above every finite value and always kept, where the caller looks for it
        bits = tl.where(inside, e.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)
        _store_kept(e, _top_k(bits, K, R, C, THRESHOLDS), chunk, i * C + j, idx_ptr, vals_ptr, K)
        chunk += tl.num_programs(0)
