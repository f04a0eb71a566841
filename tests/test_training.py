"""The `train` driver end to end: run directory, resume after a kill or Ctrl-C with identical
results, data-parallel training on 2 CPU processes, eval and report, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rmn_fx

TESTS = Path(__file__).parent
SCRIPT = Path(sys.executable).with_name("rmn-fx")
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
TINY = "tiny_models:tiny_cnn"
TRAIN = ["train", TINY, "-b", "3", "--epochs", "3", "--stem-epochs", "1", "--batch-size", "64", "--lr", "0.05"]


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One uninterrupted run: the reference for the resume tests."""
    run = tmp_path_factory.mktemp("runs") / "reference"
    done = cli(*TRAIN, "-o", str(run))
    assert done.returncode == 0, done.stderr
    return run


def test_run_directory_holds_config_metrics_checkpoint_and_a_loadable_model(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"] == TINY and config["branches"] == 3 and config["epochs"] == 3 and config["lr"] == 0.05
    rows = metrics(finished_run)
    assert [r["phase"] for r in rows] == ["stem", "routed", "routed"]
    for row in rows[1:]:
        assert len(row["stages"]) == 3
        assert all(sum(s["train_samples_per_procedure"]) == 5752 // 64 * 64 for s in row["stages"])
    assert (finished_run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,phase,lr")
    import tiny_models  # noqa: F401 - the model factory, found through PYTHONPATH in the subprocess

    gm = rmn_fx.load(str(finished_run / "model.pt"))
    assert gm.meta["rmn_fx"]["branches"] == 3
    evaluation = json.loads((finished_run / "evaluation.json").read_text())
    assert evaluation["accuracy"] == rows[-1]["test_accuracy"]
    assert evaluation["accuracy"] > 0.3  # ten classes: training did something


def test_resume_after_a_kill_mid_epoch_gives_the_uninterrupted_result(finished_run, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen([str(SCRIPT), *TRAIN, "-o", str(run)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while len(metrics(run)) < 2 and proc.poll() is None:  # epoch 2 (the first routed one) is done
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 3
    proc.kill()
    proc.wait()
    assert len(metrics(run)) == 2 and not (run / "model.pt").exists()
    done = cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert metrics(run) == [{**r, "seconds": m["seconds"]} for r, m in zip(metrics(finished_run), metrics(run))]
    assert_same_state(state(run), state(finished_run))


def test_ctrl_c_saves_a_mid_epoch_checkpoint_and_resume_is_exact(finished_run, tmp_path):
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([str(SCRIPT), *TRAIN, "-o", str(run)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while len(metrics(run)) < 1 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["progress"]["batch"] > 0  # stopped inside an epoch
    done = cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert_same_state(state(run), state(finished_run))


def test_eval_and_report_read_the_run(finished_run):
    done = cli("eval", str(finished_run / "model.pt"), "--data", "digits", "--json", str(finished_run / "eval.json"))
    assert done.returncode == 0, done.stderr
    report = json.loads((finished_run / "eval.json").read_text())
    assert report["accuracy"] == json.loads((finished_run / "evaluation.json").read_text())["accuracy"]
    assert len(report["stages"]) == 3 and all(0 <= s["nmi_context"] <= 1 for s in report["stages"])
    assert "NMI context" in done.stdout
    done = cli("report", str(finished_run))
    assert done.returncode == 0, done.stderr
    for name in ("curves.png", "load.png", "routes.png", "summary.md"):
        data = (finished_run / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else b"| epoch |" in data


def test_mixed_precision_runs_the_same_recipe_in_bfloat16_on_cpu(finished_run, tmp_path):
    """--amp on CPU autocasts to bfloat16 (float16 + GradScaler on CUDA): the losses move
    off the float32 run's but stay close, and the model saved is float32 and loadable."""
    run = tmp_path / "amp"
    done = cli(*TRAIN, "--amp", "-o", str(run))
    assert done.returncode == 0, done.stderr
    mixed, full = metrics(run), metrics(finished_run)
    assert [r["train_loss"] for r in mixed] != [r["train_loss"] for r in full]  # autocast took effect
    assert mixed[0]["train_loss"] == pytest.approx(full[0]["train_loss"], rel=5e-2)
    assert mixed[-1]["test_accuracy"] > 0.3  # ten classes: it learned
    assert all(v.dtype != torch.bfloat16 for v in state(run).values())
    rmn_fx.load(str(run / "model.pt"))


def test_data_parallel_on_two_processes_matches_one_process(tmp_path):
    """gloo on CPU: the same global batch split over 2 ranks gives the single-process losses,
    and every rank holds the same memories after every epoch."""
    args = ["tiny_models:tiny_gn", "-b", "2", "--no-attention", "--epochs", "2", "--stem-epochs", "1", "--batch-size", "64", "--lr", "0.05"]
    single = cli("train", *args, "-o", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rmn_fx"]
    ddp = subprocess.run([*launcher, "train", *args, "-o", str(tmp_path / "ddp")], capture_output=True, text=True, env=ENV, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(two) == 2 and two[1]["memory_spread_across_ranks"] == 0.0
    # stem epoch: the same steps up to float summation order; routed epoch: a key near the
    # boundary between two memories can flip its hard route, so the match is looser there
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=1e-3)
    assert two[0]["test_loss"] == pytest.approx(one[0]["test_loss"], rel=1e-2)
    assert two[1]["train_loss"] == pytest.approx(one[1]["train_loss"], rel=5e-2)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("rmn-fx: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_resume_refuses_another_model_branch_count_or_option(finished_run):
    one_line_error(cli("train", "resnet18", "--resume", str(finished_run)), "model", "resnet18")
    one_line_error(cli("train", "--resume", str(finished_run), "-b", "4"), "branches")
    one_line_error(cli("train", "--resume", str(finished_run), "--data", "cifar10:/nowhere"), "data")
    one_line_error(cli("train", "--resume", str(finished_run), "--lr", "0.3"), "--lr", "cannot change")
    one_line_error(cli("train", "--resume", str(finished_run.parent / "none")), "not a run directory")
    one_line_error(cli(*TRAIN, "-o", str(finished_run)), "already holds a run", "--resume")


def test_bad_data_and_run_directories_fail_before_training(tmp_path):
    one_line_error(cli(*TRAIN, "--data", "cifar100:" + str(tmp_path / "missing"), "-o", str(tmp_path / "a")), "does not exist")
    one_line_error(cli(*TRAIN, "--data", "cifar100:" + str(tmp_path), "-o", str(tmp_path / "b")), "cifar-100-python")
    one_line_error(cli(*TRAIN, "--data", "mnist", "-o", str(tmp_path / "c")), "unknown data")
    (tmp_path / "folder" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "val" / "dog").mkdir(parents=True)
    one_line_error(cli(*TRAIN, "--data", f"imagefolder:{tmp_path / 'folder'}", "-o", str(tmp_path / "d")))
    (tmp_path / "a-file").write_text("not a folder")
    one_line_error(cli(*TRAIN, "-o", str(tmp_path / "a-file" / "run")), "cannot create run directory")
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_a_diverging_loss_stops_with_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    done = cli("train", TINY, "-b", "2", "--epochs", "3", "--stem-epochs", "1", "--batch-size", "64", "--lr", "1e12", "--lr-start", "1e12", "--warmup-epochs", "0", "-o", str(run))
    one_line_error(done, "loss became", "training stopped", "--lr")
    assert not (run / "model.pt").exists()
