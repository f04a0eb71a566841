"""On a CUDA device, for every routing rule: the GPU computes what the CPU computes (eval,
route for route, and training steps), float16 and bfloat16 autocast keep the routes and the
float32 state, torch.compile's default backend (Inductor's Triton kernels) and torch.export
programs match eager; `rmn-fx train` runs on CUDA in one process and under torchrun with
NCCL and SyncBatchNorm. Skipped without a GPU; `.ci/gpu` runs them where one is lent."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import (
    ROUTING_IDS,
    ROUTINGS,
    SIZE,
    metrics,
    routed_stages,
    routings,
    spread_routes,
    tiny_converted,
    torchrun,
    trained_run,
)

import rmn_fx
from rmn_fx.measure import relative_error
from rmn_fx.nn.modes import hooks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
TRAIN = ["train", "tiny_models:tiny_cnn", "-b", "3", "--epochs", "2", "--stem-epochs", "1", "--batch-size", "64", "--lr", "0.05", "--device", "cuda"]


@pytest.fixture(autouse=True)
def float32_kernels():
    """TF32 off, so that the GPU's float32 convolutions and matrix products round like the
    CPU's and a difference means a different computation."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch(size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, *SIZE, generator=torch.Generator().manual_seed(seed))


def spreading_batch(copies: int = 1) -> torch.Tensor:
    """tiny_converted's spreading samples (each at its memory, or its gate's weights) `copies`
    times: the CPU's and the GPU's roundings (1e-6) cannot flip their routes, as they can
    for a random input's key between two memories of random inputs (4e-4 apart in tiny_cnn)."""
    return batch(8, 3).repeat(copies, 1, 1, 1)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, name: str = "") -> None:
    """Largest difference within `rtol` of the larger tensor's largest magnitude, plus 1e-6
    for tensors near zero (a bias at 1e-7 after one step differs by rounding alone)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert (a - b).abs().max() <= rtol * max(a.abs().max(), b.abs().max()) + 1e-6, name


def routes_and_output(gm, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The first choice of every routed stage that has one, and the output of `gm` on `x`, on the CPU."""
    routes: list[torch.Tensor] = []

    def record(stage, args) -> None:
        if (route := stage.first_choice(args[0])) is not None:
            routes.append(route.cpu())

    with hooks(s.register_forward_pre_hook(record) for s in routed_stages(gm)), torch.no_grad():
        out = gm(x)
    return routes, out.float().cpu()


def assert_cuda_takes_the_cpu_routes(gm, x: torch.Tensor) -> None:
    """A copy of `gm` on the GPU takes the CPU's routes on `x` and gives its output within 1e-5."""
    routes, want = routes_and_output(gm, x)
    gpu_routes, got = routes_and_output(copy.deepcopy(gm).to(CUDA), x.to(CUDA))
    assert all(torch.equal(a, b) for a, b in zip(routes, gpu_routes))
    assert relative_error(want, got) <= 1e-5


@routings
def test_eval_on_cuda_takes_the_cpu_routes_and_matches_its_output(rule, options):
    assert_cuda_takes_the_cpu_routes(tiny_converted(rule, options), spreading_batch(2))


def test_resnet18_on_cuda_takes_the_cpu_routes_and_matches_its_output():
    gm = rmn_fx.transform("resnet18", branches=4, input_size=(3, 64, 64))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spread_routes(gm, x)
    assert_cuda_takes_the_cpu_routes(gm, x)


TRAINING_ROUTINGS = [(r, o) for r, o in ROUTINGS if o.get("top_k", 1) == 1]  # one route to compare per sample


@pytest.mark.parametrize("rule, options", TRAINING_ROUTINGS, ids=[i for i, r in zip(ROUTING_IDS, ROUTINGS) if r in TRAINING_ROUTINGS])
def test_training_steps_on_cuda_match_the_cpu(rule, options):
    """Forward, backward and an SGD step from the same state (re-synced each step): losses,
    parameters and buffers (memories, sample counters, BatchNorm statistics) agree. Not for
    a top-2 gate: the spreading points each sample's first choice only, and its second is a
    near-tie that the GPU's rounding flipped on the H200 (loss 2.4562 against 2.4613)."""
    cpu = tiny_converted(rule, options).train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (cpu, gpu)]
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        gpu.load_state_dict(cpu.state_dict())
        x, y = spreading_batch(2), torch.randint(10, (16,), generator=generator)
        losses = []
        for model, optimizer in zip((cpu, gpu), optimizers):
            device = next(model.parameters()).device
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().cpu())
        assert_close(losses[0], losses[1], 1e-4)
        gpu_state = gpu.state_dict()
        for name, value in cpu.state_dict().items():
            assert_close(value, gpu_state[name], 1e-4, name)


