"""Stand-ins for KernelSpec so cache/compiler/CLI tests do not depend on the real
kernels (written in parallel) and each compile takes a fraction of a second."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from flashmla_jit import cache, settings

TRIVIAL = """
template <int N>
__global__ void fake_kernel(float* x) { x[threadIdx.x] *= float(N); }
"""

SYNTAX_ERROR = """
template <int N>
__global__ void fake_kernel(float* x) { x[threadIdx.x] *= float(N) }
"""

# 64 live floats under a 32-register cap (__launch_bounds__(1024, 2)): ptxas must spill.
SPILLS = """
template <int N>
__global__ void __launch_bounds__(1024, 2) fake_kernel(float* x) {
  float a[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) a[i] = x[i * threadIdx.x];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 64; ++j) s += a[j] * a[63 - j] * x[j + 100];
  x[0] = s * N;
}
"""

ENV_VARS = ("FLASHMLA_JIT_CACHE_DIR", "FLASHMLA_JIT_DISABLE_CACHE", "FLASHMLA_JIT_NO_JIT",
            "FLASHMLA_JIT_VALIDATE", "FLASHMLA_JIT_PTXAS_VERBOSE", "FLASHMLA_JIT_DEFINES", "FLASHMLA_JIT_SEESAW")


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    tag: int = 1              # template argument: distinct tags are distinct variants
    body: str = TRIVIAL
    kind: str = "fake"
    dtype: str = "bf16"

    @property
    def source(self) -> str:
        return f"// fake variant {self.tag}\n{self.body}"

    @property
    def name_expression(self) -> str:
        return f"&fake_kernel<{self.tag}>"

    @property
    def name(self) -> str:
        return f"fake.t{self.tag}"

    threads = 128
    smem_bytes = 0


def reload(monkeypatch=None, **env):
    """Set FLASHMLA_JIT_* variables (None deletes) and re-read settings."""
    for key, value in env.items():
        name = f"FLASHMLA_JIT_{key.upper()}"
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    settings.get.cache_clear()
    cache.reset()


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A private cache dir and a clean environment; never the user's cache."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "cache"
    reload(monkeypatch, cache_dir=root)
    yield root
    settings.get.cache_clear()
    cache.reset()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_in_child(barrier, results, tag):
    """Spawned process: start together with its twin, then load_or_compile one key."""
    barrier.wait()
    art = cache.load_or_compile(FakeSpec(tag))
    results.put((cache.stats(), sha(art.cubin)))
