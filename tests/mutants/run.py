"""Deliberate bugs, each breaking one documented promise, and the tests that
must notice: applies each to a scratch copy of the repository, runs the tests
named for it and prints caught or missed (docs/development.md, "Mutants").

    .venv/bin/python tests/mutants/run.py              # every mutant
    .venv/bin/python tests/mutants/run.py NAME ...     # some (see --list)
    .venv/bin/python tests/mutants/run.py --list

Not part of the suite (it runs the suite's slow tests once per mutant). A
mutant whose text no longer occurs exactly once in its file says so: the code
moved, and the mutant needs rewriting to break the same promise again. Exit 0
only when every mutant run was caught.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 900  # seconds for one mutant's tests; a hang counts as caught (CI would stop)


TEST_PROCESSES = "tests/server/test_workers.py"
TEST_CALLS = "tests/client/test_calls.py"
TEST_PIPELINE = "tests/client/test_pipeline.py"
EVERY_CLAIM = (
    TEST_CALLS + "::test_every_claim_holds_under_concurrent_callers_timeouts_and_cancellation"
)


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: replace ``old`` (which must occur exactly once in
    ``path``) with ``new``; some test in ``tests`` must then fail."""

    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "replies-owed-at-shutdown",
        "every reply owed for an applied frame is sent during a graceful stop",
        "server/connection.py",
        "            if applied:\n",
        "            if applied and not watched.stopped:\n",
        (
            "tests/server/test_lifecycle.py::test_sigterm_under_load_loses_nothing_acknowledged",
            "tests/server/test_seams.py"
            "::test_a_rolling_restart_under_load_answers_every_frame_it_applied",
        ),
    ),
    Mutant(
        "shutdown-timeout-x5",
        "a stop takes at most --shutdown-timeout plus a small margin",
        "server/lifecycle.py",
        "if not self.pool.join(timeout=timeout):",
        "if not self.pool.join(timeout=timeout * 5):",
        ("tests/server/test_lifecycle.py::test_shutdown_timeout_cuts_a_client_that_never_reads",),
    ),
    Mutant(
        "second-sigint-exits-0",
        "a second SIGINT exits at once with status 128 + 2",
        "common/signals.py",
        "os._exit(128 + signum)",
        "os._exit(0 if signum == signal.SIGINT else 128 + signum)",
        ("tests/server/test_lifecycle.py::test_second_signal_exits_at_once",),
    ),
    Mutant(
        "crash-loop-never-gives-up",
        "after 10 young deaths in a row the supervisor gives up",
        "server/workers.py",
        "GIVE_UP_AFTER = 10 ",
        "GIVE_UP_AFTER = 10_000 ",
        (TEST_PROCESSES + "::test_workers_dying_young_again_and_again_make_it_give_up_and_exit_1",),
    ),
    Mutant(
        "crash-loop-exits-0",
        "a server that gave up on its workers exits 1",
        "server/run.py",
        "return 0 if not instance.failed else 1",
        "return 0",
        (TEST_PROCESSES + "::test_workers_dying_young_again_and_again_make_it_give_up_and_exit_1",),
    ),
    Mutant(
        "write-timeout-0-is-0s",
        "--write-timeout 0 means never",
        "server/cli.py",
        'write=seconds_or_off("--write-timeout"),',
        'write=value("--write-timeout", non_negative_float),',
        (
            "tests/server/test_protection.py::test_write_timeout_0_never_cuts_a_client_that_reads_late",
        ),
    ),
    Mutant(
        "tls-handshake-limit-an-hour",
        "with --frame-timeout 0 a TLS handshake still ends after 10 s",
        "server/lifecycle.py",
        "HANDSHAKE_TIMEOUT = 10.0",
        "HANDSHAKE_TIMEOUT = 3600.0",
        (
            "tests/server/test_availability.py"
            "::test_without_a_frame_timeout_a_silent_tls_handshake_ends_after_10s",
        ),
    ),
    Mutant(
        "library-pool-size-ignored",
        "CounterClient opens at most pool_size connections, shared by its callers",
        "client/library.py",
        "may_open = len(self._open) + self._opening < self._pool_size",
        "may_open = len(self._open) + self._opening < self._pool_size * 1000",
        (TEST_PIPELINE + "::test_forty_callers_share_two_connections_all_in_flight_at_once",),
    ),
    Mutant(
        "aio-pool-size-ignored",
        "AsyncCounterClient opens at most pool_size connections, shared by its tasks",
        "client/aio.py",
        "may_open = len(self._open) + self._opening < self._pool_size",
        "may_open = len(self._open) + self._opening < self._pool_size * 1000",
        (TEST_PIPELINE + "::test_forty_callers_share_two_connections_all_in_flight_at_once",),
    ),
    Mutant(
        "read-tried-once",
        "the library tries read() up to 3 times, each on a fresh connection",
        "client/calls.py",
        "READ_ATTEMPTS = 3 ",
        "READ_ATTEMPTS = 1 ",
        (
            "tests/client/test_library.py::test_read_is_tried_three_times_on_fresh_connections",
            "tests/client/test_aio.py::test_read_is_tried_three_times_on_fresh_connections",
        ),
    ),
    Mutant(
        "redis-resends-after-timeout",
        "Redis: a round trip whose outcome is unknown is never sent again",
        "server/store/redis_backend.py",
        "            except redis.ResponseError as exc:\n                return [exc]\n",
        "            except redis.ResponseError as exc:\n                return [exc]\n"
        "            except redis.TimeoutError:\n"
        "                self._drop_connections()\n"
        "                connection = self._connection()\n"
        '                connection.send_command("INCRBY", self.key, total)\n'
        "                return [connection.read_response()]\n",
        (
            "tests/server/store/test_redis_faults.py"
            "::test_a_round_trip_redis_did_not_answer_in_time_is_never_sent_again",
        ),
    ),
    Mutant(
        "stuck-worker-kept-waiting",
        "with --processes, a worker still running 5 s after the timeout is killed",
        "server/workers.py",
        "self.supervisor.stop(self.settings.shutdown_timeout + 5)",
        "self.supervisor.stop(self.settings.shutdown_timeout + 50)",
        (
            TEST_PROCESSES
            + "::test_a_worker_that_does_not_stop_is_killed_5s_after_the_shutdown_timeout",
        ),
    ),
    Mutant(
        "killed-workers-not-logged",
        "the log says how many workers did not stop in time",
        "server/workers.py",
        "        if killed:\n",
        "        if killed > 1:\n",
        (
            TEST_PROCESSES
            + "::test_a_worker_that_does_not_stop_is_killed_5s_after_the_shutdown_timeout",
        ),
    ),
    Mutant(
        "refusal-inferred",
        "the library claims Refused only when it is proven (SPEC 9)",
        "client/calls.py",
        " and value_now < lower + pending\n",
        "\n",
        (TEST_CALLS + "::test_an_applied_increment_near_the_top_is_never_called_refused",),
    ),
    Mutant(
        "fork-shares-connections",
        "after fork, a library client never uses a connection its process did not open",
        "client/library.py",
        "        if self._generation != PROCESS.generation:\n",
        "        if False:\n",
        (TEST_CALLS + "::test_after_fork_parent_and_child_each_get_their_own_replies",),
    ),
    Mutant(
        "batch-sent-whole",
        "a batch of any size streams (increment_many)",
        "client/calls.py",
        "IN_FLIGHT_FRAMES = 1024",
        "IN_FLIGHT_FRAMES = 1 << 30",
        (TEST_CALLS + "::test_a_million_increments_in_one_batch",),
    ),
    Mutant(
        "abandoned-call-forgotten",
        "a call that timed out or was cancelled keeps its place on a shared connection: "
        "its replies are dropped, never handed to the next call",
        "client/pipeline.py",
        "        if call.sent == 0 and call in self.unsent:\n"
        "            self.owed.remove(call)\n"
        "            self.unsent.remove(call)\n",
        "        if call in self.owed:\n"
        "            self.owed.remove(call)\n"
        "            if call in self.unsent:\n"
        "                self.unsent.remove(call)\n",
        (
            TEST_PIPELINE
            + "::test_a_withdrawn_call_is_never_sent_and_an_abandoned_one_keeps_its_place",
            TEST_PIPELINE + "::test_a_cancelled_callers_reply_is_dropped_and_its_connection_kept",
            EVERY_CLAIM,
        ),
    ),
    Mutant(
        "timed-out-connection-kept",
        "a connection on which a call timed out takes no new call (sync)",
        "client/library.py",
        "        call.abandoned, connection.usable = True, False\n",
        "        call.abandoned = True\n",
        (TEST_PIPELINE + "::test_a_timed_out_call_retires_its_connection",),
    ),
    Mutant(
        "aio-timed-out-connection-kept",
        "a connection on which a call timed out takes no new call (asyncio)",
        "client/aio.py",
        "                call.abandoned, self.usable = True, False\n",
        "                call.abandoned = True\n",
        (TEST_PIPELINE + "::test_a_timed_out_call_retires_its_connection",),
    ),
    Mutant(
        "lock-given-back-silently",
        "a worker that died holding the counter's lock is logged",
        "server/store/shared.py",
        "        log.error(\n",
        "        log.debug(\n",
        ("tests/server/store/test_shared.py",),
    ),
    Mutant(
        "write-limit-passes-late",
        "a timeout passes when its limit is reached, whatever the clock reads",
        "server/timeouts.py",
        "now - w._write_since >= write",
        "now - w._write_since > write",
        ("tests/server/test_timeouts.py",),
    ),
]


