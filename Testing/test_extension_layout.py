"""Static checks of the Slicer extension layout: files, CMake lists, .ui files, metadata, layering.

Nothing here imports Slicer or Qt: CMake files are tokenised, module files parsed with `ast`,
.ui files read as XML. Each failure message says which file to fix and how.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lctfound"
MODULES = ("LCTfoundSegmentation", "LCTfoundEnhance", "LCTfoundTrain", "LCTfoundCTFM")
#: The Slicer-side package shared by the modules (bases of their Module/Widget/Logic/Test classes).
LIBRARY = "LCTfoundSlicerLib"
LIBRARY_DIR = REPO / LIBRARY
EXTENSION = "LCTfound"
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"
CATALOG_KEYS = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
    "build_subdirectory", "enabled", "tier",
}
CHOICE_PROPERTY = "LCTfoundChoiceParameterName"
NODE_LIST_PROPERTY = "LCTfoundNodeListParameterName"
#: The Qt-free logic class behind each module (fills its CHOICE_PROPERTY selectors).
MODULE_LOGICS = {"LCTfoundSegmentation": "SegmentationModuleLogic", "LCTfoundEnhance": "EnhanceModuleLogic",
                 "LCTfoundTrain": "TrainModuleLogic", "LCTfoundCTFM": "CTFMLogic"}
#: Widgets each panel must have. "A button either works or does not exist": the image modules have no
#: Apply button until their task exists; the training panel starts, cancels and resumes real jobs.
#: "Run on" (this computer or a server) is in every panel: the shared widget base wires these rows.
COMMON_WIDGETS = {"deviceSelector": "QComboBox", "statusLabel": "QLabel", "serverUrlLineEdit": "QLineEdit",
                  "serverTokenFileLineEdit": "QLineEdit", "testConnectionButton": "QPushButton",
                  "connectionLabel": "QLabel"}
MODULE_WIDGETS = {
    "LCTfoundSegmentation": {"inputVolumeSelector": "qMRMLNodeComboBox", "modelSelector": "QComboBox",
                             "trainButton": "QPushButton", "predictButton": "QPushButton", "cancelButton": "QPushButton",
                             "undoButton": "QPushButton", "markReviewedButton": "QPushButton",
                             "unmarkReviewedButton": "QPushButton", "progressBar": "QProgressBar"},
    "LCTfoundEnhance": {"inputVolumeSelector": "qMRMLNodeComboBox", "modelSelector": "QComboBox",
                        "startButton": "QPushButton", "cancelButton": "QPushButton", "progressBar": "QProgressBar",
                        "comparisonSlider": "QSlider"},
    "LCTfoundTrain": {"startButton": "QPushButton", "cancelButton": "QPushButton", "resumeButton": "QPushButton",
                      "progressBar": "QProgressBar", "lossCurveLabel": "QLabel"},
    "LCTfoundCTFM": {"inputVolumeSelector": "qMRMLNodeComboBox", "modelSelector": "QComboBox",
                     "buildIndexButton": "QPushButton", "searchButton": "QPushButton", "loadMatchButton": "QPushButton",
                     "classifyButton": "QPushButton", "segmentButton": "QPushButton", "trainButton": "QPushButton",
                     "cancelButton": "QPushButton", "progressBar": "QProgressBar", "resultsTableView": "qMRMLTableView",
                     "capabilitiesList": "QListWidget"},
}
IGNORED_NAMES = {"__pycache__", ".DS_Store"}


# ---------------------------------------------------------------------------------------------
# Helpers: CMake, files, ast, PNG
# ---------------------------------------------------------------------------------------------


def _strip_cmake_comments(text: str) -> str:
    out, in_quote, index = [], False, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and in_quote:
            out.append(text[index : index + 2])
            index += 2
            continue
        if char == '"':
            in_quote = not in_quote
        elif char == "#" and not in_quote:
            while index < len(text) and text[index] != "\n":
                index += 1
            continue
        out.append(char)
        index += 1
    return "".join(out)


_COMMAND = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()\"]|\"(?:[^\"\\]|\\.)*\")*)\)", re.S)
_ARGUMENT = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|([^\s\"]+)")


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``[(command_name_lowercase, [arguments])]`` of a CMake file (quotes removed)."""
    text = _strip_cmake_comments(path.read_text(encoding="utf-8"))
    commands = []
    for match in _COMMAND.finditer(text):
        arguments = [
            argument.group(1) if argument.group(1) is not None else argument.group(2)
            for argument in _ARGUMENT.finditer(match.group(2))
        ]
        commands.append((match.group(1).lower(), arguments))
    return commands


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """Values of ``set(VAR ...)`` with ``${VAR}`` references to earlier sets expanded."""
    variables: dict[str, list[str]] = {}

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)

    for name, arguments in cmake_commands(path):
        if name == "set" and arguments:
            variables[arguments[0]] = [expand(value) for value in arguments[1:]]
    return variables


