"""apps.plots: PNG figures of dump dirs' metrics files, several runs overlaid by run name; bad
input (a missing dump dir, a malformed line) stops with the path at fault and nothing written."""

from __future__ import annotations

import json
import math

import pytest

from apps.plots import FIGURE_GROUPS, draw, ema, group_panels, load_runs, main, plot_runs, read_series
from lingua.metrics import MetricLogger
from tests.conftest import failure_report, run_module, tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = {g.file_name: g for g in FIGURE_GROUPS}


def write_run(dump_dir, name, steps=range(5, 45, 5), memory=False, mhc=False, sources=("src",)):
    """A dump dir as apps.main.train leaves it: config.yaml and rows shaped as log_step and
    validate_in_loop log them, through the real MetricLogger; metrics.eval.jsonl in both the
    lm-eval (nested) and the pairs (flattened) shape."""
    dump_dir.mkdir(parents=True)
    (dump_dir / "config.yaml").write_text(f"name: {name}\ndump_dir: {dump_dir}\nsteps: 40\n")
    groups = {"base": 3e-3, **({"memory_values": 1e-3} if memory else {})}
    with MetricLogger(dump_dir / "metrics.jsonl") as m:
        for step in steps:
            m.log({
                "global_step": step, "loss/out": 5 - step / 20, **({"loss/pk_aux": 0.1} if memory else {}),
                "optim": {"lr": 3e-3 * step / 40, "lr_group": {k: v * step / 40 for k, v in groups.items()},
                          "grad_norm": 2.0 / step, "total_tokens": 128 * step},
                "data": {"tokens_read": 128 * step},
                **({"memory": {"layers.1": {"hit_fraction": 0.7, "kl_uniform": 0.8}}} if memory else {}),
                **({"mhc": {"layers.0.mhc_attention/amax_forward": 1.01, "amax_forward": 1.01,
                            "composite_amax_forward": 1.02}} if mhc else {}),
                "speed": {"wps": 3000.0, "MFU": 0.02, "curr_iter_time": 0.04},
            })
    with MetricLogger(dump_dir / "metrics.validation.jsonl") as m:
        for step in (20, 40):
            m.log({"global_step": step, "val": {s: {"loss": 4.5, "bpb": 6.5, "tokens": 4001, "docs": 1}
                                                for s in sources}})
    with open(dump_dir / "metrics.eval.jsonl", "w") as f:
        for step in (20, 40):
            f.write(json.dumps({"global_step": step, "created_at": "2026-01-01T00:00:00", "checkpoint": "ckpt",
                                "tiny_mc": {"acc,none": 0.25, "acc_stderr,none": 0.1, "alias": "tiny_mc"}}) + "\n")
            f.write(json.dumps({"global_step": step, "pairs_path": "p.jsonl", "pairs/exact_match": 0.5,
                                "pairs/rouge_l": 0.4}) + "\n")
    return dump_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = write_run(root / "a", "alpha", memory=True, mhc=True)
    b = write_run(root / "b", "beta", steps=range(10, 45, 10), sources=("src", "code"))
    out = root / "plots"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return a, b, out, plot_runs([a, b], out)


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def test_every_figure_group_with_data_is_a_png_with_titled_panels(two_runs):
    a, b, out, written = two_runs
    # no run has gpu_memory/*: no gpu_memory.png
    assert set(written) == {"loss.png", "validation.png", "lr.png", "grad_norm.png", "speed.png", "memory.png",
                            "mhc.png", "eval.png"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, "notes.txt"])  # no temporary file left
    assert (out / "notes.txt").read_text() == "mine"
    for file_name in written:
        assert_png(out / file_name)
    assert written["loss.png"] == ["loss/out", "loss/pk_aux"]
    assert written["lr.png"] == ["optim/lr", "optim/lr_group/base", "optim/lr_group/memory_values"]
    assert written["grad_norm.png"] == ["optim/grad_norm"]
    assert {"speed/wps", "speed/MFU"} <= set(written["speed.png"])
    assert written["memory.png"] == ["memory/layers.1/hit_fraction", "memory/layers.1/kl_uniform"]
    assert set(written["mhc.png"]) == {"mhc/layers.0.mhc_attention/amax_forward", "mhc/amax_forward",
                                       "mhc/composite_amax_forward"}
    # per source; the counts (tokens, docs) are no measurements
    assert sorted(written["validation.png"]) == ["val/code/bpb", "val/code/loss", "val/src/bpb", "val/src/loss"]
    # nested lm-eval results flattened; stderr, alias, checkpoint, created_at left out
    assert sorted(written["eval.png"]) == ["pairs/exact_match", "pairs/rouge_l", "tiny_mc/acc,none"]


