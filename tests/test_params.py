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


def test_sched_record_size():
    assert f"kSchedRecordInts = {params.SCHED_RECORD_INTS};" in HEADER.read_text()
