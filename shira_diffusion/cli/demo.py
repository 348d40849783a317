"""`shira-diffusion demo`: the whole story offline on the shapes world — styles learnt, switched, fused, judged.

Usage: shira-diffusion demo --out shira-demo            (the world model; a few minutes on 2 CPU cores)
       shira-diffusion demo --live all                  (train all four adapters live instead of one)
       shira-diffusion demo --model stable-diffusion-v1-5/stable-diffusion-v1-5 --hps_checkpoint HPS_v2.1_compressed.pt
"""

from __future__ import annotations

import argparse

from ..trainables import ADAPTERS
from . import positive_int, resolution

LIVE_CHOICES = ("shira:blue fire", "shira:painting", "lora:blue fire", "lora:painting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="shira-demo", help="report folder (default shira-demo)")
    parser.add_argument("--model", default=None, help="a real SD 1.x pipeline (folder or Hub id); default: the shapes world model")
    parser.add_argument("--live", nargs="+", default=["shira:blue fire"], metavar="METHOD:STYLE",
                        help=f"world adapters trained during the demo, the others come shipped: any of {list(LIVE_CHOICES)} or 'all' (default: shira:blue fire)")
    parser.add_argument("--seeds", type=positive_int, default=2, help="world: sampling seeds per prompt for the judged numbers (default 2)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per adapter (default: the world recipe's 250 / 400 real)")
    parser.add_argument("--seed", type=int, default=0)
    real = parser.add_argument_group("with --model (a real SD 1.x model)")
    real.add_argument("--resolution", type=resolution, default=None, help="training and sampling resolution (default 512)")
    real.add_argument("--rank", type=positive_int, default=None, help="LoRA rank = SHiRA budget r*(m+n) (default 4)")
    real.add_argument("--mask", default=None, help="SHiRA mask (default struct)")
    real.add_argument("--learning_rate", type=float, default=None, help="default 1e-4")
    real.add_argument("--inference_steps", type=positive_int, default=None, help="sampling steps (default 30)")
    real.add_argument("--hps_checkpoint", default=None, help="HPS_v2.1_compressed.pt (or .safetensors) for scoring; loaded before training")


def _live(values: list[str]) -> tuple[str, ...]:
    if values == ["all"]:
        return LIVE_CHOICES
    unknown = [v for v in values if v not in LIVE_CHOICES]
    if unknown:
        raise ValueError(f"--live {unknown[0]!r}: expected 'all' or any of {list(LIVE_CHOICES)}")
    return tuple(values)


REAL_MODEL_FLAGS = ("resolution", "rank", "mask", "learning_rate", "inference_steps", "hps_checkpoint")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        given = [flag for flag in REAL_MODEL_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"--{given[0]} needs --model: the shapes-world demo uses the world's own resolution, recipe and judge")
        from ..demo import WorldDemoConfig, run_world_demo

        results = run_world_demo(WorldDemoConfig(args.out, _live(args.live), args.seeds, args.steps, args.seed))
        print(f"report: {args.out}/report.md")
        for method, table in ((m, results["judge"][m]) for m in ADAPTERS):
            print(f"  {method}: concept retention under fusion " + ", ".join(f"{s} {v:.2f}" for s, v in table["retention"].items()))
        for name, ms in results["switch_ms"].items():
            print(f"  {name}: {ms:.2f} ms")
        return 0
    from ..demo_model import DemoConfig, run_demo

    config = DemoConfig(args.out, args.model, args.steps, args.resolution, args.rank or 4, args.mask or "struct", args.learning_rate,
                        args.inference_steps, args.hps_checkpoint, args.seed)
    results = run_demo(config)
    print(f"report: {args.out}/report.md")
    for method, values in results["fusion_retention"].items():
        print(f"  {method}: retention under fusion A {values['A']:.3f}, B {values['B']:.3f}")
    for name, ms in results["switch_ms"].items():
        print(f"  {name}: {ms:.2f} ms")
    return 0
