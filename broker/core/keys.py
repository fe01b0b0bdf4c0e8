"""The int keys that name one page of one pool in the core's dicts.

Two layouts, both built from a handle (oid, index):

* :func:`slot_key` — ``oid << 32 | mixed``: names a handle within one pool (the charge of a
  compressed page, :attr:`Pool.charges`).
* :func:`lru_key` — ``oid << 56 | ref << 32 | mixed``: names a handle in an eviction
  account's LRU, which holds pages of several pools; ``ref`` (24 bits: up to 16M live
  ephemeral pools) names the pool (:attr:`Pool.lru_tag` is ``ref << 32``).

``mixed = (index + (oid & M32) * MIX) & M32`` is invertible given the oid
(:func:`lru_handle`). The index sits in the low bits, mixed with the oid, because an int
hashes to itself: with constant low bits (the pool ref, as a first version had) a
million-entry dict degenerates into long probe chains.

The page hot path (:meth:`broker.core.tmem.Tmem.put` and ``get``) writes these expressions
inline; ``tests/core/test_keys.py`` holds every inlined copy equal to these functions.
"""

from __future__ import annotations

from typing import Final

from schemas.batch import MAX_INDEX

M32: Final = MAX_INDEX
MIX: Final = 0x9E3779B1
REF_BITS: Final = 24
REF_MASK: Final = (1 << REF_BITS) - 1


def slot_key(oid: int, index: int) -> int:
    """The key of a handle within one pool."""
    return (oid << 32) | ((index + (oid & M32) * MIX) & M32)


def lru_tag(ref: int) -> int:
    """What an ephemeral pool with reference ``ref`` contributes to its pages' LRU keys."""
    return ref << 32


def lru_key(tag: int, oid: int, index: int) -> int:
    """The key of a handle in an eviction account's LRU (``tag``: :func:`lru_tag`)."""
    return (oid << 56) | tag | ((index + (oid & M32) * MIX) & M32)


def lru_ref(key: int) -> int:
    """The pool reference of an LRU key."""
    return (key >> 32) & REF_MASK


def lru_handle(key: int) -> tuple[int, int]:
    """The handle ``(oid, index)`` of an LRU key."""
    oid = key >> 56
    return oid, ((key & M32) - (oid & M32) * MIX) & M32
