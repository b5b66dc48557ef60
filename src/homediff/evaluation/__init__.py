"""Evaluation, offline: prompt fidelity by retrieval, a Fréchet distance on EfficientNet-Lite0
features, and composition on shapes scenes; JSON and Markdown reports and PNGs.

Modules, lowest first: ``metrics`` and ``shape_checker`` (pure functions), ``effnet`` (the feature
network), ``common`` (settings, captions, generation), ``report``, and the two evaluations,
``fidelity`` and ``composition``.
"""

from homediff.evaluation.common import EvalSettings, choose_captions, load_image, read_split
from homediff.evaluation.composition import evaluate_shapes
from homediff.evaluation.fidelity import FD_NAME, evaluate_fidelity
from homediff.evaluation.metrics import (caption_ranks, frechet_distance, topk_accuracy,
                                         topk_standard_error)
from homediff.evaluation.report import markdown, write_report

__all__ = ["EvalSettings", "FD_NAME", "caption_ranks", "choose_captions", "evaluate_fidelity",
           "evaluate_shapes", "frechet_distance", "load_image", "markdown", "read_split", "topk_accuracy",
           "topk_standard_error", "write_report"]
