"""Speculative decoding in the engine: drafts verified as extra positions of the same ragged step
give, token for token, what the engine gives without speculation — greedy on every architecture,
with adapters, prefix sharing and preemption; sampled with the same seed too — and the KV of
rejected positions is rolled back (blocks freed, nothing unaccepted published)."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.errors import InfengError
from infeng.model.adapter import convert_peft
from infeng.model.loader import load_model
from infeng.runtime.drafters import Drafter, LookupDrafter, NgramIndex
from infeng.runtime.engine import Engine, Request
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.speculate import SpecConfig, parse_speculate

ARCH = Path(__file__).parent / "fixtures" / "arch"
ARCHS = sorted(p.name for p in ARCH.iterdir() if (p / "reference.json").is_file())
PEFT = Path(__file__).parent / "fixtures" / "peft"
PROMPTS = ["Once upon a time", "Lily", "The little dog was very happy because", "",
           "Tom and Sue went to the park. They saw a big tree and", "One day", "Ben had a red ball"]


class Oracle(Drafter):
    """Drafts the continuation the engine is known to give (``want``: request id → tokens),
    corrupted by a fixed pattern, so that steps accept all, some, or none of their drafts."""

    def __init__(self, want, vocab):
        self.want, self.vocab, self.calls = want, vocab, 0

    def draft(self, wanted):
        for s, k in wanted:
            g = len(s.result.token_ids)
            d = list(self.want.get(s.req.id, [])[g:g + k])
            self.calls += 1
            mode = (g + self.calls) % 4
            if mode == 1 and d:
                d[len(d) // 2] = (d[len(d) // 2] + 1) % self.vocab   # reject from the middle
            elif mode == 2 and d:
                d[0] = (d[0] + 1) % self.vocab                       # reject everything
            elif mode == 3:
                d = d[:1]
            s.draft = d


def _params(n, temperature=0.0, seed=1, **kw):
    return SamplingParams(max_tokens=n, temperature=temperature, seed=seed, **kw)


def _run(model, reqs, spec=None, oracle=None, adapters=(), **kw):
    kw.setdefault("threads", 1)
    eng = Engine(model, speculate=spec, **kw)
    for name, path in adapters:
        eng.load_adapter(path, name)
    if oracle is not None:
        eng.spec.drafter = Oracle(oracle, model.config.vocab_size)
    out = {}
    for r in eng.generate(reqs):
        assert not isinstance(r, tuple), r
        out[r.id] = r.token_ids
    assert eng.kv.blocks_used() == 0
    return out, eng


@pytest.fixture(scope="module")
def stories(data_dir):
    return load_model(data_dir / "stories260K-f32")


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("name", ARCHS)
def test_greedy_exact_every_architecture(name, dtype):
    model = load_model(ARCH / name)
    if dtype != "f32":      # quantized weights: the verify rows take the GEMM path, decode the GEMV one
        from infeng.quant.policy import plan, quantize_tensors
        model = model.derived(quantize_tensors(model.tensors, plan(model.tensors, dtype)))
    p = json.loads((ARCH / name / "reference.json").read_text())["prompt"]
    prompts = [p, p[:3], p + p[:5], p[2:]]
    reqs = [Request(str(i), prompt_ids=q, params=_params(24, ignore_eos=True)) for i, q in enumerate(prompts)]
    want, _ = _run(model, reqs, max_batch=3, block_size=4)
    for k in (None, 3):
        got, eng = _run(model, reqs, SpecConfig("lookup", k=k), oracle=want, max_batch=3, block_size=4)
        st = eng.spec.stats
        assert got == want and st.drafted > st.accepted > 0
        got, eng = _run(model, reqs, SpecConfig("lookup", k=k), max_batch=3, block_size=4)
        assert got == want


def test_greedy_exact_stories_with_eos_stops_and_chunking(stories):
    reqs = [Request(str(i), p, params=_params(60 + i)) for i, p in enumerate(PROMPTS)]
    want, _ = _run(stories, reqs, max_batch=3, max_batch_tokens=9)
    got, eng = _run(stories, reqs, SpecConfig(k=6), oracle=want, max_batch=3, max_batch_tokens=9)
    assert got == want and eng.spec.stats.accepted > 50
    got, eng = _run(stories, reqs, SpecConfig(), max_batch=3, max_batch_tokens=9)
    assert got == want and eng.spec.stats.drafted > 0


def test_mixed_adapters_verify_with_their_adapter(stories, tmp_path):
    names = sorted(p.name for p in PEFT.iterdir())[:2]
    ads = [(n, convert_peft(PEFT / n, tmp_path / f"{n}.infeng-lora", stories, dtype="f32")) for n in names]
    which = [names[0], None, names[1], names[0], None, names[1]]
    reqs = [Request(str(i), p, params=_params(40), adapter=a) for i, (p, a) in enumerate(zip(PROMPTS, which))]
    want, _ = _run(stories, reqs, adapters=ads, max_batch=4, block_size=4)
    got, eng = _run(stories, reqs, SpecConfig(k=4), oracle=want, adapters=ads, max_batch=4, block_size=4)
    assert got == want and eng.spec.stats.accepted > 0
    # the same prompts without adapters give other tokens: the drafts were checked by the adapter's rows
    plain, _ = _run(stories, [Request(r.id, r.prompt, params=r.params) for r in reqs], max_batch=4)
    assert any(plain[k] != want[k] for k in want if which[int(k)])


def test_sampled_same_seed_same_tokens(stories):
    """Drafts are point guesses: drawing from p and accepting iff the draw equals the draft is the
    speculative-sampling rule, and uses the sequence's random numbers one per emitted token, as
    without speculation — so the tokens are the same, for every truncation setting."""
    for kw in (dict(temperature=0.8), dict(temperature=1.3, top_k=12), dict(temperature=0.7, top_p=0.9),
               dict(temperature=1.0, top_k=40, top_p=0.8)):
        reqs = [Request(str(i), p, params=_params(50, seed=10 + i, **kw)) for i, p in enumerate(PROMPTS)]
        want, _ = _run(stories, reqs, max_batch=4)
        got, eng = _run(stories, reqs, SpecConfig(k=5), oracle=want, max_batch=4)
        assert got == want and eng.spec.stats.accepted > 0, kw
        got, _ = _run(stories, reqs, SpecConfig(), max_batch=4)
        assert got == want, kw


class Greedy(Drafter):
    """Always drafts the target's two most likely tokens in a row as if they were certain."""

    def __init__(self, toks):
        self.toks = toks

    def draft(self, wanted):
        for s, k in wanted:
            s.draft = self.toks[:k]


