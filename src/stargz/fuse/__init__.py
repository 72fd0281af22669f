"""The FUSE kernel protocol over /dev/fuse, and keeping its connection across restarts."""
