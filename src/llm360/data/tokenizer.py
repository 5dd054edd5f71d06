"""Tokenizers: train a deterministic byte-level BPE, or load one the user has.

Whatever its origin, a tokenizer is saved into ``data/tokenizer/`` in a form that both llm360
and ``transformers.AutoTokenizer`` load offline, and its hash goes into the manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from llm360.config import TokenizerConfig
from llm360.errors import DataError
from llm360.utils import sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

TOKENIZER_META = "llm360_tokenizer.json"


class TextTokenizer:
    """A uniform face over a `tokenizers` Tokenizer or a SentencePiece model."""

    def __init__(self, *, kind: str, eos_token: str, hf=None, spm=None, spm_bytes: bytes | None = None):
        self.kind = kind  # "hf" (tokenizers) or "spm"
        self._hf = hf
        self._spm = spm
        self._spm_bytes = spm_bytes
        self.eos_token = eos_token
        if kind == "hf":
            eos = hf.token_to_id(eos_token)
            if eos is None:
                raise DataError(
                    f"the tokenizer has no token {eos_token!r} to end documents with; "
                    "set data.tokenizer.eos_token to a token it has (e.g. '</s>' or '<|endoftext|>')"
                )
            self.eos_id = int(eos)
            self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        else:
            eos = spm.piece_to_id(eos_token) if eos_token else -1
            if eos is None or eos < 0 or spm.id_to_piece(eos) != eos_token:
                eos = spm.eos_id()
                if eos < 0:
                    raise DataError(
                        f"the SentencePiece model has neither {eos_token!r} nor an EOS id; "
                        "set data.tokenizer.eos_token to one of its pieces"
                    )
                self.eos_token = spm.id_to_piece(eos)
            self.eos_id = int(eos)
            self.vocab_size = int(spm.get_piece_size())

    # -- encoding ---------------------------------------------------------------------------
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (EOS is appended by the packer)."""
        if self.kind == "hf":
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._spm.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._spm.decode(ids)

    def id_to_token(self, i: int) -> str:
        if self.kind == "hf":
            return self._hf.id_to_token(int(i)) or ""
        return self._spm.id_to_piece(int(i))

    def token_id(self, token: str) -> int | None:
        """The id of a whole token (e.g. a special token), or None when the vocabulary lacks it."""
        if self.kind == "hf":
            i = self._hf.token_to_id(token)
            return None if i is None else int(i)
        i = self._spm.piece_to_id(token)
        return int(i) if i is not None and i >= 0 and self._spm.id_to_piece(i) == token else None

    def fim_ids(self, names: tuple[str, ...], where: str = "the tokenizer") -> tuple[int, int, int]:
        """The ids of the FIM sentinels (prefix, middle, suffix) ``names[:3]``.

        Raises DataError naming every one the vocabulary lacks, and what to do.
        """
        ids = [self.token_id(t) for t in names[:3]]
        missing = [t for t, i in zip(names[:3], ids, strict=True) if i is None]
        if missing:
            raise DataError(
                f"{where} has no token for the fill-in-the-middle sentinel(s) {missing} that a mix entry "
                "with fim_rate > 0 needs; use a tokenizer with them (StarCoder's names them "
                "<fim_prefix>, <fim_middle>, <fim_suffix>), add them as special tokens, set "
                "data.tokenizer.fim_tokens to the names it uses, or train one (data.tokenizer.kind: train)"
            )
        return ids[0], ids[1], ids[2]  # type: ignore[return-value]

    # -- persistence ------------------------------------------------------------------------
    def serialized(self) -> tuple[str, bytes]:
        """(kind, bytes) enough to rebuild this tokenizer in a worker process."""
        if self.kind == "hf":
            return "hf", self._hf.to_str().encode()
        assert self._spm_bytes is not None
        return "spm", self._spm_bytes

    def save(self, folder: Path, origin: dict) -> str:
        """Write the tokenizer (loadable by llm360 and transformers) and return its sha256."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            (folder / "tokenizer.json").write_text(self._hf.to_str(pretty=True), encoding="utf-8")
            hf_cfg = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": self.eos_token,
                "bos_token": None,
                "unk_token": None,
                "pad_token": self.eos_token,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000,
            }
            main = folder / "tokenizer.json"
        else:
            assert self._spm_bytes is not None
            (folder / "tokenizer.model").write_bytes(self._spm_bytes)
            hf_cfg = {
                "tokenizer_class": "LlamaTokenizer",
                "eos_token": self.eos_token,
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000,
            }
            main = folder / "tokenizer.model"
        (folder / "tokenizer_config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        digest = sha256_file(main)
        meta = {
            "kind": self.kind,
            "file": main.name,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            "sha256": digest,
            "origin": origin,
        }
        (folder / TOKENIZER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return digest


def from_serialized(kind: str, blob: bytes, eos_token: str) -> TextTokenizer:
    if kind == "hf":
        from tokenizers import Tokenizer

        return TextTokenizer(kind="hf", eos_token=eos_token, hf=Tokenizer.from_str(blob.decode()))
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor()
    proc.LoadFromSerializedProto(blob)
    return TextTokenizer(kind="spm", eos_token=eos_token, spm=proc, spm_bytes=blob)


def load_saved(folder: Path) -> TextTokenizer:
    """Load the tokenizer prepare saved in data/tokenizer/."""
    meta_path = folder / TOKENIZER_META
    if not meta_path.is_file():
        raise DataError(f"no tokenizer in {folder} (missing {TOKENIZER_META}); run `llm360 prepare` first")
    meta = json.loads(meta_path.read_text())
    blob = (folder / meta["file"]).read_bytes()
    return from_serialized(meta["kind"], blob, meta["eos_token"])


def load_tokenizer_file(path: str, eos_token: str) -> tuple[TextTokenizer, dict]:
    """Load a tokenizer.json, a Hugging Face tokenizer folder, or a SentencePiece .model."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"tokenizer not found: {p} (data.tokenizer.path)")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        else:
            raise DataError(
                f"{p} holds neither tokenizer.json nor tokenizer.model; "
                "point data.tokenizer.path at a tokenizer file or a Hugging Face tokenizer folder"
            )
    origin = {"loaded_from": str(path), "sha256": sha256_file(p)}
    if p.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            hf = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{p} is not a valid tokenizer.json: {e}") from None
        eos = eos_token
        if hf.token_to_id(eos) is None:
            eos = _guess_eos(p.parent, hf) or eos
        return TextTokenizer(kind="hf", eos_token=eos, hf=hf), origin
    if p.suffix == ".model":
        import sentencepiece as spm

        blob = p.read_bytes()
        proc = spm.SentencePieceProcessor()
        try:
            proc.LoadFromSerializedProto(blob)
        except Exception as e:
            raise DataError(f"{p} is not a valid SentencePiece model: {e}") from None
        return TextTokenizer(kind="spm", eos_token=eos_token, spm=proc, spm_bytes=blob), origin
    raise DataError(f"{p}: unknown tokenizer format (expected tokenizer.json, a .model file or a folder)")


