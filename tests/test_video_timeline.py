"""The shot timeline compiles to FreeNoise keyframes whose interpolation is the intended per-frame mix."""
from __future__ import annotations

import pytest

from pipelines.base import PipelineError
from pipelines.diffusion.timeline import Shot, Timeline, parse_shots


def test_cut_is_a_step_function_and_smooth_is_a_centred_ramp():
    timeline = Timeline((Shot(0, "a"), Shot(8, "b", "cut"), Shot(16, "c", "smooth")), smooth_window=4)
    mix = timeline.frame_mix(24)
    assert mix[7] == {0: 1.0} and mix[8] == {1: 1.0}
    assert all(len(weights) == 1 for weights in mix[:14])
    assert mix[14] == {1: 1.0}
    assert mix[15] == pytest.approx({1: 0.75, 2: 0.25})
    assert mix[16] == pytest.approx({1: 0.5, 2: 0.5})
    assert mix[17] == pytest.approx({1: 0.25, 2: 0.75})
    assert mix[18] == {2: 1.0}
    assert timeline.keyframes(24) == {0: "a", 7: "a", 8: "b", 14: "b", 18: "c"}


def test_smooth_windows_are_clamped_inside_short_shots():
    timeline = Timeline((Shot(0, "a"), Shot(3, "b", "smooth"), Shot(5, "c", "smooth")), smooth_window=16)
    keys = timeline.keyframes(8)
    assert list(keys) == sorted(keys)
    for frame, weights in enumerate(timeline.frame_mix(8)):
        assert sum(weights.values()) == pytest.approx(1.0), frame


def test_parse_shots_gives_clear_errors():
    with pytest.raises(PipelineError, match="not valid JSON"):
        parse_shots('[{"start": 0, "prompt": "a"')
    with pytest.raises(PipelineError, match="needs a \"start\""):
        parse_shots('[{"prompt": "a"}]')
    with pytest.raises(PipelineError, match="must start at frame 0"):
        parse_shots('[{"start": 2, "prompt": "a"}]').validate(8)
    with pytest.raises(PipelineError, match="increase strictly"):
        parse_shots([[0, "a"], [4, "b"], [4, "c"]]).validate(8)
    with pytest.raises(PipelineError, match="outside the video"):
        parse_shots([[0, "a"], [9, "b"]]).validate(8)
    with pytest.raises(PipelineError, match="transition must be one of"):
        parse_shots([[0, "a"], [4, "b", "wipe"]]).validate(8)
    assert parse_shots("").shots == ()


def test_describe_lists_frame_ranges():
    timeline = parse_shots('[{"start": 0, "prompt": "a"}, {"start": 5, "prompt": "b", "transition": "smooth"}]')
    rows = timeline.describe(12)
    assert [row["frames"] for row in rows] == ["0-4", "5-11"]
    assert [row["transition"] for row in rows] == ["start", "smooth"]


def test_editor_adds_and_removes_shots():
    from pipelines.diffusion.timeline import add_shot, remove_last_shot

    text = add_shot("", 16)
    text = add_shot(text.replace('"prompt": ""', '"prompt": "a"'), 16, "smooth")
    shots = parse_shots(text).shots
    assert [(shot.start, shot.transition) for shot in shots] == [(0, "cut"), (8, "smooth")]
    assert len(parse_shots(remove_last_shot(text)).shots) == 1
