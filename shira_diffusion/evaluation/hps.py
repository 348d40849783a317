"""HPSv2 (Human Preference Score v2) on open_clip, with the official scorer's exact preprocessing.

The score is 100 x the cosine of the L2-normalised image and text embeddings of open_clip ViT-H-14 with the
HPS v2.0 / v2.1 weights (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` from the Hub repo xswu/HPSv2),
the scale the SHiRA paper reports. Built on open_clip_torch rather than the `hpsv2` package (whose 1.2.0
wheel lacks its BPE vocabulary, imports `turtle`, pins pytest==7.2.0 and protobuf<4, downloads the 3.9 GB
LAION ViT-H-14 weights only to overwrite them, and reloads the checkpoint on every call).

Checkpoints: a `.pt` is read by open_clip with `torch.load(weights_only=True)` (tensors and plain containers
only; anything else is refused, never unpickled), a `.safetensors` file with safetensors. Either may hold
`{"state_dict": ...}` or a bare state dict (a `module.` prefix is stripped); the load is strict.

Where the checkpoint comes from (`checkpoint=None`): `$HPS_ROOT/<file>` and `~/.cache/hpsv2/<file>` (the
folders the official package uses), then the Hugging Face cache / Hub (`hf_hub_download`).

Which version a checkpoint is: the official file names say it (`HPS_v2_compressed.pt` -> v2.0,
`HPS_v2.1_compressed.pt` -> v2.1, also as `.safetensors`); an explicit `version` that contradicts them is an
error, raised before anything is loaded. Any other file name is labelled with the default, v2.1, unless
`version` is given, and the scorer says so: `version_source == "assumed"` and `version_note` explains it (the
CLI prints it, summary.md repeats it).

Usage:
    scorer = HPSv2Scorer(version="v2.1")             # found or downloaded once, or checkpoint=PATH
    scores = scorer.score([image1, "image2.png"], "a koala in a spaceship, blue fire style")
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Union

import torch
from PIL import Image

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VERSION = "v2.1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
EVAL_EXTRA = 'pip install "shira-diffusion[eval]"'

ImageInput = Union[Image.Image, str, os.PathLike]


class MissingExtraError(ImportError, ValueError):
    """A package of the `eval` extra is missing. Also a ValueError, so `shira-diffusion` reports it as one
    `error: ...` line instead of a traceback. Usage: except MissingExtraError as error: print(error)"""


def require_extra(module: str, purpose: str) -> ModuleType:
    """Import `module` (part of the eval extra) or raise MissingExtraError naming the install command.
    Usage: open_clip = require_extra("open_clip", "HPSv2 scoring")"""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{purpose} needs the eval extra ({module} could not be imported: {error}); install it with {EVAL_EXTRA}", name=module) from None


def official_files(version: str) -> tuple[str, str]:
    """The official file name of `version` and its .safetensors copy. Usage: official_files("v2.0")"""
    name = HPS_FILES[version]
    return name, str(Path(name).with_suffix(".safetensors"))


def version_of_file(path: str | Path) -> str | None:
    """'v2.0' / 'v2.1' when the file name is an official one (or its .safetensors copy), else None.
    Usage: version_of_file("ckpts/HPS_v2_compressed.pt") == "v2.0" """
    name = Path(path).name
    return next((version for version in HPS_FILES if name in official_files(version)), None)


def resolve_version(checkpoint: str | Path | None, version: str | None) -> tuple[str, str]:
    """(version, source): source is 'given', 'file name', 'default' (no checkpoint: the default file is used)
    or 'assumed' (an unofficial file name, labelled with the default). Raises ValueError when `version`
    contradicts an official file name. Usage: version, source = resolve_version("HPS_v2_compressed.pt", None)"""
    if version is not None and version not in HPS_FILES:
        raise ValueError(f"HPS version must be one of {list(HPS_FILES)} (--hps_version), got {version!r}")
    named = version_of_file(checkpoint) if checkpoint is not None else None
    if version is not None and named is not None and named != version:
        raise ValueError(
            f"{checkpoint}: the official HPS {named} checkpoint ({HPS_FILES[named]}), but version {version} was asked for "
            f"(--hps_version): drop --hps_version, or pass the {version} file ({HPS_FILES[version]})"
        )
    if version is not None:
        return version, "given"
    if named is not None:
        return named, "file name"
    return DEFAULT_VERSION, "default" if checkpoint is None else "assumed"


def search_dirs() -> list[Path]:
    """Folders searched for an official checkpoint file before the Hub: $HPS_ROOT (when set) and ~/.cache/hpsv2,
    the official package's folders. Usage: search_dirs()"""
    folders = [Path(os.environ["HPS_ROOT"]).expanduser()] if os.environ.get("HPS_ROOT") else []
    default = Path("~/.cache/hpsv2").expanduser()
    return folders + [default] if default not in folders else folders


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The official HPS transform: RGB, longest side to `size` (bicubic, on the tensor), centred zero
    padding to a square, CLIP mean/std. (RGBA is converted to RGB first; the official code lets 4
    channels through and then fails.) Usage: pixels = preprocess(Image.open("a.png"))"""
    import torchvision.transforms.functional as TF

    tensor = TF.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[-2:]
    scale = size / max(height, width)
    new_size = [round(height * scale), round(width * scale)]
    tensor = TF.resize(tensor, new_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    tensor = TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


def _checkpoint_path(checkpoint: str | Path | None, version: str, cache_dir: str | None) -> str:
    """The given file, else the official file in search_dirs(), else hf_hub_download (cache, then Hub)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such HPSv2 checkpoint file")
        return str(path)
    folders = search_dirs()
    for folder in folders:
        for name in official_files(version):
            if (folder / name).is_file():
                return str(folder / name)
    from huggingface_hub import hf_hub_download

    filename = HPS_FILES[version]
    try:
        return hf_hub_download(HPS_REPO, filename, cache_dir=cache_dir)
    except Exception as error:  # offline, no cache, no network: one message that says what to do
        root = os.environ.get("HPS_ROOT")
        searched = f"$HPS_ROOT ({root if root else 'not set'}) or ~/.cache/hpsv2 ({Path('~/.cache/hpsv2').expanduser()})"
        raise FileNotFoundError(
            f"HPSv2 {version} checkpoint {filename} not found: not in {searched}, not in the Hugging Face cache, and the "
            f"Hub did not serve it ({type(error).__name__}). Download it with `hf download {HPS_REPO} {filename}`, or put "
            "the file into one of those folders, or pass --hps_checkpoint PATH (checkpoint=PATH in Python)."
        ) from None


