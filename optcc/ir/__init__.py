"""Thin helpers over onnx-ir: safe loading, atomic saving and the one walker every pass uses.

Nothing here is a second IR. A model is an ``onnx_ir.Model`` from load to save; these
functions add optcc's rules on top: untrusted files are validated before use
(``load``), external data may not point outside the model's folder, output files appear
atomically (``save``), and every pass walks graphs, nodes and names the same way
(``walk``, ``edit``; ``interface`` fills untyped graph inputs and outputs at load).
"""

from __future__ import annotations

from optcc.ir.arrays import decoded, filled_view, fresh, repeated_values, share_decoded
from optcc.ir.collector import clone, collect_for, collector_paused
from optcc.ir.dequantized import dequantized_array, drop_dequantization, stored_bits, stored_levels
from optcc.ir.data_movement import reshaped, squeezed, unsqueezed
from optcc.ir.external_files import mapped, stored_bytes
from optcc.ir.edit import ModelNames, constant_before, constant_for, as_numpy, const_array, const_tensor, initializers_are_constant, is_constant, overridable_inputs, inferred_dtypes, unique_prefix, unique_value_name, value_names
from optcc.ir.layout_maps import LAYOUT_FREE_BINARY, LAYOUT_FREE_UNARY, AxisMap, broadcasts, carried_back, carried_pads, compose, full_pads, same_operand, squeeze_map
from optcc.ir.legacy import upgrade_legacy_ir
from optcc.ir.interface import FILLED_INTERFACE_KEY, interface_float_type, without_weights
from optcc.ir.loading import MapTypedError, ModelSource, load, load_keeping_parse
from optcc.ir.packed_attributes import PackedAttr, holds_packed
from optcc.ir.opset import convert_opset, upgrade_problem
from optcc.ir.saving import EXTERNAL_DATA_THRESHOLD_BYTES, PROTOBUF_LIMIT_BYTES, RAW_DTYPES, STREAM_MIN_BYTES, check_output_path, create_temp_file, initializers_set_aside, needs_external_data, read_weight_files, replacing, save, save_proto, serialize, serialize_dims_only
from optcc.ir.walk import ancestors, default_opset, element_type, external_data_files, first_order_problem, graphs, histogram_and_weight_bytes, holds_op_type, nodes, op_histogram, proto_graphs, subgraphs, tensor_protos, uses_external_data, weight_bytes

__all__ = [
    "mapped",
    "stored_bytes",
    "ancestors",
    "AxisMap",
    "LAYOUT_FREE_BINARY",
    "broadcasts",
    "LAYOUT_FREE_UNARY",
    "carried_back",
    "carried_pads",
    "compose",
    "full_pads",
    "same_operand",
    "squeeze_map",
    "decoded",
    "filled_view",
    "fresh",
    "repeated_values",
    "share_decoded",
    "element_type",
    "clone",
    "collect_for",
    "collector_paused",
    "convert_opset",
    "upgrade_problem",
    "without_weights",
    "interface_float_type",
    "ModelSource",
    "load",
    "load_keeping_parse",
    "MapTypedError",
    "save",
    "PackedAttr",
    "holds_packed",
    "save_proto",
    "replacing",
    "graphs",
    "nodes",
    "op_histogram",
    "histogram_and_weight_bytes",
    "holds_op_type",
    "weight_bytes",
    "default_opset",
    "uses_external_data",
    "external_data_files",
    "unique_prefix",
    "unique_value_name",
    "ModelNames",
    "constant_before",
    "constant_for",
    "value_names",
    "const_tensor",
    "const_array",
    "dequantized_array",
    "stored_bits",
    "stored_levels",
    "drop_dequantization",
    "is_constant",
    "initializers_are_constant",
    "overridable_inputs",
    "proto_graphs",
    "initializers_set_aside",
    "serialize_dims_only",
    "serialize",
    "inferred_dtypes",
    "upgrade_legacy_ir",
    "tensor_protos",
    "create_temp_file",
    "FILLED_INTERFACE_KEY",
    "as_numpy",
    "subgraphs",
    "needs_external_data",
    "check_output_path",
    "read_weight_files",
    "first_order_problem",
    "PROTOBUF_LIMIT_BYTES",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "STREAM_MIN_BYTES",
    "RAW_DTYPES",
    "reshaped",
    "squeezed",
    "unsqueezed",
]
