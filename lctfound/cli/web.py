"""``lctfound web``: the LCTfound panels in the browser (trame-slicer), one user per process."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError, set_command_options
from ..validation import float_type, int_type


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "web", help="serve the segmentation, enhancement, training and export panels in a web browser",
        description=(
            "Serve the LCTfound panels (segmentation with the Segment Editor, enhancement, training, export) in a "
            "browser, over the same logic as the 3D Slicer modules. Listens on 127.0.0.1 by default; any other "
            "address needs an access token. One user per server process. Needs `pip install 'lctfound[web]'`."),
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; anything else needs --token/--token-file)")
    parser.add_argument("--port", type=int_type(0, 65535), default=0,
                        help="port (default 0: a free one; the URL is printed)")
    parser.add_argument("--data-root", action="append", default=[], metavar="FOLDER",
                        help="folder whose CT files the page may open on the server (repeatable); paths outside "
                             "every data root are refused")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="access token (>= 16 characters) the page URL must carry; prefer --token-file, "
                                       "a command line is visible to other local users")
    token.add_argument("--token-file", metavar="FILE", help="read the access token from the first line of FILE")
    token.add_argument("--new-token", action="store_true", help="make a random access token and print it in the URL")
    parser.add_argument("--max-upload-mb", type=float_type(above=0, maximum=10_000_000), default=1024.0,
                        help="largest upload accepted, in MB (default 1024)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where exports are written before download (default <cache>/web-exports)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="run folders of training jobs (default <cache>/runs)")
    parser.add_argument("--sample-downsample", type=int_type(1, 64), default=1, metavar="N",
                        help="load the built-in sample shrunk N times in-plane (fast demos and tests; default 1)")
    parser.add_argument("--sample-slices", default=None, metavar="FIRST-LAST",
                        help="load only these slices of the built-in sample")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The `WebConfig` of the command line (every safety rule checked here, before any import
    of trame)."""
    from ..paths import cache_root
    from ..web.config import WebConfig
    from ..web.loading import SampleOptions, parse_slice_range
    from ..web.security import DataRoots, check_bind, check_token, new_token, read_token_file

    if args.token_file:
        token = read_token_file(args.token_file)
    elif args.token:
        token = check_token(args.token)
    elif args.new_token:
        token = new_token()
    else:
        token = None
    check_bind(args.host, token)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: choose 0..65535")
    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be positive")
    if args.sample_downsample < 1:
        raise InputError("--sample-downsample must be at least 1")
    first, last = parse_slice_range(args.sample_slices) if args.sample_slices else (None, None)
    return WebConfig(
        host=args.host, port=args.port, token=token, data_roots=DataRoots(args.data_root),
        max_upload_bytes=int(args.max_upload_mb * 1_000_000),
        export_dir=(args.export_dir or cache_root() / "web-exports").expanduser().resolve(),
        runs_root=args.runs_dir.expanduser().resolve() if args.runs_dir else None,
        sample=SampleOptions(args.sample_downsample, first, last),
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # From here on errors are shown in a browser, where no command-line option can be given.
    set_command_options(())
    from ..web.server import serve

    return serve(config)
