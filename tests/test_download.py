"""Downloading known corpora (wordlm.data.download) from a local HTTP server: never from the internet."""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wordlm.data.datasets import resolve_dataset
from wordlm.data.download import SOURCES, download_corpus
from wordlm.errors import UserError

FILES = {"train.txt": b"the cat sat\nthe dog sat\n", "valid.txt": b"the cat\n", "test.txt": b"the dog\n"}


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (behaviour, body); behaviours "ok", "dies" (half the body, then closes)."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.server.hits.append(self.path)
        behaviour, body = self.server.routes.get(self.path, ("missing", b""))
        if behaviour == "missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "dies":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # the server then closes the socket: the client sees EOF early
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 serving FILES under /good/; tests add routes."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {f"/good/{name}": ("ok", body) for name, body in FILES.items()}
    httpd.hits = []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("WORDLM_OFFLINE", raising=False)


def table(base: str, name: str = "tiny", prefix: str = "/good/", sha256: dict[str, str] | None = None) -> dict:
    """A sources table for corpus ``name`` pointing at the local server."""
    sums = {file: hashlib.sha256(body).hexdigest() for file, body in FILES.items()} | (sha256 or {})
    return {name: {file: (f"{base}{prefix}{file}", sums[file]) for file in FILES}}


def assert_nothing_looks_valid(folder: Path, *names: str) -> None:
    present = sorted(path.name for path in folder.iterdir()) if folder.exists() else []
    assert not any(name in present for name in names), present
    assert not any(name.endswith(".part") for name in present), present


def test_the_pinned_table_covers_both_known_corpora():
    assert set(SOURCES) == {"wikitext-2", "penn"}
    for files in SOURCES.values():
        assert set(files) == {"train.txt", "valid.txt", "test.txt"}
        assert all(
            url.startswith("https://raw.githubusercontent.com/") and len(sha) == 64 for url, sha in files.values()
        )


def test_a_corpus_downloads_verified_with_a_progress_bar_and_only_once(server, online, tmp_path, capsys):
    folder = tmp_path / "data" / "tiny"
    messages = []
    assert download_corpus("tiny", folder, table(server.base), log=messages.append) == folder
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == FILES
    assert len(messages) == 3 and messages[0] == f"downloading {server.base}/good/train.txt to {folder / 'train.txt'}"
    assert "train.txt" in capsys.readouterr().err  # tqdm's bar
    download_corpus("tiny", folder, table(server.base))
    assert len(server.hits) == 3


def test_a_wrong_checksum_keeps_nothing(server, online, tmp_path):
    folder = tmp_path / "tiny"
    with pytest.raises(
        UserError, match=r"good/valid.txt has SHA-256 [0-9a-f]{16}\.\.\., not the pinned 0{16}"
    ) as caught:
        download_corpus("tiny", folder, table(server.base, sha256={"valid.txt": "0" * 64}), progress=False)
    assert "\n" not in str(caught.value)
    assert_nothing_looks_valid(folder, "valid.txt", "test.txt")
    assert (folder / "train.txt").read_bytes() == FILES["train.txt"]  # verified before the failure: kept


def test_a_connection_that_dies_midway_keeps_nothing(server, online, tmp_path):
    server.routes["/dies/train.txt"] = ("dies", FILES["train.txt"])
    size = len(FILES["train.txt"])
    with pytest.raises(UserError, match=rf"download of \S+/dies/train.txt stopped after {size // 2} of {size} bytes"):
        download_corpus("tiny", tmp_path / "tiny", table(server.base, prefix="/dies/"), progress=False)
    assert_nothing_looks_valid(tmp_path / "tiny", "train.txt")


def test_a_missing_file_on_the_server_says_so(server, online, tmp_path):
    with pytest.raises(UserError, match=r"cannot download \S+/gone/train.txt \(Not Found\); put train.txt"):
        download_corpus("tiny", tmp_path / "tiny", table(server.base, prefix="/gone/"), progress=False)
    assert_nothing_looks_valid(tmp_path / "tiny", "train.txt")


def test_without_network_one_line_says_where_to_put_the_files(online, tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "data" / "tiny"
    with pytest.raises(UserError) as caught:
        download_corpus("tiny", folder, table(f"http://127.0.0.1:{port}"), progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/good/train.txt (")
    assert message.endswith(
        f"; put train.txt, valid.txt, test.txt of tiny in {folder} yourself (docs/DATA.md says where to get them), "
        "or set WORDLM_DATA to a folder holding tiny/"
    )


def test_offline_nothing_is_fetched(server, tmp_path):
    with pytest.raises(
        UserError, match=r"^corpus tiny is not in \S+ and downloads are off \(WORDLM_OFFLINE is set\); put"
    ):
        download_corpus("tiny", tmp_path / "tiny", table(server.base))
    assert server.hits == []


def test_a_download_that_failed_part_way_resumes_with_the_missing_files(server, online, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "train.txt").write_bytes(FILES["train.txt"])
    download_corpus("tiny", folder, table(server.base), progress=False)
    assert sorted(server.hits) == ["/good/test.txt", "/good/valid.txt"]


def test_an_unwritable_target_says_so(server, online, tmp_path):
    (tmp_path / "data").write_text("a file where the folder should be")
    with pytest.raises(UserError, match=r"^cannot write \S+/data/tiny/train.txt \(.*\); put"):
        download_corpus("tiny", tmp_path / "data" / "tiny", table(server.base), progress=False)


@pytest.mark.parametrize("dataset, name", [("ptb", "penn"), ("./data/penn", "penn")])
def test_known_corpora_download_into_data_name_relative_to_the_working_folder(
    server, online, tmp_path, monkeypatch, dataset, name
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORDLM_DATA", raising=False)
    folder = resolve_dataset(dataset, sources=table(server.base, name=name))
    assert folder == Path("data") / name
    assert sorted(path.name for path in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


@pytest.mark.parametrize("dataset", ["./data", "wikitext-2", "./data/wikitext-2"])
def test_wikitext_2_is_never_downloaded_it_ships_with_wordlm(server, online, tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORDLM_DATA", raising=False)
    folder = resolve_dataset(dataset, sources=table(server.base, name="wikitext-2"))
    assert server.hits == [] and not (tmp_path / "data").exists()
    assert sorted(path.name for path in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
