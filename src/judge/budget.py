"""One request budget for a run (``--max-requests``): every request this run sends to a server (an answer from a
served model, a judgment) takes one; answers made in-process take none. Work is granted before it starts, so a run
never sends more than the budget and stops cleanly, saying what is left."""
from __future__ import annotations


class Budget:
    def __init__(self, limit: int | None):
        self.limit, self.used, self.refused = limit, 0, 0

    def grant(self, wanted: int) -> int:
        """How many of ``wanted`` requests may be sent (all without a limit); the rest are counted as refused."""
        allowed = wanted if self.limit is None else max(0, min(wanted, self.limit - self.used))
        self.used += allowed
        self.refused += wanted - allowed
        return allowed

    @property
    def spent(self) -> bool:
        return self.refused > 0
