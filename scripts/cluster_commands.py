"""Cluster subcommands of the `actorbroker` command: cluster (members), lookup (a topic's node)."""
import json
import time


def add_cluster_commands(subparsers, common, with_client):
    p = subparsers.add_parser("cluster", parents=[common], help="list the cluster's members",
                              description="List the members of the cluster the broker at --url "
                                          "belongs to: role, state, load and heartbeat age.")
    p.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until interrupted")
    p.add_argument("--json", action="store_true", help="print the broker's answer as JSON")
    p.set_defaults(func=with_client(cluster))

    p = subparsers.add_parser("lookup", parents=[common], help="which node owns a topic",
                              description="Print the node that owns TOPIC (or would, if it were "
                                          "created now) as JSON.")
    p.add_argument("topic", metavar="TOPIC")
    p.set_defaults(func=with_client(lookup))


def cluster(client, args):
    """List the cluster's members."""
    while True:
        members = client.cluster()
        if args.json:
            print(json.dumps(members, indent=2), flush=True)
        else:
            if args.watch:
                print("\x1b[H\x1b[2J", end="")   # clear the terminal
            print_members(members)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def print_members(members):
    from actorbroker.scripts.client_commands import print_table
    rows = [("NODE", "ROLE", "STATE", "ADDRESS", "CONNECTIONS", "TOPICS", "MSG/S", "HEARTBEAT AGE")] + [
        (m["node"] + (" *" if m.get("self") else ""), m["role"], m["state"], m["address"],
         str(m["connections"]), str(m["topics"]), f"{m['msgs_per_s']:.0f}",
         f"{m['heartbeat_age_ms'] / 1000:.1f} s")
        for m in members]
    print_table(rows)
    print(flush=True)


def lookup(client, args):
    """The node that owns a topic."""
    print(json.dumps(client.lookup(args.topic), indent=2))
    return 0
