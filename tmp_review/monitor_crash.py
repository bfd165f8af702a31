"""Run `edgekit monitor` (the live table, not --json) of the tree in $PYTHONPATH against a real mosquitto while
one registered device publishes a well-signed status whose current variant holds a stray rich '[/]'."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.identity import Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.sim.broker import free_port
from edgekit_protocol import messages

d = Path(tempfile.mkdtemp()); port = free_port()
(d / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
broker = subprocess.Popen(["mosquitto", "-c", str(d / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
(d / "fleet.yaml").write_text(f"fleet: rev\nbroker: {{host: 127.0.0.1, port: {port}}}\n"
                              "defaults: {user: edgekit, profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
key = Signer.generate(); load_fleet(d / "fleet.yaml").key_store().register("d1", key.public)
mon = subprocess.Popen([sys.executable, "-m", "edge_kit", "monitor", "--fleet", str(d / "fleet.yaml"), "--duration", "6"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"})
time.sleep(2.5)
c = mqtt.Client(CallbackAPIVersion.VERSION2); c.connect("127.0.0.1", port); c.loop_start()
m = messages.envelope("status", "rev", "d1", 1, {"state": "online", "current": {"variant": sys.argv[1], "sha256": "a" * 64}})
c.publish(messages.topic("rev", "d1", "status"), messages.encode(key.sign(m)), qos=1, retain=True).wait_for_publish(5)
t0 = time.time(); o, e = mon.communicate(timeout=60)
print("exit", mon.returncode, f"after {time.time() - t0:.1f} s of the 6 s run"); print("stderr tail:", e.strip().splitlines()[-3:] if e.strip() else "")
print(repr(o.strip().splitlines()[-2:]))
c.loop_stop(); broker.terminate(); broker.wait()
