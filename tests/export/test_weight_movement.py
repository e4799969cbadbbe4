"""Integer weights reach the op that reads them with no per-run work onnxruntime would
repeat: the exporter's gate reordering of an LSTM/GRU is folded into the integers, and an
embedding gathers its integer rows before dequantizing them, not the whole table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.export import export_onnx
from autoquant.export.movement import fold_weight_movement
from tests.helpers.synthetic import BatchCalibrator

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(x)
        h, _ = self.lstm(h)
        return self.head(h[:, -1])


class Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 16, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def test_an_embedding_gathers_integer_rows_and_equals_the_searched_lookup(tmp_path) -> None:
    from autoquant.export.ortmodule import OnnxModule

    torch.manual_seed(0)
    data = [torch.randint(0, 1000, (4, 7)) for _ in range(2)]
    qmodel = aq.quantize(Lookup().eval(), BatchCalibrator(data))
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    graph = onnx.load(str(path)).graph
    readers = {name: n.op_type for n in graph.node for name in n.input}
    assert readers["emb.weight_int"] == "Gather"
    assert "DequantizeLinear" not in [n.op_type for n in graph.node]
    ids = torch.randint(0, 1000, (3, 7))
    with torch.no_grad():
        assert torch.equal(OnnxModule(path)(ids), qmodel(ids))  # bit for bit


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def test_recurrent_weights_reach_their_op_from_one_dequantize_linear_each(tmp_path) -> None:
    torch.manual_seed(0)
    data = [torch.randn(4, 5, 6) for _ in range(3)]
    qmodel = aq.quantize(Recurrent().eval(), BatchCalibrator(data))
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))  # checks parity itself
    graph = onnx.load(str(path)).graph
    producer = _producers(graph)
    inits = {i.name for i in graph.initializer}
    recurrent = [n for n in graph.node if n.op_type in ("GRU", "LSTM")]
    assert len(recurrent) == 3
    for node in recurrent:
        for weight in node.input[1:3]:  # W and R
            source = producer[weight]
            if source.op_type == "Reshape":  # scales per direction and per row
                source = producer[source.input[0]]
            assert source.op_type == "DequantizeLinear" and set(source.input) <= inits
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert not any(n.op_type in ("Slice", "Concat") and set(n.input) & dequantized
                   for n in graph.node)


def _dq(name: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    tensors = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale,
               f"{name}_s"), numpy_helper.from_array(zp, f"{name}_z")]
    extra = {} if axis is None else {"axis": axis}
    return tensors, helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s",
                                                          f"{name}_z"], [name], **extra)


def _const(name: str, values: list[int]):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _graph(scales: str, reader: str, perm: list[int] | None = None) -> onnx.ModelProto:
    """Two int8 weights [6, 4] with `scales` ("per_row", "mixed": the second per tensor,
    "shared": one per-tensor scale); rows reordered by Slice/Concat, each given a direction
    axis, stacked to [2, 6, 4], optionally transposed by `perm`, and read by `reader`
    (Add: not fused; MatMul: fused, left alone)."""
    rng = np.random.default_rng(0)
    inits, nodes = [_const("a0", [0]), _const("a2", [2]), _const("a4", [4]),
                    _const("a6", [6]), _const("ax", [0])], []
    for k, name in enumerate(("w0", "w1")):
        q = rng.integers(-127, 128, (6, 4)).astype(np.int8)
        per_tensor = scales == "shared" or (scales == "mixed" and k == 1)
        scale = np.float32(0.02) if per_tensor else rng.uniform(0.01, 0.1, 6).astype(np.float32)
        zp = np.int8(0) if per_tensor else np.zeros(6, np.int8)
        tensors, node = _dq(name, q, np.asarray(scale), np.asarray(zp),
                            None if per_tensor else 0)
        inits += tensors
        nodes += [node,
                  helper.make_node("Slice", [name, "a2", "a4", "ax"], [f"{name}_b"]),
                  helper.make_node("Slice", [name, "a0", "a2", "ax"], [f"{name}_a"]),
                  helper.make_node("Slice", [name, "a4", "a6", "ax"], [f"{name}_c"]),
                  helper.make_node("Concat", [f"{name}_b", f"{name}_a", f"{name}_c"],
                                   [f"{name}_r"], axis=0),
                  helper.make_node("Unsqueeze", [f"{name}_r", "ax"], [f"{name}_u"])]
    nodes.append(helper.make_node("Concat", ["w0_u", "w1_u"], ["w"], axis=0))
    shape = [2, 6, 4]
    if perm is not None:
        nodes.append(helper.make_node("Transpose", ["w"], ["wt"], perm=perm))
        shape = [shape[i] for i in perm]
    read = "w" if perm is None else "wt"
    if reader == "MatMul":
        shape = [*shape[:-2], 3, shape[-2]]
    nodes.append(helper.make_node(reader, ["x", read], ["y"]))
    out = shape if reader == "Add" else [*shape[:-2], 3, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _input(model: onnx.ModelProto) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(1).standard_normal(dims).astype(np.float32)


@pytest.mark.parametrize(("scales", "reshaped"), [("per_row", True), ("mixed", True),
                                                  ("shared", False)])
def test_moved_integers_dequantize_to_the_same_weight_bit_for_bit(scales, reshaped) -> None:
    model = _graph(scales, "Add")
    x = _input(model)
    before = _run(model, x)
    assert fold_weight_movement(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Slice" not in ops and "Concat" not in ops and ops.count("DequantizeLinear") == 1
    # scales per direction and per row: one DequantizeLinear on the flat [12, 4] integers
    assert ("Reshape" in ops) is reshaped
    np.testing.assert_array_equal(_run(model, x), before)


def test_weights_a_fused_op_reads_are_left_as_exported() -> None:
    model = _graph("per_row", "MatMul")
    before = model.SerializeToString()
    assert fold_weight_movement(model) == 0
    assert model.SerializeToString() == before


def test_qparams_varying_along_axes_that_are_not_adjacent_are_left_as_exported() -> None:
    model = _graph("per_row", "Add", perm=[0, 2, 1])  # [2, 4, 6]: axes 0 and 2 vary
    x = _input(model)
    before = model.SerializeToString()
    expected = _run(model, x)
    assert fold_weight_movement(model) == 0
    assert model.SerializeToString() == before
    np.testing.assert_array_equal(_run(model, x), expected)


def test_a_transposed_weight_with_adjacent_varying_axes_is_folded() -> None:
    model = _graph("per_row", "Add", perm=[1, 0, 2])  # [6, 2, 4]: axes 0 and 1 vary
    x = _input(model)
    expected = _run(model, x)
    assert fold_weight_movement(model) == 1
    np.testing.assert_array_equal(_run(model, x), expected)
