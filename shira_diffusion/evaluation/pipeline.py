"""Open the diffusers pipeline an evaluation or the demo runs on, failing in seconds with one clear message.

`DiffusionPipeline.from_pretrained` on a Hub id with no network spends ~25 s in retries and then reports a
misleading "does not appear to have a file named model_index.json"; `check_model_source` asks the local
folder, then the Hugging Face cache, then the Hub once (no retries) and raises FileNotFoundError saying which.

Usage:
    check_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5")   # raises FileNotFoundError if unusable
    pipe = load_pipeline("path/to/sd15", dtype=torch.float16)
"""

from __future__ import annotations

from pathlib import Path

import torch


def check_model_source(name_or_path: str, revision: str | None = None) -> None:
    """Raise FileNotFoundError unless `name_or_path` is a diffusers folder, a cached Hub model, or a Hub model
    that answers now. Usage: check_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5")"""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: no such local folder, and not a valid Hugging Face Hub model id") from None
    try:
        hf_hub_download(name_or_path, "model_index.json", revision=revision, local_files_only=True)
        return  # in the cache: from_pretrained can work offline
    except Exception:  # LocalEntryNotFoundError and friends: not cached, ask the Hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"model {name_or_path!r} could not be found: it is not a local folder and not in the Hugging Face cache, "
            f"and HF_HUB_OFFLINE is set. Download it first (hf download {name_or_path}) or pass a local folder."
        )
    try:  # one HEAD request, no retries: a dead network fails in seconds
        get_hf_file_metadata(hf_hub_url(name_or_path, "model_index.json", revision=revision), timeout=10)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FileNotFoundError(
            f"model {name_or_path!r} could not be reached or found: it is not a local folder, not in the Hugging Face "
            f"cache, and the Hub did not serve it ({type(error).__name__}: {reason[:200]}). Check the id and the "
            "network, or pass a local folder."
        ) from None


def load_pipeline(name_or_path: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype | None = None):
    """`DiffusionPipeline.from_pretrained` after `check_model_source`; load failures become FileNotFoundError
    naming the model. Usage: pipe = load_pipeline("sd15/", dtype=torch.float16)"""
    from diffusers import DiffusionPipeline

    check_model_source(name_or_path, revision)
    try:
        return DiffusionPipeline.from_pretrained(name_or_path, revision=revision, variant=variant, dtype=dtype)
    except OSError as error:  # diffusers / huggingface_hub report missing files and network trouble as OSError
        raise FileNotFoundError(f"model {name_or_path!r} could not be loaded: {str(error).strip()[:400]}") from None