def test_runs_overlay_labelled_by_run_name(two_runs):
    a, b, _, _ = two_runs
    runs = load_runs([a, b])
    assert [r.label for r in runs] == ["alpha", "beta"]
    labels = [r.label for r in runs]
    for file_name, shared, only_alpha in (("loss.png", "loss/out", "loss/pk_aux"),
                                          ("memory.png", None, "memory/layers.1/hit_fraction"),
                                          ("validation.png", "val/src/loss", None)):
        group = GROUPS[file_name]
        panels = group_panels(runs, group)
        fig = draw(group, panels, labels)
        legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes}
        if shared:
            assert legends[shared] == ["alpha", "beta"]
        if only_alpha:
            assert legends[only_alpha] == ["alpha"]
    assert group_panels(runs, GROUPS["validation.png"])["val/code/loss"].keys() == {"beta"}
    loss = group_panels(runs, GROUPS["loss.png"])["loss/out"]
    assert sorted(loss["beta"]) == [10, 20, 30, 40] and loss["beta"][20] == pytest.approx(4.0)


def test_default_out_is_the_first_dump_dir_and_main_says_where(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"global_step": s, "optim/grad_norm": 1.0 / s}) + "\n"
                                               for s in (1, 2, 3)))
    assert main([str(run)]) == {"grad_norm.png": ["optim/grad_norm"]}
    assert_png(run / "plots" / "grad_norm.png")
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["grad_norm.png"]
    assert str(run / "plots" / "grad_norm.png") in capsys.readouterr().out
    # no config.yaml: labelled by the directory's name
    assert [r.label for r in load_runs([run])] == ["run"]


def test_nothing_to_plot_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"global_step": 1, "data/tokens_read": 128}) + "\n")
    assert main([str(run)]) == {}
    assert "nothing written" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_a_remote_dump_dir_is_read_and_plotted_where_it_is():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/plots_test/run/config.yaml", b"name: remote\n")
    fs.pipe_file("/plots_test/run/metrics.jsonl", (json.dumps({"global_step": 1, "loss/out": 2.0}) + "\n").encode())
    try:
        assert main(["memory://plots_test/run"]) == {"loss.png": ["loss/out"]}
        assert fs.cat_file("/plots_test/run/plots/loss.png").startswith(PNG_SIGNATURE)
        assert [r.label for r in load_runs(["memory://plots_test/run"])] == ["remote"]
    finally:
        fs.rm("/plots_test", recursive=True)


def test_runs_with_the_same_name_are_told_apart_by_directory(tmp_path):
    dirs = [write_run(tmp_path / d, "debug", steps=(1, 2)) for d in ("x", "y")]
    assert [r.label for r in load_runs(dirs)] == ["debug (x)", "debug (y)"]


@pytest.mark.parametrize("broken", ["missing dir", "no metrics.jsonl"])
def test_a_bad_dump_dir_is_named_and_nothing_is_written(two_runs, tmp_path, capsys, broken):
    good = two_runs[0]
    bad = tmp_path / "nope"
    if broken == "no metrics.jsonl":
        bad.mkdir()
        (bad / "config.yaml").write_text("name: nope\n")
    out = tmp_path / "plots"
    with pytest.raises(SystemExit) as e:
        main([str(good), str(bad), "--out", str(out)])
    assert e.value.code == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="nope"):
        plot_runs([good, bad], out)


