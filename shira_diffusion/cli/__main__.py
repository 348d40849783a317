"""`python -m shira_diffusion.cli ...` is the same as `shira-diffusion ...`."""

import sys

from . import main

sys.exit(main())
