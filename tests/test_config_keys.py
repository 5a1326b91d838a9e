"""Config parsing that cannot be silently wrong: both transformers layouts of RoPE, every RoPE type
of a listed architecture, and an explicit list of keys per architecture (anything else refused by
name), for config.json and for GGUF metadata."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from infeng.converters.hf_config import from_hf
from infeng.errors import InfengError
from infeng.format.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "arch"
BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
        "max_position_embeddings": 131072}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def to_v4(cfg: dict) -> dict:
    """A transformers-5 config.json in the 4.x layout: rope_theta + rope_scaling at top level."""
    cfg = dict(cfg)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    kind = rp.pop("rope_type", "default")
    cfg["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rp}
    return cfg


def test_v5_rope_parameters_are_read_not_ignored():
    """The silent-wrong bug: a 5.x Llama 3 config used to fall back to theta 10000, no scaling."""
    v5 = from_hf({**BASE, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    v4 = from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    assert v5 == v4 and v5.rope_theta == 500000.0 and v5.rope_scaling["rope_type"] == "llama3"
    plain = from_hf({**BASE, "rope_theta": 500000.0})
    assert v5.inv_freq()[-1] == pytest.approx(plain.inv_freq()[-1] / 8)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()))
def test_both_layouts_of_each_fixture_agree(name):
    v5 = json.loads((FIXTURES / name / "config.json").read_text())
    if "rope_parameters" not in v5:
        pytest.skip("recorded in the 4.x layout")
    assert from_hf(v5) == from_hf(to_v4(v5))


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_theta": 1e4}, "rope_theta": 5e5}, "both rope_parameters and a top-level rope_theta"),
    ({"rope_parameters": {"rope_type": "default"}}, "rope_parameters has no rope_theta"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "smooth": 1}},
     "rope_scaling key 'smooth' is not understood for rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}}, "has type 'linear' and rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "rope_scaling type 'mrope' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a positive factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, "factor must be a positive number"),
    ({"quantization_config": {"quant_method": "gptq"}}, "key 'quantization_config' is not understood for LlamaForCausalLM"),
    ({"sliding_window": 4096}, "key 'sliding_window' is not understood for LlamaForCausalLM"),
    ({"rope_interleaved": True}, "rope_interleaved=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor=0.5"),
    ({"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True, "sliding_window": None,
      "layer_types": ["sliding_attention"] * 4}, "no sliding window is in force"),
    ({"architectures": ["Qwen3ForCausalLM"], "layer_types": ["full_attention"] * 3}, "layer_types must list 4"),
    ({"architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1, 1, 1]}, "no_rope_layers must list 4 flags"),
    ({"architectures": ["MistralForCausalLM"], "layer_types": ["full_attention"] * 4},
     "key 'layer_types' is not understood for MistralForCausalLM"),
    # found by random mutation of the fixtures' configs (each was a TypeError / ZeroDivisionError /
    # a per-layer list of 10^30 entries)
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": ["x"]}}, "rope_type must be a string"),
    ({"architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 1, "rope_parameters": {
        "rope_theta": 1e4, "rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}},
     "original_max_position_embeddings must be at least 2"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4, "num_hidden_layers": 10**30}, "not a plausible model"),
    ({"rope_theta": 1e-300}, "rope_theta must be greater than 1"),
])
def test_refused_by_name(change, message):
    with pytest.raises(InfengError, match=message):
        from_hf({**BASE, **change})


def test_shipped_configs_parse():
    """Configs as the listed models ship them (4.x writers), extra keys and all."""
    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
              "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
              "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
              "use_sliding_window": False, "vocab_size": 151936}
    c = from_hf(qwen25)
    assert (c.arch, c.qkv_bias, c.sliding_window, c.swa_layers, c.tie_embeddings) == ("qwen2", True, 0, (), True)
    c = from_hf({**qwen25, "use_sliding_window": True})       # windowed from max_window_layers on
    assert c.sliding_window == 32768 and c.swa_layers == (21, 22, 23)
    smollm2 = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_size": 576,
               "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192,
               "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
               "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
               "tie_word_embeddings": True, "vocab_size": 49152, "transformers.js_config": {"kv_cache_dtype": {}}}
    assert from_hf(smollm2).head_dim == 64
    smollm3 = {"architectures": ["SmolLM3ForCausalLM"], "hidden_size": 2048, "intermediate_size": 11008,
               "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 128256,
               "no_rope_layer_interval": 4, "max_window_layers": 28, "pretraining_tp": 2, "use_sliding_window": False,
               "sliding_window": None, "rope_theta": 5000000.0, "mlp_bias": False}
    c = from_hf(smollm3)
    assert c.nope_layers == (3, 7) and c.tie_embeddings and c.swa_layers == ()
    phi35 = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "sliding_window": 262144,
             "embd_pdrop": 0.0, "resid_pdrop": 0.0, "rope_theta": 10000.0,
             "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}
    c = from_hf(phi35)
    assert c.max_seq_len == 131072 and c.rope_scaling["factor"] == 32.0 and c.rope_past() == 4096
    assert c.attn_factor() == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    # short factors up to the original length, long ones past it (a call's highest position + 1)
    np.testing.assert_array_equal(c.inv_freq_at(4096), c.inv_freq())
    np.testing.assert_allclose(c.inv_freq_at(4097), c.inv_freq() / 2, rtol=1e-6)
    dyn = from_hf({**BASE, "max_position_embeddings": 1024, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert dyn.max_seq_len == 2048 and dyn.rope_past() == 1024        # the context runs to factor x
    np.testing.assert_array_equal(dyn.inv_freq_at(1024), dyn.inv_freq())
    hd = dyn.head_dim      # NTK: the base grows as (factor * len / orig - (factor - 1)) ** (hd / (hd - 2))
    base = dyn.rope_theta * (2.0 * 2048 / 1024 - 1) ** (hd / (hd - 2))
    np.testing.assert_allclose(dyn.inv_freq_at(2048), 1 / base ** (np.arange(0, hd, 2) / hd), rtol=1e-5)


def test_manifest_round_trip_and_old_manifests():
    c = from_hf({**BASE, "architectures": ["SmolLM3ForCausalLM"], "rope_theta": 1e6})
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    old = {k: v for k, v in from_hf(BASE).to_dict().items()
           if k not in ("qkv_bias", "qk_norm", "sliding_window", "swa_layers", "nope_layers")}
    assert ModelConfig.from_dict(old).arch == "llama"                        # files written before
    with pytest.raises(InfengError, match="architecture 'gemma' is not supported"):
        ModelConfig.from_dict({**old, "arch": "gemma"})
    with pytest.raises(InfengError, match="swa_layers must list layer indices below 4"):
        ModelConfig.from_dict({**old, "swa_layers": [9], "sliding_window": 8})


def test_yarn_frequencies_interpolate_low_and_keep_high():
    c = from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6,
                 "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    plain = from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6})
    a, b = c.inv_freq(), plain.inv_freq()
    assert a[0] == b[0] and a[-1] == pytest.approx(b[-1] / 4)
    assert np.all(a <= b) and c.attn_factor() == pytest.approx(0.1 * math.log(4) + 1)
