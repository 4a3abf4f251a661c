"""Speech: Bark's AR stages in the project's loop (stock-exact, lossless drafting), exact chunk seams, the tab."""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.audio.pcm import ChunkSchedule, wav_bytes
from pipelines.audio.bark import BarkOutput, BarkSettings, BarkTTS, codec_decode, synthesize, synthesize_steps, text_ids
from pipelines.base import PipelineError, Progress
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.tabs.speech import SpeechPipeline, SpeechRequest
from pipelines.streaming import Returning
from pipelines.decoding.verify import CausalLMForward, NoDraft, speculative_decode
from pipelines.tiny import tiny_bark, tiny_causal_lm

TEXT = "Hello world, a red hat."


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    """(sample_rate, float32 samples) of a mono 16-bit WAV given as bytes."""
    with wave.open(io.BytesIO(data), "rb") as handle:
        rate = handle.getframerate()
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return rate, pcm.astype(np.float32) / 32767.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tts() -> BarkTTS:
    return tiny_bark(seed=0)


@pytest.fixture(scope="module")
def short_windows() -> BarkTTS:
    """Tiny Bark whose coarse windows read only 32 semantic tokens, so they start before the semantic stage ends."""
    base = tiny_bark(seed=4)  # a seed whose greedy semantic stage runs past 80 tokens (no early EOS)
    base.model.generation_config.coarse_acoustics_config.update(
        max_coarse_input_length=32, sliding_window_len=20, max_coarse_history=60)
    return BarkTTS(base.model, base.tokenizer)


def bark_settings(temperature: float = 0.7, seed: int = 0, **settings) -> BarkSettings:
    return BarkSettings(SamplingConfig(temperature=temperature, seed=seed), **settings)


def run(tts: BarkTTS, **settings) -> tuple[BarkOutput, list[np.ndarray]]:
    settings.setdefault("max_semantic_tokens", 48)
    stream = Returning(synthesize(tts, TEXT, bark_settings(**settings)))
    chunks = list(stream)
    return stream.value, chunks


def stock_waveform(tts: BarkTTS, max_semantic_tokens: int) -> np.ndarray:
    ids = text_ids(tts, TEXT)
    length = tts.semantic.max_input_semantic_length
    input_ids = torch.zeros((1, length), dtype=torch.long)
    input_ids[0, :len(ids)] = torch.tensor(ids)
    mask = (torch.arange(length) < len(ids)).long()[None]
    audio = tts.model.generate(input_ids, attention_mask=mask, do_sample=False,
                               semantic_max_new_tokens=max_semantic_tokens)
    return audio[0].detach().numpy()


def test_greedy_plain_loop_reproduces_stock_bark_generate(tts):
    output, chunks = run(tts, temperature=0.0, drafting=False, stream=False)
    expected = stock_waveform(tts, 48)
    assert len(chunks) == 1 and chunks[0].shape == expected.shape
    np.testing.assert_allclose(chunks[0], expected, atol=1e-5)
    stock_semantic = tts.model.semantic.generate(
        torch.nn.functional.pad(torch.tensor([text_ids(tts, TEXT)]), (0, 256 - len(text_ids(tts, TEXT)))),
        semantic_generation_config=tts.semantic,
        attention_mask=(torch.arange(256) < len(text_ids(tts, TEXT))).long()[None], do_sample=False,
        max_new_tokens=48)
    assert output.semantic == stock_semantic[0].tolist()


def test_coarse_windows_start_before_semantic_ends_and_still_match_stock(short_windows):
    settings = bark_settings(temperature=0.0, drafting=False, stream=True, max_semantic_tokens=80)
    steps = Returning(synthesize_steps(short_windows, TEXT, settings))
    items = list(steps)
    output = steps.value
    first_audio = next(i for i, item in enumerate(items) if isinstance(item, np.ndarray))
    semantic_at_first_audio = max(item.step for item in items[:first_audio] if item.note == "semantic tokens")
    assert semantic_at_first_audio < len(output.semantic) == 80
    flat, _ = run(short_windows, temperature=0.0, drafting=False, stream=False, max_semantic_tokens=80)
    np.testing.assert_allclose(codec_decode(short_windows, flat.codes), stock_waveform(short_windows, 80), atol=1e-5)
    assert flat.coarse == output.coarse


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_drafting_gives_identical_token_ids(tts, temperature):
    plain, plain_chunks = run(tts, temperature=temperature, seed=11, drafting=False)
    drafted, drafted_chunks = run(tts, temperature=temperature, seed=11, drafting=True)
    assert drafted.semantic == plain.semantic
    assert drafted.coarse == plain.coarse
    assert torch.equal(drafted.codes, plain.codes)
    np.testing.assert_array_equal(np.concatenate(drafted_chunks), np.concatenate(plain_chunks))
    assert plain.semantic_stats.tau == plain.coarse_stats.tau == 1.0
    assert drafted.coarse_stats.forwards < plain.coarse_stats.forwards


