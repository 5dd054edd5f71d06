"""Finding token n-grams in training rows fast: hashing, a bitmap prefilter, exact lookup and checking.

The machinery :mod:`llm360.analysis.contamination` (every n-gram of many evaluation examples) and
:mod:`llm360.analysis.find` (one text, seed and extend) scan the training chunks with:

1. :func:`ngram_hashes` / :func:`seed_hashes`: a uint64 polynomial hash of the n tokens starting at
   every (or every ``stride``-th) position of a block of rows, computed with a few vectorized
   passes instead of n;
2. :func:`make_bitmap` / :func:`bitmap_candidates`: a bitmap of the wanted hashes' top bits, which
   drops nearly every position at the cost of one byte lookup each;
3. :class:`SortedHashes`: the exact hash match of the few positions left, by a bucket probe;
4. :func:`same_tokens`: the token by token check, so that a hash collision never reports a match.

The hash of tokens ``t_0 .. t_{n-1}`` is ``sum_j t_j * P^(n-1-j)`` mod 2^64 with the odd multiplier
:data:`HASH_P`. Only numpy is imported here: scan worker processes import this module and nothing
heavier. :func:`row_blocks` cuts the chunks into the blocks of whole rows both scans read, so memory
is bounded by one block, never by the size of the training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HASH_P = 0x9E3779B97F4A7C15
"""Odd 64-bit multiplier P of the n-gram polynomial hash (see :func:`ngram_hashes`)."""
_BIT_MASKS = (1 << np.arange(8)).astype(np.uint8)


def _work_arrays(buffers: list[np.ndarray] | None, n: int, dtypes: Sequence[type]) -> list[np.ndarray]:
    """Views of length n of reusable work arrays (``buffers`` is filled or grown on first use)."""
    if buffers is None:
        buffers = []
    if not buffers or len(buffers[0]) < n:
        buffers[:] = [np.empty(n, dtype=d) for d in dtypes]
    return [b[:n] for b in buffers]


def ngram_hashes(tokens: np.ndarray, n: int, buffers: list[np.ndarray] | None = None) -> np.ndarray:
    """uint64 hash of every n-gram of a 1-D token array: ``h[i] = sum_j tokens[i+j] * P^(n-1-j)`` mod 2^64.

    Built by doubling (hashes of 2, 4, 8, ... tokens, combined along the bits of n), so it costs
    about 2*log2(n) vectorized passes instead of n. Length ``len(tokens) - n + 1`` (0 if shorter).
    ``buffers`` (a list, filled on first use) keeps three work arrays between calls, so a scan
    that hashes block after block does not allocate (and page-fault) fresh memory each time; the
    result is a view into them, valid until the next call with the same buffers.
    """
    N = len(tokens)
    if N < n:
        return np.zeros(0, dtype=np.uint64)
    power, spare, res = _work_arrays(buffers, N, (np.uint64,) * 3)
    np.copyto(power, tokens, casting="unsafe")
    res_len, power_len, bit = 0, 1, 0
    while True:
        if n >> bit & 1:
            if res_len == 0:
                np.copyto(res, power)
                res_len = power_len
            else:  # res[i] = res[i] * P^power_len + power[i + res_len]
                m = N - (res_len + power_len) + 1
                np.multiply(res[:m], np.uint64(pow(HASH_P, power_len, 1 << 64)), out=res[:m])
                np.add(res[:m], power[res_len : res_len + m], out=res[:m])
                res_len += power_len
        if n >> (bit + 1) == 0:
            break
        m = N - 2 * power_len + 1  # power'[i] = power[i] * P^power_len + power[i + power_len]
        np.multiply(power[:m], np.uint64(pow(HASH_P, power_len, 1 << 64)), out=spare[:m])
        np.add(spare[:m], power[power_len : power_len + m], out=spare[:m])
        power, spare = spare, power
        power_len *= 2
        bit += 1
    return res[: N - n + 1]


def seed_hashes(tokens: np.ndarray, n: int, stride: int) -> np.ndarray:
    """uint64 hash of the n-gram starting at every `stride`-th position of a 1-D token array (positions 0,
    stride, 2 * stride, ... whose n-gram fits): the same hash as :func:`ngram_hashes`, by Horner's rule
    over n strided passes, so it costs about n / stride passes over the tokens."""
    m = (len(tokens) - n) // stride + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    p = np.uint64(HASH_P)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        np.multiply(h, p, out=h)
        np.add(h, tokens[j : j + stride * (m - 1) + 1 : stride], out=h, casting="unsafe")
    return h


# ------------------------------------------------------------------------------------- bitmap


def bitmap_bits(unique: int) -> int:
    """Bits b of the bitmap (2^b slots): about 32 slots per hash, between 2^16 and 2^32."""
    return int(min(32, max(16, int(np.ceil(np.log2(max(unique, 1) * 32))))))


def make_bitmap(hashes: np.ndarray, bits: int) -> np.ndarray:
    """2^bits bits, bit i set when some hash has top bits i (bit i is bit i % 8 of byte i // 8)."""
    slots = np.zeros(1 << bits, dtype=bool)
    slots[(hashes >> np.uint64(64 - bits)).astype(np.int64)] = True
    return np.packbits(slots, bitorder="little")


def bitmap_candidates(
    h: np.ndarray, bitmap: np.ndarray, bits: int, buffers: list[np.ndarray] | None = None
) -> np.ndarray:
    """Positions of h whose top ``bits`` bits are set in the bitmap (reusing ``buffers`` like ngram_hashes)."""
    slot, tmp, byte = _work_arrays(buffers, len(h), (np.int64, np.int64, np.uint8))
    np.right_shift(h, np.uint64(64 - bits), out=slot.view(np.uint64))
    np.right_shift(slot, 3, out=tmp)
    np.take(bitmap, tmp, out=byte)
    np.bitwise_and(slot, 7, out=tmp)
    np.bitwise_and(byte, _BIT_MASKS[tmp], out=byte)
    return np.flatnonzero(byte)


# ------------------------------------------------------------------------------- exact lookup


@dataclass
class SortedHashes:
    """Sorted distinct hashes, grouped by their top ``bits`` bits (about one hash per bucket), so that
    finding a hash is a probe of its bucket instead of a binary search."""

    hashes: np.ndarray
    """(U,) sorted distinct uint64 hashes."""
    starts: np.ndarray
    """(2^bits + 1,) index in ``hashes`` of the first hash of every bucket."""
    bits: int

    @classmethod
    def build(cls, hashes: np.ndarray) -> SortedHashes:
        b = int(min(32, max(1, int(np.ceil(np.log2(max(len(hashes), 2)))))))
        tops = (hashes >> np.uint64(64 - b)).astype(np.int64)
        return cls(hashes, np.searchsorted(tops, np.arange((1 << b) + 1)), b)

    def lookup(self, hc: np.ndarray) -> np.ndarray:
        """Index of each of hc in ``hashes``, -1 where absent."""
        bucket = (hc >> np.uint64(64 - self.bits)).view(np.int64)
        lo, hi = self.starts[bucket], self.starts[bucket + 1]
        out = np.full(len(hc), -1, dtype=np.int64)
        for k in range(int((hi - lo).max()) if len(hc) else 0):
            i = lo + k
            inside = i < hi
            hit = inside & (self.hashes[np.where(inside, i, 0)] == hc)
            out[hit] = i[hit]
        return out


def same_tokens(a: np.ndarray, a_pos: np.ndarray, b: np.ndarray, b_pos: np.ndarray, n: int) -> np.ndarray:
    """Whether ``a[a_pos[i] : a_pos[i] + n]`` equals ``b[b_pos[i] : b_pos[i] + n]``, for every i: the check
    after a hash match, so that a collision never counts."""
    offs = np.arange(n)
    return (a[a_pos[:, None] + offs] == b[b_pos[:, None] + offs]).all(axis=1)


# ---------------------------------------------------------------------------- training rows


def row_blocks(rows_per_chunk: Sequence[int], row_length: int, block_tokens: int) -> list[tuple[int, int, int]]:
    """(chunk, first row, end row) of the blocks of whole rows, about ``block_tokens`` tokens each (at least
    one row), that a scan reads one at a time, in chunk and row order."""
    per_block = max(1, block_tokens // row_length)
    return [(c, s, min(rows, s + per_block)) for c, rows in enumerate(rows_per_chunk)
            for s in range(0, rows, per_block)]  # fmt: skip
