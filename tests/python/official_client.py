"""The official Python client (`wse-client` 2.5.1, unchanged) against a running wsengine.

Driven by tests/official_client.rs, which runs the engine (recovery on) and publishes from
Rust. Every check below goes through the client's public API (`AsyncWSEClient`, `on`,
`subscribe`, `send`, `force_reconnect`, `recovery_state`, `get_stats`); the recovery after the
reconnect is the client's own (PROTOCOL.md section 9.5): it re-subscribes with `recover: true`
and its saved positions, and its (epoch, offset) detector drops duplicates. The client must
also log no warning or error of its own during the run (it logs those when a server surprises
it: undecodable frames, missing server_ready, failed subscriptions, ...).

Usage: official_client.py URL TOPIC FILTERED_TOPIC BEFORE QUOTES

Lines printed on stdout (one per line, the Rust side reacts to them):
  READY <connection_id>  connected (server_ready seen, recovery announced), subscribed to
                         TOPIC and, with the filter {"symbol": "AAPL"}, to FILTERED_TOPIC
  RECONNECTING           BEFORE ticks 0..BEFORE-1 on TOPIC and the AAPL quotes of QUOTES
                         quotes (even n) arrived; the client dropped its connection through
                         `force_reconnect()` and reconnects by itself after its backoff
  RECOVERED <id>         after the first TOTAL: every tick arrived exactly once, in order;
                         <id> is the connection_id of the new connection (the Rust side
                         then closes it with 1013 and the client reconnects by itself)
  RESULT <json>          after the second TOTAL: the verdict; exit status 0 only when "ok"
                         is true
Lines read on stdin (twice):
  TOTAL <n>              every tick 0..n-1 has been published on TOPIC

Payloads: ticks are {"n": i} of type "tick"; quotes are {"n": i, "symbol": "AAPL"|"MSFT"}
of type "quote" (AAPL for even i).
"""

import asyncio
import json
import logging
import re
import sys

try:
    import wse_client
    from wse_client import AsyncWSEClient, ReconnectConfig
except ImportError as error:  # pragma: no cover - reported to the Rust test
    sys.stderr.write(
        "the Python package `wse-client` is missing ({}); "
        "install it with: python3 -m pip install wse-client==2.5.1\n".format(error)
    )
    sys.exit(3)

EXPECTED_VERSION = "2.5.1"
EPOCH = re.compile(r"^[0-9a-f]{8}$")
# Each wait is bounded; the Rust side bounds the whole run too.
WAIT_SECONDS = 15.0
# After the last expected message: how long a late duplicate gets to show up.
SETTLE_SECONDS = 0.3


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Failure(Exception):
    pass


