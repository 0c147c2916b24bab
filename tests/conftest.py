"""Shared fixtures. dfq imports from its editable install (make setup: pip install -e .); stages, cli, bench and
tests import from the repository root (pyproject.toml: [tool.pytest.ini_options] pythonpath)."""

import os

import pytest
import torch
from torch import nn

from dfq import threads

# Under pytest-xdist (make test: -n 2) the workers share the cores: one torch thread each, registered (dfq.threads)
# so that the stages the tests run take one thread as well (the end-to-end file counts its own stages only).
if os.environ.get("PYTEST_XDIST_WORKER"):
    threads.register()
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

LONGEST_FIRST = ("test_pipeline_e2e.py",)  # what the other files' tests run beside when xdist starts it first


def pytest_collection_modifyitems(session, config, items):
    """The end-to-end file first (then the others in file order): xdist's --dist loadfile then runs the rest of
    the suite on the other worker while it runs."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)


class TinyBN(nn.Module):
    """Two conv+BN layers with non-trivial running statistics; one nn.ReLU, one functional relu."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.nn.functional.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_bn():
    torch.manual_seed(0)
    m = TinyBN()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers; fail the test if ``proc`` dies or ``timeout`` seconds pass."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not come up within {timeout:.0f} s")
            time.sleep(0.3)


def stop_group(proc) -> None:
    """Stop a test server started with ``start_new_session=True`` and all its workers: SIGTERM to its process group,
    SIGKILL after 20 s (MLflow's workers have been seen orphaned when only the parent was stopped)."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    except ProcessLookupError:
        pass


def _narrow_resnet():
    """A narrow FMNIST ResNet (3 residual blocks, 2 with 1x1-conv shortcuts) for 16 x 16 inputs, with
    non-trivial BN running statistics; the same weights on every call."""
    from dfq.fp32.models import FMNISTResNet

    torch.manual_seed(0)
    m = FMNISTResNet(widths=(8, 12, 16))
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def narrow_resnet():
    """Factory: ``narrow_resnet()`` builds a fresh copy of the narrow test ResNet."""
    return _narrow_resnet