def _open_image(item: ImageInput, position: int) -> Image.Image:
    """A PIL image as it is; a path opened and decoded now (so a bad file is named here, not deep in torch)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as image:  # FileNotFoundError / UnidentifiedImageError name the path
            return image.convert("RGB")
    raise TypeError(f"image {position}: expected a PIL image or a file path, got {type(item).__name__}")


class HPSv2Scorer:
    """Loads the model once; scores images in batches (fp16 on GPU).

    `version=None` takes the version from an official file name (see the module docstring). `model_name`
    exists so tests can use a tiny registered open_clip config through the same loader.
    Usage: HPSv2Scorer("HPS_v2.1_compressed.pt").score(images, prompts)
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        version: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_name: str = "ViT-H-14",
        batch_size: int = 16,
        cache_dir: str | None = None,
    ):
        open_clip = require_extra("open_clip", "HPSv2 scoring")
        self.version, self.version_source = resolve_version(checkpoint, version)  # before any file is read
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r} (HPSv2 uses ViT-H-14; others must be registered with open_clip.add_model_config)")
        self.model_name, self.batch_size = model_name, batch_size
        self.checkpoint = _checkpoint_path(checkpoint, self.version, cache_dir)
        self.model = self._load(open_clip).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.to(device, dtype)

    @property
    def version_note(self) -> str | None:
        """Why the version is a guess, or None when the file name, the caller or the default file fixes it."""
        if self.version_source != "assumed":
            return None
        names = ", ".join(f"{HPS_FILES[v]} = {v}" for v in HPS_FILES)
        return (f"HPS version {self.version} assumed: {Path(self.checkpoint).name} is not an official file name ({names}, "
                "or their .safetensors copies); pass --hps_version (version= in Python) to state it")

    def _load(self, open_clip: ModuleType) -> torch.nn.Module:
        from safetensors import SafetensorError

        try:
            # open_clip's loader: takes {"state_dict": ...} or a bare state dict, strips "module.", strict load;
            # .pt through torch.load(weights_only=True), .safetensors through safetensors.
            return open_clip.create_model(self.model_name, pretrained=self.checkpoint, device="cpu")
        except (pickle.UnpicklingError, EOFError) as error:
            # torch's own message suggests weights_only=False, which would run the file's code: say what it found
            found = re.search(r"GLOBAL \S+ was not an allowed global|Unsupported global: GLOBAL \S+|Unsupported operand \d+", str(error))
            raise ValueError(
                f"{self.checkpoint}: not a tensors-only checkpoint, refusing to unpickle it ({found.group(0) if found else type(error).__name__}). "
                "Use the official HPS_v2*_compressed.pt or a .safetensors copy."
            ) from None
        except SafetensorError as error:
            raise ValueError(f"{self.checkpoint}: not a readable .safetensors checkpoint ({error})") from None
        except RuntimeError as error:
            raise ValueError(f"{self.checkpoint}: does not fit open_clip {self.model_name} ({str(error)[:500]})") from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "HPSv2Scorer":
        """Move the model (default: CUDA if available, fp16 there, fp32 on the CPU). Usage: scorer.to("cuda")"""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = self.model.to(self.device, self.dtype)
        return self

    @torch.no_grad()
    def score(self, images: ImageInput | Sequence[ImageInput], prompts: str | Sequence[str]) -> list[float]:
        """HPS x 100 per image, as a list (also for one image). `images`: a PIL image, a path, or a list of
        images and/or paths (as `hpsv2.score` takes); `prompts`: one prompt for all images or one per image.
        Usage: scorer.score(["a.png", pil_image], "a koala, blue fire style")"""
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        prompts = [prompts] * len(items) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(items):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts (give one prompt, or one per image)")
        scores: list[float] = []
        for start in range(0, len(items), self.batch_size):  # paths are opened one batch at a time
            batch = [_open_image(item, start + i) for i, item in enumerate(items[start : start + self.batch_size])]
            pixels = torch.stack([preprocess(image) for image in batch]).to(self.device, self.dtype)
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True).float()
            text_features = self.model.encode_text(tokens, normalize=True).float()
            scores += (100.0 * (image_features * text_features).sum(dim=-1)).tolist()
        return scores
