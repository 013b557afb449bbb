"""Stop strings (the `stop` parameter): found across token boundaries, cut from the answer.

Text is fed as it is generated. What could still be the start of a stop string is held back, so a
streamed answer never shows a part of a stop string that the next tokens complete.
"""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # held back: a suffix that is a prefix of some stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be released after `text`; sets `stopped` once a stop string appears
        (the answer then ends before it, and later calls release nothing)."""
        if self.stopped:
            return ""
        text = self.pending + text
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return text[: min(found)]
        keep = max((self._partial(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is held back, at the end of the answer."""
        text, self.pending = self.pending, ""
        return text

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return length
        return 0
