"""Qt-free "Run on" support for the module logics: a department server (`lctfound serve`) instead
of this computer.

A module keeps the server's address (and optionally a token file) in its parameters (``server_url``,
``server_token_file``); "Test connection" reaches the server once (`connect`) and keeps what it offers
(its tasks, backbones, and the models this client trained there), so that button states and selectors
never wait on the network. Each module logic maps its panel's task to the server task that runs it
(`ModuleLogicBase.server_tasks`) and asks the connection whether this server runs it
(`ServerConnection.runs`): a server that gains a task needs no change in the panels. Jobs still run as
local child processes: the same `lctfound` command with ``--server URL`` (`server_arguments`), which reads
and uploads the exported files, streams the server job's events and writes the result here — so
progress, Cancel and the result nodes work exactly as for a local job, and this computer needs only the
thin client (numpy, httpx, zstandard; no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ..errors import LCTfoundError


#: Seconds "Test connection" waits for each answer of the server.
CONNECT_TIMEOUT_S = 10.0


def normalized_url(url: str) -> str:
    """The address as the client uses it: stripped, no trailing slash."""
    return (url or "").strip().rstrip("/")


@dataclass
class ServerConnection:
    """What one successful "Test connection" learnt about a server."""

    url: str
    token_file: str = ""
    #: The status line of the test ("connected to …: lctfound …, models …").
    summary: str = ""
    #: Models the server offers to every client (backbones it was started with).
    server_models: list[str] = field(default_factory=list)
    #: Task models this client trained on the server.
    your_models: list[str] = field(default_factory=list)
    #: ``{model: {value: label name}}`` of the segmentation models (yours and those the server offers).
    labels: dict = field(default_factory=dict)
    #: Names of the tasks the server runs (``GET /info``), e.g. ``segment-train``, ``enhance-low-dose``.
    tasks: list[str] = field(default_factory=list)
    #: ``{model: kind}`` of the models it reads (a task model's kind such as ``vcta``, ``ctfm`` for a CT-FM
    #: encoder, ``ctfm-index`` for a CT-FM index, or ``backbone``; models offered by a registered name
    #: are not listed).
    kinds: dict = field(default_factory=dict)

    def backbones(self) -> list[str]:
        """The server's models an LCTfound backbone selector offers (those not known to be of another kind)."""
        return [name for name in self.server_models if self.kinds.get(name, "backbone") == "backbone"]

    def task_models(self, *kinds: str) -> list[str]:
        """The models of ``kinds`` (task.json ``task`` values, ``ctfm`` or ``ctfm-index``) a job may name:
        offered by the server or trained there by this client."""
        wanted = {kind for kind in kinds if kind}
        return sorted(name for name in set(self.server_models) | set(self.your_models)
                      if self.kinds.get(name) in wanted)

    def runs(self, task: str) -> bool:
        """Whether the server runs the server task ``task``."""
        return task in self.tasks

    def matches(self, url: str, token_file: str = "") -> bool:
        return self.url == normalized_url(url) and self.token_file == (token_file or "").strip()


def connect(url: str, token_file: str = "") -> ServerConnection:
    """Reach the server at ``url``: reachable, token accepted, same lctfound version; its model lists.
    Any failure is one `LCTfoundError` sentence."""
    address = normalized_url(url)
    if not address:
        raise LCTfoundError("Enter the server's address, e.g. http://gpu-host:8765.")
    if not address.startswith(("http://", "https://")):
        raise LCTfoundError(f"'{address}' is not a server address: it starts with http:// or https://.")
    try:
        from ..remote import RemoteClient, read_token
    except ImportError as error:
        raise LCTfoundError(f"The server client needs {error.name}: install the dependencies for server mode "
                            "(pip install 'lctfound[remote]').") from None
    # A short timeout: the button waits in the panel's thread (Slicer's or the browser server's loop).
    client = RemoteClient(address, read_token(token_file.strip() or None), timeout=CONNECT_TIMEOUT_S)
    try:
        summary = client.test_connection()
        models = client.models()
        tasks = [str(task.get("name")) for task in client.info().get("tasks", []) if isinstance(task, dict)]
    finally:
        client.close()
    labels = {str(name): {int(value): str(text) for value, text in (names or {}).items()}
              for name, names in (models.get("labels") or {}).items()}
    summary += f"; tasks {', '.join(sorted(tasks))}" if tasks else "; it runs no tasks"
    return ServerConnection(address, (token_file or "").strip(), summary, sorted(models.get("server", [])),
                            sorted(models.get("yours", [])), labels, sorted(tasks),
                            {str(name): str(kind) for name, kind in (models.get("kinds") or {}).items()})


def server_arguments(connection: ServerConnection) -> list[str]:
    """The command-line options that run a job on ``connection``'s server (the token travels in a file
    or in the environment, never on a command line)."""
    return ["--server", connection.url] + (["--token-file", connection.token_file] if connection.token_file else [])


def check_server_model_name(name: str, connection: ServerConnection) -> str:
    """Why ``name`` cannot name a new model on the server, or ''."""
    from ..remote.wire import check_name

    text = (name or "").strip()
    if not text:
        return "Enter a name for the new model."
    try:
        check_name(text, "model name")
    except LCTfoundError as error:
        return str(error)
    if text in connection.your_models:
        return f"You already have a model named '{text}' on the server; choose another name."
    return ""
