"""Read torch tensors and cupy arrays natively; make outputs in the caller's framework.

Dispatch is on the object's type module, so torch is imported only when the caller
passes torch tensors and cupy only for cupy arrays. Other objects that speak DLPack
are imported into cupy (or torch when cupy is absent) and answered in that framework.
cupy has no bfloat16 of its own: bf16 data is held as uint16 (or ml_dtypes.bfloat16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys


@dataclasses.dataclass(frozen=True)
class Tensor:
    obj: object
    framework: str            # "torch" | "cupy"
    ptr: int
    shape: tuple
    strides: tuple            # in elements
    dtype: str                # "bf16", "fp16", "fp32", "int32", or the framework's own name
    device: int | None        # CUDA device index, None for host memory
    device_desc: str          # for error messages, e.g. "cuda:0" or "cpu"

    @property
    def ndim(self):
        return len(self.shape)

    def is_contiguous(self):
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _framework(x) -> str | None:
    module = type(x).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else None


def _describe_torch(x) -> Tensor:
    import torch
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "int32"}
    on_cuda = x.device.type == "cuda"
    return Tensor(x, "torch", x.data_ptr(), tuple(x.shape), tuple(x.stride()),
                  names.get(x.dtype, str(x.dtype).replace("torch.", "")),
                  x.device.index if on_cuda else None, str(x.device))


def _describe_cupy(x) -> Tensor:
    kind = x.dtype.name
    dtype = {"float16": "fp16", "float32": "fp32", "int32": "int32",
             "uint16": "bf16", "bfloat16": "bf16"}.get(kind, kind)
    item = x.dtype.itemsize
    return Tensor(x, "cupy", int(x.data.ptr), tuple(x.shape), tuple(s // item for s in x.strides),
                  dtype, x.device.id, f"cuda:{x.device.id}")


def describe(x, name: str) -> Tensor:
    """Describe an array argument; TypeError naming `name` when it is not an array."""
    kind = _framework(x)
    if kind is None and hasattr(x, "__dlpack__"):
        if "cupy" in sys.modules or importlib.util.find_spec("cupy") is not None:
            import cupy
            x, kind = cupy.from_dlpack(x), "cupy"
        else:
            import torch
            x, kind = torch.from_dlpack(x), "torch"
    if kind == "torch":
        return _describe_torch(x)
    if kind == "cupy":
        return _describe_cupy(x)
    raise TypeError(f"{name} must be a torch tensor, a cupy array or a DLPack-capable array, "
                    f"got {type(x).__module__}.{type(x).__name__}")


def empty(like: Tensor, shape, dtype: str):
    """An uninitialized array of `dtype` in `like`'s framework, on `like`'s device."""
    if like.framework == "torch":
        import torch
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "int32": torch.int32}[dtype]
        return torch.empty(shape, dtype=tdtype, device=like.obj.device)
    import cupy
    with cupy.cuda.Device(like.device):
        if dtype == "bf16":  # keep the caller's own bf16 representation
            return cupy.empty(shape, dtype=like.obj.dtype)
        return cupy.empty(shape, dtype={"fp16": cupy.float16, "fp32": cupy.float32, "int32": cupy.int32}[dtype])


def current_stream(like: Tensor) -> int:
    """The framework's current stream on `like`'s device, as a raw handle."""
    if like.framework == "torch":
        import torch
        return torch.cuda.current_stream(like.device).cuda_stream
    import cupy
    with cupy.cuda.Device(like.device):
        return cupy.cuda.get_current_stream().ptr
