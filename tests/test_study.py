"""python -m mgm_fast.study: runs the grid, skips finished runs, writes mean ± std and delta-m."""

import json

from mgm_fast import study

ARGS = "--data synthetic:40 --steps 1 --set schedule.batch_size=4 --tasks seg,depth"


def test_grid_table_delta_m_and_skipping(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--methods", "st,mt", "--regimes", "0.5", "--seeds", "0,1", "--out", str(out), "--train-args", ARGS]
    assert study.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(": trained") == 4
    for method in ("st", "mt"):
        for seed in (0, 1):
            assert (out / method / "r0.5" / f"s{seed}" / "eval.json").exists()
    data = json.loads((out / "study.json").read_text())
    rows = data["0.5"]["table"]["rows"]
    assert set(rows) == {"st", "mt"} and rows["mt"]["seg/miou"]["n"] == 2
    dm = data["0.5"]["delta_m"]["mt"]
    assert dm["n"] == 2 and isinstance(dm["mean"], float)
    assert "±" in (out / "study.md").read_text()

    assert study.main(argv) == 0  # everything finished: nothing is trained again
    assert capsys.readouterr().out.count(": done") == 4
