"""The world model's base quality: does it draw what the prompt names, and no style?

Every (shape, colour, background) combination, seen in training and held out, `--seeds` seeds each, judged by
the world judge (shape / colour / background / all-three accuracy; each style's mean strength and the share of
images where it reads as present). Plain prompts, no adapter.

Usage: python -m benchmarks.world_quality [--seeds 4] [--smoke]
"""

from __future__ import annotations

import time

from shira_diffusion import world
from shira_diffusion.world.evaluate import base_quality

from .common import parser, write_result


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds per combination (default 4)")
    args = p.parse_args()
    started = time.perf_counter()
    card = base_quality(world.pipeline(), world.Judge.load(), seeds=range(1 if args.smoke else args.seeds))
    rows = []
    for split, summary in card.items():
        row = {"combinations": split, "images": summary["count"]}
        row |= {f"{key} accuracy": summary[f"{key}_accuracy"] for key in ("shape", "colour", "background", "content")}
        for style, values in summary["styles"].items():
            row[f"{style} strength"] = values["mean"]
            row[f"{style} present"] = values["present"]
        rows.append(row)
    notes = [f"{world.INFERENCE_STEPS} DDIM steps, guidance {world.GUIDANCE_SCALE}, {world.RESOLUTION} px; a style is present above strength 0.25",
             f"wall time {time.perf_counter() - started:.0f} s"]
    write_result("world_quality", rows, args.out, notes, {"smoke": args.smoke})


if __name__ == "__main__":
    main()
