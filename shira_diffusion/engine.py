"""Scatter engine: writes SHiRA adapters straight into live weights, in place, exactly reversibly.

For every weight tensor touched by any loaded adapter the engine keeps `positions` (sorted union of the
adapters' positions) and `backup` (the original values there). Every write recomputes

    W[p] = W0[p] + sum_i alpha_i * S_i[p]      (accumulated in fp32 from the backup, cast once)

(alpha_i is one number per adapter, or one per component, or one per module prefix of a component: the
forms diffusers' `set_adapters` takes, its UNet block scales expanded by the loader into module prefixes)

over those positions only, so unloading restores W0 bit for bit in any dtype, whatever happened before
(nothing is ever subtracted). Each mutation is all or nothing: a write whose value would not be finite in the
weight's dtype (from finite W0 and deltas) is refused, and everything the mutation wrote before is put back from
its log, so the error leaves every weight and the bookkeeping as they were. The engine writes from its own copies
of the adapters (a caller's tensors may change later; the engine's never do). Writes go in place into the existing parameter storage (`kernels`: one
compiled pass over all weights on CPUs, torch's scatter elsewhere): no new Parameter objects, no module
surgery, so hooks, offloading and compiled graphs stay valid.

Usage:
    engine = ScatterEngine({"unet": pipe.unet})
    engine.add("style", adapter, alpha=0.8); engine.set_active({"style": 1.0}); engine.remove(["style"])
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import kernels
from .format import MAX_ALPHA, ShiraAdapter, ShiraFormatError

try:
    from diffusers.models.attention import AttentionModuleMixin
except ImportError:  # older diffusers: every attention is the legacy class, whose processor decides (below)
    AttentionModuleMixin = ()


class ShiraLoadError(ValueError):
    """An adapter does not fit the model (unknown component/weight, shape, name in use...)."""


# One alpha; or {component: alpha | {module prefix: alpha}}. Left out (component, or weight under no prefix): 1.0.
Strength = float | dict[str, float | dict[str, float]]


def _finite(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # value != value: NaN
        raise ShiraLoadError(f"adapter {what}: weight must be a finite number, got {value!r}")
    if not abs(value) <= MAX_ALPHA:  # exact for ints of any size (math.isfinite overflows on 10**400); inf too
        raise ShiraLoadError(f"adapter {what}: weight must be a finite number, got {value!r}, beyond float32's range "
                             f"(|x| <= {MAX_ALPHA:.4g}) in which writes accumulate")
    return float(value)


def checked_name(name: object) -> str:
    """An adapter name is a non-empty string (a tuple or a number would be taken apart or lost by the verbs)."""
    if not isinstance(name, str) or not name:
        raise ShiraLoadError(f"adapter name must be a non-empty string, got {name!r}")
    return name


def _owned(adapter: ShiraAdapter) -> ShiraAdapter:
    """The engine's own copy of a caller's adapter: later changes to the caller's tensors cannot reach the weights."""
    deltas = {component: {name: dataclasses.replace(delta, positions=delta.positions.detach().clone(), deltas=delta.deltas.detach().clone())
                          for name, delta in table.items()} for component, table in adapter.deltas.items()}
    return dataclasses.replace(adapter, deltas=deltas, extra=copy.deepcopy(adapter.extra))


def _overflowed(values: torch.Tensor, originals: torch.Tensor) -> bool:
    """Whether some value is not finite where its original is: a write past the range of the weight's dtype."""
    return kernels.kept_finite(values, originals)[1]


def _alpha(strength: Strength, key: str) -> float:
    """The alpha of weight `key` ("<component>.<parameter>"): the longest module prefix that holds it wins."""
    if isinstance(strength, float):
        return strength
    component, _, name = key.partition(".")
    scale = strength.get(component, 1.0)
    if isinstance(scale, float):
        return scale
    holding = [prefix for prefix in scale if name.startswith(prefix + ".")]
    return scale[max(holding, key=len)] if holding else 1.0


