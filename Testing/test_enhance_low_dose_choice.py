"""The Enhance panel logic offers the low-dose method (TV by default, no model needed; cold diffusion
needs a trained model) and defaults sparse view to TV."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("slicer")

from lctfound.logic.enhance import FIXED_CHOICES, EnhanceModuleLogic, EnhanceParameters  # noqa: E402


def test_low_dose_method_choice_and_commands(tmp_path):
    logic = EnhanceModuleLogic(runs_root=tmp_path)
    assert [c.value for c in logic.choices("denoiser")] == ["tv", "nlm", "cold-diffusion"]
    p = EnhanceParameters(task="low-dose")
    assert p.denoiser == "tv" and EnhanceParameters().reconstruction == "tv"
    assert "denoiser" in logic.visible_fields(p) and "task_model" not in logic.visible_fields(p)
    args = logic.command(p, Path("in.nrrd"), Path("out.nrrd"))
    assert args[:3] == ["enhance", "low-dose", "in.nrrd"] and "--model" not in args
    assert args[args.index("--method") + 1] == "tv"
    cold = EnhanceParameters(task="low-dose", denoiser="cold-diffusion")
    assert "task_model" in logic.visible_fields(cold)
    assert any("low-dose-enhancement model" in problem for problem in logic.parameter_problems(cold))
    assert "nlm" in {c.value for c in FIXED_CHOICES["denoiser"]}
