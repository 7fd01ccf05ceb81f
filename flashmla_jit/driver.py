"""Load compiled kernels onto a device and launch them, through cuda.bindings.driver.

One table maps (spec, device) to a launchable CUfunction: the hot path is a dict
lookup, the first use per process goes through the disk cache (cache.load_or_compile).
Kernels launch in the device's primary context (the one torch and cupy use), on the
caller's stream handle; every driver call's status is checked.
"""

from __future__ import annotations

import ctypes
import functools

from cuda.bindings import driver as cu

from . import cache


class CudaError(RuntimeError):
    pass


def check(result):
    """Unwrap a cuda.bindings return tuple, raising CudaError with the driver's words."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else name
        text = text.decode() if isinstance(text, bytes) else text
        raise CudaError(f"{name}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.cache
def _init():
    check(cu.cuInit(0))


@functools.cache
def primary_context(device: int):
    _init()
    return check(cu.cuDevicePrimaryCtxRetain(check(cu.cuDeviceGet(device))))


@functools.cache
def device_attribute(device: int, attr) -> int:
    _init()
    return check(cu.cuDeviceGetAttribute(attr, check(cu.cuDeviceGet(device))))


def compute_capability(device: int) -> tuple[int, int]:
    A = cu.CUdevice_attribute
    return (device_attribute(device, A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            device_attribute(device, A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))


def sm_count(device: int) -> int:
    return device_attribute(device, cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)


@functools.cache
def _context_and_handle(device: int):
    ctx = primary_context(device)
    return ctx, int(ctx)


class _OnDevice:
    """Make the device's primary context current for a block, if it is not already
    (torch and cupy keep the current device's primary context current already)."""

    __slots__ = ("ctx", "handle", "pushed")

    def __init__(self, device: int):
        self.ctx, self.handle = _context_and_handle(device)

    def __enter__(self):
        self.pushed = int(check(cu.cuCtxGetCurrent())) != self.handle
        if self.pushed:
            check(cu.cuCtxPushCurrent(self.ctx))

    def __exit__(self, *exc):
        if self.pushed:
            check(cu.cuCtxPopCurrent())


@functools.cache
def _library(spec):
    artifact = cache.load_or_compile(spec)
    _init()
    library = check(cu.cuLibraryLoadData(artifact.cubin, [], [], 0, [], [], 0))
    return library, artifact.lowered_name


# Keyed by the spec object itself, looked up on every launch (hashing a spec's fields
# costs a microsecond); an entry holds its spec, so the id is never reused while listed.
# Equal specs that are distinct objects share the library (_library) and only repeat
# the cheap kernel lookup.
_functions: dict = {}


def function(spec, device: int):
    """The CUfunction of `spec` in `device`'s primary context (loaded once)."""
    entry = _functions.get((id(spec), device))
    if entry is None:
        library, name = _library(spec)
        kernel = check(cu.cuLibraryGetKernel(library, name.encode()))
        if spec.smem_bytes > 48 * 1024:
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(cu.cuKernelSetAttribute(attr, spec.smem_bytes, kernel, check(cu.cuDeviceGet(device))))
        with _OnDevice(device):
            fn = check(cu.cuKernelGetFunction(kernel))
        entry = _functions[(id(spec), device)] = (spec, fn)
    return entry[1]


def tile_map(address: int, dims, strides, box) -> bytes:
    """The 128 bytes of a CUtensorMap over a 4-D 16-bit tensor, dims and box innermost
    first, strides (of dims 1-3) in elements: 128-byte swizzled like the kernels' shared
    tiles (box[0] = 64 columns), boxes reaching outside the tensor filled with zeros. L2
    promotion 256 bytes: ~1 % faster memory-bound than 128 (docs/PERF.md v28); its lookups
    of lines it already fetched show in ncu as L2 hits."""
    _init()
    u64, u32 = cu.cuuint64_t, cu.cuuint32_t
    tensor_map = check(cu.cuTensorMapEncodeTiled(
        cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, address,
        [u64(n) for n in dims], [u64(2 * n) for n in strides], [u32(n) for n in box], [u32(1)] * 4,
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
    return ctypes.string_at(int(tensor_map.getPtr()), 128)


def kv_tensor_map(address: int, cols: int, heads: int, page_size: int, num_pages: int,
                  head_stride: int, row_stride: int, page_stride: int) -> bytes:
    """A paged cache seen as (cols, heads, rows in a page, pages), in 64 x 64 boxes (64
    columns of 64 rows of one head and page); page ids outside [0, num_pages) load zeros."""
    return tile_map(address, (cols, heads, page_size, num_pages), (head_stride, row_stride, page_stride),
                    (64, 1, 64, 1))


@functools.cache
def tensor_map_address_offset():
    """Where an encoded CUtensorMap keeps its global address, if as a plain little-endian
    u64: two encodings that differ only in the address differ only in those 8 bytes, and
    hold it there. None otherwise. A map encoded once then takes a call's address (q's)
    by a patch of those bytes, as cuTensorMapReplaceAddress would, without a driver call;
    with None the caller encodes each call's map anew."""
    dims, strides, box = (64, 64, 2, 2), (64, 64 * 64, 2 * 64 * 64), (64, 64, 1, 1)
    addresses = (0x10000, 0x7F12_3456_7890)
    maps = [tile_map(a, dims, strides, box) for a in addresses]
    diff = [i for i in range(128) if maps[0][i] != maps[1][i]]
    if not diff or diff[-1] - diff[0] >= 8:
        return None
    offset = diff[0] // 8 * 8
    if any(int.from_bytes(m[offset:offset + 8], "little") != a for m, a in zip(maps, addresses)):
        return None
    return offset


_streams: dict = {}


def _stream(handle: int):
    """cuda-python's CUstream for a raw handle, built once per handle."""
    stream = _streams.get(handle)
    if stream is None:
        if len(_streams) > 256:  # streams come and go in long-lived processes
            _streams.clear()
        stream = _streams[handle] = cu.CUstream(handle)
    return stream


@functools.cache
def _pdl_attrs():
    """Launch attributes that let a kernel start before the previous one in its stream
    has finished (programmatic dependent launch): it must griddepcontrol.wait before it
    reads what that kernel wrote. CUDA graphs keep the edge as a programmatic one."""
    attr = cu.CUlaunchAttribute()
    attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    return [attr]


def _launch(spec, device: int, grid, params: ctypes.Structure, stream: int, pdl: bool = False):
    fn = function(spec, device)
    args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    if not pdl:
        check(cu.cuLaunchKernel(fn, *grid, spec.threads, 1, 1, spec.smem_bytes, _stream(stream),
                                ctypes.addressof(args), 0))
        return
    check(cu.cuLaunchKernelEx(_pdl_config(spec, grid, stream), fn, ctypes.addressof(args), 0))


_configs: dict = {}


def _pdl_config(spec, grid, stream: int):
    """A PDL launch's CUlaunchConfig, built once per (spec, grid, stream): filling one
    field by field costs more than the launch. cuLaunchKernelEx reads it at the call."""
    key = (id(spec), grid, stream)
    entry = _configs.get(key)
    if entry is None:
        if len(_configs) > 256:  # streams and batch sizes come and go in long-lived processes
            _configs.clear()
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = spec.threads, 1, 1
        config.sharedMemBytes = spec.smem_bytes
        config.hStream = _stream(stream)
        config.attrs = _pdl_attrs()
        config.numAttrs = 1
        entry = _configs[key] = (spec, config)  # holding the spec keeps its id unique
    return entry[1]


def launch(spec, device: int, grid, params: ctypes.Structure, stream: int, pdl: bool = False):
    """Launch `spec` with one by-value struct argument on the stream handle `stream`."""
    with _OnDevice(device):
        _launch(spec, device, grid, params, stream, pdl)


def launch_all(device: int, launches):
    """Launch (spec, grid, params, stream, pdl) tuples in order, with one context check."""
    with _OnDevice(device):
        for spec, grid, params, stream, pdl in launches:
            _launch(spec, device, grid, params, stream, pdl)