def cmake_scalar(variables: dict[str, list[str]], name: str) -> str:
    return " ".join(variables.get(name, []))


def files_under(folder: Path) -> list[Path]:
    """Every regular file below ``folder``, without caches, compiled files and hidden files."""
    result = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part in IGNORED_NAMES or part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix not in (".pyc", ".pyo"):
            result.append(path)
    return result


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def parse_module(module: str) -> ast.Module:
    path = REPO / module / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def classes_of(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def base_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.add(base.id)
        elif isinstance(base, ast.Attribute):
            names.add(base.attr)
    return names


def library_files() -> list[Path]:
    return [path for path in files_under(LIBRARY_DIR) if path.suffix == ".py"]


def library_classes() -> dict[str, tuple[ast.ClassDef, Path]]:
    """``{class name: (class, file)}`` of every top-level class of the shared library."""
    classes: dict[str, tuple[ast.ClassDef, Path]] = {}
    for path in library_files():
        for name, node in classes_of(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))).items():
            assert name not in classes, f"{LIBRARY}: class {name} is defined twice"
            classes[name] = (node, path)
    return classes


def library_imports(tree: ast.Module) -> set[str]:
    """Names a module file imports from the shared library."""
    return {
        alias.asname or alias.name
        for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0
        and node.module and node.module.split(".")[0] == LIBRARY
        for alias in node.names
    }


def class_chain(module: str, name: str) -> list[tuple[ast.ClassDef, Path]]:
    """The class ``name`` of a module file followed by its ancestors defined in that file or, when the
    file imports them from there, in the shared library (nearest first; Slicer's own bases are not
    followed)."""
    tree = parse_module(module)
    local, imported, library = classes_of(tree), library_imports(tree), library_classes()
    chain, pending = [], [(local[name], REPO / module / f"{module}.py")]
    while pending:
        node, path = pending.pop(0)
        if any(node is seen for seen, _ in chain):
            continue
        chain.append((node, path))
        for base in base_names(node):
            if path.parent != LIBRARY_DIR and base in local:
                pending.append((local[base], path))
            elif (path.parent == LIBRARY_DIR or base in imported) and base in library:
                pending.append(library[base])
    return chain


def chain_bases(chain: list[tuple[ast.ClassDef, Path]]) -> set[str]:
    return set().union(*(base_names(node) for node, _ in chain))


def chain_methods(chain: list[tuple[ast.ClassDef, Path]]) -> dict[str, tuple[ast.FunctionDef, Path]]:
    """``{method name: (nearest definition, file)}`` along a class chain."""
    methods: dict[str, tuple[ast.FunctionDef, Path]] = {}
    for node, path in chain:
        for statement in node.body:
            if isinstance(statement, ast.FunctionDef):
                methods.setdefault(statement.name, (statement, path))
    return methods


def is_abstract(function: ast.FunctionDef) -> bool:
    """A method whose body (after its docstring) only raises NotImplementedError."""
    body = [statement for statement in function.body
            if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0])


def decorator_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def wrapper_parameters(module: str) -> dict[str, str]:
    """``{parameter: annotation source}`` of the module's @parameterNodeWrapper class."""
    tree = parse_module(module)
    wrappers = [node for node in classes_of(tree).values() if "parameterNodeWrapper" in decorator_names(node)]
    assert len(wrappers) == 1, f"{module}.py must define exactly one @parameterNodeWrapper class"
    return {
        statement.target.id: ast.unparse(statement.annotation)
        for statement in wrappers[0].body
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
    }


def ui_tree(module: str) -> ET.Element:
    return ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()


def ui_widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in root.iter("widget")}


def widget_property(widget: ET.Element, name: str):
    """The text of a direct property of a widget (string/bool/number/enum/set), or None."""
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            if prop.find("stringlist") is not None:
                return [item.text or "" for item in prop.find("stringlist").findall("string")]
            value = next(iter(prop), None)
            return None if value is None else (value.text or "")
    return None


# ---------------------------------------------------------------------------------------------
# Top level: CMake, description files, licence, icons
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top_variables() -> dict[str, list[str]]:
    return cmake_variables(REPO / "CMakeLists.txt")


def test_top_level_files_exist():
    for relative in ("CMakeLists.txt", f"{EXTENSION}.json", f"{EXTENSION}.s4ext", "LICENSE",
                     "Resources/Icons/LCTfound.png", "lctfound/CMakeLists.txt", "scripts/make_icons.py",
                     f"{LIBRARY}/CMakeLists.txt", f"{LIBRARY}/__init__.py"):
        assert (REPO / relative).is_file(), f"missing {relative}"


