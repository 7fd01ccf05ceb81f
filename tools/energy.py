"""Time and energy per decode call under sustained load, ours beside FlashMLA (when
.peer/ has a local build): 20 warm-up calls, 1 s idle (the same starting temperature),
then 400 back-to-back calls without L2 flushes, energy from NVML's total-energy counter.
Compute-bound calls run at the card's power cap, where the clock follows the energy a
call spends (docs/PERF.md, v12).

  AB_ROUNDS=3 AB_CONFIGS="128,16384,128,2 128,16384,128,1" python tools/energy.py

Variants, each in processes of its own (switching kernel builds in one process is not
safe), alternating AB_PROCESSES times, then a table of means (ours µs, ours / FlashMLA):
  AB_VARIANTS='"" NAME=1 ENV:FLASHMLA_JIT_SEESAW=0' AB_PROCESSES=2 python tools/energy.py
("" = the kernels as they are, NAME=1 = a -D for a kernel's #ifndef knob, ENV:VAR=1 = an
environment variable.)
"""
import ctypes
import os
import re
import shlex
import statistics
import subprocess
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


LINE = re.compile(r"^(b=\d+ s_k=\d+ h_q=\d+ s_q=\d+) (\S+)\s*: +([\d.]+) us")


def variant_env(variant: str) -> dict:
    """The environment of one variant's process (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AB_VARIANTS", "AB_PROCESSES")}
    if variant.startswith("ENV:"):
        name, _, value = variant[4:].partition("=")
        env[name] = value
    else:
        env["FLASHMLA_JIT_DEFINES"] = variant
    return env


def summarize(results: dict) -> list:
    """{variant: printed lines} -> rows (variant, config, mean ours µs, mean ours / FlashMLA
    over the rounds, each ours line paired with the FlashMLA line after it)."""
    rows = []
    for variant, lines in results.items():
        by_config = {}
        for line in lines:
            m = LINE.match(line)
            if m:
                by_config.setdefault(m.group(1), []).append((m.group(2), float(m.group(3))))
        for config, timed in by_config.items():
            ours = [t for name, t in timed if name == "ours"]
            ratios = [a[1] / b[1] for a, b in zip(timed, timed[1:]) if a[0] == "ours" and b[0] == "FlashMLA"]
            rows.append((variant, config, statistics.mean(ours), statistics.mean(ratios) if ratios else None))
    return rows


def run_variants(variants: list, processes: int):
    """Each variant in a process of its own, the variants in turn, `processes` times; then
    the means (a failed process prints its stderr's tail and counts no lines)."""
    results = {v: [] for v in variants}
    for _ in range(processes):
        for variant in variants:
            run = subprocess.run([sys.executable, os.path.abspath(__file__)], env=variant_env(variant),
                                 capture_output=True, text=True)
            for line in run.stdout.splitlines():
                print(f"[{variant}] {line}", flush=True)
            if run.returncode:
                print(f"[{variant}] failed:\n{run.stderr[-2000:]}", flush=True)
            results[variant] += run.stdout.splitlines()
    print("variant | config | ours us (mean) | ours / FlashMLA (mean)")
    for variant, config, ours, ratio in summarize(results):
        print(f"[{variant}] | {config} | {ours:.1f} | {'-' if ratio is None else f'{ratio:.3f}'}")


def main():
    if "AB_VARIANTS" in os.environ:
        run_variants(shlex.split(os.environ["AB_VARIANTS"]) or [""], int(os.environ.get("AB_PROCESSES", "2")))
        return
    nvml, peer = Nvml(0), load_peer()  # NVML numbers GPUs its own way: meant for one-GPU machines
    print(f"{torch.cuda.get_device_name()}: {CALLS} back-to-back calls after 1 s idle, per call")
    for config in CONFIGS:
        measure(*config, nvml, peer)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
