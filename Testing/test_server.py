"""`lctfound serve` and its thin client (issue 14, first slice): a real server process on 127.0.0.1,
driven over HTTP by `lctfound.remote` and by the command line's ``--server``.

Results are compared with local runs of the same command (same backbone, same settings), voxel for
voxel. Waiting is bounded by counts of polls, not by how fast this machine is.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server_helpers import ROOT, Server, base_env, free_port, interruptible, wait_for


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 8x64x64 crop of the sample CT around its lesion, the lesion painted on 2 slices only, and a
    small backbone at 64²."""
    from lctfound.io.sample_data import load_sample
    from lctfound.io.volume import CTVolume, write_volume
    from lctfound.models import save_model
    from model_factory import tiny_model

    folder = tmp_path_factory.mktemp("serve")
    image, label = load_sample("lung1")
    z0, y0, x0 = 30, 328, 186
    origin = (image.ijk_to_lps() @ np.array([x0, y0, z0, 1.0]))[:3]

    def crop(array):
        return array[z0:z0 + 8, y0:y0 + 64, x0:x0 + 64]

    ct = CTVolume(crop(image.array).copy(), image.spacing, origin, image.direction)
    painted = crop(label.array).astype(np.uint8)
    painted[[0, 1, 4, 5, 6, 7]] = 0  # slices 2 and 3 hold the lesion
    write_volume(ct, folder / "ct.nrrd")
    write_volume(ct.with_array(painted), folder / "label.nrrd")
    save_model(tiny_model(64, seed=1), folder / "tiny")
    return folder


@pytest.fixture(scope="module")
def server(files):
    running = Server(files / "data", files / "server-cache",
                     ["--models", f"tiny={files / 'tiny'}", "--max-upload-mb", "1", "--max-jobs-per-client", "2"])
    yield running
    running.stop()


def run_local(args, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctfound", *map(str, args)], env=base_env(cache),
                          capture_output=True, text=True)


def long_training(client, files, model: str) -> dict:
    """A training job that runs until cancelled (many epochs), submitted and seen running."""
    from lctfound.io.volume import read_volume

    ct, label = read_volume(files / "ct.nrrd"), read_volume(files / "label.nrrd", labels=True)
    inputs = {"volume": client.upload_volume(ct.array, ct.spacing, ct.origin, ct.direction),
              "labels": client.upload_volume(label.array.astype(np.int16), ct.spacing, ct.origin, ct.direction)}
    return client.submit("segment-train", inputs, {"model": model, "backbone": "tiny", "names": "1=Lesion",
                                                   "epochs": 10000})


# -- the thin client stays thin --------------------------------------------------------------------


