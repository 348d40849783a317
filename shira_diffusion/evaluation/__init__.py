"""HPSv2 evaluation of single and fused multi-style generation.

Usage:
    from shira_diffusion.evaluation import HPSv2Scorer, run_evaluation, load_prompts
    scorer = HPSv2Scorer(version="v2.1")
    scores = scorer.score(images, "a koala, blue fire style")
"""

from .hps import HPS_FILES, HPS_REPO, HPSv2Scorer, preprocess
from .pipeline import check_model_source, load_pipeline
from .prompts import Prompt, load_prompts
from .runner import EvaluationResult, Fusion, resolve_adapter, run_evaluation, summarize_records, summary_markdown

__all__ = [
    "HPS_FILES", "HPS_REPO", "EvaluationResult", "Fusion", "HPSv2Scorer", "Prompt", "check_model_source", "load_pipeline",
    "load_prompts", "preprocess", "resolve_adapter", "run_evaluation", "summarize_records", "summary_markdown",
]
