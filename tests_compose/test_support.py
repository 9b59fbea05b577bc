"""The end-to-end suite is a good neighbour: short failures, ports that are free."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from compose_support import ENV, HTTPS_PORT, TCP_PORT, sh


def test_a_failed_command_is_reported_by_its_useful_line_with_the_whole_output_kept() -> None:
    build = 'for i in $(seq 2000); do echo "Step $i/2000 : RUN something"; done;'
    build += " echo 'ERROR: failed to solve: base image not found' >&2; echo 'cleaning up'; exit 3"
    with pytest.raises(AssertionError) as failed:
        sh("sh", "-c", build)
    message = str(failed.value)
    assert "ERROR: failed to solve: base image not found" in message
    assert len(message) < 400 and "Step 1999" not in message
    log = Path(re.search(r"whole output: (\S+)\)", message)[1])  # type: ignore[index]
    assert "Step 1999/2000" in log.read_text()


def test_the_host_ports_come_from_the_environment_or_are_picked_free() -> None:
    assert ENV["MTLSPROXY_HTTPS_PORT"] == str(HTTPS_PORT) != str(TCP_PORT)
    if "MTLSPROXY_HTTPS_PORT" not in os.environ:
        assert HTTPS_PORT not in (8443, 28443)  # neither the quick start's nor a fixed one
