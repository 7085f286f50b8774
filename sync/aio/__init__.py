"""asyncio API for the common path: the database, a sync round, a server, a change feed.

    from sync.aio import AsyncDatabase, AsyncPeer, serve, watch

    async with AsyncDatabase.open("a.db") as a, AsyncDatabase.open("b.db") as b:
        await a.events.publish("wf-1", "inbox", "msg-1", {"text": "hi"})   # runs in a worker thread
        async with serve(a, "127.0.0.1", 8765, token="s3cret") as server:
            result = await AsyncPeer(b).sync_with(server.url, token="s3cret")
        async for batch in watch(b, since=0):                              # new commits as they land
            ...

Nothing here is a second protocol: every round, served or initiated, drives the same
sans-I/O `sync.session.Session` as the threaded transports, over `websockets`' asyncio API.
What touches the database (opening, store calls, a session's reads and merges, the change
feed's reads) runs in worker threads; the event loop only moves frames and waits. A change
notification (`db.on_change`) arrives on the notifier's thread and is handed to the loop with
`call_soon_threadsafe`.

    AsyncDatabase   engine.aio: a Database's calls as awaitables (re-exported here)
    AsyncPeer       await peer.sync_with(url or peer, token=..., progress=...)   (peer.py)
    serve           async with serve(db, host, port, token=...) as server         (server.py)
    watch           async for batch in watch(db, since=...)                       (watch.py)
    AsyncChannel    one WebSocket driven by one session (channel.py)

Errors are those of the synchronous API: `SyncError` subclasses for refusals and transport
failures, `EngineError` subclasses from the database.
"""

from engine.aio import AsyncDatabase, AsyncProxy, Opening

from .channel import AsyncChannel, Lane
from .peer import AsyncPeer, sync_with_url
from .server import AsyncSyncServer, serve
from .watch import Change, ChangeBatch, watch

__all__ = [
    "AsyncDatabase",
    "AsyncProxy",
    "Opening",
    "AsyncPeer",
    "sync_with_url",
    "serve",
    "AsyncSyncServer",
    "watch",
    "Change",
    "ChangeBatch",
    "AsyncChannel",
    "Lane",
]