def _first_tokens(model, seeds, spec, drafts=None):
    reqs = [Request(str(s), "Lily", params=_params(4, temperature=1.0, seed=s)) for s in seeds]
    eng = Engine(model, threads=1, max_batch=8, speculate=spec)
    if drafts is not None:
        eng.spec.drafter = Greedy(drafts)
    return [tuple(r.token_ids) for r in eng.generate(reqs)], eng


CHI2_DF8_P1E4 = 33.72       # the chi-square distribution's 1 - 1e-4 quantile at 8 degrees of freedom


def _chi2(a, b, j):
    """Chi-square statistic of homogeneity for token ``j`` of samples a and b, over the 8 most
    common tokens of a and one bin for the rest (8 degrees of freedom)."""
    top = sorted({x[j] for x in a}, key=lambda t: -sum(x[j] == t for x in a))[:8]
    def counts(xs):
        c = np.zeros(9)
        for x in xs:
            c[top.index(x[j]) if x[j] in top else 8] += 1
        return c
    ca, cb = counts(a), counts(b)
    tot = ca + cb
    ea, eb = tot * len(a) / (len(a) + len(b)), tot * len(b) / (len(a) + len(b))
    m = tot > 0
    return float((((ca - ea) ** 2 / ea)[m]).sum() + (((cb - eb) ** 2 / eb)[m]).sum())


