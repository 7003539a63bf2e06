"""The web server's safety rules, kept free of trame and Slicer so that each one is unit-tested.

* **Binding** (`check_bind`): loopback by default; any other address needs an access token of
  at least `MIN_TOKEN_LENGTH` characters (`new_token` makes one).
* **Access gate** (`AccessGate.middleware`, an aiohttp middleware in front of every HTTP
  request, the websocket upgrade included):

  - with a token, a request must carry ``?secret=TOKEN`` (the page URL printed at start-up) or
    the HttpOnly cookie set from it; anything else gets 401. The websocket's own wslink
    ``hello`` secret is checked too (`AccessGate.validate_ws_token`);
  - on a loopback server, the ``Host`` header must name a loopback host (no DNS rebinding);
  - a websocket upgrade with an ``Origin`` header must come from the page's own origin (no
    other web site open in the user's browser may drive the server);
  - **one user per server process**: the first browser session that connects owns the
    server; while it is connected (and for `OWNER_GRACE_S` after, so a reload keeps it), any
    other browser session gets a 409 page saying so. Tabs of the same browser share the one
    scene (trame keeps a single shared state per process).

* **Data roots** (`DataRoots`): server-side paths are resolved with symlinks followed and must
  lie inside one of the configured folders; ``..`` and links out of a root are refused. The rule
  is transitive (`DataRoots.resolve_input`, the one check before the server reads anything):
  every path that the opened file or folder names — rows of CSV tables, strings in JSON files,
  detached NRRD/MetaImage data files, files and links inside a folder, and what those name in
  turn — must lie inside a data root too (`referenced_paths`).
* **Upload errors** never show the server's temporary folder (`hide_folder`).
* **Uploads** (`UploadBudget`): the total size of one upload is limited; the browser checks it
  before sending, and the server counts the bytes it receives and drops the upload once over.
"""

from __future__ import annotations

import csv
import hmac
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional
from urllib.parse import urlsplit

from ..errors import InputError, LCTfoundError

MIN_TOKEN_LENGTH = 16
TOKEN_COOKIE = "lctfound_token"
SESSION_COOKIE = "lctfound_session"
#: A disconnected owner keeps the server this long (a page reload reconnects well within it).
OWNER_GRACE_S = 10.0
#: Paths of the page itself (where a refusal is shown as a readable HTML page).
PAGE_PATHS = ("/", "/index.html")
WEBSOCKET_PATH = "/ws"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


# ---------------------------------------------------------------------------------------------
# Binding and tokens
# ---------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` (brackets allowed)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A random access token (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    """``token`` stripped, or `InputError` when it is too short or holds characters a URL would mangle."""
    token = (token or "").strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the access token must have at least {MIN_TOKEN_LENGTH} characters")
    if not all(ch.isalnum() or ch in "-_.~" for ch in token):
        raise InputError("the access token may only contain letters, digits and - _ . ~")
    return token


def read_token_file(path: str | os.PathLike) -> str:
    """The token stored in a file (first line, stripped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read the token file ({error.strerror or error})") from None
    return check_token(text.splitlines()[0] if text.strip() else "")


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to serve on a non-loopback address without an access token."""
    if not host or not host.strip():
        raise InputError("the host to listen on is empty; give a host name or address (e.g. 127.0.0.1)")
    if not is_loopback(host) and not token:
        raise InputError(
            f"refusing to listen on {host} without an access token: anyone who can reach it could read and "
            "change the data; start `lctfound web` with --token-file FILE (or `lctfound web --token TOKEN`), or keep "
            "`lctfound web --host 127.0.0.1` (the default)"
        )


def page_url(host: str, port: int, token: Optional[str] = None) -> str:
    """The URL to open (with ``?secret=`` when a token protects the server)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    url = f"http://{shown}:{port}/"
    return f"{url}?secret={token}" if token else url


# ---------------------------------------------------------------------------------------------
# Server-side paths
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One row of a folder listing: a name, whether it is a folder, and its size in bytes."""

    name: str
    is_dir: bool
    size: int = 0


