"""PEFT on torch as the multi-LoRA peer: the same mixed batch (8 rows over 4 adapters on all 7
projections) through transformers' LlamaForCausalLM with PEFT's per-row ``adapter_names``, against
infeng's fused batch, in one run.

    infeng bench --suite bench/peft_lora.yaml --model BASE.infeng     # kind: peft_lora

How the weights reach torch: the base is the native file's own tensors, viewed as f32 and handed
to LlamaForCausalLM as an in-memory HF state dict (built on the meta device, then assigned; no
checkpoint is written), so torch runs f32 on exactly the weights infeng runs. The adapters are the
native adapter files infeng loads, dequantized to f32 and given to PEFT with
``set_peft_model_state_dict`` (LoraConfig with the adapter's rank and its scale as alpha / r).

torch, transformers and peft are imported only here, lazily; when one is missing the run is a
note saying so (skipped), like the other optional peers.
"""
from __future__ import annotations

import time

import numpy as np

from infeng.bench.lora_scenarios import adapter_file
from infeng.bench.peers import PeerSkip, _import
from infeng.converters.peft import TARGETS
from infeng.model.adapter import load_adapter
from infeng.format.schema import MATRICES
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request, StepStats
from infeng.runtime.sampler import SamplingParams

PEFT_MODULE = {native: (module, parent) for module, (native, parent) in TARGETS.items()}


def hf_config(cfg) -> dict:
    """transformers LlamaConfig fields for a native model config."""
    d = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
         "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False}
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    return d


def hf_state_dict(model, torch) -> dict:
    """HF Llama parameter name → f32 tensor, from the native tensors (same RoPE layout)."""
    sd = {"model.embed_tokens.weight": model.f32("tok_embeddings"), "model.norm.weight": model.f32("norm")}
    if not model.config.tie_embeddings:
        sd["lm_head.weight"] = model.f32(model.output_name)
    for i in range(model.config.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = model.f32(f"layers.{i}.attn_norm")
        sd[p + "post_attention_layernorm.weight"] = model.f32(f"layers.{i}.ffn_norm")
        for proj in MATRICES:
            module, parent = PEFT_MODULE[proj]
            sd[f"{p}{parent}.{module}.weight"] = model.f32(f"layers.{i}.{proj}")
    return {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}


def peft_state_dict(adapter, torch) -> dict:
    """PEFT's saved-adapter names (no adapter name inside) → f32 tensors of a native adapter."""
    sd = {}
    for t in adapter.targets:
        _, layer, proj = t.split(".")
        module, parent = PEFT_MODULE[proj]
        key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
        sd[f"{key}.lora_A.weight"] = torch.from_numpy(np.array(adapter.f32(f"{t}.lora_a"), np.float32, copy=True))
        sd[f"{key}.lora_B.weight"] = torch.from_numpy(np.array(adapter.f32(f"{t}.lora_b"), np.float32, copy=True))
    return sd


HINT = "PEFT peer needs torch==2.13.0, transformers and peft (pip install -e '.[ref]')"


def require():
    """(torch, transformers, peft), or PeerSkip naming what is missing."""
    return tuple(_import(n, f"{HINT}; {n} is missing") for n in ("torch", "transformers", "peft"))


class PeftPeer:
    """transformers + PEFT, f32, several LoRA adapters in one PeftModel; rows pick theirs."""
    name = "peft"

    def __init__(self, model, adapters: dict, threads: int):
        """``adapters``: name → infeng Adapter (model.adapter.Adapter) made for ``model``."""
        torch, transformers, peft = require()
        self.torch = torch
        torch.set_num_threads(threads)
        if any(a.use_dora for a in adapters.values()):
            raise PeerSkip("PEFT's mixed adapter_names batches do not take DoRA adapters")
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.config)))
        hf.load_state_dict(hf_state_dict(model, torch), strict=False, assign=True)
        if model.config.tie_embeddings:
            hf.tie_weights()
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)   # its buffers were on meta
        hf.eval()
        self.pm = None
        for name, a in adapters.items():
            lc = peft.LoraConfig(r=a.rank, lora_alpha=a.scale * a.rank, lora_dropout=0.0, bias="none",
                                 target_modules=sorted({PEFT_MODULE[t.split(".")[2]][0] for t in a.targets}))
            if self.pm is None:
                self.pm = peft.get_peft_model(hf, lc, adapter_name=name)
            else:
                self.pm.add_adapter(name, lc)
            res = peft.set_peft_model_state_dict(self.pm, peft_state_dict(a, torch), adapter_name=name)
            missing = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
            if missing:
                raise PeerSkip(f"PEFT did not take adapter {name}'s tensors, e.g. {missing[0]}")
        self.pm.eval()

    def generate(self, prompts: list[list[int]], adapter_names: list[str], n_out: int):
        """Greedy n_out tokens per row (one mixed batch); (ids, prefill tok/s, decode tok/s, first logits)."""
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor(prompts)
            t0 = time.perf_counter()
            out = self.pm(input_ids=ids, use_cache=True, adapter_names=adapter_names)
            t_pre = time.perf_counter() - t0
            first = out.logits[:, -1].float().numpy()
            nxt = out.logits[:, -1].argmax(-1)
            past, got = out.past_key_values, [nxt]
            t0 = time.perf_counter()
            for _ in range(n_out - 1):
                out = self.pm(input_ids=nxt[:, None], past_key_values=past, use_cache=True, adapter_names=adapter_names)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                got.append(nxt)
            t_dec = time.perf_counter() - t0
        toks = torch.stack(got, 1).tolist()
        B = len(prompts)
        return toks, B * len(prompts[0]) / t_pre, B * (n_out - 1) / t_dec, first


