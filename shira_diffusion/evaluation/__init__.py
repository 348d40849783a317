"""HPSv2 evaluation of single and fused multi-style generation.

Usage:
    from shira_diffusion.evaluation import HPSv2Scorer, run_evaluation, load_prompts
    scorer = HPSv2Scorer()                      # v2.1, found in $HPS_ROOT / ~/.cache/hpsv2 or the Hub
    scores = scorer.score(images, "a koala, blue fire style")   # PIL images and/or paths
"""

from .hps import HPS_FILES, HPS_REPO, HPSv2Scorer, MissingExtraError, preprocess, resolve_version, search_dirs, version_of_file
from .pipeline import check_model_source, load_pipeline
from .prompts import Prompt, load_prompts
from .runner import (EvaluationResult, Fusion, grid_layout, resolve_adapter, run_evaluation, summarize_records,
                     summary_markdown, write_grids)

__all__ = [
    "HPS_FILES", "HPS_REPO", "EvaluationResult", "Fusion", "HPSv2Scorer", "MissingExtraError", "Prompt", "check_model_source",
    "grid_layout", "load_pipeline", "load_prompts", "preprocess", "resolve_adapter", "resolve_version",
    "run_evaluation", "search_dirs", "summarize_records", "summary_markdown", "version_of_file", "write_grids",
]
