"""Model files: round trip in a fresh process, weights_only loading, and damaged files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import spread_routes

import rmn_fx
from rmn_fx import serialization
from rmn_fx.errors import ModelFileError, OutputPathError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gm = rmn_fx.transform("resnet18", branches=3, input_size=(3, 64, 64))
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spread_routes(gm, x)
    path = tmp_path_factory.mktemp("saved") / "r18.pt"
    rmn_fx.save(gm, str(path))
    return gm, x, path


def test_file_reads_with_weights_only(saved):
    _, _, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "rmn-fx" and payload["format_version"] == serialization.FORMAT_VERSION


def test_fresh_process_rebuilds_identical_outputs(saved, tmp_path):
    gm, x, path = saved
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, rmn_fx; gm = rmn_fx.load(sys.argv[1]); "
        "torch.save(gm(torch.load(sys.argv[2])).detach(), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True, timeout=600)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), gm.eval()(x))


def damage(path, tmp_path, how):
    target = tmp_path / f"{how}.pt"
    data = path.read_bytes()
    if how == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        target.write_bytes(bytes(b ^ 0x5A for b in data[:4096]) + data[4096:])
    elif how == "random":
        target.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    elif how == "state_dict":
        torch.save({"w": torch.zeros(1)}, target)
    elif how == "version":
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "format_version": 99}, target)
    elif how == "config":
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "config": "{not json"}, target)
    elif how == "weights":
        payload = torch.load(path, weights_only=True)
        payload["state_dict"].pop("stem.conv1.weight")
        torch.save(payload, target)
    return target


@pytest.mark.parametrize(
    "how, needle",
    [
        ("truncated", "cannot read model file"),
        ("corrupt", "cannot read model file"),
        ("random", "cannot read model file"),
        ("state_dict", "not an rmn-fx model file"),
        ("version", "format version 99"),
        ("config", "damaged"),
        ("weights", "does not fit"),
    ],
)
def test_damaged_or_foreign_files_get_a_clear_error(saved, tmp_path, how, needle):
    with pytest.raises(ModelFileError, match=needle):
        rmn_fx.load(str(damage(saved[2], tmp_path, how)))


def test_missing_file_and_user_model_without_base(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        rmn_fx.load(str(tmp_path / "nope.pt"))
    gm = rmn_fx.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.Conv2d(4, 4, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 4, 3)), branches=2, input_size=(3, 32, 32))
    rmn_fx.save(gm, str(tmp_path / "user.pt"))
    with pytest.raises(ModelFileError, match="pass the base network"):
        rmn_fx.load(str(tmp_path / "user.pt"))


def test_failed_write_leaves_no_file(saved, tmp_path, monkeypatch):
    gm, _, _ = saved
    target = tmp_path / "model.pt"

    def failing_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization.torch, "save", failing_save)
    with pytest.raises(OSError):
        rmn_fx.save(gm, str(target))
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_missing_directories_and_foreign_modules(saved, tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        rmn_fx.save(saved[0], str(tmp_path / "missing" / "m.pt"))
    with pytest.raises(ModelFileError, match="not made by rmn_fx.transform"):
        rmn_fx.save(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), str(tmp_path / "m.pt"))


def crafted(path, source, tmp_path):
    """A valid rmn-fx file whose stored source names other code."""
    payload = torch.load(path, weights_only=True)
    config = json.loads(payload["config"])
    config["source"] = {"model": source, "num_classes": None}
    target = tmp_path / f"crafted-{source.replace(':', '-')}.pt"
    torch.save({**payload, "config": json.dumps(config)}, target)
    return target


@pytest.mark.parametrize("source", ["os:abort", "tempfile:mkdtemp", "shutil:rmtree"])
def test_a_model_file_never_runs_the_code_it_names(saved, tmp_path, source):
    """Loading a crafted file neither imports nor calls its factory (os.abort would kill the
    process, mkdtemp would leave a folder): one line says how to opt in. Run in a fresh
    process, in an empty temporary directory, so that any effect would show."""
    target = crafted(saved[2], source, tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = (
        "import sys, rmn_fx\n"
        "try:\n    rmn_fx.load(sys.argv[1])\n"
        "except rmn_fx.UntrustedCodeError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert source in done.stdout and "trust_factory=True" in done.stdout and "model=" in done.stdout
    assert list(scratch.iterdir()) == []


def test_a_model_file_does_not_import_the_module_it_names(saved, tmp_path):
    target = crafted(saved[2], "tiny_models:tiny_cnn", tmp_path)
    check = "import sys, rmn_fx\ntry:\n    rmn_fx.load(sys.argv[1])\nexcept rmn_fx.UntrustedCodeError:\n    print('tiny_models' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-c", check, str(target)], capture_output=True, text=True, env=env, timeout=600)
    assert done.stdout.strip() == "False", done.stderr


def test_eval_refuses_a_file_that_names_code(saved, tmp_path):
    target = crafted(saved[2], "os:abort", tmp_path)
    script = Path(sys.executable).with_name("rmn-fx")
    done = subprocess.run([str(script), "eval", str(target)], capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--trust-factory" in lines[0] and "os:abort" in lines[0], done.stderr


def test_a_trusted_factory_file_and_a_given_model_load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import tiny_models

    gm = rmn_fx.transform("tiny_models:tiny_cnn", branches=2, input_size=(3, 32, 32))
    rmn_fx.save(gm, str(tmp_path / "tiny.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = gm.eval()(x)
        assert torch.equal(rmn_fx.load(str(tmp_path / "tiny.pt"), trust_factory=True)(x), want)
        assert torch.equal(rmn_fx.load(str(tmp_path / "tiny.pt"), model=tiny_models.tiny_cnn())(x), want)


def test_loading_with_a_mismatching_model_names_the_keys(saved):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.Conv2d(8, 8, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3))
    with pytest.raises(rmn_fx.RMNError) as info:
        rmn_fx.load(str(saved[2]), model=other)
    assert "\n" not in str(info.value)
    # another architecture: either its stages differ from the file's, or its keys are named
    assert "stages" in str(info.value) or "missing" in str(info.value)
    payload = torch.load(saved[2], weights_only=True)
    payload["state_dict"]["stem.extra"] = torch.zeros(1)
    payload["state_dict"].pop("stem.conv1.weight")
    target = saved[2].with_name("extra.pt")
    torch.save(payload, target)
    with pytest.raises(ModelFileError, match=r"1 missing \(stem.conv1.weight\), 1 unexpected \(stem.extra\)"):
        rmn_fx.load(str(target))
