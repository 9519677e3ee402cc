"""Stop strings over streamed text: never leak a partial stop, never emit the stop."""

import random

import pytest

from duetserve.services.ingress.stop_strings import StopStringMatcher


def stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        check = matcher.feed(piece)
        out.append(check.text)
        if check.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def test_stop_split_across_pieces_is_held_back_and_not_emitted() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("hello </e").text == "hello "
    check = matcher.feed("nd> trailing")
    assert check == ("", True)


def test_false_alarm_is_released() -> None:
    assert stream(["abc"], ["xa", "b", "d"]) == ("xabd", False)
    assert stream(["abc"], ["xab"]) == ("xab", False)  # flushed at the end


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_whole_text_search_for_any_split(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab\n"
    text = "".join(rng.choice(alphabet) for _ in range(40))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert stream(stops, pieces) == reference(stops, text)
