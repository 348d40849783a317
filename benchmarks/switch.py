"""Switching: first load, switch A->B, fuse A+B, unload — this package vs diffusers' LoRA path vs PEFT's SHiRA,
plus the memory-traffic floor of a switch. SD 1.5-shaped UNet (random weights), adapters on its 160
attention + FF linears: SHiRA 2 % density (fp16 values) vs LoRA rank 64. On the CPU in fp32, on a GPU in fp16
(as a diffusers user runs it there; --dtype to choose).

Usage: python -m benchmarks.switch [--smoke] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from .common import (DTYPES, copy_pass, free, half, host_to_device_gbs, lora_file, median_ms, median_ms_in_turn, memory_bandwidth_gbs, parse,
                     parser, sd15_pipeline, shira_adapter, target_weights, write_result)


SWITCH = "switch A->B (unload A + load B from file)"
HOTSWAP = "switch A->B (load B with hotswap=True: one call, one pass)"


COPY = "copy where the weights live (bandwidth for the floor)"


def floor_ms(files: list[Path], adapters, weight_dtype: torch.dtype, device: str, weights_gbs: float, size_mb: int) -> tuple[float, dict]:
    """Bytes a switch must move, over the bandwidth that moves them: the adapter files read (host memory), on a
    GPU also copied to it, and the lines of the weights that any of the adapters touches (A ∪ B: a line both touch
    need move once), read and written (64-byte cache lines on a CPU, 32-byte sectors on a GPU), at `weights_gbs`,
    the copy bandwidth where the weights live (measured in turn with the switches, so a slow spell of a shared
    machine weighs on both). Returns (ms, what went into it)."""
    line = 64 if device == "cpu" else 32
    element = torch.empty(0, dtype=weight_dtype).element_size()
    touched: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters:
        for component, name, delta in adapter.items():
            touched.setdefault(f"{component}.{name}", []).append(delta.positions * element // line)
    lines = sum(torch.unique(torch.cat(found)).numel() for found in touched.values())
    file_bytes, weight_bytes = sum(f.stat().st_size for f in files), 2 * line * lines
    parts = {"file bytes": file_bytes, "weight bytes": weight_bytes, "copy GB/s": weights_gbs}
    seconds = weight_bytes / (weights_gbs * 1e9)
    if device == "cpu":
        seconds += file_bytes / (weights_gbs * 1e9)
    else:
        parts["host GB/s"], parts["upload GB/s"] = memory_bandwidth_gbs(size_mb), host_to_device_gbs(size_mb // 2)
        seconds += file_bytes / (parts["host GB/s"] * 1e9) + file_bytes / (parts["upload GB/s"] * 1e9)
    return seconds * 1000, parts


def main() -> None:
    p = parser(__doc__, device=True)
    p.add_argument("--dtype", choices=list(DTYPES), help="the UNet's dtype (default: fp32 on the CPU, fp16 on a GPU)")
    args = parse(p)
    repeats, rank = args.repeats, 4 if args.smoke else 64
    dtype = DTYPES[args.dtype] if args.dtype else half(args.device)
    pipe = sd15_pipeline(args.smoke, dtype, args.device)
    unet = pipe.unet
    work = Path(tempfile.mkdtemp(prefix="shira-bench-"))
    a, b = shira_adapter(unet, seed=1), shira_adapter(unet, seed=2)
    file_a, file_b = a.save(work / "a.safetensors"), b.save(work / "b.safetensors")
    rows, notes = [], []

    # -- this package --------------------------------------------------------------------------------
    ours = {}
    ours["first load"] = median_ms(lambda: pipe.load_shira_weights(file_a, adapter_name="A"), repeats, setup=lambda: pipe.unload_shira_weights())
    pipe.unload_shira_weights()
    pipe.load_shira_weights(file_a, adapter_name="style")
    loaded = {"file": file_a}

    def other_file():
        loaded["file"] = file_b if loaded["file"] == file_a else file_a
        return loaded["file"]

    def switch():  # unload the style, load the other one from its file
        following = other_file()
        pipe.unload_shira_weights("style")
        pipe.load_shira_weights(following, adapter_name="style")

    def hotswap():  # the same switch in one call: the style replaced in place, one pass over the weights
        pipe.load_shira_weights(other_file(), adapter_name="style", hotswap=True)

    # measured in turn: the two differ by less than this shared machine's run-to-run noise
    size_mb = 128 if args.smoke else 512
    streaming, copied = copy_pass(size_mb, args.device)
    timed = median_ms_in_turn({SWITCH: switch, HOTSWAP: hotswap, COPY: streaming}, max(repeats, 9))
    copy_gbs = copied / (timed.pop(COPY) / 1000) / 1e9
    del streaming  # frees its buffers
    ours.update(timed)
    pipe.unload_shira_weights()
    pipe.load_shira_weights(file_a, adapter_name="A")
    ours["load B beside A (for fusion; shared weights)"] = median_ms(
        lambda: pipe.load_shira_weights(file_b, adapter_name="B"), repeats,
        setup=lambda: "B" in pipe.get_shira_adapters() and pipe.unload_shira_weights("B"))
    flip = {"on": "A"}

    def preloaded():
        flip["on"] = "B" if flip["on"] == "A" else "A"
        pipe.set_shira_adapters(flip["on"])

    ours["switch A->B (both loaded)"] = median_ms(preloaded, repeats)
    ours["fuse A+B (0.6, 0.4)"] = median_ms(lambda: pipe.set_shira_adapters(["A", "B"], [0.6, 0.4]), repeats)
    pipe.unload_shira_weights()
    ours["unload"] = median_ms(lambda: pipe.unload_shira_weights(), repeats, setup=lambda: pipe.load_shira_weights(file_a, adapter_name="A"))
    free()

    # -- diffusers LoRA (pipeline level: load + fuse / unfuse + unload) --------------------------------
    lora_a, lora_b = lora_file(unet, rank, work / "lora_a", 1), lora_file(unet, rank, work / "lora_b", 2)
    lora = {}

    def lora_load(path, name):
        pipe.load_lora_weights(str(path.parent), adapter_name=name)
        pipe.fuse_lora(adapter_names=[name])

    def lora_unload():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    lora["first load"] = median_ms(lambda: lora_load(lora_a, "style_a"), repeats, setup=lambda: None if not pipe.get_list_adapters() else lora_unload())
    lora_unload()
    lora_load(lora_a, "style_a")
    lstate = {"on": "style_a"}

    def lora_switch():  # adapter names must not be "A"/"B": diffusers confuses them with lora_A / lora_B keys
        nxt = "style_b" if lstate["on"] == "style_a" else "style_a"
        lora_unload()
        lora_load(lora_b if nxt == "style_b" else lora_a, nxt)
        lstate["on"] = nxt

    lora["switch A->B (unload A + load B from file)"] = median_ms(lora_switch, repeats)
    lora_unload()

    def lora_fuse_both():
        pipe.unfuse_lora()
        pipe.set_adapters(["style_a", "style_b"], [0.6, 0.4])
        pipe.fuse_lora(adapter_names=["style_a", "style_b"])

    pipe.load_lora_weights(str(lora_a.parent), adapter_name="style_a")
    pipe.load_lora_weights(str(lora_b.parent), adapter_name="style_b")
    lora["fuse A+B (0.6, 0.4)"] = median_ms(lora_fuse_both, repeats)
    lora_unload()
    lora["unload"] = median_ms(lora_unload, repeats, setup=lambda: lora_load(lora_a, "style_a"))
    free()

    # -- PEFT's SHiRA (PeftModel + merge_adapter / unmerge_adapter) -------------------------------------
    from peft import PeftModel, ShiraConfig, get_peft_model

    weights = target_weights(unet)
    budget = sum(w.shape[0] * w.shape[1] for w in weights.values()) * 0.02 / sum(w.shape[0] + w.shape[1] for w in weights.values())
    r = max(1, round(budget))
    for seed, name in ((1, "peft_a"), (2, "peft_b")):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(unet), ShiraConfig(r=r, target_modules=[n.removesuffix(".weight") for n in weights], init_weights=False, random_seed=seed))
        model.save_pretrained(str(work / name))
        del model
        free()
    peft = {}
    holder = {}

    def peft_first():
        holder["model"] = PeftModel.from_pretrained(unet, str(work / "peft_a"), adapter_name="A")
        holder["model"].merge_adapter()

    def peft_reset():
        if "model" in holder:
            holder.pop("model").unload()

    peft["first load"] = median_ms(peft_first, max(3, repeats // 2), setup=peft_reset)
    model = holder["model"]
    pstate = {"on": "A"}

    def peft_switch():
        nxt = "B" if pstate["on"] == "A" else "A"
        model.unmerge_adapter()
        model.delete_adapter(pstate["on"])
        model.load_adapter(str(work / ("peft_b" if nxt == "B" else "peft_a")), adapter_name=nxt)
        model.set_adapter(nxt)
        model.merge_adapter()
        pstate["on"] = nxt

    peft["switch A->B (unload A + load B from file)"] = median_ms(peft_switch, max(3, repeats // 2))
    peft["unload"] = median_ms(lambda: model.unmerge_adapter(), 1, warmup=0)
    model.unload()
    notes.append(f"PEFT SHiRA uses r={r} (r*(m+n) entries per layer, {sum(r * (w.shape[0] + w.shape[1]) for w in weights.values()):,} in all) vs our 2 % density ({a.num_parameters:,}).")
    notes.append(f"LoRA rank {rank} on the same {len(weights)} linears; diffusers {__import__('diffusers').__version__}, peft {__import__('peft').__version__}.")

    floor, moved = floor_ms([file_b], [a, b], dtype, args.device, copy_gbs, size_mb)
    switch = SWITCH
    for op in ours:
        same = switch if op == HOTSWAP else op  # the baselines' switch is the same operation
        row = {"operation": op, "shira-diffusion ms": ours[op], "diffusers LoRA ms": lora.get(same, ""), "PEFT SHiRA ms": peft.get(same, "")}
        if same in lora:
            row["LoRA / ours"] = lora[same] / ours[op]
        if same in peft:
            row["PEFT / ours"] = peft[same] / ours[op]
        rows.append(row)
    notes.insert(0, f"device {args.device}, UNet in {str(dtype).removeprefix('torch.')}")
    moves = ", ".join(f"{key} {value / 1e6:.1f} MB" if "bytes" in key else f"{key} {value:.1f}" for key, value in moved.items())
    notes.append(f"memory floor of a switch: the file read{' and copied to the GPU' if args.device == 'cuda' else ''}, and the weight lines "
                 f"touched by A∪B read and written, at the copy bandwidths measured in turn with the switches ({moves}) = {floor:.2f} ms; ours / floor = "
                 f"{ours[switch] / floor:.1f}x (unload + load), {ours[HOTSWAP] / floor:.1f}x (hotswap)")
    notes.append("targets: switch >= 60x faster than diffusers LoRA, >= 10x faster than PEFT SHiRA, within 2x of the floor")
    write_result("switch", rows, args.out, notes, {"floor_ms": floor, "floor": moved, "parameters": a.num_parameters, "smoke": args.smoke,
                                                  "device": args.device, "dtype": str(dtype)})


if __name__ == "__main__":
    main()
