"""A consumer process for the disconnection tests: subscribes, says `ready ID`, then consumes
until killed. Run as: client_proc.py HOST PORT TOPIC SUBSCRIPTION TYPE NAME HEARTBEAT_MS ack|hold
(hold: subscribe to a reliable topic and never acknowledge)."""
import sys

from actorbroker.transport.client import Client


def main():
    host, port, topic, subscription, sub_type, name = sys.argv[1:7]
    heartbeat = int(sys.argv[7]) or None
    hold = sys.argv[8] == "hold"
    client = Client(host, int(port), heartbeat_ms=heartbeat, name=f"proc-{name}")
    consumer = client.subscribe(topic, subscription, sub_type, name,
                                dispatch="reliable" if hold else None)
    print("ready", consumer.id, flush=True)
    for msg in consumer:
        if not hold:
            consumer.ack(msg)


if __name__ == "__main__":
    main()
