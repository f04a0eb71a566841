"""The parts of the recipe: stem phase, LR curve, dead-procedure revival, batches, data,
and the small-image pass (on generated backbones and real ones)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from backbones import backbones
from helpers import record_routes
from hypothesis import assume, given, settings
from rmn_fx.recipes import DeadProcedureMonitor, WarmupCosine, load_data, set_phase
from rmn_fx.recipes.batches import EpochBatches
from rmn_fx.recipes.data import CONTEXTS, render_digits
from rmn_fx.recipes import distributed
from rmn_fx.recipes.distributed import Group
from rmn_fx.recipes.trainer import stop_at_once

import rmn_fx
from rmn_fx.errors import StageError, TrainingInterrupted
from rmn_fx.nn.layout import PackedLayout
from rmn_fx.nn.routed_stage import routed_stages


def test_stem_phase_runs_procedure_zero_only_and_leaves_memories(converted):
    gm = converted(branches=4).train()
    for stage in routed_stages(gm):
        stage.router.memory.normal_()  # memories that would spread the batch
    before = [s.router.memory.clone() for s in routed_stages(gm)]
    set_phase(gm, "stem")
    calls = []
    for stage in routed_stages(gm):
        for j, proc in enumerate(stage.procedures):
            proc.register_forward_hook(lambda m, a, o, j=j: calls.append((j, a[0].shape[0])))
    gm(torch.randn(6, 3, 32, 32))
    assert calls == [(0, 6)] * len(routed_stages(gm))
    assert all(torch.equal(a, s.router.memory) for a, s in zip(before, routed_stages(gm)))


def test_stem_phase_attention_sees_random_routes_in_training_and_their_mean_in_eval(converted):
    gm = converted(branches=4)
    set_phase(gm, "stem")
    for stage in routed_stages(gm):
        torch.nn.init.normal_(stage.attention.excite.weight)  # an attention that reads the code
    x = torch.randn(4, 3, 32, 32)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))  # eval: the uniform code, deterministic
        gm.train()
        torch.manual_seed(1)
        a = gm(x)
        torch.manual_seed(2)
        assert not torch.allclose(a, gm(x))


def test_lr_curve_warms_up_linearly_then_decays_by_cosine():
    curve = WarmupCosine(peak=0.48, total_steps=100, warmup_steps=10, start=1e-5, floor=1e-5)
    assert curve(0) == pytest.approx(1e-5) and curve(5) == pytest.approx((0.48 + 1e-5) / 2)
    assert curve(10) == pytest.approx(0.48) and curve(55) == pytest.approx((0.48 + 1e-5) / 2)
    assert curve(100) == pytest.approx(1e-5)
    values = [curve(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("revive", [True, False])
def test_a_procedure_without_samples_for_the_window_is_dead_and_revived(revive, converted):
    gm = converted(branches=3, attention=False).train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    stage = routed_stages(gm)[0]
    stage.router.memory[:2] = torch.randn(2, stage.router.key_dim) * 0.01
    stage.router.memory[2] = 1e6  # procedure 2 is out of reach of every key
    monitor = DeadProcedureMonitor(gm, window=3, revive=revive)
    revived = []
    for _ in range(5):  # 3 steps to be dead, then one revival per stage and step
        optimizer.zero_grad()
        gm(torch.randn(8, 3, 32, 32)).sum().backward()
        optimizer.step()
        revived += monitor.after_step(optimizer)
        if (0, 2) in revived:
            break
    if revive:
        assert (0, 2) in revived and stage.router.memory[2].abs().max() < 1e3
        busiest = int(monitor.recent[0][1].bincount().argmax())
        for a, b in zip(stage.procedures[2].parameters(), stage.procedures[busiest].parameters()):
            assert torch.equal(a, b)
        routes, _ = record_routes(gm)
        gm(torch.randn(64, 3, 32, 32))
        assert (routes[0][0] == 2).any()  # it receives samples again
    else:
        assert 2 in monitor.dead()[0] and stage.router.memory[2].min() == 1e6


def test_epoch_batches_split_each_global_batch_over_ranks_and_resume_anywhere():
    single = list(EpochBatches(100, 16, seed=3, epoch=2, group=Group()))
    ranks = [list(EpochBatches(100, 16, 3, 2, Group(r, 4))) for r in range(4)]
    assert len(single) == 6 and all(len(b) == 16 for b in single)
    assert [sum((r[i] for r in ranks), []) for i in range(6)] == single
    assert list(EpochBatches(100, 16, 3, 2, Group(), start=4)) == single[4:]
    assert single != list(EpochBatches(100, 16, 3, 3, Group()))


def test_a_torchrun_launch_of_one_process_joins_a_group_of_one(monkeypatch):
    """So DDP and the collectives run as on many GPUs, checkable on a machine with one
    (NCCL there: tests/test_cuda.py); a plain process joins nothing."""
    assert not distributed.start(torch.device("cpu")).distributed
    torchrun = {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    group = distributed.start(torch.device("cpu"))
    try:
        assert group.distributed and (group.rank, group.world) == (0, 1)
        assert group.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]
        assert isinstance(distributed.prepare(torch.nn.Linear(2, 2), group), torch.nn.parallel.DistributedDataParallel)
    finally:
        distributed.stop(group)
    assert not torch.distributed.is_initialized()


def test_embedded_digits_split_by_digit_in_every_context():
    data = load_data("digits")
    assert data.classes == [str(c) for c in range(10)] and data.context_names == CONTEXTS
    assert len(data.train) + len(data.test) == 4 * 1797
    assert data.test_contexts.bincount().tolist() == [len(data.test) // 4] * 4
    train_plain = {bytes(img.numpy()) for img in data.train.base.images[: len(data.train) // 4]}
    test_plain = {bytes(img.numpy()) for img in data.test.base.images[: len(data.test) // 4]}
    assert not train_plain & test_plain  # no digit on both sides of the split
    images, _, _ = render_digits()
    assert torch.equal(images, render_digits()[0])  # fixed, not redrawn per call
    first = [data.train[i][0] for i in range(10)]
    assert all(torch.equal(a, data.train[i][0]) for i, a in enumerate(first))  # augmentation: (seed, epoch, index)
    data.train.epoch = 1
    assert not all(torch.equal(a, data.train[i][0]) for i, a in enumerate(first))


def test_cifar_and_image_folders_load_from_local_files(tmp_path, monkeypatch):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {"data": torch.randint(0, 255, (4, 3072), generator=rng, dtype=torch.uint8).numpy(), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c", "d"]}))
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # fake files, other checksums
    data = load_data(f"cifar10:{folder}")
    assert len(data.train) == 20 and len(data.test) == 4 and data.train[0][0].shape == (3, 32, 32)
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "imgs" / split / cls / "x.png")
    data = load_data(f"imagefolder:{tmp_path / 'imgs'}", image_size=24)
    assert data.classes == ["cat", "dog"] and data.train[0][0].shape == (3, 24, 24)


def test_tiny_imagenet_val_annotations_give_the_test_labels(tmp_path):
    from PIL import Image
    from rmn_fx.recipes.data import DataError

    root = tmp_path / "tiny-imagenet-200"
    for wnid, colour in (("n01", (250, 0, 0)), ("n02", (0, 0, 250))):
        (root / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)  # unlabelled, as shipped: not used
    for name, colour in (("val_0.JPEG", (0, 0, 250)), ("val_1.JPEG", (250, 0, 0))):
        Image.new("RGB", (64, 64), colour).save(root / "val" / "images" / name)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t1\t2\t60\t61\n")
    data = load_data(f"imagefolder:{root}", image_size=64)
    assert data.classes == ["n01", "n02"] and len(data.train) == 2 and len(data.test) == 2
    labels = [data.test[i][1] for i in range(2)]
    reds = [float(data.test[i][0][0].mean()) > float(data.test[i][0][2].mean()) for i in range(2)]
    assert labels == [1, 0] and reds == [False, True]  # each file with its listed class
    annotations.write_text("val_0.JPEG\tn03\t0\t0\t63\t63\n")
    with pytest.raises(DataError, match="line 1.*class of train/"):
        load_data(f"imagefolder:{root}", image_size=64)
    annotations.write_text("missing.JPEG\tn01\t0\t0\t63\t63\n")
    with pytest.raises(DataError, match="missing.JPEG' does not exist"):
        load_data(f"imagefolder:{root}", image_size=64)


def map_sides(layout, shape) -> list[tuple[int, ...]]:
    """The last two sizes (H, W) of each map at a stage's end (several where they are packed;
    a segment only carried is no map)."""
    shapes = [s for _, _, s in layout.features] if isinstance(layout, PackedLayout) else [shape[1:]]
    return [tuple(s[-2:]) for s in shapes]


@settings(max_examples=15, deadline=None)
@given(backbones())
def test_removing_downsamplings_keeps_the_stages_and_their_resolution(spec):
    """Where the stem downsamples, removing that drop doubles every stage's map side."""
    assume(spec.stem_downsamples and not spec.shape_branches)  # sizes fixed at the sample cannot change (a test below)
    model = spec.build()
    size = spec.input_size
    plain = rmn_fx.transform(model, branches=2, input_size=size)
    small = rmn_fx.transform(model, branches=2, input_size=size, remove_downsamplings=1)
    assert small.meta["rmn_fx"]["stage_plan"] == plain.meta["rmn_fx"]["stage_plan"]
    for a, b in zip(plain.meta["rmn_stages"], small.meta["rmn_stages"]):  # H, W of every map (a video keeps its frames)
        assert map_sides(b.in_layout, b.in_shape) == [tuple(2 * s for s in hw) for hw in map_sides(a.in_layout, a.in_shape)]
        assert map_sides(b.out_layout, b.out_shape) == [tuple(2 * s for s in hw) for hw in map_sides(a.out_layout, a.out_shape)]
    assert small(torch.randn(2, *size)).shape == plain(torch.randn(2, *size)).shape


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vgg11", "timm:resnet26d", "mobilenet_v3_small"])
def test_small_image_variant_of_real_models_matches_the_paper_rule(name, tmp_path):
    plain = rmn_fx.transform(name, branches=2, num_classes=10)
    small = rmn_fx.transform(name, branches=2, num_classes=10, input_size=(3, 32, 32), remove_downsamplings=2)
    assert small.meta["rmn_fx"]["stage_plan"] == plain.meta["rmn_fx"]["stage_plan"]
    # the last stage works at 32 / (224 / 4) of the 224 model's map side times 4
    side = plain.meta["rmn_stages"][-1].out_shape[-1] * 32 * 4 // 224
    assert small.meta["rmn_stages"][-1].out_shape[-1] == side
    rmn_fx.save(small, str(tmp_path / "m.pt"))
    again = rmn_fx.load(str(tmp_path / "m.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small.eval()(x), again(x))


def test_patchify_stems_cannot_lose_their_downsampling():
    with pytest.raises(StageError, match="shrink the map"):
        rmn_fx.transform("timm:convnext_atto", branches=2, input_size=(3, 32, 32), remove_downsamplings=1)


def test_every_procedure_dispatch_runs_idle_procedures_on_empty_batches_with_the_same_result():
    from rmn_fx.nn.routing import dispatch

    torch.manual_seed(0)
    procedures = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 1) for _ in range(3))
    x, route = torch.randn(5, 3, 4, 4), torch.tensor([2, 0, 2, 0, 0])
    sizes = []
    for proc in procedures:
        proc.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    together = dispatch(x, route, procedures, every_procedure=True)
    assert sizes == [3, 0, 2]
    assert torch.equal(together, dispatch(x, route, procedures))