def test_sampled_distribution_matches_over_seeds(stories):
    """Statistical check at temperature 1 with drafts that are mostly wrong: tokens 2-4 of
    speculative runs (seeds 0..N) against plain sampling (other seeds), a chi-square test of
    homogeneity per position at p = 1e-4; a rule that keeps drafts too often (always, below)
    fails it by far."""
    n = 1000
    plain, _ = _first_tokens(stories, range(n, 2 * n), None)
    tail = max({x[1:3] for x in plain}, key=lambda t: sum(x[1:3] == t for x in plain))
    spec, eng = _first_tokens(stories, range(n), SpecConfig(k=2, batch_off=9), drafts=list(tail))
    st = eng.spec.stats
    assert st.drafted > n and 0.02 * st.drafted < st.accepted < 0.8 * st.drafted
    for j in (1, 2, 3):
        assert _chi2(plain, spec, j) < CHI2_DF8_P1E4, j
    biased = [x[:1] + tail + x[3:] for x in spec]
    assert max(_chi2(plain, biased, j) for j in (1, 2)) > 10 * CHI2_DF8_P1E4


def test_preemption_and_prefix_cache_stay_exact(stories):
    per_block = 2 * stories.config.n_layers * 16 * stories.config.kv_dim * 4
    budget = 2 * 32 * per_block / 2**20                      # 2 x 512 positions for 4 slots
    params = _params(300, temperature=0.8, seed=3, ignore_eos=True)
    reqs = [Request(str(i), p, params=params) for i, p in enumerate(PROMPTS[:5])]
    want, _ = _run(stories, reqs, max_batch=1)
    got, eng = _run(stories, reqs, SpecConfig(k=8), oracle=want, max_batch=4, kv_budget_mb=budget)
    assert got == want and eng.stats.preemptions > 0 and eng.spec.stats.accepted > 0
    # blocks published while speculating hold accepted tokens only: a later request whose
    # prompt is an earlier request's prompt + completion reuses them and continues the same way
    eng2 = Engine(stories, threads=1, max_batch=2, block_size=4, speculate=SpecConfig(k=4))
    base = Request("a", "Once upon a time", params=_params(40))
    eng2.spec.drafter = Oracle({"a": _run(stories, [base])[0]["a"]}, stories.config.vocab_size)
    (ra,) = eng2.generate([base])
    ids = ra.prompt_ids + ra.token_ids[:30]
    (rb,) = eng2.generate([Request("b", prompt_ids=ids, params=_params(10))])
    plain = _run(stories, [Request("b", prompt_ids=ids, params=_params(10))])[0]["b"]
    assert rb.cached_tokens >= 28 and rb.token_ids == plain


def test_kv_truncate_frees_blocks_and_unpublishes(stories, kern):
    kv = KVCache(kern, stories.config, n_slots=2, max_seq_len=64, block_size=4)
    ids = list(range(20))
    assert kv.ensure(0, 20)
    kv.register_full(0, ids, 12)                  # 3 full blocks published
    used = kv.blocks_used()
    kv.truncate(0, 9)                             # keeps blocks 0..2, drops 3 and 4
    assert len(kv.owned[0]) == 3 and kv.blocks_used() == used - 2 and len(kv.hashes[0]) == 2
    kv.truncate(0, 0)
    assert kv.owned[0] == [] and kv.blocks_used() == 0


def test_batch_off_and_logits_processor_skip_drafting(stories):
    reqs = [Request(str(i), p, params=_params(20)) for i, p in enumerate(PROMPTS[:3])]
    _, eng = _run(stories, reqs, SpecConfig(k=2, batch_off=2), max_batch=3)
    assert eng.spec.stats.drafted == 0
    seen = []
    proc = SamplingParams(max_tokens=20, temperature=0, logits_processor=lambda ids, row: seen.append(len(ids)))
    _, eng = _run(stories, [Request("p", PROMPTS[0], params=proc)], SpecConfig(k=2))
    assert eng.spec.stats.drafted == 0 and seen == list(range(20))