def test_thin_client_imports_no_heavy_library():
    heavy = ("torch", "diffusers", "monai", "transformers", "SimpleITK", "scipy", "skimage", "fastapi", "uvicorn")
    code = ("import sys, lctfound.remote, lctfound.remote.wire\n"
            "c = lctfound.remote.RemoteClient('http://127.0.0.1:1', 'x' * 43, client_id='a')\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_volume_wire_format_round_trip_and_checks():
    from lctfound.remote.wire import WireError, decode_volume, encode_volume

    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    header, body = encode_volume(array, (0.5, 0.6, 2.0), (1.0, 2.0, 3.0), np.diag([1.0, -1.0, 1.0]))
    back = decode_volume(json.loads(json.dumps(header)), body)
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert header["spacing"] == [0.5, 0.6, 2.0] and header["direction"][1] == [0.0, -1.0, 0.0]
    with pytest.raises(WireError, match="checksum"):
        decode_volume(dict(header, sha256="0" * 64), body)
    with pytest.raises(WireError, match="bytes"):
        decode_volume(header, body[:-1])
    with pytest.raises(WireError, match="shape"):
        decode_volume(dict(header, shape=[2, 3]), body)
    with pytest.raises(WireError, match="type"):
        encode_volume(np.zeros((2, 2, 2), dtype=np.complex64))


# -- start-up refusals (no server needed) ----------------------------------------------------------


def test_serve_refuses_other_binds_without_tls_and_a_readable_token(tmp_path, run_cli):
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--data", tmp_path / "d"])
    assert code == 2 and err.startswith("error: refusing to listen on 0.0.0.0 without TLS") and err.count("\n") == 1
    code, _, err = run_cli(["serve", "--certfile", tmp_path / "missing.pem", "--data", tmp_path / "d"])
    assert code == 2 and "--keyfile" in err
    from lctfound.server.store import load_or_create_token

    token, created = load_or_create_token(tmp_path / "d")
    assert created and len(token) >= 43 and stat.S_IMODE((tmp_path / "d" / "token").stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path / "d") == (token, False)
    os.chmod(tmp_path / "d" / "token", 0o644)
    code, _, err = run_cli(["serve", "--data", tmp_path / "d", "--port", free_port()])
    assert code == 2 and "readable by other users" in err and token not in err


def test_unreachable_server_or_missing_token_is_one_line(files, run_cli, monkeypatch):
    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    nowhere = f"http://127.0.0.1:{free_port()}"
    command = ["enhance", "low-dose", files / "ct.nrrd", "-o", files / "nowhere.nrrd", "--server", nowhere]
    code, _, err = run_cli(command)
    assert code == 2 and err.count("\n") == 1 and "LCTFOUND_SERVER_TOKEN" in err
    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", "x" * 43)
    code, _, err = run_cli(command)
    assert code == 2 and err == f"error: the server at {nowhere} does not answer (connection refused)\n"
    code, _, err = run_cli(["segment", "train", files / "ct.nrrd", "--labels", files / "label.nrrd", "-o", "../up",
                            "--server", nowhere])
    assert code == 2 and "names the model on the server" in err
    assert not (files / "nowhere.nrrd").exists()


# -- against a running server ----------------------------------------------------------------------


def test_token_is_required_and_nothing_runs_without_it(server):
    import httpx

    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert stat.S_IMODE((server.data / "token").stat().st_mode) == 0o600
    client = server.client("intruder")
    before = client._request("GET", "/jobs")["jobs"]
    for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": server.token},
                    {"Authorization": "Basic " + server.token}):
        headers["X-LCTfound-Client"] = "intruder"
        for method, path, body in (("GET", "/version", None), ("POST", "/uploads", {"header": {}}),
                                   ("POST", "/jobs", {"task": "enhance-low-dose", "inputs": {}}),
                                   ("GET", "/jobs", None)):
            response = httpx.request(method, server.url + path, headers=headers, json=body)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
    assert client._request("GET", "/jobs")["jobs"] == before
    assert not (server.data / "clients" / "intruder" / "uploads").exists()


def test_version_mismatch_is_one_sentence(server, monkeypatch, token_env, files, run_cli):
    import httpx

    import lctfound.remote
    from lctfound.remote import RemoteError

    response = httpx.get(server.url + "/version", headers={"Authorization": f"Bearer {server.token}",
                                                           "X-LCTfound-API": "999"})
    assert response.status_code == 409 and "API 1" in response.json()["detail"]
    assert server.client().check_version()["api"] == 1
    assert server.client().test_connection().startswith(f"connected to {server.url}: lctfound 0.1.0, models default, tiny")
    monkeypatch.setattr(lctfound.remote, "__version__", "0.0.1")
    with pytest.raises(RemoteError, match=r"runs lctfound 0\.1\.0 .* and this client lctfound 0\.0\.1 .*install the "
                                          r"same version on both"):
        server.client().check_version()
    code, out, err = run_cli(["enhance", "low-dose", files / "ct.nrrd", "-o", files / "never.nrrd",
                              "--server", server.url])
    assert code == 2 and err.count("\n") == 1 and "install the same version" in err
    assert not (files / "never.nrrd").exists()


