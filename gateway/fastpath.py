"""Picks the fast-path implementation: compiled by default, the pure-Python
twin when GATEWAY_NO_EXTENSIONS=1 (or when the extension is missing, which a
normal install never is: tests/test_fastpath.py fails if it happens)."""
import logging
import os

if os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0"):
    from . import _fastpath_py as impl
else:
    try:
        from . import _fastpath as impl  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - a broken build
        logging.getLogger("gateway").warning(
            "compiled fast path not available (%s); using the pure-Python twin", exc)
        from . import _fastpath_py as impl  # type: ignore[no-redef]

IS_COMPILED = impl.IS_COMPILED
ClientListener = impl.ClientListener
SymbolTable = impl.SymbolTable
FanOut = impl.FanOut
SubscriptionReader = impl.SubscriptionReader
is_json_object = impl.is_json_object
parse_symbol = impl.parse_symbol
encode_trade_frame = impl.encode_trade_frame
encode_text_frame = impl.encode_text_frame

__all__ = ["IS_COMPILED", "ClientListener", "SymbolTable", "FanOut", "SubscriptionReader",
           "is_json_object", "parse_symbol", "encode_trade_frame", "encode_text_frame", "impl"]