def test_sampling_depends_on_seed(tts):
    first, _ = run(tts, temperature=0.7, seed=1, drafting=True)
    second, _ = run(tts, temperature=0.7, seed=2, drafting=True)
    assert first.semantic != second.semantic


def test_streamed_chunks_concatenate_to_the_one_shot_decode(tts):
    output, chunks = run(tts, temperature=0.0, drafting=True, stream=True, max_semantic_tokens=64)
    sizes = [len(chunk) for chunk in chunks]
    assert len(chunks) >= 3 and sizes[0] < sizes[1] < sizes[2]
    assert sizes[0] <= ChunkSchedule().first * tts.hop
    one_shot = codec_decode(tts, output.codes)
    streamed = np.concatenate(chunks)
    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)



def test_every_ar_forward_is_followed_by_a_progress_event(tts):
    """Gradio can close a job only where its generator yields: no two AR forwards may run without a yield."""
    forwards, since_yield = [0], []
    hooks = [model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
             for model in (tts.model.semantic, tts.model.coarse_acoustics)]
    steps = Returning(synthesize_steps(tts, TEXT, bark_settings(temperature=0.0, max_semantic_tokens=48)))
    try:
        items = []
        for item in steps:
            since_yield.append(forwards[0])
            forwards[0] = 0
            items.append(item)
    finally:
        for hook in hooks:
            hook.remove()
    assert max(since_yield) == 1
    progress = [item for item in items if isinstance(item, Progress)]
    output = steps.value
    assert len(progress) == output.semantic_stats.forwards + output.coarse_stats.forwards
    assert {item.note for item in progress} == {"semantic tokens", "coarse tokens"}
    _, chunks = run(tts, temperature=0.0)
    audio = [item for item in items if not isinstance(item, Progress)]
    np.testing.assert_array_equal(np.concatenate(audio), np.concatenate(chunks))


def test_chunk_schedule_starts_small_and_grows():
    schedule = ChunkSchedule(first=12, growth=2.0, largest=150)
    assert [schedule.size(i) for i in range(6)] == [12, 24, 48, 96, 150, 150]
    assert schedule.boundaries(100) == [12, 36, 84, 100]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_chain_drafting_equals_plain_decode(temperature):
    model = tiny_causal_lm("llama", seed=3)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    config = SamplingConfig(temperature=temperature, top_p=0.9, seed=4)
    plain = [t for run in plain_decode(model, prompt, 40, config, set()) for t in run]
    drafted = [t for run in speculative_decode(model, prompt, 40, config, set(), PromptLookup(),
                                               forward=CausalLMForward(model, tree_attention=False)) for t in run]
    assert drafted == plain


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_embeddings_prefill_and_position_processors_are_lossless(temperature):
    """Bark's shape of a stage: the prompt given as embeddings, codebooks alternating by position."""
    from transformers import AlternatingCodebooksLogitsProcessor, LogitsProcessorList

    model = tiny_causal_lm("llama", seed=3)
    prompt = torch.tensor([[25, 26, 27, 28, 25, 26, 27, 28, 25, 26, 27, 28, 25, 26]])
    processors = LogitsProcessorList([AlternatingCodebooksLogitsProcessor(prompt.shape[1], 20, 60)])
    config = SamplingConfig(temperature=temperature, top_p=0.9, seed=4)

    def decode(drafter):
        embeds = model.get_input_embeddings()(prompt)
        stats = DecodeStats()
        runs = list(speculative_decode(model, prompt, 40, config, set(), drafter, stats=stats,
                                       forward=CausalLMForward(model, tree_attention=False),
                                       prefill={"inputs_embeds": embeds}, processors=processors))
        return [t for run in runs for t in run], stats

    plain, plain_stats = decode(NoDraft())
    drafted, drafted_stats = decode(PromptLookup())
    assert drafted == plain
    assert all((t >= 80) if i % 2 else (20 <= t < 80) for i, t in enumerate(plain))  # processors applied
    assert plain_stats.forwards == 40
    if temperature == 0.0:
        assert drafted_stats.forwards < 40  # drafts were accepted, under the processors
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                   do_sample=False, logits_processor=processors, eos_token_id=None,
                                   pad_token_id=0)[0, prompt.shape[1]:].tolist()
        assert plain == reference


