"""Client admission by allow/deny lists (issue 16): merged intervals and a bisect per
check, with exactly the answers of the linear scan it replaced.

- the linear scan, copied here as it was (``LinearAdmission``), is the oracle: random
  lists (IPv4 and IPv6, overlapping, nested, host bits, /0, /32, /128, odd
  spellings) and random clients, the edges of every network included, get the
  same answer from both, with hypothesis and with seeded bulk runs;
- the fast entry parser (``network_span``) agrees with ``ipaddress`` on every input,
  accepted or refused, and the fast client reader with ``client_ip``;
- the rules of SPEC §4 one by one: empty allow admits everyone, deny wins, IPv4-mapped
  clients are IPv4, host bits in entries, a family absent from a non-empty allow is
  refused, an unreadable client address is refused once there are lists;
- the work of one check does not grow with the list (function calls counted, no
  clock), where the linear scan's grows with every entry;
- end to end, gportmap with a 100,000-entry deny list passes ``--check``, starts,
  forwards a client the list does not cover and refuses (``acl``) one it does.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from conftest import LOOPBACK, connect, free_port, recv_exactly, recv_until_eof, tcp_rule
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gportmap.security import Admission, client_ip, client_key, network_span

# --- the oracle: the linear scan as it was before issue 16 ---------------------------


def _linear_client_ip(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = address[0] if isinstance(address, tuple) else address
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class LinearAdmission:
    """gportmap.security.Admission before issue 16, verbatim but for names."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allow)
        self.deny = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in deny)
        self.open = not self.allow and not self.deny

    def admits(self, address: object) -> bool:
        if self.open:
            return True
        ip = _linear_client_ip(address)
        if ip is None:
            return False
        if any(ip in net for net in self.deny if net.version == ip.version):
            return False
        return not self.allow or any(ip in net for net in self.allow if net.version == ip.version)


# --- spellings of networks and of client addresses ------------------------------------

BITS = {4: 32, 6: 128}
#: Addresses lists and clients cluster around, so that networks overlap and nest.
ANCHORS = {
    4: [0, 0x7F000001, 0x0A000000, 0xC0A80101, 0xFFFFFFFF],
    6: [0, 1, 0x20010DB8 << 96, 0xFFFF << 32 | 0x7F000001, (1 << 128) - 1],
}
PREFIX_FAVOURITES = {4: [0, 1, 8, 16, 24, 31, 32], 6: [0, 1, 32, 64, 96, 120, 127, 128]}


def address_text(version: int, value: int) -> str:
    return str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))


