"""`python -m nlsr <flags>`: the `nlsr` command (train or evaluate)."""

import sys

from nlsr.main import main

sys.argv[0] = "python -m nlsr"  # the name --help and usage errors show
sys.exit(main())
