"""Song tab: delay pattern, the MusicGen decode loop (lossless drafting, static cache, streaming), lyrics
sections, stems and mix, and the app's /generate_song in both modes (tiny random-weight models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.audio.pcm import mix_stems
from pipelines.base import PipelineError, Progress
from pipelines.decoding.plain import SamplingConfig
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import Drafter
from pipelines.audio.lyrics import parse_sections, plan_timeline
from pipelines.audio.musicgen import (ColumnVocabulary, MusicgenDecodeStats, column_drafter, decode_columns,
                                      delay_pattern_pad_mask, encode_text, revert_delay_pattern, stream_accompaniment)
from pipelines.streaming import Returning
from pipelines.tiny import tiny_musicgen

GREEDY = SamplingConfig(temperature=0.0)
GUIDANCE = 3.0


def build_delay_pattern(codes: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``[B, K, T]`` frames -> ``[B, K, T + K]`` delayed columns: column 0 is the start column (all pad) and
    codebook k of frame f sits at column ``f + 1 + k``; every other cell is pad (transformers' layout)."""
    batch, num_codebooks, frames = codes.shape
    delayed = torch.full((batch, num_codebooks, frames + num_codebooks), pad_id, dtype=codes.dtype,
                         device=codes.device)
    for k in range(num_codebooks):
        delayed[:, k, 1 + k:1 + k + frames] = codes[:, k]
    return delayed


@pytest.fixture(scope="module")
def musicgen():
    return tiny_musicgen()


def decode(model, conditioning, frames, sampling=GREEDY, drafter=None, static=True, vocabulary=None):
    """Every delayed column ``[K, frames + K]`` (the start column first) and the decode stats."""
    stats = MusicgenDecodeStats()
    start = torch.full((4, 1), model.decoder.config.pad_token_id, device=model.device)
    fresh = decode_columns(model, conditioning, frames, sampling, GUIDANCE, drafter, static, stats=stats,
                           vocabulary=vocabulary)
    return torch.cat([start, *fresh], dim=-1), stats


def test_delay_pattern_round_trips_and_matches_transformers_layout(musicgen):
    model, _ = musicgen
    torch.manual_seed(0)
    codes = torch.randint(0, 64, (2, 4, 9))
    delayed = build_delay_pattern(codes, pad_id=64)
    assert delayed.shape == (2, 4, 13)
    assert torch.equal(revert_delay_pattern(delayed), codes)
    assert torch.equal(delayed[:, 2, 3:12], codes[:, 2])
    _, stock_mask = model.decoder.build_delay_pattern_mask(torch.full((4, 1), 64), 64, max_length=13)
    assert torch.equal(stock_mask == 64, delay_pattern_pad_mask(4, 9))
    assert torch.equal(delay_pattern_pad_mask(4, 9), delayed[0] == 64)


def test_greedy_decode_loop_matches_transformers_generate(musicgen):
    model, tokenizer = musicgen
    conditioning = encode_text(model, tokenizer, ["lofi piano"], GUIDANCE)
    columns, _ = decode(model, conditioning, 30)
    ours = model.audio_encoder.decode(revert_delay_pattern(columns[None])[None], audio_scales=[None]).audio_values
    inputs = tokenizer(["lofi piano"], return_tensors="pt")
    with torch.inference_mode():
        stock = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=30 + 4 - 1)
    assert stock.shape == ours.shape
    torch.testing.assert_close(ours, stock)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0, top_k=20, seed=7)])
def test_column_drafting_output_identical_to_plain_decoding(musicgen, sampling):
    model, tokenizer = musicgen
    conditioning = encode_text(model, tokenizer, ["jazz drums"], GUIDANCE)
    plain, plain_stats = decode(model, conditioning, 40, sampling, static=False)
    drafted, _ = decode(model, conditioning, 40, sampling, column_drafter())
    assert torch.equal(plain, drafted)
    assert plain_stats.tau == 1.0 and plain_stats.forwards == 44 - 1


def test_sampled_columns_depend_on_the_seed(musicgen):
    model, tokenizer = musicgen
    conditioning = encode_text(model, tokenizer, ["jazz drums"], GUIDANCE)
    first, _ = decode(model, conditioning, 20, SamplingConfig(temperature=1.0, top_k=20, seed=7))
    again, _ = decode(model, conditioning, 20, SamplingConfig(temperature=1.0, top_k=20, seed=7))
    other, _ = decode(model, conditioning, 20, SamplingConfig(temperature=1.0, top_k=20, seed=8))
    assert torch.equal(first, again) and not torch.equal(first, other)


