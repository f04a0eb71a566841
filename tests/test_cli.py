"""The rmn-fx command line: the happy paths and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, console

import rmn_fx
import rmn_fx.measure
from rmn_fx.cli import main

TINY = "tiny_models:tiny_cnn"


def run_cli(*args) -> tuple[int, str, str]:
    done = console(*args)
    return done.returncode, done.stdout, done.stderr


def test_convert_and_inspect_from_the_console_script(tmp_path):
    out = tmp_path / "model.pt"
    code, stdout, err = run_cli("convert", TINY, "--branches", "3", "--input-size", "32", "-o", str(out))
    assert code == 0, err
    assert "wrote" in stdout and out.is_file()
    gm = rmn_fx.load(str(out), model=__import__("tiny_models").tiny_cnn())
    assert gm.meta["rmn_fx"]["routing"]["branches"] == 3 and len(gm.meta["rmn_stages"]) == 3
    code, stdout, err = run_cli("inspect", TINY, "--input-size", "32")
    assert code == 0, err
    assert "stage_3" in stdout and "as --stages:" in stdout


def test_inspect_json_output(capsys):
    assert main(["inspect", "resnet18", "--input-size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    parts = [row["part"] for row in report["parts"]]
    assert parts == ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"]
    assert [row["modules"] for row in report["parts"][1:5]] == [["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    assert sum(row["flops_share"] for row in report["parts"]) == pytest.approx(1.0)


def test_video_and_segmentation_models_by_name(capsys):
    """Other torchvision lists resolve by name (random weights, the backbone's too), and a
    video's input size is C,T,H,W."""
    assert main(["inspect", "r3d_18", "--input-size", "3,4,32,32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_size"] == [3, 4, 32, 32]
    assert [row["in_shape"] for row in report["parts"][1:5]] == [[64, 4, 16, 16], [64, 4, 16, 16], [128, 2, 8, 8], [256, 1, 4, 4]]  # the stem keeps the frames
    assert {row["layout"] for row in report["parts"][1:5]} == {"NCTHW"}
    assert main(["inspect", "lraspp_mobilenet_v3_large", "--input-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parts"][-1]["part"] == "head"


@pytest.mark.parametrize(
    "rule, options",
    [("gate", ["--top-k", "2"]), ("cross-connections", []), ("cross-prediction", []), ("cross-prediction", ["--granularity", "block"])],
)
def test_convert_and_inspect_with_every_rule(rule, options, tmp_path, capsys):
    out = tmp_path / "model.pt"
    args = [TINY, "--input-size", "32", "--branches", "3", "--routing", rule, *options]
    assert main(["convert", *args, "-o", str(out)]) == 0
    assert f"{rule} routing" in capsys.readouterr().out
    gm = rmn_fx.load(str(out), model=__import__("tiny_models").tiny_cnn())
    assert {type(s).rule for s in rmn_fx.nn.routed_stages(gm)} == {rule}
    assert main(["inspect", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routing"]["config"]["rule"] == rule and report["routing"]["routed_params"] == rmn_fx.measure.count_params(gm)
    stages = [row for row in report["parts"] if row["part"].startswith("stage_")]
    assert len(stages) == len(rmn_fx.nn.routed_stages(gm)) == (6 if "block" in options else 3)  # tiny_cnn: 3 stages of 2 blocks
    paths = 2 if rule == "gate" else 3
    assert all(row["routed_flops_per_sample"] > (paths - 0.01) * row["flops_per_sample"] for row in stages)  # + the rule's own


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["train"], ["eval"], ["report"], ["export"]])
def test_every_command_has_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


def cli_error(args, tmp_path, capsys, *needles):
    out = tmp_path / "model.pt"
    code = main([*args, "-o", str(out)] if args[0] == "convert" else args)
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "weights.pt"]  # no temporary file left


@pytest.mark.parametrize(
    "args, needles",
    [
        (["convert", "resnt18"], ["unknown model 'resnt18'", "resnet18"]),
        (["convert", "timm:not_a_net"], ["unknown model 'not_a_net'"]),
        (["convert", "no_such_module:factory"], ["cannot import model factory"]),
        (["convert", "tiny_models:not_a_module"], ["not an nn.Module"]),
        (["convert", "tiny_models:raising"], ["'tiny_models:raising' raised ValueError: width must be positive"]),
        (["convert", TINY, "--memory-momentum", "1.5"], ["--memory-momentum", "rmn-fx convert --help"]),
        (["convert", TINY, "--input-size", "32", "--branches", "2000000"], ["2000000 branches", "GiB", "fewer branches"]),
        (["convert", TINY, "--branches", "0"], ["--branches", "0"]),
        (["convert", TINY, "--branches", "-3"], ["--branches"]),
        (["convert", TINY, "--branches", "two"], ["--branches", "two"]),
        (["convert", TINY, "--branches", "2.5"], ["--branches"]),
        (["convert", "tiny_models:no_downsampling", "--input-size", "32"], ["no downsampling", "--stages"]),
        (["convert", TINY, "--input-size", "32", "--stages", "1:9"], ["module '9' does not exist"]),
        (["convert", TINY, "--input-size", "32", "--stages", "2,1"], ["overlaps"]),
        (["convert", TINY, "--input-size", "32", "--stages", "1,3"], ["gap"]),
        (["convert", TINY, "--input-size", "32", "--routed", "4"], ["routed stages must be indices in 1..3"]),
        (["convert", TINY, "--input-size", "32", "--stages", "1.0,1.1", "--granularity", "block"], ["no cut inside any stage", "--granularity stage"]),
        (["convert", TINY, "--granularity", "layer"], ["--granularity", "'layer'"]),
        (["convert", "tiny_models:untraceable", "--input-size", "32"], ["cannot trace", "DataDependent"]),
        (["convert", TINY, "--input-size", "4,32,32"], ["rejects a 4x32x32 input", "--input-size"]),
        (["convert", "tiny_models:fixed_size", "--input-size", "48"], ["rejects a 3x48x48 input"]),
        (["convert", TINY, "--input-size", "3,x,2"], ["--input-size"]),
        (["convert", TINY, "--input-size", "3,2,2,32,32"], ["--input-size", "C,T,H,W"]),
        (["convert", "fasterrcnn_resnet50_fpn"], ["is a detector", "model.backbone.body = rmn_fx.transform(model.backbone.body"]),
        (["inspect", "raft_small"], ["optical flow from two images"]),
        (["convert", TINY, "--input-size", "3,4,32,32"], ["rejects a 3x4x32x32 input", "C,T,H,W for a video"]),
        (["inspect", "tiny_models:no_downsampling", "--input-size", "32"], ["no downsampling"]),
        (["convert", TINY, "--routing", "moe"], ["'moe' is not a routing rule", "gate", "rmn-fx convert --help"]),
        (["convert", TINY, "--input-size", "32", "--top-k", "2"], ["--top-k", "'gate' only", "not 'memory'"]),
        (["convert", TINY, "--input-size", "32", "--routing", "gate", "-b", "4", "--top-k", "5"], ["--top-k", "1..branches (4)", "got 5"]),
        (["convert", TINY, "--input-size", "32", "--routing", "gate", "--top-k", "0"], ["--top-k", "0"]),
        (["convert", TINY, "--input-size", "32", "--routing", "gate", "--no-attention"], ["--attention", "'memory' only", "not 'gate'"]),
        (["convert", TINY, "--input-size", "32", "--routing", "cross-connections", "--memory-momentum", "0.5"], ["--memory-momentum", "'memory' only"]),
        (["inspect", TINY, "--input-size", "32", "--routing", "cross-prediction", "--top-k", "1"], ["--top-k", "'gate' only"]),
    ],
)
def test_bad_input_gets_a_one_line_error_and_writes_nothing(args, needles, tmp_path, capsys):
    cli_error(args, tmp_path, capsys, *needles)


def test_bad_weights_files(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    cli_error(["convert", TINY, "--input-size", "32", "--weights", str(weights)], tmp_path, capsys, "does not exist")
    weights.write_bytes(os.urandom(300))
    cli_error(["convert", TINY, "--input-size", "32", "--weights", str(weights)], tmp_path, capsys, "cannot read weights file")
    torch.save(__import__("tiny_models").tiny_cnn(num_classes=7).state_dict(), weights)
    cli_error(["convert", TINY, "--input-size", "32", "--weights", str(weights)], tmp_path, capsys, "does not fit", "mis-shaped")


def test_weights_are_loaded_before_conversion(tmp_path, capsys):
    import tiny_models

    base = tiny_models.tiny_cnn()
    torch.nn.init.normal_(base[1][0][0].weight)
    weights, out = tmp_path / "weights.pt", tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in base.state_dict().items()}}, weights)
    assert main(["convert", TINY, "--input-size", "32", "--weights", str(weights), "-o", str(out)]) == 0
    gm = rmn_fx.load(str(out), model=tiny_models.tiny_cnn())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x), base.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["missing", "file", "directory"])
