"""llama.cpp's names for the supported architectures: the GGUF architecture string, tensor names and
the ``{arch}.*`` metadata keys each may carry (a key outside the list is refused by name, as an
unknown config.json key is), shared by the GGUF reader and writer.
"""
from __future__ import annotations

# engine architecture → llama.cpp's (its converter writes Mistral, TinyLlama and SmolLM2 as "llama")
TO_GGUF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
           "smollm3": "smollm3"}
FROM_GGUF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "smollm3": "smollm3"}
# llama.cpp's converter permutes q/k rows into GGML's interleaved RoPE pairs only for these (the
# others run its NEOX mode, which rotates halves as Hugging Face does)
PERMUTED = frozenset({"llama", "smollm3"})
# llama.cpp's SmolLM3 skips RoPE on every fourth layer (fixed there, no metadata)
NOPE_EVERY = {"smollm3": 4}

# blk.{i}.<name> → native layers.{i}.<name>
LAYER = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm", "attn_q.weight": "wq",
         "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_gate.weight": "w_gate",
         "ffn_up.weight": "w_up", "ffn_down.weight": "w_down", "attn_q.bias": "q_bias", "attn_k.bias": "k_bias",
         "attn_v.bias": "v_bias", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm"}
# Phi-3's fused tensors: blk.{i}.<name> → the native tensors its rows hold, in order
FUSED = {"phi3": {"attn_qkv.weight": ("wq", "wk", "wv"), "ffn_up.weight": ("w_gate", "w_up")}}
GLOBAL = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
ROPE_TENSORS = {"rope_factors_short.weight", "rope_factors_long.weight", "rope_freqs.weight"}

# the {arch}.* keys read (hyper-parameters) or known not to change the math here
HP_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.attn_factor", "rope.scaling.finetuned", "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow", "attention.sliding_window",
})
# keys that must hold this value when present (llama.cpp writes some of them as 0 for dense models)
HP_FIXED = {"expert_count": (0,), "expert_used_count": (0,)}
