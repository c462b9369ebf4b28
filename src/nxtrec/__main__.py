import sys

from nxtrec.cli import main

sys.exit(main())