class DataRoots:
    """The folders a client may open files from (resolved once, at start-up)."""

    def __init__(self, roots: Iterable[str | os.PathLike]):
        resolved: list[Path] = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise InputError(f"data root {root}: no such folder")
            real = Path(os.path.realpath(path))
            if real not in resolved:
                resolved.append(real)
        self.roots: tuple[Path, ...] = tuple(resolved)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def resolve(self, path: str, root: Optional[int] = None) -> Path:
        """The real path of ``path`` (absolute, or relative to root number ``root``, default the
        first) after following every symlink; `InputError` unless it lies inside a data root."""
        if not self.roots:
            raise InputError("this server opens no server-side files: start it with `lctfound web --data-root FOLDER`")
        text = str(path or "").strip()
        if "\x00" in text:
            raise InputError("the path contains a NUL character")
        if root is not None:
            try:
                root = int(root)
            except (TypeError, ValueError):
                raise InputError(f"no data root number {root!r}") from None
            if not 0 <= root < len(self.roots):
                raise InputError(f"no data root number {root}")
        base = self.roots[int(root or 0)]
        candidate = Path(text) if os.path.isabs(text) else base / text
        real = Path(os.path.realpath(candidate))
        inside = [r for r in ((self.roots[int(root)],) if root is not None else self.roots) if _is_within(real, r)]
        if not inside:
            raise InputError(f"{text or '.'}: outside the data folders this server may read")
        if not real.exists():
            raise InputError(f"{text}: no such file or folder")
        return real

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (symlinks followed) lies inside a data root."""
        real = Path(os.path.realpath(path))
        return any(_is_within(real, r) for r in self.roots)

    def resolve_input(self, path: str, root: Optional[int] = None) -> Path:
        """`resolve`, and then every path the file or folder names (transitively, see
        `referenced_paths`) must lie inside a data root too: the one check before the server
        reads a client-chosen file."""
        real = self.resolve(path, root)
        for source, written, target in referenced_paths(real):
            if not self.contains(target):
                raise InputError(f"{source.name}: names {written!r}, which is outside the data folders this server "
                                 "may read; copy that file into a data folder and name it there")
        return real

    def listing(self, path: str, root: Optional[int] = None, suffixes: tuple[str, ...] = ()) -> list[Entry]:
        """Sub-folders, then files (only those ending with one of ``suffixes`` when given), sorted
        by name; entries whose link target leaves the roots are left out."""
        folder = self.resolve(path, root)
        if not folder.is_dir():
            raise InputError(f"{path}: not a folder")
        folders, files = [], []
        try:
            children = sorted(folder.iterdir(), key=lambda p: p.name.lower())
        except OSError as error:
            raise InputError(f"{path}: cannot list the folder ({error.strerror or error})") from None
        for child in children:
            if child.name.startswith("."):
                continue
            real = Path(os.path.realpath(child))
            if not any(_is_within(real, r) for r in self.roots):
                continue
            if real.is_dir():
                folders.append(Entry(child.name, True))
            elif real.is_file() and (not suffixes or child.name.lower().endswith(suffixes)):
                files.append(Entry(child.name, False, real.stat().st_size))
        return folders + files

    def relative(self, path: Path, root: int) -> str:
        """``path`` relative to root number ``root`` ("" for the root itself)."""
        relative = Path(os.path.realpath(path)).relative_to(self.roots[root]).as_posix()
        return "" if relative == "." else relative


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


#: Files that may name other files, by suffix; the rest are read as data only.
TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".json",)
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
#: Bounds of the scan (a data root may hold big trees; a file may name a file that names one ...).
MAX_REFERENCE_DEPTH = 4
MAX_FOLDER_ENTRIES = 100_000
MAX_NAMING_FILE_BYTES = 16 * 2**20
_HEADER_BYTES = 64 * 1024


def referenced_paths(path: str | os.PathLike) -> Iterator[tuple[Path, str, Path]]:
    """``(file or folder, the path as written, the path it means)`` for every other file that
    reading ``path`` may open, transitively (the named files are scanned in turn):

    * a folder: every file, sub-folder and link in it (DICOM series, image/label pair folders);
    * a CSV/TSV table: every cell that reads as a path (absolute, with a folder separator or
      ``~``, or naming an existing file beside the table);
    * a JSON file: every string value that reads as a path, the same way;
    * an NRRD / MetaImage header: its detached data file(s) (``data file:``, ``ElementDataFile``).
    """
    seen: set[str] = set()
    pending: list[tuple[Path, int]] = [(Path(path), 0)]
    while pending:
        current, depth = pending.pop()
        real = os.path.realpath(current)
        if real in seen or depth > MAX_REFERENCE_DEPTH:
            continue
        seen.add(real)
        for written, target in _named_by(Path(real)):
            yield current, written, target
            pending.append((target, depth + 1))


def _named_by(path: Path) -> Iterator[tuple[str, Path]]:
    try:
        if path.is_dir():
            count = 0
            for folder, subfolders, files in os.walk(path):
                for name in subfolders + files:
                    count += 1
                    if count > MAX_FOLDER_ENTRIES:
                        raise InputError(f"{path.name}: holds more than {MAX_FOLDER_ENTRIES} files; choose a "
                                         "smaller folder")
                    child = Path(folder) / name
                    yield str(child.relative_to(path)), child
            return
        if not path.is_file():
            return
        name = path.name.lower()
        if name.endswith(TABLE_SUFFIXES + JSON_SUFFIXES) and path.stat().st_size > MAX_NAMING_FILE_BYTES:
            raise InputError(f"{path.name}: too large for a table ({path.stat().st_size} bytes)")
        if name.endswith(TABLE_SUFFIXES):
            yield from _table_paths(path)
        elif name.endswith(JSON_SUFFIXES):
            yield from _json_paths(path)
        elif name.endswith(NRRD_SUFFIXES):
            yield from _header_data_files(path, ("data file", "datafile"), ":")
        elif name.endswith(METAIMAGE_SUFFIXES):
            yield from _header_data_files(path, ("elementdatafile",), "=")
    except OSError as error:
        raise InputError(f"{path.name}: cannot be read ({error.strerror or error})") from None


def _looks_like_path(text: str, base: Path) -> Optional[Path]:
    """The path a table cell or JSON string means, or None when it reads as a plain value."""
    text = text.strip()
    if not text or "\x00" in text or len(text) > 4096:
        return None
    if os.path.isabs(text) or text.startswith("~") or "/" in text or "\\" in text or text in (".", ".."):
        candidate = Path(text.replace("\\", "/")).expanduser()
        return candidate if candidate.is_absolute() else base / candidate
    beside = base / text
    return beside if os.path.lexists(beside) else None


def _table_paths(path: Path) -> Iterator[tuple[str, Path]]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        dialect = "excel-tab" if path.name.lower().endswith(".tsv") else "excel"
        try:
            for row in csv.reader(handle, dialect):
                for cell in row:
                    target = _looks_like_path(cell, path.parent)
                    if target is not None:
                        yield cell.strip(), target
        except csv.Error as error:
            raise InputError(f"{path.name}: cannot be read as a table ({error})") from None


def _json_paths(path: Path) -> Iterator[tuple[str, Path]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        return  # not JSON: the reader that needs it says so
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            target = _looks_like_path(item, path.parent)
            if target is not None:
                yield item, target


def _header_data_files(path: Path, keys: tuple[str, ...], separator: str) -> Iterator[tuple[str, Path]]:
    """Detached data files of an NRRD (``data file: X``) or MetaImage (``ElementDataFile = X``)
    header, including ``LIST`` forms and ``%d`` patterns (their folder is what counts)."""
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
    lines = head.decode("latin-1").splitlines()
    for number, line in enumerate(lines):
        if line.startswith("#") or separator not in line:
            if not line.strip() and separator == ":":
                break  # the NRRD header ends at the first blank line
            continue
        key, _, value = line.partition(separator)
        if key.strip().lower() not in keys:
            continue
        value = value.strip()
        if value.upper() in ("LOCAL", ""):
            return
        if value.upper().startswith("LIST"):
            names = [entry.strip() for entry in lines[number + 1:] if entry.strip()]
        else:
            first = value.split()[0] if "%" in value else value
            names = [os.path.dirname(first) or "." if "%" in first else first]
        for name in names:
            candidate = Path(name).expanduser()
            yield name, candidate if candidate.is_absolute() else path.parent / candidate
        return


def hide_folder(message: str, folder: str | os.PathLike, shown_as: str = "") -> str:
    """``message`` with every mention of ``folder`` (as given and with links resolved) removed,
    so that an upload's error names the uploaded file and not the server's temporary folder."""
    for form in {str(folder), os.path.realpath(folder)}:
        message = message.replace(form + os.sep, shown_as).replace(form, shown_as or "the upload")
    return message


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def safe_file_name(name: str) -> str:
    """The last component of a client-given file name, or `InputError` for an unusable one."""
    base = str(name or "").replace("\\", "/").split("/")[-1].strip()
    if base in ("", ".", "..") or "\x00" in base:
        raise InputError(f"unusable upload file name {name!r}")
    return base


class UploadBudget:
    """Counts the bytes of one upload (it may arrive in several chunks) against a limit."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise LCTfoundError("the upload limit must be positive")
        self.max_bytes = int(max_bytes)
        self.received = 0
        self.exceeded = False

    def add(self, size: int) -> bool:
        """Count ``size`` more bytes; False (and `exceeded`) once the total is over the limit."""
        self.received += max(int(size), 0)
        if self.received > self.max_bytes:
            self.exceeded = True
        return not self.exceeded

    def message(self) -> str:
        return (f"upload refused: {format_bytes(self.received)} is more than this server accepts "
                f"({format_bytes(self.max_bytes)}); open the file from a server-side data folder instead")


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


