"""The one binding layer: C constants come from the compiled headers, distinct things have
distinct codes, and cffi structs are built in infeng/kernels/ only."""
import ast
from pathlib import Path

import numpy as np
import pytest

import infeng
from infeng.kernels import abi
from infeng.kernels.build import cdef_text
from infeng.kernels.structs import LoraBatch, Structs, Weight

PKG = Path(infeng.__file__).parent


def test_dtype_codes_are_the_headers_enum(kern):
    # every name the header declares, read back through the library itself
    for name, code in abi.DTYPE.items():
        assert getattr(kern.lib, "IFG_" + name.upper()) == code
    assert len(set(abi.DTYPE.values())) == len(abi.DTYPE)
    assert {"f32", "bf16", "q8_0x16", "q4_kx16", "fp8", "q5_0"} <= set(abi.DTYPE)


def test_lora_int8_code_is_no_weight_dtype(kern):
    """a_dtype/b_dtype of struct ifg_lora take both enum ifg_dtype codes and IFG_LORA_I8."""
    assert abi.LORA_I8 == kern.lib.IFG_LORA_I8
    assert abi.LORA_I8 not in abi.DTYPE.values()
    assert (abi.LORA_RG, abi.LORA_VB) == (kern.lib.IFG_LORA_RG, kern.lib.IFG_LORA_VB)


def test_ops_follow_the_enum(kern):
    assert len(abi.OPS) == kern.lib.IFG_OP_COUNT
    assert all(kern.ffi.string(kern.lib.ifg_op_name(i)).decode() == op for i, op in enumerate(abi.OPS))


def test_unknown_dtype_is_named():
    with pytest.raises(infeng.errors.InfengError, match="q9_9"):
        abi.dtype_code("q9_9")


def test_structs_set_fields_by_name(kern):
    S = Structs(kern)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    layer = S.new("struct ifg_layer", attn_norm=np.ones(4, np.float32), ffn_norm=None,
                  wq=Weight("f32", w, 3, 4))
    assert layer.attn_norm[3] == 1.0 and layer.ffn_norm == kern.ffi.NULL
    assert (layer.wq.dtype, layer.wq.rows, layer.wq.cols) == (abi.DTYPE["f32"], 3, 4)
    assert kern.ffi.cast("float *", layer.wq.data)[5] == 5.0
    with pytest.raises(KeyError):
        S.new("struct ifg_layer", no_such_field=1)


def test_lora_batch_segments(kern):
    lb = LoraBatch(kern, max_tokens=8, max_seg=3, widest_input=64, dim=16)
    lb.reserve(8)
    assert lb.max_rank == 16 and lb.h.shape[0] == kern.lib.ifg_lora_h_rows(8, 64)
    s = lb.set([None, None], [0, 5], 7)
    assert s.n_seg == 2 and list(lb.seg_start[:3]) == [0, 5, 7] and s.seg[1] == kern.ffi.NULL
    lb.reserve(4)                                   # never shrinks
    assert lb.max_rank == 16


def _calls(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node.func.attr, getattr(node.func.value, "attr", getattr(node.func.value, "id", ""))


def test_no_struct_built_outside_the_binding_layer():
    """ffi.new appears in infeng/kernels/ only (runtime, model and bench use its helpers)."""
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "kernels" not in p.parts
                 and any(f == "new" and v == "ffi" for f, v in _calls(p))]
    assert offenders == []


def test_no_retyped_dtype_table():
    """No module spells out the C dtype codes again (a {"f32": 0, "bf16": 1, ...} literal)."""
    offenders = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Dict) and len(node.keys) >= 3:
                pairs = {(k.value, v.value) for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
                if len(pairs & {(n, c) for n, c in abi.DTYPE.items()}) >= 3:
                    offenders.append(str(p.relative_to(PKG)))
    assert offenders == []


def test_cdef_keeps_the_enums():
    text = cdef_text()
    for enum in ("enum ifg_dtype", "enum ifg_lora_dtype", "enum ifg_lora_layout", "enum ifg_op"):
        assert enum in text


def test_kv_cache_struct_reads_the_pool_shape(kern):
    k = np.zeros((2, 5, 4, 3), np.float32)
    table = np.zeros((3, 7), np.int32)
    c = Structs(kern).kv_cache(k, k.copy(), table, n_blocks=5, block_size=4)
    assert (c.n_blocks, c.block_size, c.max_blocks) == (5, 4, 7)
