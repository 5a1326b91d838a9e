"""Batch jobs: the journal (torn and corrupt records, settings), resume, --restart, Ctrl-C, and
SIGKILL at random points: every request in the output exactly once, as an uninterrupted run."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.jobs.journal import Journal, decode, encode, encode_result, journal_path, line_key

PROMPTS = ["Once upon a time", "Lily", "The little dog", "Tom and Sue went to", "One day", "The sun", ""]


@pytest.fixture(scope="module")
def model(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("jobs") / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(out)]) == 0
    return out


def requests(n, tokens=(4, 12)):
    rng = random.Random(n)
    return [json.dumps({"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                        "max_tokens": rng.randint(*tokens), "temperature": 0}) for i in range(n)]


def cli(model, req, out, *extra):
    return [sys.executable, "-m", "infeng.cli.main", "generate", str(model), "--batch", str(req), "-o", str(out),
            "--max-batch", "4", "--threads", "1", "--seed", "3", *extra]


# ---- the journal -----------------------------------------------------------------------------
def test_record_checksum_detects_damage():
    line = encode({"k": "00", "r": {"id": "a", "text": "x\ny"}})
    assert line.count(b"\n") == 1 and decode(line)["r"]["text"] == "x\ny"
    assert decode(line[:-1]) is None                           # torn: no newline
    assert decode(line[:-3] + b"}\n") is None                  # torn inside, then a newline
    flipped = bytearray(line)
    flipped[20] ^= 1
    assert decode(bytes(flipped)) is None                      # a flipped bit


def test_journal_drops_torn_tail_and_bad_lines(tmp_path):
    out = tmp_path / "o.jsonl"
    j = Journal(out, {"model": "m"}, seed=1)
    for i in range(5):
        j.append(line_key(i, f"line {i}"), {"id": i})
    j.close()
    p = journal_path(out)
    lines = p.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"id": 1', b'"id": 7')          # corrupt the 2nd result
    p.write_bytes(b"".join(lines) + lines[3][:15])              # and a torn half record at the end
    j = Journal(out, {"model": "m"})
    assert (j.resumed, j.dropped, j.seed) == (4, 2, 1)
    assert not j.done(line_key(1, "line 1")) and j.done(line_key(4, "line 4"))
    j.append(line_key(1, "line 1"), {"id": 1})
    j.sync()
    assert json.loads(j.record(line_key(1, "line 1"))) == {"id": 1}
    j.close()
    assert all(decode(x) for x in p.read_bytes().splitlines(keepends=True)[3:])   # appends start clean


def test_journal_refuses_other_settings_lock_and_foreign_file(tmp_path):
    out = tmp_path / "o.jsonl"
    j = Journal(out, {"model": "m", "context": 512}, seed=1)
    with pytest.raises(InfengError, match="another infeng run is writing o.jsonl"):
        Journal(out, {"model": "m", "context": 512})
    j.close()
    with pytest.raises(InfengError, match="other context; .*--restart"):
        Journal(out, {"model": "m", "context": 256})
    with pytest.raises(InfengError, match="other seed"):
        Journal(out, {"model": "m", "context": 512}, seed=2)
    Journal(out, {"model": "m", "context": 256}, restart=True).close()
    journal_path(out).write_text("something else\n")
    with pytest.raises(InfengError, match="not an infeng journal"):
        Journal(out, {"model": "m"})


def test_output_record_is_sliced_from_its_journal_line(tmp_path):
    """A result's record is journaled in the output's JSON form and assembled as those bytes; a
    journal from before (record as an object under "r") still assembles."""
    rec = {"id": "é", "text": "a\nb \"c\"", "token_ids": [1, 2], "usage": {"total_tokens": 3}}
    k1, k2 = line_key(1, "x"), line_key(2, "y")
    line = encode_result(k1, rec)
    assert decode(line) == {"k": k1.hex(), "o": rec}
    out = tmp_path / "o.jsonl"
    j = Journal(out, {"model": "m"}, seed=1)
    j.append_lines([(k1, line)])
    j.close()
    p = journal_path(out)
    head, body = p.read_bytes().split(b"\n", 1)           # what an older infeng wrote: format /1, "r"
    p.write_bytes(encode({**decode(head + b"\n"), "journal": "infeng.journal/1"}) + body
                  + encode({"k": k2.hex(), "r": rec}))
    j = Journal(out, {"model": "m"})
    assert j.resumed == 2
    want = json.dumps(rec, ensure_ascii=False).encode() + b"\n"
    assert j.record(k1) == want == j.record(k2)
    j.close()


def test_torn_header_alone_starts_afresh(tmp_path):
    out = tmp_path / "o.jsonl"
    journal_path(out).write_bytes(encode({"journal": "infeng.journal/1", "settings": {}})[:20])
    j = Journal(out, {"model": "m"}, seed=4)
    assert (j.resumed, j.seed) == (0, 4)
    j.close()
    assert decode(journal_path(out).read_bytes())["settings"] == {"model": "m"}


def test_line_key_is_id_and_text():
    a = '{"id": "a", "prompt": "x"}'
    assert line_key(1, a) == line_key(9, a)                       # moved: same request
    assert line_key(1, a) != line_key(1, a.replace("x", "y"))     # edited: recomputed
    nid = '{"prompt": "x"}'
    assert line_key(1, nid) != line_key(2, nid)                   # no id: its line number is its id


# ---- end to end ------------------------------------------------------------------------------
def test_batch_output_in_order_with_errors(model, tmp_path, capsys):
    req, out = tmp_path / "r.jsonl", tmp_path / "o.jsonl"
    lines = requests(12)
    lines[3] = "{not json"
    lines[7] = json.dumps({"id": "big", "prompt": "x", "max_tokens": -1})
    req.write_bytes(("\n".join(lines[:9]) + "\n\n" + "\n".join(lines[9:]) + "\n").encode() + b'{"id": "\xff"}\n')
    assert main(["generate", str(model), "--batch", str(req), "-o", str(out), "--max-batch", "3", "--window", "4",
                 "--seed", "3"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 13 and [r["id"] for r in rows[:3]] == ["r0", "r1", "r2"]
    assert "not valid JSON" in rows[3]["error"] and ":4:" in rows[3]["error"]
    assert "max_tokens" in rows[7]["error"] and rows[7]["id"] == "big"
    assert "not UTF-8" in rows[12]["error"] and ":14:" in rows[12]["error"]
    assert all("text" in r for i, r in enumerate(rows) if i not in (3, 7, 12))
    assert not journal_path(out).exists() and not list(tmp_path.glob(".o.jsonl*"))


def test_interrupt_resume_edit_and_restart(model, tmp_path):
    req, out = tmp_path / "r.jsonl", tmp_path / "o.jsonl"
    n = 1000                       # long enough that a loaded machine still signals it mid-run
    lines = requests(n, tokens=(20, 40))
    req.write_text("\n".join(lines) + "\n")
    p = subprocess.Popen(cli(model, req, out), stderr=subprocess.PIPE, text=True)
    _wait_for_records(journal_path(out), 20)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "interrupted" in err and "rerun the same command" in err, err
    assert not out.exists() and journal_path(out).exists()
    # edit a line the first run finished: it is recomputed, the others are skipped
    lines[0] = lines[0].replace("Once upon a time", "The cat")
    req.write_text("\n".join(lines) + "\n")
    r = subprocess.run(cli(model, req, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    skipped = int(r.stderr.split(" request(s) skipped")[0].split()[-1])
    assert 20 <= skipped < n
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == [f"r{i}" for i in range(n)]
    fresh = tmp_path / "fresh.jsonl"
    assert subprocess.run(cli(model, req, fresh), capture_output=True, timeout=600).returncode == 0
    assert out.read_text() == fresh.read_text()                 # the edited line's text too
    # --restart ignores a journal; a journal of other settings is refused by name
    p = subprocess.Popen(cli(model, req, out), stderr=subprocess.PIPE, text=True)
    _wait_for_records(journal_path(out), 20)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 130
    r = subprocess.run(cli(model, req, out, "--max-tokens", "5"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "other defaults" in r.stderr and "--restart" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cli(model, req, out, "--restart"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "request(s) skipped" not in r.stderr
    assert out.read_text() == fresh.read_text()


def test_sigkill_at_random_points_loses_and_repeats_nothing(model, tmp_path):
    """Kill -9 a job at random points (some while it starts, most while it journals); every
    request ends in the output exactly once with the uninterrupted run's text (greedy)."""
    req, ref, out = tmp_path / "r.jsonl", tmp_path / "ref.jsonl", tmp_path / "o.jsonl"
    req.write_text("\n".join(requests(3000)) + "\n")     # seconds of work even on a quiet machine
    t0 = time.perf_counter()
    assert subprocess.run(cli(model, req, ref), capture_output=True, timeout=600).returncode == 0
    full = time.perf_counter() - t0
    rng = random.Random(19)
    kills, seen = 0, []
    for point in range(8):
        p = subprocess.Popen(cli(model, req, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if point == 0:
            time.sleep(rng.uniform(0.05, 0.5))                    # during start-up
        else:
            before = journal_path(out).read_bytes().count(b"\n") if journal_path(out).exists() else 0
            _wait_for_records(journal_path(out), before + rng.randint(1, 100), stop=p)
            time.sleep(rng.uniform(0, full / 20))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
        if out.exists() or kills == 6:
            break
        seen.append(journal_path(out).read_bytes().count(b"\n") if journal_path(out).exists() else 0)
    assert kills >= 3 and len(set(seen)) >= 3, seen        # killed at different points of the work
    r = subprocess.run(cli(model, req, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == ref.read_text()
    assert not journal_path(out).exists()


def _wait_for_records(path: Path, n: int, stop=None, timeout: float = 120) -> None:
    """Until ``path`` holds at least ``n`` results (or the process ``stop`` has ended)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if stop is not None and stop.poll() is not None:
            return
        try:
            if path.read_bytes().count(b"\n") > n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{path}: fewer than {n} records after {timeout} s")


def test_several_inputs_into_a_directory(model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for name, n in (("a.jsonl", 3), ("b.jsonl", 5)):
        (tmp_path / "in" / name).write_text("\n".join(requests(n)) + "\n")
    assert main(["generate", str(model), "--batch", str(tmp_path / "in" / "*.jsonl"), "-o", str(tmp_path / "out"),
                 "--seed", "3"]) == 0
    assert [len((tmp_path / "out" / f).read_text().splitlines()) for f in ("a.jsonl", "b.jsonl")] == [3, 5]


@pytest.mark.parametrize("args, message", [
    (["--batch", "{d}/none.jsonl", "-o", "{d}/o.jsonl"], "none.jsonl: no such file"),
    (["--batch", "{d}/*.nothing", "-o", "{d}/o"], "no file matches"),
    (["--batch", "s3://bucket/x.jsonl", "-o", "{d}/o.jsonl"], "mount the bucket"),
    (["--batch", "{d}/r*.jsonl", "-o", "{d}/missing/"], "must be an existing directory"),
    (["--batch", "{d}/r1.jsonl", "-o", "{d}/r1.jsonl"], "is the input file itself"),
    (["--batch", "{d}/r1.jsonl", "-o", "{d}/o.jsonl", "--window", "0"], "--window must be >= 1"),
    (["--batch", "{d}/r1.jsonl", "-o", "{d}/o.jsonl", "--shard-size", "4"], "go with --ray"),
    (["-p", "x", "--restart"], "go with --batch"),
    (["--batch", "{d}/r1.jsonl", "-o", "{d}/o.jsonl", "--ray", "auto", "--threads", "2"], "--threads is for local runs"),
])
def test_bad_job_options_one_line(model, tmp_path, capsys, args, message):
    for name in ("r1.jsonl", "r2.jsonl"):
        (tmp_path / name).write_text(requests(1)[0] + "\n")
    args = [a.format(d=tmp_path) for a in args]
    if "--ray" in args:
        pytest.importorskip("ray")
    assert main(["generate", str(model), *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("*.journal"))


def test_ray_without_the_extra_names_it(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # as if not installed
    (tmp_path / "r.jsonl").write_text(requests(1)[0] + "\n")
    assert main(["generate", str(model), "--batch", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                 "--ray", "auto"]) == 1
    assert "pip install 'infeng[ray]'" in capsys.readouterr().err
