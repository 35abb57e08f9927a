"""The pass registry: built-ins, third-party passes from the ``optcc.passes`` entry point
group (a real distribution on sys.path), programmatic registration, and levels."""

from __future__ import annotations

import sys
import textwrap

import onnx
import pytest

import optcc
from optcc.infra import pipelines, registry
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs, random_feeds


@pytest.fixture
def fresh_registry():
    registry._registry = None
    yield
    registry._registry = None


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """Install a tiny plugin distribution (dist-info with entry points) on sys.path."""
    (tmp_path / "demo_plugin.py").write_text(textwrap.dedent('''
        import optcc

        class NegateTwicePass(optcc.Pass):
            """Remove pairs of Neg nodes (a demo plugin pass)."""

            name = "negate-twice"
            level = None

            def call(self, model):
                removed = 0
                for graph in optcc.ir.graphs(model):
                    for node in list(graph):
                        inner = node.inputs[0].producer() if node.op_type == "Neg" and node.inputs else None
                        if inner is not None and inner.op_type == "Neg" and len(node.inputs[0].uses()) == 1 \\
                                and not node.outputs[0].is_graph_output():
                            node.outputs[0].replace_all_uses_with(inner.inputs[0])
                            graph.remove([inner, node], safe=True)
                            removed += 1
                return optcc.PassResult(model, bool(removed), {"pairs": removed})
    '''))
    dist = tmp_path / "demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[optcc.passes]\nnegate-twice = demo_plugin:NegateTwicePass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("demo_plugin", None)


def test_builtins_are_registered_with_levels(fresh_registry):
    passes = optcc.available_passes()
    assert passes["eliminate-identities"].level == 1
    assert passes["normalize"].origin == "builtin"
    for level in range(4):
        for name in pipelines.pipeline_names(level):
            assert name in passes, f"-O{level} uses unregistered pass {name}"
            assert passes[name].level is not None and passes[name].level <= level


def test_entry_point_plugin_is_discovered_and_runs(fresh_registry, plugin_on_path):
    info = optcc.available_passes()["negate-twice"]
    assert info.origin == "demo-plugin"
    assert info.description.startswith("Remove pairs of Neg")
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N] x) => (float[N] y) { a = Neg(x) b = Neg(a) y = Relu(b) }
    """)
    result = optcc.optimize(model, passes=["negate-twice"])
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]
    assert result.report.passes[0].stats == {"pairs": 1}
    feeds = random_feeds(model)
    assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs(model, feeds), EXACT_RTOL,
                 what="plugin result vs onnx reference evaluator")


def test_register_refuses_a_taken_name(fresh_registry):
    class Duplicate(optcc.Pass):
        """Dup."""

        name = "normalize"

        def call(self, model):
            return optcc.PassResult(model, False)

    with pytest.raises(ValueError, match="already registered"):
        optcc.register(Duplicate)


def test_unknown_level_is_a_bad_input():
    with pytest.raises(optcc.BadInputError, match="unknown optimization level 9"):
        pipelines.build_pipeline(9)