def test_oversize_upload_is_413_and_a_resumed_upload_completes(server):
    import httpx

    from lctfound.remote import RemoteError
    from lctfound.remote.wire import encode_volume

    client = server.client("uploader")
    noise = np.random.default_rng(0).normal(size=(20, 128, 128)).astype(np.float32)  # > 1 MB compressed
    with pytest.raises(RemoteError, match=r"\(413\).*over this server's upload limit"):
        client.upload_volume(noise)
    # A chunk that runs past what its upload declared is refused too, and nothing past it is kept.
    header, body = encode_volume(np.zeros((4, 32, 32), dtype=np.int16))
    upload = client._request("POST", "/uploads", json={"header": header})["upload"]
    response = httpx.put(f"{server.url}/uploads/{upload}", params={"offset": 0}, content=body + b"x" * 100,
                         headers={"Authorization": f"Bearer {server.token}", "X-LCTfound-Client": "uploader"})
    assert response.status_code == 413
    assert client._request("GET", f"/uploads/{upload}")["received"] == 0
    # A dropped connection after half the bytes: the status says how much arrived; the rest follows.
    image = np.random.default_rng(1).integers(-1000, 400, size=(6, 64, 64)).astype(np.int16)
    header, body = encode_volume(image)
    upload = client._request("POST", "/uploads", json={"header": header})["upload"]
    half = len(body) // 2
    client._request("PUT", f"/uploads/{upload}", params={"offset": 0}, content=body[:half])
    assert client._request("GET", f"/uploads/{upload}") == {"upload": upload, "received": half, "complete": False}
    with pytest.raises(RemoteError, match="409"):  # a chunk at the wrong offset
        client._request("PUT", f"/uploads/{upload}", params={"offset": 0}, content=body[:10])
    assert client.resume_upload(upload, body, chunk_bytes=1000)["complete"]
    # A body whose checksum does not match its header is refused and removed.
    bad = client._request("POST", "/uploads", json={"header": dict(header, sha256="0" * 64)})["upload"]
    with pytest.raises(RemoteError, match=r"\(422\).*checksum"):
        client.resume_upload(bad, body)


def test_low_dose_on_the_server_equals_the_local_run(server, files, token_env, run_cli):
    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    local = run_local(["enhance", "low-dose", files / "ct.nrrd", "-o", files / "ld_local.nrrd"], files / "local-cache")
    assert local.returncode == 0, local.stderr
    code, out, err = run_cli(["enhance", "low-dose", files / "ct.nrrd", "-o", files / "ld_remote.nrrd",
                              "--server", server.url])
    assert code == 0, err
    remote, here = read_volume(files / "ld_remote.nrrd"), read_volume(files / "ld_local.nrrd")
    assert np.array_equal(remote.array, here.array)
    assert remote.spacing == here.spacing and np.allclose(remote.origin, here.origin)
    record, local_record = read_provenance(files / "ld_remote.nrrd"), read_provenance(files / "ld_local.nrrd")
    assert record["weight_per_slice"] == local_record["weight_per_slice"] and record["method"] == "tv"
    assert record["output"] == str(files / "ld_remote.nrrd") and record["server"] == server.url
    # The command line's --server path runs where torch, diffusers, MONAI and scikit-image are missing.
    script = ("import sys\nsys.path.insert(0, %r)\nfrom import_blocker import hidden_packages\n"
              "with hidden_packages('torch', 'diffusers', 'monai', 'transformers', 'scikit-image'):\n"
              "    from lctfound.cli import main\n    code = main(sys.argv[1:])\nsys.exit(code)" % str(ROOT / "Testing"))
    light = subprocess.run([sys.executable, "-c", script, "enhance", "low-dose", str(files / "ct.nrrd"),
                            "-o", str(files / "ld_light.nrrd"), "--server", server.url],
                           env=dict(base_env(files / "cli-cache"), LCTFOUND_SERVER_TOKEN=server.token),
                           capture_output=True, text=True)
    assert light.returncode == 0, light.stderr
    assert np.array_equal(read_volume(files / "ld_light.nrrd").array, here.array)
    # The same output again needs --overwrite, checked before anything is uploaded.
    code, _, err = run_cli(["enhance", "low-dose", files / "ct.nrrd", "-o", files / "ld_remote.nrrd",
                            "--server", server.url])
    assert code == 2 and "--overwrite" in err


