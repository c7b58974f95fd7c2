"""The wire format (sandbox/protocol.py): round trips, refusals at the sender,
and decoding of hostile input, which may only ever raise ProtocolError."""
from __future__ import annotations

import datetime
import struct
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipcook_sandbox.sandbox.protocol import (
    CONTROL_CAPS,
    DATA_CAPS,
    EXT_ARRAY_FRAME,
    EXT_ARRAY_INLINE,
    INLINE_LIMIT,
    BoundaryTypeError,
    Caps,
    ProtocolError,
    check_message,
    pack,
    unpack,
)


# ------------------------------------------------------------------ helpers


def assert_same(sent, got, where="value"):
    """Deep equality that also checks types, dtypes and shapes (NaN-safe)."""
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got)}"
        assert got.dtype == sent.dtype, f"{where}: dtype {got.dtype} != {sent.dtype}"
        assert got.shape == sent.shape, f"{where}: shape {got.shape} != {sent.shape}"
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(sent).tobytes(), where
        return
    if isinstance(sent, (list, tuple)):
        assert type(got) is list, f"{where}: {type(got)}"
        assert len(got) == len(sent), where
        for i, (a, b) in enumerate(zip(sent, got)):
            assert_same(a, b, f"{where}[{i}]")
        return
    if isinstance(sent, dict):
        assert type(got) is dict and list(got) == list(sent), where
        for k in sent:
            assert_same(sent[k], got[k], f"{where}[{k!r}]")
        return
    if isinstance(sent, float) and sent != sent:
        assert type(got) is float and got != got, where
        return
    assert type(got) is type(sent), f"{where}: {type(got)} != {type(sent)}"
    assert got == sent, where


def roundtrip(obj, caps=DATA_CAPS):
    return unpack(pack(obj), caps)


def ext(code, payload):
    return msgpack.packb(msgpack.ExtType(code, payload))


def inline_ext(dtype, shape, raw):
    meta = msgpack.packb([dtype, shape])
    return ext(EXT_ARRAY_INLINE, struct.pack("<I", len(meta)) + meta + raw)


def frame_ref(dtype, shape, index):
    return ext(EXT_ARRAY_FRAME, msgpack.packb([dtype, shape, index]))


# ------------------------------------------------------------------ round trips

SCALARS = [
    None, True, False, 0, 1, -1, 127, 128, -33, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 2**64 - 1,
    0.0, -0.0, 1.5, -1e300, 5e-324, float("inf"), float("-inf"), float("nan"),
    "", "hello", "ünïcødé ✓ 漢字", "x" * 100_000, b"", b"\x00\xff" * 10, b"y" * 200_000,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: repr(v)[:30])
def test_scalars_round_trip(value):
    assert_same(value, roundtrip(value))


def test_nested_containers_round_trip():
    sample = {
        "data": [1, [2, [3, [4, {"deep": [None, True, 1.25, "s", b"b"]}]]], {}, []],
        "label": {"a": {"b": {"c": [0, -1, 2**40]}}},
        "name": "x.jpg",
        3: "int key",
        b"k": "bytes key",
    }
    assert_same(sample, roundtrip(sample))


def test_tuples_bytearrays_and_memoryviews_cross_as_lists_and_bytes():
    got = roundtrip({"t": (1, (2, 3)), "ba": bytearray(b"ab"), "mv": memoryview(b"cd")})
    assert got == {"t": [1, [2, 3]], "ba": b"ab", "mv": b"cd"}


DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128, ">i4", ">f8", "<u2",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 5)], ids=str)
def test_numeric_arrays_round_trip(dtype, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype) if shape else np.array(7, dtype=dtype)
    got = roundtrip({"data": arr})["data"]
    assert_same(arr, got)


