"""Which part of ToMe semantic binding costs micro-world v2 its objects: control_effect_v2's binding units rendered
through the served path (``ImagePipeline.generate``) with ``BindingConfig`` variants, each scored by the v2 scorer
against the same controls-off baseline. The harness is control_ablation_v2's (``--control binding``); this script
keeps its name and command line. The served defaults are untouched: a variant replaces the config the request's
``ControlPlan`` builds, for this process only.

The first variant renders the A/B pair (baseline and binding); the others render binding only, paired with that
baseline (same prompt, seed and request, so the same initial noise). ``--variants ets0`` alone costs two renders a
unit instead of three, where the served variant's figures are already on record.

    # CPU, 16 units (2 prompts x 8 seeds), every variant (~12 min on 2 cores)
    python benchmarks/binding_ablation_v2.py --units 16 --device cpu --json /tmp/binding_ablation.json \
        --sheet /tmp/binding_ablation.png --images /tmp/binding_ablation
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import control_ablation_v2 as ablation  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return ablation.main(argv, "binding")


if __name__ == "__main__":
    main()
