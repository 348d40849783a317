"""HPSv2 evaluation of single and fused multi-style generation.

Usage:
    from shira_diffusion.evaluation import HPSv2Scorer, run_evaluation, load_prompts
    scorer = HPSv2Scorer(version="v2.1")
    scores = scorer.score(images, "a koala, blue fire style")
"""

from .hps import HPS_FILES, HPS_REPO, HPSv2Scorer, preprocess, score_one_by_one
from .prompts import Prompt, load_prompts
from .runner import EvaluationResult, Fusion, run_evaluation, summarize_records

__all__ = [
    "HPS_FILES", "HPS_REPO", "EvaluationResult", "Fusion", "HPSv2Scorer", "Prompt", "load_prompts",
    "preprocess", "run_evaluation", "score_one_by_one", "summarize_records",
]