@pytest.mark.parametrize(
    "recipe, model, branches, overrides, optimizer, lr, rule",
    [
        ("quick", "efficientnet_b0", 8, {}, "sgd", 0.0125, "0.05 * batch 32 / 128"),  # SGD, at the family's batch 32
        ("quick", "resnet18", 8, {"batch_size": 256}, "sgd", 0.1, "0.05 * batch 256 / 128"),  # follows the batch
        ("paper-imagenet", "resnet50", 8, {}, "sgd", 0.48, "0.48 * batch 1024 / 1024"),
        ("paper-imagenet", "resnet50", 4, {}, "sgd", 0.24, "0.48 * batch 512 / 1024"),
        ("paper-imagenet", "efficientnet_b0", 4, {}, "rmsprop", 0.032, "0.016 * batch 512 / 256"),
        ("paper-imagenet", "efficientnet_b0", 4, {"batch_size": 128}, "rmsprop", 0.008, "0.016 * batch 128 / 256"),
        ("paper-imagenet", "efficientnet_b0", 4, {"optimizer": "sgd"}, "sgd", 0.24, "sgd at 0.48 * batch 512"),
        ("quick", "resnet18", 8, {"lr": 0.3}, "sgd", 0.3, "given with --lr"),
        ("quick", "efficientnet_b0", 4, {"batch_size": 64}, "sgd", 0.025, "0.05 * batch 64 / 128"),  # the user's beats it
        ("quick", "resnet18", 4, {"optimizer": "adamw"}, "adamw", 2e-3, "adamw at 0.001 * batch 128 / 64"),  # AdamW's own rule
        ("quick", "timm:vit_tiny_patch16_224", 4, {}, "adamw", 1e-3, "adamw at 0.001 * batch 64 / 64"),  # the ViT family's
        ("quick", "timm:vit_tiny_patch16_224", 4, {"optimizer": "sgd"}, "sgd", 0.025, "sgd at 0.05 * batch 64 / 128"),
        ("paper-imagenet", "resnet50", 8, {"optimizer": "adamw"}, "adamw", 1e-3, "adamw at 0.0005 * batch 1024 / 512"),
    ],
)
def test_every_preset_derives_its_lr_from_the_actual_batch_and_says_how(recipe, model, branches, overrides, optimizer, lr, rule):
    from rmn_fx.recipes.presets import resolve

    given = {"data": "digits", **overrides}
    values = resolve(recipe, model, branches, given)
    assert values["optimizer"] == optimizer
    assert values["lr"] == pytest.approx(lr)
    assert rule in values["lr_rule"]


