"""Per-UNet state of the image techniques (pipelines/diffusion/state.py) and the capture-safe hook registry
(pipelines/diffusion/hooks.py): one state object per UNet, kept on it, shared by requests, gone with it; graphs shared
across runs only when every UNet pre-hook is registered as capture-safe."""
from __future__ import annotations

import copy
import gc
import importlib
import pkgutil
import weakref

import pytest
import torch

import pipelines.diffusion
import pipelines.tabs
from pipelines.diffusion.attention import AttentionControl, KeyBias
from pipelines.diffusion.fast import FastUNet, unet_graphs
from pipelines.diffusion.hooks import CAPTURE_SAFE, capture_name, capture_safe
from pipelines.diffusion.merging import apply_merging, installed_merging, remove_merging
from pipelines.diffusion.models import scheduled_pipe
from pipelines.diffusion.state import ATTRIBUTE, UNetState, unet_state
from pipelines.models import ModelStore
from pipelines.tabs.image import ImagePipeline
from pipelines.tiny import tiny_sd15_pipeline


def unet_call(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    text = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=text).sample


def test_one_state_per_unet_holds_merging_and_graphs():
    unet = tiny_sd15_pipeline().unet
    state = unet_state(unet)
    assert isinstance(state, UNetState) and unet_state(unet) is state and getattr(unet, ATTRIBUTE) is state
    assert unet_graphs(unet) is state.graphs and state.merging is None
    handle = apply_merging(unet, 0.5, min_tokens=0)
    assert state.merging is handle and installed_merging(unet) is handle
    remove_merging(unet)
    assert state.merging is None and unet_state(unet) is state
    assert not any(ATTRIBUTE in key for key in unet.state_dict())  # not a parameter or buffer


def test_loaded_image_model_exposes_its_unets_state():
    pipeline = ImagePipeline(ModelStore(packaged={}), "tiny")
    model = pipeline.load("")
    assert model.state is unet_state(model.pipe.unet)
    assert scheduled_pipe(model, "default").unet is model.pipe.unet  # every request sees this state


def test_a_copied_unet_starts_with_empty_state():
    unet = tiny_sd15_pipeline().unet
    apply_merging(unet, 0.5, min_tokens=0)
    with FastUNet(unet, "eager"):
        unet_call(unet)
    assert unet_graphs(unet).entries
    twin = copy.deepcopy(unet)
    assert unet_state(twin) is not unet_state(unet)
    assert unet_state(twin).merging is None and not unet_graphs(twin).entries


def test_state_goes_with_its_unet():
    unet = tiny_sd15_pipeline().unet
    apply_merging(unet, 0.5, min_tokens=0)
    with FastUNet(unet, "eager"):
        unet_call(unet)
    gone_unet, gone_graphs = weakref.ref(unet), weakref.ref(unet_graphs(unet))
    del unet
    gc.collect()
    assert gone_unet() is None and gone_graphs() is None


def test_no_module_level_weak_key_dictionaries_in_the_diffusion_package_or_the_tabs():
    modules = [f"{package.__name__}.{info.name}" for package in (pipelines.diffusion, pipelines.tabs)
               for info in pkgutil.iter_modules(package.__path__)]
    assert "pipelines.tabs.image" in modules and "pipelines.diffusion.merging" in modules
    for name in modules:
        module = importlib.import_module(name)
        held = [key for key, value in vars(module).items() if isinstance(value, weakref.WeakKeyDictionary)]
        assert not held, f"{name} keeps per-model state in {held}"


def test_registry_names_the_merging_and_control_hooks():
    unet = tiny_sd15_pipeline().unet
    apply_merging(unet, 0.5, min_tokens=0)
    control = AttentionControl(unet)
    control.biases.append(KeyBias(tokens=(1,), value=-1.0))
    with control:
        names = [capture_name(hook) for hook in unet._forward_pre_hooks.values()]
    assert names == ["merging: timestep", "attention: latent size and timestep"]
    assert set(names) <= set(CAPTURE_SAFE.values())
    assert capture_name(lambda module, args: None) is None


def test_a_second_hook_cannot_take_a_registered_name():
    with pytest.raises(ValueError, match="already registered"):
        capture_safe("merging: timestep")(lambda module, args: None)


def test_graphs_outlive_the_run_only_when_every_hook_is_registered():
    unet = tiny_sd15_pipeline().unet
    apply_merging(unet, 0.5, min_tokens=0)
    with FastUNet(unet, "eager"):
        unet_call(unet)
    kept = len(unet_graphs(unet).entries)
    assert kept == 1  # merging's hook is capture-safe: the entry is shared with the next run

    handle = unet.register_forward_pre_hook(lambda module, args: None)  # unknown hook: this run only
    try:
        with FastUNet(unet, "eager") as fast:
            unet_call(unet)
            assert len(unet_graphs(unet).entries) == kept + 1 and fast.eager_calls == 1
    finally:
        handle.remove()
    assert len(unet_graphs(unet).entries) == kept