@pytest.mark.parametrize(
    "arr",
    [
        np.array(["a", "bcd", ""], dtype="U3"),
        np.array([["héllo", "wörld"]], dtype="U5"),
        np.array([b"ab", b"\x00c"], dtype="S2"),
        np.array(["2020-01-01", "1970-01-01T00:00:01", "NaT"], dtype="datetime64[s]"),
        np.array([1, -5, 0], dtype="timedelta64[ms]"),
        np.array("0-d string", dtype="U10"),
        np.array(True),
        np.array([], dtype=np.float32).reshape(0, 3),
        np.array([1.0, np.nan, -np.inf], dtype=np.float64),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_string_date_and_odd_arrays_round_trip(arr):
    assert_same(arr, roundtrip([arr])[0])


def test_non_contiguous_arrays_round_trip():
    base = np.arange(4 * 6 * 5, dtype=np.int32).reshape(4, 6, 5)
    views = [base[::2, 1::3], base.T, base[:, :, 0], base[..., ::-1], np.asfortranarray(base)]
    big = np.arange(300 * 400, dtype=np.float64).reshape(300, 400)
    views += [big.T, big[::3, ::2]]  # over the inline limit too
    for v in views:
        assert not v.flags.c_contiguous or v is views[-1]
        assert_same(v, roundtrip(v))


def test_small_arrays_ride_inline_and_big_ones_in_their_own_zero_copy_frames():
    small = np.zeros(INLINE_LIMIT - 1, dtype=np.uint8)
    big = np.arange(INLINE_LIMIT // 8 + 1, dtype=np.int64)  # just over 64 KiB
    assert len(pack(small)) == 1
    frames = pack({"a": big, "b": [small, big * 2]})
    assert len(frames) == 3
    assert np.shares_memory(np.asarray(frames[1]), big)  # sent without copying
    got = unpack(frames)
    assert_same(big, got["a"])
    assert_same(small, got["b"][0])
    assert_same(big * 2, got["b"][1])


def test_many_big_arrays_in_one_message():
    arrays = [np.full((200, 100), i, dtype=np.float32) for i in range(20)]
    frames = pack({"samples": [{"data": a, "label": i} for i, a in enumerate(arrays)]})
    assert len(frames) == 21
    got = unpack(frames)
    for i, a in enumerate(arrays):
        assert_same(a, got["samples"][i]["data"])
        assert got["samples"][i]["label"] == i


def test_decoding_from_memoryviews_and_bytearrays():
    arr = np.arange(50_000, dtype=np.int16)
    frames = [memoryview(bytes(f)) for f in pack({"x": arr})]
    assert_same(arr, unpack(frames)["x"])
    assert_same(arr, unpack([bytearray(f) for f in frames])["x"])


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.int8(-3), -3), (np.uint64(2**64 - 1), 2**64 - 1), (np.int64(-(2**63)), -(2**63)),
        (np.float16(1.5), 1.5), (np.float32(0.25), 0.25), (np.float64(2.5), 2.5),
        (np.bool_(True), True), (np.str_("s"), "s"), (np.bytes_(b"b"), b"b"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_numpy_scalars_cross_as_python_values(value, expected):
    assert_same(expected, roundtrip({"v": value})["v"])


@pytest.mark.parametrize(
    "value",
    [np.complex64(1 - 2j), np.complex128(3 + 4j), np.datetime64("2021-03-04T05:06"), np.timedelta64(9, "s")],
    ids=lambda v: type(v).__name__,
)
def test_numpy_scalars_without_a_msgpack_type_cross_as_0d_arrays(value):
    got = roundtrip({"v": [value]})["v"][0]
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == value.dtype
    assert got[()] == value


# ------------------------------------------------------------------ refused at the sender


class Custom:
    pass


class FakePILImage:  # what a PIL image looks like to the encoder: an arbitrary object
    mode, size = "RGB", (2, 2)

    def tobytes(self):
        return b"\x00" * 12


def test_refusals_name_the_location_and_type():
    cases = [
        (np.array([object(), 1], dtype=object), "numpy array of dtype object"),
        (np.zeros(3, dtype="i4,f8"), "numpy array of dtype"),
        (np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), "numpy array of dtype"),
        (np.zeros(2, dtype="V4"), "numpy array of dtype |V4"),
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (Custom(), "Custom"),
        (FakePILImage(), "FakePILImage"),
        (lambda x: x, "function"),
        (len, "builtin_function_or_method"),
        (datetime.date(2020, 1, 1), "datetime.date"),
        (2**64, "int outside the 64-bit range"),
        (-(2**63) - 1, "int outside the 64-bit range"),
    ]
    for bad, type_name in cases:
        with pytest.raises(BoundaryTypeError) as info:
            pack({"data": [0, "ok", bad], "label": 1})
        assert info.value.where == "sample['data'][2]", (bad, info.value.where)
        assert type_name in info.value.type_name, (bad, info.value.type_name)
        assert "sample['data'][2]" in str(info.value)
        assert isinstance(info.value, TypeError)


def test_real_pil_image_is_refused():
    Image = pytest.importorskip("PIL.Image")
    with pytest.raises(BoundaryTypeError) as info:
        pack({"data": Image.new("RGB", (4, 4)), "label": 0})
    assert info.value.where == "sample['data']"
    assert "PIL" in info.value.type_name


def test_refusal_deep_inside_a_batch_and_of_a_bad_dict_key():
    with pytest.raises(BoundaryTypeError) as info:
        pack({"samples": [{"data": 1}, {"data": {"x": [1, {"y": {3}}]}}]})
    assert info.value.where == "sample['samples'][1]['data']['x'][1]['y']"
    with pytest.raises(BoundaryTypeError) as info:
        pack({"a": [{"ok": 1}, {Custom(): 2}]})
    assert "dict key" in info.value.type_name and info.value.where == "sample['a'][1]"


def test_structured_numpy_scalar_is_refused():
    rec = np.zeros(1, dtype="i4,f8")[0]
    with pytest.raises(BoundaryTypeError) as info:
        pack({"data": [rec]})
    assert info.value.where == "sample['data'][0]"


# ------------------------------------------------------------------ hostile decoding


def refused(frames, caps=DATA_CAPS, match=None):
    with pytest.raises(ProtocolError, match=match):
        unpack(frames, caps)


def test_empty_message_and_empty_header():
    refused([], match="empty")
    refused([b""])


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xc1\xc1\xc1", b"\xff" * 3 + b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff",
                                     b"\xc4\x10abc", b"\x81\xa1a"])
