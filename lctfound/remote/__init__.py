"""Thin client of `lctfound serve`: run LCTfound jobs on a department server.

Needs only numpy, httpx and zstandard (``pip install 'lctfound[remote]'``) — no torch, no diffusers,
no SimpleITK — so a CPU-only Slicer or laptop can use a GPU server. Used by the command line
(``--server URL``) and meant for the module logics.

The access token comes from ``LCTFOUND_SERVER_TOKEN`` or a file (`read_token`), never from a command
line. Every failure is a `RemoteError` whose message is one sentence.
"""

from __future__ import annotations

import getpass
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .. import __version__
from ..errors import LCTfoundError
from .wire import API_VERSION, WireError, check_name, decode_volume, encode_volume

TOKEN_ENVIRONMENT = "LCTFOUND_SERVER_TOKEN"
#: A PEM file of the certificate authority (or the self-signed certificate) of an HTTPS server.
CA_ENVIRONMENT = "LCTFOUND_SERVER_CA_FILE"
CLIENT_ENVIRONMENT = "LCTFOUND_CLIENT_ID"
CHUNK_BYTES = 8 * 1024 * 1024
_RETRIES = 3


class RemoteError(LCTfoundError):
    """The server could not be reached, refused a request or lost a job; one sentence."""


class ServerLost(RemoteError):
    """The server stopped answering (killed, restarted, network down)."""


def read_token(token_file: Optional[str] = None) -> str:
    """The access token: from ``token_file`` when given, else ``$LCTFOUND_SERVER_TOKEN``."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            raise RemoteError(f"{path}: cannot read an access token from this file") from None
        return token
    token = os.environ.get(TOKEN_ENVIRONMENT, "").strip()
    if not token:
        raise RemoteError(f"no access token for the server; set {TOKEN_ENVIRONMENT} to the token the server's "
                          "administrator gave you (the file 'token' in the server's data folder)",
                          option_hints={"token_file": "or give --token-file FILE"})
    return token


def default_client_id() -> str:
    """``$LCTFOUND_CLIENT_ID``, else ``user-host`` folded into a valid name: the server keeps each
    client's uploads, jobs, models and limits apart."""
    given = os.environ.get(CLIENT_ENVIRONMENT)
    if given:
        return check_name(given, CLIENT_ENVIRONMENT)
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "user"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{user}-{platform.node()}").strip(".-_")[:64]
    return name if name and name[0].isalnum() else "default"


