"""artifactqc: label-free detection of artifact-laden MR volumes in multi-site cohorts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("artifactqc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