class OracleDrafter(Drafter):
    """Proposes the ids of the true next columns with every third one corrupted: exercises acceptance and rollback."""

    def __init__(self, truth: torch.Tensor, vocabulary: ColumnVocabulary) -> None:
        self.truth, self.vocabulary = truth, vocabulary

    def propose(self, context: list[int]) -> TokenTree:
        length = len(context)
        proposal = [self.truth[:, i].tolist() for i in range(length, min(length + 4, self.truth.shape[-1]))]
        corrupted = [c if (length + i) % 3 else [(c[0] + 1) % 64, *c[1:]] for i, c in enumerate(proposal)]
        return TokenTree.chain(context[-1], [self.vocabulary.id_of(c) for c in corrupted])


@pytest.mark.parametrize("static", [True, False])
def test_accepted_drafts_keep_output_identical_with_static_and_dynamic_cache(musicgen, static):
    model, tokenizer = musicgen
    conditioning = encode_text(model, tokenizer, ["ambient pads"], GUIDANCE)
    plain, plain_stats = decode(model, conditioning, 40, static=False)
    vocabulary = ColumnVocabulary()
    drafted, stats = decode(model, conditioning, 40, drafter=OracleDrafter(plain, vocabulary), static=static,
                            vocabulary=vocabulary)
    assert torch.equal(plain, drafted)
    assert (stats.tau > 1.5 and stats.forwards < plain_stats.forwards
            and stats.drafted > stats.new_tokens - stats.forwards)


def test_column_vocabulary_gives_repeated_columns_one_id_and_lookup_proposes_what_followed():
    vocabulary = ColumnVocabulary()
    columns = torch.tensor([[1, 2, 3, 1, 2, 3, 1], [5, 6, 7, 5, 6, 7, 5]])
    ids = [vocabulary.id_of(column) for column in columns.T.tolist()]
    assert ids == [0, 1, 2, 0, 1, 2, 0] and torch.equal(vocabulary.tensor(ids, torch.device("cpu")), columns)
    drafter = column_drafter()
    drafter.start(ids)
    assert drafter.propose(ids).tokens == [0, 1, 2, 0]


def test_streamed_chunks_concatenate_to_the_one_shot_decode(musicgen):
    model, tokenizer = musicgen
    stream = Returning(stream_accompaniment(model, tokenizer, "rock", 60, GREEDY, draft=True))
    chunks = [item for item in stream if not isinstance(item, Progress)]
    result = stream.value
    assert len(chunks) >= 2 and result.first_audio_s > 0
    one_shot = model.audio_encoder.decode(result.codes[None, None],
                                          audio_scales=[None]).audio_values[0, 0].detach().numpy()
    streamed = np.concatenate(chunks)
    assert streamed.shape == one_shot.shape == (60 * 640,)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


class ForwardCounter:
    """Forwards of the given models since the last ``take()``: Gradio can close a job only where it yields."""

    def __init__(self, models) -> None:
        self.count = 0
        self.hooks = [model.register_forward_hook(self.seen) for model in models]

    def seen(self, *_) -> None:
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def test_accompaniment_yields_after_every_decode_forward(musicgen):
    model, tokenizer = musicgen
    since_yield, items = [], []
    stream = Returning(stream_accompaniment(model, tokenizer, "rock", 40, GREEDY, draft=True))
    counter = ForwardCounter([model])
    try:
        for item in stream:
            since_yield.append(counter.take())
            items.append(item)
    finally:
        counter.remove()
    assert max(since_yield) == 1
    progress = [item for item in items if isinstance(item, Progress)]
    assert len(progress) == stream.value.stats.forwards and progress[-1].step == 40
    assert sum(item.size for item in items if not isinstance(item, Progress)) == 40 * 640


def test_song_pipeline_reports_every_model_step(store):
    """Dual mode: no two AR forwards (Bark's semantic/coarse, MusicGen's decoder) without an event in between;
    mixed mode: one Progress per ACE-Step diffusion step."""
    from pipelines.tabs.song import SongPipeline, SongRequest

    pipeline = SongPipeline(store, "tiny")
    singer, accompanist = pipeline.load("bark"), pipeline.load("musicgen")
    counter = ForwardCounter([singer.model.semantic, singer.model.coarse_acoustics, accompanist.model])
    try:
        since_event = [counter.take() for _ in pipeline.generate(SongRequest(lyrics=LYRICS, style="lofi",
                                                                             duration_s=1.0, seed=3))]
    finally:
        counter.remove()
    assert max(since_event) == 1 and sum(since_event) > 20
    events = list(pipeline.generate(SongRequest(lyrics=LYRICS, style="lofi", duration_s=1.0, mode="mixed", steps=3,
                                                seed=3)))
    assert [e.step for e in events if isinstance(e, Progress) and e.note == "diffusion"] == [1, 2, 3]


