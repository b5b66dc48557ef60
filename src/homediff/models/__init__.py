"""The XUT backbone: layers, axial RoPE and position maps, TREAD routing, released-weight loading."""

from homediff.models.release import load_hdm_checkpoint, load_hdm_state_dict
from homediff.models.xut import PRESETS, XUT, XUTConfig

__all__ = ["PRESETS", "XUT", "XUTConfig", "load_hdm_checkpoint", "load_hdm_state_dict"]
