"""The server's job queue: one worker thread per device, shared by every client.

A job waits in its client's queue; a free worker takes the next job of the client served least
recently (round-robin between clients, first come first served within one), so a client with many
jobs cannot starve the others. The worker writes the job's inputs into its folder, starts the same
``python -m lctfound ... --events`` command a local job runs (`lctfound.jobs.Job`, whose Cancel ends
the whole process tree) and keeps its events for the clients that poll them.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Optional

from ..jobs import Job
from .store import Store, StoreError
from .tasks import JobPaths, Task, model_label_names

logger = logging.getLogger(__name__)

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
ENDED = (FINISHED, FAILED, CANCELLED)
_POLL_SECONDS = 0.2


class ServerJob:
    def __init__(self, job_id: str, client: str, task: Task, inputs: dict, options: dict, folder: Path, sequence: int):
        self.id = job_id
        self.client = client
        self.task = task
        self.inputs = inputs
        self.options = options
        self.folder = folder
        self.sequence = sequence
        self.state = QUEUED
        self.events: list = []  # what the client follows
        #: The command's own ``result`` events: they name the server's files (and an index's volumes),
        #: so they stay here; the client gets the result from `JobQueue._result`.
        self.result_events: list = []
        self.error = ""
        self.device: Optional[str] = None
        self.result: dict = {}
        self.created = time.time()
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.process: Optional[Job] = None
        self.cancel_requested = False

    def describe(self) -> dict:
        return {"job": self.id, "task": self.task.name, "state": self.state, "error": self.error,
                "device": self.device, "events": len(self.events), "created": self.created,
                "started": self.started_at, "ended": self.ended_at}


class JobQueue:
    def __init__(self, store: Store, devices: list, models: dict, max_jobs_per_client: int):
        self.store = store
        self.devices = list(devices)
        self.server_models = dict(models)  # name -> folder or registry name, chosen by the administrator
        self.max_jobs_per_client = int(max_jobs_per_client)
        self.jobs: dict = {}
        self._pending: dict = collections.defaultdict(collections.deque)
        self._last_served: dict = {}
        self._turn = itertools.count()
        self._sequence = itertools.count()
        self._condition = threading.Condition()
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, args=(device,), name=f"lctfound-worker-{device}",
                                          daemon=True) for device in self.devices]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        """Stop taking jobs and cancel the running ones (server shutdown)."""
        with self._condition:
            self._stopping = True
            running = [job for job in self.jobs.values() if job.state == RUNNING]
            self._condition.notify_all()
        for job in running:
            job.cancel_requested = True
            if job.process is not None:
                job.process.cancel(timeout=3.0)

    # -- models -----------------------------------------------------------------------------

    def resolve_model(self, client: str, name: str) -> str:
        """A model name as the command gets it: the client's own model folder, else one the server
        offers (``--models``); anything else is refused."""
        folder = self.store.model_folder(client, name)
        if folder is not None:
            return str(folder)
        if name in self.server_models:
            return str(self.server_models[name])
        raise StoreError(f"no model {name!r} on this server; its models for you are "
                         f"{', '.join(self.model_names(client)) or 'none'}", 404)

    def model_names(self, client: str) -> list:
        return sorted(set(self.store.list_models(client)) | set(self.server_models))

    # -- submitting -------------------------------------------------------------------------

    def submit(self, client: str, task: Task, inputs: dict, options: dict) -> ServerJob:
        for key in task.model_options:
            if key in options and not (task.output == "model" and key == "model"):
                self.resolve_model(client, options[key])
        if task.output == "model":
            name = options["model"]
            if name in self.server_models:
                raise StoreError(f"{name!r} is a model this server offers to everyone; choose another name", 409)
            if self.store.model_folder(client, name) is not None and not options.get("overwrite"):
                raise StoreError(f"you already have a model {name!r} on this server; choose another name or "
                                 "set overwrite", 409)
        for upload in inputs.values():
            if not self.store.upload_status(client, upload)["complete"]:
                raise StoreError(f"upload {upload} is not complete; send the rest first", 409)
        self.store.check_quota(client)
        with self._condition:
            if self._stopping:
                raise StoreError("the server is shutting down", 503)
            active = [job for job in self.jobs.values() if job.client == client and job.state not in ENDED]
            if len(active) >= self.max_jobs_per_client:
                raise StoreError(f"you have {len(active)} job(s) queued or running, this server's limit per client; "
                                 "wait for one to end", 429)
            if task.output == "model" and any(job.task.output == "model" and job.options.get("model") == options["model"]
                                              for job in active):
                raise StoreError(f"a job of yours is already training model {options['model']!r}", 409)
            job_id = secrets.token_hex(16)
            folder = self.store.jobs(client) / job_id
            folder.mkdir(parents=True)
            job = ServerJob(job_id, client, task, inputs, options, folder, next(self._sequence))
            self.jobs[job_id] = job
            self._pending[client].append(job)
            self._condition.notify_all()
        logger.info("job %s (%s) queued for client %s", job_id, task.name, client)
        return job

    def get(self, client: str, job_id: str) -> ServerJob:
        job = self.jobs.get(job_id)
        if job is None or job.client != client:  # another client's job does not exist for this one
            raise StoreError(f"no job {job_id} (results are kept until they expire or the server restarts)", 404)
        return job

    def position(self, job: ServerJob) -> int:
        """How many queued jobs a worker takes before this one (0: next), following the round-robin."""
        with self._condition:
            if job.state != QUEUED:
                return 0
            order = self._order()
            return order.index(job) if job in order else 0

    def _order(self) -> list:
        pending = {client: list(jobs) for client, jobs in self._pending.items() if jobs}
        served = dict(self._last_served)
        order = []
        while pending:
            client = min(pending, key=lambda c: (served.get(c, -1), pending[c][0].sequence))
            order.append(pending[client].pop(0))
            served[client] = max(served.values(), default=0) + 1
            if not pending[client]:
                del pending[client]
        return order

    def events(self, client: str, job_id: str, after: int, wait: float) -> dict:
        """Events from index ``after`` on; waits up to ``wait`` s for one when there are none yet."""
        job = self.get(client, job_id)
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        with self._condition:
            while len(job.events) <= after and job.state not in ENDED and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            events = job.events[after:]
        return {**job.describe(), "position": self.position(job), "after": after, "next": after + len(events),
                "new_events": events}

    def cancel(self, client: str, job_id: str) -> ServerJob:
        job = self.get(client, job_id)
        with self._condition:
            if job.state == QUEUED:
                self._pending[client].remove(job)
                self._end(job, CANCELLED, "cancelled before it started")
                return job
            if job.state in ENDED:
                return job
            job.cancel_requested = True
            process = job.process
        if process is not None:
            process.cancel(timeout=5.0)
        return job

    # -- workers ----------------------------------------------------------------------------

    def _next_job(self) -> Optional[ServerJob]:
        with self._condition:
            while not self._stopping:
                clients = [client for client, jobs in self._pending.items() if jobs]
                if clients:
                    client = min(clients, key=lambda c: (self._last_served.get(c, -1), self._pending[c][0].sequence))
                    job = self._pending[client].popleft()
                    self._last_served[client] = next(self._turn)
                    job.state = RUNNING
                    job.started_at = time.time()
                    self._condition.notify_all()
                    return job
                self._condition.wait()
        return None

    def _end(self, job: ServerJob, state: str, error: str = "") -> None:
        """Caller holds the condition."""
        job.state, job.error, job.ended_at = state, error, time.time()
        job.events.append({"event": "exit", "state": state, "error": error})
        try:
            (job.folder / "ended").write_text(state)
        except OSError:
            pass
        self._condition.notify_all()

    def _work(self, device: str) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            job.device = device
            try:
                state, error = self._run(job, device)
            except Exception as failure:  # noqa: BLE001 - a job's failure must not end the worker
                logger.exception("job %s failed in the server", job.id)
                state, error = FAILED, f"the server could not run the job ({failure})"
            with self._condition:
                self._end(job, state, error)

    def _write_inputs(self, job: ServerJob) -> dict:
        from ..io.volume import CTVolume, write_volume

        files = {}
        for name, upload in job.inputs.items():
            header, array = self.store.read_upload(job.client, upload)
            if name in job.task.labels_inputs and array.dtype.kind == "f":
                raise StoreError(f"input {name!r} is a label map and must be sent as integers")
            volume = CTVolume(array, spacing=header["spacing"], origin=header["origin"], direction=header["direction"])
            # Scratch files read once by the job's child: uncompressed (gzip of a 512×512×300 CT costs seconds).
            files[name] = write_volume(volume, job.folder / "inputs" / f"{name}.nrrd", compress=False)
        return files

    def _run(self, job: ServerJob, device: str) -> tuple:
        inputs = self._write_inputs(job)
        output = job.folder / "output" / job.task.result_file
        paths = JobPaths(options=job.options, inputs=inputs, output=output,
                         model_folder=lambda name: self.resolve_model(job.client, name),
                         new_model_folder=lambda name: self.store.models(job.client) / name)
        device_option = [f"--device={device}"] if job.task.takes_device else []
        args = [*job.task.command, *job.task.build(paths), *device_option, "--events"]
        with self._condition:
            if job.cancel_requested or self._stopping:
                return CANCELLED, "cancelled before it started"
            job.process = Job.start(args, cwd=job.folder)
        (job.folder / "pid").write_text(str(job.process.pid))
        while True:
            events = job.process.poll()
            if events:
                with self._condition:
                    for event in events:
                        event.pop("received_at", None)
                        if event.get("event") == "result":
                            job.result_events.append(event)
                        elif event.get("event") != "exit":
                            job.events.append(self._without_server_paths(job, event))
                    self._condition.notify_all()
                end = next((event for event in events if event.get("event") == "exit"), None)
                if end is not None:
                    break
            time.sleep(_POLL_SECONDS)
        state = {"finished": FINISHED, "cancelled": CANCELLED}.get(end["state"], FAILED)
        if job.cancel_requested and state != FINISHED:
            state = CANCELLED
        if state != FINISHED:
            error = "cancelled" if state == CANCELLED else end.get("error") or "the job failed"
            return state, self._without_server_paths(job, {"error": error})["error"]
        job.result = self._result(job, output)
        return FINISHED, ""

    def _without_server_paths(self, job: ServerJob, event: dict) -> dict:
        """The event with the server's folders left out of its text (clients name models, not paths)."""
        text = json.dumps(event, default=str)
        shown = {str(folder) + os.sep: "" for folder in (self.store.models(job.client), job.folder / "output",
                                                          job.folder / "inputs")}
        shown.update({folder: name for name, folder in self.server_models.items() if os.path.isabs(folder)})
        shown[str(self.store.data)] = "(server)"
        for path in sorted(shown, key=len, reverse=True):  # the longest first: a folder before its parent
            text = text.replace(json.dumps(path)[1:-1], shown[path])
        return json.loads(text)

    def _result(self, job: ServerJob, output: Path) -> dict:
        """What the client downloads: the output volume (encoded once, here), the new model's name or
        the task's JSON result (``data``)."""
        from ..io.provenance import read_provenance
        from ..io.volume import read_volume
        from ..remote.wire import encode_volume

        if job.task.output == "model":
            name = job.options["model"]
            folder = self.store.model_folder(job.client, name)
            return {"kind": "model", "model": name, "labels": model_label_names(folder)}
        if job.task.output == "json":  # a table or record, sent as JSON (no server folder in it)
            data = job.task.read_result(output, job.result_events)
            return {"kind": "json", **self._without_server_paths(job, {"data": data})}
        # The command wrote (and checked) this volume: not validated as CT again (--no-validate inputs).
        volume = read_volume(output, labels=job.task.output == "labels", validate=False)
        header, body = encode_volume(volume.array, volume.spacing, volume.origin, volume.direction)
        (job.folder / "result.zst").write_bytes(body)
        # The record names models by the names clients use, not by the server's folders.
        result = {"kind": job.task.output, "header": header,
                  "provenance": self._without_server_paths(job, read_provenance(output))}
        if job.task.output == "labels":
            result["labels"] = model_label_names(Path(self.resolve_model(job.client, job.options["model"])))
        (job.folder / "result.json").write_text(json.dumps(result, default=str), encoding="utf-8")
        return result

    def result_body(self, job: ServerJob) -> Path:
        path = job.folder / "result.zst"
        if job.state != FINISHED or not path.is_file():
            raise StoreError(f"job {job.id} has no result volume ({job.state})", 409)
        return path

    def expire(self, now: Optional[float] = None) -> None:
        """Forget ended jobs older than the expiry time (their folders go with `Store.sweep`)."""
        now = time.time() if now is None else now
        with self._condition:
            for job_id, job in list(self.jobs.items()):
                if job.state in ENDED and job.ended_at is not None and now - job.ended_at > self.store.expire_seconds:
                    del self.jobs[job_id]

    def snapshot(self) -> dict:
        with self._condition:
            return {"queued": sum(len(jobs) for jobs in self._pending.values()),
                    "running": sum(1 for job in self.jobs.values() if job.state == RUNNING),
                    "workers": self.devices}
