"""Stop strings: whatever the text's split into tokens, the released text is the answer up to the
first stop string, and nothing released is ever taken back."""

from cumo_mlx.serve.stops import StopMatcher
from hypothesis import given
from hypothesis import strategies as st


def run(pieces, stops):
    matcher = StopMatcher(stops)
    released = "".join(matcher.feed(piece) for piece in pieces)
    return released + ("" if matcher.stopped else matcher.flush()), matcher.stopped


def test_examples():
    assert run(["Hel", "lo wo", "rld"], ["o w"]) == ("Hell", True)
    assert run(["ab", "c"], ["bd", "c"]) == ("ab", True)
    assert run(["ab", "c"], ["bc", "c"]) == ("a", True)  # the earliest stop string wins
    assert run(["a", "b"], ["bc"]) == ("ab", False)  # held back, then released at the end
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == "go " and matcher.feed("OP and on") == "" and matcher.stopped
    assert matcher.feed("more") == ""


@given(st.lists(st.text("abc", max_size=4), max_size=8), st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=4))
def test_any_split(pieces, stops):
    text = "".join(pieces)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert run(pieces, stops) == ((text[: min(found)], True) if found else (text, False))
    matcher, released = StopMatcher(stops), ""
    for piece in pieces:  # what is released is always the start of the final answer
        released += matcher.feed(piece)
        assert text.startswith(released)
        assert not any(s in released for s in stops)