@routings
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_autocast_keeps_the_routes_and_the_float32_state(rule, options, dtype):
    """On the spreading samples, float16 autocast takes the float32 routes. bfloat16 rounds keys by more than random inputs' memories lie
    apart in tiny_cnn's later stages (4e-4), so there only the output is compared."""
    gm = tiny_converted(rule, options).to(CUDA)
    x = spreading_batch().to(CUDA)
    routes, full = routes_and_output(gm, x)
    with torch.autocast("cuda", dtype=dtype):
        mixed_routes, mixed = routes_and_output(gm, x)
        gm.train()
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        scaler.scale(gm(x).float().logsumexp(1).mean()).backward()
    if dtype == torch.float16:
        assert all(torch.equal(a, b) for a, b in zip(routes, mixed_routes))
    assert relative_error(full, mixed) <= (1e-2 if dtype == torch.float16 else 5e-2)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in gm.parameters())
    assert all(t.dtype != dtype for t in gm.state_dict().values())  # memories, counters, statistics stay float32


@pytest.mark.parametrize("rule, options", [ROUTINGS[0], ROUTINGS[3], ROUTINGS[5]], ids=[ROUTING_IDS[0], ROUTING_IDS[3], ROUTING_IDS[5]])
def test_inductor_compiled_model_matches_eager_on_cuda(rule, options):
    """The default backend, as users call it: Triton kernels, in eval and in a training step.
    A procedure that receives no sample has no gradient eagerly; compiled (torch 2.11 on the
    H200) it was seen to get a zero one, the same SGD step, so the two compare as equal."""
    gm = tiny_converted(rule, options).to(CUDA)
    compiled = torch.compile(copy.deepcopy(gm))
    with torch.no_grad():
        for size in (16, 16, 5):
            x = batch(size, size).to(CUDA)
            assert relative_error(gm(x), compiled(x)) <= 1e-4
    gm.train()
    compiled.train()
    x, y = spreading_batch(2).to(CUDA), torch.arange(16, device=CUDA) % 10
    for forward in (gm, compiled):
        torch.nn.functional.cross_entropy(forward(x), y).backward()
    compiled_parameters = dict(compiled.named_parameters())
    for name, p in gm.named_parameters():
        q = compiled_parameters[f"_orig_mod.{name}"]
        assert p.grad is not None or q.grad is None or not q.grad.any(), name
        if p.grad is not None:
            assert q.grad is not None, name
            assert_close(p.grad, q.grad, 1e-3, name)


@routings
def test_exported_program_runs_on_cuda_like_eager(rule, options):
    gm = tiny_converted(rule, options).to(CUDA)
    program = rmn_fx.export(gm, "pt2").module()
    with torch.no_grad():
        for size in (1, 7, 16):
            x = batch(size, size).to(CUDA)
            assert relative_error(gm(x), program(x)) <= 1e-5


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> Path:
    """`rmn-fx train` on CUDA, mixed precision by default there (float16 and a GradScaler)."""
    return trained_run(tmp_path_factory.mktemp("cuda"), *TRAIN[1:])


def test_training_on_cuda_in_mixed_precision_learns_and_saves_float32(cuda_run):
    rows = metrics(cuda_run)
    assert [r["phase"] for r in rows] == ["stem", "routed"]
    assert rows[-1]["test_accuracy"] > 0.3  # ten classes
    state = torch.load(cuda_run / "model.pt", weights_only=True)["state_dict"]
    assert all(v.dtype not in (torch.float16, torch.bfloat16) and v.device.type == "cpu" for v in state.values())
    rmn_fx.load(str(cuda_run / "model.pt"), trust_factory=True)


def test_torchrun_with_nccl_and_sync_batch_norm_trains_like_one_process(cuda_run, tmp_path):
    """One process under torchrun joins an NCCL group of one: DDP, SyncBatchNorm and the
    memories' all-reduce run as on many GPUs, and the losses stay those of the plain run."""
    done = torchrun(1, *TRAIN, "--sync-bn", "-o", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, ddp = metrics(cuda_run), metrics(tmp_path / "ddp")
    assert ddp[-1]["memory_spread_across_ranks"] == 0.0  # reported by the distributed path only
    assert ddp[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=2e-2)
    assert ddp[-1]["test_accuracy"] > 0.3
