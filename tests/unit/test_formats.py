import pytest

from dflashkit.formats import BadRecord, Turn, normalize_conversation, read_conversation, to_output_messages


def skeleton(record):
    turns, repairs = normalize_conversation(record)
    return [(t.role, t.content) for t in turns], repairs


def test_sharegpt_and_oai_vocabularies_mix():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"role": "human", "content": "q1"},
                             {"from": "gpt", "value": "old"}, {"from": "user", "value": "q2"},
                             {"role": "assistant", "value": "old2"}]}
    assert skeleton(rec) == ([("system", "S"), ("user", "q1"), ("user", "q2")], [])


def test_assistant_turns_only_separate_user_turns():
    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]}
    assert skeleton(rec) == ([("user", "q1"), ("user", "q2")], [])


@pytest.mark.parametrize(
    "messages, expected, repair",
    [
        ([("assistant", "hi"), ("user", "q")], [("user", "q")], "leading assistant"),
        ([("user", "a"), ("user", "b")], [("user", "a\n\nb")], "merged"),
        ([("user", "a"), ("assistant", "x"), ("assistant", "y"), ("user", "b")], [("user", "a"), ("user", "b")],
         "consecutive assistant"),
        ([("user", "  "), ("user", "b")], [("user", "b")], "empty user"),
        ([("system", "s1"), ("system", "s2"), ("user", "q")], [("system", "s1\n\ns2"), ("user", "q")],
         "system turns merged"),
        ([("user", "q"), ("system", "late")], [("user", "q\n\nlate")], "treated as user text"),
    ],
)
def test_role_rules_repair_and_say_so(messages, expected, repair):
    rec = {"messages": [{"role": r, "content": c} for r, c in messages]}
    got, repairs = skeleton(rec)
    assert got == expected
    assert any(repair in r for r in repairs), repairs


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"messages": [{"role": "assistant", "content": "x"}]}, "no_user_turn"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "no_user_turn"),
        ({"messages": []}, "no_user_turn"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "non_text_content"),
        ({"messages": [{"role": "user", "content": 5}]}, "bad_type"),
        ({"text": "no turns"}, "missing_key"),
        ({"messages": [], "conversations": []}, "ambiguous"),
        ({"messages": "hello"}, "bad_type"),
        ({"messages": [{"content": "no role"}]}, "missing_key"),
        (["not", "an", "object"], "bad_type"),
    ],
)
def test_unusable_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(BadRecord) as e:
        normalize_conversation(record)
    assert e.value.reason == reason


def test_text_content_parts_are_joined():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert skeleton(rec) == ([("user", "ab")], [])


def test_output_layouts():
    turns = [Turn("system", "s"), Turn("user", "q"), Turn("assistant", "a")]
    assert to_output_messages(turns, "oai")[1] == {"role": "user", "content": "q"}
    assert to_output_messages(turns, "sharegpt") == [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


def test_read_conversation_is_strict():
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert [t.role for t in read_conversation(good)] == ["user", "assistant"]
    with pytest.raises(BadRecord, match="no_assistant_turn"):
        read_conversation({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(BadRecord, match="role_order"):
        read_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]})