def test_the_warm_up_starts_below_the_peak_whichever_optimizer_sets_it():
    """The quick recipe's warm-up start and final rate are fractions of the peak: AdamW's
    peak of 1e-3 must not warm 'up' from SGD's 0.01. The paper's are its absolute values."""
    from rmn_fx.recipes.presets import resolve

    for model, overrides in [("resnet18", {}), ("resnet18", {"optimizer": "adamw"}), ("timm:vit_tiny_patch16_224", {}), ("efficientnet_b0", {})]:
        values = resolve("quick", model, 4, overrides)
        assert values["lr_start"] == pytest.approx(0.2 * values["lr"]) and values["lr_end"] == pytest.approx(0.002 * values["lr"])
    assert resolve("quick", "resnet18", 4, {})["lr_start"] == pytest.approx(0.01)  # SGD's 0.05 peak, as before
    assert resolve("quick", "resnet18", 4, {"lr_start": 0.03})["lr_start"] == 0.03
    assert resolve("paper-imagenet", "resnet50", 8, {"data": "imagefolder:/data"})["lr_start"] == 1e-5


def test_run_config_round_trips_and_refuses_unknown_settings(tmp_path):
    from rmn_fx.recipes.config import RunConfig, RunError

    config = RunConfig.create("quick", "resnet18", 4, {"epochs": 2, "stem_epochs": 1}, {"routed": [2, 3], "stages": None})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert RunConfig.read(str(path)) == config
    path.write_text(json.dumps({**config.to_dict(), "learning_rate": 1}))
    with pytest.raises(RunError, match="learning_rate"):
        RunConfig.read(str(path))


