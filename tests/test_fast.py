"""Unit tests of the compiled module: the ring, the JSON scanner, the name
checks, messages, and the stub file that types it."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

import ssepg
from ssepg import _fast
from ssepg._fast import (
    JSONError,
    Message,
    Ring,
    check_json,
    compact,
    is_event_id,
    is_event_name,
    is_topic,
    object_spans,
)


def message(seq: int, gseq: int | None = None, data: bytes | None = None) -> Message:
    payload = data if data is not None else b'{"n":%d}' % seq
    return Message(
        "t", f"id-{seq}", "message", payload, seq, seq if gseq is None else gseq
    )


def filled(capacity: int, count: int, gseqs: list[int] | None = None) -> Ring:
    ring = Ring(capacity)
    for seq in range(count):
        ring.append(message(seq, gseqs[seq] if gseqs else None))
    return ring


# Ring ----------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 3, 6, 12, 1000])
def test_ring_refuses_capacity_that_is_not_a_power_of_two(capacity):
    with pytest.raises(ValueError, match="power of two"):
        Ring(capacity)


@pytest.mark.parametrize("capacity", [1, 2, 8, 16, 1024, 1 << 20])
def test_ring_accepts_power_of_two_capacity(capacity):
    ring = Ring(capacity)
    assert ring.capacity == capacity
    assert (len(ring), ring.head, ring.tail, ring.nbytes) == (0, 0, 0, 0)


def test_ring_keeps_order_and_sequence_numbers_until_full():
    ring = Ring(16)
    for seq in range(10):
        assert ring.append(message(seq)) is None
    assert (ring.head, ring.tail, len(ring)) == (10, 0, 10)
    assert [m.seq for m in ring.messages(0, 10)] == list(range(10))
    assert [m.id for m in ring.messages(0, 10)] == [f"id-{i}" for i in range(10)]


def test_ring_overwrites_oldest_when_full():
    ring = Ring(4)
    displaced = [ring.append(message(seq)) for seq in range(7)]
    assert displaced[:4] == [None] * 4
    assert [m.seq for m in displaced[4:]] == [0, 1, 2]
    assert (ring.head, ring.tail, len(ring)) == (7, 3, 4)
    assert [m.seq for m in ring.messages(0, 100)] == [3, 4, 5, 6]


def test_ring_capacity_one_holds_only_the_latest():
    ring = Ring(1)
    assert ring.append(message(0)) is None
    assert ring.append(message(1)).seq == 0
    assert [m.seq for m in ring.messages(0, 2)] == [1]


def test_ring_append_requires_the_next_sequence_number():
    ring = filled(4, 2)
    with pytest.raises(ValueError, match="expected seq 2"):
        ring.append(message(5))
    with pytest.raises(ValueError):
        ring.append(message(1))
    assert ring.head == 2


def test_ring_get_returns_held_messages_only():
    ring = filled(4, 6)
    assert ring.get(1) is None  # overwritten
    assert ring.get(6) is None  # not yet written
    assert ring.get(-1) is None
    for seq in range(2, 6):
        assert ring.get(seq).seq == seq


def test_ring_messages_clamps_to_the_window():
    ring = filled(4, 6)
    assert [m.seq for m in ring.messages(3, 5)] == [3, 4]
    assert [m.seq for m in ring.messages(-10, 3)] == [2]
    assert ring.messages(6, 10) == []
    assert ring.messages(5, 3) == []


def test_ring_join_frames_concatenates_frames_in_order():
    ring = filled(8, 10)
    frames = [m.frame for m in ring.messages(0, 10)]
    assert ring.join_frames(2, 10) == b"".join(frames)
    assert ring.join_frames(5, 6) == ring.get(5).frame
    assert ring.join_frames(0, 4) == ring.get(2).frame + ring.get(3).frame
    assert ring.join_frames(4, 7) == b'id: id-4\nevent: message\ndata: {"n":4}\n\n' + (
        b'id: id-5\nevent: message\ndata: {"n":5}\n\n'
        b'id: id-6\nevent: message\ndata: {"n":6}\n\n'
    )


def test_ring_first_after_gseq_finds_the_next_global_position():
    gseqs = [10, 20, 30, 40, 50, 60]
    ring = filled(4, 6, gseqs)  # holds seq 2..5, gseq 30..60
    assert ring.first_after_gseq(0) == 2
    assert ring.first_after_gseq(29) == 2
    assert ring.first_after_gseq(30) == 3
    assert ring.first_after_gseq(35) == 3
    assert ring.first_after_gseq(59) == 5
    assert ring.first_after_gseq(60) == ring.head
    assert ring.first_after_gseq(1000) == ring.head
    assert Ring(8).first_after_gseq(5) == 0


def test_ring_grows_slots_lazily_up_to_capacity():
    ring = Ring(1024)
    assert ring.slots_allocated <= 8
    for seq in range(100):
        ring.append(message(seq))
    assert 100 <= ring.slots_allocated <= 128
    assert [m.seq for m in ring.messages(0, 100)] == list(range(100))


def test_ring_nbytes_counts_held_messages():
    ring = filled(4, 9)
    assert ring.nbytes == sum(m.size for m in ring.messages(0, 9))
    assert ring.nbytes > 0


def test_ring_set_capacity_shrinking_returns_dropped_oldest_first():
    ring = filled(16, 12)
    dropped = ring.set_capacity(4)
    assert [m.seq for m in dropped] == list(range(8))
    assert ring.capacity == 4
    assert (ring.head, ring.tail, len(ring)) == (12, 8, 4)
    assert [m.seq for m in ring.messages(0, 12)] == [8, 9, 10, 11]
    assert ring.nbytes == sum(m.size for m in ring.messages(8, 12))
    # Appending after the shrink overwrites at the new capacity.
    assert ring.append(message(12)).seq == 8
    assert [m.seq for m in ring.messages(0, 13)] == [9, 10, 11, 12]


def test_ring_set_capacity_growing_keeps_everything():
    ring = filled(4, 6)
    assert ring.set_capacity(16) == []
    for seq in range(6, 14):
        assert ring.append(message(seq)) is None
    assert [m.seq for m in ring.messages(0, 14)] == list(range(2, 14))


def test_ring_set_capacity_refuses_non_power_of_two():
    ring = filled(8, 3)
    with pytest.raises(ValueError, match="power of two"):
        ring.set_capacity(6)
    assert ring.capacity == 8
    assert len(ring) == 3


def test_ring_clear_returns_everything_oldest_first():
    ring = filled(4, 6)
    dropped = ring.clear()
    assert [m.seq for m in dropped] == [2, 3, 4, 5]
    assert (len(ring), ring.nbytes, ring.tail, ring.head) == (0, 0, 6, 6)
    ring.append(message(6))
    assert ring.get(6).seq == 6


# JSON scanner ------------------------------------------------------------------


def test_object_spans_maps_member_names_to_value_offsets():
    body = b' { "data" : {"a": [1, 2]} , "event":"x", "n": -1.5e3 } '
    spans = object_spans(body)
    assert set(spans) == {"data", "event", "n"}
    assert body[slice(*spans["data"])] == b'{"a": [1, 2]}'
    assert body[slice(*spans["event"])] == b'"x"'
    assert body[slice(*spans["n"])] == b"-1.5e3"


def test_object_spans_decodes_escaped_names_and_keeps_last_duplicate():
    body = b'{"d\\u0061ta": 1, "x": 2, "x": 3}'
    spans = object_spans(body)
    assert body[slice(*spans["data"])] == b"1"
    assert body[slice(*spans["x"])] == b"3"


def test_object_spans_on_a_sub_span():
    body = b'[{"a":1},{"b":"two"}]'
    spans = object_spans(body, 9, 20)
    assert list(spans) == ["b"]
    assert body[slice(*spans["b"])] == b'"two"'


def test_object_spans_of_empty_object():
    assert object_spans(b"{}") == {}
    assert object_spans(b" \n{ }\t") == {}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[1]", "not an object"),
        (b'"x"', "not an object"),
        (b"1", "not an object"),
        (b"null", "not an object"),
        (b"", "invalid json"),
        (b"   ", "invalid json"),
        (b"{", "invalid json"),
        (b'{"a":1} x', "trailing data"),
        (b'{"a":1}{}', "trailing data"),
        (b'{"a":1,}', "invalid json"),
        (b"{'a':1}", "invalid json"),
        (b"{a:1}", "invalid json"),
        (b'{"a" 1}', "invalid json"),
        (b'{"a":\xff}', "invalid utf-8"),
    ],
)
def test_object_spans_rejects(body, reason):
    with pytest.raises(JSONError, match=reason):
        object_spans(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b' { "b" : 1 , "a" : 2 } ', b'{"b":1,"a":2}'),
        (
            b"[ 1.50 , 1E+10 , -0 , 0.0e-0 , 1e400 , 123456789012345678901234567890 ]",
            b"[1.50,1E+10,-0,0.0e-0,1e400,123456789012345678901234567890]",
        ),
        (b'"  spaces  inside  "', b'"  spaces  inside  "'),
        (
            b'{ "s" : "a \\" b \\\\" , "t" : "\\\\" }',
            b'{"s":"a \\" b \\\\","t":"\\\\"}',
        ),
        (
            b'[ "\\u00e9\\n\\t\\/" ,"\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80" ]',
            b'["\\u00e9\\n\\t\\/","\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"]',
        ),
        (b"\r\n\t[\r\n\ttrue ,\r\n\tfalse,null ]\r\n", b"[true,false,null]"),
        (b"{}", b"{}"),
        (b"17", b"17"),
    ],
)
def test_compact_removes_only_insignificant_whitespace(body, expected):
    check_json(body)
    assert compact(body) == expected
    assert json.loads(compact(body)) == json.loads(body)


def test_compact_of_a_span():
    body = b'{"data" :  [ 1 , {"k" : "v v"} ] , "x": 1}'
    spans = object_spans(body)
    assert compact(body, *spans["data"]) == b'[1,{"k":"v v"}]'


@pytest.mark.parametrize(
    "body",
    [
        b"NaN",
        b"[NaN]",
        b"Infinity",
        b"-Infinity",
        b"01",
        b"-01",
        b"[00]",
        b"1.",
        b".5",
        b"+1",
        b"1e",
        b"1e+",
        b"0x10",
        b"[1,]",
        b'{"a":1,}',
        b"[1 2]",
        b"[,1]",
        b"tru",
        b"nul",
        b"True",
        b"'x'",
        b'"unterminated',
        b'"bad \\x escape"',
        b'"short \\u12"',
        b'"raw \x01 control"',
        b'"raw \n newline"',
        b'"lone surrogate \xed\xa0\x80"',
        b'"overlong slash \xc0\xaf"',
        b'"overlong three \xe0\x80\xaf"',
        b'"overlong four \xf0\x80\x80\xaf"',
        b'"above max \xf4\x90\x80\x80"',
        b'"truncated \xe2\x82"',
        b'"stray continuation \x80"',
        b"[1] [2]",
        b"",
    ],
)
def test_check_json_rejects_invalid_json(body):
    with pytest.raises(JSONError):
        check_json(body)


def test_check_json_limits_nesting_depth():
    check_json(b"[" * 512 + b"]" * 512)
    with pytest.raises(JSONError, match="nested too deeply"):
        check_json(b"[" * 513 + b"]" * 513)
    with pytest.raises(JSONError, match="nested too deeply"):
        check_json(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


@pytest.mark.parametrize(
    "body",
    [
        b"0",
        b"-0.0e+5",
        b'"\\ud83d\\ude00"',
        b'"\\ud800"',
        b" [ ] ",
        b'{"":""}',
        b'"\xef\xbf\xbf"',
        b'"\xf4\x8f\xbf\xbf"',
    ],
)
def test_check_json_accepts_valid_json(body):
    check_json(body)


# Names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "0", "a" * 128, "chat:room-1", "a_b.c", "...", ".a", "a..b", "-", ":"],
)
def test_is_topic_accepts(name):
    assert is_topic(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 129,
        "A",
        "Topic",
        ".",
        "..",
        "a/b",
        "a b",
        "a,b",
        "caf\u00e9",
        "\u212a",
        "a\x00",
        "a\n",
        "a\t",
        "a%2f",
        "a#b",
        "a?b",
        "a+b",
    ],
)
def test_is_topic_rejects(name):
    assert not is_topic(name)


@pytest.mark.parametrize("name", ["message", "Update", "A", "a" * 64, "x.y:z-1_2"])
def test_is_event_name_accepts(name):
    assert is_event_name(name)


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "a b", "a\nb", "a/b", "\u00e9v", "a,b", "a\r", "ev\x00"]
)
def test_is_event_name_rejects(name):
    assert not is_event_name(name)


@pytest.mark.parametrize("value", ["1", "abcdefgh-42", "x" * 128, "!~", "a:b/c"])
def test_is_event_id_accepts(value):
    assert is_event_id(value)


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "a b", "a\nb", "a\rb", "\x7f", "\u00e9", "a\x00"]
)
def test_is_event_id_rejects(value):
    assert not is_event_id(value)


# Messages --------------------------------------------------------------------


def test_message_of_single_line_payload():
    m = Message("room", "inst-7", "message", b'{"a":[1,2]}', 3, 42)
    assert (m.topic, m.id, m.event, m.seq, m.gseq) == (
        "room",
        "inst-7",
        "message",
        3,
        42,
    )
    assert m.data == b'{"a":[1,2]}'
    assert m.frame == b'id: inst-7\nevent: message\ndata: {"a":[1,2]}\n\n'
    assert m.multi_frame == (
        b'id: inst-7\nevent: message\ndata: {"topic":"room","data":{"a":[1,2]}}\n\n'
    )


def test_message_of_multi_line_payload():
    m = Message("room", "i-1", "note", b"one\ntwo\r\nthree\rfour", 0, 1)
    assert m.data == b"one\ntwo\r\nthree\rfour"
    assert m.frame == (
        b"id: i-1\nevent: note\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    )


def test_message_size_is_fixed_and_covers_the_frame():
    single = Message("t", "i-1", "message", b"[1]", 0, 1)
    multi = Message("t", "i-1", "message", b"a\nb", 0, 1)
    assert single.size >= len(single.frame)
    assert multi.size >= len(multi.frame) + len(multi.data)
    before = single.size
    single.multi_frame  # noqa: B018 - encodes the multi-topic frame on first use
    assert single.size == before


# The stub file -----------------------------------------------------------------


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    path = pathlib.Path(ssepg.__file__).with_name("_fast.pyi")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            module.add(node.target.id)
        elif isinstance(node, ast.Assign):
            module.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ClassDef):
            module.add(node.name)
            members: set[str] = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(
                    item.target, ast.Name
                ):
                    members.add(item.target.id)
            classes[node.name] = members
    return module, classes


def test_stub_lists_exactly_the_module_level_names():
    module, _ = _stub_names()
    exported = {name for name in dir(_fast) if not name.startswith("_")}
    assert module == exported


def test_stub_lists_exactly_the_public_members_of_each_class():
    _, classes = _stub_names()
    for name, members in classes.items():
        cls = getattr(_fast, name)
        public = {n for n in vars(cls) if not n.startswith("_")}
        assert {n for n in members if not n.startswith("_")} == public, name
        for dunder in (n for n in members if n.startswith("__")):
            assert hasattr(cls, dunder), (name, dunder)


def test_package_imports_the_compiled_module():
    assert pathlib.Path(_fast.__file__).suffix in (".so", ".pyd")
