"""Evaluation, offline: prompt fidelity by retrieval, a Fréchet distance on EfficientNet-Lite0
features, composition on shapes scenes, and camera control; JSON and Markdown reports and PNGs.

Modules, lowest first: ``metrics``, ``shape_checker`` and ``alignment`` (pure functions), ``effnet``
(the feature network), ``settings``, ``common`` (captions, generation), ``report``, and the
evaluations, ``fidelity``, ``composition`` and ``camera``.
"""

from homediff.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "camera": ["camera_markdown", "evaluate_camera"],
    "common": ["choose_captions", "load_image", "read_split", "spread_captions"],
    "composition": ["evaluate_shapes"],
    "fidelity": ["FD_NAME", "evaluate_fidelity"],
    "metrics": ["caption_ranks", "frechet_distance", "topk_accuracy", "topk_standard_error"],
    "report": ["markdown", "write_report"],
    "settings": ["CameraSettings", "EvalSettings"],
})
__all__ = __dir__()
