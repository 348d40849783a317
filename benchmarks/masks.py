"""Mask construction time: each mask of the registry (`masks.MASKS`, five today) for all 160 attention + FF
linears of an SD 1.5-shaped UNet at 2 % density (grad and snip from given gradients: calibration batches
excluded).

Usage: python -m benchmarks.masks [--smoke]
"""

from __future__ import annotations

import torch

from shira_diffusion.masks import MASK_TYPES, build_masks

from .common import median_ms, parser, sd15_unet, target_weights, write_result


def main() -> None:
    args = parser(__doc__).parse_args()
    weights = target_weights(sd15_unet(args.smoke))
    generator = torch.Generator().manual_seed(0)
    gradients = {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}
    rows = []
    for mask in MASK_TYPES:
        ms = median_ms(lambda: build_masks(weights, mask, density=0.02, gradients=gradients), args.repeats)
        rows.append({"mask": mask, "seconds": ms / 1000})
    rows.append({"mask": f"all {len(MASK_TYPES)}", "seconds": sum(r["seconds"] for r in rows)})
    note = f"{len(weights)} weights, {sum(w.numel() for w in weights.values()):,} entries; target: all {len(MASK_TYPES)} < 5 s"
    write_result("masks", rows, args.out, [note], {"smoke": args.smoke})


if __name__ == "__main__":
    main()
