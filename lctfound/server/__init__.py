"""`lctfound serve`: one GPU (or CPU) machine runs LCTfound jobs for a whole department.

* `tasks` — the table of what a client may run: each entry turns checked options and server-side
  input files into the same ``lctfound ... --events`` command a local job runs;
* `store` — the server's data folder: token, uploads, per-client jobs and task models, quotas, expiry;
* `queue` — one worker per device, a queue shared by every client (round-robin between clients);
* `app` — the HTTP interface (FastAPI on uvicorn).

No client-chosen path is ever opened: clients name uploads, jobs and models by server-made ids and
checked names. The server never calls out to the internet.
"""
