"""Safe publication of outputs: the one mechanism every writer goes through.

Four rules hold for every output of every command, module logic and the web front end:

1. **An output never resolves to an input** (`check_outputs`, and the `command_inputs` backstop):
   an output path that is an input — through ``..``, symlinks, hard links (same device and inode)
   or the case of a case-insensitive file system — lies inside an input folder, or is a folder
   that holds an input, is refused, with or without ``--overwrite``.
2. **No silent overwrite**: an existing output is refused unless the caller passes ``overwrite``.
3. **A write is not done until it is verified** (`atomic_file`, `atomic_directory`): the data go
   to a temporary sibling, are flushed and fsynced, checked (not empty; an optional ``verify``
   callback reads volumes back, since SimpleITK does not raise on a full disk) and only then
   renamed into place. A full disk becomes one `DiskFullError` line (``no space left on <folder>
   (needs ~N MB)``) and the temporaries are removed. `reserve_space` preallocates files that are
   filled through a memory map, so a full disk is an error instead of SIGBUS.
4. **Outputs follow the user's umask** (a temporary file is created 0600): the final mode is set
   from the umask before the rename.

Output locations are also checked for writability before any work starts (`check_outputs`), so a
read-only folder is reported at once, not after an hour of training.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import LCTfoundError

PathLike = Union[str, "os.PathLike[str]"]

# errno values that mean "the disk (or the user's quota) is full".
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Suffix of every temporary this module creates; stale ones (from a killed process) can be
# recognised and removed (`remove_stale_temporaries`).
TEMP_SUFFIX = ".tmp"


class DiskFullError(LCTfoundError):
    """The disk (or quota) holding an output ran out of space; the partial output was removed."""


class OutputError(LCTfoundError):
    """An output location cannot be used (it is an input, exists, or cannot be written)."""


# --------------------------------------------------------------------------------------------
# Disk space and modes
# --------------------------------------------------------------------------------------------


def _mb(nbytes: Optional[int]) -> str:
    return f"{max(1, int(round(nbytes / 1e6)))} MB" if nbytes else ""


def disk_full_error(folder: PathLike, needed_bytes: Optional[int] = None) -> DiskFullError:
    """The one-line error for a full disk under ``folder``."""
    need = f"needs ~{_mb(needed_bytes)}" if needed_bytes else "free some space and try again"
    return DiskFullError(f"no space left on {folder} ({need})")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says that the disk is full (OSError errno, or the text of a library's error
    such as safetensors', which is not an OSError)."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def free_bytes(folder: PathLike) -> Optional[int]:
    """Free bytes for this user on the file system holding ``folder`` (None when unknown)."""
    try:
        return shutil.disk_usage(_existing_ancestor(Path(folder))).free
    except OSError:
        return None


def check_free_space(folder: PathLike, needed_bytes: int) -> None:
    """Raise `DiskFullError` when the file system of ``folder`` has less than ``needed_bytes`` free."""
    free = free_bytes(folder)
    if free is not None and free < needed_bytes:
        raise disk_full_error(_existing_ancestor(Path(folder)), needed_bytes)


def reserve_space(path: PathLike, nbytes: int) -> None:
    """Allocate the blocks of file ``path`` up to ``nbytes`` (it must exist; it is created sparse by
    ``np.lib.format.open_memmap``). Writing through a memory map into a sparse file on a full disk
    kills the process with SIGBUS; after this, the map's pages are backed by real blocks. Raises
    `DiskFullError` when the space is not there."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, int(nbytes))
        except AttributeError:  # no posix_fallocate (macOS, Windows): compare with the free space
            check_free_space(path.parent, int(nbytes) - path.stat().st_size)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error(path.parent, nbytes) from None
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                check_free_space(path.parent, int(nbytes) - path.stat().st_size)
            else:
                raise
    finally:
        os.close(fd)


