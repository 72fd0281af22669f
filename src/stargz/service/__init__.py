"""gRPC servicers: containerd's Snapshots API over a ``stargz.snapshot.Snapshotter``.

``server.Server`` wires a Snapshotter (and, once ``stargz.fs`` exists, its FileSystem) to
a ``grpc.aio`` server on a unix socket; ``errors`` maps ``stargz.errors`` to gRPC codes.
"""
