"""Complete-or-absent checkpoints: bitwise round trips, corruption detection, kills during a save."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from llm360.config import TrainConfig
from llm360.errors import CheckpointError
from llm360.rundir import atomic
from llm360.rundir import tensorio as tio
from llm360.rundir.checkpoint import (
    MARKER,
    capture_rng,
    latest_complete_checkpoint,
    load_checkpoint,
    load_model_state,
    marker_sha256,
    read_marker,
    remove_checkpoint,
    restore_rng,
    save_checkpoint,
    step_checkpoint_dir,
    verify_checkpoint,
)
from llm360.rundir.layout import (
    RunDir,
    ckpt_name,
    list_checkpoints,
    list_step_checkpoints,
    parse_ckpt_name,
    parse_step_name,
    step_name,
)
from llm360.train.optim import build_optimizer

DEAD_PID = 2**31 - 1  # above any pid_max: os.kill says "no such process"
CORE_FILES = {
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer_state.json",
    "rng_state.safetensors",
    "rng_state.json",
}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, 2 * d)
        self.mlp.down_proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn.q_proj(h)
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(h)))


class TinyLM(nn.Module):
    """A few parameters under LlamaForCausalLM-style names."""

    def __init__(self, vocab: int = 17, d: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.model.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for blk in self.model.layers:
            x = blk(x)
        return self.lm_head(self.model.norm(x))


def make(seed: int) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, build_optimizer(model, TrainConfig(lr=1e-2))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """Steps whose data come from the global torch RNG (so restoring it matters)."""
    for _ in range(steps):
        ids = torch.randint(0, 17, (3, 6))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, **kw) -> Path:
    kw.setdefault(
        "extra_files", {"config.json": json.dumps({"model_type": "llama"}), "config.yaml": "a: 1\n"}
    )
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        optimizer=opt,
        param_names=model,
        trainer_state={"step": step, "chunk": 0, "cursor": step * 3, "tokens_seen": step * 18, "loss": 1.5},
        **kw,
    )


@pytest.fixture
def trained(tmp_path: Path) -> tuple[TinyLM, torch.optim.AdamW, Path]:
    model, opt = make(0)
    train(model, opt, 3)
    path = save(tmp_path / "checkpoints" / "ckpt_000", model, opt, 3)
    return model, opt, path


def opt_state_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(st) for p, st in opt.state.items()}


def assert_same_state(
    m1: nn.Module, o1: torch.optim.Optimizer, m2: nn.Module, o2: torch.optim.Optimizer
) -> None:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    a, b = opt_state_by_name(m1, o1), opt_state_by_name(m2, o2)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
            assert a[name][key].dtype == b[name][key].dtype


# ------------------------------------------------------------------------------ round trips


def test_layout_and_names(trained) -> None:
    model, _, path = trained
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert files == CORE_FILES | {MARKER, "config.json", "config.yaml"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    opt_keys = set(load_file(path / "optimizer.safetensors"))
    assert "exp_avg/model.layers.0.self_attn.q_proj.weight" in opt_keys
    assert "exp_avg_sq/lm_head.weight" in opt_keys
    assert "step/model.norm.weight" in opt_keys
    meta = json.loads((path / "optimizer.json").read_text())
    assert meta["optimizer"] == "AdamW"
    assert [g["hyperparameters"]["weight_decay"] for g in meta["param_groups"]] == [0.1, 0.0]
    assert "model.layers.1.mlp.up_proj.weight" in meta["param_groups"][0]["params"]
    assert "model.layers.1.mlp.up_proj.bias" in meta["param_groups"][1]["params"]
    marker = json.loads((path / MARKER).read_text())
    assert set(marker["files"]) == files - {MARKER}
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 3


def test_round_trip_is_bitwise_and_resume_matches(trained) -> None:
    model, opt, path = trained
    saved_rng = capture_rng()
    # what the RNGs give right after the save, in the uninterrupted run
    expect = (torch.rand(5), np.random.rand(3), random.random())
    restore_rng(saved_rng)

    model2, opt2 = make(123)  # different init: everything must come from the checkpoint
    torch.rand(100)
    np.random.rand(7)
    random.random()
    out = load_checkpoint(path, model2, opt2)
    assert out["trainer_state"] == {"step": 3, "chunk": 0, "cursor": 9, "tokens_seen": 54, "loss": 1.5}
    assert_same_state(model, opt, model2, opt2)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups
    ]

    restore_rng(out["rng_state"])
    got = (torch.rand(5), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]

    # promise 4: continuing after the restore is bitwise equal to never stopping
    restore_rng(out["rng_state"])
    train(model2, opt2, 3)
    restore_rng(saved_rng)
    train(model, opt, 3)
    assert_same_state(model, opt, model2, opt2)


def test_saved_bytes_are_deterministic(tmp_path: Path) -> None:
    model, opt = make(0)
    train(model, opt, 2)
    rng = capture_rng()
    a = save(tmp_path / "a", model, opt, 2, rng_state=rng)
    b = save(tmp_path / "b", model, opt, 2, rng_state=rng)
    assert (a / MARKER).read_bytes() == (b / MARKER).read_bytes()


def test_optimizer_restored_by_name_in_a_different_order(trained) -> None:
    model, opt, path = trained
    model2, _ = make(7)
    decay = [p for p in model2.parameters() if p.ndim >= 2][::-1]
    no_decay = [p for p in model2.parameters() if p.ndim < 2][::-1]
    # groups swapped and each group's parameters reversed
    opt2 = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.5}],
        lr=1.0,
        fused=True,  # the kernel build_optimizer picks, so training on gives the same bits
    )
    load_checkpoint(path, model2, opt2)
    assert_same_state(model, opt, model2, opt2)
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.0, 0.1]  # hyperparameters follow the names
    rng = capture_rng()
    train(model, opt, 2)
    restore_rng(rng)
    train(model2, opt2, 2)
    assert_same_state(model, opt, model2, opt2)


def test_param_names_as_a_dict_and_fresh_optimizer_without_state(tmp_path: Path) -> None:
    model, opt = make(0)  # never stepped: no optimizer state yet
    names = {p: n for n, p in model.named_parameters()}
    path = save_checkpoint(
        tmp_path / "c",
        model_state=model.state_dict(),
        optimizer=opt,
        param_names=names,
        trainer_state={"step": 0},
    )
    model2, opt2 = make(1)
    load_checkpoint(path, model2, opt2, param_names={id(p): n for n, p in model2.named_parameters()})
    assert_same_state(model, opt, model2, opt2)
    assert not opt2.state


def test_strict_names(trained) -> None:
    _, _, path = trained
    model2, opt2 = make(5)
    model2.extra = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: extra\.bias, extra\.weight"):
        load_checkpoint(path, model2)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())  # untouched on error
    load_checkpoint(path, model2, strict=False)  # loads what matches
    assert torch.equal(model2.extra.weight, before["extra.weight"])
    assert not torch.equal(model2.lm_head.weight, before["lm_head.weight"])

    small = TinyLM(layers=1)
    with pytest.raises(CheckpointError, match=r"not in the model: model\.layers\.1\."):
        load_checkpoint(path, small)
    wide = TinyLM(d=4)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path, wide, strict=False)


def test_load_model_state(trained) -> None:
    model, _, path = trained
    weights = load_model_state(path)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_save_rejects_bad_input_before_writing(tmp_path: Path) -> None:
    model, opt = make(0)
    target = tmp_path / "ckpt_000"
    bf16 = {k: v.bfloat16() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fp32 master weights"):
        save_checkpoint(target, model_state=bf16, trainer_state={"step": 0})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(target, model_state=model.state_dict(), trainer_state={"chunk": 0})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(target, model_state=model.state_dict(), trainer_state={"step": 0, "x": object()})
    with pytest.raises(ValueError, match="param_names"):
        save_checkpoint(target, model_state=model.state_dict(), trainer_state={"step": 0}, optimizer=opt)
    for bad in ("../x", "/abs", "a//b", "model.safetensors", "COMPLETE.json"):
        with pytest.raises(ValueError):
            save_checkpoint(
                target, model_state=model.state_dict(), trainer_state={"step": 0}, extra_files={bad: b"x"}
            )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_extra_files_in_subfolders_and_from_paths(tmp_path: Path) -> None:
    model, _ = make(0)
    src = tmp_path / "tokenizer.json"
    src.write_text('{"v": 1}')
    path = save_checkpoint(
        tmp_path / "ck",
        model_state=model.state_dict(),
        trainer_state={"step": 0},
        extra_files={
            "tokenizer/tokenizer.json": src,
            "tokenizer/deep/notes.txt": "hi",
            "raw.bin": b"\x00\x01",
        },
    )
    assert (path / "tokenizer" / "tokenizer.json").read_text() == '{"v": 1}'
    assert (path / "tokenizer" / "deep" / "notes.txt").read_text() == "hi"
    verify_checkpoint(path)
    (path / "tokenizer" / "deep" / "notes.txt").write_text("ho")
    with pytest.raises(CheckpointError, match="tokenizer/deep/notes.txt"):
        verify_checkpoint(path)


def test_resave_replaces_and_remove(trained) -> None:
    model, opt, path = trained
    train(model, opt, 1)
    save(path, model, opt, 4)
    assert load_checkpoint(path, make(9)[0])["trainer_state"]["step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt_000"]
    remove_checkpoint(path)
    assert not path.exists() and not any(path.parent.iterdir())


# ---------------------------------------------------------------------------- no pickle


def test_every_file_loads_without_pickle(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, path = trained

    def no_pickle(*a, **k):
        raise AssertionError("torch.load / pickle must never be needed for a checkpoint")

    monkeypatch.setattr(torch, "load", no_pickle)
    import pickle

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    load_checkpoint(path, *make(3))
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        head = f.read_bytes()[:4]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), (
            f"{f.name} looks like a pickle/zip"
        )
        if f.suffix == ".safetensors":
            tensors = load_file(f)  # the reference safetensors reader
            with safe_open(f, "pt") as st:
                assert st.metadata() == {"format": "pt"}
            ours = tio.parse_safetensors(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), "x")
            assert tensors.keys() == ours.keys()
            assert all(torch.equal(tensors[k], ours[k]) for k in tensors)
            header = tio.read_header(f)  # the header alone, as the report reads it
            assert header.pop("__metadata__") == {"format": "pt"} and header.keys() == tensors.keys()
            assert all(header[k]["shape"] == list(tensors[k].shape) for k in tensors)
        elif f.suffix in (".json",):
            json.loads(f.read_text())
        else:
            assert f.suffix == ".yaml"
    weights = load_file(path / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.float32 for v in weights.values())


# ------------------------------------------------------------------------- verification


def test_folder_without_marker_is_refused(trained) -> None:
    _, _, path = trained
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: no COMPLETE\.json .* will not be loaded"):
        verify_checkpoint(path)
    model2, opt2 = make(8)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model2, opt2)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(path.parent / "ckpt_999")


def _positions(name: str, size: int, rng: random.Random) -> list[int]:
    """Every byte of the marker and of small files; the edges and a sample of the others."""
    if name == MARKER or size <= 256:
        return list(range(size))
    edge = list(range(16)) + list(range(size - 16, size))
    return sorted(set(edge + rng.sample(range(size), 60)))


def test_every_byte_flip_is_detected_and_named(trained) -> None:
    _, _, path = trained
    rng = random.Random(0)
    checked = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        data = bytearray(f.read_bytes())
        name = f.relative_to(path).as_posix()
        for i in _positions(name, len(data), rng):
            flip = 0x01 if i % 2 else 0xFF  # a low bit (a digit stays a digit) or the whole byte
            data[i] ^= flip
            f.write_bytes(data)
            with pytest.raises(CheckpointError) as err:
                verify_checkpoint(path)
            assert name in str(err.value), (name, i, str(err.value))
            data[i] ^= flip
            checked += 1
        f.write_bytes(data)
    verify_checkpoint(path)
    assert checked > 1500  # the marker alone has > 1000 bytes


def test_corrupt_file_is_named_by_load_and_nothing_is_loaded(trained) -> None:
    _, _, path = trained
    for name in ("model.safetensors", "optimizer.safetensors", "rng_state.json", "config.yaml"):
        f = path / name
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(data)
        model2, opt2 = make(4)
        before = {k: v.clone() for k, v in model2.state_dict().items()}
        with pytest.raises(CheckpointError, match=f"{name} is corrupt"):
            load_checkpoint(path, model2, opt2)
        assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
        assert not opt2.state
        data[len(data) // 2] ^= 0x10
        f.write_bytes(data)


def test_missing_extra_truncated_and_odd_files_are_named(trained) -> None:
    _, _, path = trained
    (path / "optimizer.json").rename(path.parent / "aside.json")
    with pytest.raises(CheckpointError, match=r"optimizer\.json is listed in COMPLETE\.json but missing"):
        verify_checkpoint(path)
    (path.parent / "aside.json").rename(path / "optimizer.json")

    (path / "stray.txt").write_text("?")
    with pytest.raises(CheckpointError, match=r"stray\.txt is not listed"):
        verify_checkpoint(path)
    (path / "stray.txt").unlink()

    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    (path / "sub").mkdir()
    (path / "sub" / "x").write_text("y")
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    msg = str(err.value)
    assert "model.safetensors has 100 bytes" in msg and "sub/x is not listed" in msg


@pytest.mark.parametrize("direct", [False, True])
def test_disk_full_is_a_clear_error_and_loses_nothing(
    trained, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """ENOSPC in the middle of a re-save: CheckpointError naming it; the old checkpoint stays."""
    model, opt, path = trained
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(tio, "_DIRECT_MIN", 1024 if direct else 1 << 40)
    monkeypatch.setattr(tio, "_STAGE", 4096)
    calls = [0]
    real_write = os.write

    def full(fd, data):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(tio.os, "write", full)
    monkeypatch.setattr(tio, "_write_all", lambda f, mv: full(f.fileno(), mv))
    train(model, opt, 1)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*No space left on device.*intact"):
        save(path, model, opt, 9)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_verify_with_known_digests_reads_only_the_others(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """Digests the caller already computed are compared with the marker instead of hashed again."""
    _, _, path = trained
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.name != "COMPLETE.json"}
    hashed: list[str] = []
    real = tio.hash_file
    monkeypatch.setattr(tio, "hash_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    verify_checkpoint(path, known_sha256={"model.safetensors": digests["model.safetensors"]})
    assert "model.safetensors" not in hashed and "optimizer.safetensors" in hashed
    hashed.clear()
    verify_checkpoint(path, known_sha256=digests)
    assert hashed == []
    wrong = {**digests, "optimizer.safetensors": "0" * 64}  # e.g. the file changed since the caller hashed it
    with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt"):
        verify_checkpoint(path, known_sha256=wrong)


def test_small_slices_threads_and_host_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise the multi-block, threaded and copy-as-you-go (GPU) paths on small data."""
    monkeypatch.setattr(tio, "_SLICE", 64)
    monkeypatch.setattr(tio, "_INLINE", 16)
    monkeypatch.setattr(tio, "_MAX_PENDING", 256)
    for host in (True, False):
        monkeypatch.setattr(tio, "_in_host_memory", lambda t, host=host: host)
        model, opt = make(0)
        train(model, opt, 2)
        path = save(tmp_path / f"ck_{host}", model, opt, 2)
        model2, opt2 = make(1)
        load_checkpoint(path, model2, opt2)
        assert_same_state(model, opt, model2, opt2)
        data = bytearray((path / "optimizer.safetensors").read_bytes())
        data[-5] ^= 1
        (path / "optimizer.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt"):
            verify_checkpoint(path)


