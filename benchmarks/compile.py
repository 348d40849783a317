"""Compiled UNet: recompilations and time per switch over 10 switches between adapters with *different*
target sets, this package vs diffusers' LoRA hotswap (`enable_lora_hotswap` + `load_lora_weights(hotswap=True)`).

On the CPU, torch.compile's backend is "eager" by default: guards and recompilations behave as with inductor,
without minutes of CPU code generation. On a GPU the default is inductor, the UNet in fp16 at 64x64 latents.

Usage: python -m benchmarks.compile [--smoke] [--device cpu|cuda] [--backend eager|inductor]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import half, median_ms, parse, parser, sd15_pipeline, shira_adapter, target_weights, write_result


def recompiles() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0


def under_compile(unet, backend: str, inputs: tuple, switch) -> tuple[int, float]:
    """Compile `unet`, then 10 times: `switch("ff" / "attn")` and a compiled step. (recompilations, median ms)"""
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=backend)
    with torch.no_grad():
        compiled(*inputs)
        start = recompiles()
        order = iter(["ff", "attn"] * 5)
        per_switch = median_ms(lambda: (switch(next(order)), compiled(*inputs)), 10, warmup=0)
        return recompiles() - start, per_switch


def main() -> None:
    p = parser(__doc__, device=True)
    p.add_argument("--backend", help="torch.compile backend (default: eager on the CPU, inductor on a GPU)")
    args = parse(p)
    backend = args.backend or ("inductor" if args.device == "cuda" else "eager")
    from diffusers import StableDiffusionPipeline

    dtype = half(args.device)
    pipe = sd15_pipeline(args.smoke, dtype, args.device)
    unet = pipe.unet
    size = unet.config.sample_size if args.smoke or args.device == "cuda" else 8
    inputs = (torch.randn(1, 4, size, size, device=args.device, dtype=dtype), torch.tensor([500], device=args.device),
              torch.randn(1, 77, unet.config.cross_attention_dim, device=args.device, dtype=dtype))
    attention = shira_adapter(unet, seed=1)
    attention.deltas["unet"] = {n: d for n, d in attention.deltas["unet"].items() if ".attn" in n}
    feedforward = shira_adapter(unet, seed=2)
    feedforward.deltas["unet"] = {n: d for n, d in feedforward.deltas["unet"].items() if ".ff." in n}
    pipe.load_shira_weights(attention, adapter_name="attn")
    pipe.load_shira_weights(feedforward, adapter_name="ff")
    pipe.set_shira_adapters("attn")
    count, per_switch = under_compile(unet, backend, inputs, lambda label: pipe.set_shira_adapters(label))
    pipe.unload_shira_weights()
    rows = [{"method": "shira-diffusion (attention-only <-> FF-only adapters)", "switches": 10, "recompilations": count, "ms per switch + step": per_switch}]

    # the same with our hotswap from files: one adapter name, its target set changing at every switch
    work = Path(tempfile.mkdtemp())
    shira_files = {"attn": attention.save(work / "attn.safetensors"), "ff": feedforward.save(work / "ff.safetensors")}
    pipe.load_shira_weights(shira_files["attn"], adapter_name="hot")
    count, per_switch = under_compile(unet, backend, inputs,
                                      lambda label: pipe.load_shira_weights(shira_files[label], adapter_name="hot", hotswap=True))
    pipe.unload_shira_weights()
    rows.append({"method": "shira-diffusion hotswap=True from files (attention-only <-> FF-only)", "switches": 10,
                 "recompilations": count, "ms per switch + step": per_switch})

    # diffusers hotswap: same two target sets as LoRAs.
    generator = torch.Generator().manual_seed(0)
    files = {}
    for label, keep in (("attn", ".attn"), ("ff", ".ff.")):
        state = {}
        for name, weight in target_weights(unet).items():
            if keep in name:
                module = name.removesuffix(".weight")
                state[f"{module}.lora_A.weight"] = torch.randn(8, weight.shape[1], generator=generator) * 0.01
                state[f"{module}.lora_B.weight"] = torch.randn(weight.shape[0], 8, generator=generator) * 0.01
        StableDiffusionPipeline.save_lora_weights(work / label, unet_lora_layers=state)
        files[label] = work / label
    torch._dynamo.reset()
    note = ""
    try:
        pipe.enable_lora_hotswap(target_rank=8)
        pipe.load_lora_weights(str(files["attn"]), adapter_name="hot")
        compiled = torch.compile(unet, backend=backend)
        with torch.no_grad():
            compiled(*inputs)
            start = recompiles()
            pipe.load_lora_weights(str(files["ff"]), adapter_name="hot", hotswap=True)
            compiled(*inputs)
        rows.append({"method": "diffusers LoRA hotswap", "switches": 1, "recompilations": recompiles() - start, "ms per switch + step": ""})
    except Exception as error:  # diffusers refuses a hotswap to a different target set
        note = f"diffusers hotswap attn -> ff refused: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        rows.append({"method": "diffusers LoRA hotswap", "switches": 0, "recompilations": "n/a (refused)", "ms per switch + step": ""})
    write_result("compile", rows, args.out, [f"device {args.device}, {str(dtype).removeprefix('torch.')}; torch.compile backend {backend}; latents {size}x{size}", note or "hotswap between equal target sets works in diffusers; different sets are the case measured here",
                                              "target: 0 recompilations"], {"smoke": args.smoke, "device": args.device})


if __name__ == "__main__":
    main()
