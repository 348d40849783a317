"""HPSv2 (Human Preference Score v2) on open_clip, with the official scorer's exact preprocessing.

The score is 100 x the cosine of the L2-normalised image and text embeddings of open_clip ViT-H-14 with the
HPS v2.0 / v2.1 weights (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` from the Hub repo xswu/HPSv2),
the scale the SHiRA paper reports. Built on open_clip_torch rather than the `hpsv2` package (whose 1.2.0
wheel lacks its BPE vocabulary, imports `turtle`, pins pytest==7.2.0 and protobuf<4, downloads the 3.9 GB
LAION ViT-H-14 weights only to overwrite them, and reloads the checkpoint on every call).

Checkpoints: a `.pt` is read by open_clip with `torch.load(weights_only=True)` (tensors and plain containers
only; anything else is refused, never unpickled), a `.safetensors` file with safetensors. Either may hold
`{"state_dict": ...}` or a bare state dict (a `module.` prefix is stripped); the load is strict.

Usage:
    scorer = HPSv2Scorer(version="v2.1")             # downloads once with huggingface_hub, or checkpoint=PATH
    scores = scorer.score([image1, image2], "a koala in a spaceship, blue fire style")
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


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
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such HPSv2 checkpoint file")
        return str(path)
    from huggingface_hub import hf_hub_download

    filename = HPS_FILES[version]
    try:
        return hf_hub_download(HPS_REPO, filename, cache_dir=cache_dir)
    except Exception as error:  # offline, no cache, no network: one message that says what to do
        raise FileNotFoundError(
            f"HPSv2 checkpoint {filename} is not available ({type(error).__name__}). Get it from the Hub repo "
            f"{HPS_REPO} (huggingface-cli download {HPS_REPO} {filename}) or pass checkpoint=PATH / --hps_checkpoint PATH."
        ) from None


class HPSv2Scorer:
    """Loads the model once; scores images in batches (fp16 on GPU).

    `model_name` exists so tests can use a tiny registered open_clip config through the same loader.
    Usage: HPSv2Scorer("HPS_v2.1_compressed.pt").score(images, prompts)
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        version: str = "v2.1",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_name: str = "ViT-H-14",
        batch_size: int = 16,
        cache_dir: str | None = None,
    ):
        import open_clip
        from safetensors import SafetensorError

        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {list(HPS_FILES)}, got {version!r}")
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r} (HPSv2 uses ViT-H-14; others must be registered with open_clip.add_model_config)")
        self.version, self.model_name, self.batch_size = version, model_name, batch_size
        self.checkpoint = _checkpoint_path(checkpoint, version, cache_dir)
        try:
            # open_clip's loader: takes {"state_dict": ...} or a bare state dict, strips "module.", strict load;
            # .pt through torch.load(weights_only=True), .safetensors through safetensors.
            model = open_clip.create_model(model_name, pretrained=self.checkpoint, device="cpu")
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
            raise ValueError(f"{self.checkpoint}: does not fit open_clip {model_name} ({str(error)[:500]})") from None
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "HPSv2Scorer":
        """Move the model (default: CUDA if available, fp16 there, fp32 on the CPU). Usage: scorer.to("cuda")"""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = self.model.to(self.device, self.dtype)
        return self

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: str | Sequence[str]) -> list[float]:
        """HPS x 100 per image; `prompts` is one prompt for all images or one per image."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess(i) for i in images[start : start + self.batch_size]]).to(self.device, self.dtype)
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True).float()
            text_features = self.model.encode_text(tokens, normalize=True).float()
            scores += (100.0 * (image_features * text_features).sum(dim=-1)).tolist()
        return scores
