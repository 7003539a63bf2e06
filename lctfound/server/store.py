"""The server's data folder: access token, uploads, jobs and task models of each client.

Layout (every name below ``clients/`` is made by the server or checked by `check_name`)::

    DATA/token                         the bearer token (0600)
    DATA/clients/<client>/uploads/     <id>.json (header) + <id>.part (while arriving) / <id>.zst (complete)
    DATA/clients/<client>/jobs/<id>/   one folder per job: inputs, output, the child's pid
    DATA/clients/<client>/models/      task models this client trained here (kept until removed)

Uploads and job folders expire (`Store.sweep`); models stay.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Optional

from ..errors import LCTfoundError
from ..remote.wire import check_header, check_name, decode_volume

logger = logging.getLogger(__name__)

TOKEN_FILE = "token"
#: secrets.token_urlsafe(32): 32 random bytes, 43 characters.
MIN_TOKEN_CHARS = 43


class StoreError(LCTfoundError):
    """A request the data folder cannot serve; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def load_or_create_token(data: Path) -> tuple[str, bool]:
    """``(token, created)``: the token in ``DATA/token``, made (0600, 32 random bytes) when missing.
    A token file others may read, or a short one, is refused."""
    path = data / TOKEN_FILE
    data.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        token = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
        return token, True
    if os.name != "nt" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise LCTfoundError(f"{path}: the access token is readable by other users; run chmod 600 {path}")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise LCTfoundError(f"{path}: the access token is shorter than {MIN_TOKEN_CHARS} characters; delete the "
                            "file and start again to make a new one")
    return token, False


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Store:
    def __init__(self, data: Path, max_upload_bytes: int, quota_bytes: int, expire_seconds: float):
        self.data = Path(data)
        self.max_upload_bytes = int(max_upload_bytes)
        self.quota_bytes = int(quota_bytes)
        self.expire_seconds = float(expire_seconds)
        (self.data / "clients").mkdir(parents=True, exist_ok=True)

    # -- folders ----------------------------------------------------------------------------

    def client_folder(self, client: str) -> Path:
        return self.data / "clients" / check_name(client, "client id")

    def uploads(self, client: str) -> Path:
        return self.client_folder(client) / "uploads"

    def jobs(self, client: str) -> Path:
        return self.client_folder(client) / "jobs"

    def models(self, client: str) -> Path:
        return self.client_folder(client) / "models"

    def usage(self, client: str) -> int:
        folder = self.client_folder(client)
        return folder_bytes(folder) if folder.is_dir() else 0

    def check_quota(self, client: str, adding: int = 0) -> None:
        used = self.usage(client)
        if used + adding > self.quota_bytes:
            raise StoreError(f"client {client} would use {(used + adding) / 1e6:.1f} MB on the server, over its "
                             f"quota of {self.quota_bytes / 1e6:.0f} MB; delete models or wait for results to expire",
                             507)

    # -- uploads ----------------------------------------------------------------------------

    def _upload_id(self, upload: str) -> str:
        if not isinstance(upload, str) or len(upload) != 32 or any(c not in "0123456789abcdef" for c in upload):
            raise StoreError(f"no upload {upload!r}", 404)
        return upload

    def create_upload(self, client: str, header: dict) -> dict:
        header = check_header(header)
        if header["compressed_bytes"] > self.max_upload_bytes:
            raise StoreError(f"the volume is {header['compressed_bytes'] / 1e6:.1f} MB compressed, over this server's "
                             f"upload limit of {self.max_upload_bytes / 1e6:.0f} MB", 413)
        self.check_quota(client, header["compressed_bytes"])
        folder = self.uploads(client)
        folder.mkdir(parents=True, exist_ok=True)
        upload = secrets.token_hex(16)
        (folder / f"{upload}.json").write_text(json.dumps(header), encoding="utf-8")
        (folder / f"{upload}.part").touch()
        return {"upload": upload, "received": 0, "complete": False}

    def upload_header(self, client: str, upload: str) -> dict:
        path = self.uploads(client) / f"{self._upload_id(upload)}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise StoreError(f"no upload {upload} (it may have expired; send the volume again)", 404) from None

    def upload_status(self, client: str, upload: str) -> dict:
        header = self.upload_header(client, upload)
        folder = self.uploads(client)
        if (folder / f"{upload}.zst").is_file():
            return {"upload": upload, "received": header["compressed_bytes"], "complete": True}
        part = folder / f"{upload}.part"
        received = part.stat().st_size if part.is_file() else 0
        return {"upload": upload, "received": received, "complete": False}

    def part_path(self, client: str, upload: str) -> Path:
        return self.uploads(client) / f"{self._upload_id(upload)}.part"

    def finish_upload(self, client: str, upload: str) -> None:
        """Check a fully received upload (size, checksum) and mark it complete; a bad one is removed."""
        header = self.upload_header(client, upload)
        part = self.part_path(client, upload)
        try:
            decode_volume(header, part.read_bytes())
        except LCTfoundError as error:
            part.unlink(missing_ok=True)
            (self.uploads(client) / f"{upload}.json").unlink(missing_ok=True)
            raise StoreError(str(error), 422) from None
        os.replace(part, part.with_suffix(".zst"))

    def read_upload(self, client: str, upload: str) -> tuple[dict, "object"]:
        """``(header, array)`` of a complete upload."""
        header = self.upload_header(client, upload)
        path = self.uploads(client) / f"{upload}.zst"
        if not path.is_file():
            raise StoreError(f"upload {upload} is not complete; send the rest first", 409)
        return header, decode_volume(header, path.read_bytes())

    # -- models -----------------------------------------------------------------------------

    def model_folder(self, client: str, name: str) -> Optional[Path]:
        folder = self.models(client) / check_name(name, "model name")
        return folder if (folder / "task.json").is_file() else None

    def list_models(self, client: str) -> list:
        folder = self.models(client)
        if not folder.is_dir():
            return []
        return sorted(path.name for path in folder.iterdir() if (path / "task.json").is_file())

    # -- expiry -----------------------------------------------------------------------------

    def sweep(self, now: Optional[float] = None, every_job: bool = False) -> int:
        """Remove uploads and job folders older than the expiry time (``every_job``: every job folder, at
        start-up, when no job of an earlier run can be reached any more). Returns how many went."""
        from ..atomic import remove_stale_temporaries

        now = time.time() if now is None else now
        removed = 0
        for client in (self.data / "clients").iterdir() if (self.data / "clients").is_dir() else ():
            uploads, jobs, models = client / "uploads", client / "jobs", client / "models"
            for path in uploads.iterdir() if uploads.is_dir() else ():
                if now - path.stat().st_mtime > self.expire_seconds:
                    path.unlink(missing_ok=True)
                    removed += 1
            for path in jobs.iterdir() if jobs.is_dir() else ():
                if every_job or (now - path.stat().st_mtime > self.expire_seconds and (path / "ended").exists()):
                    if every_job:
                        kill_orphan(path)
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            if models.is_dir() and every_job:
                remove_stale_temporaries(models)  # a training killed with the server
        return removed


def kill_orphan(job_folder: Path) -> None:
    """End the process group of a job that an earlier server run started and could not end (the
    server was killed): its pid is in the job folder, and it is ours only if its command line names
    that folder (pids are reused)."""
    import signal

    try:
        pid = int((job_folder / "pid").read_text().strip())
    except (OSError, ValueError):
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        try:
            import psutil

            command = " ".join(psutil.Process(pid).cmdline())
        except Exception:  # noqa: BLE001 - gone, or no way to tell: leave it alone
            return
    if str(job_folder) not in command:
        return
    logger.warning("ending job process %d left by an earlier server run", pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
