"""Scoped silence for the third-party messages a user of this package cannot act on, and one progress display at a time.

`quiet_libraries()` is a context manager that, while it is open,
- drops exactly the known noise (KNOWN_LOG_NOISE, KNOWN_WARNING_NOISE): diffusers' "No LoRA keys associated to
  CLIPTextModel found with the prefix='text_encoder'" (a UNet-only LoRA file, as this package's LoRA baseline
  writes, has no text-encoder keys by design) and PEFT's "Already found a `peft_config` attribute" (diffusers
  loads every further LoRA adapter this way: several adapters in one model is the point). Every other log record
  and warning from these libraries still comes through;
- turns off diffusers' and transformers' loading progress bars ("Loading pipeline components", "Loading
  weights"), which otherwise nest inside the caller's own tqdm bar and interleave with it (huggingface_hub's
  download bars stay: a download can take minutes). A pipeline's own denoising bar is per pipeline:
  `pipe.set_progress_bar_config(disable=True)`.
Everything is restored on exit (filters removed, warning filters and progress-bar switches as they were), also
on an exception. Nesting is fine. Not thread-safe: `warnings.catch_warnings` swaps process-wide state.

Usage:
    with quiet_libraries():
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# (logger name, message pattern): the logger is the emitting module's own (a logger's filters only see the records
# created on it, not those propagated from its children), the pattern anchored at the message's start.
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = tuple(
    (name, r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_\d)?'")
    for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")
)
# (warning category, message pattern, module pattern) as `warnings.filterwarnings` takes them.
KNOWN_WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Already found a `peft_config` attribute in the model", r"peft\.tuners\.tuners_utils"),
)


class _DropMatching(logging.Filter):
    """A logger filter that drops the records whose message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextmanager
def _log_filters() -> Iterator[None]:
    added = [(logging.getLogger(name), _DropMatching(pattern)) for name, pattern in KNOWN_LOG_NOISE]
    for logger, noise in added:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger, noise in added:
            logger.removeFilter(noise)


@contextmanager
def _warning_filters() -> Iterator[None]:
    with warnings.catch_warnings():  # restores the process's filters on exit
        for category, message, module in KNOWN_WARNING_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


def _set_hub_bars(off: bool) -> None:
    from huggingface_hub import utils as hub_utils

    if hub_utils.are_progress_bars_disabled() != off:
        (hub_utils.disable_progress_bars if off else hub_utils.enable_progress_bars)()


@contextmanager
def _library_progress_bars_off() -> Iterator[None]:
    # Imported here: importing this module must stay light (the CLI imports it before torch is needed).
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    diffusers_on = diffusers_logging.is_progress_bar_enabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_off = hub_utils.are_progress_bars_disabled()
    if diffusers_on:
        diffusers_logging.disable_progress_bar()
    if transformers_on:
        transformers_logging.disable_progress_bar()
        _set_hub_bars(hub_off)  # transformers switches the Hub's download bars too: those stay as they were
    try:
        yield
    finally:  # back to exactly what the user had: only what this call turned off is turned on again
        if diffusers_on:
            diffusers_logging.enable_progress_bar()
        if transformers_on:
            transformers_logging.enable_progress_bar()
            _set_hub_bars(hub_off)


@contextmanager
def quiet_libraries(progress_bars: bool = False) -> Iterator[None]:
    """Silence KNOWN_LOG_NOISE and KNOWN_WARNING_NOISE, and (unless `progress_bars`) the libraries' loading bars,
    until the block ends.

    Usage: with quiet_libraries(): pipe.load_lora_weights(folder, adapter_name="style")
    """
    with ExitStack() as stack:
        stack.enter_context(_log_filters())
        stack.enter_context(_warning_filters())
        if not progress_bars:
            stack.enter_context(_library_progress_bars_off())
        yield


@contextmanager
def datasets_quiet() -> Iterator[None]:
    """datasets' progress bars and info logs off until the block ends (restored after), e.g. while it reads a
    small local file. Usage: with datasets_quiet(): datasets.load_dataset("imagefolder", ...)"""
    import datasets

    bars_were_off, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()
