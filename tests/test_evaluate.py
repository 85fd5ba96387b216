"""python -m mgm_fast.evaluate on a run folder, on our checkpoint files and on a released checkpoint."""

import json

import pytest
import torch

from mgm_fast import evaluate, train
from mgm_fast.compat import save_released


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert train.main(["--data", "synthetic:40", "--steps", "2", "--quiet", "--out", str(out),
                       "--set", "schedule.batch_size=4"]) == 0
    return out


def test_run_folder_reproduces_the_training_evaluation(run_dir, capsys):
    assert evaluate.main([str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((run_dir / "eval.json").read_text())


def test_checkpoint_and_weights_files(run_dir, capsys):
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    for source in (ckpt, run_dir / "final_weights.pt"):
        assert evaluate.main([str(source), "--data", "synthetic:40", "--split", "all", "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert 0.0 <= metrics["seg/pix_acc"] <= 1.0 and metrics["depth/abs_err"] > 0


def test_released_checkpoint_through_the_importer(run_dir, tmp_path, capsys):
    weights = torch.load(run_dir / "final_weights.pt", weights_only=True)
    from mgm_fast.config import from_dict
    from mgm_fast.models import build_models

    nets = build_models(from_dict(weights["config"]).model)
    nets.load_state_dict(weights["nets"])
    path = save_released(nets, tmp_path / "released.pth")
    assert evaluate.main([str(path), "--data", "synthetic:40", "--json"]) == 0
    released = json.loads(capsys.readouterr().out)
    assert evaluate.main([str(run_dir / "final_weights.pt"), "--data", "synthetic:40", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert released == ours  # same weights, same numbers


def test_evaluation_refuses_a_loader_in_mid_epoch():
    from mgm_fast.config import preset
    from mgm_fast.data.loader import make_loader
    from mgm_fast.data.registry import open_dataset
    from mgm_fast.evaluate import evaluate_nets
    from mgm_fast.models import build_models

    cfg = preset("tiny").model
    dataset, info = open_dataset("synthetic:12", cfg.image_size)
    loader = make_loader(dataset, list(range(12)), 4, "cpu", seed=0, shuffle=False, drop_last=False)
    nets = build_models(cfg)
    full = evaluate_nets(nets, loader, info.num_seg_classes, info.num_scenes, with_scene=False)
    assert evaluate_nets(nets, loader, info.num_seg_classes, info.num_scenes, with_scene=False) == full
    next(iter(loader))
    with pytest.raises(RuntimeError, match="1 batches into an epoch"):
        evaluate_nets(nets, loader, info.num_seg_classes, info.num_scenes, with_scene=False)
