"""Lossless multi-token decoding shared by the text, speech and song tabs."""
