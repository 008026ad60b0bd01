"""Stand-in for ``comfy.utils``."""


class ProgressBar:
    def __init__(self, total: int, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.current = value
        if total is not None:
            self.total = total
