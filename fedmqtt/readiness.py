"""When a device listens for version announcements: the defaults of ``[training]
announce_wait_s`` and ``fast_repeat_s`` (docs/agent.md, "Downlink").

A device is subscribed to the announcements only while it is ready to train; these two
settings bound that rule where it would cost more than it saves.
"""

from __future__ import annotations

from typing import Final

#: A repeated round on the version already trained on (``max_updates_per_version != 1``) first
#: listens this long after subscribing for the retained announcement, so that a newer version
#: is fetched rather than the old one trained again. Longer: fewer stale retrains over a slow
#: link or a broker that answers late; shorter: a repeated round starts sooner when no
#: announcement comes (no retained one on the broker). 0 trains at once.
ANNOUNCE_WAIT_S: Final = 3.0

#: A device that is ready again this soon after each round stays subscribed to the
#: announcements throughout: one that retrains a version with ``interval_s`` at most this, or
#: whose last round plus ``interval_s`` took at most this. Subscribing afresh for every round
#: costs it a round trip through the broker before each fetch (11 % fewer updates per second
#: in ``fedmqtt simulate`` with 20 devices, docs/benchmarks.md), and about as many bytes as the
#: announcements it would skip. Larger: more devices keep the subscription (more announcement
#: bytes while training); 0: every device listens only while ready.
FAST_REPEAT_S: Final = 1.0

#: A device that is ready again within ``fast_repeat_s`` does not listen to the announcements
#: from the start of a fetch until this many times its median subscribe-to-retained-
#: announcement time before it can start its next round (its training's expected end or its
#: interval, whichever is later); it stops again once it has heard of a newer version it will
#: fetch. So the retained, newest announcement is there when the round can start, without a
#: round trip then, and the versions published meanwhile are not received. Larger: the
#: retained one more surely arrives in time (a lead longer than needed costs at most one
#: announcement per round, when the retained one is the version just fetched); smaller: it may
#: arrive late (the device then waits for it, as one that subscribes only when ready). A
#: device whose rounds last less than twice the lead stays subscribed throughout.
RELISTEN_LEAD_FACTOR: Final = 2.0

#: The least lead (seconds), whatever was measured.
RELISTEN_MIN_LEAD_S: Final = 0.02
