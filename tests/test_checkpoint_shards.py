"""Checkpoints split into shards: written by every rank at once, read back by any number of ranks.

The file layout depends only on the tensors (so the bytes are the same for 1 and 4 writers),
transformers loads the sharded folder, and a checkpoint saved by 4 ranks restores exactly on 3.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from llm360.config import ModelConfig, TrainConfig
from llm360.errors import CheckpointError
from llm360.model.hf import hf_metadata_files
from llm360.model.llama import Llama
from llm360.rundir import checkpoint as ckpt
from llm360.rundir.shards import ShardLayout, pack, shard_file_names
from llm360.train.optim import build_optimizer

V = 101
SHARD = 30_000  # bytes: the tiny model's 0.2 MB of weights in several files


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_seq_len=32)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(seed))


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    ids = batch(seed)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trained(steps: int = 2) -> tuple[Llama, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Llama(tiny())
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=1))
    for s in range(steps):
        step(model, opt, s)
    return model, opt


def save(folder: Path, model: Llama, opt: torch.optim.Optimizer, shard_bytes: int = SHARD) -> Path:
    return ckpt.save_checkpoint(folder, model_state=model.state_dict(), optimizer=opt, param_names=model,
                                trainer_state={"step": 2}, extra_files=hf_metadata_files(tiny(), eos_token_id=0),
                                shard_bytes=shard_bytes)


def tensor_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.startswith(("model", "optimizer")) and p.name != "optimizer.json"}


def test_pack_and_names_follow_transformers():
    assert pack([("a", 4), ("b", 4), ("c", 4)], 8) == [["a", "b"], ["c"]]
    assert pack([("big", 20), ("a", 1)], 8) == [["big"], ["a"]]  # a tensor above a shard: a file of its own
    assert pack([], 8) == [[]]
    assert shard_file_names("model.safetensors", 1) == ["model.safetensors"]
    assert shard_file_names("model.safetensors", 3)[1] == "model-00002-of-00003.safetensors"
    layout = ShardLayout.plan([("w1", 5), ("w2", 5)], [("exp_avg/w1", 5), ("exp_avg/w2", 5)], 5)
    assert layout.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors"]
    assert [layout.files_of(r, 3) for r in range(3)] == [
        [layout.files[0], layout.files[3]], [layout.files[1]], [layout.files[2]]]


def test_a_model_above_the_shard_size_is_split_and_transformers_loads_it(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    model, opt = trained()
    d = save(tmp_path / "ckpt", model, opt)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    for f in shards:  # no file above the shard size, but for a tensor larger than one shard alone
        names = [n for n, s in index["weight_map"].items() if s == f]
        size = sum(model.state_dict()[n].numel() * 4 for n in names)
        assert size <= SHARD or len(names) == 1
    opt_index = json.loads((d / "optimizer.safetensors.index.json").read_text())
    assert len(set(opt_index["weight_map"].values())) >= 3
    ckpt.verify_checkpoint(d)

    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    ids = batch(7)
    with torch.no_grad():
        assert (model.eval()(ids) - ref(ids).logits).abs().max().item() < 1e-5

    # our loaders read every shard; a resume continues exactly as the saving process did
    weights = ckpt.load_model_state(d)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(1)
    again = Llama(tiny())
    again_opt = build_optimizer(again, TrainConfig(lr=1e-2, warmup_steps=1))
    ckpt.load_checkpoint(d, again, again_opt)
    step(model.train(), opt, 5)
    step(again, again_opt, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_a_damaged_or_missing_shard_is_refused_by_name(tmp_path: Path):
    model, opt = trained(1)
    d = save(tmp_path / "ckpt", model, opt)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=shard.name):
        ckpt.load_model_state(d)
    with pytest.raises(CheckpointError, match=shard.name):
        ckpt.load_checkpoint(d, Llama(tiny()))
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is listed in COMPLETE.json but missing"):
        ckpt.verify_checkpoint(d)


# ---------------------------------------------------------------------- several ranks (gloo)


def _worker(rank: int, world: int, init_file: str, out: str, phase: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from llm360.train import checkpointing
    from llm360.train.parallel import DistInfo, gather_to_owners

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    info = DistInfo(rank, world)
    out_dir = Path(out)
    torch.manual_seed(0)
    model = Llama(tiny())
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=1))
    if phase == "save":
        for s in range(2):
            step(model, opt, s)
        written = checkpointing.save_together(out_dir / "ckpt", model, opt, {"step": 2}, info,
                                              extra_files=hf_metadata_files(tiny(), eos_token_id=0), shard_bytes=SHARD)
        (out_dir / f"written_{rank}.json").write_text(json.dumps(written))
        # one process writing the same state: the reference bytes
        from llm360.rundir.optimizer_state import optimizer_payload, param_name_map

        tensors, _ = optimizer_payload(opt, param_name_map(model))
        state = model.state_dict()
        full = gather_to_owners({**state, **tensors}, dict.fromkeys({**state, **tensors}, 0), info)
        if rank == 0:
            single = _full_optimizer(full, state, opt, model)
            ckpt.save_checkpoint(out_dir / "single", model_state={k: full[k] for k in state}, optimizer=single[0],
                                 param_names=single[1], trainer_state={"step": 2},
                                 extra_files=hf_metadata_files(tiny(), eos_token_id=0), shard_bytes=SHARD)
    elif phase == "load":
        checkpointing.restore_together(out_dir / "ckpt", model, opt, info)
        from llm360.rundir.optimizer_state import optimizer_payload, param_name_map

        tensors, _ = optimizer_payload(opt, param_name_map(model))
        state = model.state_dict()
        full = {k: v.clone() for k, v in gather_to_owners({**state, **tensors}, dict.fromkeys({**state, **tensors}, 0),
                                                            info).items()}
        step(model, opt, 5)  # and training goes on from there
        after = gather_to_owners(model.state_dict(), dict.fromkeys(state, 0), info)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in full.items()}, str(out_dir / "loaded.safetensors"))
            save_file({k: v.contiguous() for k, v in after.items()}, str(out_dir / "after.safetensors"))
    elif phase == "kill":
        step(model, opt, 0)
        checkpointing.save_together(out_dir / "prev", model, opt, {"step": 1}, info, shard_bytes=SHARD)
        step(model, opt, 1)
        real = ckpt.write_checkpoint_files

        def dying(tmp: Path, files: dict) -> dict:
            if rank == 1:  # a rank lost in the middle of writing its files
                name, content = next(iter(files.items()))
                real(tmp, {name: content})
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tmp, files)

        checkpointing.ckpt.write_checkpoint_files = dying
        checkpointing.save_together(out_dir / "next", model, opt, {"step": 2}, info, shard_bytes=SHARD)
    if phase != "kill":  # every rank done with gloo before any tears it down (else its threads may abort at exit)
        dist.barrier()
    dist.destroy_process_group()


def _full_optimizer(full: dict, state: dict, opt: torch.optim.Optimizer, model: torch.nn.Module):
    """An AdamW over full CPU tensors holding the gathered state (what one process would hold)."""
    from llm360.rundir.optimizer_state import param_name_map

    names = param_name_map(model)
    params = {n: torch.nn.Parameter(full[n].clone(), requires_grad=False) for n in state if n in names.values()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    single = type(opt)(groups)
    for p in model.parameters():
        n = names[id(p)]
        single.state[params[n]] = {k: full[f"{k}/{n}"] for k in opt.state[p]}
    return single, {id(p): n for n, p in params.items()}


def _spawn(world: int, tmp: Path, phase: str, timeout: float = 150) -> list[int | None]:
    import torch.multiprocessing as mp

    init = tmp / f"init_{phase}_{world}"
    ctx = mp.start_processes(_worker, args=(world, str(init), str(tmp), phase), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if ctx.join(timeout=1):
                    break
            except mp.ProcessRaisedException:
                if phase != "kill":
                    raise
            except mp.ProcessExitedException:
                if phase != "kill":
                    raise
            if all(not p.is_alive() for p in ctx.processes):
                break
            assert time.monotonic() < deadline, f"{phase} on {world} ranks did not finish: a collective is waiting"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [p.exitcode for p in ctx.processes]


@pytest.mark.slow
def test_four_ranks_write_their_own_files_and_three_read_them_back(tmp_path: Path):
    _spawn(4, tmp_path, "save")
    d, single = tmp_path / "ckpt", tmp_path / "single"
    ckpt.verify_checkpoint(d)
    # the same bytes as one process writing the gathered state: the layout ignores the world size
    assert tensor_files(d) == tensor_files(single) and len(tensor_files(d)) >= 8
    layout_files = sorted(n for n in tensor_files(d) if not n.endswith(".json"))
    written = {r: json.loads((tmp_path / f"written_{r}.json").read_text()) for r in range(4)}
    assert sorted(f for w in written.values() for f in w) == layout_files  # every file once
    ordered = [n for n in layout_files if n.startswith("model")] + [n for n in layout_files if n.startswith("opt")]
    for r, w in written.items():  # each rank wrote its own files only: file j by rank j % 4
        assert sorted(w) == sorted(ordered[r::4])
        assert all(size == (d / f).stat().st_size for f, size in w.items())

    _spawn(3, tmp_path, "load")  # 48 rows over 3 ranks, 101 over 3: uneven blocks
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "loaded.safetensors"))
    saved = {**ckpt.load_model_state(d), **ckpt.read_tensors(d, "optimizer")}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # one process resuming the same checkpoint takes the same step
    model = Llama(tiny())
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=1))
    ckpt.load_checkpoint(d, model, opt)
    step(model, opt, 5)
    after = load_file(str(tmp_path / "after.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_and_no_marker(tmp_path: Path):
    codes = _spawn(2, tmp_path, "kill", timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0  # rank 0 stops too, with an error, not a hang
    ckpt.verify_checkpoint(tmp_path / "prev")
    assert not (tmp_path / "next").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".next")]
    assert all(not (p / "COMPLETE.json").exists() for p in leftovers)
    ckpt.clean_leftovers(tmp_path)  # what the next start does: the unsealed folder goes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".next")]
    ckpt.verify_checkpoint(tmp_path / "prev")


def test_a_sharded_run_releases_verifies_and_replays_bitwise(tmp_path: Path):
    """Every stage after training reads the sharded folders: release, verify (and its replay), the card,
    the one model loader."""
    from llm360.data.prepare import prepare
    from llm360.model.load import load_model
    from llm360.release.build import release
    from llm360.release.verify import verify
    from llm360.train import train
    from test_train import tiny_run_config

    cfg = tiny_run_config(tmp_path, checkpoint_shard_mb=0.02)
    run = tmp_path / "run"
    prepare(cfg, run)
    train(cfg, run)
    ck = run / "checkpoints" / "ckpt_002"
    assert (ck / "model.safetensors.index.json").is_file() and (ck / "optimizer.safetensors.index.json").is_file()
    out = release(run, tmp_path / "rel", link=False)
    rep = verify(out, replay=[1])
    assert rep.ok, rep.problems
    assert rep.replays[0]["mode"] == "bitwise" and rep.replays[0]["max_abs_diff"] == 0.0
    card = (out / "MODEL_CARD.md").read_text()
    assert "| Optimizer checkpoints | ✓ yes" in card
    model = load_model(out / "checkpoints" / "ckpt_002")
    weights = ckpt.load_model_state(ck)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    # a shard damaged after release is caught and named
    shard = sorted((out / "checkpoints" / "ckpt_002").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    rep = verify(out)
    assert not rep.ok and any(shard.name in p for p in rep.problems)