def _odirect_supported(folder: Path) -> bool:
    probe = folder / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("host", [True, False])
def test_direct_io_path_in_small_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: bool) -> None:
    """Large files go through aligned staging buffers with O_DIRECT: same bytes, same hashes.

    The stage size does not divide the file sizes, so the last block is padded and truncated;
    three stages in turn exercise the reuse of buffers still being written.
    """
    model, opt = make(0)
    train(model, opt, 2)
    buffered = save(tmp_path / "buffered", model, opt, 2)
    monkeypatch.setattr(tio, "_direct_ok", True)
    monkeypatch.setattr(tio, "_DIRECT_MIN", 1024)
    monkeypatch.setattr(tio, "_STAGE", 4096)
    monkeypatch.setattr(tio, "_SLICE", 1000)
    monkeypatch.setattr(tio, "_in_host_memory", lambda t: host)
    opened: list[int] = []
    real_open = os.open
    monkeypatch.setattr(
        tio.os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a)
    )
    direct = save(tmp_path / "direct", model, opt, 2)
    supported = _odirect_supported(tmp_path)
    assert any(f & os.O_DIRECT for f in opened)  # the direct path was tried
    assert tio._direct_ok is supported  # and kept, or given up for the process
    assert (direct / "optimizer.safetensors").stat().st_size > 3 * 4096  # several stages, a tail
    for f in sorted(p.name for p in buffered.iterdir()):
        assert (direct / f).read_bytes() == (buffered / f).read_bytes(), f
    opened.clear()
    model2, opt2 = make(1)
    load_checkpoint(direct, model2, opt2)
    assert_same_state(model, opt, model2, opt2)
    assert any(f & os.O_DIRECT and not f & os.O_WRONLY for f in opened)  # read back with O_DIRECT
    assert tio._direct_ok is supported


