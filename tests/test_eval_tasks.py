"""infeng eval: the HumanEval sandboxed grader, pass@k, GSM8K answer extraction, end to end on stories260K."""
import json
import time
from math import comb

import pytest

from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.evals import gsm8k as G
from infeng.evals import humaneval as H
from infeng.evals.sandbox import Limits, run_many, run_program


@pytest.fixture(scope="module")
def problems(data_dir):
    return H.load_problems(data_dir / "evals" / "HumanEval.jsonl.gz")


def test_canonical_solutions_pass_164_wrong_ones_fail(problems):
    assert len(problems) == 164
    res = H.grade(problems, [[p.canonical_solution] for p in problems], Limits(timeout_s=20), workers=4)
    m, recs = H.summarize(problems, res, [1])
    assert m["passed"] == 164 and m["pass@1"] == 1.0, [r for r in recs if r["status"] != "passed"][:3]
    # deliberately wrong: a body that returns None, and one whose syntax is broken
    wrong = [["    return None\n"] if i % 2 else ["    return (\n"] for i in range(len(problems))]
    res = H.grade(problems, wrong, Limits(timeout_s=20), workers=4)
    m, _ = H.summarize(problems, res, [1])
    assert m["passed"] == 0 and m["pass@1"] == 0.0


def test_infinite_loop_and_memory_bomb_are_killed_without_harming_the_run():
    ok = "assert sum(range(10)) == 45\n"
    codes = [ok, "while True:\n    pass\n", "import time\ntime.sleep(60)\n",
             "x = bytearray(8 * 1024**3)\n", "a = []\nwhile True:\n    a.append(bytearray(10**7))\n", ok]
    t0 = time.perf_counter()
    outs = run_many(codes, Limits(timeout_s=1.5, memory_mb=256), workers=3)
    assert time.perf_counter() - t0 < 20          # margins for a loaded machine: the limits are 1.5 s CPU, 2.5 s wall
    assert [o.status for o in outs] == ["passed", "timeout", "timeout", "memory", "memory", "passed"]
    assert all(o.seconds < 8 for o in outs)


def test_sandbox_isolation():
    o = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert o.status == "failed" and "blocked" in o.detail
    o = run_program("import os, sys\nassert 'PYTHONPATH' not in os.environ\n"
                    "assert os.path.basename(os.getcwd()).startswith('infeng-eval-')\n"
                    "assert not any('main' in p and 'work' in p for p in sys.path), sys.path\n"
                    "try:\n    import infeng\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('repo importable')\n")
    assert o.passed, o.detail
    o = run_program("import os\nos.system('true')\n")
    assert not o.passed and "blocked" in o.detail


