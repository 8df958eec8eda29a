"""Guest structs are packed by member name from the one ABI definition: a wrong or missing name is refused."""

from __future__ import annotations

import struct

import pytest

from daemon.guest import abi
from daemon.guest.layout import Struct, nested, u32, u64


def test_pack_puts_each_member_at_its_offset() -> None:
    raw = abi.klp_func.pack(new_func=0x1111, below=0x2222, transition=1, nop=0, calls=(7, 8))
    assert len(raw) == abi.klp_func.size
    for member, value in (("new_func", 0x1111), ("below", 0x2222), ("transition", 1), ("nop", 0)):
        assert struct.unpack_from("<Q", raw, abi.klp_func.offsetof(member))[0] == value
    calls = struct.unpack_from(f"<{abi.MAX_CPUS}Q", raw, abi.klp_func.offsetof("calls"))
    assert calls == (7, 8) + (0,) * (abi.MAX_CPUS - 2), "an array given short is zero-filled"


def test_pack_refuses_a_wrong_member_name() -> None:
    with pytest.raises(KeyError, match="has no member nop_func"):
        abi.klp_func.pack(new_func=1, below=0, transition=1, nop_func=0, nop=0, calls=())


def test_pack_refuses_a_missing_member() -> None:
    with pytest.raises(ValueError, match="no value for calls"):
        abi.klp_func.pack(new_func=1, below=0, transition=1, nop=0)
    with pytest.raises(ValueError, match="no value for hits"):
        abi.ftrace_profile.pack(hash=1)


def test_pack_refuses_values_of_the_wrong_shape() -> None:
    with pytest.raises(TypeError):
        abi.ftrace_hash.pack(size_bits=(1, 2), count=0, buckets=0)
    with pytest.raises(TypeError):
        abi.klp_ops.pack(func_stack=0, old_func=0, orig_calls=tuple(range(abi.MAX_CPUS + 1)))
    with pytest.raises(struct.error):
        abi.ftrace_hash.pack(size_bits=1 << 64, count=0, buckets=0)


def test_padding_and_nested_members() -> None:
    inner = Struct("inner", [u32("a")])
    outer = Struct("outer", [u32("x"), u64("y"), nested("n", inner), u32("z")])
    raw = outer.pack(x=1, y=2, n=inner.pack(a=3), z=4)
    assert raw == struct.pack("<I4xQII", 1, 2, 3, 4)
    with pytest.raises(TypeError):
        outer.pack(x=1, y=2, n=b"\0", z=4)


def test_codec_reads_what_pack_wrote() -> None:
    codec, at = abi.trace_entry.codec()
    assert codec.size == abi.trace_entry.size
    raw = abi.trace_entry.pack(ip=1, parent_ip=2, ts=3, pid_cpu=4 << 8 | 1, type=abi.TRACE_GRAPH_RET, depth=5,
                               duration=6)
    values = codec.unpack(raw)
    assert {m: values[at[m]] for m in at} == {"ip": 1, "parent_ip": 2, "ts": 3, "pid_cpu": 4 << 8 | 1,
                                              "type": abi.TRACE_GRAPH_RET, "depth": 5, "duration": 6}
    codec, at = abi.klp_ops.codec()
    values = codec.unpack(abi.klp_ops.pack(func_stack=9, old_func=10, orig_calls=(11,)))
    assert (values[at["func_stack"]], values[at["old_func"]], values[at["orig_calls"]]) == (9, 10, 11)
