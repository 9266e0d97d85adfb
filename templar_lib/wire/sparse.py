"""SparseLoCo gradient files: `gradient-{window}-{uid}.safetensors` holding a templar_lib.sparseloco.SparseDelta per
parameter (gradient format 3; formats 1 and 2 are wire/gradient.py's). The templar header:

    {"format": 3, "kind": "gradient", "window": w, "uid": u, "hparams_hash": "...", "model_hash": "...",
     "probes": [θ values at checkpoints.probe_positions(w)], "bins": 4, ["state": [sha256 before, after],]
     "params": {name: {"shape": [...], "chunk": [r, c] or [n], "k": k, "rice": b}, ...}}

Per parameter `name`, with N = n_chunks·k kept values, chunk after chunk, positions increasing within a chunk, two
tensors (two, not four: on the tiny preset each safetensors entry costs as much as 40 kept values):

    {name}.bits   U8, three byte streams back to back; all but the last have lengths the header implies:
                    codes      ⌈N·w/8⌉ bytes: quantisation codes of w bits (w = 2 for 4 bins), 8/w to a byte, the
                               first in the low bits, unused high bits 0
                    remainders ⌈N·b/8⌉ bytes: Rice remainders, b = index_coding.rice_parameter(chunk size, k) bits
                    unary      the rest: Rice unary stream of the gaps between sorted positions (index_coding.py)
    {name}.quant  F32 (1 + bins,): [shift, table[0], …, table[bins − 1]]; value = table[code] + shift

`read_sparse_gradient` checks, before trusting a byte: the container (container.py: size limit, safetensors
header, kind/format/window), uid, hyper-parameters hash, the parameter set, each shape against the model, chunk and
k against sparseloco's rules, the Rice parameter, every tensor's dtype and length; then decodes the index streams
(counts, range, distinct positions per chunk: the gaps make each chunk's positions strictly increasing), the codes
(below bins, zero padding) and checks that shift, table and every value table[b] + shift are finite. A file is
accepted only in the exact bytes `write_sparse_gradient` gives for what it holds (one content, one encoding: no
other padding, JSON spelling or Rice parameter), so write(read(x)) == x.

SparseLoCo aggregation files: `aggregation-{window}.safetensors` of a sparseloco network (aggregation format 3;
formats 1 and 2 are wire/aggregation.py's, DeMo's). The smallest exact record of the update is what the accepted
peers sent: every node decodes their SparseDeltas and replays sparseloco.combine_deltas in ascending uid order
(deterministic on CPU), then θ ← θ − lr·update (sparseloco.outer_step). The templar header:

    {"format": 3, "kind": "aggregation", "window": w, "step": s, "lr": lr, "peers": [uids ascending],
     "refused": {uid: reason}, "hparams_hash": "...", "bins": 4,
     "params": {name: {"shape": [...], "chunk": [r, c] or [n], "k": k, "rice": b}, ...}}

`refused` as in wire/aggregation.py (listed uids left out and why; the validator reads it to punish a swap). Every
listed peer sent every parameter; with no peer, "params" is {} and the file has no tensors (θ stays). Per parameter,
the P = len(peers) peers' SparseDeltas packed into two tensors (not 2·P: each safetensors entry costs ~70 bytes):

    {name}.bits   U8, the gradient format's three streams over the P peers' chunks stacked, peer after peer in the
                  order of `peers` (P·n_chunks rows of k positions: the P gradient files' streams, joined bit by bit
                  rather than byte by byte, so one Rice parameter b and no per-peer lengths)
    {name}.quant  F32 (P, 1 + bins): row p = [shift, table[0], …, table[bins − 1]] of peers[p]

`read_sparse_aggregation` checks what read_sparse_gradient checks, per peer, and step, lr, peers (ascending,
distinct, at most max_peers) and refused; again only write_sparse_aggregation's exact bytes are accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from templar_lib.encodings import SPARSELOCO_FORMAT
from templar_lib.index_coding import decode_indices, encode_indices, max_unary_bytes, rice_parameter, sort_rows
from templar_lib.sparseloco import BINS, SparseDelta, combine_deltas, keep_count, layout
from templar_lib.wire.container import (InvalidFile, check_finite, check_sender, check_state, check_step, expect,
                                        is_int, load_tensors, parse_templar_file, save_templar_file,
                                        set_difference, state_header, untrusted_reader)

SPARSE_FORMAT = SPARSELOCO_FORMAT  # gradient and aggregation files (formats 1 and 2 are the demo strategy's)
HEADER_BYTES = 1 << 20  # bound on the safetensors + templar header of one file (a few kB for the 1b preset)
PARAM_FIELDS = {"shape", "chunk", "k", "rice"}
PARTS = ("bits", "quant")
MAX_REFUSED = 1024  # entries of an aggregation's `refused`
MAX_REASON = 500  # characters of one refusal reason (as wire/aggregation.read_refusals keeps)


@dataclass(frozen=True, eq=False)
class SparseGradient:
    """One miner's SparseLoCo gradient for one window: a SparseDelta per parameter name (all of the same bins)."""

    window: int
    uid: int
    tensors: dict[str, SparseDelta]
    hparams_hash: str = ""
    model_hash: str = ""  # fingerprint of the θ_window the miner trained on (checkpoints.model_fingerprint)
    probes: tuple[float, ...] = ()  # that θ's values at the window's probe positions
    state: tuple[str, str] | None = None  # digests of the miner's state before and after the window (spot_check.py)

    def with_tensors(self, tensors: dict[str, SparseDelta], **changes) -> SparseGradient:
        """The same file with other deltas (and any other field changed), as wire.Gradient.with_tensors."""
        return dataclasses.replace(self, tensors=tensors, **changes)