def test_garbage_and_truncated_headers(garbage):
    refused([garbage])


def test_truncated_real_messages():
    header = pack({"op": "batch", "samples": [{"data": np.arange(10), "label": "x" * 50}]})[0]
    for cut in range(1, len(header)):
        refused([header[:cut]])


def test_trailing_bytes_after_the_header():
    refused([msgpack.packb({"a": 1}) + b"\x00"])


def test_unknown_ext_code():
    refused([ext(7, b"anything")], match="unknown msgpack extension")
    refused([ext(100, b"")])
    refused([msgpack.packb([1, msgpack.ExtType(3, b"\x00" * 4)])])


def test_msgpack_timestamp_ext_decodes_to_a_plain_float_never_an_object():
    # ext -1 is msgpack's own timestamp: only types samples may hold come out
    for header in (b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + b"\x00" * 8, b"\xc7\x0c\xff" + b"\x00" * 12):
        got = unpack([b"\x91" + header])[0]  # [timestamp]
        assert type(got) is float
    refused([b"\xd4\xff\x00"])  # a timestamp of the wrong length


def test_frame_references_missing_reused_and_bad():
    raw = np.arange(4, dtype="<i4").tobytes()
    refused([frame_ref("<i4", [4], 1)], match="out of range")
    refused([frame_ref("<i4", [4], 0), raw], match="out of range")
    refused([frame_ref("<i4", [4], 2), raw], match="out of range")
    refused([frame_ref("<i4", [4], -1), raw])
    twice = msgpack.packb([msgpack.ExtType(EXT_ARRAY_FRAME, msgpack.packb(["<i4", [4], 1]))] * 2)
    refused([twice, raw, raw], match="reused")
    refused([ext(EXT_ARRAY_FRAME, msgpack.packb(["<i4", [4]])), raw], match="bad array frame")
    refused([ext(EXT_ARRAY_FRAME, msgpack.packb(["<i4", [4], "1"])), raw], match="bad array frame")
    refused([ext(EXT_ARRAY_FRAME, b"\xc1"), raw])
    # the good one works
    assert unpack([frame_ref("<i4", [4], 1), raw]).tolist() == [0, 1, 2, 3]


