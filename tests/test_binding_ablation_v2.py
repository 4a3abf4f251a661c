"""The binding ablation's variants (control_ablation_v2's, run by binding_ablation_v2) reach the served request path
and leave the served defaults as they were."""
from __future__ import annotations

import importlib

from pipelines.diffusion.binding import BindingConfig
from pipelines.diffusion.controls import ControlPlan
from pipelines.tabs.image import ImageRequest


def test_binding_variant_reaches_the_plan_and_the_defaults_come_back():
    ablation = importlib.import_module("benchmarks.control_ablation_v2")
    request = ImageRequest(prompt="a [red circle]", binding=True, ets_step=4)
    with ablation.config_variant("binding", {"token_refinement_steps": 0, "cap_composite_norm": False}):
        inside = ControlPlan.from_request(request).binding
    after = ControlPlan.from_request(request).binding
    assert inside.token_refinement_steps == 0 and not inside.cap_composite_norm
    assert inside.ets_step == 4  # the request's own field still applies on top of the variant
    assert after == BindingConfig(ets_step=4) and after.token_refinement_steps == 3
    assert BindingConfig().token_refinement_steps == 3 and BindingConfig().cap_composite_norm


def test_every_variant_names_real_config_fields():
    ablation = importlib.import_module("benchmarks.control_ablation_v2")
    fields = set(BindingConfig.__dataclass_fields__)
    assert list(ablation.VARIANTS["binding"])[0] == "served" and ablation.VARIANTS["binding"]["served"] == {}
    assert all(set(overrides) <= fields for overrides in ablation.VARIANTS["binding"].values())


def test_request_field_variants_reach_the_served_request(monkeypatch):
    """``ets0`` must travel in the request: the plan takes ``ets_step`` from it over any config override."""
    ablation = importlib.import_module("benchmarks.control_ablation_v2")
    seen = []

    def serve(pipeline, request):
        seen.append(request)
        return [], [], {}

    monkeypatch.setattr(ablation.effect, "serve", serve)
    args = ablation.parse(["--json", "unused.json", "--device", "cpu"], "binding")
    jobs = ablation.effect.plan("binding", 2, 2, "")
    ablation.render(None, jobs, args, ablation.VARIANTS["binding"]["ets0"], baseline=False, control="binding")
    ablation.render(None, jobs, args, ablation.VARIANTS["binding"]["served"], baseline=False, control="binding")
    assert [ControlPlan.from_request(r).binding.ets_step for r in seen] == [0] * len(jobs) + [-1] * len(jobs)
