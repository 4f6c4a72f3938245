"""A tiny in-memory Hugging Face Hub look-alike for offline tests (stdlib only: http.server + threading).

The REAL ``huggingface_hub`` client (checked against 2.4.0, httpx2-based) works against it when given
``endpoint=hub.url`` (``hf_hub_download``, ``snapshot_download``, ``HfApi(endpoint=...)``)::

    hub = LocalHub().start()
    sha = hub.add_file('org/name.tag', 'model.safetensors', b'...')
    hf_hub_download('org/name.tag', 'model.safetensors', revision=sha, cache_dir=tmp, endpoint=hub.url)
    hub.stop()

Model repos only; repo ids are ``namespace/name`` (create_repo without a namespace makes ``user/name``). Routes:

* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` -- 200 (206 for ``Range: bytes=N-[M]``) with ``X-Repo-Commit``,
  ``ETag``/``X-Linked-Etag`` = quoted sha256 of the content (as for LFS files on the real Hub), ``Content-Length``.
  Never a redirect and never an ``X-Xet-*`` header, so the client downloads over plain HTTP even with hf_xet.
* ``GET /api/models/{repo}[/revision/{rev}]`` (model_info / repo_info / repo_exists) and
  ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (list_repo_tree / list_repo_files / snapshot_download).
* ``POST /api/repos/create`` (create_repo; 409 if it exists, which ``exist_ok=True`` accepts).
* ``POST /api/models/{repo}/preupload/{rev}`` answers ``uploadMode: "regular"`` for EVERY file, whatever its size:
  the client then inlines the bytes base64 in the NDJSON ``POST /api/models/{repo}/commit/{rev}`` and never
  touches LFS or xet (with hf_xet installed ``upload_folder`` goes through its "pipelined" uploader, which also
  only uses xet for files the server marked "lfs"; it may split >100 MB of inline content into several commits).
  ``oid`` is the git blob sha1 of the current remote file, so the client skips unchanged files as on the real Hub.
* ``POST /api/validate-yaml`` (called when a README.md is uploaded): always valid.

Errors carry ``X-Error-Code`` (what ``hf_raise_for_status`` maps): ``RepoNotFound`` (404) ->
RepositoryNotFoundError, ``RevisionNotFound`` (404) -> RevisionNotFoundError, ``EntryNotFound`` (404, with the
``X-Repo-Commit`` the client uses to cache the miss) -> RemoteEntryNotFoundError (a subclass of EntryNotFoundError).

Revisions: ``main`` (the latest commit) or a full 40-hex commit sha of that repo; a repo made by ``create_repo``
has no commit until the first upload (its ``main`` is then RevisionNotFound for reads).
Every response says ``Connection: close`` so no keep-alive socket outlives :meth:`LocalHub.stop`.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message (also sent as ``{"error": ...}``)."""

    def __init__(self, status: int, code: Optional[str], message: str, commit: Optional[str] = None, **body):
        super().__init__(message)
        self.status, self.code, self.message, self.commit, self.body = status, code, message, commit, body


