"""SHiRA sparse training under sharded data parallel, on this machine's CPUs and (where CUDA is) on GPUs.

What runs where (README "Distributed training: what is tested where"):
- CPU, 2 processes, gloo (default run): torch FSDP2 (`fully_shard`) and FSDP1 (use_orig_params) around the sparse
  trainable on the tiny SD UNet -- frozen weights sharded, only `shira_values` in the optimizer and reduced, the
  exported adapter equal to a one-process run on the same batches, and a resume from a full state dict.
- CPU: accelerate 1.16 cannot run FSDP or DeepSpeed there (test_accelerate_runs_an_fsdp_config_as_lone_processes_on_cpu),
  and `accelerate launch` with use_cpu starts one process (its CPU multi-process path is mpirun); DDP on CPU runs
  under torchrun with ACCELERATE_USE_CPU=true: tests/test_training.py::test_two_process_data_parallel_run_sparse_and_hook_agree.
- 2+ CUDA devices only (skipped here): `accelerate launch` with configs/accelerate/ddp.yaml, fsdp_gpu.yaml and
  deepspeed_zero2.yaml through the trainer, against each other and resumed.

The workers run this file as a module under torch.distributed.run: `python -m torch.distributed.run
--standalone --nproc_per_node 2 -m tests.test_distributed <mode> <output.json>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
STEPS, RESUME_AT, LR, DENSITY, BATCH = 4, 2, 5.0, 0.2, 4
# fp32 on 2 processes: the loss is a mean over each process's half batch, gradients are averaged by FSDP's
# reduce-scatter, a one-process run sums them in another order; after 4 Adam steps at lr 1e-2 the values
# differ by float reordering only (observed max |diff| ~1e-7; the bound leaves room for other BLAS builds).
ATOL = 2e-6


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_workers(mode: str, out: Path, nproc: int = 2) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "tests.test_distributed", mode, str(out)]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


# ---- the workers ------------------------------------------------------------------------------------------
def _setup(seed: int = 0, track: bool = True):
    """The tiny SD UNet, frozen, with the sparse trainable on every attention / feed-forward linear at random
    positions, an AdamW over the values tracked as the trainer does, and a fixed batch of BATCH examples."""
    from shira_diffusion.testing import tiny_components
    from shira_diffusion.trainables import UNET_TARGETS, find_targets, make_trainable

    unet = tiny_components("sd", seed=seed)["unet"]
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    positions = {}
    for name, module in sorted(find_targets(unet, UNET_TARGETS).items()):
        size = module.weight.numel()
        positions[name] = torch.randperm(size, generator=generator)[: int(DENSITY * size)].sort().values
    trainable = make_trainable(unet, "shira", positions=positions, impl="sparse")
    # SGD with momentum: linear in the gradients, so float reordering stays at reordering size (Adam divides tiny
    # gradients by their own size and amplifies it); the momentum buffers are optimizer state for the resume.
    optimizer = torch.optim.SGD([trainable.param_group(1e-2)], lr=LR, momentum=0.9)
    if track:  # before sharding, as training/loop.py does before accelerator.prepare
        trainable.track(optimizer)
    batch = (torch.randn(BATCH, 4, 8, 8, generator=generator), torch.randint(0, 1000, (BATCH,), generator=generator),
             torch.randn(BATCH, 7, 32, generator=generator), torch.randn(BATCH, 4, 8, 8, generator=generator))
    return unet, trainable, optimizer, batch


def _step(unet, optimizer, batch, rows: slice) -> float:
    sample, timesteps, text, target = (t[rows] for t in batch)
    loss = torch.nn.functional.mse_loss(unet(sample, timesteps, text).sample, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _shard(mode: str, unet, trainable, optimizer):
    """Wrap `unet` as accelerate would (per block, then the root) and point the optimizer at the new parameter
    objects (accelerate's prepare does the same swap)."""
    import torch.distributed as dist

    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(unet)
        return wrapped  # the same parameter objects: nothing to swap
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(unet, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(b) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)})
        wrapped = FullyShardedDataParallel(unet, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"),
                                           sharding_strategy=ShardingStrategy.FULL_SHARD)
    optimizer.param_groups[0]["params"] = [p for _, p in trainable.named_parameters()]
    return wrapped


def _full_values(mode: str, wrapped, trainable) -> dict[str, list[float]]:
    """The exported adapter's values, on every rank (export gathers: a collective)."""
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            return {n: d.deltas.tolist() for n, d in trainable.export().items()}
    return {n: d.deltas.tolist() for n, d in trainable.export().items()}


