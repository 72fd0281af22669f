"""A client of containerd's own gRPC API, and ``rpull``: a lazy pull as ``ctr-remote i
rpull`` makes it, with no Go tool.

- :mod:`~stargz.containerd.client`: content, images, leases, snapshots and diff calls over
  containerd's socket, errors as :mod:`stargz.errors`;
- :mod:`~stargz.containerd.labels`: the snapshot, GC and source labels, spelled as
  containerd and the Go tools spell them;
- :mod:`~stargz.containerd.fetch`: index, manifest, config and layer blobs from the
  registry (:mod:`stargz.remote`);
- :mod:`~stargz.containerd.content`: blobs into the content store, labelled;
- :mod:`~stargz.containerd.unpack`: each layer a remote snapshot, else unpacked;
- :mod:`~stargz.containerd.pull`: the whole pull, under a lease.

It talks to the snapshotter only through containerd, and imports none of the daemon's
parts (``fs``, ``snapshot``, ``service`` but its generated protos).
"""
