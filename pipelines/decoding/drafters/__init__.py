"""One module per drafter: each proposes the token tree the one verifier (``decoding/verify.py``) checks."""
