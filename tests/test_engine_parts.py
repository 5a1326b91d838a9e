"""The engine's parts on their own: text streaming (stop strings, holdback), the timing hooks,
the batch packer's one grouping by adapter."""
from types import SimpleNamespace

import pytest

from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.hooks import PHASES
from infeng.runtime.packer import by_adapter
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.textstream import TextStream


class _Pieces:
    """A decoder whose tokens are given strings (ids index PIECES); flush returns a held tail."""
    PIECES = ["Hel", "lo", " wor", "ld", "!", " ST", "OP", " more"]

    def __init__(self, tail=""):
        self.tail = tail

    def push(self, tok):
        return self.PIECES[tok]

    def flush(self):
        t, self.tail = self.tail, ""
        return t


def _run(stream, toks):
    out, hit = [], False
    for i, t in enumerate(toks):
        hit = stream.push(t)
        out.append(stream.delta(final=hit or i == len(toks) - 1))
        if hit:
            break
    return out, hit


def test_stop_string_cut_and_held_back():
    s = TextStream(_Pieces(), stop=["STOP"])
    out, hit = _run(s, [0, 1, 2, 5, 6, 7])
    assert hit and s.text == "Hello wor " and "".join(out) == "Hello wor "
    assert out[3] == " "                   # "ST" could still become "STOP": held back


def test_holdback_released_when_no_stop_follows():
    s = TextStream(_Pieces(), stop=["STOP"])
    out, hit = _run(s, [0, 5, 3])          # "Hel ST" then "ld": not a stop after all
    assert not hit and out == ["Hel", " ", "STld"]


def test_flush_after_stop_adds_nothing():
    s = TextStream(_Pieces(tail="xyz"), stop=["wor"])
    assert not s.push(0) and s.push(2)
    s.flush()
    assert s.text == "Hel "
    s2 = TextStream(_Pieces(tail="xyz"))
    s2.push(0)
    s2.flush()
    assert s2.text == "Helxyz"


def test_by_adapter_groups_in_order_of_first_appearance():
    a, b = object(), object()
    seqs = [SimpleNamespace(n=i, adapter=x) for i, x in enumerate([a, None, b, a, None, b, a])]
    assert [s.n for s in by_adapter(seqs)] == [0, 3, 6, 1, 4, 2, 5]


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(data_dir / "stories260K-f32")


def test_hooks_see_every_phase_in_order(model):
    eng = Engine(model, threads=1, max_batch=2)
    seen = []
    off = eng.hooks.subscribe(lambda phase, edge, info: seen.append((phase, edge, dict(info))))
    reqs = [Request(id=str(i), prompt="Once upon a time", params=SamplingParams(max_tokens=3, temperature=0))
            for i in range(2)]
    results = list(eng.generate(reqs))
    assert len(results) == 2
    assert {p for p, _, _ in seen} == set(PHASES)
    steps = [i for i, (p, e, _) in enumerate(seen) if (p, e) == ("step", "begin")]
    assert len(steps) == eng.stats.steps
    first = [(p, e) for p, e, _ in seen[steps[0]:steps[1]]]
    assert first == [("step", "begin"), ("schedule", "begin"), ("schedule", "end"), ("pack", "begin"),
                     ("pack", "end"), ("forward", "begin"), ("forward", "end"), ("sample", "begin"),
                     ("sample", "end"), ("sample", "begin"), ("sample", "end"), ("step", "end")]
    fwd = [info for p, e, info in seen if (p, e) == ("forward", "end")]
    assert sum(i["T"] for i in fwd) == eng.stats.batch_tokens and fwd[-1]["n_out"] == 2
    off()
    n = len(seen)
    list(eng.generate([Request(id="x", prompt="Lily", params=SamplingParams(max_tokens=2, temperature=0))]))
    assert len(seen) == n                  # unsubscribed: nothing more