def test_top_level_cmake_follows_the_extension_template(top_variables):
    commands = cmake_commands(REPO / "CMakeLists.txt")
    names = [name for name, _ in commands]
    assert names[0] == "cmake_minimum_required"
    assert commands[0][1][:2] == ["VERSION", "3.16.3...3.19.7"]
    assert ("project", [EXTENSION]) in commands, f"project({EXTENSION}) must name the extension"
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert variable in top_variables, f"CMakeLists.txt does not set {variable}"
    assert cmake_scalar(top_variables, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_scalar(top_variables, "EXTENSION_DEPENDS") == "PyTorch"

    find_slicer = names.index("find_package")
    assert commands[find_slicer][1] == ["Slicer", "${LCTFOUND_MINIMUM_SLICER_VERSION}", "REQUIRED"], \
        "find_package(Slicer <minimum version> REQUIRED): an older Slicer must fail to configure"
    assert commands[find_slicer + 1] == ("include", ["${Slicer_USE_FILE}"])
    subdirectories = [arguments[0] for name, arguments in commands if name == "add_subdirectory"]
    assert subdirectories == ["lctfound", LIBRARY, *MODULES], subdirectories
    assert names.index("add_subdirectory") > find_slicer
    assert commands[-2:] == [("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
                             ("include", ["${Slicer_EXTENSION_CPACK}"])]
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert text.index("## NEXT_MODULE") > text.index(f"add_subdirectory({MODULES[-1]})")
    assert text.index("## NEXT_MODULE") < text.index("Slicer_EXTENSION_GENERATE_CONFIG")


def test_every_module_folder_is_built():
    folders = sorted(path.parent.name for path in REPO.glob("LCTfound*/CMakeLists.txt"))
    assert folders == sorted([*MODULES, LIBRARY]), "add_subdirectory() every module folder in CMakeLists.txt (and MODULES here)"


def test_description_mentions_the_weights_licence(top_variables):
    description = cmake_scalar(top_variables, "EXTENSION_DESCRIPTION").lower()
    assert "licence" in description or "license" in description
    assert "weights" in description


def test_icon_and_screenshot_urls_point_into_the_repository(top_variables):
    homepage = cmake_scalar(top_variables, "EXTENSION_HOMEPAGE")
    owner_repo = homepage.removeprefix("https://github.com/")
    assert owner_repo.split("/")[1].startswith("Slicer"), "the repository name should start with 'Slicer'"
    raw = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    icon_url = cmake_scalar(top_variables, "EXTENSION_ICONURL")
    assert icon_url.startswith(raw), f"EXTENSION_ICONURL should be a raw URL under {raw}"
    icon = REPO / icon_url.removeprefix(raw)
    assert icon.is_file(), f"EXTENSION_ICONURL names {icon}, which does not exist"
    assert png_size(icon) == (128, 128)
    screenshots = cmake_scalar(top_variables, "EXTENSION_SCREENSHOTURLS").split()
    assert len(screenshots) >= 3, "EXTENSION_SCREENSHOTURLS: the ExtensionsIndex check rejects an extension without screenshots"
    for url in screenshots:
        assert url.startswith(raw), f"{url}: screenshots must be raw URLs under {raw}"
        path = REPO / url.removeprefix(raw)
        assert path.is_file(), f"screenshot {url} names {path}, which is not in the repository"
        width, height = png_size(path)
        assert width >= 800 and height >= 500, f"{path}: too small for the catalog ({width}x{height})"


def test_urls_are_found_the_way_the_extensions_index_reads_them():
    """Slicer/ExtensionsIndex scripts/check_description_files.py reads the URLs with these patterns (one
    quoted string closed by ")"); a URL it cannot read fails the index check."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.IGNORECASE | re.MULTILINE)
    assert len(icons) == 1 and len(shots) == 1
    variables = cmake_variables(REPO / "CMakeLists.txt")
    assert shots[0].split() == cmake_scalar(variables, "EXTENSION_SCREENSHOTURLS").split()


def test_minimum_slicer_version_is_declared_everywhere(top_variables):
    from lctfound.logic.dependencies import MINIMUM_SLICER_VERSION

    assert cmake_scalar(top_variables, "LCTFOUND_MINIMUM_SLICER_VERSION") == MINIMUM_SLICER_VERSION
    assert f"Requires 3D Slicer {MINIMUM_SLICER_VERSION} or later" in cmake_scalar(top_variables, "EXTENSION_DESCRIPTION")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "## Install in 3D Slicer" in readme
    section = readme[readme.index("## Install in 3D Slicer"):]
    section = section[:section.index("\n## ", 5)]
    assert f"3D Slicer {MINIMUM_SLICER_VERSION} or later" in section and "PyTorch" in section
    requires = re.search(r'requires-python = ">=([0-9.]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert requires, "pyproject.toml: set requires-python"
    from lctfound.logic.dependencies import MINIMUM_PYTHON
    assert tuple(int(part) for part in requires.group(1).split(".")) == MINIMUM_PYTHON


def test_catalog_entry_is_formatted_like_the_extensions_index():
    """The index formats entries with prettier + prettier-plugin-multiline-arrays (wrap threshold 0):
    2-space indent, every array one item per line, LF line endings, a final newline."""
    raw = (REPO / f"{EXTENSION}.json").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"}\n")
    entry = json.loads(raw)

    def format_value(value, indent):
        pad = "  " * indent
        if isinstance(value, dict):
            items = [f'{pad}  {json.dumps(k)}: {format_value(v, indent + 1)}' for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(value, list):
            if not value:
                return "[]"
            return "[\n" + ",\n".join(f"{pad}  {format_value(v, indent + 1)}" for v in value) + f"\n{pad}]"
        return json.dumps(value, ensure_ascii=False)

    assert raw.decode("utf-8") == format_value(entry, 0) + "\n"


def test_catalog_entry_matches_cmake(top_variables):
    entry = json.loads((REPO / f"{EXTENSION}.json").read_text(encoding="utf-8"))
    assert set(entry) <= CATALOG_KEYS, f"keys not allowed by the catalog schema: {set(entry) - CATALOG_KEYS}"
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].rstrip("#") == SCHEMA_URL
    assert entry["category"] == cmake_scalar(top_variables, "EXTENSION_CATEGORY")
    depends = cmake_scalar(top_variables, "EXTENSION_DEPENDS").split()
    assert entry.get("build_dependencies", []) == ([] if depends == ["NA"] else depends)
    assert entry["scm_url"].removesuffix(".git") == cmake_scalar(top_variables, "EXTENSION_HOMEPAGE")
    assert entry.get("scm_revision") == "main"
    assert entry.get("build_subdirectory", ".") == "."
    assert entry.get("tier", 5) in (1, 3, 5)
    assert entry.get("enabled", True) is True
    assert not EXTENSION.startswith("Slicer"), "the extension name must not start with 'Slicer'"


def test_s4ext_mirrors_cmake(top_variables):
    fields = {}
    for line in (REPO / f"{EXTENSION}.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    pairs = {
        "homepage": "EXTENSION_HOMEPAGE", "category": "EXTENSION_CATEGORY", "contributors": "EXTENSION_CONTRIBUTORS",
        "description": "EXTENSION_DESCRIPTION", "iconurl": "EXTENSION_ICONURL", "depends": "EXTENSION_DEPENDS",
        "screenshoturls": "EXTENSION_SCREENSHOTURLS", "status": "EXTENSION_STATUS",
    }
    for key, variable in pairs.items():
        assert fields.get(key, "") == cmake_scalar(top_variables, variable), f"{EXTENSION}.s4ext '{key}' differs from {variable}"
    entry = json.loads((REPO / f"{EXTENSION}.json").read_text(encoding="utf-8"))
    assert fields["scmurl"] == entry["scm_url"] and fields["scmrevision"] == entry["scm_revision"]


def test_licence_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_module_icons_are_pngs():
    for module in MODULES:
        width, height = png_size(REPO / module / "Resources" / "Icons" / f"{module}.png")
        assert width == height and width >= 64


# ---------------------------------------------------------------------------------------------
# The engine package list (lctfound/CMakeLists.txt)
# ---------------------------------------------------------------------------------------------


def _package_lists() -> tuple[dict[str, list[str]], list[tuple[str, list[str]]]]:
    path = PACKAGE / "CMakeLists.txt"
    return cmake_variables(path), cmake_commands(path)


def test_package_is_built_as_a_scripted_library_with_subdir():
    _, commands = _package_lists()
    builds = [arguments for name, arguments in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(builds) == 1
    arguments = builds[0]
    assert arguments[arguments.index("NAME") + 1] == "lctfound"
    assert "WITH_SUBDIR" in arguments, "WITH_SUBDIR installs the files into qt-scripted-modules/lctfound/"
    assert "${LCTFOUND_PYTHON_SCRIPTS}" in arguments and "${LCTFOUND_PYTHON_RESOURCES}" in arguments


def _list_difference_message(variable: str, missing: set[str], extra: set[str], folder: str = "lctfound") -> str:
    lines = [f"{folder}/CMakeLists.txt: {variable} does not match the files under {folder}/."]
    if missing:
        lines.append("Add these lines to set(" + variable + " ...):")
        lines += [f"  {name}" for name in sorted(missing)]
    if extra:
        lines.append("Remove these lines (no such file):")
        lines += [f"  {name}" for name in sorted(extra)]
    return "\n".join(lines)


def test_package_cmake_lists_every_python_file():
    variables, _ = _package_lists()
    listed = set(variables.get("LCTFOUND_PYTHON_SCRIPTS", []))
    on_disk = {path.relative_to(PACKAGE).as_posix() for path in files_under(PACKAGE) if path.suffix == ".py"}
    missing, extra = on_disk - listed, listed - on_disk
    assert not missing and not extra, _list_difference_message("LCTFOUND_PYTHON_SCRIPTS", missing, extra)


def test_package_cmake_lists_every_data_file():
    variables, _ = _package_lists()
    listed = set(variables.get("LCTFOUND_PYTHON_RESOURCES", []))
    on_disk = {
        path.relative_to(PACKAGE).as_posix()
        for path in files_under(PACKAGE)
        if path.suffix != ".py" and path.name != "CMakeLists.txt"
    }
    missing, extra = on_disk - listed, listed - on_disk
    assert not missing and not extra, _list_difference_message("LCTFOUND_PYTHON_RESOURCES", missing, extra)


# ---------------------------------------------------------------------------------------------
# The shared Slicer library (LCTfoundSlicerLib/CMakeLists.txt)
# ---------------------------------------------------------------------------------------------


def test_library_is_built_as_a_scripted_library_with_subdir():
    commands = cmake_commands(LIBRARY_DIR / "CMakeLists.txt")
    builds = [arguments for name, arguments in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(builds) == 1
    arguments = builds[0]
    assert arguments[arguments.index("NAME") + 1] == LIBRARY
    assert "WITH_SUBDIR" in arguments, f"WITH_SUBDIR installs the files into qt-scripted-modules/{LIBRARY}/"
    assert "WITH_GENERIC_TESTS" not in arguments, "the library is not a module: it has no module class to test"
    assert "${LCTFOUNDSLICERLIB_PYTHON_SCRIPTS}" in arguments


def test_library_cmake_lists_every_file():
    variables = cmake_variables(LIBRARY_DIR / "CMakeLists.txt")
    listed = set(variables.get("LCTFOUNDSLICERLIB_PYTHON_SCRIPTS", []))
    on_disk = {path.relative_to(LIBRARY_DIR).as_posix() for path in library_files()}
    missing, extra = on_disk - listed, listed - on_disk
    assert not missing and not extra, _list_difference_message("LCTFOUNDSLICERLIB_PYTHON_SCRIPTS", missing, extra, LIBRARY)
    others = [path.relative_to(LIBRARY_DIR).as_posix() for path in files_under(LIBRARY_DIR)
              if path.suffix != ".py" and path.name != "CMakeLists.txt"]
    assert not others, f"{LIBRARY}/ holds files that are not installed: {others} (list them as RESOURCES)"


def test_library_has_no_test_case():
    """unittest collects every TestCase a module file names, so shared tests are mixins: only each
    module's own <Module>Test derives from ScriptedLoadableModuleTest."""
    library = library_classes()
    for name, (node, path) in library.items():
        bases = set().union(*(base_names(library[ancestor][0]) for ancestor in _library_ancestors(name, library)))
        assert not bases & {"ScriptedLoadableModuleTest", "TestCase"}, f"{path.name}: {name} must not be a TestCase"


def _library_ancestors(name: str, library: dict[str, tuple[ast.ClassDef, Path]]) -> list[str]:
    found, pending = [], [name]
    while pending:
        current = pending.pop()
        if current in library and current not in found:
            found.append(current)
            pending.extend(base_names(library[current][0]))
    return found


# ---------------------------------------------------------------------------------------------
# Module folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_module_has_required_files(module):
    folder = REPO / module
    for relative in ("CMakeLists.txt", f"{module}.py", f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png",
                     "Testing/CMakeLists.txt", "Testing/Python/CMakeLists.txt"):
        assert (folder / relative).is_file(), f"missing {module}/{relative}"
    assert list((folder / "Testing" / "Python").glob("test_*.py")), f"{module}/Testing/Python has no test_*.py file"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_script_and_resource(module):
    folder = REPO / module
    variables = cmake_variables(folder / "CMakeLists.txt")
    assert variables.get("MODULE_NAME") == [module]
    files = [path for path in files_under(folder) if path.name != "CMakeLists.txt"]
    scripts = {path.relative_to(folder).as_posix() for path in files
               if path.suffix == ".py" and path.relative_to(folder).parts[0] != "Testing"}
    resources = {path.relative_to(folder).as_posix() for path in files if path.relative_to(folder).parts[0] == "Resources"}
    listed_scripts = set(variables.get("MODULE_PYTHON_SCRIPTS", []))
    listed_resources = set(variables.get("MODULE_PYTHON_RESOURCES", []))
    assert listed_scripts == scripts, (
        f"{module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS: add {sorted(scripts - listed_scripts)}, "
        f"remove {sorted(listed_scripts - scripts)}"
    )
    assert listed_resources == resources, (
        f"{module}/CMakeLists.txt MODULE_PYTHON_RESOURCES: add {sorted(resources - listed_resources)}, "
        f"remove {sorted(listed_resources - resources)}"
    )


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_with_generic_tests(module):
    commands = cmake_commands(REPO / module / "CMakeLists.txt")
    builds = [arguments for name, arguments in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(builds) == 1 and "WITH_GENERIC_TESTS" in builds[0]
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands
    assert ("add_subdirectory", ["Testing"]) in commands
    assert ("if", ["BUILD_TESTING"]) in commands
    assert cmake_commands(REPO / module / "Testing" / "CMakeLists.txt") == [("add_subdirectory", ["Python"])]


@pytest.mark.parametrize("module", MODULES)
def test_module_tests_are_registered_with_ctest(module):
    folder = REPO / module / "Testing" / "Python"
    registered = {
        arguments[1]
        for name, arguments in cmake_commands(folder / "CMakeLists.txt")
        if name == "slicer_add_python_unittest" and arguments[:1] == ["SCRIPT"]
    }
    on_disk = {path.name for path in folder.glob("*.py")}
    assert registered == on_disk, f"{module}/Testing/Python/CMakeLists.txt: register {sorted(on_disk - registered)}, remove {sorted(registered - on_disk)}"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_defines_the_four_classes(module):
    """Slicer looks the four classes up by name in the module file; they may derive from the shared
    library's bases, whose methods count as theirs (abstract ones must be implemented module-side)."""
    classes = classes_of(parse_module(module))
    expectations = {
        module: "ScriptedLoadableModule",
        f"{module}Widget": "ScriptedLoadableModuleWidget",
        f"{module}Logic": "ScriptedLoadableModuleLogic",
        f"{module}Test": "ScriptedLoadableModuleTest",
    }
    for name, base in expectations.items():
        assert name in classes, f"{module}.py has no class {name}"
        assert base in chain_bases(class_chain(module, name)), f"{name} must derive from {base}"
        for method, (function, path) in chain_methods(class_chain(module, name)).items():
            assert not is_abstract(function), f"{name} must implement {method} (abstract in {path.relative_to(REPO)})"
    widget_methods = chain_methods(class_chain(module, f"{module}Widget"))
    assert {"setup", "enter", "exit", "cleanup", "_updateStatus", "initializeParameterNode", "setParameterNode"} <= set(widget_methods)
    logic = classes[f"{module}Logic"]
    logic_methods = chain_methods(class_chain(module, f"{module}Logic"))
    assert "getParameterNode" in logic_methods
    if logic_methods["getParameterNode"][1].parent == LIBRARY_DIR:
        # The shared getParameterNode wraps the node in the class the module's logic names.
        wrapper = next(node.name for node in classes.values() if "parameterNodeWrapper" in decorator_names(node))
        assigned = {ast.unparse(statement.targets[0]): ast.unparse(statement.value)
                    for statement in logic.body if isinstance(statement, ast.Assign) and len(statement.targets) == 1}
        assert assigned.get("parameterNodeClass") == wrapper, f"{module}Logic must set parameterNodeClass = {wrapper}"


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata(module):
    """The metadata is set in the module class or its shared base; title and help are the module's own."""
    assigned: dict[str, Path] = {}
    for node, path in class_chain(module, module):
        init = next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
        for statement in ast.walk(init) if init else []:
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    if isinstance(target, ast.Attribute):
                        assigned.setdefault(target.attr, path)
    assert {"title", "categories", "contributors", "helpText", "acknowledgementText"} <= set(assigned)
    own_init = next(node for node in classes_of(parse_module(module))[module].body
                    if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    own = {target.attr for statement in ast.walk(own_init) if isinstance(statement, ast.Assign)
           for target in statement.targets if isinstance(target, ast.Attribute)}
    own |= {keyword.arg for call in ast.walk(own_init) if isinstance(call, ast.Call) for keyword in call.keywords}
    assert {"title", "helpText"} <= own, f"{module}.__init__ must give its own title and helpText"
    source = assigned["acknowledgementText"].read_text(encoding="utf-8")
    assert "10.1038/s41467-025-66620-z" in source
    assert "A lung CT vision foundation model facilitating disease diagnosis and medical imaging" in source


HEAVY_MODULES = {"torch", "numpy", "monai", "diffusers", "transformers", "accelerate", "SimpleITK", "scipy",
                 "skimage", "pydicom", "highdicom", "torchmetrics", "matplotlib", "tensorboard", "safetensors"}
LIGHT_ENGINE_MODULES = {"lctfound.logic", "lctfound.errors"}


def _top_level_imports(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(inner, ast.Import):
                names += [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                names.append(inner.module)
    return names


def _assert_light_imports(path: Path) -> None:
    where = path.relative_to(REPO).as_posix()
    for name in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        root = name.split(".")[0]
        assert root not in HEAVY_MODULES, f"{where} imports {name} when Slicer starts; import it inside a function"
        if root == "lctfound":
            assert name in LIGHT_ENGINE_MODULES, f"{where} imports {name} at load time; only {sorted(LIGHT_ENGINE_MODULES)} are light"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_imports_only_light_modules_at_load_time(module):
    _assert_light_imports(REPO / module / f"{module}.py")


@pytest.mark.parametrize("path", library_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_library_imports_only_light_modules_at_load_time(path):
    _assert_light_imports(path)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_loads_an_existing_ui(module):
    tree = parse_module(module)
    ui_names = {node.value for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".ui")}
    assert ui_names == {f"UI/{module}.ui"}
    for name in ui_names:
        assert (REPO / module / "Resources" / name).is_file()


@pytest.mark.parametrize("module", MODULES)
def test_ui_is_a_qmrmlwidget_with_the_expected_widgets(module):
    root = ui_tree(module)
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == module
    widgets = ui_widgets(root)
    expected = {**COMMON_WIDGETS, **MODULE_WIDGETS[module]}
    for name, widget_class in expected.items():
        assert name in widgets and widgets[name].get("class") == widget_class, f"{module}.ui needs {widget_class} {name}"
    if "inputVolumeSelector" in widgets:
        assert widget_property(widgets["inputVolumeSelector"], "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    if "progressBar" in widgets:
        assert widget_property(widgets["progressBar"], "visible") == "false", "the progress bar is hidden while idle"
    buttons = {name for name, widget in widgets.items() if widget.get("class") == "QPushButton"}
    actions = set(MODULE_WIDGETS[module]) | set(COMMON_WIDGETS)
    assert buttons <= actions, f"{module}.ui: buttons without an action {sorted(buttons - actions)}"

    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    used = {widget.get("class") for widget in widgets.values()}
    assert {cls for cls in used if cls.startswith(("q", "ctk"))} <= declared, "declare custom widgets in <customwidgets>"

    scene_receivers = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("sender") == module and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    node_combos = {name for name, widget in widgets.items()
                   if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    assert node_combos <= scene_receivers, f"connect mrmlSceneChanged to setMRMLScene of {sorted(node_combos - scene_receivers)}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_binds_every_parameter_once(module):
    parameters = wrapper_parameters(module)
    bindings: dict[str, list[tuple[str, str, ET.Element]]] = {}
    for name, widget in ui_widgets(ui_tree(module)).items():
        for prop in ("SlicerParameterName", CHOICE_PROPERTY, NODE_LIST_PROPERTY):
            value = widget_property(widget, prop)
            if value:
                bindings.setdefault(value, []).append((prop, name, widget))
    assert set(bindings) == set(parameters), (
        f"{module}.ui: parameters without a widget {sorted(set(parameters) - set(bindings))}, "
        f"widgets naming unknown parameters {sorted(set(bindings) - set(parameters))}"
    )
    import lctfound.logic

    logic_class = getattr(lctfound.logic, MODULE_LOGICS[module])
    logic = logic_class(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"])
    for parameter, bound in bindings.items():
        assert len(bound) == 1, f"{module}.ui binds {parameter} to several widgets"
        prop, name, widget = bound[0]
        annotation = parameters[parameter]
        widget_class = widget.get("class")
        if prop == CHOICE_PROPERTY:
            assert widget_class == "QComboBox" and annotation == "str", name
            logic.choices(parameter)  # KeyError when the logic cannot fill this selector
        elif prop == NODE_LIST_PROPERTY:
            assert widget_class == "qMRMLCheckableNodeComboBox", f"{name} must be a qMRMLCheckableNodeComboBox"
            node_type = annotation.removeprefix("list[").removesuffix("]")
            assert annotation.startswith("list[vtkMRML") and widget_property(widget, "nodeTypes") == [node_type], name
        elif annotation.startswith("vtkMRML"):
            assert widget_class == "qMRMLNodeComboBox", f"{name} must be a qMRMLNodeComboBox for {annotation}"
            assert widget_property(widget, "nodeTypes") == [annotation], f"{name}: nodeTypes must be [{annotation}]"
        elif annotation == "str":
            # connectGui's QComboBox connector needs Annotated[str, Choice([...])]; free text uses QLineEdit.
            assert widget_class == "QLineEdit", f"{name}: bind str parameters to a QLineEdit"
        elif annotation == "bool":
            assert widget_class == "QCheckBox", f"{name}: bind bool parameters to a QCheckBox"
        elif annotation == "Path":
            assert widget_class == "ctkPathLineEdit", f"{name}: bind Path parameters to a ctkPathLineEdit"
        elif re.match(r"(Annotated\[)?int\b", annotation):
            assert widget_class in ("QSpinBox", "QSlider"), f"{name}: bind int parameters to a QSpinBox"
        elif re.match(r"(Annotated\[)?float\b", annotation):
            assert widget_class in ("QDoubleSpinBox", "ctkDoubleSpinBox", "ctkSliderWidget"), f"{name}: bind float parameters to a QDoubleSpinBox"
        else:
            pytest.fail(f"{module}: no binding rule for {parameter}: {annotation}")


@pytest.mark.parametrize("module", MODULES)
def test_widget_uses_only_widgets_that_exist_in_the_ui(module):
    """Every self.ui.<name> of the module file and of the shared widget bases it derives from."""
    names = set(ui_widgets(ui_tree(module)))
    sources = [parse_module(module)] + [node for node, path in class_chain(module, f"{module}Widget") if path.parent == LIBRARY_DIR]
    used = {
        node.attr
        for source in sources for node in ast.walk(source)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
    }
    assert used <= names, f"{module}.py (with its {LIBRARY} bases) uses self.ui.{sorted(used - names)} that {module}.ui does not define"


# ---------------------------------------------------------------------------------------------
# Layering: the engine stays free of Slicer, Qt, VTK and trame
# ---------------------------------------------------------------------------------------------

GUI_ROOTS = ("qt", "ctk", "trame", "PySide", "PyQt", "qSlicer", "qMRML")
MRML_ROOTS = ("slicer", "vtk", "vtkmodules", "mrml")
FRONT_END_PACKAGES = ("cli",)  # thin front ends inside the package may call the module logic
#: The web front end (trame-slicer): the only package that may import trame, and with
#: lctfound/mrml and lctfound/logic the only one that may import Slicer.
WEB_PACKAGE = "web"


def _is_root(name: str, roots: tuple[str, ...]) -> bool:
    first = name.split(".")[0]
    return any(first == root or (root in ("trame", "PySide", "PyQt", "qSlicer", "qMRML") and first.startswith(root))
               for root in roots)


def _resolve(module_parts: tuple[str, ...], is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = list(module_parts if is_package else module_parts[:-1])
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``[(absolute module name, imported inside a function)]``; ``if TYPE_CHECKING:`` blocks are skipped."""
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(parts, is_package, node)
            found.append((module, in_function))
            found.extend((f"{module}.{alias.name}", in_function) for alias in node.names if module.startswith("lctfound"))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


def _engine_files() -> list[Path]:
    return [path for path in files_under(PACKAGE) if path.suffix == ".py"]


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 and parts[0] in ("mrml", "logic", WEB_PACKAGE, *FRONT_END_PACKAGES) else "engine"


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_layering(path):
    layer = _layer(path)
    where = path.relative_to(REPO).as_posix()
    for name, in_function in _imports(path):
        if _is_root(name, GUI_ROOTS):
            if layer == WEB_PACKAGE and _is_root(name, ("trame",)):
                continue
            pytest.fail(f"{where} imports {name}: no Qt under lctfound/, and trame only in lctfound/web/ "
                        "(keep it in the module files or web panels)")
        if name.split(".")[0] == LIBRARY:
            pytest.fail(f"{where} imports {name}: the engine must not depend on the Slicer-side {LIBRARY}")
        if _is_root(name, MRML_ROOTS):
            if layer in ("mrml", WEB_PACKAGE):
                continue
            if layer == "logic" and in_function:
                continue
            detail = " at import time; import MRML inside the function that needs it" if layer == "logic" else (
                "; only lctfound/mrml/, lctfound/web/ (and lctfound/logic/, lazily) may touch Slicer, MRML or VTK")
            pytest.fail(f"{where} imports {name}{detail}")
        if name.startswith("lctfound.web") and layer != WEB_PACKAGE and not (layer in FRONT_END_PACKAGES and in_function):
            pytest.fail(f"{where} imports {name}: only the command line may start the web front end, inside the "
                        "function that needs it")
        if layer == "engine" and (name.startswith("lctfound.logic") or name.startswith("lctfound.mrml")):
            pytest.fail(f"{where} imports {name}: the engine must not depend on the module logic or MRML adapters")
        if layer in ("mrml", "logic") and name.startswith("lctfound.web"):
            pytest.fail(f"{where} imports {name}: the logic and MRML adapters must not depend on the web front end")
        if layer == "mrml" and name.startswith("lctfound.logic"):
            pytest.fail(f"{where} imports {name}: MRML adapters must not depend on the module logic")