def test_adaptive_switches_off_when_drafts_fail(stories):
    reqs = [Request("0", PROMPTS[0], params=_params(120, ignore_eos=True))]
    want, _ = _run(stories, reqs)
    bad = {"0": [(t + 1) % stories.config.vocab_size for t in want["0"]]}     # always wrong
    got, eng = _run(stories, reqs, SpecConfig(), oracle=bad)
    st = eng.spec.stats
    assert got == want and st.accepted == 0 and st.off >= 2 and st.drafted < 60


def test_ngram_index_finds_latest_earlier_match():
    ids = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    assert NgramIndex(3).lookup(ids, 2, 4, 3) == [9, 2, 5]       # after the latest earlier [5, 6]
    idx = NgramIndex(3)
    assert idx.lookup([1, 2, 3], 2, 4, 2) == []
    assert idx.lookup([1, 2, 3, 1, 2], 2, 4, 2) == [3, 1]       # grown incrementally


def test_bad_speculation_settings_are_refused(stories):
    for value, msg in (("0", "draft length must be in 1..16"), ("x", "give lookup, auto or a draft length"),
                       ("17", "draft length must be in 1..16")):
        with pytest.raises(InfengError, match=msg):
            parse_speculate(value)
    with pytest.raises(InfengError, match="needs the draft model"):
        Engine(stories, threads=1, speculate=SpecConfig("draft"))
    assert parse_speculate("auto").k is None and parse_speculate("3").k == 3
    assert isinstance(Engine(stories, threads=1, speculate=parse_speculate("lookup")).spec.drafter, LookupDrafter)


@pytest.fixture(scope="module")
def stories_q8(stories):
    from infeng.quant.policy import plan, quantize_tensors
    return stories.derived(quantize_tensors(stories.tensors, plan(stories.tensors, "q8_0")))


def test_draft_model_exact_with_adapters_and_sampling(stories, stories_q8, tmp_path):
    """A q8_0 copy drafts for the f32 model: same tokens as without speculation (greedy, sampled,
    adapters verified with their adapter while the draft runs without), high acceptance."""
    name = sorted(p.name for p in PEFT.iterdir())[0]
    ads = [(name, convert_peft(PEFT / name, tmp_path / f"{name}.infeng-lora", stories, dtype="f32"))]
    for temp in (0.0, 0.9):
        reqs = [Request(str(i), p, params=_params(50, temperature=temp, seed=i), adapter=name if i % 3 == 1 else None)
                for i, p in enumerate(PROMPTS)]
        want, _ = _run(stories, reqs, adapters=ads, max_batch=3, block_size=4)
        for k in (None, 4):
            spec = SpecConfig("draft", k=k, draft_model=stories_q8)
            got, eng = _run(stories, reqs, spec, adapters=ads, max_batch=3, block_size=4, max_batch_tokens=16)
            st = eng.spec.stats
            assert got == want, (temp, k)
            assert st.accepted > (0.4 if temp == 0 else 0.25) * st.drafted, st   # adapters lower it
            assert eng.spec.drafter.kv.blocks_used() == 0
    # without adapters nearly every draft is accepted; prompts longer than a step's token budget
    # reach the draft model in chunks too
    reqs = [Request(str(i), p, params=_params(50)) for i, p in enumerate(PROMPTS + [" ".join(PROMPTS)])]
    want, _ = _run(stories, reqs, max_batch=3, max_batch_tokens=8)
    got, eng = _run(stories, reqs, SpecConfig("draft", draft_model=stories_q8), max_batch=3, max_batch_tokens=8)
    assert got == want and eng.spec.stats.accepted > 0.9 * eng.spec.stats.drafted


def test_draft_model_with_another_vocabulary_is_refused(stories):
    other = load_model(ARCH / ARCHS[0])
    with pytest.raises(InfengError, match=r"draft model .*: vocabulary of \d+ tokens, the target's has 512"):
        Engine(stories, threads=1, speculate=SpecConfig("draft", draft_model=other))