def _worker(modes: str, out: str) -> None:
    """Each of the comma-separated modes in turn, in one process group (one start-up for several runs)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {mode: _run_mode(mode) for mode in modes.split(",")}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _run_mode(mode: str) -> dict:
    """fsdp2 and ddp track the optimizer as training/loop.py does today; fsdp1 runs untracked, as the loop does
    once it stops tracking under FSDP / DeepSpeed (the report's loop.py change)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    result: dict = {"world": world}

    unet, trainable, optimizer, batch = _setup(track=mode != "fsdp1")
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if not n.endswith("shira_values")}
    wrapped = _shard(mode, unet, trainable, optimizer)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    # what is sharded, what is trained
    result["optimizer_holds_only_values"] = all(p.numel() < 10**6 and p.requires_grad for p in trained) and \
        {id(p) for p in trained} == {id(p) for _, p in trainable.named_parameters()}
    local = {n: p for n, p in unet.named_parameters() if not n.endswith("shira_values")}
    if mode == "fsdp2":  # every frozen weight a DTensor split along dim 0
        result["frozen_sharded"] = all(p.placements[0].is_shard(0) and p.to_local().shape[0] <= -(-base[n].shape[0] // world)
                                       and not p.requires_grad for n, p in local.items())
    elif mode == "fsdp1":  # use_orig_params: flat 1-D views of this rank's part of each unit's flat parameter
        held = sum(p.numel() for p in local.values())
        result["frozen_sharded"] = all(p.dim() == 1 and not p.requires_grad for p in local.values()) and \
            held <= 0.6 * sum(t.numel() for t in base.values())
    else:  # DDP: every process holds everything
        result["frozen_sharded"] = False
    losses = []
    for _ in range(STEPS):
        losses.append(_step(wrapped, optimizer, batch, rows))
    result["values"] = _full_values(mode, wrapped, trainable)
    loss_tensor = torch.tensor(losses)
    dist.all_reduce(loss_tensor)
    result["losses"] = (loss_tensor / world).tolist()
    if mode == "fsdp2":  # the frozen shards were never written: W0 + v lives only in the gathered copies
        result["frozen_untouched"] = all(torch.equal(p.full_tensor(), base[n]) for n, p in local.items())
        result["resumed"] = _resume_fsdp2(rows)
    if mode == "ddp":  # still tracked after the steps: written once per step, not at every forward
        result["tracked"] = all(bool(m.__dict__.get("shira_tracked")) for m in trainable.modules.values())
    else:  # FSDP: the step hook gave tracking up (fsdp2: the weights are new tensors; fsdp1: untracked from the start)
        result["tracked"] = any(bool(m.__dict__.get("shira_tracked")) and m.shira_tracked() is m.weight for m in trainable.modules.values())
    return result


def _resume_fsdp2(rows: slice) -> dict[str, list[float]]:
    """RESUME_AT steps, a full (unsharded) state dict of the values and the optimizer, a fresh sharded model
    that loads it, the remaining steps: the values an uninterrupted run ends with."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)  # every rank gets the whole tensors
    unet, trainable, optimizer, batch = _setup()
    wrapped = _shard("fsdp2", unet, trainable, optimizer)
    for _ in range(RESUME_AT):
        _step(wrapped, optimizer, batch, rows)
    model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=options)
    values = {k: v for k, v in model_state.items() if k.endswith("shira_values")}  # what a checkpoint keeps
    unet, trainable, optimizer, batch = _setup()
    wrapped = _shard("fsdp2", unet, trainable, optimizer)
    set_state_dict(wrapped, optimizer, model_state_dict=values, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    for _ in range(STEPS - RESUME_AT):
        _step(wrapped, optimizer, batch, rows)
    return _full_values("fsdp2", wrapped, trainable)


def _reference() -> dict:
    """One process, the whole batch per step."""
    torch.set_num_threads(1)
    unet, trainable, optimizer, batch = _setup()
    losses = [_step(unet, optimizer, batch, slice(None)) for _ in range(STEPS)]
    return {"losses": losses, "values": {n: d.deltas.tolist() for n, d in trainable.export().items()}, "trainable": trainable, "unet": unet}


# ---- the tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    return _reference()


def _assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), atol=ATOL, rtol=0, msg=name)


def _assert_like_one_process(result: dict, reference: dict) -> None:
    assert result["world"] == 2 and result["optimizer_holds_only_values"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), atol=1e-6, rtol=1e-5)
    _assert_same_values(result["values"], reference["values"])


def test_fsdp2_two_cpu_processes_train_the_sharded_values_like_one_process(reference, tmp_path):
    """torch FSDP2 (`fully_shard` per block and at the root, gloo): the frozen weights are sharded DTensors
    whose shards are never written (W0 + v exists only in the gathered copies, forward and backward), the
    optimizer holds only the values, the adapter and the losses are the one-process run's, and a run resumed
    from a full state dict of the values and the optimizer ends where the uninterrupted one does."""
    result = _run_workers("fsdp2", tmp_path / "fsdp2.json")["fsdp2"]
    _assert_like_one_process(result, reference)
    assert result["frozen_sharded"] and result["frozen_untouched"] and not result["tracked"]
    assert max(abs(v) for vs in reference["values"].values() for v in vs) > 0.05  # the values did move
    _assert_same_values(result["resumed"], reference["values"])


@pytest.mark.slow
def test_fsdp1_and_ddp_two_cpu_processes_train_like_one_process(reference, tmp_path):
    """FSDP1 (FULL_SHARD, use_orig_params, untracked as the trainer runs it) and DDP (tracked: one write per
    step) on 2 gloo processes give the one-process adapter."""
    results = _run_workers("fsdp1,ddp", tmp_path / "more.json")
    _assert_like_one_process(results["fsdp1"], reference)
    assert results["fsdp1"]["frozen_sharded"] and not results["fsdp1"]["tracked"]
    _assert_like_one_process(results["ddp"], reference)
    assert results["ddp"]["tracked"] and not results["ddp"]["frozen_sharded"]


# ---- accelerate launch with the shipped configs ---------------------------------------------------------------
PROBE = """
from accelerate import Accelerator
accelerator = Accelerator()
print("probe", accelerator.distributed_type, accelerator.num_processes, accelerator.process_index, flush=True)
"""


def _launch(config: str, arguments: list[str], cpu: bool) -> subprocess.CompletedProcess:
    env = _env() if not cpu else {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"), *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _train_arguments(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "shira_diffusion", "train", "--pretrained_model_name_or_path", model, "--train_data_dir", data,
            "--output_dir", str(out), "--resolution", "32", "--center_crop", "--train_batch_size", "1", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--density", "0.2", "--impl", "sparse", "--calibration_batches", "1", "--report_to", "none",
            "--checkpointing_steps", "2", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from shira_diffusion.testing import tiny_pipeline

    from .helpers import draw_style_folder

    root = tmp_path_factory.mktemp("dist")
    tiny_pipeline("sd").save_pretrained(root / "model")
    return {"model": str(root / "model"), "data": str(draw_style_folder(root / "data"))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="documents accelerate's behaviour on CPU-only machines")
def test_accelerate_runs_an_fsdp_config_as_lone_processes_on_cpu(tmp_path):
    """accelerate 1.16 has no FSDP on CPU: `accelerate launch` with an FSDP config starts the processes (WORLD_SIZE 2)
    but each one sets up no process group (DistributedType.NO, 1 process) -- two whole, unsynchronised runs, which
    training/loop.py should refuse (the report's _make_accelerator change). If this starts failing, accelerate gained
    CPU FSDP: test the trainer through it and update the README's table."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = _launch("fsdp_gpu", [str(probe)], cpu=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("probe"))
    assert lines == ["probe DistributedType.NO 1 0"] * 2, done.stdout


def _deepspeed_missing() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or deepspeed's own errors when it finds no CUDA toolkit
        return True
    return False


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("config", ["fsdp_gpu", "deepspeed_zero2"])
def test_accelerate_launch_on_gpus(config, tiny_model, tmp_path):
    """GPU only: the sharded configs end with the DDP config's adapter (same processes, batches and noise; float
    reordering only) and a run resumed from checkpoint-2 ends with the uninterrupted run's adapter."""
    from shira_diffusion import ShiraAdapter

    if config.startswith("deepspeed") and _deepspeed_missing():
        pytest.skip("deepspeed is not installed")
    adapters = {}
    for name in ("ddp", config):
        done = _launch(name, _train_arguments(tiny_model["model"], tiny_model["data"], tmp_path / name), cpu=False)
        assert done.returncode == 0, done.stderr[-3000:]
        adapters[name] = ShiraAdapter.load(tmp_path / name / "shira_weights.safetensors")
    resumed = tmp_path / f"{config}_resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(tmp_path / config / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(tmp_path / config / "masks.safetensors", resumed / "masks.safetensors")
    done = _launch(config, _train_arguments(tiny_model["model"], tiny_model["data"], resumed, "--resume_from_checkpoint", "latest"), cpu=False)
    assert done.returncode == 0, done.stderr[-3000:]
    adapters["resumed"] = ShiraAdapter.load(resumed / "shira_weights.safetensors")
    for other in (config, "resumed"):
        for (_, name, a), (_, _, b) in zip(adapters["ddp"].items(), adapters[other].items(), strict=True):
            assert torch.equal(a.positions, b.positions), name
            # Adam at lr 1e-2 divides each gradient by its own size: reordered sums move tiny-gradient values by
            # up to ~1e-4 (4 steps); a missed W0 + v write moves them by ~lr (see the CPU tests above).
            torch.testing.assert_close(b.deltas, a.deltas, atol=1e-4, rtol=0, msg=f"{other}: {name}")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
