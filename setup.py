"""Build the Cython core in src/_native/ into stargz.estargz._codec, _tocindex, _tocbuild.

The extensions link ISA-L (gzip inflate), libzstd and OpenSSL's libcrypto (sha256),
all from Debian packages that ci/setup.sh installs (the -dev ones). The release wheel
(ci/wheel.sh) carries copies of the three libraries, so installing it needs none of them.
Set STARGZ_NO_EXTENSIONS=1 to build without them; the pure-Python twins are then used.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("STARGZ_NO_EXTENSIONS") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "stargz.estargz._codec",
                ["src/_native/_codec.pyx"],
                libraries=["isal", "zstd", "crypto"],
            ),
            Extension("stargz.estargz._tocindex", ["src/_native/_tocindex.pyx"]),
            Extension("stargz.estargz._tocbuild", ["src/_native/_tocbuild.pyx"]),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        include_path=["src/_native/includes"],
    )

setup(ext_modules=ext_modules)
