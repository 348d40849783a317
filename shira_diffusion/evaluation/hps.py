"""HPSv2 (Human Preference Score v2) on open_clip, with the official scorer's exact preprocessing.

The score is 100 x the cosine of the L2-normalised image and text embeddings of open_clip ViT-H-14 with the
HPS v2.0 / v2.1 weights (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` from the Hub repo xswu/HPSv2),
the scale the SHiRA paper reports. Built on open_clip_torch rather than the `hpsv2` package (whose 1.2.0
wheel lacks its BPE vocabulary, imports `turtle` and pins pytest==7.2.0 and protobuf<4); when `hpsv2` is
installed it is offered as `backend="hpsv2"` for cross-checking.

Usage:
    scorer = HPSv2Scorer(version="v2.1")             # downloads once with huggingface_hub, or checkpoint=PATH
    scores = scorer.score([image1, image2], "a koala in a spaceship, blue fire style")
"""

from __future__ import annotations

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
    channels through and then fails.)"""
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
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        version: str = "v2.1",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_name: str = "ViT-H-14",
        batch_size: int = 16,
        backend: str = "open_clip",
        cache_dir: str | None = None,
    ):
        import open_clip

        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {list(HPS_FILES)}, got {version!r}")
        if backend not in ("open_clip", "hpsv2"):
            raise ValueError(f"backend must be open_clip or hpsv2, got {backend!r}")
        self.version, self.backend, self.batch_size = version, backend, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.checkpoint = _checkpoint_path(checkpoint, version, cache_dir)
        if backend == "hpsv2":
            try:
                import hpsv2  # noqa: F401
            except ImportError:
                raise ValueError("backend='hpsv2' needs the hpsv2 package (pip install hpsv2)") from None
            return
        try:
            # open_clip's loader: takes {"state_dict": ...} or a bare state dict, strips "module.", strict load,
            # and unpickles with weights_only=True (tensors and plain containers only).
            self.model = open_clip.create_model(model_name, pretrained=self.checkpoint, device=self.device)
        except RuntimeError as error:
            raise ValueError(f"{self.checkpoint}: does not fit open_clip {model_name} ({error})") from None
        self.model = self.model.to(self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: str | Sequence[str]) -> list[float]:
        """HPS x 100 per image; `prompts` is one prompt for all images or one per image."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if self.backend == "hpsv2":
            import hpsv2

            return [100.0 * float(hpsv2.score(image, prompt, cp=self.checkpoint, hps_version=self.version)[0]) for image, prompt in zip(images, prompts)]
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess(i) for i in images[start : start + self.batch_size]]).to(self.device, self.dtype)
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True).float()
            text_features = self.model.encode_text(tokens, normalize=True).float()
            scores += (100.0 * (image_features * text_features).sum(dim=-1)).tolist()
        return scores


def score_one_by_one(images: Sequence[Image.Image], prompts: Sequence[str], **scorer_kwargs) -> list[float]:
    """The official `hpsv2.score` call pattern (model rebuilt on every call, one image at a time), for
    benchmarking against `HPSv2Scorer.score`."""
    return [HPSv2Scorer(**scorer_kwargs).score([image], prompt)[0] for image, prompt in zip(images, prompts)]
