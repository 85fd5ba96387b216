"""The cost-model tool (mgm_fast.algocost): its non-negative least squares against an exhaustive
solve, its fits of the committed timings against the bindings' picks (the coefficients in
csrc/bindings/conv2d.cpp and genblock.cpp are this fit's), its collection through the ops' timed
mode, and its command line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mgm_fast import _native, algocost

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks/results/cpu-2core-xeon"
TIMINGS = {"conv2d": RESULTS / "conv2d/algo_timings.json", "genblock": RESULTS / "genblock/algo_timings.json"}
needs_cpp = pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")
ENV = ("MGM_FAST_CONV2D_ALGO", "MGM_FAST_GENBLOCK_ALGO", "MGM_FAST_GENBLOCK_CONV2_ALGO")


def _exhaustive_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The best least-squares solution over every support whose solution is non-negative."""
    best, best_x = np.inf, np.zeros(a.shape[1])
    for k in range(a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            x = np.zeros(a.shape[1])
            if support:
                x[list(support)] = np.linalg.lstsq(a[:, list(support)], b, rcond=None)[0]
            if (x >= 0).all() and np.linalg.norm(a @ x - b) < best:
                best, best_x = np.linalg.norm(a @ x - b), x
    return best_x


@pytest.mark.parametrize("seed", range(8))
def test_nnls_matches_an_exhaustive_solve(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(12, 5))
    b = rng.normal(size=12)
    x = algocost.nnls(a, b)
    assert (x >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(a @ x - b), np.linalg.norm(a @ _exhaustive_nnls(a, b) - b), rtol=1e-9)


@needs_cpp
@pytest.mark.parametrize("op", ["conv2d", "genblock"])
def test_fit_of_the_committed_timings_picks_what_the_bindings_pick(op, monkeypatch):
    """Fitting the committed timings again gives models whose pick for every row is the bindings'
    (auto mode): the constants in the C++ sources are this fit's, rounded to 3 or 4 digits."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    ext = _native.extension()
    ext.conv2d_algos_clear_cpu()
    ext.genblock_algos_clear_cpu()
    rows = json.loads(TIMINGS[op].read_text())["rows"]
    models = algocost.fit(op, rows)
    for row in rows:
        if op == "conv2d":
            n, cin, h, w, cout, kh, kw, sh, sw, ph, pw = row[:11]
            x = torch.empty(n, cin, h, w).contiguous(memory_format=torch.channels_last)
            weight = torch.empty(cout, cin, kh, kw).contiguous(memory_format=torch.channels_last)
            bound = ("conv", "gemm")[ext.conv2d_algo_cpu(x, weight, None, [sh, sw], [ph, pw])]
        else:
            bound = ext.genblock_algo_cpu(*row[:7])
        assert algocost.predicted_pick(op, models, row) == bound, row[:-1]
    right, total, picked, best = algocost.score(op, models, rows)
    assert (right, total) == {"conv2d": (85, 87), "genblock": (74, 76)}[op]
    assert picked <= {"conv2d": 1.005, "genblock": 1.015}[op] * best


def test_fit_recovers_a_known_model():
    """Timings made by a known non-negative model are fitted back to it: the same time for every
    row (some features are collinear -- conv2's input, output and columns -- so the coefficients
    themselves need not be unique)."""
    shapes = [[conv, n, c, c * ratio if conv == "conv1" else c, h, h, "Float"] for conv in ("conv1", "conv2")
              for n in (2, 8, 32) for c in (8, 64, 512) for ratio in (1, 2) for h in (4, 8, 16, 32)]  # fmt: skip
    truth = {"phase": [200, 1e-3, 0, 0, 7e-5, 5e-3], "gemm": [30, 0, 2e-3, 1e-3, 2e-5, 0],
             "upsample": [300, 0, 0, 4e-4, 2e-5, 3e-3], "conv": [160, 2e-3, 0, 0, 1.7e-5, 4e-3]}  # fmt: skip
    rows = []
    for shape in shapes:
        algos = algocost.ALGORITHMS[shape[0]]
        rows.append([*shape, {a: float(algocost.features("genblock", shape, a) @ truth[a]) * 1e-6 for a in algos}])
    models = algocost.fit("genblock", rows)
    for row in rows:
        for algo, seconds in row[7].items():
            fitted = float(algocost.features("genblock", row, algo) @ models[row[0]][algo]) * 1e-6
            assert fitted == pytest.approx(seconds, rel=1e-6), (row[:6], algo)


@needs_cpp
def test_collect_times_every_candidate_through_the_timed_mode(monkeypatch):
    monkeypatch.setenv("MGM_FAST_GENBLOCK_ALGO", "gemm")  # collect sets timed and puts this back
    monkeypatch.delenv("MGM_FAST_GENBLOCK_CONV2_ALGO", raising=False)
    rows = algocost.collect("genblock", [(2, 8, 6, 4), (1100, 4, 4, 16)], repeats=2)
    # the second block has a single candidate per conv (nothing timed, nothing listed)
    assert [r[:7] for r in rows] == [["conv1", 2, 8, 6, 4, 4, "Float"], ["conv2", 2, 6, 6, 8, 8, "Float"]]
    assert set(rows[0][7]) == {"phase", "gemm", "upsample"} and set(rows[1][7]) == {"conv", "gemm"}
    assert all(t > 0 for r in rows for t in r[7].values())
    import os

    assert os.environ["MGM_FAST_GENBLOCK_ALGO"] == "gemm" and "MGM_FAST_GENBLOCK_CONV2_ALGO" not in os.environ
    assert _native.extension().genblock_algos_cpu() == []
    rows = algocost.collect("conv2d", [(2, 4, 6, 6, 8, 3, 3, 1, 1, 1, 1)], repeats=1)
    assert len(rows) == 1 and rows[0][:11] == [2, 4, 6, 6, 8, 3, 3, 1, 1, 1, 1] and set(rows[0][11]) == {"conv", "gemm"}


def test_default_genblock_shapes_cover_the_presets():
    shapes = algocost.default_genblock_shapes()
    assert (8, 128, 64, 4) in shapes and (2, 8, 8, 16) in shapes  # tiny batch 8, host floor batch 2
    assert (4, 1024, 1024, 4) in shapes and (8, 128, 64, 64) in shapes  # paper batch 4 and 8
    assert len(shapes) == 46


def test_cli_fit_prints_coefficients_and_rejects_other_files(tmp_path, capsys):
    assert algocost.main(["fit", str(TIMINGS["conv2d"])]) == 0
    out = capsys.readouterr().out
    assert "conv2d conv: {197, 0.001528" in out and "fastest picked for 85 of 87 shapes" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"columns": ["n"], "rows": []}))
    with pytest.raises(SystemExit, match=r"bad\.json: 'columns' is neither"):
        algocost.main(["fit", str(bad)])
    with pytest.raises(SystemExit):
        algocost.main(["collect", "conv2d", "--out", str(tmp_path / "t.json")])
    assert "conv2d needs --shapes-from" in capsys.readouterr().err


def test_shapes_from_a_timings_file_are_what_its_rows_time():
    """``collect --shapes-from``: conv2d re-times each row's shape; genblock re-runs the block of
    each row (a conv1 row is its block's input; a conv2 row (n, c, c, 2h, 2w) the output of a
    block (n, c, c, h))."""
    rows = json.loads(TIMINGS["conv2d"].read_text())["rows"]
    assert algocost._shapes_from(TIMINGS["conv2d"], "conv2d") == sorted({tuple(r[:11]) for r in rows})
    blocks = algocost._shapes_from(TIMINGS["genblock"], "genblock")
    rows = json.loads(TIMINGS["genblock"].read_text())["rows"]
    for conv, n, cin, cout, h, _w, *_ in rows:
        assert ((n, cin, cout, h) if conv == "conv1" else (n, cout, cout, h // 2)) in blocks
    assert (8, 1024, 1024, 4) in blocks and (8, 1024, 1024, 4) in algocost.default_genblock_shapes()
