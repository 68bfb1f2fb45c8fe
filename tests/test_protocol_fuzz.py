"""A bounded protocol fuzzer against a real fleet server (issue "fleet server under faults and attacks").

A deterministic dictionary pass (every weird id, version, file name, dtype and shape once) and then a few
hundred seeded random sessions on every RPC, with valid tokens and sometimes bad ones: valid messages
mutated field by field (huge and negative numbers, NaN and infinity, unknown dtypes, ids with '/' and
'..', 20 kB strings) and byte by byte (bit flips, truncation, random bytes, fields of the wrong wire
type, two oneof kinds merged), sent as raw bytes. Meanwhile a good robot streams episodes. The server must
answer every piece of garbage with a status that names a client error (never INTERNAL or UNKNOWN), keep
answering AdminService.Status, keep its log free of tracebacks, and store the good robot's episodes
exactly. See tests/fleet_harness.py:Fuzzer.
"""

from tests.fleet_harness import run_fuzz

SESSIONS = 300
SEED = 20260317
MAX_WARNINGS = (
    12  # rate-limited refusals (undecodable bytes, claimed interventions): a handful, not one per message
)


def test_protocol_fuzz_gets_client_errors_and_leaves_the_good_robot_alone(tmp_path):
    report = run_fuzz(tmp_path, sessions=SESSIONS, seed=SEED, log=print)
    print(f"fuzz figures: {report.line()}")
    print("statuses:", dict(sorted(report.statuses.items())))
    print("operator errors:", dict(report.operator_errors))
    print("server warnings:", dict(report.warning_kinds))

    assert report.sessions == SESSIONS + report.corpus_sessions and report.messages > SESSIONS
    # Only client-error statuses: INTERNAL or UNKNOWN would be a handler's bug, DEADLINE_EXCEEDED a hang.
    assert not report.disallowed, report.disallowed
    # Errors never echo a client's 20 kB string whole (the client would get a metadata-size error instead).
    assert not report.oversized_details, report.oversized_details
    assert report.codes()["INVALID_ARGUMENT"] > 0 and report.codes()["OK"] > 0
    # The server kept answering its admin, with a healthy writer.
    assert report.status_checks > 10 and not report.status_failures, report.status_failures
    # No traceback for garbage; at most a handful of (rate-limited) warnings. Protective stops that fuzz
    # operators engage or release are logged by design (any operator may engage one).
    assert report.tracebacks == 0, "\n\n".join(report.traceback_samples)
    refusals = sum(n for kind, n in report.warning_kinds.items() if "protective stop" not in kind)
    assert refusals <= MAX_WARNINGS, report.warning_kinds
    # The good robot never noticed: every episode it ended is in the store, exactly, once.
    assert report.good_error == ""
    assert report.good_check.ok, report.good_check.summary()
    assert report.good_episodes == report.good_check.episodes_expected > 0