def create_memmap(path: PathLike, dtype, shape):
    """A new ``.npy`` file opened as a writable memory map whose blocks are reserved on disk
    (`reserve_space`): a full disk is a `DiskFullError` here (and the file is removed), never a
    SIGBUS while the map is filled."""
    import numpy as np

    path = Path(path)
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink()
        if is_disk_full(error):
            raise disk_full_error(path.parent, int(np.prod(shape)) * np.dtype(dtype).itemsize) from None
        raise
    try:
        reserve_space(path, path.stat().st_size)
    except BaseException:
        array = None  # unmap before the file goes
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return array


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it (0666/0777 minus the umask)."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Outputs versus inputs
# --------------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _key(path: PathLike) -> str:
    """A comparable spelling of ``path``: absolute, symlinks and ``..`` resolved, case folded where
    the platform's paths are case-insensitive."""
    return os.path.normcase(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _identity(path: PathLike) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _chain(path: PathLike) -> list[str]:
    """``path`` and its ancestors, as keys (the path itself first)."""
    key = _key(path)
    chain = [key]
    while True:
        parent = os.path.dirname(key)
        if parent == key:
            return chain
        chain.append(parent)
        key = parent


def input_conflict(output: PathLike, inputs: Iterable[PathLike], replaces_folder: bool = False) -> Optional[str]:
    """The input that ``output`` would replace or write into, or None.

    ``output`` conflicts with an input when it is the same file or folder (same resolved path, or
    the same device and inode: hard links, case-insensitive names), or when it is an existing file
    directly in an input folder (a folder command reads the files in it; a new name there, or a
    sub-folder for the results, is fine). With ``replaces_folder`` (the output is a folder that will
    be replaced as a whole) an input inside it conflicts too, since replacing the folder would
    delete it.
    """
    output = Path(os.path.expanduser(os.fspath(output)))
    out_chain = _chain(output)
    out_key = out_chain[0]
    out_id = _identity(output)
    # An existing file in an input folder is one of that folder's inputs: compare the input with the
    # file's folder too (by path and by identity, for other spellings).
    is_file = os.path.lexists(output) and not os.path.isdir(output)
    chain = out_chain[:2] if is_file else out_chain[:1]
    out_ids = [i for i in (_identity(p) for p in ([output, output.parent] if is_file else [output])) if i]
    for item in inputs:
        if item is None:
            continue
        item_key = _key(item)
        item_id = _identity(item)
        if item_key in chain or (item_id is not None and item_id in out_ids):
            return os.fspath(item)
        if not replaces_folder:
            continue
        if item_key.startswith(out_key.rstrip(os.sep) + os.sep):
            return os.fspath(item)
        if out_id is not None and output.is_dir() and os.path.exists(item):
            if any(_identity(parent) == out_id for parent in Path(os.path.realpath(item)).parents):
                return os.fspath(item)
    return None


def refuse_input_conflict(output: PathLike, inputs: Iterable[PathLike], replaces_folder: bool = False) -> None:
    """Raise `OutputError` when ``output`` resolves to (or into) one of ``inputs`` (`input_conflict`)."""
    clash = input_conflict(output, inputs, replaces_folder)
    if clash is not None:
        same = _key(clash) == _key(output) or _identity(clash) == _identity(output) is not None
        relation = "is the input" if same else "overlaps the input"
        raise OutputError(f"{output}: the output {relation} {clash}; choose another output "
                          "(an output never replaces an input)")


def check_writable(path: PathLike) -> None:
    """Raise `OutputError` unless a file can be created in the folder that will hold ``path``.

    The folder is the nearest existing ancestor (missing folders are created later). A probe file is
    created and removed: permission bits, read-only mounts and ACLs all show up, as root too.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is a file, not a folder; choose another output")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".lctfound-write-check."):
            pass
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(folder) from None
        reason = error.strerror or str(error)
        raise OutputError(f"{path}: cannot write in {folder} ({reason}); choose another output location") from None


def check_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike] = (), overwrite: bool = False,
                  overwrite_flag: Optional[str] = "--overwrite") -> list[Path]:
    """Check every output location of a command before any work, and return them as paths.

    Each output must not resolve to an input (rule 1, whatever ``overwrite`` says), must not exist
    unless ``overwrite`` (rule 2; ``overwrite_flag`` names the option in the message, None when the
    front end has none) and its folder must be writable. ``inputs`` are files or folders; None items
    are skipped.
    """
    inputs = [item for item in inputs if item is not None]
    checked = []
    for output in outputs:
        if output is None:
            continue
        path = Path(os.path.expanduser(os.fspath(output)))
        # An existing folder that ``overwrite`` lets through will be replaced as a whole.
        refuse_input_conflict(path, inputs, replaces_folder=overwrite and path.is_dir())
        if (path.exists() or path.is_symlink()) and not overwrite:
            hint = f"choose a new name or pass {overwrite_flag}" if overwrite_flag else "choose a new name"
            raise OutputError(f"{path}: already exists; {hint}")
        check_writable(path)
        checked.append(path)
    return checked


# The inputs a running command has read (`command_inputs`): the publishers refuse to replace them
# even where a command forgot to declare one to `check_outputs`.
_scope = threading.local()


@contextlib.contextmanager
def command_inputs() -> Iterator[list]:
    """Within this block, every `note_input` is remembered and `atomic_file`/`atomic_directory`
    refuse to publish onto (or around) a noted input. The CLI runs each command in one."""
    previous = getattr(_scope, "inputs", None)
    _scope.inputs = []
    try:
        yield _scope.inputs
    finally:
        _scope.inputs = previous


def note_input(path: PathLike) -> None:
    """Record that the running command reads ``path`` (a no-op outside `command_inputs`)."""
    inputs = getattr(_scope, "inputs", None)
    if inputs is not None and path is not None:
        inputs.append(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _refuse_noted_input(target: Path, replaces_folder: bool = False) -> None:
    inputs = getattr(_scope, "inputs", None)
    if inputs:
        refuse_input_conflict(target, inputs, replaces_folder)


# --------------------------------------------------------------------------------------------
# Publishers
# --------------------------------------------------------------------------------------------


def _make_parent(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder}: is a file, not a folder; choose another output") from None
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(_existing_ancestor(folder)) from None
        raise OutputError(f"{folder}: cannot be created ({error.strerror or error})") from None


def _low_on_space(folder: Path, needed_bytes: Optional[int]) -> bool:
    # Writers such as ITK's report a full disk as "fwrite wrote only ..." without an errno: when the
    # free space is below what the output needs (or below 1 MB), a full disk is the cause.
    free = free_bytes(folder)
    return free is not None and free < max(needed_bytes or 0, 1 << 20)


def _translate(error: BaseException, folder: Path, needed_bytes: Optional[int], what: Path) -> BaseException:
    """An OSError (or library error) from writing ``what`` as one user-facing line."""
    if is_disk_full(error) or (not isinstance(error, (KeyboardInterrupt, MemoryError))
                               and _low_on_space(folder, needed_bytes)):
        return disk_full_error(folder, needed_bytes)
    if isinstance(error, OSError):
        return OutputError(f"{what}: cannot be written ({error.strerror or error})")
    return error


@contextlib.contextmanager
def atomic_file(target: PathLike, suffix: Optional[str] = None, verify: Optional[Callable[[Path], None]] = None,
                expected_bytes: Optional[int] = None, allow_empty: bool = False,
                size_hint: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; once the block has written it, it is fsynced,
    checked and renamed onto ``target``.

    ``suffix`` keeps the temporary file's extension (writers such as SimpleITK pick the format
    from it); it defaults to the target's full suffix. The written file must not be empty (unless
    ``allow_empty``) and ``verify(tmp)`` — e.g. reading a volume back — must not raise.
    ``expected_bytes`` (an estimate) is checked against the free space first and named in the
    full-disk message; ``size_hint`` (an upper bound, such as a volume's uncompressed size) is
    only named in that message. On any failure the temporary is removed and ``target`` is untouched.
    """
    target = Path(os.path.expanduser(os.fspath(target)))
    _refuse_noted_input(target)
    folder = target.parent
    _make_parent(folder)
    if expected_bytes:
        check_free_space(folder, expected_bytes)
    need = expected_bytes or size_hint
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f"{TEMP_SUFFIX}{suffix}", dir=folder)
    except OSError as error:
        raise _translate(error, folder, need, target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            _fsync_file(tmp)
            if not allow_empty and tmp.stat().st_size == 0:
                if _low_on_space(folder, need):
                    raise disk_full_error(folder, need)
                raise OutputError(f"{target}: the written file is empty; nothing was published")
            if verify is not None:
                try:
                    verify(tmp)
                except LCTfoundError:
                    raise
                except Exception as error:  # a read-back failure: most often a full disk
                    if _low_on_space(folder, need):
                        raise disk_full_error(folder, need) from None
                    raise OutputError(f"{target}: the written file does not read back ({error}); "
                                      "nothing was published") from None
            apply_umask(tmp)
            os.replace(tmp, target)
        except (DiskFullError, OutputError, KeyboardInterrupt):
            raise
        except LCTfoundError:
            # A writer's own "could not write" (VTK storage nodes) on a nearly full disk.
            if _low_on_space(folder, need):
                raise disk_full_error(folder, need) from None
            raise
        except Exception as error:
            translated = _translate(error, folder, need, target)
            if translated is error:
                raise
            raise translated from None
        _fsync_dir(folder)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False,
                     expected_bytes: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    Every file in it is fsynced before the rename (a write error that a file system defers shows up
    here, not later). With ``overwrite`` an existing folder is swapped out only after the new one is
    complete (the old one is renamed aside first and removed last), so a failure never loses both.
    A full disk is one `DiskFullError` line and the temporary folder is removed.
    """
    target = Path(os.path.expanduser(os.fspath(target)))
    _refuse_noted_input(target, replaces_folder=True)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{target}: already exists; choose a new output folder")
    folder = target.parent
    _make_parent(folder)
    if expected_bytes:
        check_free_space(folder, expected_bytes)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=folder))
    except OSError as error:
        raise _translate(error, folder, expected_bytes, target) from None
    try:
        try:
            yield tmp
            empty = False
            for root, _, files in os.walk(tmp):
                for name in files:
                    _fsync_file(Path(root) / name)
                    empty = empty or (Path(root) / name).stat().st_size == 0
            if empty and _low_on_space(folder, expected_bytes):  # a writer that did not raise on a full disk
                raise disk_full_error(folder, expected_bytes)
            apply_umask(tmp, directory=True)
            if target.exists() or target.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=folder))
                old.rmdir()
                os.replace(target, old)
                os.replace(tmp, target)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
            else:
                os.replace(tmp, target)
        except (DiskFullError, OutputError, KeyboardInterrupt):
            raise
        except LCTfoundError:
            if _low_on_space(folder, expected_bytes):
                raise disk_full_error(folder, expected_bytes) from None
            raise
        except Exception as error:
            translated = _translate(error, folder, expected_bytes, target)
            if translated is error:
                raise
            raise translated from None
        _fsync_dir(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def image_reads_back(path: PathLike) -> None:
    """A ``verify`` for `atomic_file`: the written image file must read back whole (SimpleITK reads the
    header and every voxel; an empty or truncated file raises)."""
    import SimpleITK as sitk

    sitk.ReadImage(os.fspath(path))


def output_is_complete(path: PathLike, read: Optional[Callable[[Path], object]] = None) -> bool:
    """Whether an output left by an earlier run counts as done: a non-empty file that ``read`` (e.g.
    reading a volume) accepts. Batch commands redo an empty or unreadable output (a full disk or a
    killed run) instead of skipping it."""
    path = Path(path)
    noted = getattr(_scope, "inputs", None)
    _scope.inputs = None  # reading back an output does not make it an input
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        if read is not None:
            read(path)
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not done"
        return False
    finally:
        _scope.inputs = noted


def write_text_file(target: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Publish ``text`` as ``target`` through `atomic_file`."""
    data = text.encode(encoding)
    with atomic_file(target, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def remove_stale_temporaries(folder: PathLike, name: Optional[str] = None) -> list[Path]:
    """Remove temporaries left in ``folder`` by a killed `atomic_file`/`atomic_directory`
    (``.<name>.*.tmp*`` and ``.<name>.*.old``; any name when ``name`` is None). Returns them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    prefix = f".{name}." if name else "."
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix) or not (TEMP_SUFFIX in entry.name or entry.name.endswith(".old")):
            continue
        if entry.name.startswith(".lctfound-write-check."):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
