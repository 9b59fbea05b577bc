"""``mtlsproxy serve``: run a Proxy under trio until a signal drains it."""

from __future__ import annotations

import logging

import trio

from mtlsproxy.config import Config
from mtlsproxy.server.proxy import Proxy

log = logging.getLogger("mtlsproxy")


def serve(config: Config, config_path: str) -> int:
    proxy = Proxy(config, config_path)  # proves every file before anything is bound
    trio.run(_main, proxy)
    log.info("stopped")
    return 0


async def _main(proxy: Proxy) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.watch_signals)
        await proxy.run()
        nursery.cancel_scope.cancel()
