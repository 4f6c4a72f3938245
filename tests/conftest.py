import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import an_zoo  # noqa: F401  (registers the models)
import golden_cases

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get('PYTEST_XDIST_WORKER'):
    # one intra-op thread per xdist worker: two workers with two OpenMP threads each on a 2-core machine
    # oversubscribe the cores and run several times slower
    torch.set_num_threads(1)
# no test may download from the real Google Drive: an empty an_zoo cache (no remembered licence) and no licence
# accepted from the environment; tests that download accept a licence for a local Drive (tests/drive_server.py)
os.environ['AN_ZOO_CACHE'] = tempfile.mkdtemp(prefix='an_zoo_test_cache_')
os.environ.pop('AN_ZOO_ACCEPT_LICENSE', None)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures('one_thread')``): small tensors gain
    nothing from more, and on a busy machine OpenMP threads waiting for each other make each op ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def golden():
    """(cases, the golden_cases module, data folder) of the golden reference cases committed under tests/golden."""
    return golden_cases.load_cases(), golden_cases, golden_cases.GOLDEN_DIR


@pytest.fixture(scope='session')
def golden_checkpoints(golden, tmp_path_factory):
    """Every golden case's checkpoint, written (digest-verified) once per test session."""
    cases, module, _ = golden
    out = tmp_path_factory.mktemp('golden_ckpt')
    return {case['name']: Path(module.materialize(case['name'], str(out))) for case in cases}
