"""The bit-exact reference tests find their ggml types by hard-coded id: a moved type enum fails them."""

from __future__ import annotations

import ctypes

import pytest
from ggml_ctypes import TypeTraits, type_traits


class _FakeLib:
    """ggml_get_type_traits of a library whose type `tid` is named `name`."""

    def __init__(self, names: dict[int, bytes | None]):
        self._traits = {tid: TypeTraits(type_name=name, blck_size=64) for tid, name in names.items()}

    def ggml_get_type_traits(self, tid):
        return ctypes.pointer(self._traits[tid])


def test_type_traits_of_the_expected_type_are_returned():
    assert type_traits(_FakeLib({46: b"tqs2"}), "tqs2", 46).blck_size == 64


@pytest.mark.parametrize("names", [{46: b"tqs3"}, {46: None}])
def test_a_moved_or_missing_type_fails_instead_of_skipping(names):
    """Before, load_ggml_base skipped the whole module on a mismatch: an enum reorder passed silently."""
    with pytest.raises(AssertionError, match="ggml type 46 is .*not 'tqs2': the type enum moved"):
        type_traits(_FakeLib(names), "tqs2", 46)