def _guess_eos(folder: Path, hf) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            eos = json.loads(cfg.read_text()).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and hf.token_to_id(eos) is not None:
            return eos
    return None


def train_bpe(texts: Iterator[str], cfg: TokenizerConfig, extra_special: tuple[str, ...] = ()
              ) -> tuple[TextTokenizer, dict]:
    """Train a byte-level BPE on texts (already capped by the caller); deterministic for equal input.

    ``extra_special``: special tokens besides the EOS (the FIM sentinels), given ids right after it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[cfg.eos_token, *(t for t in extra_special if t != cfg.eos_token)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    origin = {"trained": "byte-level BPE (tokenizers)", "vocab_size": cfg.vocab_size}
    if extra_special:
        origin["special_tokens"] = [cfg.eos_token, *extra_special]
    return TextTokenizer(kind="hf", eos_token=cfg.eos_token, hf=tok), origin


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a saved tokenizer folder (e.g. into a checkpoint folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def tokenizer_hash(folder: Path) -> str:
    meta = json.loads((folder / TOKENIZER_META).read_text())
    return str(meta["sha256"])


__all__ = [
    "TextTokenizer",
    "from_serialized",
    "load_saved",
    "load_tokenizer_file",
    "train_bpe",
    "copy_tokenizer_files",
    "tokenizer_hash",
    "sha256_bytes",
]
