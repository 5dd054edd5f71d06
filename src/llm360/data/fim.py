"""Fill-in-the-middle (FIM): a document's text cut into prefix, middle and suffix and reordered.

A mix entry with ``fim_rate`` > 0 transforms that share of its document copies before they are
tokenized, the way StarCoder trained (Bavarian et al. 2022, "Efficient Training of Language
Models to Fill in the Middle"):

* two split points, uniform over the text's characters ``[0, len]`` and sorted, cut it into
  ``prefix = text[:lo]``, ``middle = text[lo:hi]``, ``suffix = text[hi:]`` (any part may be empty);
* each part is tokenized on its own, and the copy is laid out with the sentinels as
  PSM ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>`` or, a share
  ``spm_rate`` of the transformed copies, SPM ``<fim_prefix> <fim_suffix> suffix <fim_middle>
  prefix middle <eos>`` (StarCoder's SPM variant: prefix and middle stay contiguous).

Every draw -- FIM or not, PSM or SPM, the two split points -- comes from one seeded hash of the
data seed, the source, the document id, the mix entry (stage and position) and the copy's repeat
number (:func:`fim_split`), so each epoch of a repeated source gets its own draw, and the result
never depends on pieces, workers or executors.

What was done is recorded in the document's line of ``data/documents/<source>.jsonl.gz``: a
``fim`` list with one :func:`fim_record` per transformed copy (stage, entry, epoch, mode, split
points in characters, the text's length and each part's tokens). A provenance span of such a copy
carries its position in that list (``fim`` = 1, 2, ...; 0 for a copy as it is), and
:func:`locate` maps the span's token offsets in the copy back to parts of the original text.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PARTS = ("prefix", "middle", "suffix")


@dataclass(frozen=True, slots=True)
class FimSplit:
    """How one copy of a document is transformed."""

    spm: bool
    """Suffix-prefix-middle order (else prefix-suffix-middle)."""
    lo: int
    """First character of the middle."""
    hi: int
    """First character of the suffix (lo <= hi <= the text's length)."""

    @property
    def mode(self) -> str:
        return "spm" if self.spm else "psm"


def fim_units(seed: int, source: str, doc_id: str, entry_key: str, epoch: int) -> tuple[float, float, float, float]:
    """Four seeded uniforms in [0, 1) for one copy: FIM or not, SPM or not, two split points."""
    h = hashlib.blake2b(f"{seed}\x00fim\x00{source}\x00{doc_id}\x00{entry_key}\x00{epoch}".encode(),
                        digest_size=32).digest()
    return tuple(x / 2.0**64 for x in struct.unpack("<4Q", h))  # type: ignore[return-value]


def fim_split(seed: int, source: str, doc_id: str, entry_key: str, epoch: int, n_chars: int,
              fim_rate: float, spm_rate: float) -> FimSplit | None:
    """The transform of copy ``epoch`` of a document for mix entry ``entry_key`` (``stage/entry``),
    or None when the copy stays as it is. ``n_chars``: the text's length in characters."""
    u_fim, u_spm, u_a, u_b = fim_units(seed, source, doc_id, entry_key, epoch)
    if u_fim >= fim_rate:
        return None
    a = min(int(u_a * (n_chars + 1)), n_chars)
    b = min(int(u_b * (n_chars + 1)), n_chars)
    return FimSplit(u_spm < spm_rate, min(a, b), max(a, b))


def split_text(text: str, split: FimSplit) -> tuple[str, str, str]:
    """(prefix, middle, suffix); their concatenation is the text."""
    return text[: split.lo], text[split.lo : split.hi], text[split.hi :]


def assemble(parts: Sequence[Sequence[int]], split: FimSplit, sentinels: tuple[int, int, int], eos: int,
             dtype: np.dtype) -> np.ndarray:
    """The copy's token ids: the parts' ids (prefix, middle, suffix) with the sentinel ids
    (prefix, middle, suffix) in PSM or SPM order, then EOS."""
    p, m, s = parts
    pre, mid, suf = sentinels
    seq = [pre, *p, suf, *s, mid, *m, eos] if not split.spm else [pre, suf, *s, mid, *p, *m, eos]
    return np.array(seq, dtype=dtype)


def fim_record(split: FimSplit, *, stage: str, entry: int, epoch: int, n_chars: int,
               part_tokens: tuple[int, int, int]) -> dict:
    """The documents-table record of one transformed copy (JSON)."""
    return {"stage": stage, "entry": entry, "epoch": epoch, "mode": split.mode, "split": [split.lo, split.hi],
            "chars": n_chars, "tokens": list(part_tokens)}


def layout(record: dict, names: Sequence[str] = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")) -> list[dict]:
    """The copy's token ranges in order: a sentinel (``part`` = its token name, ``chars`` None) or a
    part of the text (``part`` = prefix / middle / suffix, ``chars`` = its ``[start, end)`` in the
    original text), each with ``tokens`` = its ``[start, end)`` in the copy; the last is the EOS."""
    lo, hi = record["split"]
    n = record["chars"]
    ntok = dict(zip(PARTS, record["tokens"], strict=True))
    chars = {"prefix": [0, lo], "middle": [lo, hi], "suffix": [hi, n]}
    pre, mid, suf = names
    order = ([pre, "prefix", suf, "suffix", mid, "middle"] if record["mode"] == "psm"
             else [pre, suf, "suffix", mid, "prefix", "middle"])
    out, at = [], 0
    for item in [*order, "<eos>"]:
        k = ntok[item] if item in PARTS else 1
        out.append({"part": item, "tokens": [at, at + k], "chars": chars.get(item)})
        at += k
    return out


def copy_tokens(record: dict) -> int:
    """Tokens of the transformed copy: its parts, three sentinels and the EOS."""
    return int(sum(record["tokens"])) + 4


def locate(record: dict, doc_offset: int, length: int) -> list[dict]:
    """Where a span of a transformed copy (tokens ``[doc_offset, doc_offset + length)``) comes from:
    per part or sentinel it overlaps, ``tokens`` = the overlap's range within that part, ``chars`` =
    the part's range in the original text (None for a sentinel or the EOS)."""
    end = doc_offset + length
    out = []
    for seg in layout(record):
        a, b = seg["tokens"]
        lo, hi = max(a, doc_offset), min(b, end)
        if lo < hi or (a == b and doc_offset <= a < end):
            out.append({"part": seg["part"], "tokens": [lo - a, hi - a], "chars": seg["chars"]})
    return out


def marked_text(text: str, split: FimSplit,
                names: Sequence[str] = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")) -> str:
    """The transformed copy as text, sentinels written out by name (what the model reads, before the EOS)."""
    p, m, s = split_text(text, split)
    pre, mid, suf = names
    return f"{pre}{p}{suf}{s}{mid}{m}" if not split.spm else f"{pre}{suf}{s}{mid}{p}{m}"


def part_ids(record: dict, ids: Sequence[int]) -> dict[str, list[int]]:
    """The token ids of each part (prefix, middle, suffix) of a transformed copy's ids: decoding
    them and joining prefix + middle + suffix gives the original text."""
    return {seg["part"]: list(ids[seg["tokens"][0] : seg["tokens"][1]]) for seg in layout(record)
            if seg["part"] in PARTS}