def test_pass_at_k_unbiased_estimator():
    for n, c, k in ((10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (200, 13, 100)):
        assert H.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_truncate_at_stop_sequences():
    assert H.truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert H.truncate("    return 1\nprint(f(2))\n") == "    return 1"
    assert H.truncate("    y = 2\n    return y\nif __name__ == '__main__':\n") == "    y = 2\n    return y"
    assert H.truncate("    return [i for i in x]") == "    return [i for i in x]"


def test_subset_and_limit(problems, tmp_path):
    from pathlib import Path
    quarter = Path(__file__).resolve().parents[1] / "evals" / "subsets" / "humaneval-quarter.txt"
    sub = H.select(problems, subset=quarter)
    assert len(sub) == 41 and sub[1].task_id == "HumanEval/4"
    assert [p.task_id for p in H.select(problems, limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    bad = tmp_path / "s.txt"
    bad.write_text("HumanEval/0\nHumanEval/999\n")
    with pytest.raises(InfengError, match="HumanEval/999"):
        H.select(problems, subset=bad)


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", "42"), ("So she pays $1,234.50 in total.", "1234.5"), ("He has -7 apples left", "-7"),
    ("She paid -$5.", "-5"), ("x = 3.0", "3"), ("It costs $ 18", "18"), ("1,000,000 people came", "1000000"),
    ("First 3, then 4, finally 12.\n", "12"), ("#### 18\nand then 20", "18"), ("0.50 of a pie", "0.5"),
    ("12 + 30 = 42\n\nQuestion: what is 7?", "42"), ("no number here", None), ("He is 12345 years", "12345"),
    ("The total is 1,5", "5"), ("half is .5", "0.5"),
])
def test_gsm8k_extraction(text, want):
    assert G.extract(text) == want


def test_gsm8k_reference_answers(data_dir):
    assert G.reference_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    assert G.reference_answer("... #### 1,000") == "1000" and G.reference_answer("no marker 5") is None
    items = G.load_items(data_dir / "evals" / "gsm8k_test.jsonl")
    assert len(items) == 1319 and items[0].answer == "18"
    # the exemplars are not test questions
    qs = {it.question.strip() for it in items}
    assert not any(q in qs for q, _ in G.EXEMPLARS)
    assert all(G.extract(a) == G.reference_answer(a) for _, a in G.EXEMPLARS)
    p = G.prompt("How many?", 2)
    assert p.count("Question:") == 3 and p.endswith("Question: How many?\nAnswer:")


def test_cli_humaneval_and_gsm8k_end_to_end(data_dir, tmp_path):
    model = str(data_dir / "stories260K")
    out = tmp_path / "he.json"
    assert main(["eval", model, "--task", "humaneval", "--limit", "3", "--max-tokens", "24", "--threads", "1",
                 "--json", str(out), "--file", str(data_dir / "evals" / "HumanEval.jsonl.gz")]) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"]["humaneval.problems"] == 3 and rep["metrics"]["humaneval.pass@1"] == 0.0
    assert [r["task_id"] for r in rep["records"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    out2 = tmp_path / "gs.json"
    args = ["eval", model, "--threads", "1", "--task", "gsm8k", "--limit", "3", "--shots", "1", "--max-tokens", "16", "--seed", "3",
            "--file", str(data_dir / "evals" / "gsm8k_test.jsonl")]
    assert main(args + ["--json", str(out2)]) == 0
    m = json.loads(out2.read_text())["metrics"]
    assert m["gsm8k.problems"] == 3 and 0.0 <= m["gsm8k.accuracy"] <= 1.0 and m["gsm8k.too_long"] == 0
    assert m["gsm8k.generated_tokens"] > 0 and m["gsm8k.gen_tok_s"] > 0
    out3 = tmp_path / "gs2.json"
    assert main(args + ["--json", str(out3)]) == 0   # deterministic
    r2, r3 = (json.loads(p.read_text())["records"] for p in (out2, out3))
    assert [r["completion"] for r in r2] == [r["completion"] for r in r3]


def test_humaneval_samples_pass_at_k_deterministic_by_seed(data_dir, tmp_path):
    model = str(data_dir / "stories260K")
    args = ["eval", model, "--task", "humaneval", "--limit", "1", "--max-tokens", "12", "--samples", "2",
            "--k", "1", "--k", "2", "--temperature", "1.0", "--no-progress", "--threads", "1"]
    outs = []
    for seed, name in (("5", "a"), ("5", "b"), ("6", "c")):
        p = tmp_path / f"{name}.json"
        assert main(args + ["--seed", seed, "--json", str(p)]) == 0
        outs.append(json.loads(p.read_text()))
    m = outs[0]["metrics"]
    assert m["humaneval.samples"] == 2 and "humaneval.pass@2" in m and m["humaneval.pass@1"] <= m["humaneval.pass@2"]
    comp = [[r["completion"] for r in o["records"]] for o in outs]
    assert comp[0] == comp[1] != comp[2]


def test_cli_canonical_checks_the_sandbox(data_dir, tmp_path):
    out = tmp_path / "c.json"
    assert main(["eval", "--threads", "1", str(data_dir / "stories260K"), "--task", "humaneval", "--canonical", "--limit", "6",
                 "--file", str(data_dir / "evals" / "HumanEval.jsonl.gz"), "--json", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["humaneval.pass@1"] == 1.0 and m["humaneval.passed"] == 6 and m["humaneval.canonical"] == 1
