"""The numpy reference model against logits recorded from Hugging Face transformers."""
import json

import numpy as np
import pytest

from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel

FOLDERS = ["stories260K-f32", "stories260K"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_reference_reproduces_recorded_logits(data_dir, folder):
    ref = json.loads((data_dir / folder / "reference.json").read_text())["logits_32"]
    logits = ReferenceModel(load_model(data_dir / folder)).forward(ref["input_ids"])
    last = logits[-1]
    top5 = np.argsort(-last, kind="stable")[:5]
    assert top5.tolist() == ref["last_position_top5_ids"]
    np.testing.assert_allclose(last[top5], ref["last_position_top5_values"], rtol=1e-4)
    assert logits.argmax(-1).tolist() == ref["argmax_ids_per_position"]
    # mean next-token NLL over the 31 targets
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    ids = ref["input_ids"]
    nll = -np.mean([lp[i, ids[i + 1]] for i in range(len(ids) - 1)])
    assert nll == pytest.approx(ref["mean_nll_next_token"], rel=1e-4)
    assert float(last.sum()) == pytest.approx(ref["last_position_logit_sum"], rel=1e-4, abs=1e-3)
    assert float(np.linalg.norm(last)) == pytest.approx(ref["last_position_logit_l2"], rel=1e-4)


@pytest.mark.parametrize("folder", FOLDERS)
def test_reference_greedy_matches_recorded_ids(data_dir, folder):
    g = json.loads((data_dir / folder / "reference.json").read_text())["greedy"]
    assert ReferenceModel(load_model(data_dir / folder)).greedy(g["prompt_ids"], 60) == g["new_ids"]
