"""Audio models and helpers of the speech and song tabs: Bark and MusicGen driven through the decoding core, exact
streaming EnCodec decode, ACE-Step, the song's lyrics and vocal stem, and PCM samples (chunking, WAV, mixing)."""
