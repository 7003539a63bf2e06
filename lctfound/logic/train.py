"""Qt-free logic of the LCTfoundTrain module: train a task head from annotated cases.

The new model gets its own name (a folder name in the user's model directory), so training
never overwrites an installed model. The training loop plugs into `process()` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ModuleLogicBase, ModuleParameters, is_valid_model_name


@dataclass
class TrainParameters(ModuleParameters):
    """``input_segmentation``: the labels to learn from (segments of a segmentation node, or a
    label file); ``model_name``: the backbone; ``new_model_name``: the name to save under."""

    input_segmentation: Any = None
    new_model_name: str = ""


def _segment_count(segmentation: Any):
    """Number of segments of a segmentation node (duck-typed), or None when unknown."""
    try:
        return int(segmentation.GetSegmentation().GetNumberOfSegments())
    except (AttributeError, TypeError, ValueError):
        return None


class TrainModuleLogic(ModuleLogicBase):
    task_name = "training"
    parameters_class = TrainParameters

    def suggest_model_name(self, base_name: str = "") -> str:
        """A valid name for the trained model that no installed model uses yet."""
        base = (base_name or self.default_model_name() or "lctfound") + "-finetuned"
        base = "".join(char if char.isalnum() or char in "._-" else "-" for char in base).lstrip("._-")
        taken = {entry.name for entry in self.models()}
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base}-{number}"
        return name

    def default_values(self, parameters: Any) -> dict[str, Any]:
        parameters = self.parameters_from(parameters)
        defaults = super().default_values(parameters)
        if not parameters.new_model_name:
            defaults["new_model_name"] = self.suggest_model_name(defaults.get("model_name", parameters.model_name))
        return defaults

    def check_new_model_name(self, name: str) -> str:
        name = (name or "").strip()
        if not name:
            return "Enter a name for the new model."
        if not is_valid_model_name(name):
            return (
                f"Model name '{name}' may only contain letters, digits, '.', '_' and '-' "
                "and must start with a letter or digit."
            )
        if any(entry.name == name for entry in self.models()):
            return f"A model named '{name}' already exists; choose another name."
        return ""

    def parameter_problems(self, parameters: Any) -> list[str]:
        parameters = self.parameters_from(parameters)
        problems = super().parameter_problems(parameters)
        if parameters.input_segmentation is None:
            problems.append("Select a segmentation with the training labels.")
        elif _segment_count(parameters.input_segmentation) == 0:
            problems.append("The training segmentation has no segments.")
        problem = self.check_new_model_name(parameters.new_model_name)
        if problem:
            problems.append(problem)
        return problems
