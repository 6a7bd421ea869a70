"""Locks tied to objects: what makes sagrt's shared objects safe, or refused, across threads.

A pipeline call changes its scheduler's state and, on the torch backend, swaps an attention processor on
the UNet for the call's length; neither can serve two calls at once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

_registry_lock = threading.Lock()
_shared: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_exclusive: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()


def _lock_of(table, obj, make):
    with _registry_lock:
        lock = table.get(obj)
        if lock is None:
            lock = table[obj] = make()
        return lock


def object_lock(obj) -> threading.RLock:
    """The re-entrant lock of `obj` (made on first use, gone with the object): callers wait for one another."""
    return _lock_of(_shared, obj, threading.RLock)


@contextlib.contextmanager
def exclusive(objects, refuse):
    """Holds the call locks of `objects` for the block without waiting: when one is held, by another thread or by
    this one in an enclosing call (a callback calling again), releases those taken and raises `refuse()`."""
    taken = []
    try:
        for obj in objects:
            lock = _lock_of(_exclusive, obj, threading.Lock)
            if not lock.acquire(blocking=False):
                raise refuse()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()
