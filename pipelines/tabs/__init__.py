"""The five tab pipelines (text, image, video, speech, song): each composes the techniques of ``decoding/``,
``diffusion/`` and ``audio/`` into one ``Pipeline`` that turns a request into events."""
