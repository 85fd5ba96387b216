"""python -m mgm_fast.info: versions, devices, native build status, ops x backends, models."""

import json
import subprocess
import sys

import pytest

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


def test_lock_pins_every_listed_dependency():
    """requirements/lock.txt pins everything requirements/cpu.txt and pyproject ask for."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = info.LOCK_FILE.parents[1]
    pins = {name.lower().replace("_", "-") for name in info.read_lock(info.LOCK_FILE)}
    listed = [line.split("#")[0].strip() for line in (root / "requirements" / "cpu.txt").read_text().splitlines()]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    listed += project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in listed if spec}
    assert names and names <= pins, sorted(names - pins)


def test_lock_differences_name_each_package(tmp_path):
    import importlib.metadata

    lock = tmp_path / "lock.txt"
    torch_version = importlib.metadata.version("torch")
    lock.write_text(f"# header\ntorch=={torch_version}\nnumpy==0.0.1  # too old\nno-such-package-xyz==1.0\n")
    differences = info.lock_differences(lock)
    assert len(differences) == 2
    assert differences[0].startswith("numpy ") and "the lock has 0.0.1" in differences[0]
    assert differences[1] == "no-such-package-xyz is not installed (locked 1.0)"
    assert info.lock_differences(tmp_path / "absent.txt") is None
    lock.write_text("torch>=2.4\n")
    with pytest.raises(ValueError, match=r"lock.txt:1: expected 'name==version'"):
        info.read_lock(lock)


def test_text_report_warns_about_a_different_environment(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\n")
    monkeypatch.setattr(info, "LOCK_FILE", lock)
    assert info.main([]) == 0
    err = capsys.readouterr().err
    assert "WARNING: this environment differs" in err and "numpy" in err and "0.0.1" in err
