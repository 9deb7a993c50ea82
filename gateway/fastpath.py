"""Picks the fast-path implementation: compiled by default, the pure-Python
twin when GATEWAY_NO_EXTENSIONS=1 (or when the extension is missing, which a
normal install never is: tests/test_fastpath.py fails if it happens).

Both implement gateway/_fastpath.pyi; type checkers see that surface."""
import importlib
import logging
import os
from typing import TYPE_CHECKING


def _select():
    if os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0"):
        return importlib.import_module("gateway._fastpath_py")
    try:
        return importlib.import_module("gateway._fastpath")
    except ImportError as exc:  # pragma: no cover - a broken build
        logging.getLogger("gateway").warning(
            "compiled fast path not available (%s); using the pure-Python twin", exc)
        return importlib.import_module("gateway._fastpath_py")


if TYPE_CHECKING:
    from . import _fastpath as impl
else:
    impl = _select()

IS_COMPILED = impl.IS_COMPILED
ClientListener = impl.ClientListener
SymbolTable = impl.SymbolTable
FanOut = impl.FanOut
SubscriptionReader = impl.SubscriptionReader
is_json_object = impl.is_json_object
parse_symbol = impl.parse_symbol
encode_trade_frame = impl.encode_trade_frame
encode_text_frame = impl.encode_text_frame

__all__ = ["IS_COMPILED", "ClientListener", "FanOut", "SubscriptionReader", "SymbolTable",
           "encode_text_frame", "encode_trade_frame", "impl", "is_json_object", "parse_symbol"]