def test_a_failed_job_is_one_sentence_without_server_paths(server, files):
    from lctfound.io.volume import read_volume
    from lctfound.remote import RemoteError

    client = server.client("mistaken")
    ct = read_volume(files / "ct.nrrd")
    upload = client.upload_volume(ct.array, ct.spacing, ct.origin, ct.direction)
    job = client.submit("segment-predict", {"volume": upload}, {"model": "tiny"})  # a backbone, not a task model
    with pytest.raises(RemoteError, match="failed") as failure:
        client.follow(job["job"])
    message = str(failure.value)
    assert "\n" not in message and str(server.data) not in message and str(files / "tiny") not in message
    with pytest.raises(RemoteError, match=r"\(409\).*failed"):
        client.download_result(job["job"])
    with pytest.raises(RemoteError, match=r"\(422\).*no option 'output'"):
        client.submit("segment-predict", {"volume": upload}, {"model": "tiny", "output": "/etc/passwd"})


@pytest.mark.slow
def test_few_shot_train_and_predict_on_the_server_equal_the_local_run(server, files, token_env, run_cli):
    from lctfound.io.volume import read_volume

    cache = files / "local-cache"
    local = run_local(["segment", "train", files / "ct.nrrd", "--labels", files / "label.nrrd", "--names", "1=Lesion",
                       "--backbone", files / "tiny", "--epochs", "3", "-o", files / "local_model"], cache)
    assert local.returncode == 0, local.stderr
    local = run_local(["segment", "predict", files / "ct.nrrd", "--model", files / "local_model",
                       "-o", files / "local_pred.nrrd"], cache)
    assert local.returncode == 0, local.stderr

    code, out, err = run_cli(["segment", "train", files / "ct.nrrd", "--labels", files / "label.nrrd",
                              "--names", "1=Lesion", "--backbone", "tiny", "--epochs", "3", "-o", "lesion",
                              "--server", server.url])
    assert code == 0, err
    assert "trained on slices [2, 3]" in out and "model 'lesion' (1=Lesion)" in out
    assert str(server.data) not in out  # the server's folders stay on the server
    assert server.client("cli").models()["yours"] == ["lesion"]
    assert server.client("someone-else").models()["yours"] == []  # listed for the client that trained it
    code, out, err = run_cli(["segment", "predict", files / "ct.nrrd", "--model", "lesion",
                              "-o", files / "remote_pred.nrrd", "--server", server.url])
    assert code == 0, err
    remote, here = read_volume(files / "remote_pred.nrrd", labels=True), read_volume(files / "local_pred.nrrd",
                                                                                      labels=True)
    assert remote.array.sum() > 0 and np.array_equal(remote.array, here.array)
    assert np.allclose(remote.origin, here.origin) and np.allclose(remote.direction, here.direction)
    assert f"Lesion {int((remote.array == 1).sum())} voxels" in out
    # The correction loop: retraining starts from the model on the server and the new one stays there too.
    code, out, err = run_cli(["segment", "train", files / "ct.nrrd", "--labels", files / "label.nrrd",
                              "--names", "1=Lesion", "--init", "lesion", "--epochs", "3", "-o", "lesion-v2",
                              "--server", server.url])
    assert code == 0, err
    assert server.client("cli").models()["yours"] == ["lesion", "lesion-v2"]
    code, _, err = run_cli(["segment", "train", files / "ct.nrrd", "--labels", files / "label.nrrd",
                            "--names", "1=Lesion", "--init", "lesion", "-o", "lesion-v2", "--server", server.url])
    assert code == 2 and "already have a model 'lesion-v2'" in err and err.count("\n") == 1
    # Another client cannot use (or see) this client's model.
    from lctfound.remote import RemoteError

    other = server.client("someone-else")
    upload = other.upload_volume(remote.array.astype(np.int16))
    with pytest.raises(RemoteError, match=r"\(404\).*no model 'lesion'"):
        other.submit("segment-predict", {"volume": upload}, {"model": "lesion"})


