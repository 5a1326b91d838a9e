"""The config.json keys each architecture may carry, and the values some must have.

A key in neither INFO_KEYS nor the architecture's own list is refused by name (hf_config.py):
when transformers moves or adds a field, the engine says so instead of computing something else.
Lists taken from the transformers 4.x and 5.x configuration classes and from shipped checkpoints.
"""
from __future__ import annotations

# HF class name → the engine's architecture (SmolLM2 and TinyLlama are LlamaForCausalLM)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "SmolLM3ForCausalLM": "smollm3"}

# keys that name, train, tokenize or generate but never change the forward math
INFO_KEYS = frozenset({
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "attention_dropout", "resid_pdrop", "embd_pdrop", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "tokenizer_class", "use_bfloat16",
    "is_decoder", "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "torchscript", "pruned_heads", "problem_type", "finetuning_task", "prefix",
    "task_specific_params", "cross_attention_hidden_size", "tf_legacy_loss", "auto_map",
    "transformers.js_config", "is_llama_config", "pretraining_tp",   # pretraining_tp: the same product, sliced
    # generation defaults some configs still carry (generation_config.json is what is read)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})

_COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings",
})
_QWEN_WINDOW = frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"})

ARCH_KEYS = {
    "llama": _COMMON | {"head_dim", "attention_bias", "mlp_bias", "rope_interleaved"},
    "mistral": _COMMON | {"head_dim", "sliding_window"},
    "qwen2": _COMMON | _QWEN_WINDOW,
    "qwen3": _COMMON | _QWEN_WINDOW | {"head_dim", "attention_bias"},
    "phi3": _COMMON | {"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"},
    "smollm3": _COMMON | _QWEN_WINDOW | {"attention_bias", "mlp_bias", "no_rope_layers", "no_rope_layer_interval"},
}

# keys whose other values change the math in ways not implemented
FIXED = {
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "rope_interleaved": (False, None),       # SmolLM2's nanotron flag; transformers rotates halves
    "partial_rotary_factor": (1, 1.0, None),
}

# what transformers assumes when rope_theta / tie_word_embeddings are absent
DEFAULT_THETA = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0, "phi3": 10000.0,
                 "smollm3": 2000000.0}
DEFAULT_TIE = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "phi3": False, "smollm3": True}
