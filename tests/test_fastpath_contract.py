"""The compiled fast path and its pure-Python twin against their contract,
gateway/_fastpath.pyi: the same public names, the same parameters, the same
read-only attributes, and no attribute either accepts that the other would
refuse. Code that passes on the twin then cannot fail compiled for want of
a name.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import gateway
from gateway import _fastpath_py as P
from gateway import protocol

try:
    from gateway import _fastpath as C
except ImportError:  # test_fastpath.py::test_compiled_module_loaded fails in this case
    C = None

pytestmark = pytest.mark.skipif(C is None, reason="extension not built")

STUB = Path(gateway.__file__).with_name("_fastpath.pyi")


def _stub():
    """(module-level names, {class: (methods, read-only properties, writable attributes)})."""
    tree = ast.parse(STUB.read_text())
    names: set[str] = set()
    classes: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            methods, readonly, writable = set(), set(), set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    decorators = {d.id for d in item.decorator_list if isinstance(d, ast.Name)}
                    (readonly if "property" in decorators else methods).add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    writable.add(item.target.id)
            classes[node.name] = (methods, readonly, writable)
    return names, classes


STUB_NAMES, STUB_CLASSES = _stub()
IMPLS = [pytest.param(C, id="compiled"), pytest.param(P, id="purepy")]


def _public_module_names(mod) -> set[str]:
    imported = {id(v) for v in vars(protocol).values()}
    out = set()
    for name, value in vars(mod).items():
        if name.startswith("_") or inspect.ismodule(value) or id(value) in imported:
            continue
        owner = getattr(value, "__module__", None)
        if (inspect.isclass(value) or callable(value)) and owner != mod.__name__:
            continue  # imported, not defined here
        if owner not in (None, mod.__name__) and not inspect.isbuiltin(value):
            continue  # typing objects, __future__ features
        out.add(name)
    return out


def _public_class_names(cls) -> set[str]:
    inherited = set()
    for base in cls.__mro__[1:]:
        inherited |= set(vars(base))
    names = set()
    for klass in cls.__mro__:
        if klass.__module__ in (C.__name__, P.__name__):
            names |= set(vars(klass))
    return {n for n in names - inherited if not n.startswith("_")} | (
        {"__len__"} if "__len__" in vars(cls) else set())


@pytest.mark.parametrize("impl", IMPLS)
def test_module_names_are_the_contract(impl):
    assert _public_module_names(impl) == STUB_NAMES


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls_name", sorted(STUB_CLASSES))
def test_class_names_are_the_contract(impl, cls_name):
    methods, readonly, writable = STUB_CLASSES[cls_name]
    declared = (methods | readonly | writable) - {"__init__"}
    cls = getattr(impl, cls_name)
    # Everything declared is there (WSListener's callbacks may be inherited),
    # and nothing public is there that the contract does not declare.
    assert declared <= set(dir(cls)), declared - set(dir(cls))
    assert _public_class_names(cls) <= declared, _public_class_names(cls) - declared


def _params(fn) -> list[tuple[str, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("cls_name", sorted(STUB_CLASSES))
def test_same_parameters(cls_name):
    methods = STUB_CLASSES[cls_name][0] - {"__init__", "__len__"}
    for name in sorted(methods):
        compiled, twin = getattr(getattr(C, cls_name), name), getattr(getattr(P, cls_name), name)
        assert [n for n, _ in _params(compiled)] == [n for n, _ in _params(twin)], name


@pytest.mark.parametrize("name", ["is_json_object", "parse_symbol", "encode_trade_frame",
                                  "encode_text_frame", "split_published", "split_candle"])
def test_same_function_parameters(name):
    assert [n for n, _ in _params(getattr(C, name))] == [n for n, _ in _params(getattr(P, name))]


def _instances(impl):
    table = impl.SymbolTable()
    fanout = impl.FanOut(table, max_buffered=1234, slow_consumer_callback=None)
    return {
        "ClientListener": impl.ClientListener(session=None),
        "SymbolTable": table,
        "FanOut": fanout,
        "SubscriptionReader": impl.SubscriptionReader(fanout=fanout, reply_callback=None),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls_name", sorted(STUB_CLASSES))
def test_read_only_and_writable_attributes(impl, cls_name):
    """Keyword construction works the same, read-only stays read-only, and
    neither implementation takes an attribute the contract does not name."""
    obj = _instances(impl)[cls_name]
    _, readonly, writable = STUB_CLASSES[cls_name]
    for name in readonly:
        value = getattr(obj, name)
        with pytest.raises(AttributeError):
            setattr(obj, name, value)
    for name in writable:
        setattr(obj, name, getattr(obj, name))
    with pytest.raises(AttributeError):
        obj.not_in_the_contract = 1


def test_picows_adapter_matches_the_pin():
    """The adapter names the picows it matches; pyproject pins exactly that."""
    import re

    import picows

    from gateway import picows_adapter
    pyproject = (Path(gateway.__file__).parent.parent / "pyproject.toml").read_text()
    pins = set(re.findall(r'"picows==([^"]+)"', pyproject))
    assert pins == {picows_adapter.PICOWS_VERSION}
    assert picows.__version__ == picows_adapter.PICOWS_VERSION
    picows_adapter.check_version()
    stub = (Path(gateway.__file__).parent / "_picows_adapter.pxd").read_text()
    assert f"picows {picows_adapter.PICOWS_VERSION}" in stub
