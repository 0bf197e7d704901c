"""The PF/VF filter (``--pf``/``--vf``, the dashboard's ``f``): which switches it keeps.

A switch is kept when its PF is in ``pfs`` and its incoming or outgoing VF is in ``vfs``
(a switch involves both); None keeps every PF or VF.  ``stats.Stats`` counts under the
same rule."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .schema import COLUMNS

_PF, _FROM, _TO = (COLUMNS.index(c) for c in ("pf", "from_vf", "to_vf"))


def filter_mask(rows: np.ndarray, pfs: Iterable[int] | None,
                vfs: Iterable[int] | None) -> np.ndarray:
    """Which of ``rows`` (int64 switch rows, ``COLUMNS`` order) the filter keeps."""
    keep = np.ones(rows.shape[0], dtype=bool)
    if pfs is not None:
        keep &= np.isin(rows[:, _PF], list(pfs))
    if vfs is not None:
        wanted = list(vfs)
        keep &= np.isin(rows[:, _TO], wanted) | np.isin(rows[:, _FROM], wanted)
    return keep
