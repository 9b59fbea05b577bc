"""``mtlsproxy serve``: one proxy process, or a supervisor of ``workers`` of them."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from mtlsproxy.config import Config
from mtlsproxy.server import workers
from mtlsproxy.server.proxy import Proxy

log = logging.getLogger("mtlsproxy")


def serve(
    config: Config, config_path: str, log_level: str = "info", log_format: str | None = None
) -> int:
    count = workers.resolve(config.workers)
    index = workers.worker_index()
    if count > 1 and index is None:
        Proxy(config, config_path)  # prove every file here, before any worker starts
        return workers.supervise(count, Path(config_path), log_level, log_format)
    proxy = Proxy(config, config_path, worker=index)
    trio.run(_main, proxy)
    log.info("stopped")
    return 0


async def _main(proxy: Proxy) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.watch_signals)
        await proxy.run()
        nursery.cancel_scope.cancel()
