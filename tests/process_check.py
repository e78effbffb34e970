"""pytest plugin (conftest loads it): the session fails if a test left a process running.

Orphans of the forked workers' children become this process's children (harness.adopt_orphans),
where the check sees them; under init they would outlive the run unseen. harness.run checks the
same after each call, naming the test; this catches the rest (a launcher's Popen, say)."""

import harness
import pytest

harness.adopt_orphans()


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Fail the session if a test left a process running (it is killed here, not left behind)."""
    before = set(harness.children())
    yield
    left = harness.kill_leftover_children(before)
    if left:
        pytest.fail(f"tests left processes running (killed now): {left}")