def test_an_exploding_but_finite_loss_stops_training():
    """A loss that stays finite while it grows (the RMSprop failure) stops like a NaN."""
    from rmn_fx.recipes import DivergenceError, StepContext, train_epoch
    from rmn_fx.recipes.loop import LOSS_WINDOW

    model = torch.nn.Linear(4, 3)
    growing = iter(range(1, 100))
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(LOSS_WINDOW + 5)]
    loss = lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels) * 0 + float(next(growing))
    with pytest.raises(DivergenceError, match="exploded") as caught:
        train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.0), StepContext(max_loss=LOSS_WINDOW / 2 + 1), loss_fn=loss)
    assert caught.value.over_limit


def test_every_step_draws_from_its_own_seed():
    """Random draws inside a step depend on (seed, step, rank) only: what makes resume exact."""
    from rmn_fx.recipes import StepContext, train_epoch

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.draws = torch.nn.Linear(4, 3), []

        def forward(self, x):
            self.draws.append(torch.rand(1).item())
            return self.linear(x)

    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    runs = []
    for start in (0, 2):
        model = Noisy()
        torch.manual_seed(123 + start)  # whatever the global RNG held before
        train_epoch(model, data[start:], torch.optim.SGD(model.parameters(), lr=0.0), StepContext(seed=5), first_step=start)
        runs.append(model.draws)
    assert runs[1] == runs[0][2:]


