"""Token merging for speed: bipartite soft matching, merge/unmerge round trip, and which UNet blocks it touches."""
from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from pipelines.diffusion.merging import (apply_merging, best_destinations, destination_offsets, merge, merging_stats,
                                         partition, plan_merge, remove_merging, spatial_transformers, unmerge)


SIZE = 16  # latent side: 256 tokens at the finest level, 64 at the next


def _unet(**layout):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, cross_attention_dim=16, norm_num_groups=8, **layout).eval()


@lru_cache(maxsize=None)
def _built(kind: str):
    return {"sd15": _sd15_unet, "sdxl": _sdxl_unet, "motion": _motion_unet}[kind]()


def _fresh(kind: str):
    """A private copy of a tiny UNet built once per session (tests add their own hooks)."""
    return copy.deepcopy(_built(kind))


def _sd15_unet():
    """SD1.5 layout in miniature: attention at the two finest levels, none at the coarsest."""
    return _unet(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)


def _sdxl_unet():
    """SDXL layout in miniature: no attention at full resolution, transformer depth growing downwards."""
    return _unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), attention_head_dim=(4, 8, 8), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=16 + 6 * 4)


def _motion_unet():
    from diffusers import MotionAdapter, UNetMotionModel

    unet = _fresh("sd15")
    torch.manual_seed(1)
    adapter = MotionAdapter(block_out_channels=(16, 32, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=16, use_motion_mid_block=True)
    return UNetMotionModel.from_unet2d(unet, adapter).eval()


def _sd15_inputs(size: int = SIZE):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, size, size, generator=g), torch.tensor(500), torch.randn(2, 5, 16, generator=g)


