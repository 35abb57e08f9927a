"""SimplifyReshapeTargetsPass: Reshape targets built from the input's own shape become
constants with 0 (copy); targets that copy another tensor's dims or a dim at another
position stay. Numerics: onnx's reference evaluator on several batch sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.simplify_reshape_targets import SimplifyReshapeTargetsPass


def _check(text: str, batches=(1, 3), batched_w: bool = False, **fixed) -> tuple[dict, onnx.ModelProto]:
    """Run the pass and compare the results on the reference evaluator for each batch
    size of ``x`` [batch, 8, 1, 1] (``batched_w``: and of a second input ``w`` [batch, 2])."""
    feeds_list = []
    for n in batches:
        rng = np.random.default_rng(n)
        feeds = {"x": rng.standard_normal((n, 8, 1, 1)).astype(np.float32), **fixed}
        if batched_w:
            feeds["w"] = rng.standard_normal((n, 2)).astype(np.float32)
        feeds_list.append(feeds)
    return _run_both(text, feeds_list)


def _run_both(text: str, feeds_list: list[dict]) -> tuple[dict, onnx.ModelProto]:
    """Run the pass on the model ``text``; both models valid and equal, shapes and values,
    on the reference evaluator for each of ``feeds_list``."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    result = SimplifyReshapeTargetsPass()(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    for feeds in feeds_list:
        for want, got in zip(ReferenceEvaluator(proto).run(None, feeds), ReferenceEvaluator(out).run(None, feeds)):
            assert want.shape == got.shape and np.array_equal(want, got)
    return dict(result.stats), out


