"""Hub requests time out through huggingface_hub's documented settings (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT),
not through a private API that a missing import turned into a silent no-op. Checked against a hub on this machine
whose download stalls: no network, and no time measured."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from slerpviz import models

SETTINGS = {"HF_HUB_ETAG_TIMEOUT": "HUB_CONNECT_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT": "HUB_READ_TIMEOUT"}


@pytest.fixture
def hub_settings(monkeypatch):
    """The two settings unset in the environment, and whatever bound_hub_timeouts sets (there and in
    huggingface_hub.constants) undone after the test."""
    from huggingface_hub import constants

    for name in SETTINGS:
        monkeypatch.setenv(name, "0")  # recorded, so that the unset below is restored as unset
        monkeypatch.delenv(name)
        monkeypatch.setattr(constants, name, getattr(constants, name))
    return constants


def bound() -> None:
    models.bound_hub_timeouts.__wrapped__()  # past the once-per-process cache


def test_the_timeouts_are_huggingface_hubs_documented_settings(hub_settings, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import _http

    # Nothing private is needed: without the client factory API (another huggingface_hub) the timeouts still hold.
    monkeypatch.delattr(_http, "default_client_factory")
    monkeypatch.setattr(huggingface_hub, "set_client_factory", lambda factory: pytest.fail("a client factory"))
    bound()
    for name, ours in SETTINGS.items():
        seconds = round(getattr(models, ours))
        assert os.environ[name] == str(seconds)  # for processes started from here
        assert getattr(hub_settings, name) == seconds  # huggingface_hub read the environment before this ran


def test_a_users_own_setting_stands(hub_settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "7")
    monkeypatch.setattr(hub_settings, "HF_HUB_DOWNLOAD_TIMEOUT", 7)  # as huggingface_hub read it at import
    bound()
    assert os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] == "7" and hub_settings.HF_HUB_DOWNLOAD_TIMEOUT == 7
    assert hub_settings.HF_HUB_ETAG_TIMEOUT == round(models.HUB_CONNECT_TIMEOUT)


BODY = b'{"model_type": "llama"}'
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StallingHub(http.server.BaseHTTPRequestHandler):
    """Answers a file's metadata at once; the first download of the file stalls until released (or for 8 s, within
    the 10 s huggingface_hub waits by default), any later one is answered at once."""

    release: threading.Event
    downloads: list[str]

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"slerpviz-test-etag"')
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_GET(self):
        self.downloads.append(self.path)
        if len(self.downloads) == 1:
            self.release.wait(8)
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        except OSError:  # the client gave up on this one
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_hub():
    """(the hub's address, the downloads it was asked for)"""
    release, downloads = threading.Event(), []
    handler = type("Handler", (StallingHub,), {"release": release, "downloads": downloads})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", downloads
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_download_that_stalls_is_given_up_and_asked_again(hub_settings, stalling_hub, monkeypatch, tmp_path):
    """The download timeout in force is ours, read by huggingface_hub at the download although it was imported
    before: with 1 s the stalled first request is given up and asked again (and the file then arrives), where the
    library's own 10 s would have waited for the stalled one."""
    from huggingface_hub import hf_hub_download

    address, downloads = stalling_hub
    monkeypatch.setattr(hub_settings, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "HUB_READ_TIMEOUT", 1.0)
    bound()
    path = hf_hub_download("slerpviz/test", "config.json", endpoint=address, cache_dir=tmp_path)
    assert open(path, "rb").read() == BODY
    assert downloads == ["/slerpviz/test/resolve/main/config.json"] * 2