def applied_to(mutant: Mutant, root: Path) -> bool:
    """Apply ``mutant`` to the copy at ``root``; False if its text is not
    there exactly once."""
    path = root / mutant.path
    if not path.is_file():
        return False
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new))
    return True


def scratch_copy(into: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied under ``into``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    root = into / "repo"
    for name in filter(None, listed):
        source, target = REPO_ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # counter_server/server -> ../server, and its kin
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return root


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[str, float]:
    """Run ``tests`` in the copy: ("passed" | "failed" | "hung" | "error", seconds).
    pytest runs in a process group of its own, killed afterwards: a server a
    mutant kept from stopping does not outlive its run."""
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    pytest = subprocess.Popen(
        command, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = pytest.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "hung", time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pytest.pid, signal.SIGKILL)
        pytest.wait()
    elapsed = time.monotonic() - started
    outcome = {0: "passed", 1: "failed"}.get(pytest.returncode, "error")
    if outcome == "error":
        sys.stderr.write(output.decode(errors="replace")[-3000:])
    return outcome, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--no-baseline", action="store_true",
        help="skip running each mutant's tests on the unchanged code first",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:32} {mutant.promise}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"no such mutant: {', '.join(sorted(unknown))} (see --list)")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    all_caught = True
    print(f"{'mutant':32} {'result':24} {'seconds':>7}  first test named")
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix="mutant-") as scratch:
            root = scratch_copy(Path(scratch))
            if not args.no_baseline:
                outcome, _ = run_tests(root, mutant.tests)
                if outcome != "passed":
                    print(f"{mutant.name:32} {'baseline ' + outcome:24}")
                    all_caught = False
                    continue
            if not applied_to(mutant, root):
                print(f"{mutant.name:32} {'no longer applies':24}         {mutant.path}")
                all_caught = False
                continue
            outcome, elapsed = run_tests(root, mutant.tests)
        result = {"failed": "caught", "hung": "caught (hung)"}.get(outcome, f"MISSED ({outcome})")
        all_caught &= result.startswith("caught")
        print(f"{mutant.name:32} {result:24} {elapsed:7.1f}  {mutant.tests[0]}", flush=True)
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