@pytest.mark.slow
def test_cancel_per_client_limit_and_round_robin_between_clients(server, files):
    from lctfound.jobs import process_alive
    from lctfound.remote import RemoteError

    blocker_client, first, second = server.client("blocker"), server.client("alice"), server.client("bob")
    blocker = long_training(blocker_client, files, "never")
    wait_for(lambda: blocker_client.events(blocker["job"], 0, wait=5)["new_events"])  # running: events arrived
    from lctfound.io.volume import read_volume

    ct = read_volume(files / "ct.nrrd")
    geometry = (ct.spacing, ct.origin, ct.direction)
    alice = [first.submit("enhance-low-dose", {"volume": first.upload_volume(ct.array, *geometry)}, {})
             for _ in range(2)]
    with pytest.raises(RemoteError, match=r"\(429\)"):
        first.submit("enhance-low-dose", {"volume": first.upload_volume(ct.array, *geometry)}, {})
    bob = second.submit("enhance-low-dose", {"volume": second.upload_volume(ct.array, *geometry)}, {})
    assert second.events(bob["job"], 0)["position"] == 1  # after alice's first, before her second

    pid = int((server.data / "clients" / "blocker" / "jobs" / blocker["job"] / "pid").read_text())
    assert blocker_client.cancel(blocker["job"])["state"] in ("running", "cancelled")
    status = wait_for(lambda: (lambda s: s if s["state"] != "running" else None)(
        blocker_client.events(blocker["job"], 0, wait=5)))
    assert status["state"] == "cancelled" and not process_alive(pid)
    assert blocker_client.models()["yours"] == []  # nothing half-written
    with pytest.raises(RemoteError, match="cancelled"):
        blocker_client.download_result(blocker["job"])

    for client, job in ((first, alice[0]), (first, alice[1]), (second, bob)):
        client.follow(job["job"])
    starts = {name: client.events(job["job"], 0)["started"]
              for name, client, job in (("alice1", first, alice[0]), ("alice2", first, alice[1]), ("bob", second, bob))}
    assert sorted(starts, key=starts.get) == ["alice1", "bob", "alice2"]
    _, alice_result = first.download_result(alice[1]["job"])
    _, bob_result = second.download_result(bob["job"])
    assert np.array_equal(alice_result, bob_result) and alice_result.shape == ct.shape


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_cancels_the_job_on_the_server(server, files):
    env = dict(base_env(files / "cli-cache"), LCTFOUND_SERVER_TOKEN=server.token, LCTFOUND_CLIENT_ID="interrupter")
    cli = subprocess.Popen(
        [sys.executable, "-m", "lctfound", "segment", "train", str(files / "ct.nrrd"), "--labels",
         str(files / "label.nrrd"), "--backbone", "tiny", "--epochs", "10000", "-o", "interrupted",
         "--server", server.url, "--events"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible)
    for line in cli.stdout:
        if '"progress"' in line:
            break
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=300)
    assert cli.returncode == 130 and err.startswith("error: interrupted") and err.count("\n") == 1
    # The cancel request kills the job's process tree at once; the worker records the end just after.
    jobs = wait_for(lambda: (lambda j: j if all(job["state"] != "running" for job in j) else None)(
        server.client("interrupter")._request("GET", "/jobs")["jobs"]))
    assert [job["state"] for job in jobs] == ["cancelled"]
    assert server.client("interrupter").models()["yours"] == []


