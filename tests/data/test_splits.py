"""Seeded splits and nested labelled-data regimes (mgm_fast.data.splits)."""

import itertools
import json
import math
import random

import pytest

from mgm_fast.data.splits import (
    Split,
    SplitError,
    make_split,
    released_counts,
    released_split,
)


def _ids(n, prefix="img"):
    return [f"{prefix}_{i:05d}" for i in range(n)]


def _parts(split):
    return split.train_labelled, split.train_weak, split.val, split.test


def test_same_seed_same_split_and_input_order_irrelevant():
    ids = _ids(500)
    a = make_split(ids, seed=3, test_fraction=0.1)
    b = make_split(ids, seed=3, test_fraction=0.1)
    assert a == b
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    c = make_split(shuffled, seed=3, test_fraction=0.1)
    for x, y in zip(_parts(a), _parts(c)):
        assert set(x) == set(y)


def test_different_seeds_differ():
    ids = _ids(500)
    a = make_split(ids, seed=0)
    b = make_split(ids, seed=1)
    assert set(a.val) != set(b.val)
    assert set(a.train_labelled) != set(b.train_labelled)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1449])
@pytest.mark.parametrize(
    ("val", "test", "lab"), [(0.2, 0.0, 0.5), (0.1, 0.2, 0.25), (0.0, 0.0, 1.0), (0.3, 0.3, 0.0)]
)
def test_disjoint_coverage_and_counts(n, val, test, lab):
    ids = _ids(n)
    s = make_split(ids, seed=11, val_fraction=val, test_fraction=test, labelled_fraction=lab)
    parts = _parts(s)
    assert sum(len(p) for p in parts) == n
    assert set().union(*map(set, parts)) == set(ids)
    n_test = math.floor(round(test * 10) * n / 10)
    n_val = math.floor(round(val * 10) * n / 10)
    n_train = n - n_test - n_val
    assert (len(s.test), len(s.val), len(s.train)) == (n_test, n_val, n_train)
    assert len(s.train_labelled) == math.ceil(round(lab * 100) * n_train / 100)
    # every list follows the dataset's order
    rank = {i: k for k, i in enumerate(ids)}
    for p in parts:
        assert [rank[i] for i in p] == sorted(rank[i] for i in p)


def test_fraction_rounding_is_exact_on_decimals():
    # 0.7 * 10 is 7.000000000000001 in floating point; the split must still take 3 for val.
    s = make_split(_ids(10), seed=0, val_fraction=0.3, labelled_fraction=0.7)
    assert len(s.val) == 3 and len(s.train) == 7
    assert len(s.train_labelled) == 5  # ceil(0.7 * 7) = ceil(4.9)


def test_released_counts_for_nyuv2():
    assert released_counts(1449) == {"train": 1160, "train_labelled": 580, "train_weak": 580, "val": 289}
    s = released_split(1449)
    assert (len(s.train), len(s.train_labelled), len(s.train_weak), len(s.val), len(s.test)) == (
        1160,
        580,
        580,
        289,
        0,
    )
    assert s.seed == 42 and s.labelled_fraction == 0.5 and s.val_fraction == 0.2
    for n in (1, 5, 33, 1000, 1451):
        s = released_split(n)
        c = released_counts(n)
        assert len(s.train) == c["train"] == math.ceil(0.8 * n - 1e-9)
        assert len(s.train_labelled) == c["train_labelled"]


def test_regimes_are_nested():
    ids = _ids(800)
    fractions = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    for seed in (0, 1, 2):
        splits = [make_split(ids, seed, test_fraction=0.1, labelled_fraction=f) for f in fractions]
        for small, big in itertools.pairwise(splits):
            assert set(small.train_labelled) < set(big.train_labelled)
            assert small.val == big.val and small.test == big.test and set(small.train) == set(big.train)


def test_regimes_nested_with_scenes_and_fixed():
    ids = _ids(300)
    scenes = [i % 7 for i in range(300)]
    fixed = {"train": ids[:200], "test": ids[200:]}
    prev = set()
    for f in (0.02, 0.1, 0.3, 0.6, 1.0):
        s = make_split(ids, 5, labelled_fraction=f, fixed=fixed, scenes=scenes)
        assert prev <= set(s.train_labelled)
        prev = set(s.train_labelled)


def test_fixed_partition_honoured():
    ids = _ids(1449)
    fixed = {"train": ids[:795], "test": ids[795:]}
    s = make_split(ids, seed=4, labelled_fraction=0.25, fixed=fixed)
    assert set(s.train) == set(ids[:795]) and s.test == ids[795:] and s.val == []
    assert len(s.train_labelled) == math.ceil(0.25 * 795)
    assert s.fixed and s.test_fraction == pytest.approx(654 / 1449)
    with_val = make_split(ids, 4, fixed={"train": ids[:700], "val": ids[700:795], "test": ids[795:]})
    assert with_val.val == ids[700:795]


