"""The HTTP interface of `lctfound serve` (FastAPI on uvicorn).

Why FastAPI + uvicorn: both are maintained, pure-Python installs with small footprints (no
compiled web stack needed), uvicorn takes TLS certificates directly, and FastAPI's dependency
system puts the token check in one place in front of every route. The peers (MONAI Label's and
nnInteractive's servers) use the same stack.

Every route except ``GET /health`` needs ``Authorization: Bearer <token>`` (checked with
`hmac.compare_digest`); without it the answer is 401 and nothing runs. A client names itself with
``X-LCTfound-Client`` (a checked name; its uploads, jobs, models and limits are kept apart) and its
interface version with ``X-LCTfound-API``. Errors are ``{"detail": "<one sentence>"}``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import threading

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .. import __version__
from ..errors import LCTfoundError
from ..remote.wire import API_VERSION, check_name
from .queue import JobQueue
from .store import Store, StoreError
from .tasks import TaskError, check_request, describe_tasks

logger = logging.getLogger(__name__)

CLIENT_HEADER = "X-LCTfound-Client"
API_HEADER = "X-LCTfound-API"
DEFAULT_CLIENT = "default"
#: Largest JSON body (a job request) accepted.
MAX_JSON_BYTES = 64 * 1024


def create_app(store: Store, queue: JobQueue, token: str, sweep_seconds: float = 600.0) -> FastAPI:
    stop_sweeping = threading.Event()
    upload_locks: dict = collections.defaultdict(asyncio.Lock)

    def sweep_periodically() -> None:
        while not stop_sweeping.wait(sweep_seconds):
            try:
                queue.expire()
                store.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried next time
                logger.exception("sweeping expired results failed")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        sweeper = threading.Thread(target=sweep_periodically, name="lctfound-sweeper", daemon=True)
        sweeper.start()
        try:
            yield
        finally:
            stop_sweeping.set()
            await asyncio.get_running_loop().run_in_executor(None, queue.stop)

    app = FastAPI(title="LCTfound server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, error: StoreError):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(LCTfoundError)
    async def user_error(request: Request, error: LCTfoundError):
        return JSONResponse({"detail": str(error)}, status_code=400)

    def authorised_client(request: Request) -> str:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong access token; ask the server's administrator for it",
                                headers={"WWW-Authenticate": "Bearer"})
        api = request.headers.get(API_HEADER)
        if api is not None and api != str(API_VERSION):
            raise HTTPException(409, f"this server speaks LCTfound API {API_VERSION} (lctfound {__version__}) and the "
                                     f"client API {api}; install the server's lctfound version on the client")
        client = request.headers.get(CLIENT_HEADER, DEFAULT_CLIENT)
        try:
            return check_name(client, "client id")
        except LCTfoundError as error:
            raise HTTPException(400, str(error)) from None

    async def json_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_JSON_BYTES):
            raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        try:
            value = json.loads(body or b"{}")
        except ValueError:
            raise HTTPException(400, "the request body is not JSON") from None
        if not isinstance(value, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return value

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    api = APIRouter(dependencies=[Depends(authorised_client)])

    @api.get("/version")
    def version() -> dict:
        return {"lctfound": __version__, "api": API_VERSION}

    @api.get("/info")
    def info(client: str = Depends(authorised_client)) -> dict:
        return {"lctfound": __version__, "api": API_VERSION, "tasks": describe_tasks(), **queue.snapshot(),
                "max_upload_bytes": store.max_upload_bytes, "quota_bytes": store.quota_bytes,
                "used_bytes": store.usage(client), "max_jobs_per_client": queue.max_jobs_per_client,
                "expire_seconds": store.expire_seconds}

    @api.get("/models")
    def models(client: str = Depends(authorised_client)) -> dict:
        from pathlib import Path

        from .tasks import model_kind, model_label_names

        yours = store.list_models(client)
        folders = {name: Path(folder) for name, folder in queue.server_models.items() if os.path.isabs(folder)}
        folders.update({name: store.models(client) / name for name in yours})
        # The label names let a client name the segments of a prediction made with a model (its own or one
        # the server offers); the kinds let a panel offer only the models its task can use.
        return {"yours": yours, "server": sorted(queue.server_models),
                "labels": {name: model_label_names(folder) for name, folder in folders.items()},
                "kinds": {name: model_kind(folder) for name, folder in folders.items()}}

    @api.post("/uploads", status_code=201)
    async def create_upload(request: Request, client: str = Depends(authorised_client)) -> dict:
        body = await json_body(request)
        return store.create_upload(client, body.get("header"))

    @api.get("/uploads/{upload}")
    def upload_status(upload: str, client: str = Depends(authorised_client)) -> dict:
        return store.upload_status(client, upload)

    @api.put("/uploads/{upload}")
    async def upload_chunk(upload: str, offset: int, request: Request,
                           client: str = Depends(authorised_client)) -> dict:
        """Append a chunk at ``offset`` (which must be the length received so far: an upload resumes
        from `GET /uploads/{id}` after a dropped connection)."""
        async with upload_locks[upload]:
            header = store.upload_header(client, upload)
            status = store.upload_status(client, upload)
            if status["complete"]:
                return status
            if offset != status["received"]:
                return JSONResponse({"detail": f"the upload has {status['received']} bytes; send from there",
                                     "received": status["received"]}, status_code=409)
            room = header["compressed_bytes"] - offset
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > room):
                raise HTTPException(413, f"the chunk runs past the {header['compressed_bytes']} bytes declared")
            part = store.part_path(client, upload)
            written = 0
            with open(part, "ab") as handle:
                try:
                    async for chunk in request.stream():
                        written += len(chunk)
                        if written > room:
                            raise HTTPException(413, f"the chunk runs past the {header['compressed_bytes']} "
                                                     "bytes declared")
                        handle.write(chunk)
                except BaseException:
                    # Keep what arrived whole (resumable) unless it overran the declared size.
                    handle.flush()
                    if written > room:
                        handle.truncate(offset)
                    raise
            if offset + written == header["compressed_bytes"]:
                await asyncio.get_running_loop().run_in_executor(None, store.finish_upload, client, upload)
            return store.upload_status(client, upload)

    @api.post("/jobs", status_code=202)
    async def submit(request: Request, client: str = Depends(authorised_client)) -> dict:
        body = await json_body(request)
        try:
            task, inputs, options = check_request(body.get("task"), body.get("inputs", {}), body.get("options", {}))
        except TaskError as error:
            raise HTTPException(422, str(error)) from None
        job = await asyncio.get_running_loop().run_in_executor(None, queue.submit, client, task, inputs, options)
        return {**job.describe(), "position": queue.position(job)}

    @api.get("/jobs")
    def list_jobs(client: str = Depends(authorised_client)) -> dict:
        return {"jobs": [job.describe() for job in queue.jobs.values() if job.client == client]}

    @api.get("/jobs/{job_id}")
    def job_status(job_id: str, client: str = Depends(authorised_client)) -> dict:
        job = queue.get(client, job_id)
        return {**job.describe(), "position": queue.position(job)}

    @api.get("/jobs/{job_id}/events")
    def job_events(job_id: str, after: int = 0, wait: float = 0.0, client: str = Depends(authorised_client)) -> dict:
        return queue.events(client, job_id, max(0, after), wait)

    @api.delete("/jobs/{job_id}")
    def cancel(job_id: str, client: str = Depends(authorised_client)) -> dict:
        return queue.cancel(client, job_id).describe()

    @api.get("/jobs/{job_id}/result")
    def result(job_id: str, client: str = Depends(authorised_client)) -> dict:
        job = queue.get(client, job_id)
        if job.state != "finished":
            raise StoreError(f"job {job_id} has no result: it is {job.state}"
                             + (f" ({job.error})" if job.error else ""), 409)
        return job.result

    @api.get("/jobs/{job_id}/result/data")
    def result_data(job_id: str, offset: int = 0, client: str = Depends(authorised_client)) -> Response:
        """The compressed result volume from byte ``offset`` on (a dropped download resumes)."""
        path = queue.result_body(queue.get(client, job_id))
        if offset <= 0:
            return FileResponse(path, media_type="application/zstd")
        with open(path, "rb") as handle:
            handle.seek(offset)
            return Response(handle.read(), media_type="application/zstd")

    app.include_router(api)
    return app
