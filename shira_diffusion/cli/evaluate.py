"""`shira-diffusion eval`: generate every prompt x seed x alpha for the base model, each adapter and each
fusion, score with HPSv2, write records, the paper-style summary table, grids and a score-vs-alpha plot.

Usage: shira-diffusion eval --pretrained_model_name_or_path MODEL --adapter bluefire=b.safetensors \\
       --adapter paintings=p.safetensors --fusion bluefire+paintings:0.7,0.5 --prompts prompts.json --num_seeds 30
"""

from __future__ import annotations

import argparse

from . import float32, positive_int, resolution


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers model folder or Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model")
    parser.add_argument("--variant", default=None, help="weights variant of the model, e.g. fp16")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a SHiRA or LoRA .safetensors file, or the training output folder holding it (repeat)")
    parser.add_argument("--fusion", action="append", default=[], metavar="A+B[:WA,WB]", help="adapters to fuse, with weights (repeat; labelled A+B@WA,WB)")
    parser.add_argument("--prompts", required=True, help="prompt file (.txt one per line, or .json)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="explicit seeds")
    seeds.add_argument("--num_seeds", type=positive_int, default=30, help="seeds 0..N-1 (default 30, as in the paper)")
    parser.add_argument("--alphas", type=float32, nargs="+", default=[1.0, 0.75, 0.5], help="adapter strengths (default 1 0.75 0.5)")
    parser.add_argument("--no_base", action="store_true", help="skip the base model")
    parser.add_argument("--output_dir", default="shira-eval", help="results folder; a rerun with the same settings resumes it")
    parser.add_argument("--overwrite", action="store_true", help="discard the results already in --output_dir (needed when the settings changed)")
    parser.add_argument("--num_inference_steps", type=positive_int, default=30, help="denoising steps per image (default 30)")
    parser.add_argument("--guidance_scale", type=float32, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--resolution", type=resolution, default=None, help="image size (default: the model's)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="pipeline dtype (default fp16 on GPU)")
    parser.add_argument("--hps_checkpoint", default=None, help="local HPS_v2*.pt (tensors only, read with weights_only=True) or .safetensors "
                        "(default: the official file in $HPS_ROOT or ~/.cache/hpsv2, else from the Hub repo xswu/HPSv2)")
    parser.add_argument("--hps_version", choices=["v2.0", "v2.1"], default=None,
                        help="HPS version (default: read from an official checkpoint file name, HPS_v2_compressed.pt = v2.0, "
                        "HPS_v2.1_compressed.pt = v2.1; v2.1 otherwise, reported as assumed); must match an official file name")
    parser.add_argument("--hps_model", default="ViT-H-14", help="open_clip architecture (default ViT-H-14)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="images per scoring batch")
    parser.add_argument("--no_score", action="store_true", help="generate only (no HPSv2 checkpoint needed)")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from accelerate import PartialState

    from ..evaluation import Fusion, HPSv2Scorer, MissingExtraError, check_model_source, load_pipeline, load_prompts, resolve_adapter, run_evaluation
    from ..evaluation.hps import require_extra
    from ..loaders import add_shira_support

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=FILE")
        if name in adapters:
            raise ValueError(f"--adapter {name}: given twice")
        resolve_adapter(name, path)  # a missing, corrupt or foreign file fails here, before any model is loaded
        adapters[name] = path
    fusions = [Fusion.parse(text) for text in args.fusion]
    prompts = load_prompts(args.prompts)
    check_model_source(args.pretrained_model_name_or_path, args.revision)  # seconds, not minutes of retries
    device = PartialState().device
    precision = args.mixed_precision or ("fp16" if device.type == "cuda" else "no")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
    try:  # the eval extra, checked before minutes of model loading
        if not args.no_score:
            require_extra("matplotlib", "the evaluation's score-vs-alpha plot")
        scorer = None if args.no_score else HPSv2Scorer(args.hps_checkpoint, args.hps_version, device=device, model_name=args.hps_model, batch_size=args.batch_size)
    except MissingExtraError as error:
        raise MissingExtraError(f"{error} (or generate without scoring: --no_score)", name=error.name) from None
    if scorer is not None and scorer.version_note and PartialState().is_main_process:
        print(f"note: {scorer.version_note}", file=sys.stderr)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype)
    pipe = add_shira_support(pipe.to(device))  # the runner turns the pipeline's own progress bar off while it runs
    result = run_evaluation(
        pipe, adapters, prompts, args.seeds or range(args.num_seeds), args.output_dir, scorer=scorer, alphas=args.alphas,
        fusions=fusions, include_base=not args.no_base, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution, model_id=args.pretrained_model_name_or_path,
        overwrite=args.overwrite, extra_settings={"revision": args.revision, "variant": args.variant},
    )
    if PartialState().is_main_process:
        print((result.out_dir / "summary.md").read_text())
        print(f"{result.generated} images generated, {result.scored} scored, {len(result.records)} records in {result.out_dir}")
    return 0
