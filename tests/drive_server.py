"""A tiny Google Drive look-alike for offline tests: the REAL gdown client reaches it at https://drive.google.com.

gdown builds Drive URLs itself (``https://drive.google.com/uc?id=...``, ``.../embeddedfolderview?id=...``), so the
look-alike sits where any HTTPS client can be sent without changing its code: an HTTP proxy on 127.0.0.1 that answers
``CONNECT drive.google.com:443`` by speaking TLS itself, with a certificate for drive.google.com signed by a test CA.
A client process uses it with two standard ``requests`` settings, which :meth:`LocalDrive.env` returns::

    HTTPS_PROXY=http://127.0.0.1:<port>    REQUESTS_CA_BUNDLE=<tmp>/ca.pem

Routes (behind TLS): ``GET /uc?id=ID`` (a file: ``Content-Disposition: attachment``, ``ETag``, ``Range`` -> 206),
``GET /embeddedfolderview?id=ID`` (a folder: the HTML page gdown parses: ``<title>`` and one link per child).
``cut(id, n)`` makes the next download of a file stop after n bytes (a dropped connection), for resume tests;
``tamper(id, data)`` changes a file's bytes. ``requests`` records ``(path, query, Range header)`` of each request.
"""
import datetime
import hashlib
import html
import secrets
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

HOSTS = ('drive.google.com', 'docs.google.com', 'drive.usercontent.google.com')


def _certificates(folder: Path) -> Tuple[Path, Path, Path]:
    """A test CA (ca.pem) and a server certificate for :data:`HOSTS` signed by it (server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'an_zoo test CA')])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / 'ca.pem', folder / 'server.pem', folder / 'server.key'
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class LocalDrive:
    """Files and folders of a fake Drive, served through a TLS-terminating CONNECT proxy on 127.0.0.1."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files: Dict[str, Tuple[str, bytes]] = {}  # id -> (name, bytes)
        self.folders: Dict[str, Tuple[str, List[str]]] = {}  # id -> (name, child ids)
        self.cuts: Dict[str, int] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self.proxy_url = ''

    # ------------------------------------------------------------------ content
    @staticmethod
    def _new_id() -> str:
        return secrets.token_urlsafe(24)[:33].replace('-', 'x')

    def add_file(self, name: str, data: bytes) -> str:
        file_id = self._new_id()
        self.files[file_id] = (name, data)
        return file_id

    def add_folder(self, name: str, children: List[str]) -> str:
        folder_id = self._new_id()
        self.folders[folder_id] = (name, list(children))
        return folder_id

    def tamper(self, file_id: str, data: bytes) -> None:
        name, _ = self.files[file_id]
        self.files[file_id] = (name, data)

    def cut(self, file_id: str, after: int) -> None:
        """The next download of ``file_id`` stops after ``after`` bytes (connection closed mid-body)."""
        self.cuts[file_id] = after

    def downloads(self, file_id: str) -> int:
        return sum(1 for path, query, _ in self.requests if path == '/uc' and query == file_id)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> 'LocalDrive':
        ca, cert, key = _certificates(self.folder)
        self.ca_bundle = ca
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert, key)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(('127.0.0.1', 0))
        self._listener.listen(16)
        self.proxy_url = f'http://127.0.0.1:{self._listener.getsockname()[1]}'
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def env(self) -> Dict[str, str]:
        """Environment that sends a ``requests`` / gdown client to this Drive (and nothing else through it)."""
        return {'HTTPS_PROXY': self.proxy_url, 'https_proxy': self.proxy_url, 'REQUESTS_CA_BUNDLE': str(self.ca_bundle),
                'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost'}

    def __enter__(self) -> 'LocalDrive':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        """``CONNECT host:443`` -> 200, then TLS as that host, then one HTTP exchange."""
        try:
            head = b''
            while b'\r\n\r\n' not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            line = head.split(b'\r\n', 1)[0].decode('latin-1').split()
            if len(line) < 2 or line[0] != 'CONNECT' or line[1].split(':')[0] not in HOSTS:
                client.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
                return
            client.sendall(b'HTTP/1.1 200 Connection Established\r\n\r\n')
            tls = self._tls.wrap_socket(client, server_side=True)
            _DriveHandler(tls, ('127.0.0.1', 0), self)
            tls.close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            client.close()


class _DriveHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def __init__(self, request, client_address, drive: LocalDrive):
        self.drive = drive
        super().__init__(request, client_address, None)

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        item = (query.get('id') or [''])[0]
        with self.drive._lock:
            self.drive.requests.append((parts.path, item, self.headers.get('Range')))
        if parts.path == '/uc' and item in self.drive.files:
            return self._file(item)
        if parts.path == '/embeddedfolderview' and item in self.drive.folders:
            return self._folder(item)
        self._send(404, b'Not Found', {'Content-Type': 'text/html'})

    def _file(self, file_id: str) -> None:
        name, data = self.drive.files[file_id]
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        start, status = 0, 200
        headers = {'Content-Type': 'application/octet-stream', 'ETag': etag,
                   'Content-Disposition': f'attachment; filename="{name}"', 'Accept-Ranges': 'bytes'}
        requested = self.headers.get('Range', '')
        if requested.startswith('bytes='):
            start = int(requested[len('bytes='):].split('-')[0] or 0)
            if self.headers.get('If-Range') not in (None, etag) or start >= len(data):
                start = 0  # a changed file: send it whole, as a real server does
            else:
                status = 206
                headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
        body = data[start:]
        cut = self.drive.cuts.pop(file_id, None)
        self._send(status, body, headers, cut=cut)

    def _folder(self, folder_id: str) -> None:
        name, children = self.drive.folders[folder_id]
        links = []
        for child in children:
            if child in self.drive.folders:
                links.append(f'<a href="https://drive.google.com/drive/folders/{child}">'
                             f'{html.escape(self.drive.folders[child][0])}</a>')
            else:
                links.append(f'<a href="https://drive.google.com/file/d/{child}/view?usp=drive_web">'
                             f'{html.escape(self.drive.files[child][0])}</a>')
        page = f'<html><head><title>{html.escape(name)}</title></head><body>{"".join(links)}</body></html>'
        self._send(200, page.encode(), {'Content-Type': 'text/html; charset=utf-8'})

    def _send(self, status: int, body: bytes, headers: Dict[str, str], cut: Optional[int] = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


__all__ = ['LocalDrive', 'HOSTS']