def test_progress_prints_plain_lines_when_the_output_is_not_a_terminal(capsys):
    """Batch jobs (stderr to a file) get periodic plain lines with the live status."""
    from rmn_fx.recipes.progress import progress

    items = list(progress(range(3), "epoch 1/2", status=lambda: "loss 0.5", every=0.0))
    assert items == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("epoch 1/2: 3/3") and lines[-1].endswith("loss 0.5")
    assert list(progress(range(3), None)) == [0, 1, 2] and capsys.readouterr().err == ""


def test_routes_plot_shows_classes_and_hidden_contexts():
    from rmn_fx.recipes.report import plot_routes

    stages = [{"stage": i, "nmi_class": 0.1, "nmi_context": 0.7} for i in (2, 3)]  # stage 1 reported no routes
    evaluation = {
        "classes": ["a", "b"],
        "contexts": ["plain", "inverted", "rotated"],
        "routes_by_class": [[[3, 1], [0, 2]]] * 2,
        "routes_by_context": [[[4, 0, 1], [0, 2, 1]]] * 2,
        "stages": stages,
    }
    figure = plot_routes(evaluation)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    labels = [ax.get_xlabel() for ax in figure.axes if ax.get_title()]
    assert titles == ["stage 2, NMI 0.10", "stage 3, NMI 0.10", "stage 2, NMI 0.70", "stage 3, NMI 0.70"]
    assert labels == ["class", "class", "context", "context"]


def test_mixing_plot_shows_each_stages_mixing_matrix_and_combining_weights():
    from rmn_fx.recipes.report import plot_mixing

    mean_weights = [{"stage": 2, "mix": [[0.7, 0.4], [0.3, 0.6]]}, {"stage": 3, "mix": [[0.5, 0.5], [0.5, 0.5]], "combine": [0.8, 0.2]}]
    figure = plot_mixing(mean_weights)
    shown = [(ax.get_title(), [t.get_text() for t in ax.texts]) for ax in figure.axes if ax.get_title()]
    assert shown == [
        ("stage 2\nmixing: source path x destination path", ["0.70", "0.40", "0.30", "0.60"]),
        ("stage 3\nmixing: source path x destination path", ["0.50", "0.50", "0.50", "0.50"]),
        ("stage 3\ncombining weight per path", ["0.80", "0.20"]),
    ]


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_before_training_ends_the_run_at_once_with_one_line(signum, exit_code):
    """While the model is being built there is nothing to save: Slurm's SIGTERM (or Ctrl-C)
    ends the run with its exit code and a line saying so, and the handlers are restored."""
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match="before training started; nothing was saved") as caught:
        with stop_at_once():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
    assert caught.value.exit_code == exit_code
    assert signal.getsignal(signum) is before


def test_family_defaults_of_the_quick_recipe_yield_to_the_users_options():
    from rmn_fx.recipes.presets import resolve

    assert resolve("quick", "efficientnet_b0", 4, {})["classifier_init"] == "zero"
    assert resolve("quick", "resnet18", 4, {})["classifier_init"] == "model"
    assert resolve("quick", "efficientnet_b0", 4, {"classifier_init": "model"})["classifier_init"] == "model"
    assert resolve("quick", "resnet18", 4, {})["batch_size"] == 128
    vit = resolve("quick", "timm:vit_tiny_patch16_224", 4, {"weight_decay": 0.1})
    assert (vit["optimizer"], vit["weight_decay"], vit["batch_size"], vit["classifier_init"]) == ("adamw", 0.1, 64, "model")


def test_a_zero_classifier_starts_at_the_uniform_guess():
    import torchvision
    from torch import nn

    from rmn_fx.errors import OptionError
    from rmn_fx.recipes.builders import zero_classifier

    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    zero_classifier(model, 10)
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 10))
    assert model.classifier[1].weight.abs().sum() == 0
    with pytest.raises(OptionError, match="no linear layer with 7 outputs"):
        zero_classifier(nn.Sequential(nn.Linear(3, 10)), 7)


def test_the_seed_reaches_the_augmentation():
    first, again, other = (load_data("digits", 32, seed=s).train for s in (0, 0, 1))
    assert torch.equal(first[5][0], again[5][0])
    assert not torch.equal(first[5][0], other[5][0])
