"""The committed protobuf code is fresh, and our contract is upstream emojivoto's, name for name."""

from __future__ import annotations

import filecmp
import tempfile
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor
from nodemesh.demo.emojivoto import emojis, generate
from nodemesh.demo.emojivoto.gen import Emoji_pb2, Voting_pb2


def test_generated_code_matches_proto() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_files = generate.generate(Path(tmp))
        assert {p.name for p in fresh_files} >= {"Emoji_pb2.py", "Emoji_pb2_grpc.py", "Voting_pb2.py",
                                                 "Voting_pb2_grpc.py"}
        for fresh in Path(tmp).iterdir():
            committed = generate.GEN_DIR / fresh.name
            assert committed.exists(), f"{committed} missing: run python -m nodemesh.demo.emojivoto.generate"
            assert filecmp.cmp(fresh, committed, shallow=False), (
                f"{committed.name} is stale: run python -m nodemesh.demo.emojivoto.generate")


def _fields(message: type) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in message.DESCRIPTOR.fields}


def test_messages_are_wire_compatible_with_upstream() -> None:
    # Field numbers and types are what goes on the wire; these are upstream's Emoji.proto/Voting.proto.
    string, int32, message = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_MESSAGE
    assert Emoji_pb2.DESCRIPTOR.package == "emojivoto.v1"
    assert Voting_pb2.DESCRIPTOR.package == "emojivoto.v1"
    assert _fields(Emoji_pb2.Emoji) == {"unicode": (1, string, False), "shortcode": (2, string, False)}
    assert _fields(Emoji_pb2.ListAllEmojiRequest) == {}
    assert _fields(Emoji_pb2.ListAllEmojiResponse) == {"list": (1, message, True)}
    assert _fields(Emoji_pb2.FindByShortcodeRequest) == {"Shortcode": (1, string, False)}
    assert _fields(Emoji_pb2.FindByShortcodeResponse) == {"Emoji": (1, message, False)}
    assert _fields(Voting_pb2.VotingResult) == {"Shortcode": (1, string, False), "Votes": (2, int32, False)}
    assert _fields(Voting_pb2.VoteRequest) == {} and _fields(Voting_pb2.VoteResponse) == {}
    assert _fields(Voting_pb2.ResultsResponse) == {"results": (1, message, True)}


def test_services_have_upstream_method_paths() -> None:
    emoji = Emoji_pb2.DESCRIPTOR.services_by_name["EmojiService"]
    assert emoji.full_name == "emojivoto.v1.EmojiService"
    assert [m.name for m in emoji.methods] == ["ListAll", "FindByShortcode"]
    voting = Voting_pb2.DESCRIPTOR.services_by_name["VotingService"]
    assert voting.full_name == "emojivoto.v1.VotingService"
    names = [m.name for m in voting.methods]
    # Upstream: 100 Vote<Name> RPCs (one per listed emoji, plus VoteRelaxed) and Results.
    assert len(names) == 101 and names[-1] == "Results"
    assert "VoteDoughnut" in names and "Vote100" in names and "VoteStuckOutTongueWinkingEye" in names
    for m in voting.methods:
        if m.name.startswith("Vote"):
            assert m.input_type.full_name == "emojivoto.v1.VoteRequest"
            assert m.output_type.full_name == "emojivoto.v1.VoteResponse"


def test_every_listed_emoji_has_its_vote_method() -> None:
    declared = {m.name for m in Voting_pb2.DESCRIPTOR.services_by_name["VotingService"].methods}
    assert len(emojis.EMOJI) == 99
    assert len({code for code, _ in emojis.EMOJI}) == 99, "shortcodes are unique"
    for code, unicode in emojis.EMOJI:
        assert code.startswith(":") and code.endswith(":") and unicode
        assert emojis.vote_method(code) in declared, code
        assert emojis.shortcode_of_method(emojis.vote_method(code)) == code


def test_emoji_lookup() -> None:
    assert emojis.find_by_shortcode(":doughnut:") == "\U0001f369"
    assert emojis.find_by_shortcode(":poop:") == "\U0001f4a9"
    assert emojis.find_by_shortcode(":relaxed:") is None  # declared by the proto, not in the list
    assert emojis.EMOJI[:3] == ((":joy:", "\U0001f602"), (":sunglasses:", "\U0001f60e"), (":doughnut:", "\U0001f369"))