def test_a_malformed_line_is_named_by_file_and_line_and_nothing_is_written(tmp_path, capsys):
    run = write_run(tmp_path / "run", "broken", steps=(1, 2))
    validation = run / "metrics.validation.jsonl"
    lines = validation.read_text().splitlines()
    validation.write_text("\n".join([lines[0], "", '{"global_step": 3, "val/src/loss": 4.', lines[1]]) + "\n")
    with pytest.raises(SystemExit):
        main([str(run)])
    assert f"{validation}:3" in capsys.readouterr().err
    assert not (run / "plots").exists()
    validation.write_text(lines[0] + "\n[1, 2]\n")  # JSON, but not a row
    with pytest.raises(ValueError, match=f"{validation}:2"):
        plot_runs([run], tmp_path / "plots")


def test_rows_are_read_as_a_resumed_or_live_run_leaves_them(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"global_step": 5, "loss/out": 3.0}, {"global_step": 10, "loss/out": 2.0},
            {"global_step": 5, "loss/out": 2.5},  # resumed from step 0: step 5 again
            {"global_step": None, "loss/out": 9.0}, {"global_step": 15, "loss/out": float("nan"), "ok": True}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"global_step": 20, "loss/o')  # still being written
    series = read_series(path)
    assert list(series["loss/out"].items())[:2] == [(5, 2.5), (10, 2.0)] and math.isnan(series["loss/out"][15])
    assert sorted(series["loss/out"]) == [5, 10, 15]
    assert "ok" not in series  # booleans are not plotted
    assert f"{path}:6" in capsys.readouterr().err


def test_ema_smooths_long_series_only_and_survives_a_nan():
    assert ema([1.0, 5.0, 3.0]) == [1.0, 5.0, 3.0]  # fewer points than 1/EMA_SPAN: raw
    noisy = [4.0 + (-1) ** i for i in range(200)]
    smoothed = ema(noisy)
    assert max(abs(v - 4.0) for v in smoothed[100:]) < 0.2
    with_nan = ema([2.0] * 50 + [math.nan] + [2.0] * 49)
    assert with_nan[-1] == pytest.approx(2.0)


def test_plots_of_a_real_training_run(corpus, tmp_path):
    """A tiny run of apps.main.train (a memory layer and mHC) overlaid on a written one: the keys
    train.py writes are the ones the figures show."""
    real = tmp_path / "real"
    done = run_module("apps.main.train", tiny_overrides(corpus, real, steps=4, name="pk_mhc", **{
        "checkpoint.eval.every": 4, "checkpoint.dump.every": 100, "model.mhc.enabled": "true",
        "model.mhc.n_streams": 2, "model.productkey_args.is_enabled": "true", "model.productkey_args.layers": "1",
        "model.productkey_args.mem_n_keys": 16, "model.productkey_args.mem_k_dim": 16,
        "model.productkey_args.mem_heads": 2, "model.productkey_args.mem_knn": 4}), timeout=120)
    assert done.returncode == 0, failure_report(done)
    written = write_run(tmp_path / "written", "beta", steps=(1, 2, 3, 4))
    titles = plot_runs([real, written], tmp_path / "plots")
    for file_name in ("loss.png", "validation.png", "lr.png", "grad_norm.png", "speed.png", "memory.png", "mhc.png"):
        assert_png(tmp_path / "plots" / file_name)
    assert {"optim/lr_group/base", "optim/lr_group/memory_values"} <= set(titles["lr.png"])
    assert {"memory/layers.1/hit_fraction", "memory/layers.1/top_row_share"} <= set(titles["memory.png"])
    assert {"mhc/amax_forward", "mhc/composite_amax_backward"} <= set(titles["mhc.png"])
    assert {"speed/wps", "speed/MFU"} <= set(titles["speed.png"])
    runs = load_runs([real, written])
    assert [r.label for r in runs] == ["pk_mhc", "beta"]  # the name in the config.yaml train.py wrote
    assert group_panels(runs, GROUPS["validation.png"])["val/src/loss"].keys() == {"pk_mhc", "beta"}