def test_unreferenced_frames():
    refused([msgpack.packb(1), b"extra"], match="does not reference")
    refused(pack(np.zeros(100_000, dtype=np.uint8)) + [b"x"], match="does not reference")


@pytest.mark.parametrize(
    "dtype",
    ["O", "|O", "V8", "|V8", "i4,f8", "(2,)i4", "[('a','<i4')]", "<U999999999999999", "x" * 17, "not a dtype",
     "|S0", "<U0"],
)
def test_forbidden_and_bogus_dtypes(dtype):
    refused([inline_ext(dtype, [1], b"\x00" * 8)])
    refused([frame_ref(dtype, [1], 1), b"\x00" * 8])


@pytest.mark.parametrize("dtype", [1, None, ["<i4"], b"<i4"])
def test_dtype_that_is_not_a_string(dtype):
    refused([inline_ext(dtype, [1], b"\x00" * 4)])


def test_zero_itemsize_dtype_cannot_allocate_a_huge_array():
    refused([inline_ext("|S0", [30000, 30000], b"")])
    refused([inline_ext("<U0", [2**40], b"")])


@pytest.mark.parametrize(
    "shape, raw",
    [
        ([3], b"\x00" * 11), ([3], b"\x00" * 13), ([2, 2], b"\x00" * 12), ([], b"\x00" * 8), ([0], b"\x00" * 4),
        ([-1], b"\x00" * 4), ([-1, -4], b"\x00" * 16), ([2**62, 2**62], b""), ([0, 2**63], b""),
        ([1.0], b"\x00" * 4), (["1"], b"\x00" * 4), ([True], b"\x00" * 4), (4, b"\x00" * 16), (None, b""),
        ([1] * 33, b"\x00" * 4),
    ],
    ids=str,
)
def test_shape_that_does_not_match_or_is_not_a_shape(shape, raw):
    refused([inline_ext("<i4", shape, raw)])
    refused([frame_ref("<i4", shape, 1), raw or b"\x00"])


def test_inline_array_truncated_or_with_bad_meta():
    refused([ext(EXT_ARRAY_INLINE, b"\x01\x00")], match="truncated")
    refused([ext(EXT_ARRAY_INLINE, struct.pack("<I", 999) + b"\x92")], match="truncated")
    refused([ext(EXT_ARRAY_INLINE, struct.pack("<I", 1) + b"\xc1")])
    meta = msgpack.packb(["<i4", [1], "extra"])
    refused([ext(EXT_ARRAY_INLINE, struct.pack("<I", len(meta)) + meta + b"\x00" * 4)], match="bad inline")
    meta = msgpack.packb({"dtype": "<i4"})
    refused([ext(EXT_ARRAY_INLINE, struct.pack("<I", len(meta)) + meta + b"\x00" * 4)])


def test_too_many_frames_and_sizes_over_the_caps():
    arr = np.zeros(INLINE_LIMIT * 2, dtype=np.uint8)
    frames = pack([arr] * 5)
    assert len(frames) == 6
    refused(frames, Caps(max_frames=5), match="frames")
    refused(frames, Caps(max_total=INLINE_LIMIT * 10), match="bytes")
    refused(frames, Caps(max_frame=INLINE_LIMIT), match="array frame")
    assert len(unpack(frames, Caps(max_frames=6))) == 5
    refused([b"\x00"] * 4097, match="frames")
    header = msgpack.packb("x" * 5000)
    refused([header], Caps(max_header=4096), match="header")
    refused([msgpack.packb(b"z" * ((2 << 20) + 1))], CONTROL_CAPS, match="cap")
    refused(pack({"a": np.zeros(100_000)}), CONTROL_CAPS, match="frames")


