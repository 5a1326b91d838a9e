"""A tiny GGUF byte builder for tests and fuzz seeds: lets a test write exactly the (possibly
corrupt) header it needs, independent of the writer under test."""
import struct

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, value) -> bytes:
    out = s(key) + struct.pack("<I", vtype)
    if vtype == STR:
        return out + s(value)
    if vtype == ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype == STR:
            return out + b"".join(s(x) for x in items)
        return out + b"".join(struct.pack({U32: "<I", I32: "<i", F32: "<f"}[etype], x) for x in items)
    return out + struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[vtype], value)


def tensor_info(name: str, dims, ggml_type: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)


def gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3, n_tensors=None, n_kv=None,
         align: int = 32, magic: bytes = b"GGUF") -> bytes:
    """Header with the given (raw) metadata and tensor infos, padding, then ``data``. Counts
    default to the list lengths; pass them to lie."""
    nt = len(infos) if n_tensors is None else n_tensors
    nk = len(kvs) if n_kv is None else n_kv
    head = magic + struct.pack("<Iqq", version, nt, nk) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data
