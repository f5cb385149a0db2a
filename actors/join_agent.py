"""JoinAgent: how a node's root finds the root of the convention leader.

A joining root creates one with `targetActorRequirements` naming the leader: Thespian's convention
places it in the leader's actor system, where the leader's root is a global name. The agent
introduces the joining root to it, and ends when that root says it heard (ending at once would
abandon the global-name lookup still under way). From then on the roots talk directly.
"""
from datetime import timedelta

from actorbroker.actors import cluster
from actorbroker.actors.base import BrokerActor


class JoinAgent(BrokerActor):
    process_name = "ab-join"

    @staticmethod
    def actorSystemCapabilityCheck(capabilities, requirements):
        return all(capabilities.get(name) == value for name, value in requirements.items())

    def on_FindLeaderRoot(self, msg, sender):
        root = self.createActor("actorbroker.actors.broker.BrokerRootActor",
                                globalName=cluster.ROOT_GLOBAL_NAME)
        self.send(root, cluster.Introduce(msg.root))
        self.wakeupAfter(timedelta(seconds=10))   # in case no answer comes

    def on_WakeupMessage(self, msg, sender):
        self.exit_self()

    def on_Introduced(self, msg, sender):
        self.exit_self()