@dataclass(frozen=True, eq=False)
class SparseAggregation:
    """The update of one window on a sparseloco network, as the accepted peers' own SparseDeltas:
    θ_{window+1} = outer_step(θ_window, sparse_update(self), lr).

    step: the outer step's index (θ_window has had `step` steps applied). peers: the uids combined, ascending.
    tensors: name -> one SparseDelta per peer, in the order of `peers` (every peer has every parameter; {} when
    there is no peer). refused: uids of the validator's list left out, and why (as wire/aggregation.Aggregation).
    """

    window: int
    step: int
    lr: float
    peers: list[int]
    tensors: dict[str, list[SparseDelta]]
    hparams_hash: str = ""
    refused: dict[int, str] = field(default_factory=dict)


def code_bits(bins: int) -> int:
    """Bits per quantisation code: the smallest of 1, 2, 4, 8 that holds bins codes (4 bins: 2)."""
    return next(bits for bits in (1, 2, 4, 8) if bins <= 1 << bits)


def pack_codes(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """Codes in [0, bins), any shape -> U8 (⌈numel·w/8⌉,): 8/w codes per byte, code j in bits w·(j mod 8/w) upward."""
    bits = code_bits(bins)
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.int64)
    padded[:flat.size] = flat
    shifts = np.arange(per_byte, dtype=np.int64) * bits
    packed = (padded.reshape(-1, per_byte) << shifts).sum(axis=1).astype(np.uint8)
    return torch.from_numpy(packed)


