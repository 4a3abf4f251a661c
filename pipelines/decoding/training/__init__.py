"""Self-distillation of the trained drafters' weights (PPD prompt tokens, the ReDrafter head), run as
``python -m pipelines.decoding.training.<module>``."""