def _targets(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The targets the pass wrote (``<node>_target``, maybe numbered), by the Reshape's output name: an
    initializer (how the pass writes one in the main graph), or a Constant node's tensor."""
    tensors = {t.name: t for t in model.graph.initializer if "_target" in t.name}
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    return {n.output[0]: [int(v) for v in onnx.numpy_helper.to_array(tensors[n.input[1]])]
            for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in tensors}


def _target(model: onnx.ModelProto) -> list[int] | None:
    return next(iter(_targets(model).values()), None)


def test_paddle_style_batch_flatten_gets_a_constant_target():
    """Regression (PP-OCR cls): Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat."""
    stats, out = _check("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x) => (float[N, 8] y) <int64[1] zero = {0}, int64[1] one = {1}, int64[1] c = {8}> {
        s = Shape(x)
        s32 = Cast<to = 6>(s)
        b32 = Slice(s32, zero, one, zero, one)
        b = Cast<to = 7>(b32)
        t = Concat<axis = -1>(b, c)
        y = Reshape(x, t)
    }""")
    assert stats == {"shape-copy": 1} and _target(out) == [0, 8]


_GATHERED_BATCH = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x) => (float[N, 8, 1] y) <int64 i0 = {0}, int64[1] a = {0}, int64[2] c = {8, -1}> {
        s = Shape(x)
        d = Gather(s, i0)
        u = Unsqueeze(d, a)
        t = Concat<axis = 0>(u, c)
        y = Reshape(x, t)
    }"""


def test_gather_unsqueeze_pieces_and_o1_removes_the_shape_subgraph():
    stats, out = _check(_GATHERED_BATCH)
    assert stats == {"shape-copy": 1} and _target(out) == [0, 8, -1]
    o1 = optcc.optimize(onnx.parser.parse_model(_GATHERED_BATCH), level=1, verify=False).model
    assert [n.op_type for n in o1.graph.node] == ["Reshape"]


@pytest.mark.parametrize("case", ["other-tensor", "other-position", "allowzero", "runtime-piece"])
def test_targets_that_must_stay(case):
    source = "w" if case == "other-tensor" else "x"
    index = "{1}" if case == "other-position" else "{0}"
    reshape = "Reshape<allowzero = 1>" if case == "allowzero" else "Reshape"
    piece = "Abs(b)" if case == "runtime-piece" else "Identity(b)"
    stats, _ = _check(f"""
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[N, 8, 1, 1] x, float[N, 8, 1, 1] w) => (float[M, K] y) <int64[1] i = {index}, int64[1] c = {{-1}}> {{
        s = Shape({source})
        b = Gather(s, i)
        p = {piece}
        t = Concat<axis = 0>(p, c)
        y = {reshape}(x, t)
    }}""".replace("p = Identity(b)", "p = Gather(s, i)"), batches=(2,),
        w=np.zeros((2, 8, 1, 1), np.float32))
    assert stats == {}


def test_target_assembled_in_int32_and_cast_back():
    """Regression for onnx/optimizer's test_fuse_concat_into_reshape3."""
    stats, out = _check("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x) => (float[N, 8, 1] y) <int32[2] c = {8, 1}, int64[1] i = {0}> {
        s = Shape(x)
        d = Gather<axis = 0>(s, i)
        d32 = Cast<to = 6>(d)
        t32 = Concat<axis = 0>(d32, c)
        t = Cast<to = 7>(t32)
        y = Reshape(x, t)
    }""")
    assert stats == {"shape-copy": 1} and _target(out) == [0, 8, 1]


def test_batch_read_from_another_tensor_among_positive_constants_becomes_minus_one():
    """Regression (magika's jax2tf export): the batch read from the graph input's shape
    sizes a Reshape of a later tensor, target assembled in int32 and cast back."""
    stats, out = _check("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x, float[N, 2] w) => (float[N, 4, 2] y) <int64[1] zero = {0}, int64[1] one = {1}, int32[2] c = {4, 2}> {
        s = Shape(w)
        s32 = Cast<to = 6>(s)
        b32 = Slice(s32, zero, one, zero)
        t32 = Concat<axis = 0>(b32, c)
        t = Cast<to = 7>(t32)
        y = Reshape(x, t)
    }""", batched_w=True)
    assert stats == {"inferred-dim": 1} and _target(out) == [-1, 4, 2]


@pytest.mark.parametrize("case", ["two-unknown", "zero-constant", "minus-one-constant"])
def test_inferred_dim_needs_one_unknown_among_positive_constants(case):
    constants = {"two-unknown": "{8}", "zero-constant": "{0}", "minus-one-constant": "{-1, 4}"}[case]
    pieces = "b, b, c" if case == "two-unknown" else "b, c"
    stats, _ = _check(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x, float[N, 2] w) => (float y) <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[{constants.count(',') + 1}] c = {constants}> {{
        s = Shape(w)
        b = Slice(s, zero, one, zero)
        t = Concat<axis = 0>({pieces})
        y = Reshape(x, t)
    }}""", batches=(1,) if case == "two-unknown" else (1, 3), batched_w=True)
    assert stats == {}


def test_inferred_dim_with_allowzero_and_a_batch_read_through_quantize_dequantize():
    """Regression (pipecat's smart-turn v3.2, a QDQ export with allowzero=1): the batch is
    Shape(DequantizeLinear(QuantizeLinear(w)), start=0, end=1), whose length needs the
    rank through Q/DQ; -1 is valid with allowzero=1 as no other entry is 0. x's own batch
    under allowzero=1 becomes -1 too, never 0: there 0 is a literal zero."""
    stats, out = _check("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 8, 1, 1] x, float[N, 2] w) => (float[N, 4, 2] y, float[N, 8] z) <float s = {0.1}, uint8 zp = {128}, int64[2] c = {4, 2}, int64[1] eight = {8}> {
        q = QuantizeLinear(w, s, zp)
        d = DequantizeLinear(q, s, zp)
        b = Shape<start = 0, end = 1>(d)
        t = Concat<axis = 0>(b, c)
        y = Reshape<allowzero = 1>(x, t)
        bx = Shape<start = 0, end = 1>(x)
        tz = Concat<axis = 0>(bx, eight)
        z = Reshape<allowzero = 1>(x, tz)
    }""", batched_w=True)
    assert stats == {"inferred-dim": 2} and _target(out) == [-1, 4, 2]
    assert _targets(out)["z"] == [-1, 8]



def test_a_dim_of_another_tensor_that_provably_equals_the_inputs_is_copied():
    """Regression (ddddocr's CRNN head): the rows of Gemm(Reshape(h, [0, 4])) are h's dim 0,
    which the target reads from Shape(h): [T, 1, -1] becomes [0, 1, -1]."""
    weights = ", ".join(str(v) for v in range(12))
    stats, out = _run_both(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[T, 1, 4] h) => (float[T, 1, 3] y)
      <int64[2] flat = {{0, 4}}, float[3, 4] w = {{{weights}}}, int64 i = {{0}}, int64[1] ax = {{0}}, int64[1] one = {{1}},
       int64[1] rest = {{-1}}> {{
        r = Reshape(h, flat)
        x = Gemm<transB = 1>(r, w)
        s = Shape(h)
        t0 = Gather(s, i)
        t0u = Unsqueeze(t0, ax)
        t = Concat<axis = 0>(t0u, one, rest)
        y = Reshape(x, t)
    }}""", [{"h": np.random.default_rng(n).standard_normal((n, 1, 4)).astype(np.float32)} for n in (1, 5)])
    assert stats == {"shape-copy": 1} and _target(out) == [0, 1, -1]


def test_a_dim_a_broadcast_may_change_is_not_copied():
    """a = x + z broadcasts: with x of one row and z of three, a has 3 rows while Shape(x)[0]
    is 1, so 0 (copy) would give another shape. The target stays."""
    stats, _ = _run_both("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4] x, float[M, 4] z) => (float[K, L] y) <int64[1] i = {0}, int64[1] rest = {-1}> {
        a = Add(x, z)
        s = Shape(x)
        b = Gather(s, i)
        t = Concat<axis = 0>(b, rest)
        y = Reshape(a, t)
    }""", [{"x": np.ones((1, 4), np.float32), "z": np.ones((3, 4), np.float32)},
           {"x": np.ones((3, 4), np.float32), "z": np.ones((3, 4), np.float32)}])
    assert stats == {}


