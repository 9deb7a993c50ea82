"""Event loops for tests: uvloop and the stdlib loop, and one that fails the
test when a callback raises and nobody handles it.

asyncio only logs an exception raised in a callback, a protocol method, or a
task nobody awaited ("Task exception was never retrieved"); a test would pass
over it. CheckedLoops records every such report and check() raises it.
"""
from __future__ import annotations

import asyncio

LOOP_KINDS = ("uvloop", "asyncio")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new loop of ``kind`` ('uvloop' or 'asyncio'); the caller closes it."""
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown loop kind {kind!r}")


def run_loop(coro):
    """Run ``coro`` to completion on uvloop when installed, else asyncio.run()."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class UnhandledLoopError(AssertionError):
    """A loop reported exceptions nobody handled (see CheckedLoops)."""


class CheckedLoops:
    """Runs coroutines on fresh loops of one kind and keeps what their
    exception handlers were told.

        loops = CheckedLoops("uvloop")
        loops.run(main())     # as often as needed; each run gets a new loop
        loops.check()         # at the end: raises UnhandledLoopError if any

    The handler records the context and logs it as the default handler would,
    so the report also appears in captured logs. Contexts without an
    exception (plain messages) are recorded too: asyncio uses them for
    unclosed transports and slow callbacks, which a test wants to hear about.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.errors: list[dict] = []

    def _handler(self, loop, context: dict) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def new_loop(self) -> asyncio.AbstractEventLoop:
        loop = new_loop(self.kind)
        loop.set_exception_handler(self._handler)
        return loop

    def run(self, coro, timeout: float = 60):
        """Run ``coro`` to completion (at most ``timeout`` s) on a new loop,
        then shut down its async generators and close it."""
        loop = self.new_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def check(self) -> None:
        """Raise UnhandledLoopError naming every recorded report."""
        if not self.errors:
            return
        lines = []
        for ctx in self.errors:
            exc = ctx.get("exception")
            line = ctx.get("message", "unhandled error in event loop")
            if exc is not None:
                line += f": {type(exc).__name__}: {exc}"
            lines.append(line)
        raise UnhandledLoopError(
            f"{len(self.errors)} unhandled error(s) on the {self.kind} loop:\n  "
            + "\n  ".join(lines))
