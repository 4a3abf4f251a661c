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


def test_offline_video_tab_says_on_arrival_what_to_fetch_and_turns_generate_off(hub_offline_empty_cache):
    from app import build_demo
    from pipelines.models import ModelStore
    from pipelines.tabs.video import VideoPipeline

    demo = build_demo({"video": VideoPipeline(ModelStore(packaged={}), "auto")})
    notice = next(b for b in demo.blocks.values() if "tw-unavailable" in (getattr(b, "elem_classes", None) or []))
    generate = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "video-generate")
    assert notice.visible and generate.interactive is False
    for text in ("AnimateDiff v1-5-3 on SD1.5", "hf download guoyww/animatediff-motion-adapter-v1-5-3",
                 "hf download stable-diffusion-v1-5/stable-diffusion-v1-5", str(hub_offline_empty_cache)):
        assert text in notice.value
    loads = [d for d in demo.config["dependencies"] if d["targets"] == [(0, "load")]]
    assert loads, "the notice and the pickers are not re-checked when a page loads"


def test_video_tab_with_a_model_hides_the_notice():
    import gradio as gr

    from app import build_demo
    from pipelines.models import ModelStore
    from pipelines.tabs.video import VideoPipeline

    demo = build_demo({"video": VideoPipeline(ModelStore(packaged={}), "tiny")})
    notice = next(b for b in demo.blocks.values() if "tw-unavailable" in (getattr(b, "elem_classes", None) or []))
    generate = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "video-generate")
    assert notice.visible is False and generate.interactive is not False
    assert isinstance(generate, gr.Button)


def test_a_model_fetched_while_the_app_runs_counts_after_a_page_reload(hub_offline_empty_cache):
    from app import build_demo
    from pipelines.models import ModelStore
    from pipelines.tabs.video import VideoPipeline

    demo = build_demo({"video": VideoPipeline(ModelStore(packaged={}), "auto")})
    refresh = next(f.fn for f in demo.fns.values() if f.targets == [(0, "load")])
    notice, generate, picker = refresh()
    assert notice["visible"] and generate["interactive"] is False
    for repo in ("guoyww/animatediff-motion-adapter-v1-5-3", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        folder = hub_offline_empty_cache / f"models--{repo.replace('/', '--')}"  # what `hf download` leaves
        (folder / "snapshots" / "abc").mkdir(parents=True)
        (folder / "snapshots" / "abc" / "config.json").write_text("{}")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("abc")
    notice, generate, picker = refresh()
    assert notice["visible"] is False and generate["interactive"] is True
    assert picker["choices"][0] == ("AnimateDiff v1-5-3 on SD1.5 · available here", "AnimateDiff v1-5-3 on SD1.5")


def test_offline_video_tab_opens_on_the_microworld_motion_model_with_its_defaults(hub_offline_empty_cache):
    import gradio as gr

    from app import build_demo
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_VIDEO_MODEL
    from pipelines.tabs.video import VideoPipeline

    demo = build_demo({"video": VideoPipeline(ModelStore(), "auto")})  # the committed adapter, packaged
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["video-model"].value == MICROWORLD_VIDEO_MODEL
    labels = dict((value, label) for label, value in blocks["video-model"].choices)
    assert labels[MICROWORLD_VIDEO_MODEL].endswith("available here")
    assert blocks["video-negative"].value == "" and blocks["video-cfg"].value == 5.0  # as it was trained and sampled
    assert "moving" in blocks["video-prompt"].placeholder and blocks["video-generate"].interactive is not False
    notice = next(b for b in demo.blocks.values() if isinstance(b, gr.Markdown) and "tw-unavailable" in b.elem_classes)
    assert notice.visible is False


def test_picking_a_model_swaps_the_negative_prompt_and_cfg_only_while_they_are_the_defaults():
    from components.video_tab import model_defaults
    from pipelines.presets import MICROWORLD_VIDEO_MODEL

    info, prompt, negative, cfg = model_defaults(MICROWORLD_VIDEO_MODEL, "low quality, blurry", 7.5)
    assert "circle" in prompt["placeholder"] and negative["value"] == "" and cfg["value"] == 5.0
    assert "do not yet move" in info["info"]  # the picker says what the model cannot do
    info, prompt, negative, cfg = model_defaults("AnimateDiff v1-5-3 on SD1.5", "", 5.0)
    assert "fox" in prompt["placeholder"] and negative["value"] == "low quality, blurry" and cfg["value"] == 7.5
    assert info["info"] is None
    _, _, negative, cfg = model_defaults(MICROWORLD_VIDEO_MODEL, "a green star", 9.0)  # typed by a person: kept
    assert "value" not in negative and "value" not in cfg