def test_a_piece_of_several_dims_with_one_unknown_gives_minus_one_there():
    """Regression (smart-turn's attention heads): Shape(h)[0:2] is [batch, 2] with the 2
    static, so [batch, 2, 3, 5] becomes [-1, 2, 3, 5] (every other entry a positive
    constant). With both dims unknown the target stays."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, {heads}, 3, 5] h) => (float[N, 2, 3, 5] y) <int64[3] flat = {{-1, 3, 5}}, int64[1] zero = {{0}},
       int64[1] two = {{2}}, int64[2] rest = {{3, 5}}> {{
        x = Reshape(h, flat)
        s = Shape(h)
        b = Slice(s, zero, two)
        t = Concat<axis = 0>(b, rest)
        y = Reshape(x, t)
    }}"""
    feeds = [{"h": np.random.default_rng(n).standard_normal((n, 2, 3, 5)).astype(np.float32)} for n in (1, 4)]
    stats, out = _run_both(text.format(heads=2), feeds)
    assert stats == {"inferred-dim": 1}
    assert _targets(out)["y"] == [-1, 2, 3, 5]
    stats, _ = _run_both(text.format(heads="H"), feeds)
    assert stats == {}


_TENSORDOT = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8] x) => (float[N, 4, 3] y) <int64[2] flat = {-1, 8}, int64[2] free = {0, 1}, int32[1] k = {3},
                                               float[8, 3] w = {DATA}> {
        h = Relu(x)
        s = Shape(h)
        s32 = Cast<to = 6>(s)
        keep = Gather<axis = 0>(s32, free)
        t32 = Concat<axis = 0>(keep, k)
        t = Cast<to = 7>(t32)
        h2 = Reshape(h, flat)
        m = MatMul(h2, w)
        y = Reshape(m, t)
    }""".replace("DATA", ", ".join(str(v) for v in np.arange(24) % 5 - 2.0))


def test_tensordot_target_with_a_dim_only_shape_inference_knows_becomes_minus_one():
    """Regression (g2p-id's Keras BERT, tf2onnx's Tensordot): the target's [batch, 4] is read
    from the shape of an unannotated tensor, whose 4 only onnx shape inference finds; with
    it the batch is the one unknown entry among positive constants."""
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 4, 8)).astype(np.float32)} for n in (1, 3)]
    stats, out = _run_both(_TENSORDOT, feeds)
    assert stats == {"inferred-dim": 1} and _target(out) == [-1, 4, 3]
    o2 = optcc.optimize(onnx.parser.parse_model(_TENSORDOT), level=2, verify=False).model
    assert not {"Shape", "Cast", "Gather", "Concat"} & {n.op_type for n in o2.graph.node}
    for f in feeds:  # independent reference: numpy
        np.testing.assert_allclose(ReferenceEvaluator(o2).run(None, f)[0],
                                   np.maximum(f["x"], 0) @ (np.arange(24) % 5 - 2.0).reshape(8, 3), rtol=1e-5, atol=1e-5)


def test_a_target_that_is_a_shape_without_concat_is_copied():
    """Regression (terrain-consistency-unet's GroupNorm, PyTorch dynamo export): the target
    is Shape(x) itself, x [N, 4, 2, 3] grouped as Reshape(x, [0, 2, -1]) for
    InstanceNormalization and restored with Reshape(n, Shape(x)): [N, 4, 2, 3] becomes
    [0, 4, 2, 3], x's batch being n's."""
    stats, out = _run_both("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 4, 2, 3] x) => (float[N, 4, 2, 3] y)
      <int64[3] groups = {0, 2, -1}, float[2] scale = {1.5, 0.5}, float[2] bias = {0.25, -1}> {
        r = Reshape(x, groups)
        n = InstanceNormalization(r, scale, bias)
        s = Shape(x)
        y = Reshape(n, s)
    }""", [{"x": np.random.default_rng(n).standard_normal((n, 4, 2, 3)).astype(np.float32)} for n in (1, 3)])
    assert stats == {"shape-copy": 1} and _target(out) == [0, 4, 2, 3]


