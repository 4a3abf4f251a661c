"""The video tab as API clients see it, on the tiny preset."""
from __future__ import annotations

import json

import pytest

SHOTS = json.dumps([{"start": 0, "prompt": "a red hat"}, {"start": 3, "prompt": "a blue car", "transition": "smooth"}])


def call(client, shots: str = "", compare: str = "none", prompt: str = "a red hat", lpa: bool = False):
    return client.predict(prompt, "", shots, "tiny-animatediff (random weights)", 6, 4, 2, 7.5, 32, 32, 11, compare,
                          4, 16, 4, 0.0, 0, False, lpa, "", 300, 650, "", api_name="/generate_video")


def test_generate_video_returns_mp4_strip_and_stats(tiny_client):
    import imageio

    video, baseline, strip, stats = call(tiny_client)
    path = video["video"] if isinstance(video, dict) else video
    assert path.endswith(".mp4") and baseline is None and strip.endswith(".png")
    with imageio.get_reader(path, format="FFMPEG") as reader:
        assert sum(1 for _ in reader) == 6
    assert stats["frames"] == 6 and stats["seed"] == 11 and stats["time_s"] > 0 and "peak_memory_mb" in stats


def test_generate_video_same_seed_ab_against_single_prompt(tiny_client):
    video, baseline, strip, stats = call(tiny_client, SHOTS, "single prompt")
    assert baseline is not None and stats["compare"] == "single prompt" and stats["shots"] == 2
    assert "time_ratio_vs_baseline" in stats


def test_generate_video_controls_off_ab(tiny_client):
    video, baseline, strip, stats = call(tiny_client, compare="controls off", prompt="a castle in watercolor style",
                                         lpa=True)
    assert baseline is not None and stats["compare"] == "controls off"


def test_malformed_shot_json_is_a_clear_error(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not valid JSON"):
        call(tiny_client, '[{"start": 0, "prompt": "a"')
