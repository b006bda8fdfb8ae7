"""Watching the channel while the circuit is open, so the breaker hears at once when the server is back.

After an outage the breaker probes once per `reset_timeout_s`; a probe sent while the channel is still
between reconnection attempts fails at once and re-opens the circuit. Told the moment the channel is READY
again after having been down, the breaker lets the next call probe straight away (issue 10, defect 7). A
circuit opened while the channel stayed READY (a server answering too slowly) hears nothing and keeps its
cool-down.

The two gRPC flavours expose connectivity differently, so this is the one part of the transport written
twice: the blocking channel pushes changes to a subscriber (`grpc.Channel.subscribe`, subscribed only while
the circuit is not closed), the asyncio channel answers `get_state` when asked (asked when the circuit opens
and before each call while it is not closed). Both ask the channel to connect.
"""

from __future__ import annotations

import threading
import time

import grpc

from crypto_client.breaker import BreakerState, CircuitBreaker

_POLL_ROUND_S = 0.25  # grpc._channel._poll_connectivity watches in rounds of 0.2 s


class _ReconnectSignal:
    """READY seen after a state that was not READY: the channel reconnected."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._lock = threading.Lock()
        self._down = False

    def saw(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            reconnected = state is grpc.ChannelConnectivity.READY and self._down
            self._down = state is not grpc.ChannelConnectivity.READY
        if reconnected:
            self._breaker.reconnected()

    def reset(self) -> None:
        with self._lock:
            self._down = False


class ChannelWatch:
    """For a blocking channel: subscribed from the moment the circuit opens until it closes again."""

    def __init__(self, channel: grpc.Channel, breaker: CircuitBreaker) -> None:
        self._channel = channel
        self._signal = _ReconnectSignal(breaker)
        self._lock = threading.Lock()
        self._subscribed = False
        breaker.add_listener(self._breaker_moved)

    def _breaker_moved(self, old: BreakerState, new: BreakerState) -> None:
        with self._lock:
            if new is BreakerState.OPEN and not self._subscribed:
                self._signal.reset()  # the first state delivered says whether the channel is down now
                self._channel.subscribe(self._signal.saw, try_to_connect=True)
                self._subscribed = True
            elif new is BreakerState.CLOSED and self._subscribed:
                self._unsubscribe()

    def _unsubscribe(self) -> None:
        self._channel.unsubscribe(self._signal.saw)
        self._subscribed = False

    def poll(self) -> None:
        """Nothing to do: changes arrive by themselves."""

    def close(self) -> None:
        """Before the channel closes. Subscribed (closing during an outage), gRPC's polling thread needs one
        of its 0.2 s watch rounds to see no subscriber left: a channel closed sooner makes that thread die
        with a traceback ("Cannot monitor channel state: Channel closed!"), so this waits that long."""
        with self._lock:
            if not self._subscribed:
                return
            self._unsubscribe()
        time.sleep(_POLL_ROUND_S)


class AsyncChannelWatch:
    """For an asyncio channel: asked for its state (a local read, no I/O) while the circuit is not closed."""

    def __init__(self, channel: grpc.aio.Channel, breaker: CircuitBreaker) -> None:
        self._channel = channel
        self._breaker = breaker
        self._signal = _ReconnectSignal(breaker)
        breaker.add_listener(self._breaker_moved)

    def _breaker_moved(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            self._signal.reset()
            self._ask()

    def _ask(self) -> None:
        self._signal.saw(self._channel.get_state(try_to_connect=True))

    def poll(self) -> None:
        if self._breaker.state is not BreakerState.CLOSED:
            self._ask()

    def close(self) -> None:
        """Nothing to undo."""
