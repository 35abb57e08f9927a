"""Large list attributes of ``ai.onnx.ml`` nodes held as their serialized bytes.

A tree ensemble stores its trees in INTS, FLOATS and STRINGS attributes of millions of
elements; onnx-ir would hold each element as a Python object (about 40 bytes apiece, ten
times the element's size in the file). ``packed_for_load`` takes such attributes out of a
parsed model before onnx-ir reads it and gives each node a ``PackedAttr`` in its place: the
AttributeProto bytes onnx-ir would write for it, read back into a tuple only when a caller
asks for the value (and not kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnx_ir as ir

ML_DOMAIN = "ai.onnx.ml"
# an attribute with at least this many elements is packed (below it, its Python objects are small)
PACKED_MIN_ELEMENTS = 1 << 16
_FIELDS = {onnx.AttributeProto.INTS: "ints", onnx.AttributeProto.FLOATS: "floats",
           onnx.AttributeProto.STRINGS: "strings"}
_DESCRIPTORS = onnx.AttributeProto.DESCRIPTOR.fields_by_name


class PackedAttr(ir.Attr):
    """An INTS, FLOATS or STRINGS attribute held as ``serialized``: the AttributeProto
    onnx-ir writes for it (its name, its elements, its type; no doc string). ``value``
    decodes it into the tuple onnx-ir would hold, on every call."""

    __slots__ = ("serialized", "packed_name")

    def __init__(self, name: str, type_: ir.AttributeType, serialized: bytes) -> None:
        super().__init__(name, type_, None)
        self.serialized = serialized
        self.packed_name = name

    @property
    def as_packed(self) -> bool:
        """Whether ``serialized`` is still what onnx-ir writes for it: no name or doc string
        set on it since (a writer and the proof read ``value`` otherwise)."""
        return self.name == self.packed_name and not self.doc_string

    @property
    def value(self) -> tuple:
        elements = getattr(onnx.AttributeProto.FromString(self.serialized), _FIELDS[int(self.type)])
        if self.type == ir.AttributeType.STRINGS:
            return tuple(item.decode("utf-8") for item in elements)
        return tuple(elements)


def _packable(attribute: onnx.AttributeProto) -> str | None:
    """The name of the attribute's list field when it is packed: an INTS, FLOATS or STRINGS
    attribute of at least PACKED_MIN_ELEMENTS elements with no field set but its name, its
    type and that list (so that its serialization is what onnx-ir writes for it)."""
    field = _FIELDS.get(attribute.type)
    if field is None or len(getattr(attribute, field)) < PACKED_MIN_ELEMENTS:
        return None
    allowed = {_DESCRIPTORS["name"], _DESCRIPTORS["type"], _DESCRIPTORS[field]}
    if any(descriptor not in allowed for descriptor, _ in attribute.ListFields()):
        return None
    return field


@contextlib.contextmanager
def packed_for_load(proto: onnx.ModelProto, restore: bool) -> Iterator[list[tuple[int, str, PackedAttr]]]:
    """Within the block, the packable attributes of ``proto``'s main-graph ``ai.onnx.ml``
    nodes hold no elements (onnx-ir reads each as an empty list); the list yields, for each,
    the node's position in the graph, the attribute's name and its ``PackedAttr``. On exit
    ``proto`` holds its elements again when ``restore`` (a caller's ModelProto is left as it
    was) or the block raised (the error may carry the proto); else they stay out."""
    packed: list[tuple[int, str, PackedAttr]] = []
    cleared: list[tuple[onnx.AttributeProto, str, bytes]] = []
    try:
        for position, node in enumerate(proto.graph.node):
            if node.domain != ML_DOMAIN:
                continue
            for attribute in node.attribute:
                field = _packable(attribute)
                if field is None:
                    continue
                serialized = attribute.SerializeToString()
                packed.append((position, attribute.name, PackedAttr(attribute.name, ir.AttributeType(attribute.type),
                                                                    serialized)))
                attribute.ClearField(field)
                cleared.append((attribute, field, serialized))
        yield packed
    except BaseException:
        _refill(cleared)
        raise
    if restore:
        _refill(cleared)


def _refill(cleared: list[tuple[onnx.AttributeProto, str, bytes]]) -> None:
    for attribute, field, serialized in cleared:
        getattr(attribute, field).extend(getattr(onnx.AttributeProto.FromString(serialized), field))


def put_packed(model: ir.Model, packed: list[tuple[int, str, PackedAttr]]) -> None:
    """Give the nodes of ``model`` (just read from the proto ``packed_for_load`` changed, its
    main graph's nodes in the proto's order) their packed attributes, each in the place of
    the empty one onnx-ir read."""
    if not packed:
        return
    nodes = list(model.graph)
    for position, name, attribute in packed:
        nodes[position].attributes[name] = attribute


def holds_packed(model: ir.Model) -> bool:
    """Whether a main-graph node of ``model`` holds a ``PackedAttr``."""
    return any(node.domain == ML_DOMAIN and any(type(attr) is PackedAttr for attr in node.attributes.data.values())
               for node in model.graph)