def compare(base_path, rank: int = 16, threads: int = 2, batch: int = 8, n_adapters: int = 4,
            prompt_len: int = 128, n_out: int = 32, repeats: int = 2, adapter_dtype: str = "bf16", seed: int = 0):
    """infeng's fused mixed batch vs PEFT's mixed batch, same prompts, adapters and threads."""
    require()                                       # skip before loading anything
    model = load_model(base_path, verify=False)
    cfg = model.config
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(batch)]
    paths = {f"r{rank}-{k}": adapter_file(base_path, model, rank, adapter_dtype, seed=100 * rank + k)
             for k in range(n_adapters)}
    names = list(paths)
    mixed = [names[i % n_adapters] for i in range(batch)]
    peer = PeftPeer(model, {n: load_adapter(p, model) for n, p in paths.items()}, threads)
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    for n, p in paths.items():
        eng.load_adapter(p, n)

    def infeng_run():
        eng.stats = StepStats()
        reqs = [Request(id=str(i), prompt_ids=p, adapter=a,
                        params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
                for i, (p, a) in enumerate(zip(prompts, mixed))]
        res = sorted(eng.generate(reqs), key=lambda r: int(r.id))
        st = eng.stats
        return [r.token_ids for r in res], st.prefill_tokens / st.prefill_s, st.decode_tokens / st.decode_s

    ours, theirs = [], []
    for _ in range(repeats):                                               # A B A B
        ours.append(infeng_run())
        theirs.append(peer.generate(prompts, mixed, n_out))
    o_pre, o_dec = np.median([r[1] for r in ours]), np.median([r[2] for r in ours])
    t_pre, t_dec = np.median([r[1] for r in theirs]), np.median([r[2] for r in theirs])
    o_ids, t_ids = ours[0][0], theirs[0][0]
    same_first = sum(a[0] == b[0] for a, b in zip(o_ids, t_ids))
    same_all = sum(list(a) == list(b) for a, b in zip(o_ids, t_ids))
    return {"rank": rank, "batch": batch, "adapters": n_adapters, "threads": threads, "prompt_len": prompt_len,
            "n_out": n_out, "infeng_base_dtype": model.weight_dtype, "adapter_dtype": adapter_dtype,
            "peft_dtype": "f32", "infeng_prefill_tok_s": o_pre, "peft_prefill_tok_s": t_pre,
            "infeng_decode_tok_s": o_dec, "peft_decode_tok_s": t_dec,
            "prefill_ratio": o_pre / t_pre, "decode_ratio": o_dec / t_dec,
            "first_token_agree": f"{same_first}/{batch}", "all_tokens_agree": f"{same_all}/{batch}"}
