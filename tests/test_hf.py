"""Hugging Face folders: our exports load in transformers with equal logits, and HF folders import."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llm360.config import ModelConfig, MupConfig
from llm360.errors import CheckpointError, ConfigError
from llm360.model.hf import fold_mup, hf_config_dict, hf_metadata_files, load_hf_folder, save_hf_folder
from llm360.model.llama import Llama

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

V = 101


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def model_of(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights (and LayerNorm biases)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))


def max_diff(ours: Llama, folder) -> float:
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert next(ref.parameters()).dtype == torch.float32
    with torch.no_grad():
        return (ours(ids()) - ref(ids()).logits).abs().max().item()


@pytest.mark.parametrize("kw", [{"num_kv_heads": 2}, {"tie_embeddings": True}], ids=["gqa", "tied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, kw):
    cfg = tiny(**kw)
    model = model_of(cfg)
    save_hf_folder(model, cfg, tmp_path / "hf", eos_token_id=2, bos_token_id=1)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "float32"
    assert (hf["eos_token_id"], hf["bos_token_id"]) == (2, 1)
    assert max_diff(model, tmp_path / "hf") <= 1e-5


def test_crystalcoder_export_is_exact_through_stablelm_with_mup_folded(tmp_path):
    cfg = tiny(
        norm="layernorm", norm_eps=1e-5, rope_fraction=0.25, num_kv_heads=2, mup=MupConfig(base_width=16)
    )
    model = model_of(cfg)
    save_hf_folder(model, cfg, tmp_path / "hf", eos_token_id=0)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["StableLmForCausalLM"] and hf["partial_rotary_factor"] == 0.25
    assert max_diff(model, tmp_path / "hf") <= 1e-5
    # and back: the exact config (muP unfolded) and the weights, up to fp32 rounding
    cfg2, sd = load_hf_folder(tmp_path / "hf")
    assert cfg2 == cfg
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=0)


def test_what_llama_cannot_express_raises_or_warns(tmp_path, caplog):
    cfg = tiny(norm="layernorm", rope_fraction=0.5, mup=MupConfig())
    with pytest.raises(ConfigError, match="layernorm.*rope_fraction=0.5.*mup"):
        hf_config_dict(cfg, architecture="llama", strict=True)
    with pytest.raises(ConfigError, match="rmsnorm.*only LayerNorm"):
        hf_config_dict(tiny(), architecture="stablelm", strict=True)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        hf_config_dict(tiny(mup=MupConfig(), tie_embeddings=True), mup_folded=False, strict=True)
    assert hf_config_dict(tiny(mup=MupConfig()), mup_folded=True, strict=True)["model_type"] == "llama"
    with caplog.at_level(logging.WARNING, logger="llm360"):
        save_hf_folder(model_of(cfg), cfg, tmp_path / "hf", eos_token_id=0, architecture="llama", fold=False)
    assert "cannot express" in caplog.text and "mup" in caplog.text
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    cfg2, _ = load_hf_folder(tmp_path / "hf")  # llm360_model.json restores what config.json cannot say
    assert cfg2 == cfg


def test_checkpoint_metadata_files_keep_mup_for_our_loader(tmp_path):
    """A training checkpoint stores unfolded weights itself; llm360_model.json restores muP."""
    from safetensors.torch import save_file

    cfg = tiny(norm="layernorm", rope_fraction=0.25, mup=MupConfig(base_width=16))
    model = model_of(cfg)
    files = hf_metadata_files(cfg, eos_token_id=0)
    assert set(files) == {"config.json", "llm360_model.json"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg2, sd = load_hf_folder(tmp_path)
    assert cfg2 == cfg and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_fold_mup_tied_is_refused():
    cfg = tiny(mup=MupConfig(), tie_embeddings=True)
    with pytest.raises(ConfigError, match="tied"):
        fold_mup(model_of(cfg).state_dict(), cfg)


def test_roundtrip_is_bitwise(tmp_path):
    cfg = tiny(num_kv_heads=1, rope_theta=500000.0)
    model = model_of(cfg)
    save_hf_folder(model, cfg, tmp_path / "hf", eos_token_id=0)
    cfg2, sd = load_hf_folder(tmp_path / "hf")
    assert cfg2 == cfg
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_import_folder_saved_by_transformers_sharded(tmp_path):
    hc = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=20000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hc).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, sd = load_hf_folder(tmp_path / "hf")
    assert (cfg.num_kv_heads, cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (2, 1e-5, 20000.0, 128)
    ours = Llama(cfg).eval()
    ours.load_state_dict(sd)
    with torch.no_grad():
        assert (ours(ids()) - ref(ids()).logits).abs().max().item() <= 1e-5


def test_import_refuses_pickle_and_names_the_file(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_folder(folder)
    cfg = tiny()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle.*pytorch_model.bin"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_folder(folder)


def test_import_rejects_weights_that_do_not_fit(tmp_path):
    cfg = tiny()
    save_hf_folder(model_of(cfg), cfg, tmp_path / "hf", eos_token_id=0)
    (tmp_path / "hf" / "llm360_model.json").unlink()
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="wrong shape.*mlp"):
        load_hf_folder(tmp_path / "hf")
    hf["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="gpt2"):
        load_hf_folder(tmp_path / "hf")


def test_export_refuses_weights_of_another_config(tmp_path):
    model = model_of(tiny())
    with pytest.raises(CheckpointError, match="wrong shape"):
        save_hf_folder(model, tiny(intermediate_size=128), tmp_path / "hf", eos_token_id=0)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
