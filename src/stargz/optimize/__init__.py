"""``stargz optimize``: run a workload on an image, record which files it opens in each
layer, and convert the image with those files first (before ``.prefetch.landmark``).

- `stargz.optimize.sandbox`: the layers mounted through our own FUSE filesystem (every
  open observed per layer), stacked with overlayfs and a scratch upper dir.
- `stargz.optimize.spec`: the OCI runtime spec of the workload, from the image config.
- `stargz.optimize.runc`: the workload run with ``runc``, stopped after a period.
- `stargz.optimize.record`: the JSON-lines record Go's ``ctr-remote`` writes and reads.
- `stargz.optimize.run`: the whole flow.
"""
