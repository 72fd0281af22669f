"""gRPC servicers: containerd's Snapshots API over a ``stargz.snapshot.Snapshotter``.

``server.Server`` wires a Snapshotter and the FileSystem that mounts its remote layers to a
``grpc.aio`` server on a unix socket; ``errors`` maps ``stargz.errors`` to gRPC codes.
"""