def test_a_target_that_is_a_shape_slice_of_another_tensor_stays_when_no_dim_is_copied():
    """Reshape(x, Shape(w)) with w's batch unrelated to x's: nothing provably copied and
    more than one unknown entry, so the target stays."""
    stats, _ = _run_both("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 6] x, float[M, K] w) => (float[P, Q] y) {
        s = Shape(w)
        y = Reshape(x, s)
    }""", [{"x": np.ones((2, 6), np.float32), "w": np.ones((3, 4), np.float32)}])
    assert stats == {}


def test_a_main_graph_target_is_an_initializer():
    """From IR version 4 on, the target is written as lift-constants would store a
    Constant node's tensor: an initializer named after the Reshape, no node."""
    stats, out = _check(_GATHERED_BATCH)
    assert stats == {"shape-copy": 1} and _target(out) == [0, 8, -1]
    assert "Constant" not in [n.op_type for n in out.graph.node]
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert reshape.input[1] == "Reshape_target" and [t.name for t in out.graph.initializer][-1] == "Reshape_target"


def test_a_legacy_target_is_a_constant_node():
    """Below IR version 4 every initializer is also a graph input, so the target is a
    Constant node (the graph's inputs stay as they are)."""
    stats, out = _check("""
    <ir_version: 3, opset_import: ["" : 9]>
    g (float[N, 8, 1, 1] x) => (float[N, 8] y) {
        i0 = Constant<value = int64 {0}>()
        c = Constant<value = int64[1] {8}>()
        s = Shape(x)
        d = Gather(s, i0)
        u = Unsqueeze<axes = [0]>(d)
        t = Concat<axis = 0>(u, c)
        y = Reshape(x, t)
    }""")
    assert stats == {"shape-copy": 1} and _target(out) == [0, 8]
    assert [v.name for v in out.graph.input] == ["x"] and not out.graph.initializer


