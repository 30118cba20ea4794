"""PLACEHOLDER (branch ``signals``): the acoustic fingerprint of a clip. The real module (branch ``dedup``, issue 17)
replaces this file at merge; only the interface below is agreed, and nothing on this branch depends on the bytes.
"""

from __future__ import annotations

import numpy as np


class Fingerprinter:
    """Streaming landmarks of one clip: feed its 24 kHz mono float32 blocks in order, then finish()."""

    def __init__(self) -> None:
        pass

    def feed(self, audio: np.ndarray) -> None:
        pass

    def finish(self) -> bytes:
        return b""
