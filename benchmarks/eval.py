"""HPSv2 scoring throughput: `HPSv2Scorer` (model loaded once, batches) vs the official call pattern
(`hpsv2.score`: model rebuilt on every call, one image at a time), on the CPU. Uses a small open_clip
architecture with random weights in the HPS checkpoint layout (ViT-H-14 needs ~5 GB and 12 s per build
here; pass --vit_h to include a batched ViT-H-14 measurement and its single-build cost).

Usage: python -m benchmarks.eval [--smoke] [--images 64]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shira_diffusion.evaluation import HPSv2Scorer, score_one_by_one

from .common import parser, write_result

SMALL = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 6, "width": 512, "patch_size": 32},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6}}


def checkpoint(name: str, config: dict | None, folder: Path) -> Path:
    import open_clip

    if config is not None:
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(str(folder / f"{name}.json"))
    model = open_clip.create_model(name, pretrained=None)
    path = folder / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--vit_h", action="store_true")
    args = p.parse_args()
    count = 8 if args.smoke else args.images
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(count)]
    prompts = [f"prompt {i}" for i in range(count)]
    folder = Path(tempfile.mkdtemp())
    rows = []
    models = [("small-clip (6+6 layers, width 512)", "bench-small-clip", SMALL)] + ([("ViT-H-14", "ViT-H-14", None)] if args.vit_h else [])
    for label, name, config in models:
        path = checkpoint(name, config, folder)
        start = time.perf_counter()
        scorer = HPSv2Scorer(path, model_name=name, batch_size=16)
        build = time.perf_counter() - start
        start = time.perf_counter()
        scorer.score(images, prompts)
        batched = count / (time.perf_counter() - start + build)
        if name == "ViT-H-14":  # rebuilding ViT-H-14 per image would take minutes: one call measured, scaled
            start = time.perf_counter()
            score_one_by_one(images[:1], prompts[:1], checkpoint=path, model_name=name)
            official = 1 / (time.perf_counter() - start)
        else:
            start = time.perf_counter()
            score_one_by_one(images, prompts, checkpoint=path, model_name=name)
            official = count / (time.perf_counter() - start)
        rows.append({"model": label, "images": count, "HPSv2Scorer images/s (incl. one load)": batched, "official pattern images/s": official, "speed-up": batched / official})
    write_result("eval", rows, args.out, ["CPU fp32; 512x512 inputs; target: >= 10x the official pattern for 64 images"], {"smoke": args.smoke})


if __name__ == "__main__":
    main()
