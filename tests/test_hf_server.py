"""The real huggingface_hub client against tests/hf_server.py's LocalHub (offline, 127.0.0.1 only).

Every call passes ``endpoint=hub.url`` explicitly: huggingface_hub reads HF_ENDPOINT once, at import time.
"""
import hashlib
import os
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import huggingface_hub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,  # noqa: E402
                                    RepositoryNotFoundError, RevisionNotFoundError)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_server import LocalHub  # noqa: E402

REPO = 'an-zoo-test/tiny.v1'
FILE = 'model.safetensors'


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    # An outer HF_HUB_OFFLINE=1 (read at import time into constants) would block every request to the local hub;
    # NO_PROXY keeps a proxy from the environment away from 127.0.0.1 (if the client is created during the test).
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')


@pytest.fixture
def hub():
    with LocalHub() as h:
        yield h


def _download(hub, cache_dir, revision=None, filename=FILE, repo_id=REPO, **kw):
    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache_dir),
                                endpoint=hub.url, **kw))


def _http(url, method='GET', headers=None):
    """(status, headers, body) of one raw request, HTTP errors included."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_download_main_and_pinned_commit(hub, tmp_path):
    old = hub.add_file(REPO, FILE, b'old weights')
    new = hub.add_file(REPO, FILE, b'new weights')
    assert hub.commits(REPO) == [old, new] and old != new and len(old) == 40
    assert hub.file(REPO, FILE) == b'new weights' and hub.file(REPO, FILE, old) == b'old weights'

    latest = _download(hub, tmp_path)
    pinned = _download(hub, tmp_path, revision=old)
    assert latest.read_bytes() == b'new weights' and pinned.read_bytes() == b'old weights'
    # Standard cache layout: snapshots/<commit>/file -> blobs/<etag = sha256>, refs/main = latest commit
    assert latest.parent.name == new and pinned.parent.name == old
    assert latest.resolve().name == hashlib.sha256(b'new weights').hexdigest()
    assert (tmp_path / 'models--an-zoo-test--tiny.v1' / 'refs' / 'main').read_text() == new


def test_cache_serves_downloads_after_stop(hub, tmp_path):
    sha = hub.add_file(REPO, FILE, b'cached bytes')
    first = _download(hub, tmp_path, revision=sha)
    assert _download(hub, tmp_path).read_bytes() == b'cached bytes'  # also records refs/main
    seen = len(hub.requests)
    url = hub.url
    hub.stop()

    # The socket is really closed: a new connection is refused.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + f'/{REPO}/resolve/main/{FILE}', timeout=5)
    # A pinned commit sha that is cached never touches the network ...
    assert _download(hub, tmp_path, revision=sha) == first
    # ... "main" falls back to refs/main after the connection error, or goes straight there with local_files_only.
    assert _download(hub, tmp_path).read_bytes() == b'cached bytes'
    assert _download(hub, tmp_path, local_files_only=True).read_bytes() == b'cached bytes'
    assert len(hub.requests) == seen
    # Nothing cached for this one -> LocalEntryNotFoundError (local_files_only: no slow retry/backoff loop).
    with pytest.raises(LocalEntryNotFoundError):
        _download(hub, tmp_path, filename='other.bin', local_files_only=True)


def test_not_found_errors_map_to_client_exceptions(hub, tmp_path):
    sha = hub.add_file(REPO, FILE, b'x')
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, repo_id='an-zoo-test/missing.v1')
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, revision='0' * 40)
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, revision='no-such-branch')
    with pytest.raises(EntryNotFoundError):
        _download(hub, tmp_path, revision=sha, filename='missing.bin')

    api = HfApi(endpoint=hub.url, token='test-token')
    with pytest.raises(RepositoryNotFoundError):
        api.model_info('an-zoo-test/missing.v1')
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision='f' * 40)
    assert api.repo_exists(REPO) and not api.repo_exists('an-zoo-test/missing.v1')
    assert api.file_exists(REPO, FILE) and not api.file_exists(REPO, 'missing.bin')


def test_create_repo_upload_folder_roundtrip(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token='test-token')
    url = api.create_repo(REPO, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 accepted
    assert hub.commits(REPO) == []

    folder = tmp_path / 'upload'
    (folder / 'sub').mkdir(parents=True)
    files = {
        'config.json': b'{"num_classes": 10}',
        'README.md': b'---\nlicense: apache-2.0\n---\n# tiny\n',  # triggers /api/validate-yaml
        'sub/notes.txt': b'',  # empty file
        # larger than the Hub's 10 MB LFS threshold: still sent inline ("regular"), no LFS/xet round trip
        FILE: random.Random(0).randbytes(11 * 2**20),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message='add weights')
    assert hub.commits(REPO) == [info.oid]
    assert info.commit_url == f'{hub.url}/{REPO}/commit/{info.oid}'

    assert sorted(api.list_repo_files(REPO)) == sorted(files)
    model = api.model_info(REPO)
    assert model.id == REPO and model.sha == info.oid
    assert {s.rfilename: s.size for s in model.siblings} == {k: len(v) for k, v in files.items()}
    assert api.repo_info(REPO, revision=info.oid).sha == info.oid
    for name, data in files.items():
        assert hub.file(REPO, name) == data
        assert _download(hub, tmp_path / 'cache', revision=info.oid, filename=name).read_bytes() == data

    snap = Path(snapshot_download(REPO, cache_dir=str(tmp_path / 'snap'), endpoint=hub.url))
    assert {p.relative_to(snap).as_posix() for p in snap.rglob('*') if p.is_file()} == set(files)

    # Upload protocol actually used: preupload + NDJSON commit, nothing LFS/xet-related.
    posts = [path for method, path in hub.requests if method == 'POST']
    assert f'/api/models/{REPO}/preupload/main' in posts and f'/api/models/{REPO}/commit/main' in posts
    assert not any('lfs' in path or 'xet' in path for _, path in hub.requests)


def test_upload_file_new_commit_and_unchanged_skip(hub):
    api = HfApi(endpoint=hub.url, token='test-token')
    first = hub.add_file(REPO, FILE, b'v1')
    info = api.upload_file(path_or_fileobj=b'v2', path_in_repo=FILE, repo_id=REPO)
    assert hub.commits(REPO) == [first, info.oid] and hub.file(REPO, FILE) == b'v2'
    # Same bytes again: the preupload "oid" lets the client skip the commit entirely.
    again = api.upload_file(path_or_fileobj=b'v2', path_in_repo=FILE, repo_id=REPO)
    assert again.oid == info.oid and len(hub.commits(REPO)) == 2
    # parent_commit that is not the head of main is refused (412)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError):
        api.upload_file(path_or_fileobj=b'v3', path_in_repo=FILE, repo_id=REPO, parent_commit=first)


def test_resolve_headers_range_and_tamper(hub, tmp_path):
    data = bytes(range(256)) * 4
    sha = hub.add_file(REPO, FILE, data)
    url = f'{hub.url}/{REPO}/resolve/main/{FILE}'
    status, headers, body = _http(url, 'HEAD')
    etag = hashlib.sha256(data).hexdigest()
    assert (status, body) == (200, b'')
    assert headers['X-Repo-Commit'] == sha and headers['ETag'] == f'"{etag}"'
    assert headers['Content-Length'] == str(len(data))
    assert not [h for h in headers if h.lower().startswith('x-xet')]

    status, headers, body = _http(url, headers={'Range': 'bytes=1000-'})
    assert (status, body, headers['Content-Range']) == (206, data[1000:], f'bytes 1000-{len(data) - 1}/{len(data)}')
    assert _http(url, headers={'Range': f'bytes={len(data)}-'})[0] == 416

    # URL-encoded revision (the client quotes it with safe='') and error headers
    assert _http(f'{hub.url}/{REPO}/resolve/{sha}/{FILE}')[2] == data
    status, headers, _ = _http(f'{hub.url}/{REPO}/resolve/refs%2Fpr%2F1/{FILE}', 'HEAD')
    assert (status, headers['X-Error-Code']) == (404, 'RevisionNotFound')
    status, headers, _ = _http(f'{hub.url}/{REPO}/resolve/main/nope.bin')
    assert (status, headers['X-Error-Code'], headers['X-Repo-Commit']) == (404, 'EntryNotFound', sha)

    # tamper: same commit and etag, different bytes -> the client caches the bad bytes under the good etag
    hub.tamper(REPO, FILE, b'corrupted!')
    assert hub.commits(REPO) == [sha]
    status, headers, body = _http(url)
    assert (body, headers['ETag'], headers['X-Repo-Commit']) == (b'corrupted!', f'"{etag}"', sha)
    path = _download(hub, tmp_path, revision=sha)
    assert path.read_bytes() == b'corrupted!' and path.resolve().name == etag


def test_requests_log_and_parallel_hubs(tmp_path):
    with LocalHub() as a, LocalHub() as b:
        assert a.url != b.url and a.url.startswith('http://127.0.0.1:')
        sha = a.add_file(REPO, FILE, b'a')
        b.add_file(REPO, FILE, b'b')
        assert _download(a, tmp_path / 'a', revision=sha).read_bytes() == b'a'
        assert _download(b, tmp_path / 'b').read_bytes() == b'b'
        assert ('HEAD', f'/{REPO}/resolve/{sha}/{FILE}') in a.requests
        assert ('GET', f'/{REPO}/resolve/{sha}/{FILE}') in a.requests
        # Without a redirect the client GETs the very URL it HEADed (still "main", not the commit it learned).
        assert b.requests == [('HEAD', f'/{REPO}/resolve/main/{FILE}'), ('GET', f'/{REPO}/resolve/main/{FILE}')]
    assert os.path.isdir(tmp_path / 'a')
