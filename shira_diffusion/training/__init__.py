"""DreamBooth-style style training of SHiRA adapters (and a LoRA baseline in the same loop) on SD 1.x/2.x, SDXL,
SD3 and Flux pipelines, with accelerate.

Modules: `loop` (the run), `checks` (everything checked before a model loads), `optimization`, `run_masks` (the
run's SHiRA positions), `prior` (prior preservation), `outputs` (validation images, adapter, card, Hub),
`denoising` (the loss as a metric). Families live in `shira_diffusion.families`, what is trained in
`shira_diffusion.trainables`, the flags in `shira_diffusion.training_config`.

Usage:
    from shira_diffusion.training import TrainingConfig, train
    result = train(TrainingConfig(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  train_data_dir="bluefire/", output_dir="out", max_train_steps=1000))
    pipe.load_shira_weights(result.adapter_path)
"""

from ..training_config import TrainingConfig, config_from_dict, with_family_defaults
from .checks import validate_config
from .denoising import denoising_loss
from .loop import TrainingResult, train

__all__ = ["TrainingConfig", "TrainingResult", "config_from_dict", "denoising_loss", "train", "validate_config", "with_family_defaults"]
