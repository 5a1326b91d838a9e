import csv
import json

import pytest

from infeng.telemetry import Run, percentile


def test_json_and_csv_share_one_schema(tmp_path):
    r = Run("test", meta={"model": "m", "nested": {"a": 1}})
    r.metrics["decode_tok_s"] = 12.5
    r.records.append({"id": "x", "tokens": 3})
    with r.span("work"):
        pass
    j = json.loads(r.write(tmp_path / "t.json").read_text())
    assert j["schema"] == "infeng.telemetry/1" and j["metrics"]["decode_tok_s"] == 12.5
    assert j["records"] == [{"id": "x", "tokens": 3}] and "work" in j["spans_s"]
    rows = list(csv.reader((tmp_path / "t.csv").open())) if r.write(tmp_path / "t.csv") else []
    assert rows[0] == ["kind", "index", "key", "value"]
    assert ["metric", "0", "decode_tok_s", "12.5"] in rows and ["record", "0", "tokens", "3"] in rows
    assert ["meta", "0", "nested", '{"a": 1}'] in rows


def test_bad_suffix(tmp_path):
    with pytest.raises(ValueError):
        Run("x").write(tmp_path / "t.txt")
    assert list(tmp_path.iterdir()) == []


def test_percentile():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
