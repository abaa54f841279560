import random

import pytest

from dsv4.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dsv4.tokenizer import EOS, Tokenizer

TEXT = ("The answer is 42.\n\nObservation: 你好，世界！😀🎉👍🏽 déjà vu — ß ∑ "
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🇯🇵 家族👨‍👩‍👧 def f(x):\n    return x ** 2  # ok\n")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(None)


@pytest.fixture(scope="module")
def vocab_groups(tok):
    """Token ids whose lone decode is an unfinished UTF-8 piece, and special (skippable) tokens."""
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    special = [i for i in range(tok.vocab_size) if tok.decode([i], skip_special_tokens=True) == ""]
    assert len(partial) > 1000 and len(special) > 1000
    return partial, special


class CountingTokenizer:
    """Wraps the tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=False):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(tok, ids, skip=True, prompt=(1, 2, 3)):
    d = IncrementalDetokenizer(tok, list(prompt), skip)
    pieces = [d.add(i) for i in ids]
    return d, pieces


# ---- IncrementalDetokenizer -------------------------------------------------------------------------

def test_streams_valid_text_exactly_without_replacement_chars(tok):
    ids = tok.encode(TEXT, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the text does split characters across tokens
    d, pieces = stream(tok, ids)
    assert "".join(pieces) == TEXT == d.text
    assert not any("\ufffd" in p for p in pieces)
    assert d.flush() == "" and d.text == TEXT


def test_holds_back_an_unfinished_character_until_it_completes(tok):
    ids = tok.encode("a😀", add_bos=False)
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    d, pieces = stream(tok, ids)
    assert pieces[0] == "a" and pieces[-2:] == ["", "😀"]
    # a space before a split character is released at once; only the character waits
    ids = tok.encode(" ß", add_bos=False)
    assert len(ids) == 2 and tok.decode(ids[:1]) == " \ufffd"
    assert stream(tok, ids)[1] == [" ", "ß"]


def test_decodes_a_small_window_not_the_whole_output(tok):
    counting = CountingTokenizer(tok)
    ids = tok.encode(TEXT * 4, add_bos=False)
    d, pieces = stream(counting, ids)
    assert "".join(pieces) == TEXT * 4
    assert len(counting.sizes) == len(ids)
    assert max(counting.sizes) <= 4 < len(ids)


def test_special_tokens_skipped_or_kept(tok):
    eos = tok.token_to_id(EOS)
    ids = tok.encode("Hello", add_bos=False) + [eos] + tok.encode("世界😀", add_bos=False) + [eos]
    d, pieces = stream(tok, ids, skip=True)
    assert d.text == "Hello世界😀" and pieces[-1] == ""
    d, pieces = stream(tok, ids, skip=False)
    assert d.text == f"Hello{EOS}世界😀{EOS}" and pieces[-1] == EOS


def test_flush_releases_an_unfinished_tail_like_decode(tok):
    ids = tok.encode("ok 😀", add_bos=False)[:-1]
    d, pieces = stream(tok, ids)
    assert "".join(pieces) == "ok "
    assert d.flush() == "\ufffd"
    assert d.text == tok.decode(ids) == "ok \ufffd"
    with pytest.raises(RuntimeError, match="after flush"):
        d.add(ids[0])


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_equal_full_decode(tok, vocab_groups, skip):
    partial, special = vocab_groups
    rng = random.Random(7 + skip)
    for trial in range(300):
        ids = []
        for _ in range(rng.randint(0, 30)):
            u = rng.random()
            ids.append(rng.choice(partial) if u < 0.5 else rng.choice(special) if u < 0.6
                       else rng.randrange(tok.vocab_size))
        d, pieces = stream(tok, ids, skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        released = "".join(pieces)
        assert full.startswith(released), (ids, skip)
        assert len(full) - len(released) <= 1  # at most one unfinished character held back
        assert released + d.flush() == full == d.text, (ids, skip)


def test_prefix_of_streamed_text_is_final_at_every_step(tok, vocab_groups):
    """What add() released after k tokens is a prefix of decode(first k tokens) and of every later decode."""
    partial, _ = vocab_groups
    rng = random.Random(3)
    ids = [rng.choice(partial) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(120)]
    d = IncrementalDetokenizer(tok, [], True)
    for k, i in enumerate(ids, 1):
        d.add(i)
        assert tok.decode(ids[:k], skip_special_tokens=True).startswith(d.text)
        assert tok.decode(ids, skip_special_tokens=True).startswith(d.text)


# ---- StopStringMatcher ------------------------------------------------------------------------------

def ref_stop(text, stops, include):
    """Scan end positions left to right: the first stop string to complete wins (the longest on a tie)."""
    for e in range(1, len(text) + 1):
        ending = [s for s in stops if text[:e].endswith(s)]
        if ending:
            s = max(ending, key=len)
            return (text[:e] if include else text[:e - len(s)]), s
    return text, None


def run_matcher(pieces, stops, include):
    m = StopStringMatcher(stops, include)
    out, stopped, emitted = "", None, []
    for p in pieces:
        e, s = m.feed(p)
        out += e
        emitted.append(out)
        if s is not None:
            stopped = s
            assert m.feed("more text") == ("", None)  # nothing after a stop, ever
            assert m.flush() == ""
            break
    else:
        out += m.flush()
    return out, stopped, emitted


CASES = [
    ("hello world, goodbye", ["world"]),
    ("aaab", ["aab"]),
    ("abcabd", ["abd", "ca"]),
    ("xxabcdyy", ["abcd", "bc"]),
    ("stop at the end!", ["end!"]),
    ("nothing to see", ["zzz", "seen"]),
    ("ab", ["abc"]),
    ("mississippi", ["ssip", "sis", "pp"]),
    ("你好，世界😀！", ["世界😀", "😀！"]),
    ("</s></s>", ["</s>"]),
    ("xabcy", ["bc", "abc"]),
]


@pytest.mark.parametrize("text, stops", CASES)
@pytest.mark.parametrize("include", [False, True])
def test_every_split_into_up_to_three_pieces(text, stops, include):
    want = ref_stop(text, stops, include)
    n = len(text)
    splits = [[text]]
    splits += [[text[:i], text[i:]] for i in range(n + 1)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(n + 1) for j in range(i, n + 1)]
    for pieces in splits:
        out, stopped, emitted = run_matcher(pieces, stops, include)
        assert (out, stopped) == want, pieces
        assert all(want[0].startswith(e) for e in emitted)  # streaming never emits what it must retract


def test_reference_cases_are_what_we_mean():
    assert ref_stop("xxabcdyy", ["abcd", "bc"], False) == ("xxa", "bc")
    assert ref_stop("hello world, goodbye", ["world"], True) == ("hello world", "world")
    assert ref_stop("ab", ["abc"], False) == ("ab", None)
    assert ref_stop("xabcy", ["bc", "abc"], False) == ("x", "abc")


def test_holds_back_only_a_possible_stop_prefix():
    m = StopStringMatcher(["world"], False)
    assert m.feed("hello wor") == ("hello ", None)
    assert m.feed("m") == ("worm", None)
    assert m.feed("s and w") == ("s and ", None)
    assert m.flush() == "w"
    m = StopStringMatcher(["xyz"], False)
    assert m.feed("hello wor") == ("hello wor", None)
    assert StopStringMatcher([], False).feed("anything xyz") == ("anything xyz", None)


def test_check_stop_false_passes_stop_strings_through():
    m = StopStringMatcher(["END"], False)
    assert m.feed("a END b EN", check_stop=False) == ("a END b ", None)
    assert m.feed("D c") == ("", "END")
    assert m.stopped == "END"


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""], False)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_real_tokens(tok, include):
    cases = [("The answer is 42.\n\nObservation: done", "\n\nObservation:"),
             ("Good: 你好，世界！😀 then more", "世界！😀"),
             ("emoji 👍🏽 tail", "🏽 t"),
             ("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text", "𝔦𝔠")]
    for text, stop in cases:
        ids = tok.encode(text, add_bos=False)
        d = IncrementalDetokenizer(tok, [], True)
        m = StopStringMatcher([stop, "never-there"], include)
        out, stopped, pos = "", None, None
        for k, i in enumerate(ids):
            e, s = m.feed(d.add(i))
            out += e
            if s is not None:
                stopped, pos = s, k
                break
        cut = text.index(stop) + (len(stop) if include else 0)
        assert stopped == stop and out == text[:cut], (text, out)
        # found at the first token whose text completes it, and that takes several tokens
        assert stop in tok.decode(ids[:pos + 1]) and stop not in tok.decode(ids[:pos])
        assert not any(stop in tok.decode([i]) for i in ids)
