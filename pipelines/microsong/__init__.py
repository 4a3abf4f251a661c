"""Micro-song: the song tab's offline model. A tune language and the composer that writes tunes in it (``tunes``),
a small Llama note model trained on them on the CPU (``model``, ``train``; weights committed in ``weights/``), a
structure guard that keeps decoding inside the lyrics' plan (``guard``), decoding through the project's decoding
core (``decode``), a numpy synthesiser with formant-synth vocals (``render``), and the whole song streamed bar by
bar (``song``)."""