def test_dual_mode_streams_the_first_mix_chunk_before_the_later_lines_are_sung(store):
    """The mix chunk covering the first line waits for that line only, not for the whole vocal track; the
    result is the same song as singing everything first (stems, mix)."""
    from pipelines.base import Partial, Result
    from pipelines.tabs.song import SongPipeline, SongRequest

    lyrics = "[verse]\nla la\nlo lo\n[chorus]\nli li\nlu lu\n"
    events = list(SongPipeline(store, "tiny").generate(SongRequest(lyrics=lyrics, style="lofi", duration_s=2.0,
                                                                   seed=3)))
    first_chunk = next(i for i, e in enumerate(events) if isinstance(e, Partial))
    last_line = next(i for i, e in enumerate(events)
                     if isinstance(e, Progress) and e.note.startswith("singing line 4/4"))
    assert first_chunk < last_line
    result = events[-1]
    assert isinstance(result, Result) and result.stats["sung_lines"] == 4
    assert result.stats["time_to_first_audio_s"] < result.stats["vocals_s"]
    mix, _ = read(result.value["mix"])
    vocals, _ = read(result.value["vocals"])
    accompaniment, _ = read(result.value["accompaniment"])
    assert mix.shape == vocals.shape == accompaniment.shape and np.abs(vocals).max() > 0


def test_parse_sections_reads_tags_numbers_untagged_text_and_instrumentals():
    sections = parse_sections("first line\n\n[Verse 2]\n a \n b\n[CHORUS]\nc\n[outro]\n")
    assert [(s.tag, s.lines) for s in sections] == [("verse", ["first line"]), ("verse 2", ["a", "b"]),
                                                     ("chorus", ["c"]), ("outro", [])]
    assert sections[-1].instrumental and not sections[0].instrumental


def test_timeline_gives_lines_equal_slots_and_covers_the_duration():
    timeline = plan_timeline(parse_sections("[intro]\n[verse]\na\nb\n[chorus]\nc"), 8.0)
    assert [round(s.start_s, 6) for s in timeline] == [0.0, 2.0, 6.0] and timeline[-1].end_s == pytest.approx(8.0)
    assert [(ln.start_s, ln.end_s) for ln in timeline[1].lines] == [(2.0, 4.0), (4.0, 6.0)]


def test_mix_is_the_sum_of_the_stems_and_never_clips():
    rng = np.random.default_rng(0)
    vocals, accompaniment = rng.uniform(-1, 1, 1000), rng.uniform(-3, 3, 1000)
    vocal_stem, accompaniment_stem, mix = mix_stems(vocals, accompaniment)
    np.testing.assert_allclose(mix, vocal_stem + accompaniment_stem, atol=1e-6)
    assert np.abs(mix).max() <= 1.0


def test_song_rejects_lyrics_without_sung_lines(store):
    from pipelines.tabs.song import SongPipeline, SongRequest

    with pytest.raises(PipelineError, match="no sung lines"):
        SongPipeline(store, "tiny").run(SongRequest(lyrics="[intro]\n[outro]", style="pop"))


LYRICS = "[intro]\n[verse]\nla la\n"


def read(path):
    import soundfile

    audio, rate = soundfile.read(path, dtype="float32")
    return audio, rate


def test_generate_song_dual_mode_through_the_api_streams_stems_and_mix(tiny_client):
    job = tiny_client.submit(LYRICS, "lofi", 1.0, "dual", True, 3.0, 1.0, 50, 2, 11, api_name="/generate_song")
    _, mix_path, files, stats = job.result(timeout=600)
    assert stats["mode"] == "dual" and "MusicGen" in stats["mode_label"] and stats["tau"] >= 1.0
    assert stats["time_to_first_audio_s"] <= stats["time_s"] and stats["cache"] == "static"
    stems = {name: read(path) for name, path in zip(("mix", "vocals", "accompaniment"), files)}
    (mix, rate), (vocals, _), (accompaniment, _) = stems["mix"], stems["vocals"], stems["accompaniment"]
    assert rate == 32000 and mix.shape == vocals.shape == accompaniment.shape == (32000,)
    np.testing.assert_allclose(mix, vocals + accompaniment, atol=1e-6)
    assert np.abs(vocals).max() > 0
    np.testing.assert_allclose(read(mix_path)[0], mix, atol=1e-4)