def test_quota_and_expiry(tmp_path):
    from lctfound.remote import RemoteError

    server = Server(tmp_path / "data", tmp_path / "cache", ["--quota-gb", "0.0002", "--expire-hours", "0.0005"])
    try:
        client = server.client("small")
        noise = np.random.default_rng(0).integers(0, 30000, size=(4, 128, 128)).astype(np.int16)  # ~130 kB packed
        upload = client.upload_volume(noise)
        with pytest.raises(RemoteError, match=r"\(507\).*over its quota"):
            client.upload_volume(noise)
        # After --expire-hours (1.8 s) the sweep removes the upload, and the space is free again.
        wait_for(lambda: not (tmp_path / "data" / "clients" / "small" / "uploads" / f"{upload}.zst").exists())
        with pytest.raises(RemoteError, match=r"\(404\)"):
            client._request("GET", f"/uploads/{upload}")
        assert client.upload_volume(noise)
    finally:
        server.stop()


def test_https_with_certfile_and_keyfile(tmp_path, files, monkeypatch, run_cli):
    from lctfound.remote import RemoteClient, RemoteError

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    port = free_port()
    log = open(tmp_path / "tls.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "lctfound", "serve", "--data", str(tmp_path / "data"), "--port",
                                str(port), "--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")],
                               env=base_env(tmp_path / "cache"), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        url = f"https://127.0.0.1:{port}"
        token = wait_for(lambda: (tmp_path / "data" / "token").is_file() and (tmp_path / "data" / "token").read_text().strip())
        client = RemoteClient(url, token, client_id="tls", ca_file=str(tmp_path / "cert.pem"))
        wait_for(lambda: _answers(client))
        assert client.check_version()["api"] == 1
        with pytest.raises(RemoteError, match="certificate of .* is not trusted; set LCTFOUND_SERVER_CA_FILE"):
            RemoteClient(url, token, client_id="tls").health()
        monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", token)
        monkeypatch.setenv("LCTFOUND_SERVER_CA_FILE", str(tmp_path / "cert.pem"))
        code, out, err = run_cli(["enhance", "low-dose", files / "ct.nrrd", "-o", tmp_path / "tls.nrrd", "--server", url])
        assert code == 0, err
        assert (tmp_path / "tls.nrrd").is_file()
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def _answers(client) -> bool:
    from lctfound.remote import ServerLost

    try:
        return client.health() == {"status": "ok"}
    except ServerLost:
        return False


@pytest.mark.slow
def test_server_killed_mid_job_then_restarted(files, tmp_path):
    from lctfound.jobs import process_alive

    data = tmp_path / "data"
    server = Server(data, tmp_path / "cache", ["--models", f"tiny={files / 'tiny'}"])
    pid = None
    try:
        cli = subprocess.Popen(
            [sys.executable, "-m", "lctfound", "segment", "train", str(files / "ct.nrrd"), "--labels",
             str(files / "label.nrrd"), "--backbone", "tiny", "--epochs", "10000", "-o", "lost",
             "--server", server.url, "--events"],
            env=dict(base_env(tmp_path / "cache"), LCTFOUND_SERVER_TOKEN=server.token, LCTFOUND_CLIENT_ID="cli"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in cli.stdout:  # the job runs on the server once its first progress event arrives
            if '"progress"' in line:
                break
        job_folders = list((data / "clients" / "cli" / "jobs").iterdir())
        pid = int((job_folders[-1] / "pid").read_text()) if len(job_folders) == 1 else None
        server.kill()
        out, err = cli.communicate(timeout=300)
        assert cli.returncode == 2, err
        assert err.count("\n") == 1 and "does not answer" in err and "nothing was written" in err, err
        assert pid is not None  # the job's child: it dies at its next event (its pipe is gone) or at the restart

        server = Server(data, tmp_path / "cache", ["--models", f"tiny={files / 'tiny'}"])
        wait_for(lambda: not process_alive(pid), polls=400)
        assert not any((data / "clients" / "cli" / "jobs").iterdir())
        assert not (data / "clients" / "cli" / "models").exists() or \
            not any((data / "clients" / "cli" / "models").iterdir())
        assert server.client("cli").models()["yours"] == []
    finally:
        server.stop()
        if pid is not None and process_alive(pid):
            os.killpg(pid, signal.SIGKILL)
