"""An embedded MQTT broker (amqtt) for machines without Mosquitto; used by `edgekit demo` only.

``python -m edge_kit.sim.embedded_broker --port N [--host A]`` serves anonymous MQTT 3.1.1 on A:N (127.0.0.1)
until SIGTERM. It has no persistence, auth or TLS: a convenience for the demo, not for a fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
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
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
