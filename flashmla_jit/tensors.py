"""Read torch tensors and cupy arrays natively; make outputs in the caller's framework.

Dispatch is on the object's type module, so torch is imported only when the caller
passes torch tensors and cupy only for cupy arrays. Other objects that speak DLPack
are imported into cupy (or torch when cupy is absent) and answered in that framework.
cupy has no bfloat16 of its own: bf16 data is held as uint16 (or ml_dtypes.bfloat16).
"""

from __future__ import annotations

import importlib.util
import sys


class Tensor:
    """What the API needs to know of an array argument (a plain slotted class: this
    is built for every argument of every call, so it must be cheap)."""

    __slots__ = ("obj", "framework", "ptr", "shape", "strides", "dtype", "device")

    def __init__(self, obj, framework, ptr, shape, strides, dtype, device):
        self.obj = obj                  # the framework's array
        self.framework = framework      # "torch" | "cupy"
        self.ptr = ptr                  # device address
        self.shape = shape
        self.strides = strides          # in elements
        self.dtype = dtype              # "bf16", "fp16", "fp32", "int32", or the framework's own name
        self.device = device            # CUDA device index, None for host memory

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


_TORCH_DTYPES = None


def _describe_torch(x) -> Tensor:
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch
        _TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "int32"}
    dev = x.device
    dtype = _TORCH_DTYPES.get(x.dtype) or str(x.dtype).replace("torch.", "")
    return Tensor(x, "torch", x.data_ptr(), tuple(x.shape), x.stride(), dtype,
                  dev.index if dev.type == "cuda" else None)


def _describe_cupy(x) -> Tensor:
    kind = x.dtype.name
    dtype = {"float16": "fp16", "float32": "fp32", "int32": "int32",
             "uint16": "bf16", "bfloat16": "bf16"}.get(kind, kind)
    item = x.dtype.itemsize
    return Tensor(x, "cupy", int(x.data.ptr), tuple(x.shape), tuple(s // item for s in x.strides),
                  dtype, x.device.id)


_DLPACK_CUDA = 2  # kDLCUDA in dlpack.h


def describe(x, name: str) -> Tensor:
    """Describe an array argument; TypeError naming `name` when it is not an array."""
    kind = _framework(x)
    if kind is None and hasattr(x, "__dlpack__"):
        device_type = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else None
        if device_type not in (_DLPACK_CUDA, None):
            what = f"{type(x).__module__}.{type(x).__name__}"
            raise ValueError(f"{name} must be on a CUDA device, got a {what} on DLPack device type {int(device_type)}")
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