def test_o2_lifts_nothing_after_the_target_is_written():
    """-O2 on a batch flatten: the target the pass writes needs no lift, so every run of
    lift-constants leaves the model unchanged and no exact pass runs a second time after
    one; the result equals onnxruntime on the original."""
    proto = onnx.parser.parse_model(_GATHERED_BATCH)
    result = optcc.optimize(proto, level=2, verify=False)
    names = [r.name for r in result.report.passes]
    assert {r.status for r in result.report.passes if r.name == "lift-constants"} == {"unchanged"}
    tidy = names.index("lift-constants", 1)  # the lift after the exact fixpoint
    assert "fold-constants" in names[:tidy] and "fold-constants" not in names[tidy:]
    x = np.random.default_rng(0).standard_normal((3, 8, 1, 1)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [o.op_type for o in result.model.graph.node] == ["Reshape"]
    np.testing.assert_array_equal(got[0], want[0])


def test_many_targets_scan_the_graph_for_names_once(monkeypatch):
    """Twenty batch flattens in a chain, each target read from its input's shape: every
    target becomes a constant named uniquely (a name a target already takes gets a suffix),
    the graph's names collected once for all of them, not once per target; the results
    equal the original's on the reference evaluator."""
    import optcc.ir.edit as edit

    count = 20
    body = "\n".join(
        f"s{i} = Shape(x{i})\n b{i} = Gather<axis = 0>(s{i}, zero)\n t{i} = Concat<axis = 0>(b{i}, c)\n"
        f" r{i} = Reshape(x{i}, t{i})\n x{i + 1} = Reshape(r{i}, four)" for i in range(count))
    # a value already named as the first target's constant would be: the new one takes another
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x) => (float[N, 8, 1, 1] y) <int64[1] zero = {{0}}, int64[1] c = {{8}},
        int64[4] four = {{0, 8, 1, 1}}> {{
        x0 = Identity(x)
        {body}
        y = Identity(x{count})
        Reshape_target = Identity(x{count})
    }}"""
    scans = []
    names = edit.value_names
    monkeypatch.setattr(edit, "value_names", lambda scope: scans.append(1) or names(scope))
    monkeypatch.setattr(optcc.ir, "value_names", edit.value_names)
    stats, out = _check(text)
    assert stats == {"shape-copy": count}
    assert len(scans) == 1
    targets = [t.name for t in out.graph.initializer if t.name.endswith("_target") or "_target_" in t.name]
    assert len(targets) == count == len(set(targets)) and "Reshape_target" not in targets


def test_a_body_target_takes_a_name_no_enclosing_graph_holds():
    """Unnamed Reshapes in the main graph and in both branches of an If: each target gets
    a name no graph of the model holds (a branch's ``Reshape_target`` would shadow the main
    graph's and fail the checker); the result equals onnxruntime on the original."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 1, 1] x, bool b) => (float[N, 8, 1] y, float[N, 8, 1] z)
        <int64 i0 = {0}, int64[1] a = {0}, int64[2] c = {8, -1}> {
        s = Shape(x)
        d = Gather(s, i0)
        u = Unsqueeze(d, a)
        t = Concat<axis = 0>(u, c)
        y = Reshape(x, t)
        z = If(b) <
          then_branch = g1 () => (float[N, 8, 1] o1) {
            s1 = Shape(x)
            d1 = Gather(s1, i0)
            u1 = Unsqueeze(d1, a)
            t1 = Concat<axis = 0>(u1, c)
            o1 = Reshape(x, t1)
          },
          else_branch = g2 () => (float[N, 8, 1] o2) { o2 = Reshape(x, t) }
        >
    }""")
    result = SimplifyReshapeTargetsPass()(ir.from_proto(proto))
    assert result.stats == {"shape-copy": 3}
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 8, 1, 1)).astype(np.float32)
    for b in (True, False):
        feeds = {"x": x, "b": np.array(b)}
        want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
