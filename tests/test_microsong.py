"""Micro-song, the song tab's offline mode: the composer and its tune language, the structure guard, lossless
drafting through the decoding core, the committed note model, the bar-by-bar synthesiser, and the tab end to end."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipelines.audio.lyrics import parse_sections
from pipelines.audio.pcm import mix_stems
from pipelines.base import Partial, Progress, Result
from pipelines.decoding.plain import DecodeStats, SamplingConfig
from pipelines.microsong.decode import decode_body
from pipelines.microsong.guard import IDS, StructureGuard
from pipelines.microsong.model import build_tokenizer, packaged_folder, tiny_note_model
from pipelines.microsong.render import SAMPLE_RATE, SongRenderer
from pipelines.microsong.tunes import (VOCABULARY, BodyReader, Header, check_body, compose, compose_body,
                                       line_syllables, plan_song, random_plan, style_header, syllable_count)

LYRICS = ("[intro]\n[verse]\nMorning light on the harbour wall\nGulls are singing over it all\n"
          "[chorus]\nSail away, sail away\nInto the blue of a brand new day\n"
          "[verse]\nEvening falls on the harbour wall\nBoats come home before nightfall\n"
          "[chorus]\nSail away, sail away\nInto the blue of a brand new day\n[outro]\n")
GREEDY = SamplingConfig(temperature=0.0)


def bars_of(tokens: list[str]):
    reader = BodyReader()
    return [bar for token in tokens for bar in reader.feed(token)]


def test_syllable_counter_counts_common_words():
    lines = {"Morning light on the harbour wall": 8, "Sail away, sail away": 6, "beautiful people rise": 6,
             "the little table": 5, "Into the blue of a brand new day": 9, "I": 1, "hmm": 1}
    assert {line: syllable_count(line) for line in lines} == lines
    assert [s.vowel for s in line_syllables("morning")] == ["o", "i"] and line_syllables("sing")[0].onset == "s"


def test_composer_sings_one_note_per_syllable_and_the_chorus_repeats_its_melody():
    plan = plan_song(LYRICS, Header())
    body = compose_body(plan, random.Random(5))
    assert check_body(body, plan) == {"parsed": True, "lines": 8, "lines_matched": 8}
    bars = bars_of(body)
    for (section, line), count in {(1, 0): 8, (2, 1): 9, (4, 0): 6}.items():
        assert sum(len(b.notes) for b in bars if (b.section, b.line) == (section, line)) == count
    chorus = [[(b.chord, b.events) for b in bars if b.section == s] for s in (2, 4)]
    assert chorus[0] == chorus[1] and chorus[0]
    verse_ends = [b for b in bars if b.section in (1, 3)][-1]
    assert verse_ends.chord == 1 and verse_ends.notes[-1] % 7 == 0  # the section cadences on the tonic


def test_style_words_set_the_header():
    header = style_header("a slow waltz in D minor, 84 bpm", random.Random(0))
    assert (header.key, header.mode, header.meter, header.tempo, header.bpm) == ("D", "MIN", "M3", "slow", 84.0)
    assert style_header("happy march", random.Random(0)).meter == "M4"


def test_tokenizer_round_trips_a_tune_with_one_id_per_word():
    tokenizer = build_tokenizer()
    rng = random.Random(1)
    tune = compose(random_plan(rng), rng)
    ids = tokenizer(" ".join(tune), add_special_tokens=False)["input_ids"]
    assert ids == [VOCABULARY.index(word) for word in tune]
    assert tokenizer.convert_ids_to_tokens(ids) == tune and tokenizer.unk_token_id not in ids


def test_guard_allows_every_composed_tune_and_keeps_random_choices_inside_the_plan():
    rng = random.Random(3)
    for trial in range(20):
        plan = random_plan(rng)
        tune = [IDS[w] for w in compose(plan, rng)]
        prompt = len(plan.prompt_tokens())
        guard = StructureGuard(plan)
        for end in range(prompt, len(tune)):
            assert guard(torch.tensor([tune[:end]]), torch.zeros(1, len(VOCABULARY)))[0, tune[end]] == 0
        chosen, pick = tune[:prompt], random.Random(trial)
        while chosen[-1] != IDS["<eos>"]:
            scores = StructureGuard(plan)(torch.tensor([chosen]), torch.zeros(1, len(VOCABULARY)))[0]
            chosen.append(pick.choice((scores == 0).nonzero().flatten().tolist()))
        check = check_body([VOCABULARY[i] for i in chosen[prompt:]], plan)
        assert check["parsed"] and check["lines_matched"] == check["lines"]


@pytest.mark.parametrize("sampling, guard", [(GREEDY, True), (GREEDY, False),
                                             (SamplingConfig(temperature=1.0, seed=4), True)])
def test_drafted_decoding_output_identical_to_plain(sampling, guard):
    note = tiny_note_model(seed=1)
    plan = plan_song(LYRICS, Header(meter="M3"))
    plain = [t for run in decode_body(note, plan, sampling, False, guard) for t in run]
    stats = DecodeStats()
    drafted = [t for run in decode_body(note, plan, sampling, True, guard, stats=stats) for t in run]
    assert drafted == plain and len(plain) > 50
    if guard:
        assert check_body(plain, plan)["lines_matched"] == 8


def test_decoding_runs_on_one_cpu_thread_and_restores_the_setting():
    from pipelines.microsong import decode

    note, seen = tiny_note_model(), []
    forward = note.model.forward
    note.model.forward = lambda *a, **k: (seen.append(torch.get_num_threads()), forward(*a, **k))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        list(decode.decode_body(note, plan_song("[verse]\nla la\n", Header()), GREEDY, True))
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def rendered(body: list[str], header: Header, lyrics: str = LYRICS):
    sections = parse_sections(lyrics)
    syllables = {(s, i): line_syllables(text) for s, sec in enumerate(sections) for i, text in enumerate(sec.lines)}
    bars = bars_of(body)
    streamer = SongRenderer(header, syllables)
    chunks = [streamer.bar(bar) for bar in bars] + [streamer.finish()]
    return chunks, SongRenderer(header, syllables).render(bars)


def test_streamed_bars_concatenate_to_the_one_shot_render_without_seams():
    header = Header(bpm=120.0)
    chunks, (vocals, accompaniment) = rendered(compose_body(plan_song(LYRICS, header), random.Random(2)), header)
    streamed = [np.concatenate(stem) for stem in zip(*chunks)]
    np.testing.assert_allclose(streamed[0], vocals, atol=1e-6)
    np.testing.assert_allclose(streamed[1], accompaniment, atol=1e-6)
    _, _, mix = mix_stems(*streamed)
    seams = np.cumsum([chunk[0].size for chunk in chunks])[:-1]
    jumps = np.abs(np.diff(mix))
    assert jumps[seams - 1].max() <= np.percentile(jumps, 99.9)  # a seam is no louder a step than the music


def test_render_is_audible_and_the_mix_is_the_sum_of_stems_without_clipping():
    header = Header(meter="M3", bpm=90.0)
    chunks, _ = rendered(compose_body(plan_song(LYRICS, header), random.Random(7)), header)
    vocals, accompaniment, mix = mix_stems(*(np.concatenate(stem) for stem in zip(*chunks)))
    np.testing.assert_allclose(mix, vocals + accompaniment, atol=1e-6)
    assert (np.abs(mix).max() <= 1.0 and np.sqrt(np.mean(vocals ** 2)) > 0.01
            and np.sqrt(np.mean(accompaniment ** 2)) > 0.01)
    bar_s = 6 * 30.0 / 90.0
    assert mix.size / SAMPLE_RATE == pytest.approx(len(chunks[:-1]) * bar_s + 1.5, abs=0.01)


committed = pytest.mark.skipif(packaged_folder() is None, reason="micro-song weights are not committed")


@committed
def test_committed_note_model_sings_every_line_with_its_syllables_and_drafts_the_repeats():
    from pipelines.microsong.model import load_note_model
    from pipelines.models import ModelStore, ResolvedModel

    store = ModelStore(packaged={})
    note = load_note_model(ResolvedModel(None, "package", packaged_folder()), store)
    plan = plan_song(LYRICS, style_header("folk, 100 bpm", random.Random(3)))
    stats = DecodeStats()
    body = [t for run in decode_body(note, plan, SamplingConfig(temperature=1.0, seed=3), True, stats=stats)
            for t in run]
    assert check_body(body, plan) == {"parsed": True, "lines": 8, "lines_matched": 8}
    assert stats.tau > 1.3  # the second verse and chorus are drafted from the first


def offline_events(store, lyrics=LYRICS, **fields):
    from pipelines.tabs.song import SongPipeline, SongRequest

    return list(SongPipeline(store, "tiny").generate(SongRequest(lyrics=lyrics, style="folk", mode="offline", seed=3,
                                                                 **fields)))


def read(path):
    import soundfile

    return soundfile.read(path, dtype="float32")[0]


def test_offline_mode_streams_bars_while_decoding_and_saves_stems(store):
    events = offline_events(store)
    partials = [i for i, e in enumerate(events) if isinstance(e, Partial)]
    progress = [i for i, e in enumerate(events) if isinstance(e, Progress) and e.note == "decoding notes"]
    assert partials[0] < progress[len(progress) // 4] and len(partials) > 10  # audio long before the end
    result = events[-1]
    assert isinstance(result, Result) and result.stats["mode"] == "offline" and result.stats["parsed"]
    assert result.stats["time_to_first_audio_s"] < result.stats["time_s"] and result.stats["tau"] >= 1.0
    mix, vocals, accompaniment = (read(result.value[name]) for name in ("mix", "vocals", "accompaniment"))
    np.testing.assert_allclose(mix, vocals + accompaniment, atol=1e-6)
    streamed = np.concatenate([events[i].value.samples for i in partials])
    np.testing.assert_allclose(streamed, mix, atol=1e-6)


def test_offline_is_the_default_mode_when_the_hub_models_cannot_run(hub_offline_empty_cache):
    from pipelines.models import ModelStore
    from pipelines.tabs.song import SongPipeline

    pipeline = SongPipeline(ModelStore(), "auto")
    if packaged_folder() is None:
        assert pipeline.usable_modes() == []
        return
    assert pipeline.usable_modes() == ["offline"]
    assert [label.endswith("available here") for label, _ in pipeline.model_choices("microsong")] == [True]
    from components.song_tab import mode_choices

    marked = {key: label.endswith("needs a download") for label, key in mode_choices(pipeline)}
    assert marked == {"dual": True, "mixed": True, "offline": False}, "the mode radio says which modes run here"


def test_offline_mode_shows_its_note_model_and_drafting():
    from components.song_tab import mode_controls

    updates = mode_controls("offline", 10)
    # accompaniment, vocals, song model, drafting, top-k, diffusion steps, note model
    assert [update["visible"] for update in updates[:7]] == [False, False, False, True, False, False, True]


def test_generate_song_offline_mode_through_the_api(tiny_client):
    job = tiny_client.submit("[verse]\nla la la\n[chorus]\nsing it now\n", "waltz", 10.0, "offline", True, 3.0, 0.0,
                             50, 2, 11, api_name="/generate_song")
    _, mix_path, files, stats = job.result(timeout=600)
    assert stats["mode"] == "offline" and "micro-song" in stats["mode_label"] and stats["meter"] == "3/4"
    mix, vocals, accompaniment = (read(path) for path in files)
    np.testing.assert_allclose(mix, vocals + accompaniment, atol=1e-6)
    assert stats["sample_rate"] == SAMPLE_RATE and abs(mix.size / SAMPLE_RATE - stats["audio_s"]) < 0.01
