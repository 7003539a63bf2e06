"""Installing the Python packages the LCTfound jobs need, inside Slicer, on first use.

`ensureDependencies()` runs before every job starts (`LCTfoundModuleLogic` hands it to its engine as
``before_job``). When something is missing it asks ONCE, listing exactly what will be installed and
the download size; then torch comes through the PyTorch extension (the build that fits the GPU) and
the pinned set through ``slicer.util.pip_install`` with a constraints file that keeps Slicer's own
numpy, scipy, ... and the installed torch. A busy progress dialog stays up meanwhile (pip's output
goes to the Python console). If the user declines, the platform cannot run the set, or something is
still missing afterwards, it raises `DependenciesMissing` and no job is started.

What is missing and the exact pip arguments come from the Qt-free `lctfound.logic.dependencies`.
"""

import importlib
import logging

import slicer
from slicer.i18n import tr as _

from lctfound.errors import LCTfoundError
from lctfound.logic import dependencies


class DependenciesMissing(LCTfoundError):
    """A Python package a job needs is missing and was not installed; no job was started."""


def checkDependencies(server: bool = False) -> "dependencies.DependencyReport":
    """What is installed and what is missing (package metadata only; nothing is imported); ``server``:
    for jobs that run on a department server (the thin client only, no torch)."""
    importlib.invalidate_caches()  # see packages installed since the last check
    return dependencies.check(server=server)


def confirmationText(report: "dependencies.DependencyReport") -> str:
    """The one question asked before anything is installed."""
    lines = "\n".join("  - " + line for line in report.install_lines())
    size = _("Download: about {size} MB").format(size=report.download_mb) if report.to_install else ""
    if not report.torch_ok:
        size += (" " if size else "") + _("(plus PyTorch)")
    return _(
        "LCTfound needs Python packages that this Slicer does not have yet. Install them now?\n\n"
        "{lines}\n\n{size}\n\nSlicer's own packages (numpy, scipy, pydicom, ...) are kept as they are. "
        "This takes a few minutes; nothing is started until it is done."
    ).format(lines=lines, size=size)


def ensureDependencies(args=()) -> None:
    """Return when every package a job needs is installed; otherwise ask once and install, or raise
    `DependenciesMissing` (declined, impossible here, or the installation did not complete). A job
    with ``--server`` in ``args`` runs on a server: only the thin client's packages are needed."""
    report = checkDependencies(server="--server" in list(args))
    if report.complete:
        return
    if report.problem:
        raise DependenciesMissing(report.problem)
    if not slicer.util.confirmOkCancelDisplay(confirmationText(report),
                                              windowTitle=_("LCTfound: install Python packages")):
        raise DependenciesMissing(
            _("Nothing was started: these Python packages are needed and were not installed: {missing}. "
              "Start again to install them, or use \"Install missing packages\" under Dependencies.").format(
                missing=report.missing_text()))
    installDependencies(report)


def installDependencies(report: "dependencies.DependencyReport") -> None:
    """Install what ``report`` lacks (already confirmed by the user), with a progress dialog."""
    progress = slicer.util.createProgressDialog(
        windowTitle=_("LCTfound: installing Python packages"), labelText=_("Preparing..."), maximum=0)
    progress.setCancelButton(None)  # pip cannot be interrupted safely half-way
    try:
        if not report.torch_ok:
            progress.labelText = _("Installing PyTorch through the PyTorch extension...")
            slicer.app.processEvents()
            _installTorch()
            report = checkDependencies()  # the constraints must pin the torch now installed
        if report.to_install:
            progress.labelText = _("Installing {names} (details in the Python console)...").format(
                names=", ".join(package.name for package in report.to_install))
            slicer.app.processEvents()
            from lctfound.paths import cache_root

            constraints = dependencies.write_constraints(report.protected, cache_root() / "slicer")
            arguments = dependencies.pip_arguments(report.to_install, constraints)
            logging.info("LCTfound: pip install %s", " ".join(arguments))
            slicer.util.pip_install(arguments)
    except DependenciesMissing:
        raise
    except Exception as error:
        raise DependenciesMissing(
            _("Installing the Python packages failed ({error}); see the Python console. Nothing was started.").format(
                error=error)) from error
    finally:
        progress.close()
    final = checkDependencies(server=not report.needs_torch)
    if not final.complete:
        raise DependenciesMissing(_("Still missing after the installation: {missing}. Nothing was started.").format(
            missing=final.missing_text()))


def _installTorch() -> None:
    """torch through the PyTorch extension, which picks the build for this computer's GPU driver.
    The user has confirmed already (the one dialog lists PyTorch), so it does not ask again."""
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependenciesMissing(
            _("LCTfound needs the PyTorch extension: install \"PyTorch\" from the Extensions Manager, "
              "restart Slicer and start again. Nothing was started.")) from error
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
    if torch is None:
        raise DependenciesMissing(_("PyTorch was not installed. Nothing was started."))


def versionReport() -> str:
    """The "Check dependencies" text: versions, and what is missing."""
    report = checkDependencies()
    lines = report.version_lines()
    if report.problem:
        lines.insert(0, report.problem)
    elif report.complete:
        lines.insert(0, _("All Python packages LCTfound needs are installed."))
    else:
        lines.insert(0, _("Missing: {missing}. They are installed (after asking) when you start a job.").format(
            missing=report.missing_text()))
    return "\n".join(lines)
