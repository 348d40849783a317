"""Small helpers shared by the tests: random sparse adapters over a pipeline, weight snapshots."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shira_diffusion import ShiraAdapter, SparseDelta

TARGET_SUFFIXES = ("to_q.weight", "to_v.weight", "ff.net.2.weight", "q_proj.weight", "fc1.weight", "conv1.weight")


def modules(pipe) -> dict[str, nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, nn.Module)}


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of every component, cloned to the CPU."""
    return {f"{c}.{n}": p.detach().cpu().clone() for c, m in modules(pipe).items() for n, p in m.named_parameters()}


def assert_unchanged(pipe, before: dict[str, torch.Tensor], new_layers: bool = False) -> None:
    """Every parameter in `before` holds the same bits; `new_layers`: parameters added since (fused copies) are fine."""
    after = snapshot(pipe)
    assert after.keys() >= before.keys() if new_layers else after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]  # bit-exact, not allclose
    assert not changed, f"{len(changed)} parameters changed, e.g. {changed[:3]}"


def random_adapter(
    pipe,
    seed: int,
    components: tuple[str, ...] = ("unet", "text_encoder"),
    density: float = 0.05,
    scale: float = 0.5,
    suffixes: tuple[str, ...] = TARGET_SUFFIXES,
) -> ShiraAdapter:
    """A SHiRA adapter with random positions and values on the pipeline's matching weights."""
    generator = torch.Generator().manual_seed(seed)
    deltas: dict[str, dict[str, SparseDelta]] = {}
    for component in components:
        for name, parameter in getattr(pipe, component).named_parameters():
            if parameter.dim() < 2 or not name.endswith(suffixes):
                continue
            size = parameter.numel()
            count = max(1, int(size * density))
            positions = torch.randperm(size, generator=generator)[:count].sort().values
            values = torch.randn(count, generator=generator) * scale
            deltas.setdefault(component, {})[name] = SparseDelta(tuple(parameter.shape), positions, values)
    return ShiraAdapter(deltas)


def draw_style_folder(folder: Path, count: int = 6, captions: bool = True) -> Path:
    """Small procedural training images (an orange square on a blue ground, moved per image) with a
    metadata.jsonl of captions, one per line."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        pixels = np.zeros((40, 48, 3), np.uint8)
        pixels[..., 2] = 200
        pixels[8 + i : 28 + i, 6 + 3 * i : 26 + 3 * i] = (255, 140, 20)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"shape {i}, blue fire style"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP threads make
    each step up to 50x slower. Import it into a test module to apply it there (autouse, per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finishes(fifo: Path, work, timeout: float = 120.0):
    """work() in a thread; if it blocks (opened the FIFO), unblock it by writing to the FIFO and fail."""
    result = {}

    def target():
        try:
            result["value"] = work()
        except BaseException as error:  # noqa: BLE001 -- re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets EOF
        thread.join(30)
        pytest.fail(f"blocked on the FIFO {fifo.name}")
    if "error" in result:
        raise result["error"]
    return result.get("value")
