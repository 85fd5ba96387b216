"""python -m mgm_fast.info: versions, devices, native build status, ops x backends, models."""

import json
import subprocess
import sys

from mgm_fast import info
from mgm_fast.ops import REGISTRY
from mgm_fast.ops._dispatch import BACKEND_NAMES


def test_json_report_covers_versions_devices_and_every_op(capsys):
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"]
    assert "triton" in report["versions"] and "DALI" in report["versions"]
    assert report["devices"][0]["device"] == "cpu"
    assert set(report["ops"]) == set(REGISTRY) and REGISTRY, "no op registered"
    for status in report["ops"].values():
        assert set(status) == set(BACKEND_NAMES)
        assert status["reference"] is None  # the reference twin always runs
    if report["native"]["extension"] == "not built":
        assert report["native"]["reason"]


def test_models_report_has_the_paper_parameter_counts(capsys):
    assert info.main(["--models", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["models"]["parameters"]
    assert round(params["generator"] / 1e6, 2) == 32.49
    assert round(params["discriminator"] / 1e6, 2) == 39.52


def test_text_table_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "mgm_fast.info", "--models", "--preset", "tiny"],
                         capture_output=True, text=True, check=True).stdout
    assert "ops x backends" in out and "parameters, preset 'tiny'" in out
    for name in REGISTRY:
        assert name in out
