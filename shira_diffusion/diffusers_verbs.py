"""diffusers' own adapter verbs, which every pipeline inherits, made to see SHiRA adapters too.

A pipeline with SHiRA support keeps diffusers' LoRA verbs. Each verb here does to SHiRA adapters what it does to
LoRA ones, then hands the LoRA part to diffusers' implementation (`super()`): `get_active_adapters`,
`get_list_adapters`, `set_adapters` (exactly these active, of either kind), `delete_adapters`, `disable_lora` /
`enable_lora`, `fuse_lora` / `unfuse_lora` / `unload_lora_weights` (fuse then unload makes the fused styles
permanent, as with LoRA; unload alone removes them), and the per-call scale in `cross_attention_kwargs` /
`joint_attention_kwargs`. `set_lora_device` has no meaning for SHiRA (its deltas live in the weights) and refuses
a SHiRA name with an error naming `pipe.to`. No verb ignores a SHiRA adapter.

Invariant: nothing here writes a weight itself; every change goes through the SHiRA verbs of `ShiraLoaderMixin`
and so keeps the engine's guarantees (checked before writing, all or nothing, exact unload).

Usage: pipe.delete_adapters("bluefire"); pipe.get_active_adapters(); pipe(prompt, cross_attention_kwargs={"scale": 0.5})
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .engine import ShiraLoadError

# The keyword arguments through which diffusers' pipelines take a per-call LoRA scale, by family.
_SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def lora_only(pipe: Any, verb: str) -> Callable[..., Any]:
    """diffusers' own `verb` on `pipe`, acting on LoRA adapters only (what code that manages both kinds itself
    needs, e.g. to remove its LoRA layers and keep the user's SHiRA adapters).
    Usage: lora_only(pipe, "unload_lora_weights")()"""
    method = getattr(super(DiffusersVerbsMixin, pipe), verb, None) if isinstance(pipe, DiffusersVerbsMixin) else getattr(pipe, verb, None)
    if method is None:
        raise AttributeError(f"{type(pipe).__name__} has no LoRA verb {verb!r}")
    return method


def _names(adapter_names: str | Sequence[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _per_component(strength: float | Mapping[str, Any], components: Sequence[str]) -> dict[str, Any]:
    """A checked strength as {component: float | {module prefix: float}} over `components` (left out: 1.0)."""
    return {c: strength.get(c, 1.0) if isinstance(strength, Mapping) else strength for c in components}


def _times(value: float | Mapping[str, float], factor: float, name: str) -> float | Mapping[str, float]:
    if not isinstance(value, Mapping):
        return value * factor
    if factor != 1.0:  # weights under no prefix keep 1.0, so a per-module strength cannot be scaled as a whole
        raise ShiraLoadError(f"fuse_lora(lora_scale={factor}) cannot scale adapter {name!r}, whose strength is set per module; "
                             "set the strengths you want with set_shira_adapters, then call fuse_lora()")
    return value


class DiffusersVerbsMixin:
    """diffusers' LoRA verbs extended to SHiRA adapters (mixed into `ShiraLoaderMixin`; see the module docstring)."""

    def _diffusers(self, verb: str) -> Callable[..., Any] | None:
        """diffusers' own implementation of `verb` for this pipeline, or None where the pipeline has none."""
        return getattr(super(), verb, None)

    def _lora_names(self) -> list[str]:
        listed = self._diffusers("get_list_adapters")
        return list(dict.fromkeys(name for names in (listed() if listed else {}).values() for name in names))

    def get_active_adapters(self) -> list[str]:
        """The active LoRA adapters (diffusers), then the active SHiRA adapters."""
        lora = self._diffusers("get_active_adapters")
        return [*(lora() if lora and self._lora_names() else []), *self.get_active_shira_adapters()]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: adapter names} for LoRA (diffusers) and SHiRA adapters."""
        listed = self._diffusers("get_list_adapters")
        merged = {component: list(names) for component, names in (listed() if listed else {}).items()}
        for name, info in self.get_shira_adapters().items():
            for component in info["components"]:
                merged.setdefault(component, []).append(name)
        return merged

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        """Exactly these adapters active, LoRA or SHiRA, at these weights (None: 1.0), as diffusers' `set_adapters`."""
        names = _names(adapter_names)
        weights = list(adapter_weights) if isinstance(adapter_weights, Sequence) and not isinstance(adapter_weights, str) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        shira, lora = set(self.get_shira_adapters()), self._lora_names()
        unknown = [name for name in names if name not in shira and name not in lora]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} is not loaded (LoRA: {lora}, SHiRA: {sorted(shira)})")
        lora_pairs = [(name, weight) for name, weight in zip(names, weights) if name not in shira]
        if lora_pairs:
            self._diffusers("set_adapters")([n for n, _ in lora_pairs], [w for _, w in lora_pairs])
        elif lora:  # none of the LoRA adapters is named: off, diffusers' way (weight 0)
            self._diffusers("set_adapters")(lora, [0.0] * len(lora))
        shira_pairs = [(name, weight) for name, weight in zip(names, weights) if name in shira]
        self.set_shira_adapters([n for n, _ in shira_pairs], [w for _, w in shira_pairs])

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove these adapters, LoRA (diffusers) or SHiRA (unloaded: their weights back to the originals)."""
        names = _names(adapter_names)
        shira = set(self.get_shira_adapters())
        lora = [name for name in names if name not in shira]
        if lora and self._diffusers("delete_adapters"):
            self._diffusers("delete_adapters")(lora)
        if shira & set(names):
            self.unload_shira_weights([name for name in names if name in shira])

    def disable_lora(self) -> None:
        """diffusers' `disable_lora`, and SHiRA's (`disable_shira`): the base weights show, adapters stay loaded."""
        if self._diffusers("disable_lora"):
            self._diffusers("disable_lora")()
        self.disable_shira()

    def enable_lora(self) -> None:
        if self._diffusers("enable_lora"):
            self._diffusers("enable_lora")()
        self.enable_shira()

    def set_lora_device(self, adapter_names: Sequence[str], device: Any) -> None:
        loaded = set(self.get_shira_adapters())
        shira = [name for name in _names(adapter_names) if name in loaded]
        if shira:
            raise ShiraLoadError(f"{shira[0]!r} is a SHiRA adapter: its deltas live in the weights, on their device; "
                                 "move the pipeline with pipe.to(device) (set_lora_device moves LoRA adapters only)")
        self._diffusers("set_lora_device")(adapter_names, device)

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `fuse_lora`; active SHiRA adapters (all, or those in `adapter_names`) are already in the weights:
        `lora_scale` scales them on the listed `components`, and they are marked fused, so `unload_lora_weights`
        keeps them for good (`unfuse_lora` takes the mark back)."""
        fuse = self._diffusers("fuse_lora")
        bound = inspect.signature(fuse).bind(*args, **kwargs)
        bound.apply_defaults()
        requested = bound.arguments.get("adapter_names")
        active = self.get_active_shira_adapters()
        shira = [name for name in active if requested is None or name in requested]
        loaded = set(self.get_shira_adapters())
        idle = [name for name in (requested or []) if name in loaded and name not in active]
        if idle:
            raise ShiraLoadError(f"SHiRA adapter {idle[0]!r} is not active; activate it with set_shira_adapters, then fuse_lora")
        if self._lora_names():
            bound.arguments["adapter_names"] = None if requested is None else [name for name in requested if name not in shira]
            fuse(*bound.args, **bound.kwargs)
        if shira:
            self._fuse_shira(shira, float(bound.arguments.get("lora_scale", 1.0)), bound.arguments.get("components"))

    def _fuse_shira(self, names: list[str], lora_scale: float, components: Sequence[str] | None) -> None:
        """The named active adapters at `lora_scale` on the fused components (the others stay active as they are),
        and marked fused: what `unload_lora_weights` will keep (0 on the components not fused)."""
        state = self.get_shira_adapters()
        live = {name: state[name]["alpha"] for name in self.get_active_shira_adapters()}  # activation order: the same sums
        fused = {}
        for name in names:
            per = _per_component(state[name]["alpha"], state[name]["components"])
            chosen = [c for c in per if components is None or c in components]
            live[name] = {c: _times(value, lora_scale, name) if c in chosen else value for c, value in per.items()}
            fused[name] = {c: live[name][c] if c in chosen else 0.0 for c in per}
        self.set_shira_adapters(list(live), list(live.values()))
        self.__dict__["_shira_fused"] = {**self.__dict__.get("_shira_fused", {}), **fused}

    def unfuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `unfuse_lora`; SHiRA adapters lose their fused mark (they stay active, as they are)."""
        if self._diffusers("unfuse_lora"):
            self._diffusers("unfuse_lora")(*args, **kwargs)
        self.__dict__.pop("_shira_fused", None)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `unload_lora_weights`; SHiRA adapters are unloaded too (the base weights back, bit for bit),
        except those fused with `fuse_lora`, which stay in the weights for good (`merge_and_unload_shira`)."""
        if self._diffusers("unload_lora_weights"):
            self._diffusers("unload_lora_weights")(*args, **kwargs)
        fused = self.__dict__.pop("_shira_fused", None)
        if fused:
            self.set_shira_adapters(list(fused), list(fused.values()))
            self.merge_and_unload_shira()
        elif self.get_shira_adapters():
            self.unload_shira_weights()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's call; a `scale` in `cross_attention_kwargs` (or `joint_attention_kwargs`) scales the active
        SHiRA adapters for this call too, as it scales LoRA ones."""
        scale = next((extra["scale"] for extra in (kwargs.get(key) for key in _SCALE_KWARGS)
                      if isinstance(extra, Mapping) and "scale" in extra), None)
        if scale is None or not self.get_active_shira_adapters():
            return super().__call__(*args, **kwargs)
        engine = self.shira_engine
        with engine.lock:  # the scale holds for the whole call; switches from other threads wait
            engine.set_scale(scale)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                engine.set_scale(1.0)
