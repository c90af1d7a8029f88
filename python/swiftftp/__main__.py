"""``python -m swiftftp …`` is ``swiftftp-proxy …``."""

import sys

from .cli import proxy_main

sys.exit(proxy_main())