def random_address(rnd: random.Random, version: int) -> int:
    """Near an anchor, or anywhere."""
    bits = BITS[version]
    if rnd.random() < 0.6:
        spread = 1 << rnd.choice([0, 4, 8, 16, bits // 2, bits])
        value = rnd.choice(ANCHORS[version]) + rnd.randrange(-spread, spread + 1)
        return min(max(value, 0), (1 << bits) - 1)
    return rnd.getrandbits(bits)


def network_text(rnd: random.Random, version: int, value: int, prefix: int) -> str:
    """``value/prefix`` with its host bits left in, spelled as users write it."""
    bits = BITS[version]
    host = address_text(version, value)
    style = rnd.random()
    if prefix == bits and style < 0.3:
        return host  # a bare address: /32 or /128
    if version == 4 and style < 0.4:
        hostmask = (1 << (bits - prefix)) - 1
        if style < 0.35 or prefix in (0, bits):  # 0.0.0.0 and 255.255.255.255 read as netmasks
            return f"{host}/{ipaddress.IPv4Address(((1 << bits) - 1) ^ hostmask)}"  # netmask form
        return f"{host}/{ipaddress.IPv4Address(hostmask)}"  # hostmask form (Cisco ACLs)
    if version == 6 and style < 0.4:
        return f"{ipaddress.IPv6Address(value).exploded.upper()}/{prefix}"
    if style < 0.45:
        return f" {host}/0{prefix} "  # blanks and a leading zero: ipaddress takes both
    return f"{host}/{prefix}"


def random_network(rnd: random.Random, shortest: float = 0.0) -> str:
    """A network of either family with a prefix of at least ``shortest`` of the
    family's bits (0.25: IPv4 /8 and IPv6 /32 at the shortest)."""
    version = rnd.choice([4, 4, 6])
    bits = BITS[version]
    low = int(bits * shortest)
    favourites = [p for p in PREFIX_FAVOURITES[version] if p >= low]
    prefix = rnd.choice(favourites) if rnd.random() < 0.5 else rnd.randrange(low, bits + 1)
    return network_text(rnd, version, random_address(rnd, version), prefix)


def supernet(rnd: random.Random, text: str) -> str:
    """A network 1 to 8 bits shorter around the entry ``text``."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    return str(net.supernet(prefixlen_diff=min(rnd.randint(1, 8), net.prefixlen)))


def edges(entries: Iterable[str]) -> Iterator[tuple[int, int]]:
    """(version, address) of the first and last address of every network, and one
    below and one above, within the family."""
    for text in entries:
        net = ipaddress.ip_network(text.strip(), strict=False)
        top = (1 << BITS[net.version]) - 1
        first, last = int(net.network_address), int(net.broadcast_address)
        for value in (first - 1, first, last, last + 1):
            if 0 <= value <= top:
                yield net.version, value


def client_spellings(version: int, value: int) -> list[object]:
    """Socket addresses as listeners report them: (host, port) for IPv4, (host, port,
    flowinfo, scope) for IPv6, an IPv4 client of a dual-stack listener as
    ``::ffff:a.b.c.d``, and the rarer spellings of the same address."""
    host = address_text(version, value)
    if version == 4:
        return [
            (host, 40000),
            (f"::ffff:{host}", 40000, 0, 0),
            (f"::ffff:{value >> 16:x}:{value & 0xFFFF:x}", 1, 0, 0),
        ]
    return [
        (host, 40000, 0, 0),
        (f"{host}%lo", 40000, 0, 1),
        (ipaddress.IPv6Address(value).exploded.upper(), 1, 0, 0),
    ]


#: Clients no address parser makes sense of.
UNREADABLE = [
    "",
    "not-an-ip",
    ("", 0),
    (b"127.0.0.1", 1),
    ("127.0.0.1\0", 1),
    ("01.2.3.4", 1),
    (None, 0),
    ("\u0661.2.3.4", 1),
]


def assert_same_answers(allow: list[str], deny: list[str], clients: Iterable[object]) -> list[bool]:
    """Both implementations answer every client alike; the answers, in order."""
    new, old = Admission(allow, deny), LinearAdmission(allow, deny)
    assert new.open == old.open
    answers = []
    for client in clients:
        answer = new.admits(client)
        assert answer == old.admits(client), (client, allow, deny)
        answers.append(answer)
    return answers


# --- against the oracle ---------------------------------------------------------------


@st.composite
def entry_lists(draw: st.DrawFn) -> list[str]:
    seed = draw(st.integers(0, 2**32))
    count = draw(st.integers(0, 12))
    rnd = random.Random(seed)
    return [random_network(rnd) for _ in range(count)]


@pytest.mark.slow  # 300 generated examples
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allow=entry_lists(), deny=entry_lists(), seed=st.integers(0, 2**32))
@example(allow=[], deny=[], seed=0)
@example(allow=["10.0.0.0/8"], deny=["10.1.2.3/16"], seed=0)
@example(allow=["::/0"], deny=["0.0.0.0/0"], seed=0)
@example(allow=["::ffff:0:0/96"], deny=[], seed=0)  # a v6 entry for mapped space: never an IPv4 client
def test_same_answers_as_the_linear_scan(allow: list[str], deny: list[str], seed: int) -> None:
    """Short lists of anything, every edge, every spelling of a client."""
    rnd = random.Random(seed)
    points = list(edges(allow + deny)) + [(v, random_address(rnd, v)) for v in (4, 6) for _ in range(4)]
    clients = [spelling for version, value in points for spelling in client_spellings(version, value)]
    assert_same_answers(allow, deny, clients + UNREADABLE)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.slow
def test_same_answers_as_the_linear_scan_for_long_lists(seed: int) -> None:
    """Hundreds of entries a list: merging at scale (chains of overlaps, adjacency,
    nesting many deep) and the edges of every entry."""
    rnd = random.Random(seed)
    deny = [random_network(rnd, shortest=0.75) for _ in range(1000)]
    # allow: random networks, and supernets of deny entries (deny nested in allow)
    allow = [random_network(rnd, shortest=0.25) for _ in range(100)] + [
        supernet(rnd, text) for text in rnd.sample(deny, 200)
    ]
    if seed == 1:
        allow = []
    # adjacent /24s, a /20 that swallows some, a /25 nested in one: merged spans
    deny += [f"198.51.{i}.0/24" for i in range(0, 40, 1)] + ["198.51.0.0/20", "198.51.100.128/25"]
    points = list(edges(allow + deny)) + [(v, random_address(rnd, v)) for v in (4, 6) for _ in range(500)]
    answers = assert_same_answers(allow, deny, [client_spellings(v, value)[0] for v, value in points])
    assert min(answers.count(True), answers.count(False)) > len(answers) / 10  # both answers, often


# --- the fast paths agree with ipaddress --------------------------------------------


def reference_span(text: str) -> tuple[int, int, int] | None:
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), int(net.broadcast_address)


def fast_span(text: str) -> tuple[int, int, int] | None:
    try:
        return network_span(text)
    except ValueError:
        return None


NETWORKISH = st.text(alphabet="0123456789abcdefABCDEF:./% \u0661x", max_size=48)


@pytest.mark.slow  # 1,500 generated examples
@settings(max_examples=1500, deadline=None)
@given(text=NETWORKISH | st.text(max_size=48))
@example(text="1.2.3.4/08")
@example(text="1.2.3.4/33")
@example(text="1.2.3.04")
@example(text="1:2:3:4:5:6:7::")
@example(text="1:2:3:4:5:6:7::8")
@example(text="::/129")
@example(text="::ffff:1.2.3.4/104")
@example(text="fe80::1%eth0/64")
@example(text="12")
def test_network_span_reads_every_text_as_ipaddress_does(text: str) -> None:
    assert fast_span(text) == reference_span(text)


def mutated(rnd: random.Random, text: str) -> str:
    """``text`` with one character inserted, dropped or replaced: the near misses
    where two parsers part ways, if anywhere."""
    i = rnd.randrange(len(text) + 1)
    char = rnd.choice("0123456789aAfF:./% ")
    return rnd.choice([text[:i] + char + text[i:], text[:i] + text[i + 1 :], text[:i] + char + text[i + 1 :]])


@pytest.mark.slow  # generated examples
def test_network_span_reads_generated_networks_as_ipaddress_does() -> None:
    """Well-formed entries mostly take the fast path, near misses must not: 20,000
    of each."""
    rnd = random.Random(7)
    for _ in range(20_000):
        text = random_network(rnd)
        assert fast_span(text) == reference_span(text), text
        near = mutated(rnd, text.strip())
        assert fast_span(near) == reference_span(near), near


def reference_key(address: object) -> tuple[int, int] | None:
    ip = _linear_client_ip(address)
    return None if ip is None else (ip.version, int(ip))


@settings(max_examples=1000, deadline=None)
@given(host=NETWORKISH | st.text(max_size=48))
@example(host="::ffff:1.2.3.4")
@example(host="::FFFF:1.2.3.4")
@example(host="::ffff:7f00:1")
@example(host="::ffff:01.2.3.4")
@example(host="::ffff:::ffff:1.2.3.4")
@example(host="fe80::1%eth0")
def test_client_key_reads_every_host_as_client_ip_does(host: str) -> None:
    for address in ((host, 1), (host, 1, 0, 0), host):
        assert client_key(address) == reference_key(address)


def test_client_key_reads_generated_clients_as_client_ip_does() -> None:
    rnd = random.Random(8)
    for _ in range(5_000):
        version = rnd.choice([4, 6])
        for address in client_spellings(version, random_address(rnd, version)):
            assert client_key(address) == reference_key(address), address
            near = (mutated(rnd, address[0]), *address[1:])
            assert client_key(near) == reference_key(near), near


def test_client_ip_is_unchanged() -> None:
    assert client_ip(("::ffff:10.1.2.3", 1, 0, 0)) == ipaddress.ip_address("10.1.2.3")
    assert client_ip(("fe80::1%lo", 1, 0, 0)) == ipaddress.ip_address("fe80::1")
    assert client_ip(("nope", 1)) is None


# --- the rules, case by case ------------------------------------------------------------

V4 = ("10.1.2.3", 5000)
V6 = ("2001:db8::7", 5000, 0, 0)
MAPPED = ("::ffff:10.1.2.3", 5000, 0, 0)


@pytest.mark.parametrize(
    ("allow", "deny", "client", "admitted"),
    [
        pytest.param([], [], V4, True, id="no lists: everyone"),
        pytest.param([], [], "not-an-ip", True, id="no lists: even an unreadable address"),
        pytest.param([], ["192.0.2.0/24"], V4, True, id="empty allow admits what deny does not cover"),
        pytest.param(["10.0.0.0/8"], ["10.1.0.0/16"], V4, False, id="deny wins over allow"),
        pytest.param(["10.0.0.0/8"], ["10.2.0.0/16"], V4, True, id="allow admits outside deny"),
        pytest.param([], ["10.0.0.0/8"], MAPPED, False, id="mapped client is IPv4 for deny"),
        pytest.param(["10.0.0.0/8"], [], MAPPED, True, id="mapped client is IPv4 for allow"),
        pytest.param([], ["::ffff:0:0/96"], MAPPED, True, id="mapped client is not in v6 mapped space"),
        pytest.param([], ["10.0.0.0/8"], ("::ffff:a01:203", 1, 0, 0), False, id="mapped in hex too"),
        pytest.param([], ["10.99.99.99/8"], ("10.255.255.255", 1), False, id="host bits: last address"),
        pytest.param([], ["10.99.99.99/8"], ("11.0.0.0", 1), True, id="host bits: one above"),
        pytest.param([], ["10.99.99.99/8"], ("9.255.255.255", 1), True, id="host bits: one below"),
        pytest.param(["10.0.0.0/8"], [], V6, False, id="allow without v6 entries refuses v6"),
        pytest.param(["::/0"], [], V4, False, id="allow without v4 entries refuses v4"),
        pytest.param([], ["0.0.0.0/0"], ("255.255.255.255", 1), False, id="v4 /0 covers all v4"),
        pytest.param([], ["0.0.0.0/0"], V6, True, id="v4 /0 covers no v6"),
        pytest.param([], ["::/0"], V6, False, id="v6 /0 covers all v6"),
        pytest.param([], ["127.0.0.1"], ("127.0.0.1", 1), False, id="/32 covers itself"),
        pytest.param([], ["127.0.0.1/32"], ("127.0.0.2", 1), True, id="/32 covers nothing above"),
        pytest.param([], ["127.0.0.1/32"], ("127.0.0.0", 1), True, id="/32 covers nothing below"),
        pytest.param([], ["2001:db8::7/128"], V6, False, id="/128 covers itself"),
        pytest.param([], ["2001:db8::8"], V6, True, id="/128 covers nothing else"),
        pytest.param(
            [], ["10.0.0.0/31", "10.0.0.3"], ("10.0.0.2", 1), True, id="a one-address gap stays open"
        ),
        pytest.param(
            [], ["10.0.0.0/31", "10.0.0.2/31"], ("10.0.0.2", 1), False, id="adjacent networks both count"
        ),
        pytest.param(
            [],
            ["10.0.0.0/8", "10.1.0.0/16"],
            ("10.2.0.0", 1),
            False,
            id="a nested entry leaves its outer one",
        ),
        pytest.param(["::1", "::3"], [], ("::2", 1, 0, 0), False, id="a one-address gap in v6"),
        pytest.param(["10.0.0.0/8"], [], "not-an-ip", False, id="allow: unreadable refused"),
        pytest.param([], ["192.0.2.0/24"], ("", 0), False, id="deny: unreadable refused"),
        pytest.param([], ["192.0.2.0/24"], (b"10.1.2.3", 1), False, id="deny: bytes host refused"),
    ],
)
def test_the_rules_of_admission(allow: list[str], deny: list[str], client: object, admitted: bool) -> None:
    assert LinearAdmission(allow, deny).admits(client) is admitted  # the table is the old contract
    assert Admission(allow, deny).admits(client) is admitted


def test_an_entry_that_is_no_network_is_a_value_error() -> None:
    """The config check refuses these before a rule starts; built directly, the
    error is ipaddress's own."""
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        Admission(deny=["10.0.0.0/33"])


def test_open_only_without_entries() -> None:
    assert Admission().open and Admission([], []).open
    assert not Admission(["::1"]).open and not Admission(deny=["10.0.0.0/8"]).open


# --- the work of a check does not grow with the list ---------------------------------


def calls_in(check: object, address: object) -> int:
    """Function calls (Python and built-in) made by one ``check(address)``: a count of
    work that no machine load changes."""
    counted = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal counted
        if event in ("call", "c_call"):
            counted += 1

    sys.setprofile(count)
    try:
        check(address)
    finally:
        sys.setprofile(None)
    return counted


def long_deny_list(count: int, seed: int = 11) -> list[str]:
    """``count`` IPv4 networks (/16 to /32) that leave 127.0.0.0/8 alone."""
    rnd = random.Random(seed)
    entries = []
    while len(entries) < count:
        first = rnd.randrange(1, 224)
        if first != 127:
            prefix = rnd.choice([16, 24, 28, 32, 32, 32])
            entries.append(f"{first}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}/{prefix}")
    return entries


def test_a_check_costs_the_same_for_ten_entries_and_a_hundred_thousand() -> None:
    client = (LOOPBACK, 40000)
    short, long = long_deny_list(10), long_deny_list(100_000)
    # The measure can fail: the linear scan's work grows with its list.
    assert calls_in(LinearAdmission(deny=long[:2000]).admits, client) > 10 * calls_in(
        LinearAdmission(deny=short).admits, client
    )
    assert long[:10] == short  # so an address short denies, long denies too
    blocked = (short[0].split("/")[0], 40000)
    for allow in ([], ["127.0.0.0/8", "::1"]):
        few, many = Admission(allow, short), Admission(allow, long)
        assert few.admits(client) and many.admits(client)
        assert calls_in(many.admits, client) == calls_in(few.admits, client)
        assert not few.admits(blocked) and not many.admits(blocked)
        assert calls_in(many.admits, blocked) == calls_in(few.admits, blocked)


# --- end to end -------------------------------------------------------------------------


def write_rules(path: Path, port: int, target_port: int, deny: list[str]) -> None:
    rules = {"settings": {"watch": False}, "rules": [tcp_rule(port, target_port, name="big-deny", deny=deny)]}
    path.write_text(json.dumps(rules))


@pytest.mark.parametrize("covered", [False, True], ids=["client-not-listed", "client-listed"])
@pytest.mark.slow
def test_a_hundred_thousand_entry_deny_list_starts_and_decides(
    tmp_path, start_gportmap, echo_target, covered
):
    """100,000 entries, IPv4 and IPv6; in the second variant one entry in the middle,
    written with host bits, covers 127.0.0.1."""
    deny = long_deny_list(99_000) + [f"2001:db8:{i:x}::/48" for i in range(1000)]
    random.Random(5).shuffle(deny)
    if covered:
        deny[50_000] = "127.9.9.9/8"
    assert len(deny) == 100_000
    port = free_port()
    rules = tmp_path / "big.json"
    write_rules(rules, port, echo_target.port, deny)

    check = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(rules)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert "1 rule(s), valid" in check.stdout

    gp = start_gportmap(None, rules_path=rules, wait=False)
    gp.wait_started(timeout=120)
    with connect(port) as sock:
        if covered:
            assert recv_until_eof(sock) == b""
        else:
            sock.sendall(b"through")
            assert recv_exactly(sock, 7) == b"through"
    stats = next(rule for rule in gp.admin_json("/stats")["rules"] if rule["name"] == "big-deny")
    assert stats["connections"]["rejected_by_reason"].get("acl", 0) == (1 if covered else 0)
    assert echo_target.accepted == (0 if covered else 1)
