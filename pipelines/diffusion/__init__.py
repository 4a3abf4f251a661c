"""Diffusion techniques of the image and video tabs: SD1.5/SDXL token-level control (ToMe binding, LPA, leakage fix,
compass tokens) on one attention-control layer (``attention.py``), token merging for speed, the captured UNet path,
and the video side (AnimateDiff, the shot timeline, controls per shot)."""
