"""``lctfound serve``: run LCTfound jobs for other machines (a department GPU server)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..validation import float_type, int_type


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run jobs for thin clients (Slicer, browser, `--server` on the command line)",
        description="A job server: clients upload volumes (zstd-compressed, checksummed), run segment train, "
                    "segment predict, the enhance tasks and generate (GET /version lists the tasks) on this "
                    "machine's devices, follow their progress, cancel "
                    "them and download the results. Task models trained here stay here, listed for the client "
                    "that trained them. Every request but /health needs the access token, made on first start "
                    "and stored (0600) in DATA/token. Needs `pip install 'lctfound[server]'`.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; another address needs --certfile/--keyfile, "
                             "or --behind-tls-proxy when a reverse proxy terminates TLS)")
    parser.add_argument("--port", type=int_type(1, 65535), default=8765, help="port (default 8765)")
    parser.add_argument("--data", metavar="FOLDER",
                        help="server data folder: token, uploads, jobs, task models (default <cache>/server)")
    parser.add_argument("--device", default="cpu",
                        help="comma list of devices, one worker each, e.g. cuda:0,cuda:1 (default cpu)")
    parser.add_argument("--models", nargs="+", action="extend", default=[], metavar="NAME=MODEL",
                        help="models offered to every client by name: NAME=FOLDER or NAME=REGISTERED_NAME "
                             "('default', the embedded model, is always offered)")
    parser.add_argument("--certfile", help="TLS certificate (PEM) for HTTPS")
    parser.add_argument("--keyfile", help="TLS private key (PEM) for HTTPS")
    parser.add_argument("--behind-tls-proxy", action="store_true",
                        help="allow a non-loopback --host without --certfile: a reverse proxy in front terminates TLS")
    parser.add_argument("--max-upload-mb", type=float_type(above=0), default=2048.0,
                        help="largest compressed volume a client may upload, in MB (default 2048)")
    parser.add_argument("--quota-gb", type=float_type(above=0), default=20.0,
                        help="disk space per client for uploads, results and models, in GB (default 20)")
    parser.add_argument("--max-jobs-per-client", type=int_type(1, 1000), default=2,
                        help="jobs a client may have queued or running at once (default 2)")
    parser.add_argument("--expire-hours", type=float_type(above=0), default=24.0,
                        help="uploads and job results are removed this long after they were made (default 24)")
    parser.set_defaults(func=run_serve)


def _server_models(entries) -> dict:
    models = {"default": "default"}
    for entry in entries:
        name, sep, model = entry.partition("=")
        if not sep or not name or not model:
            raise InputError(f"--models {entry!r}: give NAME=FOLDER or NAME=REGISTERED_NAME")
        from ..remote.wire import check_name

        check_name(name, "model name")
        path = Path(model).expanduser()
        models[name] = str(path.resolve()) if path.exists() else model
    return models


def run_serve(args: argparse.Namespace) -> int:
    from ..web.security import is_loopback

    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if not devices:
        raise InputError("--device is empty; give cpu or a comma list such as cuda:0,cuda:1")
    if bool(args.certfile) != bool(args.keyfile):
        raise InputError("give both --certfile and --keyfile for HTTPS")
    for path in (args.certfile, args.keyfile):
        if path and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    if not is_loopback(args.host) and not args.certfile and not args.behind_tls_proxy:
        raise InputError(f"refusing to listen on {args.host} without TLS: the access token would cross the network in "
                         "clear text; give --certfile/--keyfile, or --behind-tls-proxy when a reverse proxy "
                         "terminates TLS, or keep --host 127.0.0.1")
    models = _server_models(args.models)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("lctfound serve needs FastAPI and uvicorn: pip install 'lctfound[server]'") from None
    from ..devices import resolve_device
    from ..paths import cache_root
    from ..server.app import create_app
    from ..server.queue import JobQueue
    from ..server.store import Store, load_or_create_token

    for device in devices:
        resolve_device(device)  # an unavailable device is one line before the server starts
    data = Path(args.data).expanduser() if args.data else cache_root() / "server"
    token, created = load_or_create_token(data)
    store = Store(data, max_upload_bytes=args.max_upload_mb * 1e6, quota_bytes=args.quota_gb * 1e9,
                  expire_seconds=args.expire_hours * 3600)
    store.sweep(every_job=True)  # jobs of an earlier run cannot be reached any more
    queue = JobQueue(store, devices, models, args.max_jobs_per_client)
    app = create_app(store, queue, token, sweep_seconds=min(600.0, args.expire_hours * 900))
    scheme = "https" if args.certfile else "http"
    if created:
        print(f"new access token (shown once; stored in {data / 'token'}): {token}", flush=True)
    else:
        print(f"access token in {data / 'token'}", flush=True)
    print(f"lctfound serve: {scheme}://{args.host}:{args.port} with {len(devices)} worker(s) on "
          f"{', '.join(devices)}; models {', '.join(sorted(models))}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", timeout_graceful_shutdown=10)
    return 0

