"""The built-in data sets, each written as an image–caption folder that ``homediff.data`` reads:
``emoji`` (OpenMoji emoji and scenes of them), ``shapes`` (coloured shapes with captions in a small
grammar, which the shapes evaluation reads back), ``scenes`` (wide and tall scenes of those shapes,
for camera control) and ``concept`` (a fine-tuning set that teaches a new word).

Built by ``homediff data emoji|shapes|scenes|concept``; the emoji set needs the ``emoji`` extra.
"""
