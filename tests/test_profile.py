"""`infeng profile`: the C pass's op timing and trace buffers, the Chrome trace, activation dumps and
the diff against the numpy reference (agreement on stories260K, a planted disagreement found at
the right layer and op). No timing assertions."""
import dataclasses
import json

import numpy as np
import pytest

from infeng.bench import profile as P
from infeng.model import activations as A
from infeng.cli.main import main
from infeng.format.schema import convert_dtype, to_f32
from infeng.model.loader import load_model

IDS = [1, 403, 407, 263, 31, 45, 100]


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(data_dir / "stories260K")


def test_traced_ops_are_the_c_librarys():
    from infeng.kernels.abi import OPS
    assert set(A.TRACED) <= set(OPS) and set(P.FAMILY) == set(OPS)


def test_profile_run_and_chrome_trace(model):
    prof = P.profile_run(model, "Once upon a time", 4, threads=2)
    assert prof.generated == 4 and len(prof.steps) == 4
    m = prof.metrics()
    assert m["forward_s"] > 0 and "python_overhead_us_per_decode_token" in m and m["cpu_s"] > 0
    ops = prof.op_seconds()
    assert set(ops) == set(P.OPS) and all(v >= 0 for v in ops.values())
    for st in prof.steps:          # every op stamped, in order
        spans = P.op_spans(st.op_times, model.config.n_layers)
        assert all(b >= a for _, _, a, b in spans) and spans[0][2] == st.op_times[0]
    tr = P.chrome_trace(prof)
    json.dumps(tr)
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 and e["name"] for e in xs)
    cats = {e["cat"] for e in xs}
    assert {"matmul", "attention", "norm"} <= cats
    layers = {e["args"]["layer"] for e in xs if e.get("cat") == "matmul" and e["name"] == "wq"}
    assert layers == set(range(model.config.n_layers))


def test_dump_matches_reference_and_saves_npy(model, tmp_path):
    acts = P.dump_activations(model, IDS, threads=2)
    assert len(acts.layers) == model.config.n_layers
    assert acts.layers[0]["w_up"].shape == (len(IDS), model.config.hidden_dim)
    d = A.diff_reference(acts, model)
    assert d.agree, d.message()
    assert "agree" in d.message()
    files = acts.save(tmp_path / "acts")
    assert (tmp_path / "acts" / "layer04.w_down.npy") in files
    x = np.load(tmp_path / "acts" / "layer04.w_down.npy", allow_pickle=False)
    np.testing.assert_array_equal(x, acts.layers[4]["w_down"])
    assert json.loads((tmp_path / "acts" / "index.json").read_text())["layers"] == 5


def test_planted_disagreement_found_at_its_layer_and_op(model):
    t = dict(model.tensors)
    dt, arr = t["layers.2.w_up"]
    w = to_f32(arr, dt).copy()
    w[5] *= 3.0                                     # one row of one matrix, on the C side only
    t["layers.2.w_up"] = (dt, np.ascontiguousarray(convert_dtype(w, "f32", dt)))
    bad = dataclasses.replace(model, tensors=t)
    d = A.diff_reference(P.dump_activations(bad, IDS, threads=2), model)
    assert not d.agree
    assert d.first_layer == 2 and d.first_op == "w_up", d.message()
    assert "layer 2, op w_up" in d.message()
    assert all(d.ops[op] < 1e-4 for op in ("attn_norm", "wq", "attention", "wo", "w_gate"))


def test_profile_cli(data_dir, tmp_path, capsys):
    tr, tel, acts = tmp_path / "t.json", tmp_path / "p.csv", tmp_path / "acts"
    rc = main(["profile", str(data_dir / "stories260K"), "--prompt", "Once upon a time", "-n", "3",
               "--threads", "1", "--trace", str(tr), "--telemetry", str(tel),
               "--dump-activations", str(acts), "--diff-reference"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "forward (C)" in err and "agree" in err
    ev = json.loads(tr.read_text())["traceEvents"]
    assert {"wq", "attention", "attn_norm"} <= {e["name"] for e in ev}
    assert (acts / "layer00.attn_norm.npy").exists() and "metric,0,forward_s" in tel.read_text()
    assert main(["profile", str(data_dir / "stories260K"), "--trace", str(tmp_path / "t.txt")]) == 1
