"""python -m mgm_fast.selftest: the table, the JSON, the exit status."""

import json

import pytest
import torch

from mgm_fast import _native, selftest
from mgm_fast.ops import REGISTRY


def test_small_cases_pass_and_the_json_has_every_result(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    code = selftest.main(["--device", "cpu", "--ops", "ntxent_loss,noisy", "--sizes", "small",
                          "--dtypes", "float32", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["complete"] and report["device"]["type"] == "cpu"
    assert {r["op"] for r in report["results"]} == {"ntxent_loss", "noisy"}
    assert report["counts"]["pass"] > 0 and report["counts"]["fail"] == report["counts"]["error"] == 0
    assert "max error" in text and "passed, 0 failed, 0 errors" in text


@pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension not built")
def test_a_failing_backend_gives_exit_status_1(tmp_path, capsys, monkeypatch):
    op = REGISTRY["ntxent_loss"]
    good = op.backends["cpp"]
    wrong = type(good)(name="cpp", fn=lambda z1, z2, temperature=0.5: good.fn(z1, z2, temperature) * 1.001,
                       devices=good.devices, dtypes=good.dtypes, availability=good.availability,
                       extra_check=good.extra_check)
    monkeypatch.setitem(op.backends, "cpp", wrong)
    code = selftest.main(["--device", "cpu", "--ops", "ntxent_loss", "--backends", "cpp", "--sizes", "small",
                          "--dtypes", "float32"])
    text = capsys.readouterr().out
    assert code == 1 and "fail: out0: error" in text


def test_usage_errors_name_the_option():
    with pytest.raises(SystemExit, match=r"--ops: .*'no_such_op'"):
        selftest.main(["--device", "cpu", "--ops", "no_such_op"])
    with pytest.raises(SystemExit, match="--dtypes"):
        selftest.main(["--device", "cpu", "--dtypes", "float8"])
    if not torch.cuda.is_available():
        assert selftest.main(["--device", "cuda"]) == 2
