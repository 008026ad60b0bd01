"""Stand-in for ``comfy_api.latest.ui``: the text a node shows, kept where the tests read it."""


class PreviewText:
    def __init__(self, value: str, **kwargs) -> None:
        self.value = value  # the real class also hands it to the frontend; nothing renders here