def _git_oid(data: bytes) -> str:
    """git blob sha1 -- the 'oid' huggingface_hub compares with its own to skip unchanged regular files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Repo:
    def __init__(self):
        self.blobs: Dict[str, bytes] = {}  # sha256 hex (the advertised etag) -> bytes served (see tamper)
        self.commits: List[Tuple[str, Dict[str, str]]] = []  # (sha, {path: sha256}), oldest first; immutable


class LocalHub:
    """In-memory model repos served over HTTP on 127.0.0.1 (random free port)."""

    def __init__(self):
        self._repos: Dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ''
        self.requests: List[Tuple[str, str]] = []  # (method, URL-decoded path without query), in arrival order

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> 'LocalHub':
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        # Port 0: the OS picks a free port, so parallel test workers (pytest -n) never collide.
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self.url = 'http://127.0.0.1:%d' % self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05},
                                        name='LocalHub', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket: later requests get connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> 'LocalHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test-side helpers
    def create_repo(self, repo_id: str) -> bool:
        """Create an empty repo (no commit yet); False if it already existed."""
        with self._lock:
            if repo_id in self._repos:
                return False
            self._repos[repo_id] = _Repo()
            return True

    def add_file(self, repo_id: str, path_in_repo: str, data: bytes) -> str:
        """Add/replace one file in a NEW commit on main (creating the repo if needed); returns the commit sha."""
        return self._commit(repo_id, {path_in_repo: bytes(data)}, set(), 'add ' + path_in_repo)

    def tamper(self, repo_id: str, path_in_repo: str, data: bytes) -> None:
        """Swap the bytes the server stores for the file at main, keeping commit shas and the advertised etag.

        Storage is content-addressed, so every commit sharing that content serves the new bytes too (like a blob
        corrupted on the server). Content-Length follows the new bytes, as a real server's would.
        """
        with self._lock:
            etag = self._tree(self._repo(repo_id), 'main', path_in_repo)[path_in_repo]
            self._repo(repo_id).blobs[etag] = bytes(data)

    # commits()/file()/tamper() raise HubError for an unknown repo, revision or path.
    def commits(self, repo_id: str) -> List[str]:
        with self._lock:
            return [sha for sha, _ in self._repo(repo_id).commits]

    def file(self, repo_id: str, path: str, revision: Optional[str] = None) -> bytes:
        with self._lock:
            repo = self._repo(repo_id)
            return repo.blobs[self._tree(repo, revision or 'main', path)[path]]

    # ------------------------------------------------------------------ state (callers hold no lock; all locked here)
    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, 'RepoNotFound', 'Repository not found')
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> Tuple[str, Dict[str, str]]:
        if revision == 'main' and repo.commits:
            return repo.commits[-1]
        for sha, tree in repo.commits:
            if sha == revision:
                return sha, tree
        raise HubError(404, 'RevisionNotFound', 'Invalid rev id: %s' % revision)

    def _tree(self, repo: _Repo, revision: str, path: Optional[str] = None) -> Dict[str, str]:
        sha, tree = self._resolve(repo, revision)
        if path is not None and path not in tree:
            raise HubError(404, 'EntryNotFound', 'Entry not found', commit=sha)
        return tree

    def _commit(self, repo_id: str, added: Dict[str, bytes], deleted: set, message: str,
                parent: Optional[str] = None) -> str:
        with self._lock:
            self.create_repo(repo_id)
            repo = self._repos[repo_id]
            head_sha, head = repo.commits[-1] if repo.commits else ('', {})
            if parent is not None and parent != head_sha:
                raise HubError(412, None, 'parentCommit %s is not the head of main (%s)' % (parent, head_sha))
            tree = {p: e for p, e in head.items()
                    if p not in deleted and not any(p.startswith(d.rstrip('/') + '/') for d in deleted)}
            for path, data in added.items():
                etag = hashlib.sha256(data).hexdigest()
                repo.blobs.setdefault(etag, data)
                tree[path] = etag
            # Deterministic per history: the parent sha is hashed in, so every commit gets a new sha.
            sha = hashlib.sha1(json.dumps([repo_id, head_sha, message, sorted(tree.items())]).encode()).hexdigest()
            repo.commits.append((sha, tree))
            return sha

    def _info(self, repo_id: str, revision: str) -> dict:
        with self._lock:
            repo = self._repo(repo_id)
            sha, tree = self._resolve(repo, revision)
            siblings = [{'rfilename': p, 'size': len(repo.blobs[e]), 'blobId': _git_oid(repo.blobs[e])}
                        for p, e in sorted(tree.items())]
            return {'id': repo_id, 'modelId': repo_id, 'author': repo_id.split('/')[0], 'sha': sha,
                    'private': False, 'disabled': False, 'gated': False, 'tags': [], 'siblings': siblings}

    def _tree_listing(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> list:
        with self._lock:
            repo = self._repo(repo_id)
            tree = self._tree(repo, revision)
            base = prefix.strip('/') + '/' if prefix.strip('/') else ''
            out, dirs = [], set()
            for path, etag in sorted(tree.items()):
                if not path.startswith(base):
                    continue
                parts = path[len(base):].split('/')
                for i in range(1, len(parts)):  # the folders on the way to this file
                    if recursive or i == 1:
                        dirs.add(base + '/'.join(parts[:i]))
                if recursive or len(parts) == 1:
                    data = repo.blobs[etag]
                    out.append({'type': 'file', 'path': path, 'size': len(data), 'oid': _git_oid(data)})
            if base and not out and not dirs:
                raise HubError(404, 'EntryNotFound', 'Entry not found', commit=self._resolve(repo, revision)[0])
            return [{'type': 'directory', 'path': d, 'size': 0, 'oid': hashlib.sha1(d.encode()).hexdigest()}
                    for d in sorted(dirs)] + out

    def _preupload(self, repo_id: str, revision: str, files: list) -> dict:
        with self._lock:
            repo = self._repo(repo_id)
            tree = self._tree(repo, revision) if repo.commits or revision != 'main' else {}
            return {'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
                               'oid': _git_oid(repo.blobs[tree[f['path']]]) if f['path'] in tree else None}
                              for f in files]}


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._dispatch('HEAD')

    def do_GET(self):
        self._dispatch('GET')

    def do_POST(self):
        self._dispatch('POST')

    def _dispatch(self, method: str) -> None:
        raw = urlsplit(self.path)
        with self.hub._lock:
            self.hub.requests.append((method, unquote(raw.path)))
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        # Split the RAW path: the revision is URL-encoded with safe='' (e.g. refs%2Fpr%2F1), file paths keep '/'.
        parts = [unquote(p) for p in raw.path.split('/')[1:]]
        try:
            if len(parts) >= 5 and parts[2] == 'resolve' and method in ('GET', 'HEAD'):
                return self._resolve_file(method, '/'.join(parts[:2]), parts[3], '/'.join(parts[4:]))
            if parts[:1] == ['api']:
                return self._api(method, parts[1:], body, raw.query)
            raise HubError(404, None, 'Not found: %s %s' % (method, raw.path))
        except Exception as err:  # every failure becomes an HTTP answer, never a dropped connection
            if not isinstance(err, HubError):
                err = HubError(500, None, 'LocalHub bug: %r' % err)
            headers = {'X-Error-Message': err.message.encode('ascii', 'replace').decode()}
            if err.code:
                headers['X-Error-Code'] = err.code
            if err.commit:
                headers['X-Repo-Commit'] = err.commit
            body = json.dumps({'error': err.message, **err.body}).encode()
            self._send(err.status, body, headers, head=method == 'HEAD')

    def _resolve_file(self, method: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id)
            sha = hub._resolve(repo, revision)[0]
            etag = hub._tree(repo, revision, path)[path]
            data = repo.blobs[etag]
        headers = {'X-Repo-Commit': sha, 'ETag': '"%s"' % etag, 'X-Linked-Etag': '"%s"' % etag,
                   'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream'}
        status, total = 200, len(data)
        m = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', '').strip())
        if m:  # resumed download (http_get sends 'bytes=N-')
            start, end = int(m.group(1)), int(m.group(2) or total - 1)
            if start >= total:
                headers['Content-Range'] = 'bytes */%d' % total
                return self._send(416, b'', headers, head=method == 'HEAD')
            end = min(end, total - 1)
            status, data = 206, data[start:end + 1]
            headers['Content-Range'] = 'bytes %d-%d/%d' % (start, end, total)
        self._send(status, data, headers, head=method == 'HEAD')

    def _api(self, method: str, parts: List[str], body: bytes, query: str) -> None:
        hub = self.hub
        if method == 'POST' and parts == ['repos', 'create']:
            payload = json.loads(body or b'{}')
            if payload.get('type', 'model') != 'model':
                raise HubError(400, None, 'LocalHub only serves model repos')
            repo_id = '%s/%s' % (payload.get('organization') or 'user', payload['name'])
            url = '%s/%s' % (hub.url, repo_id)
            if not hub.create_repo(repo_id):  # create_repo(exist_ok=True) reads "url" from this 409 body
                raise HubError(409, None, 'You already created this model repo', url=url)
            return self._json({'url': url, 'name': repo_id})
        if method == 'POST' and parts == ['validate-yaml']:
            return self._json({'errors': [], 'warnings': []})
        if len(parts) < 3 or parts[0] != 'models':
            raise HubError(404, None, 'Unknown API route /api/' + '/'.join(parts))
        repo_id, rest = '/'.join(parts[1:3]), parts[3:]
        if method == 'GET' and not rest:
            return self._json(hub._info(repo_id, 'main'))
        if method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
            return self._json(hub._info(repo_id, rest[1]))
        if method == 'GET' and len(rest) >= 2 and rest[0] == 'tree':
            recursive = 'recursive=true' in query.lower() or 'recursive=1' in query
            return self._json(hub._tree_listing(repo_id, rest[1], '/'.join(rest[2:]), recursive))
        if method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
            return self._json(hub._preupload(repo_id, rest[1], json.loads(body)['files']))
        if method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
            return self._commit(repo_id, rest[1], body, query)
        raise HubError(404, None, 'Unknown API route /api/' + '/'.join(parts))

    def _commit(self, repo_id: str, revision: str, body: bytes, query: str) -> None:
        """NDJSON commit: a 'header' line then one line per operation (regular files come base64 inline)."""
        if revision != 'main' or 'create_pr=1' in query:
            raise HubError(400, None, 'LocalHub commits to main only (no branches, no pull requests)')
        self.hub._repo(repo_id)  # RepoNotFound before anything else
        header, added, deleted = {}, {}, set()
        for line in filter(None, body.splitlines()):
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                header = value
            elif key == 'file':
                if value.get('encoding', 'base64') != 'base64':
                    raise HubError(400, None, 'unsupported encoding %r' % value.get('encoding'))
                added[value['path']] = base64.b64decode(value['content'])
            elif key in ('deletedFile', 'deletedFolder'):
                deleted.add(value['path'])
            else:  # 'lfsFile' never comes since preupload says "regular" (except copying LFS files: unsupported)
                raise HubError(400, None, 'LocalHub does not support %r commit operations' % key)
        sha = self.hub._commit(repo_id, added, deleted, header.get('summary', ''), header.get('parentCommit'))
        self._json({'success': True, 'commitOid': sha, 'commitUrl': '%s/%s/commit/%s' % (self.hub.url, repo_id, sha),
                    'pullRequestUrl': None, 'hookOutput': ''})

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {'Content-Type': 'application/json'})

    def _send(self, status: int, data: bytes, headers: Dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Connection', 'close')  # also sets self.close_connection: one request per socket
        self.end_headers()
        if not head:
            self.wfile.write(data)
