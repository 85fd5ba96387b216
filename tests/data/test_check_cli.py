"""check_dataset and the ``python -m mgm_fast.data`` command line (export -> check round trip)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgm_fast.data.__main__ import main
from mgm_fast.data.check import check_dataset, format_summary
from mgm_fast.data.folder import FolderDataset
from mgm_fast.data.sample import DataError

ROOT = Path(__file__).resolve().parents[2]
N = 12


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "mgm_fast.data", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def synthetic():
    return pytest.importorskip("mgm_fast.data.synthetic")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic):
    """A 12-sample synthetic export in the official layout, written by the CLI."""
    out = tmp_path_factory.mktemp("export") / "official"
    r = cli("export", "--synthetic", N, "--out", out, "--layout", "official", "--size", 32, "--seed", 3)
    assert "wrote 12" in r.stdout
    return out


def test_export_check_round_trip_official(exported, synthetic):
    r = cli("check", exported, "--layout", "official")
    assert "problems: 0" in r.stdout and f"samples: {N}" in r.stdout
    summary = json.loads(cli("check", exported, "--layout", "official", "--json").stdout)
    assert summary["num_ok"] == N and summary["num_problems"] == 0
    assert sum(summary["scene_counts"].values()) == N
    assert set(summary["scene_counts"]) <= set(synthetic.SCENE_CLASSES)
    assert all(f"  {name:<24} {count}" in r.stdout for name, count in summary["scene_counts"].items())
    assert set(summary["class_pixels"]) == set(synthetic.SEG_CLASSES)
    assert 0 < summary["depth_valid_fraction"] <= 1 and 0 < summary["normal_valid_fraction"] <= 1


def test_export_matches_embedded_data(exported, synthetic):
    """The file loader gives back the embedded synthetic samples (up to 8-bit quantisation)."""
    ds = FolderDataset(exported, image_size=None)
    ref = synthetic.SyntheticScenes(N, 32, seed=3)
    assert ds.info.scene_names == tuple(synthetic.SCENE_CLASSES)
    assert ds.info.seg_class_names == tuple(synthetic.SEG_CLASSES)
    got = {ds[i]["id"].split("/", 1)[1]: ds[i] for i in range(len(ds))}
    for i in range(N):
        want = ref[i]
        g = got[want["id"]]
        assert torch.equal(g["seg"], want["seg"]) and int(g["scene"]) == int(want["scene"])
        assert torch.equal(g["depth"], want["depth"]) and torch.equal(g["depth_mask"], want["depth_mask"])
        assert torch.equal(g["normal_mask"], want["normal_mask"])
        torch.testing.assert_close(g["rgb"], want["rgb"], atol=1 / 255 + 1e-6, rtol=0)
        torch.testing.assert_close(g["normal"], want["normal"], atol=0.01, rtol=0)


def test_export_check_round_trip_mtan(tmp_path, synthetic):
    out = tmp_path / "mtan"
    cli("export", "--synthetic", N, "--out", out, "--layout", "mtan", "--size", 24, "--split", "val")
    r = cli("check", out, "--layout", "mtan", "--split", "val", "--size", 16)
    assert "problems: 0" in r.stdout and "sizes: 16x16" in r.stdout
    scenes = json.loads((out / "scenes.json").read_text())
    assert scenes["scene_names"] == list(synthetic.SCENE_CLASSES) and len(scenes["val"]) == N


def test_check_reports_every_broken_file(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    rgb = sorted((broken / "rgb").rglob("*.png"))[0]
    rgb.write_bytes(rgb.read_bytes()[:60])
    de = sorted((broken / "de").rglob("*.npy"))[-1]
    a = np.load(de)
    a[0, 0] = np.nan
    np.save(de, a)
    r = cli("check", broken, "--layout", "official", check=False)
    assert r.returncode == 1
    assert str(rgb) in r.stdout and str(de) in r.stdout and "problems: 2" in r.stdout
    assert f"ok: {N - 2}" in r.stdout

    with pytest.raises(DataError) as e:
        check_dataset(f"official:{broken}")
    assert str(rgb) in str(e.value) and str(de) in str(e.value)
    assert e.value.summary["num_ok"] == N - 2
    summary = check_dataset(f"official:{broken}", raise_on_error=False, max_problems=1)
    assert summary["num_problems"] == 2 and len(summary["problems"]) == 1
    assert "... and 1 more" in format_summary(summary)


def test_check_layout_error_and_missing_dataset(tmp_path):
    (tmp_path / "rgb" / "a").mkdir(parents=True)
    summary = check_dataset(f"official:{tmp_path}", raise_on_error=False)
    assert summary["num_problems"] == 1 and "ss" in summary["problems"][0]
    r = cli("check", tmp_path / "nothing", "--layout", "mtan", check=False)
    assert r.returncode == 1 and "nothing" in r.stdout


def test_check_dataset_object(synthetic):
    summary = check_dataset(synthetic.SyntheticScenes(3, 16, seed=1))
    assert summary["num_ok"] == 3 and summary["sizes"] == {"16x16": 3}


def test_show(exported, tmp_path, capsys):
    pytest.importorskip("mgm_fast.data.visualize")
    out = tmp_path / "sheet.png"
    assert (
        main(["show", str(exported), "--layout", "official", "--out", str(out), "-n", "3", "--size", "32"])
        == 0
    )
    assert out.exists() and "3 samples" in capsys.readouterr().out
    out2 = tmp_path / "syn.png"
    assert main(["show", "synthetic:2", "--out", str(out2), "--size", "16"]) == 0
    assert out2.exists()


def test_help_and_errors(capsys, tmp_path):
    for sub in ("export", "check", "show"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "synthetic[:N]" in capsys.readouterr().out
    assert main(["show", "official:" + str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["check", str(tmp_path)]) == 1  # a folder needs --layout
    assert "--layout" in capsys.readouterr().err
