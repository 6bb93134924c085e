"""`ManagerState`: the attributes `KVCacheManager` sets up that its parts in files of their own (`NamedChains`,
`TierLink`) use: declared once, for the type checker and the reader; `KVCacheManager.__init__` assigns them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    import threading

    from ..memory import BlockPool, KVSpec
    from ..metrics import Counters
    from ..prefix import Namespace, PrefixIndex
    from .lower_tiers import LowerTiers


class ManagerState:
    """The shared state of the manager's parts (see the module docstring); holds no behaviour."""

    _lock: threading.RLock
    pool: BlockPool
    index: PrefixIndex
    counters: Counters
    lower: LowerTiers | None
    logger: logging.Logger
    spec: KVSpec
    namespace: Namespace
    block_size: int
