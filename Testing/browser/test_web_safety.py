"""The safety rules of a running ``lctfound web`` server, checked from outside: the access token
on the page and the websocket (raw HTTP/wslink and a real browser), one user per process, the
upload limit and bad files reported in the page, a local favicon and no request leaving the
machine, and a refused start on a public address without a token."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
from event_loop import run_coroutine
from web_harness import STATE_READY, WebServer, free_port, make_cache, require_browser, state, wait_state

from lctfound.web.security import OWNER_GRACE_S

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOKEN = "browser-test-token-0123456789"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    require_browser()
    folder = tmp_path_factory.mktemp("token-server")
    web = WebServer(["--port", str(free_port()), "--token", TOKEN, "--max-upload-mb", "0.02",
                     "--export-dir", str(folder / "exports")],
                    make_cache(folder / "cache", tiny_backbone=False), folder / "server.log")
    try:
        web.wait_ready()
        yield web
    finally:
        web.stop()


def base_url(web: WebServer) -> str:
    parts = urlsplit(web.url)
    return f"{parts.scheme}://{parts.netloc}"


async def _wslink_hello(url: str, cookies: dict, secret: str):
    """Open the websocket and say wslink's hello; returns (HTTP status of the upgrade, reply)."""
    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    async with aiohttp.ClientSession(cookies=cookies) as session:
        try:
            async with session.ws_connect(url.replace("http", "ws", 1) + "/ws") as socket:
                message = msgpack.packb({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                                         "args": [{"secret": secret}], "kwargs": {}})
                for chunk in generate_chunks(message, 4_000_000):
                    await socket.send_bytes(chunk)
                unchunker = UnChunker()
                while True:
                    reply = await asyncio.wait_for(socket.receive(), 20)
                    decoded = unchunker.process_chunk(reply.data)
                    if decoded is not None:
                        return 101, decoded
        except aiohttp.WSServerHandshakeError as error:
            return error.status, None


def test_token_guards_page_assets_and_websocket(token_server):
    import urllib.error
    import urllib.request

    url = base_url(token_server)
    for path in ("/", "/index.html", "/index.html?secret=wrong-token-000000000"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + path, timeout=10)
        assert refused.value.code == 401 and "access token" in refused.value.read().decode()
    assert urllib.request.urlopen(f"{url}/index.html?secret={TOKEN}", timeout=10).status == 200

    status, _ = run_coroutine(_wslink_hello(url, {}, TOKEN))
    assert status == 401  # no cookie, no upgrade: the token in a websocket message is not enough
    status, _ = run_coroutine(_wslink_hello(url, {"lctfound_token": "wrong-token-000000000"}, "wslink-secret"))
    assert status == 401
    status, reply = run_coroutine(_wslink_hello(url, {"lctfound_token": TOKEN}, "wslink-secret"))
    assert status == 101 and "result" in reply and reply["result"]["clientID"]
    # That client was the server's one user; it keeps the server a few seconds after leaving.
    time.sleep(OWNER_GRACE_S + 0.5)


def test_browser_with_and_without_token_and_a_second_user(token_server, chromium):
    url = base_url(token_server)
    stranger = chromium.new_context()
    page = stranger.new_page()
    page.goto(url + "/")
    assert "Access token required" in page.content()
    stranger.close()

    owner = chromium.new_context(viewport={"width": 1200, "height": 800})
    page = owner.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(token_server.url)
    page.wait_for_function(STATE_READY, timeout=60_000)
    assert "secret" not in page.url  # trame drops it from the address bar; the cookie keeps the session
    favicon = page.evaluate("(document.querySelector('link[rel~=icon]') || {}).href || null")
    # The page's own logo until trame applies ours (an inline data: image): never another site.
    assert favicon is None or urlsplit(favicon).scheme == "data" or urlsplit(favicon).hostname == "127.0.0.1"
    page.locator("#lct-segmentation-panel").wait_for(state="visible")
    for tool in ("segmentation", "editor", "train", "export", "volume"):
        assert page.locator(f"#lct-tool-{tool}").count() == 1
    assert state(page, "lct_upload_limit") == 20_000

    # Upload over the limit (20 KB): refused in the page, before anything is sent.
    page.locator("#lct-upload-file").set_input_files(files=[{"name": "big.nrrd", "mimeType": "application/octet-stream",
                                                             "buffer": b"\0" * 50_000}])
    wait_state(page, "s('lct_error').startsWith('upload refused')", 20)
    assert "upload refused" in page.locator("#lct-error").inner_text()
    # A file that is not a CT: a clear message.
    page.locator("#lct-upload-file").set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                             "buffer": b"hello"}])
    wait_state(page, "s('lct_error').includes('not a CT file')", 20)
    page.locator("#lct-upload-file").set_input_files(files=[{"name": "broken.nrrd", "mimeType": "text/plain",
                                                             "buffer": b"NRRD0004\ntype: nonsense\n\n"}])
    wait_state(page, "s('lct_error') && !s('lct_loading') && s('lct_error').includes('broken.nrrd')", 60)

    # A second browser (its own cookies) is turned away while the first is connected.
    second = chromium.new_context()
    other = second.new_page()
    other.goto(token_server.url)
    assert "in use by another browser" in other.content()
    second.close()

    # The owner can reload (the token now comes from the cookie).
    page.reload()
    page.wait_for_function(STATE_READY, timeout=60_000)
    outside = [u for u in requests if urlsplit(u).scheme not in ("data", "blob")
               and urlsplit(u).hostname not in ("127.0.0.1", "localhost")]
    assert not outside, outside
    owner.close()


def test_public_address_without_token_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lctfound", "web", "--host", "0.0.0.0"], capture_output=True,
                            text=True, timeout=120, env={**__import__("os").environ,
                                                         "LCTFOUND_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: refusing to listen on 0.0.0.0 without an access token")
    assert len(result.stderr.strip().splitlines()) == 1
