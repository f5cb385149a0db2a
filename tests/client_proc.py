"""A consumer process for the disconnection tests: subscribes, says `ready ID`, then consumes
until killed. Run as: client_proc.py HOST PORT TOPIC SUBSCRIPTION TYPE NAME [HEARTBEAT_MS]"""
import sys

from transport.client import Client


def main():
    host, port, topic, subscription, sub_type, name = sys.argv[1:7]
    heartbeat = int(sys.argv[7]) if len(sys.argv) > 7 else None
    client = Client(host, int(port), heartbeat_ms=heartbeat, name=f"proc-{name}")
    consumer = client.subscribe(topic, subscription, sub_type, name)
    print("ready", consumer.id, flush=True)
    for msg in consumer:
        consumer.ack(msg)


if __name__ == "__main__":
    main()
