"""Wire format for everything that crosses a sandbox boundary.

A message is a list of ZeroMQ frames: one msgpack header frame, then zero or
more raw frames holding array bytes. Arrays never go through msgpack itself
(that costs a copy and ~5x throughput, see FINDINGS): the header holds an
ExtType reference `(dtype, shape, frame index)` and the bytes travel as their
own frame, sent without copying. Arrays under INLINE_LIMIT ride inside the
header, since ZeroMQ copies small frames anyway.

Arrays of INLINE_LIMIT or more may instead travel through the boundary's
shared-memory ring (sandbox/shmring.py) when the receiver mapped one: the
sender copies them in and the header holds `(dtype, shape, ring offset)`;
the receiver checks the reference against the mapping's size and copies the
bytes out into its own memory before anything else sees them.

Decoding treats the peer as hostile: the caller passes `Caps`, the header is
size-checked before msgpack sees it, msgpack gets per-container length limits,
only two ext codes are understood and they only ever build numpy arrays of
plain dtypes. No pickle, anywhere.

Runs inside the sandbox and in the runner; imports only msgpack and numpy, and
numpy only once an array is encoded or decoded: the runner's control channel
never carries one, and importing numpy was a quarter of the runner's start-up
CPU (bench/RESULTS.md). Until numpy is imported no value can be a numpy
object, so the encoder asks `sys.modules` instead of importing it.
"""
from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import BoundaryTypeError, ProtocolError

if TYPE_CHECKING:
    import numpy as np

PROTOCOL_VERSION = 1

EXT_ARRAY_INLINE = 1  # payload: u32 meta length, msgpack [dtype, shape], raw bytes
EXT_ARRAY_FRAME = 2  # payload: msgpack [dtype, shape, frame index]
EXT_ARRAY_RING = 3  # payload: msgpack [dtype, shape, offset in the sender's shared-memory ring]
INLINE_LIMIT = 64 * 1024

# Array dtypes that may cross: booleans, numbers, fixed-width strings and
# dates. Object, void and structured dtypes could smuggle arbitrary objects.
ALLOWED_KINDS = frozenset("biufcSUmM")


@dataclass(frozen=True)
class Caps:
    """Upper bounds on what one received message may cost."""

    max_header: int = 16 << 20
    max_frame: int = 1 << 30
    max_frames: int = 4096
    max_total: int = 2 << 30
    max_items: int = 1 << 20  # per list / dict / str / bin inside the header
    max_containers: int = 1 << 24  # lists + maps in the whole header (~70 bytes of memory each)


DATA_CAPS = Caps()
# Control messages (progress, metrics, downloads, errors, results) are small;
# the runner receives them from hostile stages, so it caps them tightly.
CONTROL_CAPS = Caps(max_header=2 << 20, max_frame=2 << 20, max_frames=1, max_total=2 << 20, max_items=1 << 16,
                    max_containers=1 << 17)


def _numpy() -> Any:
    """numpy, imported on first use (see the module's docstring)."""
    import numpy

    return numpy


def _loaded_numpy() -> Any:
    """numpy if something imported it already, else None: then no value can be a numpy object."""
    return sys.modules.get("numpy")


# ------------------------------------------------------------------ encoding


