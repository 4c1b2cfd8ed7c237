"""SPEC §10, in-process: editing the rules file keeps its form, and writing it is atomic.

What these pin: an edit of one rule changes only that rule's text (the form, the
untouched rules' keys, order and formatting, the indentation, a BOM, the final
newline stay); merge patches follow RFC 7396; the file is replaced by a rename that
keeps its mode, follows a plain symlink and refuses a ConfigMap layout, a file
without write permission and a read-only mount, leaving no temporary file behind;
the applier serves a transaction alone, between coalesced reloads.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gevent
import pytest
from gevent.event import Event

from gportmap.config import parse
from gportmap.config.edit import (
    EditError,
    EditOp,
    EditProblem,
    NotWritable,
    RuleEdit,
    edit_rules,
    merge_patch,
    read_rules_text,
    write_atomically,
)
from gportmap.runtime.applier import Applier, OutcomeStatus, ReloadOutcome, ReloadRequest, ReloadSource
from gportmap.runtime.transaction import Transaction, etag_matches, parse_if_match


def rule(port: int, **extra) -> dict:
    return {
        "protocol": "tcp",
        "listenHost": "127.0.0.1",
        "listenPort": port,
        "targetHost": "127.0.0.1",
        "targetPort": 9,
        **extra,
    }


#: A hand-written file: an untouched rule on one line with unusual spacing, another
#: indented by 4, settings first, unicode kept as written, a final newline.
HAND_WRITTEN = """{
    "settings": {"drainTimeout": 1, "watch": false},
    "rules": [
        {"name":"one",  "protocol":"tcp", "listenPort":1001, "targetHost":"h\\u00e9", "targetPort":1},
        {
            "name": "two",
            "protocol": "tcp",
            "listenPort": 1002,
            "targetHost": "127.0.0.1",
            "targetPort": 2
        }
    ]
}
"""


def edit(text: str, op: EditOp, name: str | None = None, body=None) -> str:
    return edit_rules(text.encode(), RuleEdit(op, name, body), "rules.json").raw.decode()


def test_a_patch_changes_only_that_rule_and_keeps_the_rest_byte_for_byte():
    new = edit(HAND_WRITTEN, EditOp.PATCH, "two", {"enabled": False, "targetPort": None})
    before, after = HAND_WRITTEN.splitlines(), new.splitlines()
    assert after[:4] == before[:4], "settings and the untouched rule stay as written"
    assert after[4:11] == [
        "        {",
        '            "name": "two",',
        '            "protocol": "tcp",',
        '            "listenPort": 1002,',
        '            "targetHost": "127.0.0.1",',
        '            "enabled": false',
        "        }",
    ]
    assert after[11:] == before[11:] and new.endswith("}\n")
    assert json.loads(new)["rules"][1] == {
        "name": "two",
        "protocol": "tcp",
        "listenPort": 1002,
        "targetHost": "127.0.0.1",
        "enabled": False,
    }


def test_a_one_line_rule_stays_on_one_line_with_its_separators():
    new = edit(HAND_WRITTEN, EditOp.PATCH, "one", {"targetPort": 5})
    line = new.splitlines()[3]
    assert (
        line
        == '        {"name":"one", "protocol":"tcp", "listenPort":1001, "targetHost":"hé", "targetPort":5},'
    )
    assert new.splitlines()[4:] == HAND_WRITTEN.splitlines()[4:]


def test_an_added_rule_takes_the_style_of_the_last_one_and_the_form_stays():
    new = edit(HAND_WRITTEN, EditOp.ADD, body=rule(1003, name="three"))
    document = json.loads(new)
    assert list(document) == ["settings", "rules"]
    assert [r["name"] for r in document["rules"]] == ["one", "two", "three"]
    assert new.splitlines()[:10] == HAND_WRITTEN.splitlines()[:10]
    assert '        },\n        {\n            "protocol": "tcp",' in new
    compact = '[{"protocol":"tcp","listenPort":1,"targetHost":"h","targetPort":2}]'
    added = edit(compact, EditOp.ADD, body=rule(3))
    assert added.startswith(compact[:-1] + ',{"protocol":"tcp","listenHost":"127.0.0.1"')
    assert isinstance(json.loads(added), list), "the array form stays an array"


@pytest.mark.parametrize("unit", ["  ", "    ", "\t"])
def test_an_empty_list_gets_the_files_indentation(unit: str):
    text = json.dumps({"settings": {"watch": False}, "rules": []}, indent=unit) + "\n"
    new = edit(text, EditOp.ADD, body=rule(1))
    assert f'\n{unit}"rules": [\n{unit}{unit}{{\n{unit}{unit}{unit}"protocol": "tcp",' in new
    assert new.endswith(f"\n{unit}]\n}}\n")
    assert json.loads(new)["rules"] == [rule(1)]


@pytest.mark.parametrize("name, kept", [("one", ["two"]), ("two", ["one"])])
def test_a_delete_removes_exactly_that_rule(name: str, kept: list[str]):
    new = edit(HAND_WRITTEN, EditOp.DELETE, name)
    assert [r["name"] for r in json.loads(new)["rules"]] == kept
    assert new.startswith(
        HAND_WRITTEN.splitlines(keepends=True)[0] + HAND_WRITTEN.splitlines(keepends=True)[1]
    )
    only = edit(
        '[\n  {"protocol": "tcp", "listenPort": 1, "targetHost": "h", "targetPort": 2}\n]\n',
        EditOp.DELETE,
        "tcp-1",
    )
    assert only == "[]\n"


def test_a_rule_is_found_by_its_default_name_and_a_bom_is_kept():
    text = "\ufeff" + json.dumps([rule(80), rule(81, name="x")])
    result = edit_rules(text.encode(), RuleEdit(EditOp.PATCH, "tcp-80", {"enabled": False}), "r.json")
    assert result.raw.startswith("\ufeff".encode()) and result.name == "tcp-80"
    assert json.loads(result.raw.decode()[1:])[0]["enabled"] is False


def test_put_names_the_rule_after_the_url_and_refuses_another_name():
    new = edit_rules(json.dumps([rule(1)]).encode(), RuleEdit(EditOp.PUT, "web", rule(2)), "r.json")
    assert new.created and json.loads(new.raw)[1] == {"name": "web", **rule(2)}
    replaced = edit_rules(new.raw, RuleEdit(EditOp.PUT, "web", rule(3)), "r.json")
    assert not replaced.created and json.loads(replaced.raw)[1] == {"name": "web", **rule(3)}
    with pytest.raises(EditError) as info:
        edit_rules(new.raw, RuleEdit(EditOp.PUT, "web", rule(3, name="other")), "r.json")
    assert info.value.problem is EditProblem.INVALID and "'other' is not 'web'" in info.value.errors[0]


def test_refusals_say_why():
    raw = json.dumps([rule(1, name="a")]).encode()
    cases = [
        (
            RuleEdit(EditOp.ADD, None, rule(2, name="a")),
            EditProblem.EXISTS,
            "a rule named 'a' exists already",
        ),
        (RuleEdit(EditOp.PATCH, "nope", {}), EditProblem.NOT_FOUND, "no rule named 'nope'"),
        (RuleEdit(EditOp.DELETE, "nope"), EditProblem.NOT_FOUND, "no rule named 'nope'"),
        (
            RuleEdit(EditOp.ADD, None, [rule(2)]),
            EditProblem.INVALID,
            "a rule must be a JSON object, not an array",
        ),
        (
            RuleEdit(EditOp.PATCH, "a", 5),
            EditProblem.INVALID,
            "a merge patch of a rule must be a JSON object",
        ),
    ]
    for request, problem, words in cases:
        with pytest.raises(EditError) as info:
            edit_rules(raw, request, "r.json")
        assert info.value.problem is problem and words in info.value.errors[0], request


def test_a_file_that_is_not_valid_json_is_never_edited():
    """A hand edit left a key twice: json would keep one silently; the edit is refused
    with what --check says about the file."""
    raw = b'[{"protocol": "tcp", "listenPort": 1, "listenPort": 2, "targetHost": "h", "targetPort": 3}]'
    with pytest.raises(EditError) as info:
        edit_rules(raw, RuleEdit(EditOp.ADD, None, rule(5)), "r.json")
    assert info.value.errors[0] == "the rules file as it is now cannot be edited:"
    assert (
        "r.json: rules[0].listenPort: duplicate key (a key may appear only once in an object)"
        in info.value.errors
    )


def test_merge_patch_follows_rfc_7396_appendix_a():
    cases = [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ]
    for target, patch, result in cases:
        assert merge_patch(target, patch) == result, (target, patch)
    assert list(merge_patch({"x": 1, "y": 2, "z": 3}, {"y": 5, "new": 1})) == ["x", "y", "z", "new"]


def test_every_edit_of_a_valid_file_reads_back_as_intended():
    """The splice is checked against the document it must produce; files of every
    shape round-trip through every operation."""
    shapes = [
        json.dumps([rule(1), rule(2)]),
        json.dumps([rule(1), rule(2)], indent=3),
        json.dumps({"rules": [rule(1), rule(2)], "settings": {"watch": False}}, indent="\t"),
        '{"rules":[' + json.dumps(rule(1)) + ",\n" + json.dumps(rule(2), indent=1) + "]}",
    ]
    for text in shapes:
        for op, name, body in [
            (EditOp.ADD, None, rule(3)),
            (EditOp.PUT, "tcp-1", rule(4)),
            (EditOp.PATCH, "tcp-2", {"listenHost": None, "allow": ["10.0.0.0/8"]}),
            (EditOp.DELETE, "tcp-1", None),
            (EditOp.DELETE, "tcp-2", None),
        ]:
            new = edit(text, op, name, body)
            parse(new, "r.json")  # valid
            before = read_rules_text(text.encode())
            after = read_rules_text(new.encode())
            assert after.form is before.form and after.settings == before.settings


# -- writing ---------------------------------------------------------------------------


def test_the_write_is_a_rename_that_keeps_the_mode_and_leaves_nothing_behind(tmp_path: Path):
    path = tmp_path / "rules.json"
    path.write_text("[]")
    path.chmod(0o640)
    inode = path.stat().st_ino
    write_atomically(str(path), b'[{"x": 1}]')
    assert path.read_bytes() == b'[{"x": 1}]'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode, "replaced by a rename, never rewritten in place"
    assert sorted(os.listdir(tmp_path)) == ["rules.json"]


def test_a_symlinked_file_is_written_where_it_leads_and_the_link_stays(tmp_path: Path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "rules.json"
    target.write_text("[]")
    link = tmp_path / "rules.json"
    link.symlink_to(target)
    write_atomically(str(link), b"[1]")
    assert link.is_symlink() and target.read_bytes() == b"[1]"


def configmap(folder: Path, content: bytes) -> Path:
    """The layout of a Kubernetes ConfigMap volume: rules.json -> ..data/rules.json,
    ..data -> ..2024_01_01_00_00_00.1/."""
    version = folder / "..2024_01_01_00_00_00.1"
    version.mkdir()
    (version / "rules.json").write_bytes(content)
    (folder / "..data").symlink_to(version.name)
    (folder / "rules.json").symlink_to("..data/rules.json")
    return folder / "rules.json"


def test_a_configmap_or_a_file_without_write_permission_is_refused_untouched(tmp_path: Path):
    (tmp_path / "cm").mkdir()
    path = configmap(tmp_path / "cm", b"[]")
    with pytest.raises(NotWritable, match="Kubernetes ConfigMap"):
        write_atomically(str(path), b"[1]")
    assert path.read_bytes() == b"[]"
    plain = tmp_path / "plain.json"
    plain.write_text("[]")
    plain.chmod(0o444)
    with pytest.raises(NotWritable, match=r"read-only \(mode 0444\)"):
        write_atomically(str(plain), b"[1]")
    assert plain.read_bytes() == b"[]"
    assert sorted(os.listdir(tmp_path)) == ["cm", "plain.json"]


def test_if_match_compares_strongly():
    digest = "ab" * 32
    assert etag_matches(None, digest)
    assert etag_matches(parse_if_match(f'"{digest}"'), digest)
    assert etag_matches(parse_if_match(f'"other", "{digest}"'), digest)
    assert etag_matches(parse_if_match("*"), digest)
    assert not etag_matches(parse_if_match(f'W/"{digest}"'), digest)
    assert not etag_matches(parse_if_match('"other"'), digest)


# -- the applier ---------------------------------------------------------------------------


def test_a_transaction_is_served_alone_between_coalesced_reloads():
    """Reloads before a write coalesce among themselves, the write is its own step,
    and reloads after it coalesce after it: arrival order, never across a write."""
    served: list[ReloadRequest] = []
    release = Event()

    def apply(request: ReloadRequest) -> ReloadOutcome:
        served.append(request)
        if len(served) == 1:
            release.wait()
        return ReloadOutcome(OutcomeStatus.APPLIED)

    applier = Applier(apply)
    applier.start()
    first = gevent.spawn(applier.submit, ReloadRequest(ReloadSource.SIGNAL), True)
    with gevent.Timeout(5):
        while not served:
            gevent.sleep(0.01)
    write = Transaction(RuleEdit(EditOp.DELETE, "x"))
    dry = Transaction(RuleEdit(EditOp.DELETE, "y"), dry_run=True)
    waiters = [
        gevent.spawn(applier.submit, ReloadRequest(ReloadSource.ADMIN), True),
        gevent.spawn(applier.submit, ReloadRequest(ReloadSource.ADMIN), True),
        gevent.spawn(applier.submit, ReloadRequest(ReloadSource.API, transaction=write), True),
        gevent.spawn(applier.submit, ReloadRequest(ReloadSource.API, transaction=dry), True),
        gevent.spawn(applier.submit, ReloadRequest(ReloadSource.ADMIN), True),
    ]
    gevent.sleep(0.01)
    applier.submit(
        ReloadRequest(ReloadSource.WATCHER, force=False)
    )  # nobody waits: merged with none of the writes
    release.set()
    gevent.joinall([first, *waiters], timeout=10)
    kinds = [request.transaction for request in served]
    assert kinds == [None, None, write, dry, None]
    assert [waiter.value.served for waiter in waiters] == [2, 2, 1, 1, 2]
    assert applier.applies == 4, "a dry run applies nothing"
