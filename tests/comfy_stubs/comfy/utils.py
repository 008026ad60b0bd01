"""Stand-in for ``comfy.utils``."""


class ProgressBar:
    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.current = value
        if total is not None:
            self.total = total
