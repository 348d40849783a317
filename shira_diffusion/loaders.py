"""Pipeline mixin: diffusers-style verbs to load, switch, fuse and unload SHiRA adapters.

One mixin serves every pipeline: the components it can write into are the pipeline's torch modules
(`unet`, `text_encoder`, `text_encoder_2`, `text_encoder_3`, `transformer`, ...). The data path is one way:
source -> ShiraAdapter (format checks) -> ScatterEngine.check (model checks) -> weights.

Usage:
    pipe = ShiraStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_shira_weights("bluefire.safetensors", adapter_name="bluefire")
    pipe.load_shira_weights("paintings.safetensors", adapter_name="paintings")
    pipe.set_shira_adapters(["bluefire", "paintings"], adapter_weights=[0.7, 0.5])   # fuse two styles
    pipe.unload_shira_weights()                                               # base weights, bit for bit
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import nn

from .diffusers_verbs import DiffusersVerbsMixin
from .engine import ScatterEngine, ShiraLoadError, checked_name
from .format import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    PICKLE_SUFFIXES,
    SHIRA_WEIGHT_NAME,
    ShiraAdapter,
    ShiraFormatError,
    is_peft_shira_dir,
)

AdapterSource = str | os.PathLike | ShiraAdapter | Mapping[str, torch.Tensor]

# module -> (a weak reference to) the engine that writes into it. Two engines over one module would each restore
# "their" original and undo the other's writes, so a pipeline built around modules another pipeline already serves
# joins its engine. Weak both ways: the registry keeps neither a pipeline's models nor its engine alive.
_ENGINES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()  # two pipelines resolving their engines at once must not make two


def _owner(module: nn.Module) -> ScatterEngine | None:
    reference = _ENGINES.get(module)
    return None if reference is None else reference()


def _engine_for(cached: ScatterEngine | None, modules: Mapping[str, nn.Module]) -> ScatterEngine:
    """The pipeline's engine: its own, else one serving some of its modules under the same names, else a new one.
    A module another engine holds adapters in is refused (one writer per weight); an idle one is taken over."""
    engine = cached
    if engine is None:
        serving = [owner for module in modules.values() if (owner := _owner(module)) is not None]
        engine = next((e for e in serving if all(e.components.get(n, m) is m for n, m in modules.items())), None) or ScatterEngine(modules)
    for name, module in modules.items():
        other = _owner(module)
        if other is not None and other is not engine and any(other.components.get(k.partition(".")[0]) is module for k in other.targets):
            raise ShiraLoadError(
                f"pipeline component {name!r} holds SHiRA adapters loaded through another pipeline ({sorted(other.adapters)}); "
                "unload them there first, or make this pipeline with from_pipe so that both share the adapters"
            )
    for key in engine.targets:
        component = key.partition(".")[0]
        if component in modules and modules[component] is not engine.components[component]:
            raise ShiraLoadError(
                f"pipeline component {component!r} was replaced while SHiRA adapters were loaded into it; "
                "unload them before swapping components"
            )
    engine.components.update(modules)
    for module in modules.values():
        _ENGINES[module] = weakref.ref(engine)
    return engine


def _from_file(path: Path, component: str | None, shapes_of) -> ShiraAdapter:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ShiraAdapter.load(path)  # raises the "refusing to unpickle" error
    if path.name == PEFT_WEIGHT_NAME and is_peft_shira_dir(path):
        target = component or "unet"
        return ShiraAdapter.from_peft(path, target, shapes=shapes_of(target))
    return ShiraAdapter.load(path)


def _from_dir(path: Path, weight_name: str | None, component: str | None, shapes_of) -> ShiraAdapter:
    if weight_name is not None:
        return _from_file(path / weight_name, component, shapes_of)
    if (path / SHIRA_WEIGHT_NAME).is_file():
        return ShiraAdapter.load(path / SHIRA_WEIGHT_NAME)
    if is_peft_shira_dir(path):
        target = component or "unet"
        return ShiraAdapter.from_peft(path, target, shapes=shapes_of(target))
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    if len(candidates) == 1:
        return ShiraAdapter.load(path / candidates[0])
    raise ShiraFormatError(
        f"{path}: no {SHIRA_WEIGHT_NAME} and no PEFT SHiRA adapter here"
        + (f"; several .safetensors files ({candidates}): pass weight_name=" if candidates else "")
    )


def _from_hub(repo_id: str, weight_name: str | None, subfolder: str | None, component: str | None, shapes_of, hub_kwargs) -> ShiraAdapter:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, **hub_kwargs))

    try:
        try:
            path = download(weight_name or SHIRA_WEIGHT_NAME)
            if path.name == PEFT_WEIGHT_NAME:  # named explicitly: its config (beside it) says whether it is PEFT's SHiRA
                try:
                    download(PEFT_CONFIG_NAME)
                except EntryNotFoundError:
                    pass
            return _from_file(path, component, shapes_of)
        except EntryNotFoundError:
            if weight_name is not None:
                raise
            # A PEFT SHiRA repo: adapter_config.json + adapter_model.safetensors.
            download(PEFT_CONFIG_NAME)
            return _from_file(download(PEFT_WEIGHT_NAME), component, shapes_of)
    except (ShiraFormatError, ShiraLoadError):
        raise
    except Exception as error:  # huggingface_hub raises many types; the user needs one clear message
        raise ShiraLoadError(
            f"{repo_id!r} is not a local file or folder, and fetching {weight_name or SHIRA_WEIGHT_NAME!r} from the Hub "
            f"failed ({type(error).__name__}: {error})"
        ) from None


def _read(src: str | os.PathLike, weight_name: str | None, subfolder: str | None, component: str | None, shapes_of,
          hub_kwargs: Mapping[str, Any], verb: str) -> ShiraAdapter:
    """An adapter from a local file or folder, else from the Hub: what `src` names."""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"cannot load a SHiRA adapter from a {type(src).__name__}")
    unknown = sorted(set(hub_kwargs) - _hub_kwargs())
    if unknown:  # a misspelled argument must not be ignored (it is never used for local files)
        raise TypeError(f"{verb}() got an unexpected keyword argument {unknown[0]!r} "
                        f"(Hub arguments: {', '.join(sorted(_hub_kwargs()))})")
    path = Path(src)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return _from_file(path, component, shapes_of)
    if path.is_dir():
        return _from_dir(path, weight_name, component, shapes_of)
    if not _looks_like_repo_id(str(src)):
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    return _from_hub(str(src), weight_name, subfolder, component, shapes_of, hub_kwargs)


def _hub_kwargs() -> set[str]:
    """What load_shira_weights passes on to huggingface_hub's hf_hub_download (as the installed version names it)."""
    from huggingface_hub import hf_hub_download

    return set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder", "local_dir", "dry_run"}


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _from_tensors(tensors: Mapping[str, torch.Tensor], shape_of) -> ShiraAdapter:
    # An in-memory state dict in the file layout; shapes come from the model, like PEFT's.
    suffixes = (".deltas", ".gaps", ".gaps_hi_index", ".gaps_hi")
    shapes = {}
    for key in tensors:
        stem = next((key[: -len(s)] for s in suffixes if key.endswith(s)), None)
        if stem is None:
            raise ShiraFormatError(f"state dict key {key!r} is not '<component>.<weight>.<deltas|gaps|gaps_hi_index|gaps_hi>'")
        component, _, name = stem.partition(".")
        shapes[stem] = list(shape_of(component, name))
    metadata = {"format_version": 1, "shapes": shapes}
    return ShiraAdapter.from_state_dict(tensors, metadata, source="state dict")