# ---------------------------------------------------------------------------------------------
# Access gate (aiohttp middleware)
# ---------------------------------------------------------------------------------------------


def _refusal_page(title: str, message: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>LCTfound</title>"
        "<link rel='icon' href='data:,'></head>"
        "<body style='font-family: sans-serif; margin: 3em; max-width: 40em'>"
        f"<h1>{escape(title)}</h1><p id='lctfound-refusal'>{escape(message)}</p></body></html>"
    )


class AccessGate:
    """Token, host, origin and single-user checks of every HTTP request (see the module docstring)."""

    def __init__(self, token: Optional[str], loopback_only: bool, clock: Callable[[], float] = time.monotonic):
        self.token = token or None
        self.loopback_only = loopback_only
        self._clock = clock
        self.owner: Optional[str] = None
        self._owner_connections = 0
        self._owner_left_at: Optional[float] = None
        #: wslink client ids whose websocket upgrade carried a valid token cookie.
        self._ws_clients_with_token: set[str] = set()

    # -- single checks (unit-tested) -----------------------------------------------------------

    def token_ok(self, query_secret: Optional[str], cookie: Optional[str]) -> bool:
        if self.token is None:
            return True
        return any(value is not None and hmac.compare_digest(value.encode(), self.token.encode())
                   for value in (query_secret, cookie))

    def host_ok(self, host_header: Optional[str]) -> bool:
        if not self.loopback_only:
            return True
        if not host_header:
            return False
        host = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback(host)

    @staticmethod
    def origin_ok(origin: Optional[str], host_header: Optional[str]) -> bool:
        """A websocket may be opened by the page's own origin, or by a client that sends none."""
        if origin is None:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host_header) and parts.netloc.lower() == host_header.lower()

    def session_refusal(self, session: Optional[str]) -> str:
        """Why ``session`` may not use the server now ('' when it may)."""
        if self.owner is None or session == self.owner:
            return ""
        if self._owner_connections > 0:
            return ("This LCTfound server is in use by another browser: it serves one user at a time. "
                    "Start your own server with `lctfound web`, or wait until the other user closes the page.")
        if self._owner_left_at is not None and self._clock() - self._owner_left_at < OWNER_GRACE_S:
            return ("This LCTfound server was in use by another browser a moment ago; reload this page in a few "
                    "seconds.")
        return ""

    def take_ownership(self, session: str) -> None:
        if self.owner != session:
            self.owner = session
            self._owner_connections = 0
            self._owner_left_at = None

    def owner_connected(self) -> None:
        self._owner_connections += 1
        self._owner_left_at = None

    def owner_disconnected(self) -> None:
        self._owner_connections = max(self._owner_connections - 1, 0)
        if self._owner_connections == 0:
            self._owner_left_at = self._clock()

    # -- wslink hooks --------------------------------------------------------------------------

    def note_ws_client(self, request: Any, client_id: str) -> None:
        """wslink ``onConnect``: remember connections admitted with the token cookie."""
        cookies = getattr(request, "cookies", {}) or {}
        if self.token is not None and self.token_ok(None, cookies.get(TOKEN_COOKIE)):
            self._ws_clients_with_token.add(client_id)

    def forget_ws_client(self, client_id: str) -> None:
        self._ws_clients_with_token.discard(client_id)

    async def validate_ws_token(self, secret: Any, client_id: str) -> bool:
        """wslink ``validateToken``: the hello secret must be the token, unless the websocket
        upgrade itself carried the token cookie (a reloaded page no longer has ``?secret=``)."""
        if self.token is None:
            return True
        if client_id in self._ws_clients_with_token:
            return True
        return isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.token.encode())

    # -- the middleware ------------------------------------------------------------------------

    def middleware(self) -> Callable[..., Awaitable[Any]]:
        from aiohttp import web

        gate = self

        @web.middleware
        async def access_gate(request: "web.Request", handler: Callable[..., Awaitable[Any]]) -> Any:
            is_page = request.path in PAGE_PATHS
            is_ws = request.path == WEBSOCKET_PATH
            host = request.headers.get("Host")
            if not gate.host_ok(host):
                return web.Response(status=403, text="LCTfound: this server only answers requests addressed to "
                                    "127.0.0.1 or localhost\n")
            query_secret = request.query.get("secret")
            cookie_token = request.cookies.get(TOKEN_COOKIE)
            if not gate.token_ok(query_secret, cookie_token):
                message = ("This LCTfound server needs its access token: open the URL that `lctfound web` printed "
                           "(it ends with ?secret=...).")
                if is_page:
                    return web.Response(status=401, content_type="text/html",
                                        text=_refusal_page("Access token required", message))
                return web.Response(status=401, text=f"LCTfound: {message}\n")
            if is_ws and not gate.origin_ok(request.headers.get("Origin"), host):
                return web.Response(status=403, text="LCTfound: websocket from another web site refused\n")
            session = request.cookies.get(SESSION_COOKIE)
            new_session = None
            if is_page and not session:
                session = new_session = secrets.token_urlsafe(16)
            if is_page or is_ws:
                refusal = gate.session_refusal(session)
                if refusal:
                    if is_page:
                        response = web.Response(status=409, content_type="text/html",
                                                text=_refusal_page("Server in use", refusal))
                        if new_session:
                            response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="Strict")
                        return response
                    return web.Response(status=409, text=f"LCTfound: {refusal}\n")
            if is_ws:
                gate.take_ownership(session or "")
                gate.owner_connected()
                try:
                    return await handler(request)
                finally:
                    gate.owner_disconnected()
            response = await handler(request)
            if is_page or query_secret is not None:
                if new_session:
                    response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="Strict")
                if gate.token is not None and query_secret is not None:
                    response.set_cookie(TOKEN_COOKIE, query_secret, httponly=True, samesite="Strict")
            return response

        return access_gate