def unpack_codes(packed: torch.Tensor, count: int, bins: int) -> torch.Tensor:
    """Inverse of pack_codes: (count,) uint8. ValueError when a code is ≥ bins or the padding is not zero."""
    bits = code_bits(bins)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = ((packed.numpy()[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if codes[count:].any():
        raise ValueError("nonzero padding after the last code")
    if codes[:count].size and int(codes[:count].max()) >= bins:
        raise ValueError(f"code outside [0, {bins})")
    return torch.from_numpy(codes[:count].copy())


def max_sparse_gradient_bytes(shapes: Mapping[str, tuple[int, ...]], *, topk: int, target_chunk: int,
                              bins: int = BINS) -> int:
    """The largest file an honest miner writes for a model of these shapes (a reader's size limit).

    Per chunk of c positions keeping k: the unary stream at most (k + (c − k) >> b)/8 bytes (gaps sum to ≤ c − k),
    remainders k·b/8, codes k·w/8; per parameter its quant tensor and at most 512 bytes of header."""
    return HEADER_BYTES + 8 + sum(_param_bound(shape, topk, target_chunk, bins, 1) for shape in shapes.values())


def max_sparse_aggregation_bytes(shapes: Mapping[str, tuple[int, ...]], *, topk: int, target_chunk: int, peers: int,
                                 bins: int = BINS) -> int:
    """The largest aggregation file of `peers` peers' SparseDeltas for a model of these shapes (a reader's limit):
    the gradient bound's streams and quant rows `peers` times per parameter, plus room in the header for the peers
    list and a full `refused`. Roughly peers × max_sparse_gradient_bytes's tensor part: it grows with both."""
    header = HEADER_BYTES + 8 + 24 * peers + MAX_REFUSED * (MAX_REASON + 32)
    return header + sum(_param_bound(shape, topk, target_chunk, bins, peers) for shape in shapes.values())


def _param_bound(shape: tuple[int, ...], topk: int, target_chunk: int, bins: int, peers: int) -> int:
    """Bytes of one parameter's two tensors and header entries for `peers` peers' chunks stacked (at most)."""
    _, chunk = layout(shape, target_chunk)
    size = math.prod(chunk)
    k = keep_count(size, topk)
    rows = peers * (math.prod(shape) // size)
    unary = max_unary_bytes(rows, k, size, rice_parameter(size, k))
    return unary + sum(_stream_lengths(rows * k, size, k, bins)) + 4 * peers * (bins + 1) + 512


# ---------------------------------------------------------------------------------------------------- writing
def write_sparse_gradient(gradient: SparseGradient) -> bytes:
    """The file's bytes: deterministic (sorted names and JSON keys). ValueError if parameters differ in bins."""
    bins = {sent.bins for sent in gradient.tensors.values()}
    if len(bins) > 1:
        raise ValueError(f"one file holds one quantiser, got bins {sorted(bins)}")
    bins_value = bins.pop() if bins else BINS
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(gradient.tensors):
        tensors.update(_param_tensors(name, gradient.tensors[name]))
        sent = gradient.tensors[name]
        params[name] = {"shape": list(sent.shape), "chunk": list(sent.chunk), "k": sent.k,
                        "rice": rice_parameter(sent.chunk_size, sent.k)}
    header = {"format": SPARSE_FORMAT, "kind": "gradient", "window": gradient.window, "uid": gradient.uid,
              "hparams_hash": gradient.hparams_hash, "model_hash": gradient.model_hash,
              "probes": [float(value) for value in gradient.probes], "bins": bins_value, "params": params
              } | state_header(gradient.state)
    return save_templar_file(tensors, header)


def _param_tensors(name: str, sent: SparseDelta) -> dict[str, torch.Tensor]:
    """The two tensors of one parameter (positions sorted per chunk, codes permuted alike)."""
    return {f"{name}.bits": _encode_bits(sent.idx, sent.codes, sent.chunk_size, sent.bins),
            f"{name}.quant": _quant_row(sent)}


def _encode_bits(idx: torch.Tensor, codes: torch.Tensor, chunk_size: int, bins: int) -> torch.Tensor:
    """codes ‖ remainders ‖ unary of rows of distinct positions within chunks of chunk_size, (rows, k) each: one
    parameter's chunks, or several peers' stacked. Each row's positions sorted first, its codes permuted alike."""
    idx, codes = sort_rows(idx.detach().to("cpu").long(), codes.detach().to("cpu"))
    unary, remainders, _ = encode_indices(idx, chunk_size)
    streams = np.frombuffer(remainders + unary, dtype=np.uint8)
    return torch.cat([pack_codes(codes, bins), torch.from_numpy(streams.copy())])


def _quant_row(sent: SparseDelta) -> torch.Tensor:
    """[shift, table[0], …, table[bins − 1]] float32."""
    return torch.cat([torch.tensor([sent.shift], dtype=torch.float32), sent.table.detach().to("cpu").float()])


# ---------------------------------------------------------------------------------------------------- reading
@untrusted_reader
def read_sparse_gradient(data: bytes, *, window: int, uid: int, shapes: Mapping[str, tuple[int, ...]], topk: int,
                         target_chunk: int, hparams_hash: str | None = None, max_bytes: int, bins: int = BINS
                         ) -> SparseGradient:
    """Parse and validate a SparseLoCo gradient file expected from `uid` for `window`.

    shapes: the model's parameter shapes; the file must carry exactly these, chunked by sparseloco.layout with
    target_chunk, keeping sparseloco.keep_count(chunk size, topk) values per chunk, quantised to `bins` bins.
    hparams_hash: when given, the file's must match. max_bytes: refuse a larger file before parsing it
    (max_sparse_gradient_bytes is the bound for honest files). Returns a SparseGradient whose SparseDeltas hold
    int64 idx (increasing per chunk), uint8 codes, a float32 shift and table. Raises InvalidFile.
    """
    entries, header = parse_templar_file(data, kind="gradient", formats=(SPARSE_FORMAT,), window=window,
                                         max_bytes=max_bytes, max_header=HEADER_BYTES)
    check_sender(header, uid, hparams_hash)
    state = check_state(header)
    expect(is_int(header.get("bins")) and header["bins"] == bins, f"bins {str(header.get('bins'))[:20]}, "
                                                                  f"expected {bins}")
    params = header.get("params")
    expect(isinstance(params, dict), "params must be an object")
    expect(set(params) == set(shapes), set_difference("parameters", set(params), set(shapes)))
    expected = {f"{name}.{part}" for name in params for part in PARTS}
    expect(set(entries) == expected, "tensors do not match the declared parameters")
    declared = {name: _declared_param(name, params[name], entries, tuple(shapes[name]), topk, target_chunk, bins)
                for name in sorted(params)}
    loaded = load_tensors(data)
    tensors = {name: _decode_param(name, loaded, tuple(shapes[name]), chunk, k, bins)
               for name, (chunk, k) in declared.items()}
    gradient = SparseGradient(window=window, uid=uid, tensors=tensors, hparams_hash=header["hparams_hash"],
                              model_hash=header.get("model_hash", ""), probes=tuple(header.get("probes", [])),
                              state=state)
    expect(write_sparse_gradient(gradient) == bytes(data), "file is not in its canonical encoding")
    return gradient


def _declared_param(name: str, declared: object, entries: dict[str, dict], shape: tuple[int, ...], topk: int,
                    target_chunk: int, bins: int, peers: int | None = None) -> tuple[tuple[int, ...], int]:
    """Check one header param entry and its tensors' dtypes and lengths against the model: (chunk, k).
    peers: None for a gradient's tensors (one peer, quant (1 + bins,)), else an aggregation's (that many peers'
    chunks stacked, quant (peers, 1 + bins))."""
    expect(isinstance(declared, dict) and set(declared) == PARAM_FIELDS, f"{name}: malformed param entry")
    _, chunk = layout(shape, target_chunk)
    size = math.prod(chunk)
    k = keep_count(size, topk)
    expect(_int_list(declared["shape"]) == list(shape), f"{name}: shape differs from the model's {list(shape)}")
    expect(_int_list(declared["chunk"]) == list(chunk), f"{name}: chunk differs from {list(chunk)}")
    expect(is_int(declared["k"]) and declared["k"] == k, f"{name}: {str(declared['k'])[:20]} values per chunk, "
                                                         f"expected {k}")
    rice = rice_parameter(size, k)
    expect(is_int(declared["rice"]) and declared["rice"] == rice, f"{name}: rice parameter, expected {rice}")
    bits, quant = entries[f"{name}.bits"], entries[f"{name}.quant"]
    count = (1 if peers is None else peers) * (math.prod(shape) // size) * k
    fixed = sum(_stream_lengths(count, size, k, bins))  # codes and remainders
    unary = max_unary_bytes(count // k, k, size, rice)
    expect(bits["dtype"] == "U8" and len(bits["shape"]) == 1 and fixed < bits["shape"][0] <= fixed + unary,
           f"{name}: bits tensor mismatch")  # > : the unary stream is never empty
    quant_shape = [1 + bins] if peers is None else [peers, 1 + bins]
    expect(quant["dtype"] == "F32" and quant["shape"] == quant_shape, f"{name}: quant tensor mismatch")
    return chunk, k


def _stream_lengths(count: int, chunk_size: int, k: int, bins: int) -> tuple[int, int]:
    """Bytes of the codes and of the Rice remainders of `count` kept values at the start of a bits tensor."""
    return -(-count * code_bits(bins) // 8), -(-count * rice_parameter(chunk_size, k) // 8)


def _decode_bits(name: str, bits: torch.Tensor, rows: int, k: int, chunk_size: int, bins: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _encode_bits: (idx (rows, k) int64 increasing per row, codes (rows, k) uint8); InvalidFile for bad
    streams."""
    codes_bytes, rem_bytes = _stream_lengths(rows * k, chunk_size, k, bins)
    try:
        codes = unpack_codes(bits[:codes_bytes], rows * k, bins).reshape(rows, k)
        idx = decode_indices(bits[codes_bytes + rem_bytes:].numpy().tobytes(),
                             bits[codes_bytes:codes_bytes + rem_bytes].numpy().tobytes(),
                             rice_parameter(chunk_size, k), rows, k, chunk_size)
    except ValueError as error:
        raise InvalidFile(f"{name}: {str(error)[:120]}") from None
    return idx, codes


def _delta(name: str, shape: tuple[int, ...], chunk: tuple[int, ...], idx: torch.Tensor, codes: torch.Tensor,
           quant: torch.Tensor) -> SparseDelta:
    """A SparseDelta from decoded streams and its quant row; InvalidFile for a non-finite shift, table or value."""
    check_finite(name, quant)
    sent = SparseDelta(shape=shape, chunk=chunk, idx=idx, codes=codes, shift=float(quant[0]), table=quant[1:].clone())
    check_finite(name, sent.table + quant[0])  # every value table[b] + shift, not only its parts
    return sent


def _decode_param(name: str, loaded: dict[str, torch.Tensor], shape: tuple[int, ...], chunk: tuple[int, ...],
                  k: int, bins: int) -> SparseDelta:
    """One parameter's SparseDelta from its checked tensors; InvalidFile for bad streams or non-finite numbers."""
    size = math.prod(chunk)
    idx, codes = _decode_bits(name, loaded[f"{name}.bits"], math.prod(shape) // size, k, size, bins)
    return _delta(name, shape, chunk, idx, codes, loaded[f"{name}.quant"])


def _int_list(value: object) -> list[int] | None:
    """value if it is a JSON list of integers (not booleans), else None."""
    return value if isinstance(value, list) and all(is_int(n) for n in value) else None


# ---------------------------------------------------------------------------------------------------- aggregation
def sparse_update(aggregation: SparseAggregation) -> dict[str, torch.Tensor]:
    """The dense update a node applies, θ ← θ − lr·update: per parameter sparseloco.combine_deltas of the peers'
    SparseDeltas in uid order (float32 of the parameter's shape; bit-identical on every CPU). {} with no peer."""
    return {name: combine_deltas(aggregation.tensors[name]) for name in sorted(aggregation.tensors)}


def write_sparse_aggregation(aggregation: SparseAggregation) -> bytes:
    """The file's bytes: deterministic (sorted names and JSON keys, peers in uid order). ValueError for peers not
    ascending and distinct, a parameter without exactly one SparseDelta per peer, peers that disagree on a
    parameter's shape, chunk or k, or parameters of different bins."""
    peers = [int(uid) for uid in aggregation.peers]
    if peers != sorted(set(peers)) or any(uid < 0 for uid in peers):
        raise ValueError(f"peers must be ascending distinct uids, got {peers[:8]}")
    if not peers and aggregation.tensors:
        raise ValueError("an aggregation of no peer has no parameters")
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    bins = set()
    for name in sorted(aggregation.tensors):
        sent = list(aggregation.tensors[name])
        if len(sent) != len(peers):
            raise ValueError(f"{name}: {len(sent)} SparseDeltas for {len(peers)} peers")
        first = sent[0]
        if any((delta.shape, delta.chunk, delta.k, delta.bins) != (first.shape, first.chunk, first.k, first.bins)
               for delta in sent):
            raise ValueError(f"{name}: peers disagree on shape, chunk, k or bins")
        bins.add(first.bins)
        tensors[f"{name}.bits"] = _encode_bits(torch.cat([delta.idx for delta in sent]),
                                               torch.cat([delta.codes for delta in sent]), first.chunk_size, first.bins)
        tensors[f"{name}.quant"] = torch.stack([_quant_row(delta) for delta in sent])
        params[name] = {"shape": list(first.shape), "chunk": list(first.chunk), "k": first.k,
                        "rice": rice_parameter(first.chunk_size, first.k)}
    if len(bins) > 1:
        raise ValueError(f"one file holds one quantiser, got bins {sorted(bins)}")
    header = {"format": SPARSE_FORMAT, "kind": "aggregation", "window": aggregation.window,
              "step": aggregation.step, "lr": float(aggregation.lr), "peers": peers,
              "refused": {str(uid): reason for uid, reason in sorted(aggregation.refused.items())},
              "hparams_hash": aggregation.hparams_hash, "bins": bins.pop() if bins else BINS, "params": params}
    return save_templar_file(tensors, header)


@untrusted_reader
def read_sparse_aggregation(data: bytes, *, window: int, shapes: Mapping[str, tuple[int, ...]], topk: int,
                            target_chunk: int, max_peers: int, max_bytes: int, hparams_hash: str | None = None,
                            bins: int = BINS) -> SparseAggregation:
    """Parse and validate the SparseLoCo aggregation file of `window`.

    shapes, topk, target_chunk, bins: as read_sparse_gradient (every peer's SparseDeltas are checked as a gradient
    file's). max_peers: refuse a file combining more peers. max_bytes: refuse a larger file before parsing it
    (max_sparse_aggregation_bytes with peers=max_peers is the bound for honest files). hparams_hash: when given,
    the file's must match. Returns a SparseAggregation whose SparseDeltas hold int64 idx (increasing per chunk),
    uint8 codes, a float32 shift and table. Raises InvalidFile.
    """
    entries, header = parse_templar_file(data, kind="aggregation", formats=(SPARSE_FORMAT,), window=window,
                                         max_bytes=max_bytes)
    peers = check_step(header)
    expect(len(peers) <= max_peers, f"{len(peers)} peers, at most {max_peers} allowed")
    refused = _read_refused(header.get("refused"), peers)
    expect(isinstance(header.get("hparams_hash"), str), "hparams_hash missing")
    if hparams_hash is not None:
        expect(header["hparams_hash"] == hparams_hash,
               f"hparams hash {header['hparams_hash'][:32]!r} differs from ours {hparams_hash!r}")
    expect(is_int(header.get("bins")) and header["bins"] == bins, f"bins {str(header.get('bins'))[:20]}, "
                                                                  f"expected {bins}")
    params = header.get("params")
    expect(isinstance(params, dict), "params must be an object")
    expect(set(params) == (set(shapes) if peers else set()),
           set_difference("parameters", set(params), set(shapes)) if peers else "no peer, yet parameters")
    expect(set(entries) == {f"{name}.{part}" for name in params for part in PARTS},
           "tensors do not match the declared parameters")
    declared = {name: _declared_param(name, params[name], entries, tuple(shapes[name]), topk, target_chunk, bins,
                                      peers=len(peers))
                for name in sorted(params)}
    loaded = load_tensors(data) if declared else {}
    tensors = {name: _decode_peers(name, loaded, tuple(shapes[name]), chunk, k, bins, len(peers))
               for name, (chunk, k) in declared.items()}
    aggregation = SparseAggregation(window=window, step=header["step"], lr=header["lr"], peers=peers,
                                    tensors=tensors, hparams_hash=header["hparams_hash"], refused=refused)
    expect(write_sparse_aggregation(aggregation) == bytes(data), "file is not in its canonical encoding")
    return aggregation


def _read_refused(refused: object, peers: Sequence[int]) -> dict[int, str]:
    """The header's `refused`: decimal uid -> short reason, none of them a combined peer."""
    expect(isinstance(refused, dict) and len(refused) <= MAX_REFUSED
           and all(key.isascii() and key.isdigit() and len(key) <= 12 and isinstance(reason, str)
                   and len(reason) <= MAX_REASON for key, reason in refused.items()),
           "refused must map uids to short reasons")
    result = {int(uid): reason for uid, reason in refused.items()}
    expect(not set(result) & set(peers), "a uid both combined and refused")
    return result


def _decode_peers(name: str, loaded: dict[str, torch.Tensor], shape: tuple[int, ...], chunk: tuple[int, ...],
                  k: int, bins: int, peers: int) -> list[SparseDelta]:
    """One parameter's SparseDelta of each of `peers` peers from its checked tensors (streams of the peers' chunks
    stacked, one quant row per peer); InvalidFile for bad streams or non-finite numbers."""
    size = math.prod(chunk)
    n_chunks = math.prod(shape) // size
    idx, codes = _decode_bits(name, loaded[f"{name}.bits"], peers * n_chunks, k, size, bins)
    quant = loaded[f"{name}.quant"]
    return [_delta(f"{name} (peer {p})", shape, chunk, idx[p * n_chunks:(p + 1) * n_chunks],
                   codes[p * n_chunks:(p + 1) * n_chunks], quant[p]) for p in range(peers)]
