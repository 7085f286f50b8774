"""The WebSocket transport: a hub server, one-shot rounds, and live clients that reconnect.

Built on the `websockets` library's threaded API, which fits APSW: every connection gets a
thread, and the sans-I/O session (`sync.session`) does the protocol. This module only moves
bytes between sockets and sessions, and wakes sessions when the database changes.

    with sync.serve(db, "127.0.0.1", 0, token="s3cret") as server:        # hub, many clients
        result = sync.Peer(other).sync_with(server.url, token="s3cret")     # one pull+push round
        with sync.connect(third, server.url, token="s3cret") as client:     # live until closed
            client.wait_connected(5)

Threads (every owner is a context manager with an idempotent `close()`):

    SyncServer      websockets' accept thread + one handler thread per connection (server.py)
    LiveClient      one supervisor thread: connect, run, back off, reconnect (client.py)
    Channel         per open connection: a reader thread filling an inbox; the owner thread
                    runs the session (the only thread touching it) and sends its frames;
                    woken by the database's change notifier (`db.on_change`) (channel.py)

Reading never waits on the session and the session never waits on the network, so two peers
pushing at each other cannot deadlock; the Database lock is only held inside session calls.

Errors: refusals come from the session as `SyncError` subclasses (`AuthError`,
`SchemaMismatchError`, ... see sync.errors); transport failures are `TransportError`. Thread
entry points log and close; only the caller-facing calls raise.
"""

from .channel import Channel, TransportStats
from .client import LiveClient, check_url, connect, sync_with_url
from .server import SyncServer, serve
from ..errors import TransportError

__all__ = [
    "serve",
    "connect",
    "sync_with_url",
    "SyncServer",
    "LiveClient",
    "Channel",
    "TransportStats",
    "TransportError",
    "check_url",
]
