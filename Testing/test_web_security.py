"""The safety rules of ``lctfound web`` (lctfound.web.security), without trame or a browser:
binding and tokens, the HTTP/websocket access gate, data roots (traversal, symlinks), uploads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from event_loop import run_coroutine

from lctfound.errors import InputError
from lctfound.web.security import (
    OWNER_GRACE_S,
    SESSION_COOKIE,
    TOKEN_COOKIE,
    AccessGate,
    DataRoots,
    UploadBudget,
    check_bind,
    check_token,
    hide_folder,
    is_loopback,
    new_token,
    page_url,
    read_token_file,
    safe_file_name,
)

TOKEN = "a-very-secret-token-0123456789"


# ---------------------------------------------------------------------------------------------
# Binding and tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.org", ""])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_non_loopback_bind_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(InputError, match="without an access token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(InputError, match="without an access token"):
        check_bind("192.168.1.10", "")


def test_tokens_must_be_long_and_url_safe(tmp_path):
    assert check_token(f"  {TOKEN}\n") == TOKEN
    assert len(new_token()) >= 16 and check_token(new_token())
    with pytest.raises(InputError, match="at least 16"):
        check_token("short")
    with pytest.raises(InputError, match="may only contain"):
        check_token("spaces are not ok in a token")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert read_token_file(token_file) == TOKEN
    with pytest.raises(InputError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_page_url_carries_the_token():
    assert page_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/"
    assert page_url("0.0.0.0", 8080, TOKEN) == f"http://127.0.0.1:8080/?secret={TOKEN}"
    assert page_url("::1", 9) == "http://[::1]:9/"


def test_cli_refuses_a_public_address_without_token(run_cli):
    code, out, err = run_cli(["web", "--host", "0.0.0.0"], groups=["web"])
    assert code == 2
    assert err.strip().count("\n") == 0 and "without an access token" in err
    code, _, err = run_cli(["web", "--host", "0.0.0.0", "--token", "short"], groups=["web"])
    assert code == 2 and "at least 16" in err


def test_cli_refuses_a_missing_data_root(run_cli, tmp_path):
    code, _, err = run_cli(["web", "--data-root", str(tmp_path / "nope")], groups=["web"])
    assert code == 2 and "no such folder" in err


# ---------------------------------------------------------------------------------------------
# Data roots
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "data"
    (root / "cases").mkdir(parents=True)
    (root / "cases" / "ct.nrrd").write_bytes(b"x" * 10)
    (root / "notes.txt").write_text("hi")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.nrrd").write_bytes(b"s")
    os.symlink(outside, root / "link-out")
    os.symlink(outside / "secret.nrrd", root / "file-out.nrrd")
    os.symlink(root / "cases" / "ct.nrrd", root / "inside.nrrd")
    return DataRoots([root]), root, outside


def test_paths_inside_a_root_resolve(roots):
    data_roots, root, _ = roots
    assert data_roots.resolve("cases/ct.nrrd") == (root / "cases" / "ct.nrrd").resolve()
    assert data_roots.resolve(str(root / "cases")) == (root / "cases").resolve()
    assert data_roots.resolve("inside.nrrd") == (root / "cases" / "ct.nrrd").resolve()  # a link that stays inside
    assert data_roots.resolve("") == root.resolve()


@pytest.mark.parametrize("path", ["../private/secret.nrrd", "cases/../../private", "/etc/passwd",
                                  "link-out/secret.nrrd",
                                  "file-out.nrrd", "link-out"])
def test_traversal_and_links_out_of_the_roots_are_refused(roots, path):
    data_roots, _, _ = roots
    with pytest.raises(InputError, match="outside the data folders"):
        data_roots.resolve(path)


def test_bad_paths_give_clear_errors(roots):
    data_roots, _, _ = roots
    with pytest.raises(InputError, match="NUL"):
        data_roots.resolve("cases\x00/ct.nrrd")
    with pytest.raises(InputError, match="no such file"):
        data_roots.resolve("cases/missing.nrrd")
    with pytest.raises(InputError, match="no data root number"):
        data_roots.resolve("cases", root=3)
    with pytest.raises(InputError, match="no data root number"):
        data_roots.resolve("cases", root="../etc")
    with pytest.raises(InputError, match="--data-root"):
        DataRoots([]).resolve("anything")


def test_listing_hides_links_that_leave_the_roots(roots):
    data_roots, _, _ = roots
    names = [(entry.name, entry.is_dir) for entry in data_roots.listing("", suffixes=(".nrrd",))]
    assert names == [("cases", True), ("inside.nrrd", False)]
    with pytest.raises(InputError, match="outside"):
        data_roots.listing("..")


# Transitive rule: what a file names must be inside the roots too (issue 12, rule 8).

NAMING_FILES = {
    "table-absolute.csv": "image,label\n{secret},cancer\ncases/ct.nrrd,clear\n",
    "table-shadow.csv": "image,label\n/etc/shadow,cancer\ncases/ct.nrrd,clear\n",
    "table-traversal.csv": "image,label\n../private/secret.nrrd,cancer\n",
    "table-link.csv": "image,label\nlink-out/secret.nrrd,cancer\n",
    "table-home.csv": "image,label\n~/anything.nrrd,cancer\n",
    "table-windows.tsv": "image\tlabel\n..\\private\\secret.nrrd\tcancer\n",
    "names.json": '{{"cases": [{{"image": "{secret}"}}]}}',
    "detached.nhdr": "NRRD0004\ntype: short\ndimension: 1\nsizes: 1\nencoding: raw\ndata file: {secret}\n\n",
    "detached-list.nhdr": "NRRD0004\ntype: short\ndimension: 1\nsizes: 1\nencoding: raw\ndata file: LIST\n\n"
                          "cases/ct.nrrd\n../private/secret.nrrd\n",
    "detached.mhd": "ObjectType = Image\nNDims = 1\nDimSize = 1\nElementType = MET_SHORT\n"
                    "ElementDataFile = ../private/secret.nrrd\n",
    "pattern.nhdr": "NRRD0004\ntype: short\ndimension: 2\nsizes: 1 2\nencoding: raw\n"
                    "data file: ../private/slice%03d.raw 0 1 1\n\n",
}


@pytest.mark.parametrize("name", sorted(NAMING_FILES))
def test_files_naming_paths_outside_the_roots_are_refused(roots, name):
    data_roots, root, outside = roots
    (root / name).write_text(NAMING_FILES[name].format(secret=outside / "secret.nrrd"))
    assert data_roots.resolve(name)  # the file itself is inside
    with pytest.raises(InputError, match="outside the data folders") as error:
        data_roots.resolve_input(name)
    assert str(error.value).startswith(f"{name}: names ")


def test_references_are_followed_transitively(roots):
    """A table inside the root naming a header inside the root whose data file is outside."""
    data_roots, root, outside = roots
    (root / "cases" / "ct.nhdr").write_text(NAMING_FILES["detached.nhdr"].format(secret=outside / "secret.nrrd"))
    (root / "chain.csv").write_text("image,label\ncases/ct.nhdr,cancer\n")
    with pytest.raises(InputError, match="ct.nhdr: names"):
        data_roots.resolve_input("chain.csv")


def test_folders_with_links_out_are_refused_for_reading(roots):
    data_roots, root, outside = roots
    series = root / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"x")
    assert data_roots.resolve_input("series") == series.resolve()
    os.symlink(outside / "secret.nrrd", series / "IM0002.dcm")
    with pytest.raises(InputError, match="series: names 'IM0002.dcm'"):
        data_roots.resolve_input("series")
    # The listing (browsing) still works; it hides the link.
    assert [e.name for e in data_roots.listing("series")] == ["IM0001.dcm"]


def test_files_naming_only_paths_inside_are_accepted(roots):
    data_roots, root, _ = roots
    (root / "cases" / "other.nrrd").write_bytes(b"y")
    (root / "good.csv").write_text("image,label\ncases/ct.nrrd,cancer\n" + f"{root}/cases/other.nrrd,clear\n"
                                   "cases/ct.nrrd,cancer / benign\n")
    (root / "good.json").write_text('{"image": "cases/ct.nrrd", "label": "cancer", "note": "n/a"}')
    (root / "attached.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 1\nsizes: 1\nencoding: raw\n\n"
                                         b"data file: /etc/shadow")  # after the header: voxel bytes
    (root / "local.mha").write_bytes(b"ObjectType = Image\nElementDataFile = LOCAL\n/etc/shadow")
    for name in ("good.csv", "good.json", "attached.nrrd", "local.mha", "cases"):
        assert data_roots.resolve_input(name) == (root / name).resolve()


def test_upload_messages_hide_the_temporary_folder(tmp_path):
    folder = tmp_path / "lctfound-web-upload-abc"
    message = f"{folder}/chest.nii.gz: cannot be read (truncated); also {folder}"
    shown = hide_folder(message, folder)
    assert str(folder) not in shown and str(tmp_path) not in shown
    assert shown.startswith("chest.nii.gz: cannot be read")


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def test_upload_budget_refuses_more_than_the_limit():
    budget = UploadBudget(1000)
    assert budget.add(600) and not budget.exceeded
    assert not budget.add(600) and budget.exceeded
    assert "1.2 KB is more than this server accepts (1.0 KB)" in budget.message()


def test_upload_file_names_lose_their_folders():
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\scans\\ct.nii.gz") == "ct.nii.gz"
    for bad in ("", "..", "dir/", "a\x00b"):
        with pytest.raises(InputError):
            safe_file_name(bad)


# ---------------------------------------------------------------------------------------------
# The access gate, as aiohttp middleware in front of a stand-in app
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(coroutine):
    return run_coroutine(coroutine)


async def _with_client(gate, body):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def page(request):
        return web.Response(text="the page", content_type="text/html")

    async def websocket(request):
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for _ in socket:
            pass
        return socket

    app = web.Application(middlewares=[gate.middleware()])
    app.router.add_get("/", page)
    app.router.add_get("/index.html", page)
    app.router.add_get("/assets/app.js", page)
    app.router.add_get("/ws", websocket)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        return await body(client)
    finally:
        await client.close()


def test_token_is_required_on_the_page_assets_and_websocket():
    gate = AccessGate(TOKEN, loopback_only=True)

    async def body(client):
        missing = await client.get("/index.html")
        assert missing.status == 401 and "access token" in await missing.text()
        wrong = await client.get("/index.html", params={"secret": "wrong-token-0123456789"})
        assert wrong.status == 401
        assert (await client.get("/assets/app.js")).status == 401
        assert (await client.get("/ws")).status == 401
        good = await client.get("/index.html", params={"secret": TOKEN})
        assert good.status == 200 and good.cookies[TOKEN_COOKIE].value == TOKEN
        assert good.cookies[TOKEN_COOKIE]["httponly"]
        # The cookie now opens the assets and the websocket (a reload has no ?secret= any more).
        assert (await client.get("/assets/app.js")).status == 200
        async with client.ws_connect("/ws") as socket:
            assert not socket.closed

    run(_with_client(gate, body))


def test_loopback_server_answers_only_loopback_host_names():
    gate = AccessGate(None, loopback_only=True)

    async def body(client):
        assert (await client.get("/index.html")).status == 200
        rebound = await client.get("/index.html", headers={"Host": "attacker.example:8080"})
        assert rebound.status == 403
        assert (await client.get("/index.html", headers={"Host": "localhost:8080"})).status == 200

    run(_with_client(gate, body))


def test_websocket_from_another_web_site_is_refused():
    gate = AccessGate(None, loopback_only=True)

    async def body(client):
        host = f"127.0.0.1:{client.port}"
        foreign = await client.get("/ws", headers={"Origin": "http://attacker.example", "Connection": "Upgrade",
                                                   "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert foreign.status == 403
        async with client.ws_connect("/ws", origin=f"http://{host}") as socket:
            assert not socket.closed

    run(_with_client(gate, body))


def test_one_browser_session_at_a_time():
    clock = Clock()
    gate = AccessGate(None, loopback_only=True, clock=clock)

    async def body(client):
        first = await client.get("/index.html")
        first_session = first.cookies[SESSION_COOKIE].value
        other = {SESSION_COOKIE: "someone-else"}
        async with client.ws_connect("/ws", headers={"Cookie": f"{SESSION_COOKIE}={first_session}"}):
            refused = await client.session.get(client.make_url("/index.html"), cookies=other)
            assert refused.status == 409 and "in use by another browser" in await refused.text()
            ws_refused = await client.session.get(client.make_url("/ws"), cookies=other)
            assert ws_refused.status == 409
            # The owner's reload is fine.
            again = await client.session.get(client.make_url("/index.html"), cookies={SESSION_COOKIE: first_session})
            assert again.status == 200
        await asyncio.sleep(0.05)
        # Just after the owner left, the server is kept for it (a reload), then released.
        waiting = await client.session.get(client.make_url("/index.html"), cookies=other)
        assert waiting.status == 409 and "a moment ago" in await waiting.text()
        clock.now += OWNER_GRACE_S + 1
        released = await client.session.get(client.make_url("/index.html"), cookies=other)
        assert released.status == 200

    run(_with_client(gate, body))


def test_wslink_hello_secret_or_cookie():
    gate = AccessGate(TOKEN, loopback_only=False)

    class Request:
        def __init__(self, cookies):
            self.cookies = cookies

    assert run(gate.validate_ws_token(TOKEN, "c1"))
    assert not run(gate.validate_ws_token("wslink-secret", "c1"))
    gate.note_ws_client(Request({TOKEN_COOKIE: TOKEN}), "c2")
    assert run(gate.validate_ws_token("wslink-secret", "c2"))
    gate.note_ws_client(Request({TOKEN_COOKIE: "wrong"}), "c3")
    assert not run(gate.validate_ws_token("wslink-secret", "c3"))
    gate.forget_ws_client("c2")
    assert not run(gate.validate_ws_token("wslink-secret", "c2"))
    assert run(AccessGate(None, True).validate_ws_token("anything", "c4"))


def test_path_module_is_light():
    """The CLI checks every rule before trame is imported (a refused start costs nothing)."""
    import subprocess
    import sys

    code = ("import sys, lctfound.web.security, lctfound.web.config, lctfound.cli.web; "
            "print(any(name.startswith(('trame', 'slicer', 'vtk')) for name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"
