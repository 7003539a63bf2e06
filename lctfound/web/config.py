"""Settings of one ``lctfound web`` server (plain data, no trame)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .loading import SampleOptions
from .security import DataRoots

DEFAULT_MAX_UPLOAD_MB = 1024


@dataclass
class WebConfig:
    """What `lctfound.web.server.serve` needs. ``port`` 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    token: Optional[str] = None
    data_roots: DataRoots = field(default_factory=lambda: DataRoots(()))
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1_000_000
    #: Where exports are written (server side) before the browser downloads them.
    export_dir: Path = Path("lctfound-web-exports")
    #: Run folders of training jobs (None: the module logics' default, ``<cache>/runs``).
    runs_root: Optional[Path] = None
    sample: SampleOptions = field(default_factory=SampleOptions)
    title: str = "LCTfound"
