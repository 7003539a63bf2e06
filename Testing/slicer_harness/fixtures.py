"""pytest fixtures: one Slicer session per tag of ../shared/slicer-python (skipped when it is absent).

Import them into a test module (``from slicer_harness.fixtures import slicer_session, slicer_app``).
"""

from __future__ import annotations

import os

import pytest

from . import LAYER_ROOT, SlicerHarness, available_tags

TAGS = available_tags()
_PARAMS = TAGS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"Slicer's Python layer is absent ({LAYER_ROOT} has no <tag>/Base/Python/slicer/util.py); "
           "CI has it at ../shared/slicer-python, or set LCTFOUND_SLICER_PYTHON"))]


@pytest.fixture(scope="module", params=_PARAMS)
def slicer_session(request, tmp_path_factory):
    """A Slicer of one tag with a private LCTfound cache (models trained here stay here)."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'lctfound[mrml]')")
    tag = request.param
    cache = tmp_path_factory.mktemp(f"cache-{tag}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCTFOUND_CACHE_DIR", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        harness = SlicerHarness(tag).install()
        try:
            yield harness
        finally:
            harness.uninstall()


@pytest.fixture
def slicer_app(slicer_session):
    """The session for one test: no exception may escape into PythonQt's slot handling unseen,
    and the scene is closed afterwards (File / Close scene)."""
    slicer_session.takeSlotErrors()
    yield slicer_session
    errors = slicer_session.takeSlotErrors()
    slicer_session.scene.Clear(0)
    assert not errors, "exceptions in slots (a real Slicer prints them to the Python console):\n" + "\n".join(
        text for _, text in errors)


@pytest.fixture
def slicer_flow(slicer_session):
    """Like `slicer_app`, but the scene stays: the tests of a flow build on each other in file order."""
    slicer_session.takeSlotErrors()
    yield slicer_session
    errors = slicer_session.takeSlotErrors()
    assert not errors, "exceptions in slots (a real Slicer prints them to the Python console):\n" + "\n".join(
        text for _, text in errors)


def volume_from_array(array, name="CT", spacing=(0.8, 0.8, 2.5), origin=(-12.0, -12.0, 100.0)):
    """Add a scalar volume to the application scene like File / Add Data would (real MRML)."""
    import numpy as np
    import slicer

    ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS files → RAS
    ijk_to_ras[:3, 3] = origin
    node = slicer.util.addVolumeFromArray(np.asarray(array), ijkToRAS=ijk_to_ras, name=name)
    node.CreateDefaultDisplayNodes()
    return node


__all__ = ["slicer_session", "slicer_app", "slicer_flow", "volume_from_array", "TAGS", "os"]