class Complaints(logging.Handler):
    """Keeps the client's own warnings and errors: against a compatible server it has none."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append("{}: {}".format(record.levelname, record.getMessage()))


def check(condition, message):
    if not condition:
        raise Failure(message)


async def wait_until(predicate, what):
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise Failure("timed out waiting for " + what)
        await asyncio.sleep(0.01)


async def read_stdin_line():
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise Failure("stdin closed before TOTAL")
    return line.strip()


async def read_total():
    words = (await read_stdin_line()).split()
    check(len(words) == 2 and words[0] == "TOTAL", "expected TOTAL <n> on stdin, got {!r}".format(words))
    return int(words[1])


async def recovered(client, topic, ticks, total, reconnects, result):
    """Waits for ticks 0..total-1 and checks each arrived exactly once, in order, stamped with
    its own offset, after exactly `reconnects` reconnects."""

    def tally():
        numbers = [e.payload.get("n") for e in ticks]
        missing = sorted(set(range(total)) - set(numbers))
        duplicates = len(numbers) - len(set(numbers))
        result["after_reconnect_{}".format(reconnects)] = {
            "total": total,
            "received": len(numbers),
            "missing": missing[:20],
            "duplicates": duplicates,
        }
        return numbers, missing, duplicates

    try:
        await wait_until(lambda: len(ticks) >= total, "{} ticks after reconnect {}".format(total, reconnects))
    finally:
        tally()  # what did arrive, also when the wait timed out
    await asyncio.sleep(SETTLE_SECONDS)
    numbers, missing, duplicates = tally()
    check(not missing and duplicates == 0, "ticks lost or duplicated across reconnect {}".format(reconnects))
    check(numbers == list(range(total)), "ticks out of order across reconnect {}".format(reconnects))
    check(all(e.offset == e.payload.get("n") for e in ticks), "a tick's offset differs from its number")
    check(all(e.epoch == ticks[0].epoch for e in ticks), "the epoch changed")
    stats = client.get_stats()
    check(
        stats["reconnect_count"] == reconnects,
        "expected {} reconnect(s), the client counted {}".format(reconnects, stats["reconnect_count"]),
    )
    check(client.is_fully_ready, "not ready after reconnect {}".format(reconnects))
    position = client.recovery_state.get(topic)
    check(position == (ticks[0].epoch, total - 1), "saved position after reconnect {}: {!r}".format(reconnects, position))
    return total


async def run(url, topic, filtered_topic, before, quotes, result):
    check(
        wse_client.__version__ == EXPECTED_VERSION,
        "wse-client {} installed, the test is for {}".format(wse_client.__version__, EXPECTED_VERSION),
    )
    # No jitter and a short fixed first delay keep the test fast; the delay still leaves the
    # Rust side ample time to publish while the client is away.
    reconnect = ReconnectConfig(base_delay=0.5, jitter=False)
    client = AsyncWSEClient(url, reconnect=reconnect)
    ticks = []  # every "tick" event handed to the application, in order
    quotes_seen = []

    @client.on("tick")
    def on_tick(event):
        ticks.append(event)

    @client.on("quote")
    def on_quote(event):
        quotes_seen.append(event)

    await client.connect()
    try:
        # Handshake: server_ready handled (client_hello sent in answer), recovery announced.
        await wait_until(lambda: client.is_fully_ready, "server_ready / client_hello")
        check(client.recovery_enabled, "server_ready did not announce features.recovery")
        connection_id = client.get_stats()["connection_id"]
        check(bool(connection_id), "server_ready carried no connection_id")

        check(await client.subscribe([topic]), "subscribe() was not sent")
        # The client's subscribe() takes no extra fields; a filtered subscription is a
        # subscription_update the application sends itself (the README's wire example).
        filtered = {"action": "subscribe", "topics": [filtered_topic], "filter": {"symbol": "AAPL"}}
        check(await client.send("subscription_update", filtered), "filtered subscribe was not sent")
        say("READY " + connection_id)

        aapl = [n for n in range(quotes) if n % 2 == 0]
        await wait_until(
            lambda: len(ticks) >= before and len(quotes_seen) >= len(aapl),
            "the first {} ticks and {} AAPL quotes".format(before, len(aapl)),
        )
        await asyncio.sleep(SETTLE_SECONDS)
        result["before"] = [e.payload.get("n") for e in ticks]
        result["quotes"] = [e.payload.get("n") for e in quotes_seen]
        check(result["before"] == list(range(before)), "ticks before the reconnect out of order or duplicated")
        check(result["quotes"] == aapl, "the filtered subscription got other than the AAPL quotes, in order")
        check(
            all(e.payload.get("symbol") == "AAPL" for e in quotes_seen),
            "a quote not matching the filter was delivered",
        )
        # Filtered deliveries carry no recovery stamp, so the gap detector cannot fire on them.
        check(
            all(e.topic is None and e.epoch is None and e.offset is None for e in quotes_seen),
            "a filtered delivery carried a tp/e/o stamp",
        )
        for i, event in enumerate(ticks):
            check(event.topic == topic, "tick {} stamped with topic {!r}".format(i, event.topic))
            check(EPOCH.match(event.epoch or "") is not None, "tick {} epoch {!r}".format(i, event.epoch))
            check(event.offset == i, "tick {} has offset {!r}".format(i, event.offset))
        saved = client.recovery_state.get(topic)
        check(saved == (ticks[0].epoch, before - 1), "saved position before the drop: {!r}".format(saved))
        result["position_before_drop"] = list(saved)

        # Drop the connection the client's own way; it reconnects after its backoff.
        await client.force_reconnect()
        say("RECONNECTING")

        # First drop: recovery after the client's own reconnect.
        total = await recovered(client, topic, ticks, await read_total(), 1, result)
        say("RECOVERED " + client.get_stats()["connection_id"])

        # Second drop: the engine closes the connection (1013, as for a slow consumer); the
        # client reconnects by itself and recovers again.
        total = await recovered(client, topic, ticks, await read_total(), 2, result)
        result["total"] = total
    finally:
        await client.disconnect()


def main():
    if len(sys.argv) != 6:
        sys.stderr.write(__doc__)
        sys.exit(2)
    url, topic, filtered_topic = sys.argv[1], sys.argv[2], sys.argv[3]
    before, quotes = int(sys.argv[4]), int(sys.argv[5])
    result = {"ok": False, "client": getattr(wse_client, "__version__", "?")}
    complaints = Complaints()
    logging.getLogger("wse_client").addHandler(complaints)
    try:
        asyncio.run(run(url, topic, filtered_topic, before, quotes, result))
        check(not complaints.messages, "the client logged warnings or errors")
        result["ok"] = True
    except Failure as failure:
        result["error"] = str(failure)
    except Exception as error:  # anything else the client raised
        result["error"] = "{}: {}".format(type(error).__name__, error)
    result["client_warnings"] = complaints.messages
    say("RESULT " + json.dumps(result, sort_keys=True))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