def _describe(obj: Any) -> str:
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def find_unsupported(obj: Any, where: str = "sample") -> tuple[str, str] | None:
    """(type name, location) of the first value that cannot cross, or None."""
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(1 << 63) <= obj < (1 << 64):
        return ("int outside the 64-bit range", where)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray, memoryview)):
        return None
    np = _loaded_numpy()
    if np is not None and isinstance(obj, (np.ndarray, np.generic)):
        return None if obj.dtype.kind in ALLOWED_KINDS else (f"numpy array of dtype {obj.dtype}", where)
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            found = find_unsupported(item, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, (str, int, bytes)):
                return (f"dict key of type {_describe(key)}", where)
            found = find_unsupported(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    return (_describe(obj), where)


class ArrayStack:
    """N arrays of one dtype and shape that go as ONE array of shape (N, *shape) (sender side only).

    One reference per batch instead of one per array: for a batch of 27 images the per-array work
    (an ext reference, a ring copy call, a buffer lookup and a decode on the other side) was a third
    of the boundary's time (bench/RESULTS.md). With a ring the arrays are copied straight into it,
    next to each other; without one they are stacked into a new array first. The receiver gets an
    ordinary array and checks it as any other."""

    __slots__ = ("arrays",)

    def __init__(self, arrays: list) -> None:
        self.arrays = arrays


class _Encoder:
    def __init__(self, ring: Any = None) -> None:
        self.frames: list[Any] = []
        self.ring = ring  # a shmring.Writer, or None

    def default(self, obj: Any) -> Any:
        np = _loaded_numpy()
        if isinstance(obj, ArrayStack):
            first = obj.arrays[0]
            if first.dtype.kind not in ALLOWED_KINDS:
                raise BoundaryTypeError(f"numpy array of dtype {first.dtype}", "value")
            if self.ring is not None and first.nbytes * len(obj.arrays) >= INLINE_LIMIT:
                offset = self.ring.put_stack(obj.arrays)
                if offset is not None:
                    shape = [len(obj.arrays), *first.shape]
                    return msgpack.ExtType(EXT_ARRAY_RING, msgpack.packb([first.dtype.str, shape, offset]))
            return self.default(np.stack(obj.arrays))
        if np is not None and isinstance(obj, np.ndarray):
            if obj.dtype.kind not in ALLOWED_KINDS:
                raise BoundaryTypeError(f"numpy array of dtype {obj.dtype}", "value")
            arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
            dtype, shape = arr.dtype.str, list(arr.shape)
            if arr.nbytes < INLINE_LIMIT:
                meta = msgpack.packb([dtype, shape])
                return msgpack.ExtType(EXT_ARRAY_INLINE, struct.pack("<I", len(meta)) + meta + arr.tobytes())
            if self.ring is not None:
                offset = self.ring.put(arr)
                if offset is not None:
                    return msgpack.ExtType(EXT_ARRAY_RING, msgpack.packb([dtype, shape, offset]))
            self.frames.append(memoryview(arr.reshape(-1).view(np.uint8)))
            return msgpack.ExtType(EXT_ARRAY_FRAME, msgpack.packb([dtype, shape, len(self.frames)]))
        if np is not None and isinstance(obj, np.generic):
            return obj.item() if obj.dtype.kind in "biuf" else self.default(np.asarray(obj))
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise BoundaryTypeError(_describe(obj), "value")


def pack(obj: Any, ring: Any = None) -> list[Any]:
    """Frames for `obj`: header first, then the raw array frames it references.

    With `ring` (a shmring.Writer), arrays of INLINE_LIMIT or more go into the
    ring while it has room, the rest into frames as usual."""
    enc = _Encoder(ring)
    try:
        header = msgpack.packb(obj, default=enc.default, use_bin_type=True, strict_types=False)
    except BoundaryTypeError:
        found = find_unsupported(obj)
        if found:
            raise BoundaryTypeError(*found) from None
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        found = find_unsupported(obj)
        if found:
            raise BoundaryTypeError(*found) from None
        raise BoundaryTypeError(f"value msgpack cannot encode ({exc})", "sample") from None
    return [header, *enc.frames]


# ------------------------------------------------------------------ decoding


def _array(dtype: Any, shape: Any, raw: Any, caps: Caps) -> np.ndarray:
    dt, shape, nbytes = _array_meta(dtype, shape)
    if nbytes != len(raw):
        raise ProtocolError(f"array of {dtype} {shape} does not match its {len(raw)} bytes")
    return _numpy().frombuffer(raw, dtype=dt).reshape(shape)


def _array_meta(dtype: Any, shape: Any) -> tuple[np.dtype, list, int]:
    """(dtype, shape, byte size) of an array reference, or ProtocolError."""
    if not isinstance(dtype, str) or len(dtype) > 16:
        raise ProtocolError("array dtype is not a short string")
    np = _numpy()
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ProtocolError(f"unknown array dtype {dtype!r}") from None
    if dt.kind not in ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise ProtocolError(f"array dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > 32 or not all(type(d) is int and 0 <= d for d in shape):
        raise ProtocolError("array shape is not a list of non-negative ints")
    if dt.itemsize == 0:  # numpy never makes such arrays; np.zeros would allocate count bytes
        raise ProtocolError(f"array dtype {dtype!r} has no item size")
    return dt, shape, math.prod(shape) * dt.itemsize


_EXT_META = dict(max_array_len=64, max_map_len=0, max_str_len=64, max_bin_len=0)


class _Decoder:
    """The hooks msgpack calls while decoding one untrusted header: counting containers and
    building arrays from the three extension codes, every reference checked."""

    def __init__(self, bufs: list[memoryview], total: int, caps: Caps, ring: Any) -> None:
        self.bufs, self.total, self.caps, self.ring = bufs, total, caps, ring
        self.used: set[int] = set()
        self.containers = 0
        self.ring_total = 0

    def count(self, obj: Any) -> Any:  # a byte per empty list would cost ~70 bytes of memory
        self.containers += 1
        if self.containers > self.caps.max_containers:
            raise ProtocolError(f"header holds more than {self.caps.max_containers} lists and maps")
        return obj

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_ARRAY_INLINE:
            return self._inline(data)
        if code == EXT_ARRAY_FRAME:
            return self._frame(data)
        if code == EXT_ARRAY_RING:
            return self._ring(data)
        raise ProtocolError(f"unknown msgpack extension type {code}")

    def _inline(self, data: bytes) -> Any:
        if len(data) < 4:
            raise ProtocolError("truncated inline array")
        (n,) = struct.unpack_from("<I", data)
        if n > len(data) - 4:
            raise ProtocolError("truncated inline array")
        meta = msgpack.unpackb(data[4 : 4 + n], **_EXT_META)
        if not isinstance(meta, list) or len(meta) != 2:
            raise ProtocolError("bad inline array header")
        return _array(meta[0], meta[1], data[4 + n :], self.caps)

    def _frame(self, data: bytes) -> Any:
        meta = msgpack.unpackb(data, **_EXT_META)
        if not isinstance(meta, list) or len(meta) != 3 or type(meta[2]) is not int:
            raise ProtocolError("bad array frame reference")
        index = meta[2]
        if not 1 <= index < len(self.bufs) or index in self.used:
            raise ProtocolError(f"array frame reference {index} is out of range or reused")
        self.used.add(index)
        if self.bufs[index].nbytes > self.caps.max_frame:
            raise ProtocolError(f"array frame of {self.bufs[index].nbytes} bytes (cap {self.caps.max_frame})")
        return _array(meta[0], meta[1], self.bufs[index], self.caps)

    def _ring(self, data: bytes) -> Any:
        meta = msgpack.unpackb(data, **_EXT_META)
        if not isinstance(meta, list) or len(meta) != 3 or type(meta[2]) is not int:
            raise ProtocolError("bad array ring reference")
        ring = self.ring
        if ring is None:
            raise ProtocolError("array ring reference, but no ring is mapped")
        dt, shape, nbytes = _array_meta(meta[0], meta[1])
        offset = meta[2]
        if not (0 <= offset and offset + nbytes <= ring.size):
            raise ProtocolError(f"array ring reference [{offset}, +{nbytes}) is outside the {ring.size}-byte ring")
        if nbytes > self.caps.max_frame:
            raise ProtocolError(f"array of {nbytes} bytes in the ring (cap {self.caps.max_frame})")
        self.ring_total += nbytes
        if self.total + self.ring_total > self.caps.max_total:
            raise ProtocolError(f"message of {self.total + self.ring_total} bytes with its ring arrays "
                                f"(cap {self.caps.max_total})")
        return ring.copy_out(offset, nbytes).view(dt).reshape(shape)


def _check_frames(frames: list[Any], caps: Caps) -> tuple[list[memoryview], int]:
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > caps.max_frames:
        raise ProtocolError(f"message has {len(frames)} frames (cap {caps.max_frames})")
    bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > caps.max_total:
        raise ProtocolError(f"message of {total} bytes (cap {caps.max_total})")
    if bufs[0].nbytes > caps.max_header:
        raise ProtocolError(f"header of {bufs[0].nbytes} bytes (cap {caps.max_header})")
    return bufs, total


def unpack(frames: list[Any], caps: Caps = DATA_CAPS, ring: Any = None) -> Any:
    """Decode frames received from an untrusted peer, or raise ProtocolError.

    `ring` (a shmring.Reader) is the sender's shared-memory ring this side
    mapped; without it a ring reference is a ProtocolError."""
    bufs, total = _check_frames(frames, caps)
    decoder = _Decoder(bufs, total, caps, ring)
    # Every list or map takes at least one byte of the header, so a header no longer than the cap
    # cannot hold more than the cap: then the count (a Python call per container, a third of the
    # decoding time of a batch of small samples) proves nothing and is skipped.
    hooks = ({"list_hook": decoder.count, "object_hook": decoder.count}
             if bufs[0].nbytes > caps.max_containers else {})
    try:
        obj = msgpack.unpackb(
            bufs[0],
            ext_hook=decoder.ext_hook,
            **hooks,
            raw=False,
            strict_map_key=False,
            use_list=True,
            timestamp=1,  # msgpack's own ext -1 decodes to a plain float, never a Timestamp object
            max_str_len=min(caps.max_header, 1 << 30),
            max_bin_len=min(caps.max_header, 1 << 30),
            max_array_len=caps.max_items,
            max_map_len=caps.max_items,
            max_ext_len=min(caps.max_header, 1 << 30),
        )
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("header nests too deeply") from None
    except Exception as exc:  # msgpack raises a zoo of types on garbage input
        if isinstance(exc, TypeError) and "unhashable" in str(exc):
            # msgpack packs a tuple key as an array, which cannot be a key again: say what it was.
            raise ProtocolError("a dict key that is a list, tuple or dict: only str, int and bytes keys "
                                "cross a boundary") from None
        raise ProtocolError(f"undecodable header ({type(exc).__name__}: {exc})") from None
    if len(decoder.used) != len(bufs) - 1:
        raise ProtocolError("message carries frames its header does not reference")
    return obj


def check_message(msg: Any, fields: dict[str, type | tuple[type, ...]], optional: dict | None = None) -> dict:
    """The message as a dict, or ProtocolError naming the field that is wrong."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not a map")
    for name, kind in fields.items():
        if name not in msg or not isinstance(msg[name], kind):
            raise ProtocolError(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    for name, kind in (optional or {}).items():
        if msg.get(name) is not None and not isinstance(msg[name], kind):
            raise ProtocolError(f"field {name!r} is not {getattr(kind, '__name__', kind)}")
    return msg
