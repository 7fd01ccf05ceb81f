"""The ctypes mirrors in flashmla_jit/params.py match the structs in kernels/flashmla/params.cuh."""

import ctypes
import pathlib
import re

import pytest

from flashmla_jit import params

HEADER = pathlib.Path(__file__).parent.parent / "kernels" / "flashmla" / "params.cuh"
CTYPE = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "double": ctypes.c_double}


def header_fields(struct):
    body = re.search(r"struct %s \{(.*?)\n\};" % struct, HEADER.read_text(), re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.match(r"(const )?(\w+)(\*?)\s+(.*);", line)
        kind = "ptr" if m.group(3) else m.group(2)
        fields += [(name.strip(), kind) for name in m.group(4).split(",")]
    return fields


@pytest.mark.parametrize("struct", ["DecodeParams", "CombineParams", "MetadataParams"])
def test_struct_mirrors_header(struct):
    fields = header_fields(struct)
    mirror = getattr(params, struct)._fields_
    assert [n for n, _ in mirror] == [n for n, _ in fields]
    assert [t for _, t in mirror] == [CTYPE[k] for _, k in fields]
    assert ctypes.sizeof(getattr(params, struct)) == 8 * len(fields)  # no padding anywhere


def test_seesaw_struct_mirrors_header():
    """The tensor maps, then DecodeParams, in the header's order (tests/test_kernels.py
    checks the size against the device struct)."""
    fields = header_fields("SeesawParams")
    assert [n for n, _ in params.SeesawParams._fields_ if n != "_pad"] == [n for n, _ in fields]
    assert [k for _, k in fields] == ["TensorMap"] * 4 + ["DecodeParams"]


def test_sched_record_size():
    assert f"kSchedRecordInts = {params.SCHED_RECORD_INTS};" in HEADER.read_text()


@pytest.mark.parametrize("struct_type, names, base", [
    (params.DecodeParams, params.DECODE_POINTERS, 0),
    (params.SeesawParams, params.DECODE_POINTERS, params.SeesawParams.p.offset),
    (params.CombineParams, params.COMBINE_POINTERS, 0),
    (params.DecodeParams, ("k_scale",), 0)])
def test_pointer_packer_writes_the_named_fields(struct_type, names, base):
    target = struct_type
    if struct_type is params.SeesawParams:
        target = params.DecodeParams
    packer = params.PointerPacker(target, names, base)
    obj = struct_type()
    values = [0x1000 * (i + 1) + 16 for i in range(len(names))]
    packer(obj, *values)
    fields = obj.p if struct_type is params.SeesawParams else obj
    assert [getattr(fields, name) for name in names] == values
    untouched = [n for n, _ in target._fields_ if n not in names]
    assert all(not getattr(fields, n) for n in untouched)  # nothing else written


def test_pointer_packer_rejects_gaps():
    with pytest.raises(TypeError, match="consecutive"):
        params.PointerPacker(params.DecodeParams, ("q", "k_scale"))
