"""Image tab: SD1.5/SDXL generation with token-level control (ToMe binding, LPA, leakage fix) on one
attention-control layer (``attention.py``) that compass tokens and the video tab reuse."""
