"""The EDSR entry point, run from a checkout as the published commands do: `cd src && python main.py <flags>`
(the `nlsr` command of the installed package; `python main.py --help` lists every flag)."""

import sys

from nlsr.main import main

if __name__ == '__main__':
    sys.exit(main())
