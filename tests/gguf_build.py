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


def rewrite(src, dst, mutate, version: int = 3) -> None:
    """Re-assemble the GGUF ``src`` into ``dst`` after ``mutate(meta, tensors)``: meta maps key →
    (value type, value) (arrays: (ARR, list)), tensors is a list of (name, dims, ggml type, bytes)."""
    from infeng.converters.gguf_file import GGUFFile
    f = GGUFFile(src)
    meta = {k: (f.types[k], v) for k, v in f.metadata.items() if k != "general.alignment"}
    tensors = [(t.name, list(t.dims), t.type_id, bytes(f.raw(t.name))) for t in f.tensors.values()]
    mutate(meta, tensors)
    kvs = []
    for k, (t, v) in meta.items():
        if t == ARR:
            kvs.append(kv(k, ARR, ({str: STR, float: F32, int: I32}[type(v[0])], v)))
        else:
            kvs.append(kv(k, t, v))
    infos, data = [], b""
    for name, dims, t, raw in tensors:
        infos.append(tensor_info(name, dims, t, len(data)))
        data += raw + b"\0" * (-len(raw) % 32)
    with open(dst, "wb") as out:
        out.write(gguf(kvs, infos, data, version=version))
