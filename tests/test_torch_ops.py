"""torch.ops.flashmla_jit.*: registered on first torch use, with shape (fake) functions."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import flashmla_jit.torch_ops  # noqa: E402,F401  (registers the ops)


def test_decode_op_shapes_on_meta_tensors():
    # Meta tensors dispatch to the fake implementation: shapes and dtypes, no GPU needed.
    q = torch.empty(3, 2, 16, 576, dtype=torch.bfloat16, device="meta")
    k = torch.empty(10, 64, 1, 576, dtype=torch.bfloat16, device="meta")
    table = torch.empty(3, 4, dtype=torch.int32, device="meta")
    lens = torch.empty(3, dtype=torch.int32, device="meta")
    sched = torch.empty(132, 8, dtype=torch.int32, device="meta")
    splits = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = torch.ops.flashmla_jit.flash_mla_with_kvcache(q, k, table, lens, 512, sched, splits, None, True)
    assert out.shape == (3, 2, 16, 512) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (3, 16, 2) and lse.dtype == torch.float32


def test_eager_calls_leave_the_ops_unregistered_until_a_trace():
    # An eager call does not pay for torch.library's registration; a call inside a
    # torch.compile trace registers the ops (tests/test_gpu.py runs one first in a process).
    code = ("import torch, flashmla_jit, sys\n"
            "try:\n"
            "    flashmla_jit.get_mla_metadata(torch.zeros(2, dtype=torch.int32), 16, 1)\n"
            "except ValueError: pass\n"
            "print(hasattr(torch.ops.flashmla_jit, 'flash_mla_with_kvcache'))\n"
            "from flashmla_jit import api\n"
            "torch.compiler.is_compiling = lambda: True  # what a trace sees\n"
            "api._is_compiling = None\n"
            "print(api._compiling(torch.zeros(1)), hasattr(torch.ops.flashmla_jit, 'flash_mla_with_kvcache'))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.split("\n")[:2] == ["False", "True True"], res.stdout + res.stderr


def test_decode_op_takes_an_fp8_cache_and_k_scale():
    q = torch.empty(3, 2, 16, 576, dtype=torch.bfloat16, device="meta")
    table = torch.empty(3, 4, dtype=torch.int32, device="meta")
    lens = torch.empty(3, dtype=torch.int32, device="meta")
    sched = torch.empty(132, 8, dtype=torch.int32, device="meta")
    splits = torch.empty(4, dtype=torch.int32, device="meta")
    op = torch.ops.flashmla_jit.flash_mla_with_kvcache
    per_tensor = torch.empty(10, 64, 1, 576, dtype=torch.float8_e4m3fn, device="meta")
    scale = torch.empty(1, dtype=torch.float32, device="meta")
    out, lse = op(q, per_tensor, table, lens, 512, sched, splits, None, True, scale, None)
    assert out.shape == (3, 2, 16, 512) and out.dtype == torch.bfloat16 and lse.shape == (3, 16, 2)
    out, _ = op(q, per_tensor, table, lens, 512, sched, splits, None, True, k_scale_value=0.5)
    layout_656 = torch.empty(10, 64, 1, 656, dtype=torch.uint8, device="meta")
    out, _ = op(q, layout_656, table, lens, 512, sched, splits, None, True)
    assert out.dtype == torch.bfloat16