def test_fixed_partition_errors():
    ids = _ids(10)
    with pytest.raises(SplitError, match=r"missing from the dataset.*'nope'"):
        make_split(ids, 0, fixed={"train": [*ids[:5], "nope"], "test": ids[5:]})
    with pytest.raises(SplitError, match=r"unassigned.*img_00009"):
        make_split(ids, 0, fixed={"train": ids[:5], "test": ids[5:9]})
    with pytest.raises(SplitError, match="shares"):
        make_split(ids, 0, fixed={"train": ids[:6], "test": ids[5:]})
    with pytest.raises(SplitError, match="'train' and 'test'"):
        make_split(ids, 0, fixed={"train": ids})
    with pytest.raises(SplitError, match="fixed partition"):
        make_split(ids, 0, val_fraction=0.1, fixed={"train": ids[:5], "test": ids[5:]})


def test_bad_arguments():
    with pytest.raises(SplitError, match=r"duplicate ids.*'a'"):
        make_split(["a", "b", "a"], 0)
    with pytest.raises(SplitError, match="no ids"):
        make_split([], 0)
    with pytest.raises(SplitError, match="labelled_fraction"):
        make_split(_ids(5), 0, labelled_fraction=1.5)
    with pytest.raises(SplitError, match="<= 1"):
        make_split(_ids(5), 0, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(SplitError, match="scenes has 2 labels for 5 ids"):
        make_split(_ids(5), 0, scenes=[0, 1])
    with pytest.raises(SplitError, match="seed"):
        make_split(_ids(5), 0.5)


def test_manifest_round_trip(tmp_path):
    ids = _ids(120)
    s = make_split(ids, seed=9, val_fraction=0.1, test_fraction=0.2, labelled_fraction=0.3)
    s.extra["dataset"] = "synthetic"
    text = s.to_json()
    assert json.loads(text)["counts"] == s.counts()
    assert Split.from_json(text) == s
    path = tmp_path / "run" / "split.json"
    s.to_json(path)
    assert path.read_text() == text
    assert Split.from_json(path, dataset_ids=ids) == s
    assert Split.from_json(str(path), dataset_ids=ids) == s
    assert list(tmp_path.joinpath("run").iterdir()) == [path]  # no temp file left behind


def test_manifest_missing_ids_listed(tmp_path):
    ids = _ids(50)
    s = make_split(ids, seed=1)
    path = tmp_path / "split.json"
    s.to_json(path)
    dataset = [i for i in ids if i not in ("img_00003", "img_00042")]
    with pytest.raises(
        SplitError, match=r"missing from the dataset: 2 id\(s\): 'img_00003', 'img_00042'"
    ) as err:
        Split.from_json(path, dataset_ids=dataset)
    assert str(path) in str(err.value)


def test_manifest_corrupt(tmp_path):
    s = make_split(_ids(20), seed=1)
    data = s.to_dict()
    data["val"] = [*data["val"], data["train_labelled"][0]]
    with pytest.raises(SplitError, match="shares or repeats"):
        Split.from_dict(data)
    data = s.to_dict()
    data["counts"]["val"] += 1
    with pytest.raises(SplitError, match="counts"):
        Split.from_dict(data)
    with pytest.raises(SplitError, match="not a split manifest"):
        Split.from_json('{"format": "other"}')
    bad = tmp_path / "bad.json"
    bad.write_text("{ truncated")
    with pytest.raises(SplitError, match="invalid JSON"):
        Split.from_json(bad)
    with pytest.raises(SplitError, match="cannot read"):
        Split.from_json(tmp_path / "absent.json")


def test_stratification_keeps_every_scene():
    rng = random.Random(0)
    ids = _ids(400)
    # 12 scenes of very different sizes, some with a single image
    sizes = [150, 80, 60, 40, 30, 20, 10, 4, 2, 2, 1, 1]
    scenes = [s for s, k in enumerate(sizes) for _ in range(k)]
    rng.shuffle(scenes)
    fixed = {"train": ids[:300], "test": ids[300:]}
    train_scenes = {scenes[i] for i in range(300)}
    for seed in range(5):
        for frac in (0.04, 0.1, 0.5):
            s = make_split(ids, seed, labelled_fraction=frac, fixed=fixed, scenes=scenes)
            n_lab = len(s.train_labelled)
            assert n_lab >= len(train_scenes)
            got = {scenes[int(i.split("_")[1])] for i in s.train_labelled}
            assert got == train_scenes, (seed, frac)
    # too few labelled images for all scenes: each labelled image is a different scene
    s = make_split(ids, 0, labelled_fraction=0.02, fixed=fixed, scenes=scenes)
    lab_scenes = [scenes[int(i.split("_")[1])] for i in s.train_labelled]
    assert len(lab_scenes) == 6 and len(set(lab_scenes)) == 6


def test_stratification_is_proportional():
    ids = _ids(1000)
    scenes = [0] * 600 + [1] * 300 + [2] * 100
    s = make_split(ids, 2, val_fraction=0.2, labelled_fraction=0.5, scenes=scenes)
    by_scene = lambda part: [sum(scenes[int(i.split("_")[1])] == k for i in part) for k in range(3)]  # noqa: E731
    assert all(abs(a - b) <= 1 for a, b in zip(by_scene(s.val), [120, 60, 20]))
    assert all(abs(a - b) <= 2 for a, b in zip(by_scene(s.train_labelled), [240, 120, 40]))
    # without scenes the same split is only proportional in expectation
    plain = make_split(ids, 2, val_fraction=0.2, labelled_fraction=0.5)
    assert not plain.stratified and s.stratified