def test_unwritable_output_paths(where, tmp_path, capsys):
    target = {
        "missing": tmp_path / "no" / "model.pt",
        "file": tmp_path / "a_file" / "model.pt",
        "directory": tmp_path,
    }[where]
    (tmp_path / "a_file").write_text("x")
    code = main(["convert", TINY, "--input-size", "32", "-o", str(target)])
    assert_one_line_error(code, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_read_only_output_directory(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through file modes; sysfs is read-only for everyone
        directory = Path("/sys")
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o555)
    code = main(["convert", TINY, "--input-size", "32", "-o", str(directory / "model.pt")])
    assert_one_line_error(code, capsys.readouterr().err, "cannot write to directory")


def test_console_script_errors_have_no_traceback(tmp_path):
    code, _, err = run_cli("convert", "resnt18", "-o", str(tmp_path / "m.pt"))
    assert_one_line_error(code, err, "unknown model")


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "rmn_fx", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "convert" in proc.stdout


def test_the_command_line_loads_no_torch_until_a_command_needs_it():
    """`rmn-fx --version` and `--help` answer at once: importing the CLI imports click only."""
    code = "import sys, rmn_fx, rmn_fx.cli; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    version = subprocess.run([sys.executable, "-m", "rmn_fx", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "0.1.0" in version.stdout


def test_training_only_branches_left_out_are_named_everywhere(tmp_path, capsys):
    """GoogLeNet's auxiliary heads are not in the eval-mode graph: the base count leaves them
    out, and convert, inspect (text and JSON) and the API say which modules, with their sizes."""
    import torchvision

    from rmn_fx.errors import ModulesLeftOutWarning

    assert main(["convert", "googlenet", "--input-size", "64", "-b", "2", "--no-attention", "-o", str(tmp_path / "g.pt")]) == 0
    out = capsys.readouterr().out
    net = torchvision.models.googlenet(weights=None, init_weights=False)
    used = rmn_fx.measure.count_params(rmn_fx.trace(net))
    aux = {name: rmn_fx.measure.count_params(getattr(net, name)) for name in ("aux1", "aux2")}
    assert used + sum(aux.values()) == rmn_fx.measure.count_params(net)
    assert f"parameters: {used:,} ->" in out
    assert all(f"{name} ({count:,} parameters)" in out for name, count in aux.items())
    assert main(["inspect", "googlenet", "--input-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_out"] == [{"module": name, "params": count} for name, count in aux.items()]
    with pytest.warns(ModulesLeftOutWarning, match="aux1 .*aux2"):
        gm = rmn_fx.transform(net, branches=2, input_size=(3, 64, 64))
    assert gm.meta["rmn_fx"]["left_out"] == [[name, count] for name, count in aux.items()]