@pytest.mark.parametrize("where", ["open", "probe"])
def test_direct_io_refused_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A file system that refuses O_DIRECT (at open, or at the first write) gets buffered writes."""
    monkeypatch.setattr(tio, "_direct_ok", True)
    monkeypatch.setattr(tio, "_DIRECT_MIN", 1024)
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(tio.os, "open", fake_open)
    monkeypatch.setattr(tio.os, "write", fake_write)
    model, opt = make(0)
    train(model, opt, 2)
    path = save(tmp_path / "ck", model, opt, 2)
    assert tio._direct_ok is False
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    verify_checkpoint(path)
    model2, opt2 = make(1)
    load_checkpoint(path, model2, opt2)
    assert_same_state(model, opt, model2, opt2)


# ----------------------------------------------------------------------------- latest


def test_latest_complete_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    assert latest_complete_checkpoint(root) is None
    model, opt = make(0)
    save(root / "ckpt_000", model, opt, 10)
    save(root / "ckpt_001", model, opt, 20)
    save(step_checkpoint_dir(root, 15), model, opt, 15)
    assert step_checkpoint_dir(root, 15) == root / "steps" / "step_00000015"
    # newer, but incomplete: no marker
    save(root / "ckpt_002", model, opt, 30)
    (root / "ckpt_002" / MARKER).unlink()
    # leftovers of saves killed before their rename, by processes that are gone
    shutil.copytree(root / "ckpt_001", root / f".ckpt_003.tmp-{DEAD_PID}")
    shutil.copytree(root / "ckpt_001", root / "steps" / f".step_00000040.tmp-{DEAD_PID}")
    (root / "notes.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="llm360"):
        assert latest_complete_checkpoint(root) == root / "ckpt_001"
    assert "ckpt_002: incomplete" in caplog.text
    assert ".ckpt_003.tmp-" in caplog.text
    assert not (root / f".ckpt_003.tmp-{DEAD_PID}").exists()
    assert not (root / "steps" / f".step_00000040.tmp-{DEAD_PID}").exists()
    assert (root / "ckpt_002").exists()  # incomplete folders are skipped, not deleted

    save(step_checkpoint_dir(root, 25), model, opt, 25)
    assert latest_complete_checkpoint(root) == step_checkpoint_dir(root, 25)
    assert latest_complete_checkpoint(root, include_steps=False) == root / "ckpt_001"
    save(step_checkpoint_dir(root, 20), model, opt, 20)
    (step_checkpoint_dir(root, 25) / "model.safetensors").write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llm360"):
        assert latest_complete_checkpoint(root) == root / "ckpt_001"  # a chunk checkpoint wins a tie
    assert "step_00000025" in caplog.text and "model.safetensors" in caplog.text
    # without hashing, a same-size corruption is not seen (load_checkpoint would refuse it)...
    data = bytearray((root / "ckpt_001" / "optimizer.json").read_bytes())
    data[3] ^= 1
    (root / "ckpt_001" / "optimizer.json").write_bytes(data)
    assert latest_complete_checkpoint(root, verify=False) == root / "ckpt_001"
    assert latest_complete_checkpoint(root) == step_checkpoint_dir(root, 20)
    # ...but a missing or resized file is
    (root / "ckpt_001" / "rng_state.json").unlink()
    assert latest_complete_checkpoint(root, verify=False) == step_checkpoint_dir(root, 20)


def test_interrupted_replace_is_rolled_back(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    model, opt = make(0)
    save(root / "ckpt_000", model, opt, 1)
    save(root / "ckpt_001", model, opt, 2)
    # a re-save of ckpt_001 killed between its two renames: old aside, new in the temp folder
    os.rename(root / "ckpt_001", root / f".ckpt_001.old-{DEAD_PID}")
    save(root / "new", model, opt, 3)
    os.rename(root / "new", root / f".ckpt_001.tmp-{DEAD_PID}")
    assert latest_complete_checkpoint(root) == root / "ckpt_001"
    assert json.loads((root / "ckpt_001" / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_000", "ckpt_001"]
    # a leftover of this process's own running save is left alone
    live = root / f".ckpt_002.tmp-{os.getpid()}"
    live.mkdir()
    with atomic._writing(live):
        latest_complete_checkpoint(root)
        assert live.exists()
    latest_complete_checkpoint(root)
    assert not live.exists()
    # so is one whose writer is another live process (here: our parent)
    other = root / f".ckpt_002.tmp-{os.getppid()}"
    other.mkdir()
    latest_complete_checkpoint(root)
    assert other.exists()


def test_listing_names_and_marker_digest(tmp_path: Path) -> None:
    """One listing for every stage: ckpt_NNN by index, complete ones by marker; names round-trip."""
    root = tmp_path / "checkpoints"
    model, opt = make(0)
    for name in ("ckpt_010", "ckpt_002", "ckpt_1000"):
        save(root / name, model, opt, 1)
    (root / "ckpt_010" / MARKER).unlink()
    for name in (".ckpt_003.tmp-12", "init", "ckpt_7", "notes"):
        (root / name).mkdir()
    save(step_checkpoint_dir(root, 40), model, opt, 40)
    (root / "steps" / "step_00000005").mkdir()
    assert [(i, p.name) for i, p in list_checkpoints(root)] == [(2, "ckpt_002"), (10, "ckpt_010"), (1000, "ckpt_1000")]
    assert [i for i, _ in list_checkpoints(root, complete_only=True)] == [2, 1000]
    assert [i for i, _ in list_step_checkpoints(root / "steps", complete_only=True)] == [40]
    assert list_checkpoints(tmp_path / "nowhere") == []
    assert ckpt_name(7) == "ckpt_007" and parse_ckpt_name("ckpt_007") == 7 and parse_ckpt_name("ckpt_7") is None
    assert step_name(40) == "step_00000040" and parse_step_name(step_name(40)) == 40
    assert RunDir(tmp_path).ckpt_dir(2) == root / "ckpt_002" and RunDir(tmp_path).init_checkpoint == root / "init"
    assert marker_sha256(root / "ckpt_002") == hashlib.sha256((root / "ckpt_002" / MARKER).read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="no COMPLETE.json"):
        marker_sha256(root / "ckpt_010")
    assert read_marker(root / "ckpt_002")["model.safetensors"]["size"] > 0


def test_one_leftover_rule_for_files_folders_and_scratch(tmp_path: Path) -> None:
    """Dead writers' temporaries and scratch folders go; a moved-aside folder comes back; `only` narrows."""
    (tmp_path / f".a.work-{DEAD_PID}").mkdir()
    (tmp_path / f".b.json.tmp-{DEAD_PID}").write_text("half")
    (tmp_path / f".c.old-{DEAD_PID}").mkdir()
    (tmp_path / f".d.tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".e.work-{os.getppid()}").mkdir()  # a live process's
    atomic.clean_leftovers(tmp_path, only="d")
    assert not (tmp_path / f".d.tmp-{DEAD_PID}").exists() and (tmp_path / f".a.work-{DEAD_PID}").exists()
    atomic.clean_leftovers(tmp_path, check_old=lambda p: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".e.work-{os.getppid()}", "c"]
    # a scratch folder of this process is registered while in use, gone afterwards
    with atomic.staged(tmp_path / "f", kind="work") as work:
        atomic.clean_leftovers(tmp_path)
        assert work.is_dir() and work.name == f".f.work-{os.getpid()}"
    assert not work.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie detection reads /proc (Linux)")
def test_leftovers_of_an_exited_unreaped_writer_go_and_writers_done_removes_every_one(tmp_path: Path) -> None:
    """A worker killed with its parent answers kill(pid, 0) until it is reaped: its temporaries still go.
    With writers_done even a live pid's go (the caller knows nothing writes there any more)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not atomic._is_zombie(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert atomic._is_zombie(child.pid)  # exited, not reaped: kill(pid, 0) still finds it
        (tmp_path / f".chunk_000.npy.tmp-{child.pid}").write_text("half")
        (tmp_path / f".chunk_001.npy.tmp-{os.getppid()}").write_text("half")  # a live process's
        atomic.clean_leftovers(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [f".chunk_001.npy.tmp-{os.getppid()}"]
        atomic.clean_leftovers(tmp_path, writers_done=True)
        assert list(tmp_path.iterdir()) == []
    finally:
        child.wait(timeout=30)


def test_atomic_file_and_folder_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    folder = tmp_path / "release"
    for text in ("old", "new"):
        with atomic.atomic_folder(folder) as tmp:
            (tmp / "a" / "b").mkdir(parents=True)
            (tmp / "a" / "b" / "f").write_text(text)
    assert (folder / "a" / "b" / "f").read_text() == "new"
    with pytest.raises(RuntimeError), atomic.atomic_folder(folder) as tmp:
        (tmp / "g").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "sub"]
    assert (folder / "a" / "b" / "f").read_text() == "new" and not (folder / "g").exists()


def test_header_read_alone_and_malformed_files_named(trained, tmp_path: Path) -> None:
    _, _, path = trained
    header = tio.read_header(path / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert header["lm_head.weight"]["dtype"] == "F32" and header["lm_head.weight"]["shape"] == [17, 8]
    for i, raw in enumerate([b"\x01\x02", (1 << 40).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"]):
        (tmp_path / f"bad{i}").write_bytes(raw)
        with pytest.raises(CheckpointError, match=f"bad{i} is not a valid safetensors file"):
            tio.read_header(tmp_path / f"bad{i}")


# ---------------------------------------------------------------------- kills during a save

# A fork server: it imports torch once, then forks savers on request, so each kill costs
# milliseconds instead of a Python start-up. Savers write weights equal to their step everywhere,
# so any checkpoint that verifies can be checked for consistency.
SERVER = textwrap.dedent(
    """
    import builtins, json, os, shutil, sys
    from pathlib import Path
    import torch
    from llm360.rundir import tensorio as tio
    from llm360.rundir.checkpoint import save_checkpoint

    root = Path(sys.argv[1])
    # the model file (64 KiB) takes the O_DIRECT path where the file system allows it, in 6 stages
    tio._DIRECT_MIN, tio._STAGE, tio._STAGES = 1 << 15, 3 << 12, 2

    def save(name, step):
        w = {"model.w": torch.full((64, 256), float(step)), "model.b": torch.full((256,), float(step))}
        save_checkpoint(root / name, model_state=w, trainer_state={"step": step},
                        extra_files={"config.json": json.dumps({"step": step})})

    def crash_at(k):
        # Die (like SIGKILL: no cleanup) just before the k-th file-system operation.
        count = [0]
        def wrap(mod, attr):
            real = getattr(mod, attr)
            def f(*a, **kw):
                count[0] += 1
                if count[0] >= k:
                    os._exit(137)
                return real(*a, **kw)
            setattr(mod, attr, f)
        for mod, attr in [(os, "rename"), (os, "fsync"), (os, "open"), (os, "mkdir"), (os, "write"),
                          (shutil, "rmtree"), (builtins, "open")]:
            wrap(mod, attr)

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "loop":  # save forever until killed
            pid = os.fork()
            if pid == 0:
                step = int(args[0])
                while True:
                    step += 1
                    save("ckpt_001" if step % 2 else f"ckpt_{2 + step % 3:03d}", step)
            print(pid, flush=True)
        elif cmd == "crash":  # one re-save of ckpt_001 that dies at file-system operation k
            pid = os.fork()
            if pid == 0:
                crash_at(int(args[0]))
                save("ckpt_001", int(args[1]))
                os._exit(0)
            print(pid, flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(status, flush=True)
        else:
            break
    """
)


def check_after_kill(root: Path, steps_ok: set[int] | None = None) -> int | None:
    """No visible folder is incomplete or wrong; ckpt_000 is intact; the latest one loads.

    Returns the step in ckpt_001 (None if it was never written).
    """
    had_001 = (root / "ckpt_001").is_dir() or any(p.name.startswith(".ckpt_001.old-") for p in root.iterdir())
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):
            continue
        verify_checkpoint(d)  # a visible checkpoint folder is always complete
        step = json.loads((d / "trainer_state.json").read_text())["step"]
        weights = load_model_state(d)
        assert all(bool((t == float(step)).all()) for t in weights.values()), d
        assert json.loads((d / "config.json").read_text()) == {"step": step}
    assert load_model_state(root / "ckpt_000")["model.b"][0].item() == 0.0
    latest = latest_complete_checkpoint(root)
    assert latest is not None
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # leftovers resolved
    if not (root / "ckpt_001").is_dir():
        assert not had_001  # an interrupted replace never loses the old one
        return None
    step = json.loads((root / "ckpt_001" / "trainer_state.json").read_text())["step"]
    if steps_ok is not None:
        assert step in steps_ok
    return step


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    w = {"model.w": torch.zeros(64, 256), "model.b": torch.zeros(256)}
    save_checkpoint(
        root / "ckpt_000",
        model_state=w,
        trainer_state={"step": 0},
        extra_files={"config.json": '{"step": 0}'},
    )
    try:
        yield root, ask
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sigkill_at_random_moments_never_leaves_a_wrong_checkpoint(server) -> None:
    root, ask = server
    rng = random.Random(1234)
    t_end = time.monotonic() + 5.0
    kills = 0
    while kills < 6 and time.monotonic() < t_end:
        pid = int(ask(f"loop {1000 * (kills + 1)}"))
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        assert int(ask(f"reap {pid}")) & 0x7F == signal.SIGKILL
        check_after_kill(root)
        kills += 1
    assert kills >= 4


def test_crash_at_every_file_operation_of_a_resave(server) -> None:
    root, ask = server
    pid = int(ask("crash 1000000 1"))  # a complete first save of ckpt_001 (step 1)
    assert int(ask(f"reap {pid}")) == 0
    current = check_after_kill(root, {1})
    completed = False
    for k in range(1, 400):
        step = 100 + k
        pid = int(ask(f"crash {k} {step}"))
        status = int(ask(f"reap {pid}"))
        # before its rename the old checkpoint stays; after it, the new one is there
        current = check_after_kill(root, {current, step})
        if status == 0:  # the save got through every operation: all crash points covered
            completed = True
            assert current == step
            break
    assert completed and k > 10


def test_checkpoint_without_optimizer_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make(0)
    train(model, opt, 1)
    path = save_checkpoint(tmp_path / "w", model_state=model.state_dict(), trainer_state={"step": 1})
    assert not (path / "optimizer.safetensors").exists()
    model2, opt2 = make(1)
    with pytest.raises(CheckpointError, match="has no optimizer.json, optimizer.safetensors"):
        load_checkpoint(path, model2, opt2)
    with caplog.at_level(logging.WARNING, logger="llm360"):
        load_checkpoint(path, model2, opt2, strict=False)
    assert "no optimizer state" in caplog.text and not opt2.state
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA warning")
def test_rng_state_extra_generators_and_cuda_without_cuda(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = make(0)
    gen = torch.Generator().manual_seed(5)
    rng = capture_rng() | {
        "generators": [gen.get_state(), torch.Generator().manual_seed(6).get_state()],
        "cuda": torch.get_rng_state(),  # stands in for a CUDA state saved on a GPU machine
        "note": {"seed": 5},
    }
    path = save_checkpoint(
        tmp_path / "r", model_state=model.state_dict(), trainer_state={"step": 0}, rng_state=rng
    )
    got = load_checkpoint(path, make(1)[0])["rng_state"]
    assert set(got) == set(rng)
    assert all(torch.equal(a, b) for a, b in zip(got["generators"], rng["generators"], strict=True))
    assert got["note"] == {"seed": 5} and got["numpy"] == rng["numpy"] and got["python"] == rng["python"]
    with caplog.at_level(logging.WARNING, logger="llm360"):
        restore_rng(got)
    assert "CUDA is not available" in caplog.text
    g2 = torch.Generator()
    g2.set_state(got["generators"][0])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=gen))
