"""lm-evaluation-harness, a client nobody here wrote, against `infeng serve`: its local-completions
model runs a perplexity, a multiple-choice (log-likelihood) and a generation task from local files
(evals/lm_eval/), and every score equals what infeng computes itself on the same tokens."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
if shutil.which("lm_eval", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("lm-evaluation-harness is not installed (pip install -e '.[lmeval]')", allow_module_level=True)

from infeng.cli.main import main  # noqa: E402
from infeng.evals.perplexity import read_documents  # noqa: E402
from infeng.model.loader import load_model  # noqa: E402
from infeng.runtime.engine import Engine, Request  # noqa: E402
from infeng.runtime.sampler import SamplingParams, token_logprobs  # noqa: E402
from infeng.runtime.scorer import Scorer  # noqa: E402
from infeng.runtime.tokenizer import Tokenizer  # noqa: E402

from test_serve import ServerProc  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "evals" / "lm_eval"
TEXT = "text/tinystories_sample.txt"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """stories260K served; lm_eval run once over the three tasks, its samples logged."""
    d = tmp_path_factory.mktemp("lmeval")
    model = d / "story.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(model)]) == 0
    srv = ServerProc([str(model), "--threads", "1", "--max-batch", "4"])
    try:
        cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args",
               f"model=story,base_url={srv.url}/v1/completions,max_length=512,num_concurrent=2,max_retries=1",
               "--tasks", "infeng_stories_ppl,infeng_stories_cloze,infeng_stories_continue",
               "--include_path", str(TASKS), "--metadata", json.dumps({"text": str(data_dir / TEXT)}),
               "--output_path", str(d / "out"), "--log_samples"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**_env(), "OPENAI_API_KEY": ""})
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        assert srv.stop() == 0
    results = json.loads(next((d / "out").rglob("results_*.json")).read_text())
    samples = {t: [json.loads(x) for x in next((d / "out").rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in ("infeng_stories_ppl", "infeng_stories_cloze", "infeng_stories_continue")}
    return model, results["results"], samples, d


def _env():
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}


def test_perplexity_equals_infeng_eval(run, data_dir):
    model, results, samples, d = run
    out = d / "ppl.json"
    assert main(["eval", str(model), "--text", str(data_dir / TEXT), "--json", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    ours = {"ppl": m["perplexity.ppl"], "tokens": m["perplexity.tokens"]}
    docs = read_documents(data_dir / TEXT)
    assert len(samples["infeng_stories_ppl"]) == len(docs)
    # lm_eval's rolling log-likelihood of each document, from BOS (its prefix token): the sum over
    # every predicted token, what `infeng eval` averages
    total_ll = sum(float(s["resps"][0][0]) for s in samples["infeng_stories_ppl"])
    tok = Scorer(load_model(model), threads=1).tokenizer
    n = sum(len(tok.encode_plain(x)) for x in docs)
    assert n == ours["tokens"]
    assert math.exp(-total_ll / n) == pytest.approx(ours["ppl"], rel=1e-5)
    # lm_eval's own word/byte figures follow from the same total
    words = sum(len(x.split()) for x in docs)
    assert results["infeng_stories_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)


def test_loglikelihood_task_equals_the_engine(run):
    """Each choice's log-likelihood and the accuracy, recomputed with the engine's Scorer from the
    same token ids (lm_eval tokenizes through the server's /tokenize)."""
    model, results, samples, _ = run
    m = load_model(model)
    sc = Scorer(m, threads=1)
    tok = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    correct = 0
    rows = samples["infeng_stories_cloze"]
    assert len(rows) >= 8
    for s in rows:
        lls = []
        for i, resp in enumerate(s["resps"]):
            args = s["arguments"][f"gen_args_{i}"]
            ctx, cont, ll = args["arg_0"], args["arg_1"], float(resp[0][0])
            # lm_eval encodes context + continuation whole and splits at the context's length; no BOS
            ids, n_ctx = tok.encode_plain(ctx + cont), len(tok.encode_plain(ctx))
            lg = sc.logits(ids)
            mine = sum(token_logprobs(lg[j - 1], ids[j], 0)[0] for j in range(n_ctx, len(ids)))
            assert ll == pytest.approx(mine, abs=1e-4)
            lls.append(mine)
        correct += int(np.argmax(lls)) == int(s["target"])
    assert results["infeng_stories_cloze"]["acc,none"] == pytest.approx(correct / len(rows))


def test_generation_task_equals_the_engine(run):
    model, results, samples, _ = run
    m = load_model(model)
    tok = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    eng = Engine(m, threads=1, max_batch=4)
    rows = samples["infeng_stories_continue"]
    assert rows and "exact_match,none" in results["infeng_stories_continue"]
    for s in rows:
        ctx = s["arguments"]["gen_args_0"]["arg_0"]
        r = next(eng.generate([Request(id="g", prompt_ids=tok.encode_plain(ctx),
                                       params=SamplingParams(max_tokens=40, temperature=0, stop=("\n",)))]))
        assert s["resps"][0][0] == r.text
