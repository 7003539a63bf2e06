"""The dependency installer of the Slicer modules, headless.

`lctfound.logic.dependencies` (Qt-free) is tested directly; ``LCTfoundSlicerLib/dependencies.py`` is
loaded from its file with small recording stand-ins for ``slicer.util`` (confirmation dialog, progress
dialog, pip_install) and the PyTorch extension, while `import_blocker.hidden_packages` makes installed
packages look absent as in a fresh Slicer. The engine's ``before_job`` hook is the one Slicer sets, so
these tests show what happens before any job starts.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from import_blocker import hidden_packages
from lctfound.errors import LCTfoundError
from lctfound.jobs import Job
from lctfound.logic import ModuleLogicBase
from lctfound.logic import dependencies as deps

REPO = Path(__file__).resolve().parents[1]
REAL_PLATFORM_PROBLEM = deps.platform_problem


# ---------------------------------------------------------------------------------------------
# Qt-free part
# ---------------------------------------------------------------------------------------------


def test_complete_environment_needs_nothing():
    """This test environment has the whole pinned set (the versions the suite runs with)."""
    report = deps.check(problem="")
    assert report.complete, report.missing_text()
    for package in deps.SLICER_REQUIREMENTS:
        assert report.versions[package.name] == package.pinned, f"{package.name}: the tests run another version than pinned"


def test_hidden_packages_are_missing_and_nothing_is_imported():
    with hidden_packages("diffusers", "psutil") as blocker:
        with pytest.raises(ModuleNotFoundError):
            import diffusers  # noqa: F401
        report = deps.check(problem="")
        assert [package.name for package in report.to_install] == ["diffusers", "psutil"]
        assert not report.complete and report.torch_ok
        assert report.missing_text() == "diffusers, psutil"
        assert report.download_mb == 42  # 6.4 + 0.1 + 35, rounded up
        assert report.install_lines() == ["diffusers 0.42.1 (the LCTfound diffusion model)",
                                          "psutil 7.2.2 (cancelling jobs)",
                                          f"and the packages these need (about {deps.SUPPORT_PACKAGES_MB} MB)"]
        blocker.unhide("psutil")
        assert [package.name for package in deps.check(problem="").to_install] == ["diffusers"]
    assert "diffusers" not in {p.name for p in deps.check(problem="").to_install}


def test_old_versions_are_replaced_newer_ones_kept():
    versions = {package.name: package.pinned for package in deps.SLICER_REQUIREMENTS}
    versions.update({"torch": "2.9.1+cu128", "monai": "1.3.2", "diffusers": "0.50.0", "numpy": "2.0.2"})
    report = deps.check(version_of=versions.get, problem="")
    assert [package.name for package in report.to_install] == ["monai"]
    assert report.torch_ok
    assert "replacing 1.3.2" in report.install_lines()[0]
    assert not deps.check(version_of={**versions, "torch": "2.7.1"}.get, problem="").torch_ok


def test_version_comparison():
    assert deps.at_least("2.8.0+cu128", "2.8") and deps.at_least("2.10.0", "2.8") and not deps.at_least("2.7.9", "2.8")
    assert deps.at_least("1.4", "1.4.0") and not deps.at_least("0.9.1", "0.30")


def test_constraints_pin_the_running_bundled_packages():
    protected = {"numpy": "2.0.2", "scipy": "1.13.1", "torch": "2.9.1+cu128", "pydicom": "2.4.4"}
    text = deps.constraints_text(protected)
    assert text.splitlines()[1:] == ["numpy==2.0.2", "pydicom==2.4.4", "scipy==1.13.1", "torch==2.9.1+cu128"]
    report = deps.check(problem="")
    import numpy
    import scipy
    assert report.protected["numpy"] == numpy.__version__ and report.protected["scipy"] == scipy.__version__
    assert set(report.protected) <= set(deps.PROTECTED_PACKAGES)


def test_pip_arguments_are_exact(tmp_path):
    path = deps.write_constraints({"numpy": "2.0.2"}, tmp_path / "c")
    assert path.read_text(encoding="utf-8").splitlines()[1:] == ["numpy==2.0.2"]
    packages = [p for p in deps.SLICER_REQUIREMENTS if p.name in ("monai", "psutil")]
    assert deps.pip_arguments(packages, path) == ["--only-binary", ":all:", "--constraint", str(path),
                                                  "monai==1.6.1", "psutil==7.2.2"]


@pytest.mark.parametrize("python, system, machine, expected", [
    ((3, 9), "win32", "AMD64", "Slicer 5.10 or later"),
    ((3, 12), "darwin", "x86_64", "Intel Macs"),
    ((3, 12), "darwin", "arm64", ""),
    ((3, 12), "win32", "AMD64", ""),
    ((3, 13), "linux", "x86_64", ""),
])
def test_platform_problems(python, system, machine, expected):
    problem = deps.platform_problem(python, system, machine)
    assert (expected in problem) if expected else problem == ""


def test_requirement_set_matches_pyproject():
    """Every pinned package is a declared dependency, at or above the declared floor."""
    import re
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    floors = {re.sub(r"[-_]", "-", m.group(1)).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([^",;]+)', block)}
    for package in deps.SLICER_REQUIREMENTS:
        key = package.name.replace("_", "-").lower()
        assert key in floors, f"{package.name} is installed in Slicer but not declared in pyproject.toml"
        assert deps.at_least(package.pinned, floors[key]) and package.minimum == floors[key], package.name


# ---------------------------------------------------------------------------------------------
# Slicer part, with recording stand-ins for slicer.util and the PyTorch extension
# ---------------------------------------------------------------------------------------------


class FakeSlicer:
    """Records what ``LCTfoundSlicerLib/dependencies.py`` asks of Slicer."""

    def __init__(self, confirm: bool, on_pip=None, torch_installer=None):
        self.calls: list[tuple] = []
        self.confirm, self.on_pip = confirm, on_pip
        self.progress_closed = False
        slicer = types.ModuleType("slicer")
        util = types.ModuleType("slicer.util")
        util.confirmOkCancelDisplay = self._confirm
        util.createProgressDialog = self._progress
        util.pip_install = self._pip
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        slicer.util, slicer.i18n = util, i18n
        slicer.app = types.SimpleNamespace(processEvents=lambda: None)
        self.modules = {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n}
        if torch_installer is not None:
            pytorch = types.ModuleType("PyTorchUtils")
            fake = self

            class PyTorchUtilsLogic:
                def installTorch(self, **kwargs):
                    fake.calls.append(("installTorch", kwargs))
                    return torch_installer(**kwargs)

            pytorch.PyTorchUtilsLogic = PyTorchUtilsLogic
            self.modules["PyTorchUtils"] = pytorch

    def _confirm(self, text, windowTitle=None, **kwargs):
        self.calls.append(("confirm", text))
        return self.confirm

    def _progress(self, **kwargs):
        self.calls.append(("progress", kwargs.get("windowTitle")))
        fake = self

        class Dialog:
            labelText = ""

            def setCancelButton(self, button):
                pass

            def close(self):
                fake.progress_closed = True

        return Dialog()

    def _pip(self, arguments):
        constraints = Path(arguments[arguments.index("--constraint") + 1]).read_text(encoding="utf-8")
        self.calls.append(("pip_install", list(arguments), constraints))
        if self.on_pip:
            self.on_pip(arguments)

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def slicer_side(monkeypatch, tmp_path):
    """``make(confirm=..., ...)`` -> (the Slicer dependencies module, its FakeSlicer, the list of started jobs)."""
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(deps, "platform_problem", lambda *args: "")
    started = []
    monkeypatch.setattr(Job, "start", classmethod(lambda cls, args, **kwargs: started.append(list(args)) or object()))

    def make(**kwargs):
        fake = FakeSlicer(**kwargs)
        for name, module in fake.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        if "PyTorchUtils" not in fake.modules:
            monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
        spec = importlib.util.spec_from_file_location("lctfound_test_slicer_dependencies",
                                                      REPO / "LCTfoundSlicerLib" / "dependencies.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, fake, started

    return make


def engine_with(module) -> ModuleLogicBase:
    """An engine wired the way LCTfoundModuleLogic wires it in Slicer."""
    engine = ModuleLogicBase()
    engine.before_job = module.ensureDependencies
    return engine


def test_declining_starts_nothing(slicer_side):
    module, fake, started = slicer_side(confirm=False)
    with hidden_packages("diffusers", "psutil"):
        with pytest.raises(LCTfoundError) as raised:
            engine_with(module).start_job(["segment", "x"])
    assert started == []
    assert fake.kinds() == ["confirm"]
    text = fake.calls[0][1]
    assert "diffusers 0.42.1" in text and "psutil 7.2.2" in text and "Download: about 42 MB" in text
    assert "Nothing was started" in str(raised.value) and "diffusers, psutil" in str(raised.value)


def test_accepting_installs_the_exact_set_then_starts_the_job(slicer_side):
    with hidden_packages("diffusers", "psutil", "monai") as blocker:
        module, fake, started = slicer_side(
            confirm=True, on_pip=lambda arguments: [blocker.unhide(a.split("==")[0]) for a in arguments if "==" in a])
        engine = engine_with(module)
        engine.start_job(["segment", "x"])
        assert started == [["segment", "x"]]
        assert fake.kinds() == ["confirm", "progress", "pip_install"] and fake.progress_closed
        _, arguments, constraints = fake.calls[2]
        assert arguments[:4] == ["--only-binary", ":all:", "--constraint", arguments[3]]
        assert arguments[4:] == ["diffusers==0.42.1", "monai==1.6.1", "psutil==7.2.2"]
        for name in ("numpy", "scipy", "torch", "pydicom", "pillow", "requests"):
            assert f"{name}=={deps.installed_version(name)}" in constraints.splitlines(), name
        # Complete now: the next job (another module's engine) starts without asking again.
        engine_with(module).start_job(["segment", "y"])
        assert fake.kinds() == ["confirm", "progress", "pip_install"] and len(started) == 2


def test_a_server_job_installs_only_the_thin_client(slicer_side):
    """Run on a server: torch and the model packages are not needed here, only httpx and zstandard."""
    with hidden_packages("torch", "diffusers", "httpx", "zstandard") as blocker:
        module, fake, started = slicer_side(
            confirm=True, on_pip=lambda arguments: [blocker.unhide(a.split("==")[0]) for a in arguments if "==" in a])
        engine_with(module).start_job(["segment", "train", "--server", "http://gpu:8765"])
        assert fake.kinds() == ["confirm", "progress", "pip_install"]
        text = fake.calls[0][1]
        assert "httpx 0.29.0" in text and "zstandard 0.25.0" in text
        assert "diffusers" not in text and "PyTorch" not in text
        assert fake.calls[2][1][4:] == ["httpx==0.29.0", "zstandard==0.25.0"]
        assert started == [["segment", "train", "--server", "http://gpu:8765"]]
        # A local job still needs the whole set (torch and diffusers are still missing): asked again.
        fake.confirm = False
        with pytest.raises(LCTfoundError):
            engine_with(module).start_job(["segment", "train"])
        assert "PyTorch" in fake.calls[-1][1] and "diffusers" in fake.calls[-1][1]


def test_failed_installation_starts_nothing(slicer_side):
    def fail(arguments):
        raise RuntimeError("pip exited with code 1")

    module, fake, started = slicer_side(confirm=True, on_pip=fail)
    with hidden_packages("accelerate"):
        with pytest.raises(LCTfoundError, match="Installing the Python packages failed"):
            engine_with(module).start_job(["train"])
    assert started == [] and fake.progress_closed


def test_pip_that_installs_nothing_starts_nothing(slicer_side):
    module, fake, started = slicer_side(confirm=True)
    with hidden_packages("safetensors"):
        with pytest.raises(LCTfoundError, match="Still missing after the installation: safetensors"):
            engine_with(module).start_job(["train"])
    assert started == []


def test_torch_comes_from_the_pytorch_extension(slicer_side):
    with hidden_packages("torch", "tqdm") as blocker:
        def install_torch(**kwargs):
            blocker.unhide("torch")
            return object()

        module, fake, started = slicer_side(
            confirm=True, torch_installer=install_torch,
            on_pip=lambda arguments: blocker.unhide("tqdm"))
        engine_with(module).start_job(["train"])
    assert fake.kinds() == ["confirm", "progress", "installTorch", "pip_install"]
    assert "PyTorch >=2.8 through the PyTorch extension" in fake.calls[0][1]
    assert fake.calls[2][1] == {"askConfirmation": False, "torchVersionRequirement": ">=2.8"}
    assert fake.calls[3][1][4:] == ["tqdm==4.70.1"]
    assert started == [["train"]]


def test_missing_pytorch_extension_is_explained(slicer_side):
    module, fake, started = slicer_side(confirm=True)  # no PyTorchUtils
    with hidden_packages("torch"):
        with pytest.raises(LCTfoundError, match='install "PyTorch" from the Extensions Manager'):
            engine_with(module).start_job(["train"])
    assert "pip_install" not in fake.kinds() and started == []


def test_unsupported_slicer_is_explained_without_asking(slicer_side, monkeypatch):
    module, fake, started = slicer_side(confirm=True)
    message = REAL_PLATFORM_PROBLEM((3, 9), "win32", "AMD64")
    monkeypatch.setattr(deps, "platform_problem", lambda *args: message)
    with hidden_packages("diffusers"):
        with pytest.raises(LCTfoundError, match="needs 3D Slicer 5.10 or later"):
            engine_with(module).start_job(["train"])
    assert fake.kinds() == [] and started == []


def test_check_dependencies_reports_versions(slicer_side):
    module, fake, started = slicer_side(confirm=True)
    text = module.versionReport()
    assert text.splitlines()[0] == "All Python packages LCTfound needs are installed."
    assert "diffusers: 0.42.1" in text and "psutil: 7.2.2" in text and "numpy: " in text
    with hidden_packages("psutil"):
        text = module.versionReport()
    assert text.splitlines()[0].startswith("Missing: psutil.") and "psutil: not installed" in text
    assert fake.kinds() == []


def test_web_and_command_line_engines_do_not_check(monkeypatch):
    started = []
    monkeypatch.setattr(Job, "start", classmethod(lambda cls, args, **kwargs: started.append(list(args)) or object()))
    with hidden_packages("diffusers"):
        ModuleLogicBase().start_job(["segment"])
    assert started == [["segment"]]