def test_wav_bytes_round_trip():
    samples = np.sin(np.linspace(0, 40, 2400)).astype(np.float32) * 0.5
    rate, decoded = read_wav(wav_bytes(samples, 24000))
    assert rate == 24000
    np.testing.assert_allclose(decoded, samples, atol=1 / 32767)


def test_pipeline_streams_and_saves_wav_with_sidecar(store):
    pipeline = SpeechPipeline(store, "tiny")
    result = pipeline.run(SpeechRequest(text=TEXT, temperature=0.0, seed=3))
    path = Path(result.value)
    rate, audio = read_wav(path.read_bytes())
    assert rate == 24000 and audio.size / rate == pytest.approx(result.stats["audio_s"], abs=1e-3)
    assert result.stats["chunks"] >= 2
    assert 0 < result.stats["time_to_first_audio_s"] < result.stats["time_s"]
    assert result.stats["tau"] >= 1.0 and result.stats["forwards"] > 0
    sidecar = json.loads(Path(result.metadata["sidecar"]).read_text())
    assert sidecar["seed"] == 3 and sidecar["model"] == result.stats["model"]


def test_bad_requests_give_clear_errors(store):
    pipeline = SpeechPipeline(store, "tiny")
    with pytest.raises(PipelineError, match="Text is empty"):
        pipeline.run(SpeechRequest(text="  "))
    with pytest.raises(PipelineError, match="no speed control"):
        pipeline.run(SpeechRequest(text=TEXT, speed=1.5))
    with pytest.raises(PipelineError, match="Speed must be"):
        pipeline.run(SpeechRequest(text=TEXT, speed=5.0))


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_tiny_bark_speaks_for_seeds_whose_first_semantic_draw_was_eos(temperature):
    """Seeds 112, 124, 144 and 169 drew EOS first for "Hi." at 0.7 before the tiny builder held EOS down (about
    1 seed in 50, so the API test's random-seed leg failed now and then)."""
    tts = tiny_bark(seed=0)
    for seed in (112, 124, 144, 169):
        settings = bark_settings(temperature=temperature, seed=seed, max_semantic_tokens=4, stream=False)
        steps = Returning(synthesize(tts, "Hi.", settings))
        audio = np.concatenate(list(steps))
        assert len(steps.value.semantic) == 4 and tts.semantic.eos_token_id not in steps.value.semantic, seed
        assert audio.size > 0


def test_bark_that_ends_before_any_audio_gives_a_clear_error(store, monkeypatch):
    monkeypatch.setattr("pipelines.tabs.speech.load_bark", lambda resolved, store: tiny_bark(seed=0, eos_bias=1e4))
    events = []
    with pytest.raises(PipelineError, match="ended before producing any audio.*another seed"):
        for event in SpeechPipeline(store, "tiny").generate(SpeechRequest(text=TEXT, seed=5)):
            events.append(event)
    assert events and all(isinstance(event, Progress) for event in events), "no audio chunk or result before it"


def test_generate_speech_api_streams_chunks_then_file_and_stats(tiny_client):
    job = tiny_client.submit(TEXT, "", 1.0, 0.0, True, True, 7, api_name="/generate_speech")
    _, wav_path, sidecar_path, stats = job.result(timeout=300)
    assert len(job.outputs()) >= 3  # streamed chunks before the final outputs
    rate, audio = read_wav(Path(wav_path).read_bytes())
    assert rate == 24000 and audio.size > 0
    assert json.loads(Path(sidecar_path).read_text())["seed"] == 7
    assert stats["seed"] == 7 and stats["drafting"] is True
    assert {"time_to_first_audio_s", "time_s", "rtf", "tau", "tau_semantic", "tau_coarse"} <= set(stats)


def test_speech_and_song_share_one_loaded_bark(store):
    """Same checkpoint, same ModelStore entry: using both tabs must not load Bark twice."""
    from pipelines.presets import AUTO_MODELS
    from pipelines.tabs.song import SongPipeline

    speech, song = SpeechPipeline(store, "tiny"), SongPipeline(store, "tiny")
    speech.run(SpeechRequest(text="Hi.", temperature=0.0, seed=3))
    bark = store.loaded_names()
    assert song.load("bark") is store.load(speech.spec_for(""), lambda *_: None)
    assert store.loaded_names() == bark and len(bark) == 1
    for hub_id in ("suno/bark-small", "suno/bark"):
        specs = {spec for task in ("speech", "song") for spec in AUTO_MODELS[task] if spec.hub_id == hub_id}
        assert len(specs) == 1, f"{hub_id} is listed under {len(specs)} specs: loaded once per spec"