def _rebased(backup: torch.Tensor, found: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The backup with another writer's change (what the weight held, `found`, minus what we had written there,
    `expected`) taken in as a change of the base, where any bit differs; elsewhere unchanged."""
    wide = torch.promote_types(found.dtype, torch.float64)  # one rounding: the cast back
    rebased = (backup.to(wide) + (found.to(wide) - expected.to(wide))).to(found.dtype)
    return torch.where(kernels.as_bits(found) != kernels.as_bits(expected), rebased, backup)


# diffusers' fuse_qkv_projections() copies an attention's projections into one fused layer, which the attention
# then reads instead: a SHiRA write into the originals would change nothing the model computes.
_FUSED_COPIES = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
_PROJECTIONS = {projection for members in _FUSED_COPIES.values() for projection in members}


def _fused_copy(attention: nn.Module, projection: str) -> str | None:
    """The fused layer (diffusers' `fuse_qkv_projections`) that `attention` reads in place of its `projection`, or
    None. Legacy attentions read it while their processor is a fused one (their unfuse only swaps the processor
    back); the newer ones while their `fused_projections` flag is set."""
    if isinstance(attention, AttentionModuleMixin):
        fused = bool(getattr(attention, "fused_projections", False))
    else:
        fused = type(getattr(attention, "processor", None)).__name__.startswith("Fused")
    return next((copy for copy, members in _FUSED_COPIES.items()
                 if fused and projection in members and isinstance(getattr(attention, copy, None), nn.Module)), None)


def _spellings(name: str) -> tuple[str, ...]:
    """`name`, then the spelling with / without transformers' `text_model.` prefix: transformers 5 dropped it
    from CLIPTextModel's weight names (CLIPTextModelWithProjection keeps it), so files name either."""
    other = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
    return name, other


@dataclass
class _Entry:
    """One adapter's share of one target: its deltas and where they sit in the target's union."""

    positions: torch.Tensor  # int64, sorted
    deltas: torch.Tensor  # fp32: the accumulation dtype, so a write does no per-adapter cast
    key: str  # "<component>.<weight>" as the adapter names it: what its per-prefix strengths are matched against
    slots: torch.Tensor | None = None  # index into the target's union; None when it *is* the union

    @classmethod
    def of(cls, component: str, param_name: str, delta, device: torch.device) -> "_Entry":
        return cls(delta.positions.to(device=device, dtype=torch.int64), delta.deltas.to(device=device, dtype=torch.float32),
                   f"{component}.{param_name}")


@dataclass
class _Target:
    """A live weight and the backup of its original values at the union of loaded positions."""

    parameter: nn.Parameter
    positions: torch.Tensor  # int64, sorted union over loaded adapters
    backup: torch.Tensor  # original values at `positions`, in the weight's dtype
    written: torch.Tensor  # what the weight held there after our last write (a change means someone else wrote)
    entries: dict[str, _Entry] = field(default_factory=dict)


class ScatterEngine:
    """Owns the adapters loaded into a set of modules and every write into their weights.

    Mutating methods take `lock`, so two switches on one pipeline never interleave.
    """

    def __init__(self, components: Mapping[str, nn.Module]):
        self.components = dict(components)
        self.lock = threading.RLock()
        self.alphas: dict[str, Strength] = {}  # loaded adapter -> its strength when active
        self.active: list[str] = []
        self.enabled = True
        self.scale = 1.0  # multiplies every strength (diffusers' per-call `cross_attention_kwargs["scale"]`)
        self.adapters: dict[str, ShiraAdapter] = {}  # kept (on the CPU) for saving and inspection
        self.targets: dict[str, _Target] = {}  # "<component>.<parameter>" -> target
        self.attentions: dict[str, nn.Module] = {}  # projection weight key -> the attention holding it (a lookup cache)
        self._undo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # the open mutation's writes

    # ---- validation (everything is checked before the first write) -----------------------------
    def resolve_parameter(self, component: str, name: str) -> nn.Parameter:
        """The live parameter `component.name`, or ShiraLoadError naming what is missing."""
        module = self.components.get(component)
        if module is None:
            raise ShiraLoadError(
                f"adapter targets component {component!r}, which this pipeline does not have "
                f"(it has {sorted(self.components)})"
            )
        for spelling in _spellings(name):
            try:
                return module.get_parameter(spelling)
            except AttributeError:
                continue
        raise ShiraLoadError(f"{component}.{name}: no such weight in {type(module).__name__}")

    def check(self, adapter: ShiraAdapter, name: str | None = None, validated: bool = False) -> list[tuple[str, nn.Parameter]]:
        """Raise a clear error unless `adapter` can be added (under `name`) without touching weights.

        Returns (key, live parameter) in `adapter.items()` order, the key being "<component>.<the model's own
        name of the weight>": a weight tied under two names (T5's `shared` / `encoder.embed_tokens`) is one
        target whichever name an adapter uses. `validated=True` skips the format checks for adapters that were
        just read (and checked) from a file.
        """
        if name is not None and checked_name(name) in self.alphas:
            raise ShiraLoadError(f"adapter name {name!r} is already in use; unload it first or pick another name")
        if not validated:
            try:
                adapter.validate()
            except ShiraFormatError as error:
                raise ShiraLoadError(str(error)) from None
        found = []
        by_name: dict[str, tuple[dict[str, nn.Parameter], dict[int, str]]] = {}  # one walk per component
        owners = {id(target.parameter): key for key, target in self.targets.items()}  # weights shared by components
        keys_seen: dict[str, str] = {}
        for component, param_name, delta in adapter.items():
            key = f"{component}.{param_name}"
            if component not in by_name and component in self.components:
                every, canonical = {}, {}
                for n, p in self.components[component].named_parameters(remove_duplicate=False):
                    every[n] = p
                    canonical.setdefault(id(p), n)  # the first name of each tensor, as named_parameters() gives it
                by_name[component] = (every, canonical)
            parameters, canonical = by_name.get(component, ({}, {}))
            parameter = next((parameters[n] for n in _spellings(param_name) if n in parameters), None)
            if parameter is None:
                parameter = self.resolve_parameter(component, param_name)  # raises the error naming what is missing
            target_key = owners.get(id(parameter)) or f"{component}.{canonical.get(id(parameter), param_name)}"
            if target_key in keys_seen:
                raise ShiraLoadError(f"{key} and {keys_seen[target_key]} are the same (tied) weight; an adapter may "
                                     "change it under one name only")
            keys_seen[target_key] = key
            if not parameter.is_floating_point():
                raise ShiraLoadError(f"{key}: weight dtype {parameter.dtype} is not floating point")
            if tuple(parameter.shape) != delta.shape:
                raise ShiraLoadError(
                    f"{key}: adapter was made for shape {delta.shape}, the model's weight has shape "
                    f"{tuple(parameter.shape)} (an adapter for another base model?)"
                )
            if parameter.device.type == "meta":
                raise ShiraLoadError(f"{key}: weight is on the meta device (sequential CPU offload is not supported)")
            if not parameter.is_contiguous():
                raise ShiraLoadError(f"{key}: weight is not contiguous (e.g. channels_last); flat positions need row-major storage")
            self._check_read(target_key, parameter)
            found.append((target_key, parameter))
        return found

    def check_strength(self, name: str, strength: float | Mapping[str, float | Mapping[str, float]], adapter: ShiraAdapter | None = None) -> Strength:
        """A float; or {component: float | {module prefix: float}} naming only this pipeline's components and
        modules that exist in them (diffusers' per-component `adapter_weights`; its UNet block scales arrive here
        expanded into prefixes). A component the adapter (default: the loaded one of that name) does not touch
        gets a warning, as in diffusers."""
        if not isinstance(strength, Mapping):
            return _finite(name, strength)
        unknown = [c for c in strength if c not in self.components]
        if unknown:
            raise ShiraLoadError(f"adapter {name!r}: weight for component {unknown[0]!r}, which this pipeline does not have "
                                 f"(it has {sorted(self.components)})")
        unused = [c for c in strength if c not in (adapter or self.adapters[name]).components]
        if unused:
            warnings.warn(f"adapter {name!r} does not touch {unused[0]!r}; its weight there has no effect", stacklevel=3)
        checked: dict[str, float | dict[str, float]] = {}
        for component, scale in strength.items():
            if not isinstance(scale, Mapping):
                checked[component] = _finite(f"{name}[{component!r}]", scale)
                continue
            module = self.components[component]
            for prefix in scale:
                if not isinstance(prefix, str) or not prefix:
                    raise ShiraLoadError(f"adapter {name!r}: module prefix {prefix!r} for {component!r} is not a module "
                                         f"name (for the whole component, give {{{component!r}: weight}})")
                try:
                    module.get_submodule(prefix)
                except AttributeError:
                    raise ShiraLoadError(f"adapter {name!r}: weight for {component}.{prefix}, which is no module of "
                                         f"{type(module).__name__}") from None
            checked[component] = {prefix: _finite(f"{name}[{component!r}][{prefix!r}]", value) for prefix, value in scale.items()}
        return checked

    def check_names(self, names: Iterable[str]) -> list[str]:
        names = [checked_name(name) for name in names]
        unknown = [n for n in names if n not in self.alphas]
        if unknown:
            raise ShiraLoadError(f"unknown adapter {unknown[0]!r}; loaded adapters: {sorted(self.alphas)}")
        if len(set(names)) != len(names):
            raise ShiraLoadError(f"adapter names repeat: {names}")
        return names

    # ---- mutations -------------------------------------------------------------------------------
    def add(self, name: str, adapter: ShiraAdapter, alpha: float | Mapping, activate: bool = True, validated: bool = False,
            alone: bool = False) -> None:
        """Validate, back up the new positions, then write. `alpha`: any strength `set_active` takes. `alone`: the new
        adapter becomes the only active one (diffusers' loading), in the same call. The engine keeps its own copy of
        `adapter`, unless `validated` (the adapter was just read from a file and handed over).
        Usage: engine.add("a", adapter, 1.0)"""
        with self.lock, self._transaction():
            parameters = self.check(adapter, name, validated)
            adapter = adapter if validated else _owned(adapter)
            strength = self.check_strength(name, alpha, adapter)
            uniform = isinstance(strength, float)
            fresh, joined = [], []  # weights nothing touched yet / weights other adapters already touch
            for (component, param_name, delta), (key, parameter) in zip(adapter.items(), parameters):
                self._bring_to(key, parameter)
                entry = _Entry.of(component, param_name, delta, parameter.device)
                target = self.targets.get(key)
                if target is None:
                    fresh.append((key, parameter, entry))
                else:
                    joined.append((key, target, entry))
            leaving = self._keys_of(set(self.active)) if alone and activate else []
            if leaving:
                self._check_layout(leaving)
                self.active = []
            self.alphas[name] = strength
            self.adapters[name] = adapter
            if activate:
                self.active.append(name)
            with torch.no_grad():
                if activate and self.enabled and uniform:  # W0 + alpha*S written while the backup is read: one pass
                    backups, writtens, overflowed = kernels.gather_add_scatter([(p.data, e.positions, e.deltas) for _, p, e in fresh],
                                                                               strength * self.scale)
                    self._logged([(p.data, e.positions, backup) for (_, p, e), backup in zip(fresh, backups)], overflowed, [k for k, _, _ in fresh])
                else:
                    backups = writtens = kernels.gather([(p.data, e.positions) for _, p, e in fresh])
            for (key, parameter, entry), backup, written in zip(fresh, backups, writtens):
                self.targets[key] = _Target(parameter, entry.positions, backup, written, {name: entry})
            unread = self._grow([(key, name, entry) for key, _, entry in joined])
            rewrite = [key for key, _, _ in joined] + ([] if uniform or not activate else [key for key, _, _ in fresh])
            # joined weights: the sum with the others; fresh ones at a non-uniform strength; those deactivated
            self._write(list(dict.fromkeys(rewrite + leaving)), unread)

    def set_active(self, weights: Mapping[str, float | Mapping[str, float]]) -> None:
        """Exactly these adapters active, at these strengths (multi-adapter fusion); a strength is a float or
        {component: float | {module prefix: float}} (see `check_strength`)."""
        with self.lock, self._transaction():
            names = self.check_names(weights)
            strengths = {name: self.check_strength(name, weights[name]) for name in names}  # all checked before any write
            self._check_layout(self._keys_of(set(self.active) | set(names)))
            before = set(self.active)
            self.alphas.update(strengths)
            self.active = names
            self._write(self._keys_of(before | set(names)))

    def replace(self, name: str, adapter: ShiraAdapter, alpha: float | Mapping, validated: bool = False) -> None:
        """Hotswap: the loaded adapter `name` becomes `adapter` at strength `alpha`, keeping its name and its place
        among the active adapters (inactive stays inactive). Any target set; checked before any write. Where no
        other adapter shares its weights (the usual style switch), one pass over them restores the old positions
        and writes the new ones: what `remove` then `add` do in two.
        Usage: engine.replace("style", other_adapter, 1.0)"""
        with self.lock, self._transaction():
            self.check_names([name])
            parameters = self.check(adapter, None, validated)
            adapter = adapter if validated else _owned(adapter)
            strength = self.check_strength(name, alpha, adapter)
            leaving = self._keys_of({name})
            self._check_layout(leaving)
            for key in leaving:
                self._bring_to(key, self.targets[key].parameter)
            arriving: dict[str, tuple[nn.Parameter, _Entry]] = {}
            for (component, param_name, delta), (key, parameter) in zip(adapter.items(), parameters):
                self._bring_to(key, parameter)
                arriving[key] = (parameter, _Entry.of(component, param_name, delta, parameter.device))
            alone = all(self.targets[key].entries.keys() <= {name} for key in {*leaving, *arriving} if key in self.targets)
            self.alphas[name], self.adapters[name] = strength, adapter
            if alone and self.enabled and name in self.active:
                self._swap_alone(name, leaving, arriving)
                return
            for key in leaving:
                del self.targets[key].entries[name]
            unread, growing = {}, []
            for key, (parameter, entry) in arriving.items():
                if key in self.targets:
                    growing.append((key, name, entry))
                    continue
                placeholder = torch.full_like(entry.positions, -0.0, dtype=parameter.dtype)  # see `_grow`
                self.targets[key] = _Target(parameter, entry.positions, placeholder, placeholder.clone(), {name: entry})
                unread[key] = torch.ones_like(entry.positions, dtype=torch.bool)  # every position is read by the write
            unread.update(self._grow(growing))
            keys = list(dict.fromkeys([*leaving, *arriving]))
            self._write(keys, unread)
            self._shrink(leaving)

    def _swap_alone(self, name: str, leaving: list[str], arriving: Mapping[str, tuple[nn.Parameter, _Entry]]) -> None:
        """`replace` on weights only `name` holds, active: one `kernels.switch` pass; each target then holds
        exactly the new adapter's positions."""
        keys = list(dict.fromkeys([*leaving, *arriving]))
        jobs, alphas = [], []
        for key in keys:
            target, (parameter, entry) = self.targets.get(key), arriving.get(key, (None, None))
            weight = (target.parameter if target is not None else parameter).data
            no_positions, no_values = torch.empty(0, dtype=torch.int64, device=weight.device), weight.new_empty(0)
            old = (target.positions, target.backup, target.written) if target is not None else (no_positions, no_values, no_values)
            new = (entry.positions, entry.deltas) if entry is not None else (no_positions, no_values.float())
            jobs.append((weight, *old, *new))
            alphas.append(_alpha(self.alphas[name], entry.key) * self.scale if entry is not None else 1.0)
        with torch.no_grad():
            olds, changed, backups, writtens, overflowed = kernels.switch(jobs, alphas)
        # undone in reverse: the arriving positions get their originals, then the leaving ones what they held
        self._logged([(job[0], job[1], old) for job, old in zip(jobs, olds)])
        self._logged([(job[0], job[4], backup) for job, backup in zip(jobs, backups)], overflowed, keys)
        for i in (i for i, flag in enumerate(changed) if flag):
            backups[i], writtens[i] = self._keep_other_writes(keys[i], jobs[i], olds[i], backups[i], writtens[i], alphas[i])
        for key, (weight, *_), backup, written in zip(keys, jobs, backups, writtens):
            if key not in arriving:
                del self.targets[key]  # releases the backup memory
                continue
            parameter, entry = arriving[key]
            self.targets[key] = _Target(parameter, entry.positions, backup, written, {name: entry})

    def _keep_other_writes(self, key: str, job: tuple, old: torch.Tensor, backup: torch.Tensor, written: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """After a switch pass found another writer's changes at leaving positions (as `_write` does): they stay in
        the weight as a change of the base, also under the arriving adapter. Returns the arriving (backup, written)."""
        weight, leaving, leaving_backup, expected, arriving, deltas = job
        rebased = _rebased(leaving_backup, old, expected)
        shared_out, shared_in = torch.isin(leaving, arriving), torch.isin(arriving, leaving)
        backup, written = backup.clone(), written.clone()
        backup[shared_in] = rebased[shared_out]
        sums = kernels.add_scaled(rebased[shared_out].to(torch.promote_types(old.dtype, torch.float32)), deltas[shared_in], alpha)
        written[shared_in] = sums.to(old.dtype)
        if _overflowed(written[shared_in], backup[shared_in]):
            raise self._overflow_error(key)
        self._scatter([(weight, leaving[~shared_out], rebased[~shared_out]), (weight, arriving[shared_in], written[shared_in])])
        return backup, written

    def remove(self, names: Iterable[str]) -> None:
        """Unload adapters: their positions go back to the original values; backups shrink or go."""
        with self.lock, self._transaction():
            names = self.check_names(names)
            gone = set(names)
            keys = self._keys_of(gone)
            self._check_layout(keys)
            for name in gone:
                del self.alphas[name], self.adapters[name]
            self.active = [n for n in self.active if n not in gone]
            for key in keys:
                for name in gone:
                    self.targets[key].entries.pop(name, None)
            self._write(keys)  # the originals where only the removed adapters wrote, the others' sum elsewhere
            self._shrink(keys)

    def set_scale(self, scale: float) -> None:
        """Multiply every active strength by `scale` (1.0: as set), rewriting the active adapters' weights.
        Usage: engine.set_scale(0.5); ...; engine.set_scale(1.0)"""
        with self.lock, self._transaction():
            scale = _finite("scale", scale)
            if scale == self.scale:
                return
            keys = self._keys_of(set(self.active))
            self._check_layout(keys)
            self.scale = scale
            self._write(keys)

    def merge_and_unload(self) -> None:
        """What the weights hold now stays in them for good (the active adapters, PEFT's `merge_and_unload`): every
        adapter, backup and position list is dropped, nothing is written. Usage: engine.merge_and_unload()"""
        with self.lock:
            self.alphas, self.active, self.adapters, self.targets = {}, [], {}, {}
            self.enabled, self.scale = True, 1.0

    def set_enabled(self, enabled: bool) -> None:
        """Disable: every touched weight shows its original values; enable: the active set again."""
        with self.lock, self._transaction():
            self._check_layout(list(self.targets))
            self.enabled = enabled
            self._write(list(self.targets))

    # ---- all or nothing ----------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Run a mutation so that, if it raises, the weights hold again exactly what they held before (its writes
        undone in reverse order, from the values each one replaced) and the bookkeeping is what it was. Bookkeeping
        tensors are replaced, never changed in place, so keeping the references is a complete snapshot."""
        if self._undo is not None:  # a mutation inside another: the outer one undoes both
            yield
            return
        saved = (dict(self.alphas), list(self.active), self.enabled, self.scale, dict(self.adapters), dict(self.targets),
                 [(t, t.positions, t.backup, t.written, dict(t.entries)) for t in self.targets.values()],
                 [(e, e.positions, e.deltas, e.slots) for t in self.targets.values() for e in t.entries.values()])
        self._undo = []
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for job in reversed(self._undo):
                    kernels.scatter([job])  # one by one: later writes may cover earlier ones
            alphas, active, self.enabled, self.scale, adapters, targets, fields, entries = saved
            self.alphas, self.active, self.adapters, self.targets = alphas, active, adapters, targets
            for target, positions, backup, written, held in fields:
                target.positions, target.backup, target.written, target.entries = positions, backup, written, held
            for entry, positions, deltas, slots in entries:
                entry.positions, entry.deltas, entry.slots = positions, deltas, slots
            raise
        finally:
            self._undo = None

    def _logged(self, writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], overflowed: Iterable[bool] = (),
                keys: list[str] | None = None) -> None:
        """Record writes just made as (weight, positions, what they held before), then refuse the keys whose pass
        found a value that would not be finite (the kernels kept the original there)."""
        if self._undo is not None:
            self._undo.extend(writes)
        self._refuse_overflows([key for key, flag in zip(keys or [], overflowed) if flag])

    def _scatter(self, jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """`kernels.scatter`, logged (rare paths: what the weights held there is read first)."""
        before = kernels.gather([(weight, positions) for weight, positions, _ in jobs])
        kernels.scatter(jobs)
        self._logged([(weight, positions, old) for (weight, positions, _), old in zip(jobs, before)])

    def _refuse_overflows(self, keys: list[str]) -> None:
        if keys:
            raise self._overflow_error(keys[0])

    def _overflow_error(self, key: str) -> ShiraLoadError:
        dtype = self.resolve_parameter(*key.split(".", 1)).dtype
        strengths = {name: self.alphas[name] for name in self.active} if self.enabled else {}
        return ShiraLoadError(f"{key}: the active adapters at these strengths ({strengths}) would write values beyond "
                              f"{dtype}'s range (|x| <= {torch.finfo(dtype).max:.4g}) into this weight; nothing was changed "
                              "(lower the strengths, or use a wider dtype)")

    # ---- internals -------------------------------------------------------------------------------
    def _check_layout(self, keys: list[str]) -> None:
        # Flat positions index row-major storage; a layout change after loading (channels_last) is caught here,
        # before any write, so the adapter can still be unloaded once the layout is changed back.
        for key in keys:
            if not self.targets[key].parameter.is_contiguous():
                raise ShiraLoadError(f"{key}: weight is no longer contiguous (changed to channels_last after loading?); "
                                     "convert it back with .to(memory_format=torch.contiguous_format) before changing SHiRA adapters")
            self._check_read(key, self.targets[key].parameter)

    def _check_read(self, key: str, parameter: nn.Parameter) -> None:
        """Refuse a write into a weight the model no longer reads (its attention's projections fused)."""
        component, _, name = key.partition(".")
        module_path, _, leaf = name.rpartition(".")
        attention_path, _, projection = module_path.rpartition(".")
        if projection not in _PROJECTIONS:
            return
        attention = self.attentions.get(key)
        if attention is None or getattr(getattr(attention, projection, None), leaf, None) is not parameter:  # cached, if still its owner
            try:
                attention = self.attentions[key] = self.components[component].get_submodule(attention_path)
            except AttributeError:
                return
        copy = _fused_copy(attention, projection)
        if copy is not None:
            raise ShiraLoadError(f"{key}: the model reads the fused {component}.{f'{attention_path}.' if attention_path else ''}{copy} "
                                 "instead (fuse_qkv_projections() was called), so SHiRA writes here would have no effect; call "
                                 "unfuse_qkv_projections() before loading, switching or unloading SHiRA adapters, and fuse again afterwards")

    def _keys_of(self, names: set[str]) -> list[str]:
        return [key for key, target in self.targets.items() if names & target.entries.keys()]

    def _bring_to(self, key: str, parameter: nn.Parameter) -> None:
        # The weight may have moved (pipe.to(...), CPU offload) or changed dtype since the last write:
        # follow it. A dtype change re-bases the backup on the new dtype's rounding of the original.
        target = self.targets.get(key)
        weight = parameter.data
        if target is None or (target.backup.device == weight.device and target.backup.dtype == weight.dtype):
            return
        target.positions = target.positions.to(weight.device)
        target.backup = target.backup.to(device=weight.device, dtype=weight.dtype)
        target.written = target.written.to(device=weight.device, dtype=weight.dtype)  # as the weight itself was cast
        for entry in target.entries.values():
            entry.positions, entry.deltas = entry.positions.to(weight.device), entry.deltas.to(weight.device)
            entry.slots = None if entry.slots is None else entry.slots.to(weight.device)

    def _grow(self, growing: list[tuple[str, str, _Entry]]) -> dict[str, torch.Tensor]:
        """Add entries (key, adapter name, entry) to existing targets, widening their unions (one batched sorted
        merge) without reading the weights; returns {key: which union positions are new}. The next `_write` reads
        the originals there (the live weight still holds W0 at positions never written) while it writes: until then
        their backup is -0.0, the sum's identity (-0.0 + x is x, even for x = -0.0)."""
        unread, moves = {}, []
        merged = kernels.merge([(self.targets[key].positions, entry.positions) for key, _, entry in growing])
        for (key, name, entry), (union, old_slots, new_slots, fresh) in zip(growing, merged):
            target = self.targets[key]
            if union.numel() > target.positions.numel():
                backup = torch.full_like(union, -0.0, dtype=target.backup.dtype)
                written = backup.clone()
                moves += [(backup, old_slots, target.backup), (written, old_slots, target.written)]
                for other in target.entries.values():
                    other.slots = old_slots if other.slots is None else old_slots[other.slots]
                target.positions, target.backup, target.written = union, backup, written
                unread[key] = fresh
            entry.slots = None if entry.positions.numel() == union.numel() else new_slots  # None: it is the union
            target.entries[name] = entry
        kernels.scatter(moves)  # the old backups into their places in the widened ones
        return unread

    def _shrink(self, keys: list[str]) -> None:
        """Positions no loaded adapter holds any more leave the union (their originals are back in the weight)."""
        shrinking = []
        for key in keys:
            target = self.targets[key]
            if not target.entries:
                del self.targets[key]  # releases the backup memory
            elif all(entry.slots is not None for entry in target.entries.values()):  # else one adapter holds them all
                shrinking.append(target)
        # The union slots still held, and each entry's slots in them, by merging the entries' (sorted) slots.
        kept = [None] * len(shrinking)
        renumbered: list[dict[str, torch.Tensor | None]] = [{} for _ in shrinking]
        for step in range(max((len(t.entries) for t in shrinking), default=0)):
            pairs, jobs = [], []
            for i, target in enumerate(shrinking):
                if step < len(target.entries):
                    name, entry = list(target.entries.items())[step]
                    if kept[i] is None:
                        kept[i], renumbered[i][name] = entry.slots, None  # None: 0..n-1, in the first entry's order
                    else:
                        pairs.append((kept[i], entry.slots))
                        jobs.append((i, name))
            for (i, name), (union, first_slots, second_slots, _) in zip(jobs, kernels.merge(pairs)):
                for prior, slots in renumbered[i].items():
                    renumbered[i][prior] = first_slots if slots is None else first_slots[slots]
                renumbered[i][name], kept[i] = second_slots, union
        smaller = [i for i, (target, keep) in enumerate(zip(shrinking, kept)) if keep.numel() < target.positions.numel()]
        values = kernels.gather([(array, kept[i]) for i in smaller for array in (shrinking[i].positions, shrinking[i].backup, shrinking[i].written)])
        for n, i in enumerate(smaller):
            target, count = shrinking[i], kept[i].numel()
            target.positions, target.backup, target.written = values[3 * n: 3 * n + 3]
            for name, entry in target.entries.items():  # (a first entry left alone is the whole union: None)
                entry.slots = None if entry.positions.numel() == count else renumbered[i][name]

    def _sums(self, target: _Target) -> torch.Tensor:
        """W0 + the sum of the active adapters' alpha * S at the target's positions, uncast: fp32 (fp64 weights: fp64)."""
        values = target.backup.to(torch.promote_types(target.backup.dtype, torch.float32), copy=True)  # never into the backup
        if self.enabled:
            for name in self.active:
                entry = target.entries.get(name)
                if entry is not None:
                    kernels.add_scaled(values, entry.deltas, _alpha(self.alphas[name], entry.key) * self.scale, entry.slots)
        return values

    def _values(self, target: _Target) -> torch.Tensor:
        """What the weight should hold at the target's positions: W0 + sum of the active adapters' alpha * S."""
        if not (self.enabled and any(name in target.entries for name in self.active)):
            return target.backup
        return self._sums(target).to(target.parameter.dtype)

    def _write(self, keys: Iterable[str], unread: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write `_values` into these targets, in one pass. `unread` ({key: mask}, from `_grow`): positions whose
        originals are read by this pass (into the backup) and written plus the adapters' share.

        Where a weight no longer holds what we last wrote there, something else wrote it in between (diffusers'
        fuse_lora / unfuse_lora, a user's edit): that change moves into the backup, as a change of the base, and
        the target is written again, so it is neither lost now nor left behind on unload."""
        keys = list(keys)
        unread = unread or {}
        targets = [self.targets[key] for key in keys]
        for key, target in zip(keys, targets):
            self._bring_to(key, target.parameter)
        plain = [i for i, key in enumerate(keys) if key not in unread]
        growing = [i for i, key in enumerate(keys) if key in unread]
        values: list[torch.Tensor | None] = [None] * len(keys)
        olds: list[torch.Tensor | None] = [None] * len(keys)
        changed = [False] * len(keys)
        for i in plain:
            values[i] = self._values(targets[i])
        sums = {i: self._sums(targets[i]) for i in growing}
        self._refuse_overflows([keys[i] for i in plain if values[i] is not targets[i].backup and _overflowed(values[i], targets[i].backup)]
                               + [keys[i] for i in growing if _overflowed(sums[i], targets[i].backup)])  # before any write
        with torch.no_grad():
            got, flags = kernels.exchange([(targets[i].parameter.data, targets[i].positions, values[i], targets[i].written) for i in plain])
            self._logged([(targets[i].parameter.data, targets[i].positions, old) for i, old in zip(plain, got)])
            for i, old, flag in zip(plain, got, flags):
                olds[i], changed[i] = old, flag
            got, wrote, flags, overflowed = kernels.grow_exchange([(targets[i].parameter.data, targets[i].positions, sums[i],
                                                                    targets[i].written, unread[keys[i]], targets[i].backup) for i in growing])
            self._logged([(targets[i].parameter.data, targets[i].positions, old) for i, old in zip(growing, got)], overflowed,
                         [keys[i] for i in growing])
        for i, old, written, flag in zip(growing, got, wrote, flags):  # the originals read went into backup and written
            olds[i], values[i], changed[i] = old, written, flag
        moved = [i for i, flag in enumerate(changed) if flag]
        for i in moved:
            target = targets[i]
            target.backup = _rebased(target.backup, olds[i], target.written)
            values[i] = self._values(target)
        self._refuse_overflows([keys[i] for i in moved if _overflowed(values[i], targets[i].backup)])
        if moved:
            with torch.no_grad():
                self._scatter([(targets[i].parameter.data, targets[i].positions, values[i]) for i in moved])
        for target, written in zip(targets, values):
            target.written = written