def _sdxl_call(unet, size: int = SIZE):
    sample, t, text = _sd15_inputs(size)
    added = {"text_embeds": torch.randn(2, 16, generator=torch.Generator().manual_seed(4)),
             "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * 2, dtype=torch.float32)}
    return unet(sample, t, text, added_cond_kwargs=added).sample


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


@torch.no_grad()
def test_ratio_zero_installs_nothing_and_is_bit_identical_to_stock():
    unet = _fresh("sd15")
    sample, t, text = _sd15_inputs()
    stock = unet(sample, t, text).sample
    handle = apply_merging(unet, 0.0, min_tokens=0)
    assert handle.blocks == [] and not any(_hooked(m) for m in unet.modules())
    assert torch.equal(unet(sample, t, text).sample, stock)
    assert merging_stats(unet)["tokens_merged"] == 0


@pytest.mark.parametrize("h,w,ratio", [(16, 16, 0.5), (15, 17, 0.3), (8, 8, 0.75), (8, 8, 0.9)])
def test_merged_token_count_matches_ratio_and_shapes_round_trip(h, w, ratio):
    x = torch.randn(3, h * w, 12, generator=torch.Generator().manual_seed(0))
    plan = plan_merge(x, h, w, ratio, layout=11)
    src, dst = partition(h, w, 2, 2, None, x.device)
    expected = min(int(h * w * ratio), src.numel())  # tomesd caps the ratio at 1 - 1/(sx*sy)
    merged = merge(x, plan)
    assert plan.removed == expected and merged.shape == (3, h * w - expected, 12)
    restored = unmerge(merged, plan)
    assert restored.shape == x.shape
    # every token gets the mean of the tokens that share its slot; tokens alone in a slot come back exactly
    slots = plan.slots.view(3, h * w) - torch.arange(3)[:, None] * plan.merged_tokens
    for b in range(3):
        for slot in slots[b].unique():
            members = slots[b] == slot
            assert torch.allclose(restored[b, members], x[b, members].mean(0).expand(int(members.sum()), -1),
                                  atol=1e-6)
    alone = (1 / plan.inverse_counts.view(3, -1)).round().gather(1, slots) == 1
    assert torch.equal(restored[alone], x[alone])


def _layout(h: int, w: int, layout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = destination_offsets((h // 2) * (w // 2), 4, seed, torch.tensor(layout), torch.device("cpu"))
    return partition(h, w, 2, 2, offsets, torch.device("cpu"))


def test_one_random_destination_per_cell_in_every_layout():
    h, w = 9, 12
    for layout in (1, 2):
        src, dst = _layout(h, w, layout)
        assert torch.equal(torch.sort(torch.cat([src, dst])).values, torch.arange(h * w))
        cell_of = (dst // w // 2) * (w // 2) + (dst % w) // 2
        assert torch.equal(torch.sort(cell_of).values, torch.arange((h // 2) * (w // 2)))
        assert torch.equal(_layout(h, w, layout)[1], dst)  # same step, same layout: reruns reproduce
    assert not torch.equal(_layout(h, w, 1)[1], _layout(h, w, 2)[1])
    assert not torch.equal(_layout(h, w, 1, seed=1)[1], _layout(h, w, 1)[1])
    dst = torch.stack([_layout(h, w, k)[1] for k in range(20)])
    assert set((dst % 2 + dst // w % 2 * 2).unique().tolist()) == {0, 1, 2, 3}  # every position in a cell is used


@torch.no_grad()
def test_each_timestep_draws_its_layout_and_repeats_it():
    unet = _fresh("sd15")
    sample, _, text = _sd15_inputs()
    handle = apply_merging(unet, 0.5, min_tokens=0)

    def slots(t: int) -> list[torch.Tensor]:
        unet(sample, torch.tensor(t), text)
        return [merger.plan.slots.clone() for merger in handle.mergers]
    at_500, again, at_499 = slots(500), slots(500), slots(499)
    assert all(torch.equal(a, b) for a, b in zip(at_500, again))
    assert not any(torch.equal(a, b) for a, b in zip(at_500, at_499))
    assert len({merger.salt for merger in handle.mergers}) == 3  # blocks draw different layouts at the same step


def test_most_similar_sources_are_merged_first_and_losslessly():
    h = w = 8
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(5))
    src, dst = partition(h, w, 2, 2, None, x.device)
    copies = src[[0, 5, 9, 20, 33, 41]]
    x[:, copies] = x[:, dst[[3, 3, 7, 0, 12, 15]]]  # duplicates of destinations: cosine similarity 1
    plan = plan_merge(x, h, w, len(copies) / (h * w), layout=None)
    assert plan.removed == len(copies)
    # merging any other source into a destination would change it: random tokens are never parallel
    assert torch.allclose(unmerge(merge(x, plan), plan), x, atol=1e-6)
    one_more = plan_merge(x, h, w, 7 / (h * w), layout=None)
    assert not torch.allclose(unmerge(merge(x, one_more), one_more), x, atol=1e-3)


def test_chunked_similarity_finds_the_same_best_destinations():
    g = torch.Generator().manual_seed(2)
    src, dst = torch.randn(2, 300, 8, generator=g), torch.randn(2, 100, 8, generator=g)
    whole_score, whole_best = best_destinations(src, dst, chunk_elements=2**26)
    chunk_score, chunk_best = best_destinations(src, dst, chunk_elements=2 * 100 * 7)  # 43 chunks of 7 rows
    cosine = torch.nn.functional.cosine_similarity(src[:, :, None], dst[:, None], dim=-1)
    assert torch.equal(whole_best, chunk_best) and torch.equal(whole_best, cosine.argmax(-1))
    assert torch.allclose(whole_score, chunk_score) and torch.allclose(whole_score, cosine.amax(-1), atol=1e-6)


def test_windowed_matching_finds_the_best_destination_inside_each_tile():
    h, w, tile = 16, 24, 8
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(4))
    src, dst = partition(h, w, 2, 2, destination_offsets(96, 4, 0, 5, x.device), x.device, tile)
    assert torch.equal(torch.sort(torch.cat([src, dst])).values, torch.arange(h * w))
    tile_of = lambda pos: (pos // w // tile) * (w // tile) + pos % w // tile  # noqa: E731
    groups = (h // tile) * (w // tile)
    assert torch.equal(tile_of(dst), torch.arange(groups).repeat_interleave(dst.numel() // groups))
    score, best = best_destinations(x[:, src], x[:, dst], groups=groups)
    cosine = torch.nn.functional.cosine_similarity(x[:, src, None], x[:, None, dst], dim=-1)
    cosine[:, tile_of(src)[:, None] != tile_of(dst)[None, :]] = -2  # other tiles are out of reach
    assert torch.equal(best, cosine.argmax(-1)) and torch.allclose(score, cosine.amax(-1), atol=1e-6)
    plan = plan_merge(x, h, w, 0.5, layout=5, window=tile)
    restored = unmerge(merge(x, plan), plan)
    assert plan.removed == h * w // 2 and restored.shape == x.shape
    merged_into = plan.slots.view(2, -1)[:, dst]  # a destination's slot holds only tokens of its own tile
    for b in range(2):
        for d, slot in zip(dst.tolist(), merged_into[b].tolist()):
            members = torch.nonzero(plan.slots.view(2, -1)[b] == slot).flatten()
            assert (tile_of(members) == tile_of(torch.tensor(d))).all()


def test_windowed_matching_merges_image_like_tokens_as_well_as_global_matching():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randn(2, 32, 8, 8, generator=g), size=(64, 64), mode="bicubic")
    x = (smooth + 0.1 * torch.randn(2, 32, 64, 64, generator=g)).flatten(2).transpose(1, 2).contiguous()

    def error(window: int) -> float:
        plan = plan_merge(x, 64, 64, 0.5, layout=3, window=window)
        return ((unmerge(merge(x, plan), plan) - x).norm() / x.norm()).item()
    assert error(16) < 1.01 * error(0)
    assert error(0) < 0.5 * ((x - x.roll(7, dims=1)).norm() / x.norm()).item()  # far better than a wrong match


@pytest.mark.parametrize("window", [0, 8])
@torch.no_grad()
def test_merged_unet_output_is_close_to_stock_with_bounded_error(window):
    unet = _fresh("sd15")
    sample, t, text = _sd15_inputs()
    stock = unet(sample, t, text).sample
    errors = {}
    for ratio in (0.1, 0.5):
        handle = apply_merging(unet, ratio, min_tokens=0, window=window)
        out = unet(sample, t, text).sample
        errors[ratio] = ((out - stock).norm() / stock.norm()).item()
        # finest level of SD1.5 only (tomesd's max_downsample=1): down_blocks.0 and the last up block
        assert handle.blocks == ["down_blocks.0.attentions.0.transformer_blocks.0",
                                 "up_blocks.2.attentions.0.transformer_blocks.0",
                                 "up_blocks.2.attentions.1.transformer_blocks.0"]
        assert handle.stats.tokens_merged_last_call == 3 * 2 * int(SIZE * SIZE * ratio)
    assert 0 < errors[0.1] < 0.05 and errors[0.1] < errors[0.5] < 0.2


@torch.no_grad()
def test_max_downsample_two_adds_the_next_level():
    unet = _fresh("sd15")
    handle = apply_merging(unet, 0.5, max_downsample=2, min_tokens=0)
    assert sorted({name.split(".attentions")[0] for name in handle.blocks}) == \
        ["down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2"]
    sample, t, text = _sd15_inputs()
    unet(sample, t, text)
    assert handle.stats.tokens_merged_last_call == 2 * 3 * (int(SIZE * SIZE * 0.5) + int(SIZE * SIZE // 4 * 0.5))


@torch.no_grad()
def test_second_level_merges_only_once_its_own_grid_reaches_min_tokens():
    """SD1.5's served setting (max_downsample 2): the second level (a quarter of the finest grid's tokens) merges
    at 2048 px and stays stock at 1024 px and below, where its grid is under ``min_tokens``."""
    sample, t, text = _sd15_inputs()
    finest, second = SIZE * SIZE, SIZE * SIZE // 4
    merged = {}
    for min_tokens in (second, second + 1):
        unet = _fresh("sd15")
        handle = apply_merging(unet, 0.5, max_downsample=2, min_tokens=min_tokens, share_plan=True)
        unet(sample, t, text)
        merged[min_tokens] = handle.stats.tokens_merged_last_call
    assert merged[second + 1] == 2 * 3 * int(finest * 0.5)
    assert merged[second] == 2 * 3 * (int(finest * 0.5) + int(second * 0.5))


@torch.no_grad()
def test_small_token_counts_take_the_stock_path():
    unet = _fresh("sd15")
    sample, t, text = _sd15_inputs()
    stock = unet(sample, t, text).sample
    handle = apply_merging(unet, 0.5, min_tokens=SIZE * SIZE + 1)
    assert len(handle.blocks) == 3
    assert torch.equal(unet(sample, t, text).sample, stock)
    assert handle.stats.tokens_merged == 0


@torch.no_grad()
def test_remove_merging_restores_the_stock_forward():
    unet = _fresh("sd15")
    sample, t, text = _sd15_inputs()
    stock = unet(sample, t, text).sample
    apply_merging(unet, 0.5, min_tokens=0, merge_crossattn=True, merge_mlp=True)
    apply_merging(unet, 0.3, min_tokens=0)  # re-applying replaces, never stacks
    assert sum(_hooked(m) for m in unet.modules()) == 1 + 3 + 3  # UNet, 3 transformers, 3 attn1
    assert not torch.equal(unet(sample, t, text).sample, stock)
    remove_merging(unet)
    assert not any(_hooked(m) for m in unet.modules())
    assert torch.equal(unet(sample, t, text).sample, stock)


@torch.no_grad()
def test_crossattn_and_mlp_merging_run_on_merged_tokens():
    unet = _fresh("sd15")
    seen = {}
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    for name in ("attn1", "attn2", "ff"):
        getattr(block, name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].shape[1], out.shape[1])))
    sample, t, text = _sd15_inputs()
    handle = apply_merging(unet, 0.5, min_tokens=0, merge_mlp=True)
    unet(sample, t, text)
    # hooks registered before ours see the merged input; outputs are unmerged by our hook afterwards
    assert seen["attn1"][0] == seen["ff"][0] == SIZE * SIZE // 2 and seen["attn2"][0] == SIZE * SIZE
    handle.remove()


@torch.no_grad()
def test_sdxl_merges_its_finest_attention_level_by_default():
    unet = _fresh("sdxl")
    levels = {name: factor for name, _, factor in spatial_transformers(unet)}
    assert min(levels.values()) == 2  # SDXL has no attention at full resolution
    assert apply_merging(unet, 0.5, max_downsample=1, min_tokens=0).blocks == []  # tomesd's default: nothing
    stock = _sdxl_call(unet)
    remove_merging(unet)
    handle = apply_merging(unet, 0.5, min_tokens=0)
    assert handle.blocks == ["down_blocks.1.attentions.0.transformer_blocks.0",
                             "down_blocks.1.attentions.0.transformer_blocks.1",
                             "up_blocks.1.attentions.0.transformer_blocks.0",
                             "up_blocks.1.attentions.0.transformer_blocks.1",
                             "up_blocks.1.attentions.1.transformer_blocks.0",
                             "up_blocks.1.attentions.1.transformer_blocks.1"]
    out = _sdxl_call(unet)
    assert handle.stats.tokens_merged_last_call == 6 * 2 * int(SIZE * SIZE // 4 * 0.5)
    assert 0 < ((out - stock).norm() / stock.norm()).item() < 0.2


@torch.no_grad()
def test_video_merges_only_spatial_blocks_with_frames_in_the_batch():
    unet = _fresh("motion")
    handle = apply_merging(unet, 0.5, min_tokens=0)
    assert handle.blocks and all(".attentions." in name and "motion_modules" not in name for name in handle.blocks)
    assert not any(_hooked(m) for name, m in unet.named_modules() if "motion_modules" in name)
    temporal_inputs = []
    unet.down_blocks[0].motion_modules[0].transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, args: temporal_inputs.append(tuple(args[0].shape)))
    frames, size = 4, SIZE
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, frames, size, size, generator=g)
    text = torch.randn(frames, 5, 16, generator=g)  # AnimateDiffPipeline repeats the prompt per frame
    out = unet(sample, torch.tensor(500), text).sample
    assert out.shape == sample.shape
    assert handle.stats.tokens_merged_last_call == len(handle.blocks) * frames * int(size * size * 0.5)
    assert temporal_inputs == [(size * size, frames, 16)]  # temporal attention saw every token of every frame
    remove_merging(unet)
    assert not any(_hooked(m) for name, m in unet.named_modules() if "motion_modules" not in name)


@pytest.mark.parametrize("window", [0, 8])
def test_planning_and_merging_trace_as_one_graph(window):
    """No data-dependent Python control flow or host sync: dynamo traces plan+merge+unmerge without a break,
    which is what capturing the merged UNet in a CUDA graph needs."""
    x = torch.randn(2, 16 * 16, 8, generator=torch.Generator().manual_seed(0))

    def merged_double(x, layout):
        plan = plan_merge(x, 16, 16, 0.5, layout=layout, window=window, chunk_elements=2 * 64 * 50)
        return unmerge(merge(x, plan) * 2, plan)
    expected = merged_double(x, torch.tensor([7]))
    traced = torch.compile(merged_double, backend="eager", fullgraph=True)
    assert torch.equal(traced(x, torch.tensor([7])), expected)


def test_image_tab_merges_where_it_pays_for_the_model_and_backend():
    from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS, EAGER_CUDA_MIN_TOKENS, merge_settings

    assert merge_settings("sd15", "graph", "cuda") == {"max_downsample": 2, "min_tokens": DEFAULT_MIN_TOKENS,
                                                       "share_plan": True}
    assert merge_settings("sd15", "eager", "cuda")["min_tokens"] == EAGER_CUDA_MIN_TOKENS > DEFAULT_MIN_TOKENS
    assert merge_settings("sdxl", "off", "cuda")["min_tokens"] == EAGER_CUDA_MIN_TOKENS
    assert merge_settings("sd15", "eager", "cpu")["min_tokens"] == DEFAULT_MIN_TOKENS
    assert merge_settings("sdxl", "graph", "cuda") == {"max_downsample": 4, "min_tokens": 4096, "share_plan": True}


@torch.no_grad()
@pytest.mark.parametrize("share", [False, True])
def test_shared_plans_come_from_each_transformers_first_block(share):
    unet = _fresh("sdxl")
    handle = apply_merging(unet, 0.5, min_tokens=0, share_plan=share)
    _sdxl_call(unet)
    pairs = [handle.mergers[i:i + 2] for i in range(0, len(handle.mergers), 2)]  # depth-2 transformers
    assert len(pairs) == 3 and all(second.name.endswith(".1") for _, second in pairs)
    assert all((second.plan is first.plan) == share and second.plan is not None for first, second in pairs)
    assert handle.stats.blocks_merged_last_call == 6  # every block still merges
