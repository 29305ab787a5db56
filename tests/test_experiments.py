"""The study runner of `experiments/` (issue 12): files, columns, resumption.

These tests check the runner, not the accuracies: `--quick` trains tiny
networks for two epochs.
"""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _runs(folder):
    runs = os.path.join(folder, "runs")
    return {
        name: os.stat(os.path.join(runs, name)).st_mtime_ns
        for name in os.listdir(runs)
        if name.endswith(".json")
    }


def test_quick_study_writes_reports_and_resumes(tmp_path):
    from experiments.report import PAIRED_COLUMNS
    from experiments.report import RUN_COLUMNS

    results = str(tmp_path / "results")
    first = _run("methods", "--quick", "--results", results)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = os.path.join(results, "methods")
    # 2 methods (standard, joint) x 2 seeds.
    assert "study methods: 4 runs, 0 already done" in first.stdout
    assert "4 new" in first.stdout
    for name in ("runs.csv", "summary.csv", "paired.csv", "table.md",
                 "accuracy_by_head.png", "cost.csv", "cost.md"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    with open(os.path.join(folder, "accuracy_by_head.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(folder, "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == RUN_COLUMNS
    assert len(rows) == 4 * 3  # one row per run and head (3 heads)
    assert sorted({(r["method"], r["seed"]) for r in rows}) == [
        ("joint", "0"), ("joint", "1"), ("standard", "0"), ("standard", "1")]
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert float(r["step_seconds"]) > 0
        assert r["failed"] in ("True", "False")
    standard = [r for r in rows if r["method"] == "standard"]
    assert all(float(r["head_train_seconds"]) > 0 for r in standard)
    with open(os.path.join(folder, "paired.csv")) as f:
        pairs = list(csv.DictReader(f))
    assert tuple(pairs[0]) == PAIRED_COLUMNS
    # joint - standard on each of the 3 heads, over the 2 shared seeds.
    assert [(p["a"], p["b"], p["head"], p["n_pairs"]) for p in pairs] == [
        ("joint", "standard", str(h), "2") for h in range(3)]
    table = open(os.path.join(folder, "table.md")).read()
    assert "| standard |" in table and "| joint |" in table
    runs = _runs(folder)
    assert len(runs) == 4

    second = _run("methods", "--quick", "--results", results)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "study methods: 4 runs, 4 already done" in second.stdout
    assert "0 new" in second.stdout
    assert _runs(folder) == runs  # nothing redone, nothing rewritten

    # An interrupted study: one run's file is missing; only it is redone.
    lost = sorted(runs)[0]
    with open(os.path.join(folder, "runs", lost)) as f:
        lost_row = json.load(f)
    os.remove(os.path.join(folder, "runs", lost))
    third = _run("methods", "--quick", "--results", results)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "4 runs, 3 already done" in third.stdout and "1 new" in third.stdout
    after = _runs(folder)
    assert sorted(after) == sorted(runs)
    assert {k: v for k, v in after.items() if k != lost} == {
        k: v for k, v in runs.items() if k != lost}
    with open(os.path.join(folder, "runs", lost)) as f:
        redone = json.load(f)
    # The same run again (same seed, same data order): the same accuracies.
    assert redone["config"] == lost_row["config"]
    np.testing.assert_allclose(redone["test_accuracy"], lost_row["test_accuracy"],
                               atol=1e-6)
    assert not [n for n in os.listdir(os.path.join(folder, "runs"))
                if n.startswith(".tmp")]


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    bad = _run("nonsense", "--results", str(tmp_path), timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: `study` must be one of pilot, resnet56_5, resnet_depth, "
        "resnet56_nu, methods, depth, nu, losses, cost, cifar10_resnet56. "
        "Received: 'nonsense'"]
    missing = str(tmp_path / "no_such_dir")
    cifar = _run("cifar10_resnet56", "--data-dir", missing,
                 "--results", str(tmp_path), timeout=120)
    assert cifar.returncode == 2
    lines = cifar.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cifar.stderr
    assert "needs a local tensorflow-datasets copy of CIFAR-10" in lines[0]
    assert f"Received: --data-dir={missing!r}" in lines[0]
    assert not os.path.exists(os.path.join(tmp_path, "cifar10_resnet56"))


def test_paired_statistics_match_hand_computation():
    from experiments.report import paired

    # d = a - b = (1, 2, 3): mean 2, sd 1, t_{0.975, 2} = 4.302652729911275.
    p = paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert p["n_pairs"] == 3 and p["mean_diff"] == pytest.approx(2.0)
    assert p["ci95_low"] == pytest.approx(2.0 - half)
    assert p["ci95_high"] == pytest.approx(2.0 + half)
    assert (p["a_wins"], p["b_wins"], p["ties"]) == (3, 0, 0)
    assert p["sign_test_p"] == pytest.approx(0.25)  # 2 * 0.5 ** 3
    # A failed (NaN) run drops its pair from the statistics, not the row.
    p = paired([1.0, float("nan"), 0.0, 0.5], [0.0, 0.0, 1.0, 0.5])
    assert (p["n_pairs"], p["a_wins"], p["b_wins"], p["ties"]) == (3, 1, 1, 1)
    assert p["sign_test_p"] == pytest.approx(1.0)


def test_warmup_step_decay_schedule():
    import keras

    from keras_mwbp import WarmupStepDecay

    schedule = WarmupStepDecay(0.1, warmup_steps=4, decay_steps=[10, 15])
    got = [float(schedule(s)) for s in (0, 1, 3, 4, 9, 10, 14, 15, 100)]
    want = [0.025, 0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    again = WarmupStepDecay.from_config(schedule.get_config())
    assert float(again(12)) == pytest.approx(0.01)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    assert float(optimizer.learning_rate) == pytest.approx(0.025)  # step 0
    with pytest.raises(ValueError, match="strictly increasing"):
        WarmupStepDecay(0.1, 1, [5, 5])


def test_resumption_logic_without_training(tmp_path, monkeypatch):
    """run_study with a stand-in trainer: finished runs are never redone."""
    from experiments import run
    from experiments import runner

    calls, methods = [], []

    def fake_execute_group(configs, on_row):
        for config in configs:
            calls.append(config["seed"])
            methods.append(config)
            on_row(_fake_row(runner, config, final=0.4 + 0.1 * config["seed"]))

    monkeypatch.setattr(runner, "execute_group", fake_execute_group)
    results = str(tmp_path)
    assert run.run_study("methods", True, results) == 4
    assert calls == [0, 1, 0, 1]
    assert [c["method"] for c in methods] == ["standard", "standard", "joint", "joint"]
    assert run.run_study("methods", True, results) == 0
    assert calls == [0, 1, 0, 1]
    folder = os.path.join(results, "methods", "runs")
    name = sorted(os.listdir(folder))[0]
    with open(os.path.join(folder, name)) as f:
        seed = json.load(f)["config"]["seed"]
    os.remove(os.path.join(folder, name))
    assert run.run_study("methods", True, results) == 1
    assert calls == [0, 1, 0, 1, seed]
    # A run that another study finished with the same config is copied.
    assert run.run_study("cost", True, results) == 0
    assert len(os.listdir(os.path.join(results, "cost", "runs"))) == 4
    # The failed run (seed 0: final accuracy 0.4 < 0.5) is reported, not dropped.
    with open(os.path.join(results, "methods", "summary.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["head"] == "2"]
    assert [(r["level"], r["n_runs"], r["n_failed"]) for r in rows] == [
        ("standard", "2", "1"), ("joint", "2", "1")]
    assert [float(r["mean_accuracy"]) for r in rows] == pytest.approx([0.45, 0.45])


def test_first_settings_run_first_and_reports_hold_other_workers_runs(
        tmp_path, monkeypatch):
    """`--first` runs the named settings before the others; the reports are
    written from every finished run on disk, including one that another
    worker finished while this one ran (its in-memory view lacks it)."""
    from experiments import run
    from experiments import runner

    results = str(tmp_path)
    order = []

    def fake_execute_group(configs, on_row):
        for config in configs:
            order.append((config["method"], config["seed"]))
            if len(order) == 1:  # Meanwhile another worker finishes a run.
                other = dict(config, method="standard", seed=1)
                runner.write_json_atomic(os.path.join(
                    results, "methods", "runs", f"{runner.run_key(other)}.json"),
                    _fake_row(runner, other))
            on_row(_fake_row(runner, config))

    monkeypatch.setattr(runner, "execute_group", fake_execute_group)
    assert run.run_study("methods", True, results, first=("joint",)) == 3
    assert order == [("joint", 0), ("joint", 1), ("standard", 0)]
    # A second worker (--reverse) takes the named settings first too.
    for name in os.listdir(os.path.join(results, "methods", "runs")):
        os.remove(os.path.join(results, "methods", "runs", name))
    order.clear()
    run.run_study("methods", True, results, reverse=True, first=("standard",))
    assert [m for m, _ in order] == ["standard", "standard", "joint", "joint"]
    with open(os.path.join(results, "methods", "runs.csv")) as f:
        rows = {(r["label"], r["seed"]) for r in csv.DictReader(f)}
    assert rows == {(f"method={m}", s) for m in ("standard", "joint") for s in "01"}


def _fake_row(runner, config, final=0.7):
    """A stand-in trainer's row for `config`: 3 heads, the final one at
    test accuracy `final` (failed below runner.FAIL_THRESHOLD)."""
    return dict(
        key=runner.run_key(config), config=config, error=None,
        head_names=["head_0_dense", "head_1_dense", "final_dense"],
        head_depths=[3, 5, 8], head_params=[10, 20, 30],
        test_accuracy=[0.5, 0.6, final],
        failed=final < runner.FAIL_THRESHOLD,
        epoch_seconds=1.0, step_seconds=0.1, first_epoch_seconds=2.0,
        fit_seconds=3.0, head_train_seconds=0.0,
    )


def test_paper_depth_studies_are_the_issue_s_settings_with_the_recipe():
    """The studies at the paper's depth: settings, 8 paired seeds in blocks
    of 4 (every setting's seeds 0-3 before any seed 4-7), the recipe of
    keras_mwbp.recipe, and settings that two studies share have the same
    config (so a run is done once)."""
    from experiments import runner
    from experiments.studies import paper_study_configs

    from keras_mwbp import recipe

    def settings(study):
        groups, spec = paper_study_configs(study)
        labels = []
        for group in groups:
            label = group[0][0]
            if label not in labels:
                labels.append(label)
        return groups, spec, labels

    groups, spec, labels = settings("resnet56_5")
    assert [l["training"] for l in labels] == [
        "standard", "joint:paper", "joint:code", "relay:paper", "relay:code",
        "mwbp:paper", "mwbp:code", "naive_mwbp:paper", "naive_mwbp:code"]
    assert [[c["seed"] for _, c in g] for g in groups] == (
        [[0, 1, 2, 3]] * 9 + [[4, 5, 6, 7]] * 9)
    config = groups[0][0][1]
    assert (config["depth"], config["width"], config["num_losses"],
            config["num_train"]) == (56, 16, 5, 0)
    assert (config["lr"], config["batch_size"], config["weight_decay"],
            tuple(config["decay_at"]), config["nu"]) == (
        recipe.LEARNING_RATE, recipe.BATCH_SIZE, recipe.WEIGHT_DECAY,
        recipe.LR_DROPS, recipe.NU)
    assert ("mwbp:code", "joint:code") in spec["pairs"]
    assert ("mwbp:paper", "joint:paper") in spec["pairs"]
    keys_a = {runner.run_key(c) for g in groups for _, c in g}
    assert len(keys_a) == 72
    depth_groups, _, depth_labels = settings("resnet_depth")
    assert sorted({l["depth"] for l in depth_labels}) == [20, 56, 110]
    keys_b = {runner.run_key(c) for g in depth_groups for _, c in g}
    assert len(keys_b) == 96 and len(keys_b & keys_a) == 32
    nu_groups, _, nu_labels = settings("resnet56_nu")
    assert [l["nu"] for l in nu_labels] == ["0.5", "1.0", "2.0", "5.0",
                                            "adaptive-II"]
    keys_c = {runner.run_key(c) for g in nu_groups for _, c in g}
    assert len(keys_c) == 40 and len(keys_c & keys_a) == 8