def test_deeply_nested_arrays_and_maps():
    refused([b"\x91" * 100_000 + b"\x90"], match="undecodable|nests")
    refused([b"\x81\xa1k" * 50_000 + b"\xc0"])


def test_huge_declared_container_lengths_are_refused_before_allocating():
    refused([b"\xdd\xff\xff\xff\xff"])  # array32 of 4G items, no body
    refused([b"\xdf\xff\xff\xff\xff"])
    refused([b"\xdb\xff\xff\xff\xff"])  # str32
    refused([b"\xc6\xff\xff\xff\xff"])  # bin32


def test_one_million_element_array_against_max_items():
    header = b"\xdd" + struct.pack(">I", 1_000_000) + b"\x00" * 1_000_000
    refused([header], Caps(max_items=1000))
    refused([header], CONTROL_CAPS)
    assert len(unpack([header], DATA_CAPS)) == 1_000_000  # within the data cap (1 << 20)
    over = b"\xdd" + struct.pack(">I", (1 << 20) + 1) + b"\x00" * ((1 << 20) + 1)
    refused([over], DATA_CAPS)


def wide_bomb(budget):
    """`budget` bytes of msgpack holding ~1 empty list per byte, each list within max_items."""
    inner_len = 65535
    inner = b"\xdd" + struct.pack(">I", inner_len) + b"\x90" * inner_len
    n = budget // len(inner)
    return b"\xdc" + struct.pack(">H", n) + inner * n


def test_msgpack_bomb_of_nested_empty_lists_is_refused_quickly_under_control_caps():
    bomb = wide_bomb(CONTROL_CAPS.max_header)
    assert 2_000_000 < len(bomb) <= CONTROL_CAPS.max_header
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="lists and maps"):
            unpack([bomb], CONTROL_CAPS)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # decoded in full this is ~2M lists: ~140 MiB and over a second
    assert peak < 40 << 20, f"decoding the bomb peaked at {peak >> 20} MiB"
    assert elapsed < 2.0


def test_empty_map_bomb_is_refused_too():
    inner = b"\xdd" + struct.pack(">I", 65535) + b"\x80" * 65535
    refused([b"\xdc\x00\x1e" + inner * 30], CONTROL_CAPS, match="lists and maps")
    as_values = b"\xdf" + struct.pack(">I", 65535) + b"".join(b"\xcd" + struct.pack(">H", i) + b"\x80" for i in range(65535))
    refused([b"\xdc\x00\x07" + as_values * 7], CONTROL_CAPS, match="lists and maps")


def test_legit_message_with_many_containers_still_decodes_under_data_caps():
    batch = {"samples": [{"data": {"x": [i, [i]]}, "label": i} for i in range(50_000)]}
    got = roundtrip(batch)
    assert got["samples"][49_999] == {"data": {"x": [49_999, [49_999]]}, "label": 49_999}


def test_unhashable_map_keys_are_a_protocol_error():
    refused([b"\x81\x91\x01\x02"], match="dict key that is a list")  # {[1]: 2}
    refused(pack({"data": {(1, 2): 3}}), match="dict key that is a list, tuple or dict")  # a tuple key, as sent
    refused([b"\x81" + inline_ext("<i4", [1], b"\x00" * 4) + b"\x02"])


def test_decoded_arrays_are_plain_numpy_arrays_never_objects():
    got = unpack([inline_ext("<f8", [2], np.array([1.0, 2.0]).tobytes())])
    assert type(got) is np.ndarray and got.dtype == np.float64 and got.tolist() == [1.0, 2.0]


