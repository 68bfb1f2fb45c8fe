"""The fleet server killed with SIGKILL, again and again, while robots stream (issue "fleet server under
faults and attacks"): acknowledged means kept, every ended episode is committed exactly once, no robot
stops, and the store opens after every kill.

`flotilla serve` runs as a subprocess on a fixed port and a store in tmp_path; three RobotClients in this
process stream short episodes at 100 Hz each whose every value encodes (robot, episode, t). The server is
killed at seeded random moments and restarted on the same store (the clients reconnect by themselves and
resend what is not yet durable). See tests/fleet_harness.py:run_kill9; benchmarks/reliability.py quotes
the same figures over more kills.
"""

import pytest

from tests.fleet_harness import run_kill9

KILLS = 20
SEED = 20260317


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_server_survives_kill9_and_keeps_every_acknowledged_step(tmp_path):
    report = run_kill9(tmp_path, kills=KILLS, robots=3, seed=SEED, hz=100.0, steps=(5, 15), log=print)
    print(f"kill -9 figures: {report.line()}")
    output = "\n".join(
        f"--- server life {n} ---\n{life.output[-2000:]}" for n, life in enumerate(report.lives[-3:])
    )

    assert report.kills == KILLS
    assert not report.store_open_failures, report.store_open_failures
    assert not report.committed_regressions, report.committed_regressions
    assert report.robots_stopped == 0 and not report.client_errors, report.client_errors
    assert report.dropped_by_clients == 0
    assert report.final_exit_code == 0, output
    # Every episode a robot ended is in the store exactly once, with every value as sent, in order.
    assert report.check.ok, report.check.summary()
    assert report.episodes_committed == report.episodes_ended > 0
    assert report.duplicate_episodes == 0
    assert report.acked_steps == report.steps_sent  # all episodes ended: the last restart acked everything
    assert report.lost_acked_steps == 0
    assert report.at_risk_steps > 0  # the kills did hit steps that were acked but not yet committed
    assert report.server_tracebacks == 0, output
