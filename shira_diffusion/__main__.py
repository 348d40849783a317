"""`python -m shira_diffusion ...` is the same as `shira-diffusion ...`."""

import sys

from .cli import main

sys.exit(main())