# ------------------------------------------------------------------ fuzzing


SMALL_CAPS = Caps(max_header=4096, max_frame=4096, max_frames=4, max_total=8192, max_items=64, max_containers=256)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_only_protocol_errors(frames, caps):
    try:
        unpack(frames, caps)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5), st.sampled_from([DATA_CAPS, CONTROL_CAPS, SMALL_CAPS]))
def test_fuzz_random_frames(frames, caps):
    decode_only_protocol_errors(frames, caps)


VALID = [
    pack({"op": "batch", "split": "train", "gen": 1, "samples": [{"data": np.arange(6, dtype="<i2").reshape(2, 3), "label": 1}]}),
    pack({"data": [np.array(["ab", "c"]), np.zeros(0), {"k": b"v"}], "x": 1.5}),
    pack([np.arange(INLINE_LIMIT // 4 + 10, dtype=np.float32)]),
    [inline_ext("<M8[s]", [2], np.array([1, 2], dtype="<M8[s]").tobytes())],
    [frame_ref("<u2", [3], 1), b"\x01\x00\x02\x00\x03\x00"],
]


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 3),
)
def test_fuzz_mutated_valid_messages(frames, edits, mode):
    frames = [bytearray(bytes(f)) for f in frames]
    header = frames[0]
    for pos, byte in edits:
        if not header:
            break
        i = pos % len(header)
        if mode == 0:
            header[i] = byte
        elif mode == 1:
            del header[i:]
        elif mode == 2:
            header.insert(i, byte)
        else:
            frames[-1][pos % max(1, len(frames[-1])):] = b""
    decode_only_protocol_errors([bytes(f) for f in frames], DATA_CAPS)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
        lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=5),
        max_leaves=20,
    )
)
def test_fuzz_round_trip_of_plain_values(value):
    assert_same(value, roundtrip(value))


@FUZZ
@given(st.sampled_from(["<i4", "|u1", "<f8", "|b1", "<c8", "<U3", "|S2", "<M8[D]", ">f4"]),
       st.lists(st.integers(0, 4), max_size=4))
def test_fuzz_array_round_trip(dtype, shape):
    arr = np.zeros(shape, dtype=dtype)
    if arr.size:
        arr.reshape(-1).view(np.uint8)[:] = np.arange(arr.nbytes, dtype=np.uint64).astype(np.uint8) % 7
    assert_same(arr, roundtrip({"a": arr})["a"])


# ------------------------------------------------------------------ check_message


def test_check_message():
    assert check_message({"op": "x", "n": 1}, {"op": str, "n": int}) == {"op": "x", "n": 1}
    with pytest.raises(ProtocolError, match="map"):
        check_message([1], {"op": str})
    with pytest.raises(ProtocolError, match="'n'"):
        check_message({"op": "x", "n": "1"}, {"op": str, "n": int})
    with pytest.raises(ProtocolError, match="'n'"):
        check_message({"op": "x"}, {"op": str, "n": int})
    assert check_message({"op": "x", "seed": None}, {"op": str}, {"seed": int})
    with pytest.raises(ProtocolError, match="'seed'"):
        check_message({"op": "x", "seed": 1.5}, {"op": str}, {"seed": int})


def test_container_cap_holds_on_either_side_of_the_header_length_shortcut():
    # unpack counts lists and maps only when the header is longer than the cap (each takes a byte)
    caps = Caps(max_containers=1000)
    under = msgpack.packb([*([] for _ in range(990)), b"x" * 100])  # 991 containers in ~1100 bytes: counted, allowed
    assert len(under) > caps.max_containers and len(unpack([under], caps)) == 991
    over = msgpack.packb([[] for _ in range(1000)])  # 1001 containers
    with pytest.raises(ProtocolError, match="lists and maps"):
        unpack([over], caps)
    short = msgpack.packb([[] for _ in range(900)])  # shorter than the cap: cannot hold more, not counted
    assert len(short) <= 1003 and len(unpack([short], caps)) == 900
