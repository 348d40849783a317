"""Look inside adapter files: size and density, and how much two adapters would interfere if fused.

Interference (paper, section 4): for each weight both adapters change, with S1, S2 their sparse deltas
viewed as matrices (convs as (out, in*kh*kw)):
- shared positions: |P1 ∩ P2|, and that count over |P1 ∪ P2|;
- AWOM = ||S1ᵀ S2||_F (Frobenius norm: exact and cheap on sparse tensors; the paper's spectral norm would
  need a dense SVD), and the same normalised by ||S1||_F·||S2||_F (0 = orthogonal, 1 = aligned);
- AWOR = 1 - nnz(S1ᵀ S2) / n², the sparsity of the product (1 = no interaction at all).
Layers only one adapter touches cannot interfere and are counted as such.

Usage:
    print(format_summary(summarize("a.safetensors")))
    print(format_interference(interference(ShiraAdapter.load("a.safetensors"), ShiraAdapter.load("b.safetensors"))))
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from .format import ShiraAdapter, SparseDelta


def summarize(path: str | Path) -> dict[str, Any]:
    """Components, tensors, parameters, density, bytes on disk and bytes per parameter of a file."""
    path = Path(path)
    adapter = ShiraAdapter.load(path)
    size = path.stat().st_size
    return {
        "file": str(path),
        "components": {
            c: {"tensors": len(t), "parameters": sum(d.numel for d in t.values()), "density": sum(d.numel for d in t.values()) / sum(math.prod(d.shape) for d in t.values())}
            for c, t in adapter.deltas.items()
        },
        "tensors": sum(1 for _ in adapter.items()),
        "parameters": adapter.num_parameters,
        "density": adapter.density,
        "mask_type": adapter.mask_type,
        "base_model": adapter.base_model,
        "bytes": size,
        "bytes_per_parameter": size / max(1, adapter.num_parameters),
    }


def _as_matrix(delta: SparseDelta) -> torch.Tensor:
    rows = delta.shape[0]
    cols = math.prod(delta.shape) // rows
    positions = delta.positions.to(torch.int64)
    indices = torch.stack([positions // cols, positions % cols])
    return torch.sparse_coo_tensor(indices, delta.deltas.double(), (rows, cols), check_invariants=False).coalesce()


def layer_interference(a: SparseDelta, b: SparseDelta) -> dict[str, float]:
    """Shared positions and the AWOM / AWOR measures for one weight changed by both adapters."""
    shared = int(torch.isin(a.positions, b.positions).sum())
    union = a.numel + b.numel - shared
    with warnings.catch_warnings():  # torch flags its sparse kernels as beta on every call
        warnings.simplefilter("ignore", UserWarning)
        product = torch.sparse.mm(_as_matrix(a).t(), _as_matrix(b)).coalesce()
    norm = float(product.values().square().sum().sqrt())
    scale = float(a.deltas.double().norm() * b.deltas.double().norm())
    cols = product.shape[0]
    nonzero = int((product.values() != 0).sum())
    return {
        "shared_positions": shared,
        "shared_fraction": shared / union if union else 0.0,
        "awom_frobenius": norm,
        "awom_normalised": norm / scale if scale else 0.0,
        "awor": 1.0 - nonzero / (cols * cols),
    }


def interference(a: ShiraAdapter, b: ShiraAdapter) -> dict[str, Any]:
    """Per-layer and overall interference between two adapters."""
    keys_a = {f"{c}.{n}": d for c, n, d in a.items()}
    keys_b = {f"{c}.{n}": d for c, n, d in b.items()}
    layers = {}
    for key in sorted(keys_a.keys() & keys_b.keys()):
        if keys_a[key].shape != keys_b[key].shape:
            raise ValueError(f"{key}: the adapters disagree on its shape ({keys_a[key].shape} vs {keys_b[key].shape})")
        layers[key] = layer_interference(keys_a[key], keys_b[key])
    shared = sum(layer["shared_positions"] for layer in layers.values())
    union = a.num_parameters + b.num_parameters - shared
    return {
        "layers": layers,
        "common_layers": len(layers),
        "only_in_first": len(keys_a.keys() - keys_b.keys()),
        "only_in_second": len(keys_b.keys() - keys_a.keys()),
        "shared_positions": shared,
        "shared_fraction": shared / union if union else 0.0,
        "awom_frobenius": math.sqrt(sum(layer["awom_frobenius"] ** 2 for layer in layers.values())),
        "mean_awor": sum(layer["awor"] for layer in layers.values()) / len(layers) if layers else 1.0,
    }


def format_summary(info: dict[str, Any]) -> str:
    lines = [
        f"{info['file']}: {info['parameters']:,} parameters in {info['tensors']} tensors, density {info['density']:.4%}",
        f"  {info['bytes']:,} bytes on disk, {info['bytes_per_parameter']:.2f} bytes per parameter"
        + (f", mask {info['mask_type']}" if info["mask_type"] else "") + (f", base {info['base_model']}" if info["base_model"] else ""),
    ]
    for component, part in sorted(info["components"].items()):
        lines.append(f"  {component}: {part['tensors']} tensors, {part['parameters']:,} parameters, density {part['density']:.4%}")
    return "\n".join(lines)


def format_interference(info: dict[str, Any], top: int = 10) -> str:
    lines = [
        f"interference over {info['common_layers']} common layers ({info['only_in_first']} only in the first, {info['only_in_second']} only in the second):",
        f"  shared positions {info['shared_positions']:,} ({info['shared_fraction']:.4%} of the union)",
        f"  ||A1^T A2||_F (Frobenius) {info['awom_frobenius']:.4g}, mean AWOR {info['mean_awor']:.6f}",
    ]
    ranked = sorted(info["layers"].items(), key=lambda item: -item[1]["awom_normalised"])[:top]
    if ranked:
        width = max(len(k) for k, _ in ranked)
        lines.append(f"  {'layer (most aligned first)':<{width}}  shared   ||A1^T A2||_F  normalised  AWOR")
        for key, layer in ranked:
            lines.append(f"  {key:<{width}}  {layer['shared_positions']:>6}  {layer['awom_frobenius']:>13.4g}  {layer['awom_normalised']:>10.4f}  {layer['awor']:.6f}")
    return "\n".join(lines)
