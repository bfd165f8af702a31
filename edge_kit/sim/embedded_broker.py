"""An embedded MQTT broker (amqtt) for machines without Mosquitto; used by `edgekit demo` only.

``python -m edge_kit.sim.embedded_broker --port N`` serves anonymous MQTT 3.1.1 on 127.0.0.1:N
until SIGTERM. It has no persistence, auth or TLS: a convenience for the demo, not for a fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                     "sys_interval": 0, "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                     "topic-check": {"enabled": False}})
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edge_kit.sim.embedded_broker")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