def test_generate_song_mixed_mode_through_the_api_uses_ace_step(tiny_client):
    _, mix_path, files, stats = tiny_client.predict(LYRICS, "lofi", 1.0, "mixed", True, 3.0, 1.0, 50, 2, 11,
                                                    api_name="/generate_song")
    assert stats["mode"] == "mixed" and "ACE-Step" in stats["mode_label"] and stats["steps"] == 2
    audio, rate = read(files[0])
    assert audio.ndim == 2 and audio.shape[1] == 2 and abs(audio.shape[0] / rate - 1.0) < 0.05


def test_song_pickers_choose_the_accompaniment_and_vocals_models(store):
    from dataclasses import replace

    from pipelines.tabs.song import SongPipeline, SongRequest

    pipeline = SongPipeline(store, "tiny")
    second = replace(pipeline.candidates("musicgen")[0], name="tiny-musicgen B (random weights)")
    pipeline.specs = [*pipeline.specs, second]
    assert [name for _, name in pipeline.model_choices("musicgen")] == ["tiny-musicgen (random weights)", second.name]
    request = SongRequest(lyrics=LYRICS, style="lofi", duration_s=1.0, steps=2, seed=3, accompaniment_model=second.name,
                          vocal_model=pipeline.default_model_name("bark"))
    result = pipeline.run(request)
    assert result.stats["accompaniment_model"] == second.name and second.name in store.loaded_names()
    assert "tiny-musicgen (random weights)" not in store.loaded_names()
    with pytest.raises(PipelineError, match="Unknown vocals model 'nope'"):
        pipeline.run(replace(request, vocal_model="nope"))


def test_offline_song_tab_names_the_models_it_needs(hub_offline_empty_cache):
    from pipelines.models import ModelStore
    from pipelines.tabs.song import SongPipeline

    pipeline = SongPipeline(ModelStore(packaged={}), "auto")
    assert pipeline.usable_modes() == [] and not pipeline.usable()
    assert pipeline.fetch_plan() == [("MusicGen small", ["facebook/musicgen-small"]),
                                     ("Bark small · token AR", ["suno/bark-small"])]
    assert all(label.endswith("needs a download (Hub unreachable)") for label, _ in pipeline.model_choices("bark"))


def test_song_mode_shows_only_its_own_models_and_settings():
    from components.song_tab import mode_controls

    visible = lambda updates: [update["visible"] for update in updates[:6]]  # noqa: E731
    # accompaniment, vocals, song model, drafting, top-k, diffusion steps
    assert visible(mode_controls("dual", 10)) == [True, True, False, True, True, False]
    assert visible(mode_controls("mixed", 10)) == [False, False, True, False, False, True]
    assert mode_controls("dual", 120)[-1]["value"] == 30 and mode_controls("mixed", 120)[-1]["maximum"] == 240


def test_generate_song_api_accepts_a_long_mixed_mode_duration(tiny_client):
    """The duration slider's bound is the longest mode's, whatever mode the page starts in (the API never changes
    mode in the page, so a dual-track bound would refuse every mixed-mode song over 30 s)."""
    from gradio_client.exceptions import AppError

    # 45 s passes the widget (a 30 s bound would refuse it there as an "Invalid value"); the pipeline then
    # refuses it for dual-track mode with the mode's own limit.
    with pytest.raises(AppError, match=r"Duration \(s\) must be between 1.0 and 30.0"):
        tiny_client.predict(LYRICS, "lofi", 45.0, "dual", True, 3.0, 1.0, 50, 2, 11, api_name="/generate_song")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0, top_k=20, seed=7)])
def test_column_drafting_through_the_verifier_is_lossless_on_cuda_with_a_static_cache(sampling):
    model, tokenizer = tiny_musicgen()
    model = model.to("cuda")
    conditioning = encode_text(model, tokenizer, ["jazz drums"], GUIDANCE)
    plain, _ = decode(model, conditioning, 60, sampling)
    drafted, stats = decode(model, conditioning, 60, sampling, column_drafter())
    assert torch.equal(plain, drafted) and stats.forwards <= 60 + 4 - 1