class RemoteClient:
    """One server, one client id. ``url`` like ``http://127.0.0.1:8765`` or ``https://gpu.example.org``.
    HTTPS certificates are checked against the system's authorities, or against ``ca_file`` (default
    ``$LCTFOUND_SERVER_CA_FILE``) for a department's own certificate."""

    def __init__(self, url: str, token: str, client_id: Optional[str] = None, timeout: float = 60.0,
                 ca_file: Optional[str] = None):
        import ssl

        import httpx

        ca_file = ca_file or os.environ.get(CA_ENVIRONMENT) or None
        verify: Any = True
        if ca_file:
            try:
                verify = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()))
            except (OSError, ssl.SSLError) as error:
                raise RemoteError(f"{ca_file}: not a readable PEM certificate file ({error})") from None

        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise RemoteError(f"{url!r} is not a server address; give one like http://127.0.0.1:8765")
        self.url = url.rstrip("/")
        self.client_id = check_name(client_id or default_client_id(), "client id")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=verify,
                                  headers={"Authorization": f"Bearer {token}", "X-LCTfound-Client": self.client_id,
                                           "X-LCTfound-API": str(API_VERSION)})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, retries: int = _RETRIES, **kwargs) -> Any:
        """JSON of a successful request; a connection failure is retried ``retries`` times (a short
        network drop), then `ServerLost`; an error status is a `RemoteError` with the server's sentence."""
        import httpx

        for attempt in range(retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as error:
                if "CERTIFICATE_VERIFY_FAILED" in str(error):
                    raise RemoteError(f"the certificate of {self.url} is not trusted; set {CA_ENVIRONMENT} to the "
                                      "server's certificate (PEM) or that of its authority") from None
                if attempt == retries:
                    raise ServerLost(f"the server at {self.url} does not answer ({_reason(error)})") from None
                time.sleep(0.5 * (attempt + 1))
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            raise RemoteError(f"the server at {self.url} refused {method} {path.split('?')[0]} "
                              f"({response.status_code}): {detail or response.reason_phrase}")
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def health(self) -> dict:
        return self._request("GET", "/health", retries=0)

    def check_version(self) -> dict:
        """The server's versions; a different API or lctfound version is one sentence."""
        found = self._request("GET", "/version", retries=0)
        if found.get("api") != API_VERSION or found.get("lctfound") != __version__:
            raise RemoteError(f"the server at {self.url} runs lctfound {found.get('lctfound')} (API {found.get('api')}) "
                              f"and this client lctfound {__version__} (API {API_VERSION}); install the same "
                              "version on both")
        return found

    def test_connection(self) -> str:
        """One line for a "Test connection" button: reachable, token accepted, versions agree."""
        self.health()
        info = self.check_version()
        models = self.models()
        return (f"connected to {self.url}: lctfound {info['lctfound']}, models {', '.join(models['server'])}"
                + (f"; yours: {', '.join(models['yours'])}" if models["yours"] else ""))

    def models(self) -> dict:
        return self._request("GET", "/models")

    def info(self) -> dict:
        """The server's description: its tasks (``[{"name", "description", "inputs", "options", ...}]``),
        queue and this client's limits."""
        return self._request("GET", "/info")

    # -- volumes ----------------------------------------------------------------------------

    def upload_volume(self, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None,
                      chunk_bytes: int = CHUNK_BYTES) -> str:
        """Send a volume (compressed, checksummed) in chunks; returns its upload id. A dropped
        connection resumes from what the server has."""
        header, body = encode_volume(array, spacing, origin, direction)
        upload = self._request("POST", "/uploads", json={"header": header})["upload"]
        self.resume_upload(upload, body, chunk_bytes)
        return upload

    def resume_upload(self, upload: str, body: bytes, chunk_bytes: int = CHUNK_BYTES) -> dict:
        status = self._request("GET", f"/uploads/{upload}")
        while not status["complete"]:
            offset = int(status["received"])
            try:
                status = self._request("PUT", f"/uploads/{upload}", params={"offset": offset},
                                       content=body[offset:offset + chunk_bytes], retries=0)
            except ServerLost:
                status = self._request("GET", f"/uploads/{upload}")  # retried: resumes where the server is
        return status

    def download_result(self, job_id: str) -> tuple[dict, Optional[np.ndarray]]:
        """``(result, array)``: the result record (provenance, label names, the new model's name, or a
        ``"kind": "json"`` task's ``data``: a table's rows, an embedding) and the result volume (None
        unless the task's result is a volume)."""
        result = self._request("GET", f"/jobs/{job_id}/result")
        if "header" not in result:
            return result, None
        body = b""
        while len(body) < int(result["header"]["compressed_bytes"]):
            chunk = self._request("GET", f"/jobs/{job_id}/result/data", params={"offset": len(body)})
            if not chunk:
                raise RemoteError(f"the server sent an empty result for job {job_id}")
            body += chunk
        try:
            return result, decode_volume(result["header"], body)
        except WireError as error:
            raise RemoteError(f"the result of job {job_id} arrived damaged ({error})") from None

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, task: str, inputs: Mapping[str, str], options: Optional[Mapping[str, Any]] = None) -> dict:
        return self._request("POST", "/jobs", json={"task": task, "inputs": dict(inputs),
                                                    "options": dict(options or {})}, retries=0)

    def events(self, job_id: str, after: int = 0, wait: float = 10.0) -> dict:
        return self._request("GET", f"/jobs/{job_id}/events", params={"after": after, "wait": wait},
                             timeout=wait + 30.0)

    def cancel(self, job_id: str) -> dict:
        return self._request("DELETE", f"/jobs/{job_id}", timeout=30.0)

    def follow(self, job_id: str, on_event: Optional[Callable[[dict], None]] = None) -> dict:
        """Wait for a job to end, passing each of its events to ``on_event``; returns the last status.
        A failed or cancelled job is a `RemoteError`; a server that stops answering is `ServerLost`."""
        after = 0
        while True:
            try:
                status = self.events(job_id, after)
            except ServerLost as lost:
                raise ServerLost(f"{lost} while job {job_id} was running; nothing was written") from None
            for event in status["new_events"]:
                if on_event is not None and event.get("event") != "exit":
                    on_event(event)
            after = status["next"]
            if status["state"] == "finished":
                return status
            if status["state"] in ("failed", "cancelled"):
                raise RemoteError(f"the job on {self.url} {status['state']}: {status['error'] or status['state']}")

    def run(self, task: str, volumes: Mapping[str, tuple], options: Optional[Mapping[str, Any]] = None,
            on_event: Optional[Callable[[dict], None]] = None,
            on_submit: Optional[Callable[[str], None]] = None) -> tuple[dict, Optional[np.ndarray]]:
        """Upload ``volumes`` (name -> ``(array, spacing, origin, direction)``), run ``task``, follow it
        and download its result. Ctrl-C cancels the job on the server."""
        inputs = {name: self.upload_volume(*volume) for name, volume in volumes.items()}
        job = self.submit(task, inputs, options)
        if on_submit is not None:
            on_submit(job["job"])
        try:
            self.follow(job["job"], on_event)
        except KeyboardInterrupt:
            try:
                self.cancel(job["job"])
            except RemoteError:
                pass
            raise
        return self.download_result(job["job"])


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    if "refused" in text.lower():
        return "connection refused"
    return text or type(error).__name__
