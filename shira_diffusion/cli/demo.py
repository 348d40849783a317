"""`shira-diffusion demo`: train two styles, switch, fuse, measure retention, write a report — offline.

Usage: shira-diffusion demo --out shira-demo            (tiny pipeline, about 1-2 minutes on 2 CPU cores)
       shira-diffusion demo --model stable-diffusion-v1-5/stable-diffusion-v1-5 --hps_checkpoint HPS_v2.1_compressed.pt
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="shira-demo", help="report folder (default shira-demo)")
    parser.add_argument("--model", default=None, help="a real SD 1.x pipeline (folder or Hub id); default: the embedded tiny pipeline")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 60 tiny / 400 real)")
    parser.add_argument("--resolution", type=int, default=None, help="training and sampling resolution (default 32 tiny / 512 real)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank = SHiRA budget r*(m+n) (default 4)")
    parser.add_argument("--mask", default="struct", help="SHiRA mask (default struct)")
    parser.add_argument("--learning_rate", type=float, default=None, help="default 1e-2 tiny / 1e-4 real")
    parser.add_argument("--inference_steps", type=int, default=None, help="sampling steps (default 4 tiny / 30 real)")
    parser.add_argument("--hps_checkpoint", default=None, help="HPS_v2.1_compressed.pt (or .safetensors) for scoring with --model; loaded before training")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    config = DemoConfig(args.out, args.model, args.steps, args.resolution, args.rank, args.mask, args.learning_rate, args.inference_steps, args.hps_checkpoint, args.seed)
    results = run_demo(config)
    print(f"report: {args.out}/report.md")
    for method, values in results["fusion_retention"].items():
        print(f"  {method}: retention under fusion A {values['A']:.3f}, B {values['B']:.3f}")
    for name, ms in results["switch_ms"].items():
        print(f"  {name}: {ms:.2f} ms")
    return 0
