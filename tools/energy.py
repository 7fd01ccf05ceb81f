"""Time and energy per decode call under sustained load, ours beside FlashMLA (when
.peer/ has a local build): 20 warm-up calls, 1 s idle (the same starting temperature),
then 400 back-to-back calls without L2 flushes, energy from NVML's total-energy counter.
Compute-bound calls run at the card's power cap, where the clock follows the energy a
call spends (docs/PERF.md, v12).

  AB_ROUNDS=3 AB_CONFIGS="128,16384,128,2 128,16384,128,1" python tools/energy.py
"""
import ctypes
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from mla_reference import make_inputs  # noqa: E402

import flashmla_jit  # noqa: E402
from bench import env_configs, load_peer  # noqa: E402

CONFIGS = env_configs("128,16384,128,2 128,16384,128,1")
ROUNDS = int(os.environ.get("AB_ROUNDS", "3"))
CALLS = 400


class Nvml:
    """The GPU's total energy counter (mJ) through libnvidia-ml, which the driver ships."""

    def __init__(self, index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
            raise RuntimeError(f"no NVML handle for GPU {index}")

    def energy_mj(self) -> int:
        value = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)) != 0:
            raise RuntimeError("this GPU reports no total energy")
        return value.value


def measure(b, s_k, h_q, s_q, nvml, peer):
    """Print time, energy and mean power per call, ours and FlashMLA's in turn per round."""
    q, k, bt, sl = make_inputs(b, s_q, h_q, 1, [s_k] * b, nan_tail=False)
    ours = flashmla_jit.get_mla_metadata(sl, s_q * h_q, 1)
    calls = {"ours": lambda: flashmla_jit.flash_mla_with_kvcache(q, k, bt, sl, 512, *ours, causal=True)}
    if peer is not None:
        theirs = peer.get_mla_metadata(sl, s_q * h_q, 1)
        calls["FlashMLA"] = lambda: peer.flash_mla_with_kvcache(q, k, bt, sl, 512, *theirs, causal=True)
    for _ in range(ROUNDS):
        for name, call in calls.items():
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            time.sleep(1.0)
            e0, t0 = nvml.energy_mj(), time.perf_counter()
            for _ in range(CALLS):
                call()
            torch.cuda.synchronize()
            e1, t1 = nvml.energy_mj(), time.perf_counter()
            print(f"b={b} s_k={s_k} h_q={h_q} s_q={s_q} {name:8s}: {(t1 - t0) / CALLS * 1e6:7.1f} us, "
                  f"{(e1 - e0) / CALLS:6.1f} mJ, {(e1 - e0) / (t1 - t0) / 1e3:4.0f} W", flush=True)


def main():
    nvml, peer = Nvml(0), load_peer()  # NVML numbers GPUs its own way: meant for one-GPU machines
    print(f"{torch.cuda.get_device_name()}: {CALLS} back-to-back calls after 1 s idle, per call")
    for config in CONFIGS:
        measure(*config, nvml, peer)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
