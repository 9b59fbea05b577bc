"""`mtlsproxy ca show FILE | head -1`: a reader that stops early ends the command quietly."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from support import MTLSPROXY, Pair


@pytest.mark.parametrize("json", [False, True])
def test_ca_show_into_head_ends_without_a_traceback(
    tmp_path: Path, client_pair: Pair, json: bool
) -> None:
    # 600 certificates: far more output than a pipe holds, so the writer is still
    # writing when head has its line and leaves.
    bundle = tmp_path / "many.pem"
    bundle.write_bytes(client_pair.crt.read_bytes() * 300)
    args = [*MTLSPROXY, "ca", "show", str(bundle), *(["--json"] if json else [])]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as writer:
        assert writer.stdout is not None and writer.stderr is not None
        head = subprocess.run(
            ["head", "-1"], stdin=writer.stdout, capture_output=True, timeout=60, check=True
        )
        writer.stdout.close()  # head has gone: nobody reads any more
        errors = writer.stderr.read()
        code = writer.wait(timeout=60)
    first = head.stdout.decode()
    assert first.startswith('{"subject"' if json else "--- certificate 1 of 600"), first
    assert errors == b"", errors.decode()
    assert code == 128 + signal.SIGPIPE  # as a tool killed by SIGPIPE ends
