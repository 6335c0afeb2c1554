"""The number of entries a magnitude selection keeps is mergekit 0.1.5's count, on every backend.

mergekit 0.1.5 (mergekit/sparsify.py) counts in Python floats (fp64):
    magnitude():          k = max(1, int(density * n))                       (TIES)
    magnitude_outliers(): target_n = int(density * n), n_top = int(gamma * n),
                          n_bot = max(0, n - target_n - n_top); ranks [n_bot, n_bot + target_n) kept
                                                                             (breadcrumbs)
density 0.9 and n = 20480 is the case that separates fp64 from fp32: 0.9 · 20480 = 18432.0 in fp64,
while fp32(0.9) · 20480 = 18431.99… floors to 18431. pyops forms every count from the density as
given, in fp64, so each backend keeps 18432 there.

τ is a permutation of ±1 … ±n (distinct, non-zero magnitudes), one task, base 0, coefficient 1:
the merged tensor is then the trimmed task vector itself (TIES' election with one task keeps every
surviving sign), so its non-zero entries are exactly the kept ones. The CUDA kernels run here on a
GPU; without one, their source runs on host threads in test_methods_cuda_emulated.py
(test_emulated_counts_follow_mergekits_fp64_rule). Where mergekit's venv is found
(PYOPS_MERGEKIT_PYTHON), its own sparsify functions are run on the same τ as well.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

import pyops
from .cases import merge_reason
from .test_interpolate_mergekit import PYTHON as MERGEKIT_PYTHON

N = 20480
DENSITY = 0.9
GAMMA = 0.01


def mergekit_magnitude_k(density: float, n: int) -> int:
    """mergekit 0.1.5, mergekit/sparsify.py, magnitude(): max(1, int(density * n))."""
    return max(1, int(density * n))


def mergekit_band(density: float, gamma: float, n: int) -> tuple[int, int]:
    """mergekit 0.1.5, mergekit/sparsify.py, magnitude_outliers(): the kept ascending ranks
    [n_bot, n_bot + target_n) with target_n = int(density * n), n_top = int(gamma * n)."""
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    return n_bot, n_bot + target_n


def _tau(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mags = torch.randperm(n, generator=g).to(torch.float32) + 1
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mags * signs


BACKENDS = ["reference", "cpu", "triton", "cuda"]


def _device(backend: str) -> torch.device:
    """CPU tensors for the reference and the C++ kernels; CUDA tensors for the GPU kernels where a
    GPU is present (Triton otherwise runs on CPU tensors under its interpreter)."""
    return torch.device("cuda") if backend in ("triton", "cuda") and torch.cuda.is_available() else torch.device("cpu")


def _skip_unavailable(backend: str) -> torch.device:
    dev = _device(backend)
    if backend != "reference":
        reason = merge_reason(backend, dev)
        if reason is not None:
            pytest.skip(f"{backend} backend unavailable: {reason}")
    return dev


def _kept(out: torch.Tensor) -> torch.Tensor:
    return (out != 0).cpu()


def test_the_case_separates_fp64_from_fp32_counts():
    fp32_density = torch.tensor(DENSITY, dtype=torch.float32).item()
    assert mergekit_magnitude_k(DENSITY, N) == 18432
    assert int(fp32_density * N) == 18431


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_keeps_mergekits_k(backend):
    dev = _skip_unavailable(backend)
    tau = _tau(N)
    out = pyops.merge(torch.zeros(N, device=dev), [tau.to(dev)], method="ties", density=DENSITY, backend=backend)
    kept = _kept(out)
    k = mergekit_magnitude_k(DENSITY, N)
    assert int(kept.sum()) == k == 18432
    # the k largest magnitudes, nothing else
    assert torch.equal(kept, tau.abs() > N - k)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ties_exact_k_keeps_mergekits_k(backend):
    _skip_unavailable(backend)
    tau = _tau(N)
    out = pyops.merge(torch.zeros(N), [tau], method="ties", density=DENSITY, exact_k=True, backend=backend)
    assert int((out != 0).sum()) == mergekit_magnitude_k(DENSITY, N) == 18432


@pytest.mark.parametrize("method,backends", [("breadcrumbs", BACKENDS), ("breadcrumbs_ties", ["reference", "cpu"])],
                         ids=["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_breadcrumbs_keeps_mergekits_band(method, backends, backend):
    if backend not in backends:
        pytest.skip(f"{method} runs on {', '.join(backends)}")
    dev = _skip_unavailable(backend)
    tau = _tau(N)
    out = pyops.merge(torch.zeros(N, device=dev), [tau.to(dev)], method=method, density=DENSITY, gamma=GAMMA,
                      backend=backend)
    lo, hi = mergekit_band(DENSITY, GAMMA, N)
    assert hi - lo == 18432
    rank = tau.abs() - 1  # ascending rank of each magnitude
    assert torch.equal(_kept(out), (rank >= lo) & (rank < hi))


@pytest.mark.parametrize("backend", BACKENDS)
def test_breadcrumbs_gamma_bound_is_mergekits_fp64_count(backend):
    # 0.7 · 20480 = 14336.0 in fp64 (mergekit drops 14336 from the top); fp32(0.7) · 20480 = 14335.99…
    dev = _skip_unavailable(backend)
    tau = _tau(N)
    density, gamma = 0.25, 0.7
    out = pyops.merge(torch.zeros(N, device=dev), [tau.to(dev)], method="breadcrumbs", density=density, gamma=gamma,
                      backend=backend)
    lo, hi = mergekit_band(density, gamma, N)
    assert N - hi == int(gamma * N) == 14336
    assert int(torch.tensor(gamma, dtype=torch.float32).item() * N) == 14335
    rank = tau.abs() - 1
    assert torch.equal(_kept(out), (rank >= lo) & (rank < hi))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_blocks_count_per_row_in_fp64(backend):
    # blocks="rows": each row of 20480 keeps int(0.9 · 20480) = 18432
    dev = _skip_unavailable(backend)
    tau = torch.stack([_tau(N), -_tau(N).flip(0)])
    out = pyops.merge(torch.zeros(2, N, device=dev), [tau.to(dev)], method="ties", density=DENSITY, blocks="rows",
                      backend=backend)
    assert _kept(out).sum(dim=1).tolist() == [18432, 18432]


MERGEKIT_COUNTS = """
import torch
from mergekit.sparsify import magnitude, magnitude_outliers
g = torch.Generator().manual_seed(0)
tau = (torch.randperm(20480, generator=g).float() + 1)
print(int((magnitude(tau, density=0.9) != 0).sum()), int((magnitude_outliers(tau, density=0.9, gamma=0.01) != 0).sum()))
"""


@pytest.mark.skipif(MERGEKIT_PYTHON is None, reason="mergekit's python not found (PYOPS_MERGEKIT_PYTHON / "
                                                    "PYOPS_MERGEKIT_YAML unset)")
def test_mergekits_own_functions_keep_the_same_counts():
    proc = subprocess.run([MERGEKIT_PYTHON, "-c", MERGEKIT_COUNTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ties_k, band = map(int, proc.stdout.split())
    tau = _tau(N).abs()
    assert ties_k == int((pyops.merge(torch.zeros(N), [tau], method="ties", density=DENSITY) != 0).sum()) == 18432
    assert band == int((pyops.merge(torch.zeros(N), [tau], method="breadcrumbs", density=DENSITY,
                                    gamma=GAMMA) != 0).sum()) == 18432