_BLOCKS = ("down", "mid", "up")


def _expand_unet_blocks(adapter_name: str, component: str, unet: nn.Module, scales: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' UNet block scales ({"down": .., "mid": .., "up": {"block_0": [..]}}) -> {attention prefix: scale},
    after checks diffusers' own expansion does not make (unknown keys and blocks)."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    where = f"adapter {adapter_name!r}, {component}"
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise ShiraLoadError(f"{where}: down / mid / up block scales apply to a UNet, not to {type(unet).__name__}")
    unknown = [key for key in scales if key not in _BLOCKS]
    if unknown:
        raise ShiraLoadError(f"{where}: unknown block key {unknown[0]!r} (expected down, mid, up)")
    for side in ("down", "up"):
        blocks = [f"block_{i}" for i, block in enumerate(getattr(unet, f"{side}_blocks")) if hasattr(block, "attentions")]
        if isinstance(scales.get(side), Mapping):
            extra = [block for block in scales[side] if block not in blocks]
            if extra:
                raise ShiraLoadError(f"{where}: {side}.{extra[0]} has no attention layers (blocks with them: {blocks})")
    try:
        return _maybe_expand_lora_scales(unet, [dict(scales)])[0]
    except ValueError as error:  # e.g. a list of the wrong length for a block
        raise ShiraLoadError(f"{where}: {error}") from None


def _expand_blocks(adapter_name: str, strength: Any, components: Mapping[str, nn.Module]) -> Any:
    """A strength with UNet block scales in it, those expanded to module prefixes (the engine checks the rest)."""
    if not isinstance(strength, Mapping):
        return strength
    expanded = dict(strength)
    for component, scale in strength.items():
        if component in components and isinstance(scale, Mapping) and set(scale) & set(_BLOCKS):
            expanded[component] = _expand_unet_blocks(adapter_name, component, components[component], scale)
    return expanded


class ShiraLoaderMixin(DiffusersVerbsMixin):
    """Adds `load_shira_weights`, `set_shira_adapters`, `unload_shira_weights`, `merge_and_unload_shira`,
    `disable_shira`, `enable_shira`, `get_shira_adapters`, `get_active_shira_adapters`, `save_shira_weights` and
    `shira_state_dict` to a diffusers pipeline, and makes diffusers' own adapter verbs act on SHiRA adapters too
    (`DiffusersVerbsMixin`).

    Usage: class MyPipeline(ShiraLoaderMixin, SomeDiffusersPipeline): ...  (or `add_shira_support(pipe)`)
    """

    # ---- engine ----------------------------------------------------------------------------------
    def _shira_modules(self) -> dict[str, nn.Module]:
        # A torch.compile wrapper (`pipe.unet = torch.compile(pipe.unet)`) writes through to the module it wraps.
        return {name: getattr(module, "_orig_mod", module) for name, module in self.components.items() if isinstance(module, nn.Module)}

    @property
    def shira_engine(self) -> ScatterEngine:
        """The engine holding this pipeline's adapters: one per set of modules, so pipelines sharing them (diffusers'
        `from_pipe`, AutoPipeline*) share the loaded adapters."""
        with _ENGINES_LOCK:
            engine = _engine_for(self.__dict__.get("_shira_engine"), self._shira_modules())
        self.__dict__["_shira_engine"] = engine
        return engine

    def _shira_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        module = self._shira_modules().get(component)
        if module is None:
            raise ShiraLoadError(f"pipeline has no component {component!r} (it has {sorted(self._shira_modules())})")
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    def _shira_resolve(self, src: AdapterSource, weight_name, subfolder, component, hub_kwargs) -> ShiraAdapter:
        engine = self.shira_engine
        if isinstance(src, ShiraAdapter):
            return src
        if isinstance(src, Mapping):
            return _from_tensors(src, lambda c, n: tuple(engine.resolve_parameter(c, n).shape))
        return _read(src, weight_name, subfolder, component, self._shira_shapes, hub_kwargs, "load_shira_weights")

    @classmethod
    def shira_state_dict(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        component: str | None = None,
        **hub_kwargs: Any,
    ) -> ShiraAdapter:
        """Read an adapter without a pipeline (diffusers' `lora_state_dict`): a file, a folder or a Hub repo id, with
        `weight_name`, `subfolder` and huggingface_hub's arguments (`revision`, `cache_dir`, `token`,
        `local_files_only`...). PEFT SHiRA folders are read into `component` (default "unet"), their shapes inferred.
        Returns a checked `ShiraAdapter` (its `.state_dict()` is the file's tensors).
        Usage: adapter = ShiraStableDiffusionPipeline.shira_state_dict("me/bluefire-shira"); print(adapter.summary())"""
        return _read(pretrained_model_name_or_path, weight_name, subfolder, component, lambda target: None, hub_kwargs,
                     "shira_state_dict")

    # ---- public verbs ----------------------------------------------------------------------------
    def load_shira_weights(
        self,
        src: AdapterSource,
        alpha: float | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        component: str | None = None,
        hotswap: bool = False,
        **hub_kwargs: Any,
    ) -> str:
        """Load an adapter and write it into the weights at strength `alpha` (default: the file's default, 1.0) as
        the only active adapter, as diffusers' `load_lora_weights` makes the new adapter the active one (the others
        stay loaded; fuse them with `set_shira_adapters`). `alpha` takes every form `set_shira_adapters` does (per
        component, UNet blocks, module prefixes).

        `hotswap=True` (as in diffusers' `load_lora_weights`): the new adapter replaces the loaded adapter
        `adapter_name` in place, keeping its name and its place among the active ones, in one pass over the weights
        (one call; as fast as unload + load). Unlike LoRA hotswapping, the two may touch different weights.

        `src`: a .safetensors file, a folder, a Hub repo id (`weight_name`, `subfolder`, and hub kwargs such
        as `revision`, `cache_dir`, `token`, `local_files_only`), a state dict, or a ShiraAdapter. PEFT SHiRA
        folders load into `component` (default "unet"); for SHiRA files `component` keeps only that part.
        Returns the adapter name. Usage: name = pipe.load_shira_weights("style.safetensors", alpha=0.8)
        """
        if hotswap and adapter_name is None:
            raise ShiraLoadError("hotswap=True replaces a loaded adapter: name it with adapter_name=")
        if adapter_name is not None:
            checked_name(adapter_name)
        with self.shira_engine.lock:
            adapter = self._shira_resolve(src, weight_name, subfolder, component, hub_kwargs)
            if component is not None and not adapter.components == [component]:
                if component not in adapter.deltas:
                    raise ShiraLoadError(f"adapter has no component {component!r} (it has {adapter.components})")
                adapter = ShiraAdapter({component: adapter.deltas[component]}, adapter.mask_type, adapter.default_alpha, adapter.base_model, adapter.extra)
            engine = self.shira_engine
            own = self._shira_modules()
            foreign = [c for c in adapter.components if c not in own]
            if foreign:  # the engine may also serve another pipeline's components (shared modules)
                raise ShiraLoadError(f"adapter targets component {foreign[0]!r}, which this pipeline does not have (it has {sorted(own)})")
            if adapter_name is None:
                index = len(engine.alphas)
                while f"default_{index}" in engine.alphas:
                    index += 1
                adapter_name = f"default_{index}"
            # What was read from a file is checked and nobody else holds it; the engine checks and copies a caller's
            # object or state dict (whose tensors the caller may change later).
            read_here = isinstance(src, (str, os.PathLike))
            strength = adapter.default_alpha if alpha is None else _expand_blocks(adapter_name, alpha, engine.components)
            if hotswap:
                engine.replace(adapter_name, adapter, strength, validated=read_here)
            else:
                engine.add(adapter_name, adapter, strength, validated=read_here, alone=True)
            return adapter_name

    def set_shira_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Mapping[str, Any] | Sequence[float | Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Make exactly these adapters active, fused at these strengths (diffusers' `set_adapters`: a strength left
        out, or None, is 1.0).

        A strength is a float or, as in diffusers' `set_adapters`, {component: float} (components left out: 1.0),
        with UNet block scales too ({"unet": {"down": 0, "mid": 0, "up": {"block_1": [0, 1, 0]}}}: attention
        blocks; other UNet weights keep 1.0) or {component: {module prefix: float}} for any component.
        One strength (not a list) applies to every named adapter.
        Usage: pipe.set_shira_adapters(["bluefire", "paintings"], adapter_weights=[0.7, {"unet": 0.5, "text_encoder": 0.2}])
        """
        engine = self.shira_engine
        names = [checked_name(n) for n in ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))]
        if len(set(names)) != len(names):
            raise ShiraLoadError(f"adapter names repeat: {names}")
        if isinstance(adapter_weights, Sequence) and not isinstance(adapter_weights, str):
            values = list(adapter_weights)
            if len(values) != len(names):
                raise ShiraLoadError(f"{len(names)} adapter names but {len(values)} weights")
        else:  # one strength for all (the engine checks that it is one)
            values = [adapter_weights] * len(names)
        values = [1.0 if value is None else value for value in values]
        with engine.lock:
            engine.set_active({name: _expand_blocks(name, value, engine.components) for name, value in zip(names, values)})

    def unload_shira_weights(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Remove some adapters, or all (then every weight is the original, bit for bit, backup freed)."""
        engine = self.shira_engine
        with engine.lock:  # "all" must mean the adapters loaded when the removal runs
            names = list(engine.alphas) if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            engine.remove(names)

    def merge_and_unload_shira(self) -> None:
        """Make the active styles permanent (PEFT's `merge_and_unload`; diffusers' `fuse_lora` then
        `unload_lora_weights`): the weights keep what they hold, every SHiRA adapter and its backup is dropped, so
        memory is freed and `save_pretrained` / quantisation see plain weights. Cannot be undone.
        Usage: pipe.set_shira_adapters(["bluefire", "paintings"], [0.7, 0.5]); pipe.merge_and_unload_shira()"""
        self.shira_engine.merge_and_unload()
        self.__dict__.pop("_shira_fused", None)

    def disable_shira(self) -> None:
        """Show the base weights; adapters stay loaded. Usage: pipe.disable_shira(); ...; pipe.enable_shira()"""
        self.shira_engine.set_enabled(False)

    def enable_shira(self) -> None:
        """Write the active adapters back after `disable_shira`."""
        self.shira_engine.set_enabled(True)

    def get_shira_adapters(self) -> dict[str, dict[str, Any]]:
        """name -> {"components", "parameters", "alpha" (a float or {component: float}), "active"}."""
        engine = self.shira_engine
        with engine.lock:  # a consistent view, not one torn by a load in another thread
            return {
                name: {
                    "components": engine.adapters[name].components,
                    "parameters": engine.adapters[name].num_parameters,
                    "alpha": copy.deepcopy(alpha),
                    "active": name in engine.active and engine.enabled,
                }
                for name, alpha in engine.alphas.items()
            }

    def get_active_shira_adapters(self) -> list[str]:
        """Names of the adapters currently written into the weights, in activation order."""
        engine = self.shira_engine
        with engine.lock:
            return list(engine.active) if engine.enabled else []

    def save_shira_weights(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        weight_name: str = SHIRA_WEIGHT_NAME,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs: Any,
    ) -> Path:
        """Write a loaded adapter (the only one, or `adapter_name`) and its model card to a folder;
        with `push_to_hub`, also upload them to `repo_id`.

        Usage: pipe.save_shira_weights("out/", adapter_name="bluefire", push_to_hub=True, repo_id="me/bluefire")
        """
        engine = self.shira_engine
        with engine.lock:  # the adapter as loaded now (a copy taken under the lock; writing the file needs no lock)
            if adapter_name is None:
                if len(engine.adapters) != 1:
                    raise ShiraLoadError(f"pass adapter_name: {len(engine.adapters)} adapters are loaded ({sorted(engine.adapters)})")
                adapter_name = next(iter(engine.adapters))
            engine.check_names([adapter_name])
            adapter = engine.adapters[adapter_name]
        if adapter.base_model is None:
            adapter = dataclasses.replace(adapter, base_model=getattr(self, "name_or_path", None))
        folder = adapter.save_pretrained(save_directory, weight_name, repo_id=repo_id if push_to_hub else None)
        if push_to_hub:
            if repo_id is None:
                raise ValueError("push_to_hub needs repo_id")
            adapter.push_to_hub(repo_id, weight_name=weight_name, **push_kwargs)
        return folder

    # ---- diffusers integration -------------------------------------------------------------------
    def to_json_string(self) -> str:
        # model_index.json must name the diffusers class, so plain diffusers can load what we save.
        config = json.loads(super().to_json_string())
        config["_class_name"] = next(
            c.__name__ for c in type(self).__mro__ if c.__module__.startswith("diffusers.") and issubclass(c, DiffusionPipeline)
        )
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


class ShiraStableDiffusionPipeline(ShiraLoaderMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline with SHiRA loading. Usage: ShiraStableDiffusionPipeline.from_pretrained(path)"""


class ShiraStableDiffusionXLPipeline(ShiraLoaderMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline with SHiRA loading (unet, text_encoder, text_encoder_2)."""


class ShiraStableDiffusion3Pipeline(ShiraLoaderMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline with SHiRA loading (transformer, three text encoders)."""


class ShiraFluxPipeline(ShiraLoaderMixin, FluxPipeline):
    """FluxPipeline with SHiRA loading (transformer, CLIP and T5 text encoders)."""


_SUBCLASSES: dict[type, type] = {}


def add_shira_support(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Give an existing pipeline instance the SHiRA methods (in place; returns it).

    Usage: pipe = add_shira_support(DiffusionPipeline.from_pretrained(model_id))
    """
    if isinstance(pipe, ShiraLoaderMixin):
        return pipe
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"expected a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    base = type(pipe)
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Shira{base.__name__}", (ShiraLoaderMixin, base), {"__module__": __name__})
    pipe.__class__ = _SUBCLASSES[base]
    return pipe