def test_cli_speculate_lookup_draft_and_batch(data_dir, tmp_path, capsys):
    from infeng.cli.main import main
    m, q = tmp_path / "s.infeng", tmp_path / "s-q8.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(m)]) == 0
    assert main(["quantize", str(m), "-o", str(q), "--type", "q8_0"]) == 0
    base = ["generate", str(m), "-p", "Lily", "-n", "40", "-t", "0", "--no-echo"]
    capsys.readouterr()
    assert main(base) == 0
    want = capsys.readouterr().out
    for extra in (["--speculate", "lookup"], ["--speculate", "3", "--draft", str(q)], ["--speculate", "auto"]):
        tel = tmp_path / "t.json"
        assert main(base + extra + ["--telemetry", str(tel)]) == 0
        assert capsys.readouterr().out == want, extra
        mets = json.loads(tel.read_text())["metrics"]
        assert {"spec_drafted_tokens", "spec_accepted_tokens", "spec_acceptance_rate", "spec_draft_s",
                "spec_verify_s"} <= set(mets)
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps({"id": str(i), "prompt": p, "max_tokens": 30, "temperature": 0.8, "seed": i})
                           + "\n" for i, p in enumerate(PROMPTS)))
    outs = []
    for extra in ([], ["--speculate", "auto", "--draft", str(q)]):
        o = tmp_path / f"o{len(outs)}.jsonl"
        assert main(["generate", str(m), "--batch", str(req), "-o", str(o), "--max-batch", "3"] + extra) == 0
        outs.append(sorted(json.loads(x)["token_ids"] for x in o.read_text().splitlines()))
    assert outs[0] == outs[1]
    for args, msg in ((["--speculate", "lookup", "--draft", str(q)], "--speculate lookup drafts without a model"),
                      (["--draft", str(q)], "--draft goes with --speculate"),
                      (["--speculate", "0"], "draft length must be in 1..16")):
        assert main(base + args) != 0
        assert msg in capsys.readouterr().err


def test_spec_bench_kind_end_to_end(data_dir, tmp_path, monkeypatch):
    """kind spec on stories260K and the tiny synthetic shape: every part runs, the tokens match,
    forced acceptance is what was asked, the break-even solves its equation; bad input refused."""
    from infeng.bench import spec_bench
    from infeng.cli.main import main
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(m)]) == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "kind": "grounded" if i % 2 else "free", "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS[:4])))
    y = tmp_path / "spec.yaml"
    y.write_text(f"kind: spec\nprompts: {prompts}\nthreads: 1\nrepeats: 1\nn: 24\nk: 3\nsynthetic: test-32k\n"
                 f"alphas: [0.0, 0.5, 1.0]\ncost_tokens: 24\n")
    out = tmp_path / "spec.json"
    assert main(["bench", "--suite", str(y), "--model", str(m), "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    recs = run["records"]
    assert all(r["same_tokens"] for r in recs if "same_tokens" in r)
    assert {r["prompt"] for r in recs if r["scenario"] == "lookup"} >= {"all grounded", "all free"}
    cost = {r["alpha"]: r for r in recs if r["scenario"] == "self_draft_cost"}
    assert cost[0.0]["acceptance"] == 0 and cost[1.0]["acceptance"] == 1 and 0 < cost[0.5]["acceptance"] < 1
    assert cost[1.0]["tokens_per_step"] == pytest.approx(4, abs=0.5)
    be = cost["break_even"]
    assert spec_bench.expected_tokens(be["break_even_alpha"], 3) == pytest.approx(be["step_cost_in_plain_steps"], rel=1e-6) \
        or be["break_even_alpha"] in (0.0, 1.0)
    assert "self_draft_grounded.acceptance" in run["metrics"]
    assert spec_bench.break_even(1.0, 4) == 0.0 and spec_bench.break_even(9.0, 4) == 1.0
    assert spec_bench.expected_tokens(spec_bench.break_even(2.0, 4), 4) == pytest.approx(2.0)
    y.write_text("kind: spec\nalphas: [1.5]\n")
    assert main(["bench", "--suite", str(y), "--model", str(m)]) == 1
    y.write_text("kind: spec\nonly: [warp]\n")
    assert main(["bench", "--suite", str(y), "--model", str(m)]) == 1
