import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clbench import ClbenchError
from clbench.benchmarks.download import ARCHIVES, Archive, download

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB stand-in archive


class Server:
    """A loopback HTTP server with Range support that can cut the first response short."""

    def __init__(self, payload: bytes, cut_first_at: int | None = None, honour_range: bool = True):
        self.payload, self.cut, self.honour_range, self.ranges = payload, cut_first_at, honour_range, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header.split("=")[1].split("-")[0]) if header and outer.honour_range else 0
                if start >= len(outer.payload):
                    self.send_response(416)
                    self.end_headers()
                    return
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    body, outer.cut = body[: outer.cut], None
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive():
    return Archive("standin.tgz", "http://invalid.example/standin.tgz", hashlib.md5(PAYLOAD).hexdigest())


def test_download_checks_the_md5(archive, tmp_path):
    server = Server(PAYLOAD)
    try:
        path = download(archive, tmp_path, mirror=server.url, progress=False)
    finally:
        server.close()
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "standin.tgz.part").exists()


def test_an_interrupted_download_resumes_with_a_range_request(archive, tmp_path):
    server = Server(PAYLOAD, cut_first_at=300_000)
    try:
        with pytest.raises(ClbenchError, match="interrupted after 300000 .*rerun to resume"):
            download(archive, tmp_path, mirror=server.url, progress=False, timeout=5)
        assert (tmp_path / "standin.tgz.part").stat().st_size == 300_000
        path = download(archive, tmp_path, mirror=server.url, progress=False)
    finally:
        server.close()
    assert server.ranges == [None, "bytes=300000-"]
    assert path.read_bytes() == PAYLOAD


def test_a_server_ignoring_range_restarts_the_file(archive, tmp_path):
    (tmp_path / "standin.tgz.part").write_bytes(b"garbage")
    server = Server(PAYLOAD, honour_range=False)
    try:
        path = download(archive, tmp_path, mirror=server.url, progress=False)
    finally:
        server.close()
    assert path.read_bytes() == PAYLOAD


def test_a_checksum_mismatch_names_the_file_and_keeps_it(tmp_path):
    wrong = Archive("standin.tgz", "http://invalid.example/standin.tgz", "0" * 32)
    server = Server(PAYLOAD)
    try:
        with pytest.raises(ClbenchError, match=r"standin.tgz.part: downloaded from .* with md5 [0-9a-f]{32}, "
                                               r"expected 0{32}"):
            download(wrong, tmp_path, mirror=server.url, progress=False)
    finally:
        server.close()
    assert (tmp_path / "standin.tgz.part").read_bytes() == PAYLOAD and not (tmp_path / "standin.tgz").exists()


def test_an_existing_file_with_a_wrong_checksum_is_left_untouched(archive, tmp_path):
    (tmp_path / "standin.tgz").write_bytes(b"the user's own file")
    with pytest.raises(ClbenchError, match="standin.tgz: exists with md5 .* left untouched"):
        download(archive, tmp_path, progress=False)
    assert (tmp_path / "standin.tgz").read_bytes() == b"the user's own file"


def test_the_official_archive_table_is_complete():
    names = {a.name for group in ARCHIVES.values() for a in group}
    assert names == {"val2017.zip", "annotations_trainval2017.zip", "train2017.zip", "VOCtrainval_11-May-2012.tar",
                     "imagenette2-160.tgz"}
    assert all(len(a.md5) == 32 for group in ARCHIVES.values() for a in group)
