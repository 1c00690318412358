"""`python -m darl_infer.serve`: the same as `darl-infer serve`."""

import sys

from .cli import serve_main

sys.exit(serve_main())
