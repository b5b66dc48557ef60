"""Evaluation, offline: prompt fidelity by retrieval, a Fréchet distance on EfficientNet-Lite0
features, and composition on shapes scenes; JSON and Markdown reports and PNGs.

Modules, lowest first: ``metrics`` and ``shape_checker`` (pure functions), ``effnet`` (the feature
network), ``settings``, ``common`` (captions, generation), ``report``, and the two evaluations,
``fidelity`` and ``composition``.
"""

from homediff.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "common": ["choose_captions", "load_image", "read_split"],
    "composition": ["evaluate_shapes"],
    "fidelity": ["FD_NAME", "evaluate_fidelity"],
    "metrics": ["caption_ranks", "frechet_distance", "topk_accuracy", "topk_standard_error"],
    "report": ["markdown", "write_report"],
    "settings": ["EvalSettings"],
})
__all__ = __dir__()
