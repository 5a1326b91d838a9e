"""Record PEFT LoRA/DoRA fixtures for stories260K-f32: adapter folders + transformers logits.

Needs the reference extra (`pip install -e '.[ref]'`: torch==2.13.0, transformers, peft); the
engine and its tests never import these. Output: tests/fixtures/peft/<name>/{adapter_config.json,
adapter_model.safetensors, logits.json}.

    python tools/record_peft_fixtures.py ../shared/data/stories260K-f32
"""
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora_r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_r8_all_rslora": dict(r=8, lora_alpha=16, target_modules=ALL, use_rslora=True),
    "lora_r16_mlp": dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "dora_r4_attn_down": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                              use_dora=True),
}
INPUT = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]


def main(base: str, out: Path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "peft") -> None:
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, init_lora_weights=False, **kw))
        with torch.no_grad():     # make every part of the adapter matter, magnitudes included
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05)
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
            logits = pm(torch.tensor([INPUT])).logits[0].float()
        d = out / name
        pm.save_pretrained(d)
        (d / "README.md").unlink(missing_ok=True)
        (d / "logits.json").write_text(json.dumps({
            "input_ids": INPUT, "base": Path(base).name,
            "last_logits": [round(float(x), 6) for x in logits[-1]],
            "argmax_per_position": logits.argmax(-1).tolist()}))
        print(name, "recorded")


if __name__ == "__main__":
    main(sys.argv[1])
